//! `digishare:bot@0.1.0`: its bindings, and the conversions between its
//! types and the host's own, at this module's edge. The rest of the host
//! sees only [`digibot_domain::event`] and [`digibot_protocol::Action`]; each WIT
//! version has a sibling module that converts to the same types, sharing
//! what the versions have in common through `version_edge!` (edge.rs).

wasmtime::component::bindgen!({
    world: "bot",
    path: "../../wit/since_v0.1.0",
    // Every call is async: a host call that waits holds no thread.
    imports: { default: async },
    exports: { default: async },
});

use digishare::bot::types as wit;

/// The interface version this module speaks.
pub const VERSION: &str = "0.1.0";

version_edge!();

conversation_kv_host!();

// 0.1.0 has no conversation state: its plugins are not told about it (the
// host still decides, by the state, whether they are called at all).

fn new_conversation_event(
    event_id: &str,
    conversation: wit::Conversation,
    _state: event::ConversationState,
) -> wit::NewConversationEvent {
    wit::NewConversationEvent {
        event_id: event_id.to_string(),
        conversation,
    }
}

fn message_event(
    event_id: &str,
    message: wit::Message,
    _burst: &[event::Message],
    _state: event::ConversationState,
) -> wit::MessageEvent {
    wit::MessageEvent {
        event_id: event_id.to_string(),
        message,
    }
}
