//! One plugin call, event in, actions out: digibot's `Runtime::invoke` on a
//! fresh instance, against plain wasmtime in the same run (pooling
//! allocator, fresh instance, the same component) and a reused instance
//! (no isolation: the floor).
//!
//! Needs `cargo build-plugins` first. Run: `cargo bench -p digibot --bench invoke`.

use criterion::{Criterion, criterion_group, criterion_main};
use digibot::event::Event;
use digibot::runtime::{Call, Manifest, MemoryKv, Runtime, RuntimeConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn echo_bytes() -> Vec<u8> {
    let path = root().join("target/wasm32-wasip2/release/echo.wasm");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run cargo build-plugins", path.display()))
}

fn event() -> Event {
    let path = root().join("tests/fixtures/webhooks/message_text_customer.json");
    Event::parse(&std::fs::read(path).unwrap()).unwrap()
}

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

fn plain_store(engine: &Engine) -> Store<Plain> {
    Store::new(
        engine,
        Plain {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
        },
    )
}

fn bench(c: &mut Criterion) {
    let bytes = echo_bytes();
    let ev = event();
    let call = Call::for_event(&ev).unwrap();

    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let plugin = runtime.load("echo", &bytes, Manifest::default()).unwrap();
    let kv: Arc<dyn digibot::runtime::KvRead> = Arc::new(MemoryKv::default());
    let mut group = c.benchmark_group("plugin_call");
    // Events arriving at any rate the janitor keeps up with: a warm,
    // never-used instance is ready; only the call is timed.
    group.bench_function("digibot_invoke_fresh_instance_paced", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                while runtime.warm_instances() == 0 {
                    std::thread::yield_now();
                }
                let started = Instant::now();
                let out = runtime.invoke(&plugin, &call, kv.clone());
                total += started.elapsed();
                assert_eq!(out.outcome.unwrap().len(), 1);
            }
            total
        })
    });
    for keep in [256usize << 10, 2 << 20] {
        let rt = Runtime::new(RuntimeConfig {
            keep_resident: keep,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let p = rt.load("echo", &bytes, Manifest::default()).unwrap();
        group.bench_function(
            format!("digibot_invoke_paced_keep_resident_{}k", keep >> 10),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        while rt.warm_instances() == 0 {
                            std::thread::yield_now();
                        }
                        let started = Instant::now();
                        let out = rt.invoke(&p, &call, kv.clone());
                        total += started.elapsed();
                        assert_eq!(out.outcome.unwrap().len(), 1);
                    }
                    total
                })
            },
        );
    }
    // Back to back: the janitor cannot refill as fast, so most calls also
    // instantiate inline.
    group.bench_function("digibot_invoke_fresh_instance_back_to_back", |b| {
        b.iter(|| {
            let out = runtime.invoke(&plugin, &call, kv.clone());
            assert_eq!(out.outcome.unwrap().len(), 1);
        })
    });
    // Warm pool off: instantiate and drop on the calling thread.
    let cold = Runtime::new(RuntimeConfig {
        warm_instances: 0,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let cold_plugin = cold.load("echo", &bytes, Manifest::default()).unwrap();
    group.bench_function("digibot_invoke_fresh_instance_no_warm_pool", |b| {
        b.iter(|| {
            let out = cold.invoke(&cold_plugin, &call, kv.clone());
            assert_eq!(out.outcome.unwrap().len(), 1);
        })
    });

    // Plain wasmtime 48, pooling allocator, fresh instance per call, with
    // the event passed as dynamic values built once.
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(
        PoolingAllocationConfig::default(),
    ));
    let engine = Engine::new(&config).unwrap();
    let component = Component::new(&engine, &bytes).unwrap();
    let mut linker: Linker<Plain> = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
    for iface in [
        "digishare:bot/log@0.1.0",
        "digishare:bot/config@0.1.0",
        "digishare:bot/kv@0.1.0",
    ] {
        // echo imports none of these; define nothing.
        let _ = iface;
    }
    let pre = linker.instantiate_pre(&component).unwrap();
    let pre = digibot::runtime::v0_1_0::BotPre::new(pre).unwrap();
    let wit_event = plain_event(&ev);
    group.bench_function("plain_wasmtime_pooling_fresh_instance", |b| {
        b.iter(|| {
            let mut store = plain_store(&engine);
            let bot = pre.instantiate(&mut store).unwrap();
            let out = bot
                .call_on_message(&mut store, &wit_event)
                .unwrap()
                .unwrap();
            assert_eq!(out.len(), 1);
        })
    });

    let mut store = plain_store(&engine);
    let bot = pre.instantiate(&mut store).unwrap();
    group.bench_function("reused_instance_no_isolation", |b| {
        b.iter(|| {
            let out = bot
                .call_on_message(&mut store, &wit_event)
                .unwrap()
                .unwrap();
            assert_eq!(out.len(), 1);
        })
    });
    group.finish();
}

fn plain_event(ev: &Event) -> digibot::runtime::v0_1_0::digishare::bot::types::MessageEvent {
    use digibot::runtime::v0_1_0::digishare::bot::types as wit;
    let digibot::event::EventKind::Message(m) = &ev.kind else {
        panic!()
    };
    let digibot::event::Content::Text { text } = &m.content else {
        panic!()
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

criterion_group!(benches, bench);
criterion_main!(benches);
