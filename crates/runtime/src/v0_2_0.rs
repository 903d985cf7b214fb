//! `digishare:bot@0.2.0`: its bindings, and the conversions between its
//! types and the host's own, at this module's edge. 0.2.0 adds the
//! conversation's state to both events; everything else is 0.1.0's and
//! converts through the shared `version_edge!` (edge.rs).

wasmtime::component::bindgen!({
    world: "bot",
    path: "../../wit/since_v0.2.0",
    // Every call is async: a host call that waits holds no thread.
    imports: { default: async },
    exports: { default: async },
});

use digishare::bot::types as wit;

/// The interface version this module speaks.
pub const VERSION: &str = "0.2.0";

version_edge!();

conversation_kv_host!();

events_with_state!();

/// 0.2.0's message event: no burst (a debounced plugin built against
/// 0.2.0 sees the burst's last message alone).
fn message_event(
    event_id: &str,
    message: wit::Message,
    _burst: &[event::Message],
    state: event::ConversationState,
) -> wit::MessageEvent {
    wit::MessageEvent {
        event_id: event_id.to_string(),
        message,
        state: to_wit_state(state),
    }
}
