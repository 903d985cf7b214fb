//! Per-call latency of one plugin call (event in, actions out), as p50/p99
//! over many calls, for digibot's `Runtime::invoke` (an async turn) and for
//! plain wasmtime in the same run, with sync and async calls. Criterion (benches/hot_paths.rs) gives means; this gives
//! the percentiles BENCHMARKS.md quotes.
//!
//! `cargo build-plugins && cargo run --release -p digibot --example invoke_latency [CALLS]`

#[path = "../benches/common/mod.rs"]
mod common;

use common::{Plain, async_wit_event, echo_bytes, event, plain_async_pre, plain_pre, wit_event};
use digibot_domain::event::ConversationState;
use digibot_runtime::{Call, KvRead, Manifest, MemoryKv, Runtime, RuntimeConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::Store;

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
    let bytes = echo_bytes();
    let event = event();
    let call = Call::for_event(&event, ConversationState::Bot).unwrap();
    let kv: Arc<dyn KvRead> = Arc::new(MemoryKv::default());
    // Events arrive spaced out, as webhooks do (200 µs: 5,000 events/s for
    // this one plugin); only the call is timed.
    let pace = Duration::from_micros(200);
    // Turns are async: one current-thread runtime drives them, one at a time.
    let executor = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

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
            let out = executor.block_on(runtime.invoke(&plugin, &call, kv.clone()));
            let took = started.elapsed();
            assert_eq!(out.outcome.unwrap().len(), 1);
            if i >= 1000 {
                samples.push(took);
            }
        }
        percentiles(label, samples);
    }

    let (engine, pre) = plain_pre(&bytes, true);
    let wit_event = wit_event(&event);
    let new_store = || Store::new(&engine, Plain::new());
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

    let (async_engine, async_pre) = plain_async_pre(&bytes, true);
    let async_event = async_wit_event(&event);
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls + 1000 {
        let started = Instant::now();
        executor.block_on(async {
            let mut store = Store::new(&async_engine, Plain::new());
            let bot = async_pre.instantiate_async(&mut store).await.unwrap();
            let out = bot
                .call_on_message(&mut store, &async_event)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(out.len(), 1);
        });
        let took = started.elapsed();
        if i >= 1000 {
            samples.push(took);
        }
    }
    percentiles("plain wasmtime, pooling, fresh, async", samples);

    // The call alone on a fresh instance made (and dropped) untimed, as a
    // warm pool does: a no-host-call turn, sync then async.
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls + 1000 {
        let mut store = new_store();
        let bot = pre.instantiate(&mut store).unwrap();
        let started = Instant::now();
        let out = bot
            .call_on_message(&mut store, &wit_event)
            .unwrap()
            .unwrap();
        let took = started.elapsed();
        assert_eq!(out.len(), 1);
        if i >= 1000 {
            samples.push(took);
        }
    }
    percentiles("plain wasmtime, fresh, call only, sync", samples);
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls + 1000 {
        let mut store = Store::new(&async_engine, Plain::new());
        let bot = executor
            .block_on(async_pre.instantiate_async(&mut store))
            .unwrap();
        let started = Instant::now();
        let out = executor
            .block_on(bot.call_on_message(&mut store, &async_event))
            .unwrap()
            .unwrap();
        let took = started.elapsed();
        assert_eq!(out.len(), 1);
        if i >= 1000 {
            samples.push(took);
        }
    }
    percentiles("plain wasmtime, fresh, call only, async", samples);

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
