//! `digishare:bot@0.3.0`: its bindings, and the conversions between its
//! types and the host's own, at this module's edge. 0.3.0 adds outbound
//! HTTP: the world imports `wasi:http/outgoing-handler` (linked from
//! wasmtime-wasi-http, its hook in `outbound`) and `outbound`, which says
//! why a request was refused. Events and actions are 0.2.0's and convert
//! through the shared `version_edge!` (edge.rs).

wasmtime::component::bindgen!({
    world: "bot",
    path: "../../wit/since_v0.3.0",
    // wasmtime-wasi-http's bindings are for `Send` store data.
    require_store_data_send: true,
    // Every call is async: a host call that waits (an HTTP request) holds
    // no thread.
    imports: { default: async },
    exports: { default: async },
    // wasi:http and what it uses are wasmtime-wasi(-http)'s, linked once
    // for every version.
    with: {
        "wasi:http": wasmtime_wasi_http::p2::bindings::http,
        "wasi:io": wasmtime_wasi::p2::bindings::io,
        "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
    },
});

use digishare::bot::types as wit;

/// The interface version this module speaks.
pub const VERSION: &str = "0.3.0";

version_edge!();

/// What 0.3.0 imports beyond the shared interfaces: `outbound`.
pub fn add_outbound_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    digishare::bot::outbound::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

impl digishare::bot::outbound::Host for HostState {
    async fn last_refusal(&mut self) -> Option<digishare::bot::outbound::Refusal> {
        self.http_refusal()
            .map(|r| digishare::bot::outbound::Refusal {
                kind: r.kind.to_string(),
                message: r.message,
            })
    }
}

events_with_state!();
