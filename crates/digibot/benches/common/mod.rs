//! Shared by `benches/hot_paths.rs` and `examples/invoke_latency.rs`: the echo
//! component, the fixture event, and what plain wasmtime needs to call it
//! (the baseline both measure against), with sync bindings (wasmtime's
//! plain `call`) and async ones (`call_async`, as digibot calls plugins).

#![allow(dead_code)]

use digibot_domain::event::Event;
use std::path::PathBuf;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// `digishare:bot@0.2.0` with sync calls: wasmtime's plain `call`.
pub mod sync_bot {
    wasmtime::component::bindgen!({
        world: "bot",
        path: "../../wit/since_v0.2.0",
    });
}

/// The same world with async calls, as digibot binds it.
pub mod async_bot {
    wasmtime::component::bindgen!({
        world: "bot",
        path: "../../wit/since_v0.2.0",
        imports: { default: async },
        exports: { default: async },
    });
}

use sync_bot::BotPre;
use sync_bot::digishare::bot::types as wit;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The echo component (`cargo build-plugins` first).
pub fn echo_bytes() -> Vec<u8> {
    let path = root().join("target/wasm32-wasip2/release/echo.wasm");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo build-plugins` first", path.display()))
}

/// The customer text fixture.
pub fn event() -> Event {
    let path = root().join("tests/fixtures/webhooks/message_text_customer.json");
    Event::parse(&std::fs::read(path).unwrap()).unwrap()
}

/// Store data for plain wasmtime: WASI and nothing else.
pub struct Plain {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl Plain {
    pub fn new() -> Plain {
        Plain {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for Plain {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn plain_engine(pooling: bool) -> Engine {
    let mut config = Config::new();
    if pooling {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(
            PoolingAllocationConfig::default(),
        ));
    }
    Engine::new(&config).unwrap()
}

/// The baseline: plain wasmtime 48 with WASI and the pooling allocator
/// (or on-demand allocation: wasmtime's default), ready to instantiate
/// `bytes` as a bot and call it synchronously.
pub fn plain_pre(bytes: &[u8], pooling: bool) -> (Engine, BotPre<Plain>) {
    let engine = plain_engine(pooling);
    let component = Component::new(&engine, bytes).unwrap();
    let mut linker: Linker<Plain> = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
    let pre = BotPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    (engine, pre)
}

/// [`plain_pre`] with async bindings and WASI: `instantiate_async` and
/// `call_async`, nothing else of digibot's.
pub fn plain_async_pre(bytes: &[u8], pooling: bool) -> (Engine, async_bot::BotPre<Plain>) {
    let engine = plain_engine(pooling);
    let component = Component::new(&engine, bytes).unwrap();
    let mut linker: Linker<Plain> = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    let pre = async_bot::BotPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    (engine, pre)
}

/// The fixture as the async bindings' event record.
pub fn async_wit_event(ev: &Event) -> async_bot::digishare::bot::types::MessageEvent {
    use async_bot::digishare::bot::types as a;
    let w = wit_event(ev);
    let wit::Content::Text(text) = w.message.content else {
        unreachable!("the fixture is a text")
    };
    a::MessageEvent {
        event_id: w.event_id,
        message: a::Message {
            id: w.message.id,
            conversation_id: w.message.conversation_id,
            sender: a::Sender {
                kind: a::SenderKind::Customer,
                name: w.message.sender.name,
                id: w.message.sender.id,
            },
            created_at: w.message.created_at,
            content: a::Content::Text(text),
        },
        state: a::ConversationState::Bot,
    }
}

/// The fixture as the sync bindings' event record, built once.
pub fn wit_event(ev: &Event) -> wit::MessageEvent {
    let digibot_domain::event::EventKind::Message(m) = &ev.kind else {
        unreachable!("the fixture is a message")
    };
    let digibot_domain::event::Content::Text { text } = &m.content else {
        unreachable!("the fixture is a text")
    };
    wit::MessageEvent {
        event_id: ev.key.clone(),
        message: wit::Message {
            id: m.id.clone(),
            conversation_id: m.conversation_id.clone(),
            sender: wit::Sender {
                kind: wit::SenderKind::Customer,
                name: m.sender.name.clone(),
                id: m.sender.id.clone(),
            },
            created_at: m.created_at.clone(),
            content: wit::Content::Text(text.clone()),
        },
        state: wit::ConversationState::Bot,
    }
}
