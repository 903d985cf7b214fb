//! Per-call latency of one plugin call (event in, actions out), as p50/p99
//! over many calls, for digibot's `Runtime::invoke` and for plain wasmtime
//! in the same run. Criterion (benches/invoke.rs) gives means; this gives
//! the percentiles BENCHMARKS.md quotes.
//!
//! `cargo build-plugins && cargo run --release -p digibot --example invoke_latency [CALLS]`

use digibot::event::Event;
use digibot::runtime::{Call, KvRead, Manifest, MemoryKv, Runtime, RuntimeConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

struct Plain {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Plain {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{name:<44} p50 {:>7.2} µs   p90 {:>7.2} µs   p99 {:>7.2} µs   ({} calls)",
        at(0.50).as_secs_f64() * 1e6,
        at(0.90).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6,
        samples.len()
    );
}

fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bytes = std::fs::read(root.join("target/wasm32-wasip2/release/echo.wasm"))
        .expect("run `cargo build-plugins` first");
    let event = Event::parse(
        &std::fs::read(root.join("tests/fixtures/webhooks/message_text_customer.json")).unwrap(),
    )
    .unwrap();
    let call = Call::for_event(&event).unwrap();
    let kv: Arc<dyn KvRead> = Arc::new(MemoryKv::default());
    // Events arrive spaced out, as webhooks do (200 µs: 5,000 events/s for
    // this one plugin); only the call is timed.
    let pace = Duration::from_micros(200);

    // KEEP_RESIDENT=bytes tries another pooled-memory reset policy.
    let keep_resident = std::env::var("KEEP_RESIDENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RuntimeConfig::default().keep_resident);
    for (label, config) in [
        (
            "digibot invoke (warm pool, paced)",
            RuntimeConfig {
                keep_resident,
                ..RuntimeConfig::default()
            },
        ),
        (
            "digibot invoke (no warm pool, paced)",
            RuntimeConfig {
                warm_instances: 0,
                ..RuntimeConfig::default()
            },
        ),
    ] {
        let runtime = Runtime::new(config).unwrap();
        let plugin = runtime.load("echo", &bytes, Manifest::default()).unwrap();
        let mut samples = Vec::with_capacity(calls);
        for i in 0..calls + 1000 {
            let spin = Instant::now();
            while spin.elapsed() < pace {
                std::hint::spin_loop();
            }
            let started = Instant::now();
            let out = runtime.invoke(&plugin, &call, kv.clone());
            let took = started.elapsed();
            assert_eq!(out.outcome.unwrap().len(), 1);
            if i >= 1000 {
                samples.push(took);
            }
        }
        percentiles(label, samples);
    }

    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(
        PoolingAllocationConfig::default(),
    ));
    let engine = Engine::new(&config).unwrap();
    let component = Component::new(&engine, &bytes).unwrap();
    let mut linker: Linker<Plain> = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
    let pre =
        digibot::runtime::v0_1_0::BotPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    let wit_event = wit_event(&event);
    let new_store = || {
        Store::new(
            &engine,
            Plain {
                wasi: WasiCtxBuilder::new().build(),
                table: ResourceTable::new(),
            },
        )
    };
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls + 1000 {
        let started = Instant::now();
        let mut store = new_store();
        let bot = pre.instantiate(&mut store).unwrap();
        let out = bot
            .call_on_message(&mut store, &wit_event)
            .unwrap()
            .unwrap();
        drop(store);
        let took = started.elapsed();
        assert_eq!(out.len(), 1);
        if i >= 1000 {
            samples.push(took);
        }
    }
    percentiles("plain wasmtime, pooling, fresh instance", samples);

    let mut store = new_store();
    let bot = pre.instantiate(&mut store).unwrap();
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        let out = bot
            .call_on_message(&mut store, &wit_event)
            .unwrap()
            .unwrap();
        samples.push(started.elapsed());
        assert_eq!(out.len(), 1);
    }
    percentiles("reused instance (no isolation)", samples);
}

fn wit_event(ev: &Event) -> digibot::runtime::v0_1_0::digishare::bot::types::MessageEvent {
    use digibot::runtime::v0_1_0::digishare::bot::types as wit;
    let digibot::event::EventKind::Message(m) = &ev.kind else {
        unreachable!()
    };
    let digibot::event::Content::Text { text } = &m.content else {
        unreachable!()
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
    }
}
