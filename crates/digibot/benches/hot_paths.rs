//! Criterion benches of the hot paths an event takes, each beside its
//! baseline in the same run:
//!
//! - `webhook_parse`: body bytes to a typed `Event`, for several fixture
//!   kinds, beside parsing the same bytes into a `serde_json::Value` (all
//!   the bare axum ceiling of the load benchmark does).
//! - `plugin_call`: one call of the echo component (it makes no host
//!   call), event in, actions out, on a fresh instance: digibot's async
//!   turn (`Runtime::invoke` driven by a current-thread tokio runtime) with
//!   the pooling allocator and with on-demand allocation, with its warm
//!   pool and without; plain wasmtime with sync calls (`call`) and with
//!   async calls (`call_async`), fresh instance, pooling and on-demand;
//!   plain wasmtime's call alone on a fresh pre-made instance, sync and
//!   async (what digibot's warm-pool turn did before turns were async, and
//!   does now, minus digibot's own work); a reused instance (no
//!   isolation: the floor).
//! - `action_to_request`: an action a plugin returned to the Messages API
//!   request digibot queues (validation and building; plus the JSON text
//!   the outbox stores, for a text).
//!
//! `examples/invoke_latency.rs` gives plugin-call percentiles; the load
//! benchmark (`scripts/bench-load`) gives the whole server's figures.
//!
//! Needs `cargo build-plugins` first. Run: `cargo bench -p digibot --bench
//! hot_paths [-- FILTER]` (about two minutes).

mod common;

use common::{Plain, async_wit_event, echo_bytes, event, plain_async_pre, plain_pre, wit_event};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use digibot_domain::actions::to_request;
use digibot_domain::event::{ConversationState, Event};
use digibot_protocol::Action;
use digibot_runtime::{Call, KvRead, Manifest, MemoryKv, Runtime, RuntimeConfig};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::Store;

/// Fixture kinds from tests/fixtures/webhooks, most common first.
const FIXTURES: &[&str] = &[
    "message_text_customer",
    "message_agent",
    "message_button_reply",
    "message_list_reply",
    "message_location",
    "message_image",
    "message_contacts",
    "new_conversation",
    "conversation_archived",
];

fn fixture_bytes(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/webhooks")
        .join(format!("{name}.json"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn webhook_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("webhook_parse");
    for name in FIXTURES {
        let bytes = fixture_bytes(name);
        Event::parse(&bytes).unwrap_or_else(|e| panic!("{name} does not parse: {e}"));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(format!("event_{name}"), |b| {
            b.iter(|| Event::parse(black_box(&bytes)).unwrap())
        });
    }
    let bytes = fixture_bytes("message_text_customer");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("serde_json_value_message_text_customer", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(&bytes)).unwrap())
    });
    group.finish();
}

fn plugin_call(c: &mut Criterion) {
    let bytes = echo_bytes();
    let ev = event();
    let call = Call::for_event(&ev, ConversationState::Bot).unwrap();
    let kv: Arc<dyn KvRead> = Arc::new(MemoryKv::default());
    let mut group = c.benchmark_group("plugin_call");
    // Turns are async: a current-thread runtime drives each to completion,
    // as `replay`, `chat` and the authors' harness do (the server's lanes
    // await them on its multi-thread runtime).
    let executor = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    for (allocator, pooling) in [("pooling", true), ("on_demand", false)] {
        let runtime = Runtime::new(RuntimeConfig {
            pooling,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let plugin = runtime.load("echo", &bytes, Manifest::default()).unwrap();
        // digibot's own path: events arriving at any rate the janitor keeps
        // up with find a warm, never-used instance; only the call is timed.
        group.bench_function(format!("digibot_{allocator}_warm_pool_paced"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    while runtime.warm_instances() == 0 {
                        std::thread::yield_now();
                    }
                    let started = Instant::now();
                    let out = executor.block_on(runtime.invoke(&plugin, &call, kv.clone()));
                    total += started.elapsed();
                    assert_eq!(out.outcome.unwrap().len(), 1);
                }
                total
            })
        });
        if pooling {
            // Back to back: the janitor cannot refill as fast, so most
            // calls also instantiate inline.
            group.bench_function("digibot_pooling_warm_pool_back_to_back", |b| {
                b.iter(|| {
                    let out = executor.block_on(runtime.invoke(&plugin, &call, kv.clone()));
                    assert_eq!(out.outcome.unwrap().len(), 1);
                })
            });
        }
        drop(plugin);
        drop(runtime);

        // Warm pool off: instantiate on the calling thread.
        let cold = Runtime::new(RuntimeConfig {
            pooling,
            warm_instances: 0,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let cold_plugin = cold.load("echo", &bytes, Manifest::default()).unwrap();
        group.bench_function(format!("digibot_{allocator}_no_warm_pool"), |b| {
            b.iter(|| {
                let out = executor.block_on(cold.invoke(&cold_plugin, &call, kv.clone()));
                assert_eq!(out.outcome.unwrap().len(), 1);
            })
        });

        // Plain wasmtime 48 with the same allocator, fresh instance per
        // call: sync, then async (what async alone costs).
        let (engine, pre) = plain_pre(&bytes, pooling);
        let wit_event = wit_event(&ev);
        group.bench_function(format!("plain_wasmtime_{allocator}_fresh_instance"), |b| {
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
        let (async_engine, async_pre) = plain_async_pre(&bytes, pooling);
        let async_event = async_wit_event(&ev);
        group.bench_function(
            format!("plain_wasmtime_{allocator}_fresh_instance_async"),
            |b| {
                b.iter(|| {
                    executor.block_on(async {
                        let mut store = Store::new(&async_engine, Plain::new());
                        let bot = async_pre.instantiate_async(&mut store).await.unwrap();
                        let out = bot
                            .call_on_message(&mut store, &async_event)
                            .await
                            .unwrap()
                            .unwrap();
                        assert_eq!(out.len(), 1);
                    })
                })
            },
        );
        if pooling {
            // The call alone on a fresh, never-called instance (made
            // untimed beforehand, as digibot's warm pool does; dropped
            // untimed, as its janitor does): what a no-host-call turn
            // costs sync and async, beside digibot's warm-pool row.
            group.bench_function("plain_wasmtime_pooling_fresh_call_only_sync", |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut store = Store::new(&engine, Plain::new());
                        let bot = pre.instantiate(&mut store).unwrap();
                        let started = Instant::now();
                        let out = bot
                            .call_on_message(&mut store, &wit_event)
                            .unwrap()
                            .unwrap();
                        total += started.elapsed();
                        assert_eq!(out.len(), 1);
                    }
                    total
                })
            });
            group.bench_function("plain_wasmtime_pooling_fresh_call_only_async", |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut store = Store::new(&async_engine, Plain::new());
                        let bot = executor
                            .block_on(async_pre.instantiate_async(&mut store))
                            .unwrap();
                        let started = Instant::now();
                        let out = executor
                            .block_on(bot.call_on_message(&mut store, &async_event))
                            .unwrap()
                            .unwrap();
                        total += started.elapsed();
                        assert_eq!(out.len(), 1);
                    }
                    total
                })
            });
        }
        drop(async_pre);
        drop(async_engine);

        if pooling {
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
        }
    }
    group.finish();
}

fn action_to_request(c: &mut Criterion) {
    let actions: Vec<(&str, Action)> = vec![
        (
            "text",
            Action::text("Bonjour, je voudrais suivre ma commande").unwrap(),
        ),
        (
            "text_reply_to",
            Action::text_reply_to("Votre commande est en route.", "msg_t_0001").unwrap(),
        ),
        (
            "buttons_3",
            Action::buttons("Que souhaitez-vous faire ?")
                .header("Commande 4711")
                .button("track", "Suivre")
                .button("change", "Modifier")
                .button("agent", "Parler à quelqu'un")
                .build()
                .unwrap(),
        ),
        (
            "list_2x3",
            Action::list("Choisissez un créneau", "Créneaux")
                .section("Matin")
                .row("m9", "9h")
                .row("m10", "10h")
                .row("m11", "11h")
                .section("Après-midi")
                .row("a14", "14h")
                .row("a15", "15h")
                .row("a16", "16h")
                .build()
                .unwrap(),
        ),
        ("location", Action::location(33.5731, -7.5898).unwrap()),
        ("note", Action::note("Client VIP : répondre vite").unwrap()),
        ("hand_off", Action::hand_off("usr_17", true).unwrap()),
    ];
    let mut group = c.benchmark_group("action_to_request");
    for (name, action) in &actions {
        group.bench_function(*name, |b| {
            b.iter(|| {
                to_request("echo", 0, black_box("conv_7Hq2Lm9Xa1"), black_box(action)).unwrap()
            })
        });
    }
    // What the outbox stores for the commonest action: the request's body
    // as JSON text.
    let text = &actions[0].1;
    group.bench_function("text_with_outbox_json", |b| {
        b.iter(|| {
            let request =
                to_request("echo", 0, black_box("conv_7Hq2Lm9Xa1"), black_box(text)).unwrap();
            request.body.to_string()
        })
    });
    group.finish();
}

fn quick() -> Criterion {
    // Enough samples for stable means on a quiet machine, short enough
    // that the whole set runs in about two minutes.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = quick();
    targets = webhook_parse, plugin_call, action_to_request
}
criterion_main!(benches);
