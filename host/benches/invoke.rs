//! One plugin call, event in, actions out: digibot's `Runtime::invoke` on a
//! fresh instance, against plain wasmtime in the same run (pooling
//! allocator, fresh instance, the same component) and a reused instance
//! (no isolation: the floor). `examples/invoke_latency.rs` gives the same
//! cases as percentiles.
//!
//! Needs `cargo build-plugins` first. Run: `cargo bench -p digibot --bench invoke`.

mod common;

use common::{Plain, echo_bytes, event, plain_pre, wit_event};
use criterion::{Criterion, criterion_group, criterion_main};
use digibot::event::ConversationState;
use digibot::runtime::{Call, KvRead, Manifest, MemoryKv, Runtime, RuntimeConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::Store;

fn bench(c: &mut Criterion) {
    let bytes = echo_bytes();
    let ev = event();
    let call = Call::for_event(&ev, ConversationState::Bot).unwrap();
    let kv: Arc<dyn KvRead> = Arc::new(MemoryKv::default());
    let mut group = c.benchmark_group("plugin_call");

    let runtime = Runtime::new(RuntimeConfig::default()).unwrap();
    let plugin = runtime.load("echo", &bytes, Manifest::default()).unwrap();
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
    // Back to back: the janitor cannot refill as fast, so most calls also
    // instantiate inline.
    group.bench_function("digibot_invoke_fresh_instance_back_to_back", |b| {
        b.iter(|| {
            let out = runtime.invoke(&plugin, &call, kv.clone());
            assert_eq!(out.outcome.unwrap().len(), 1);
        })
    });
    // Warm pool off: instantiate on the calling thread.
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

    // Plain wasmtime 48, pooling allocator, fresh instance per call.
    let (engine, pre) = plain_pre(&bytes);
    let wit_event = wit_event(&ev);
    group.bench_function("plain_wasmtime_pooling_fresh_instance", |b| {
        b.iter(|| {
            let mut store = Store::new(&engine, Plain::new());
            let bot = pre.instantiate(&mut store).unwrap();
            let out = bot
                .call_on_message(&mut store, &wit_event)
                .unwrap()
                .unwrap();
            assert_eq!(out.len(), 1);
        })
    });

    let mut store = Store::new(&engine, Plain::new());
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

criterion_group!(benches, bench);
criterion_main!(benches);
