//! Per-component caps on core instances, linear memories and tables: a
//! component over them is refused at load with the numbers, on both
//! allocators; one at the caps loads and answers; and the instance pool is
//! sized so that a greedy component's instances, as many at once as the
//! pool holds, leave every other plugin what it needs. The components are
//! hand-written (plugins/hostile-memories), as an attacker would write them.

use digibot_domain::event::{ConversationState, Event};
use digibot_runtime::{
    Call, Failure, LoadError, Manifest, MemoryKv, Plugin, Runtime, RuntimeConfig,
};
use hostile_memories::{Shape, component_wat};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn bytes(shape: Shape) -> Vec<u8> {
    wat::parse_str(component_wat(shape)).expect("the hostile component assembles")
}

fn message(conversation: &str) -> Event {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/webhooks/message_text_customer.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["data"]["data"]["conversation_id"] = conversation.into();
    Event::parse(&serde_json::to_vec(&v).unwrap()).unwrap()
}

fn echo_wasm() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm32-wasip2/release/echo.wasm");
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo build-plugins` first", path.display()))
}

fn invoke(runtime: &Runtime, plugin: &Plugin, conversation: &str) -> Result<usize, Failure> {
    let event = message(conversation);
    let call = Call::for_event(&event, ConversationState::Bot).unwrap();
    // A turn is async; each caller (the test, or a spinner's thread)
    // drives its own on a runtime of its own.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(runtime.invoke(plugin, &call, Arc::new(MemoryKv::default())))
        .outcome
        .map(|actions| actions.len())
}

const AT_THE_CAPS: Shape = Shape {
    memories: 2,
    tables: 4,
    core_instances: 32,
    spin: false,
};

fn config(pooling: bool) -> RuntimeConfig {
    RuntimeConfig {
        pooling,
        pool_instances: 8,
        warm_instances: 0,
        ..RuntimeConfig::default()
    }
}

#[test]
fn the_default_caps_are_the_documented_ones() {
    let limits = RuntimeConfig::default().defaults;
    assert_eq!(
        (limits.core_instances, limits.memories, limits.tables),
        (
            AT_THE_CAPS.core_instances,
            AT_THE_CAPS.memories,
            AT_THE_CAPS.tables
        )
    );
}

#[test]
fn a_bot_at_the_caps_loads_and_answers_on_both_allocators() {
    for pooling in [true, false] {
        let runtime = Runtime::new(config(pooling)).unwrap();
        assert_eq!(runtime.pooling(), pooling);
        let plugin = runtime
            .load("at-caps", &bytes(AT_THE_CAPS), Manifest::default())
            .unwrap_or_else(|e| panic!("pooling {pooling}: {e}"));
        assert_eq!(plugin.wit_version, "0.2.0");
        assert_eq!(invoke(&runtime, &plugin, "conv_caps"), Ok(0));
    }
}

#[test]
fn a_component_over_a_cap_is_refused_at_load_with_the_numbers() {
    let over = [
        (
            Shape {
                memories: 3,
                core_instances: 3,
                ..Shape::MINIMAL
            },
            "has 3 linear memories; a plugin may have at most 2",
        ),
        (
            Shape {
                memories: 30,
                core_instances: 30,
                ..Shape::MINIMAL
            },
            "has 30 linear memories; a plugin may have at most 2",
        ),
        (
            Shape {
                tables: 5,
                core_instances: 6,
                ..Shape::MINIMAL
            },
            "has 5 tables; a plugin may have at most 4",
        ),
        (
            Shape {
                core_instances: 33,
                ..Shape::MINIMAL
            },
            "has 33 core instances; a plugin may have at most 32",
        ),
    ];
    let pooled = Runtime::new(config(true)).unwrap();
    assert!(pooled.pooling());
    for (shape, message) in over {
        let err = pooled
            .load("greedy", &bytes(shape), Manifest::default())
            .expect_err(message);
        assert!(matches!(err, LoadError::TooLarge { .. }), "{err}");
        assert_eq!(err.to_string(), message);
    }
    // Past several caps, the pool names the core instances first.
    let err = pooled
        .load("greedy", &bytes(Shape::memories(200)), Manifest::default())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "has 200 core instances; a plugin may have at most 32"
    );
    // The on-demand allocator refuses memories and tables at load too; it
    // counts core instances when instantiating.
    let on_demand = Runtime::new(config(false)).unwrap();
    for (shape, message) in &over[..3] {
        let err = on_demand
            .load("greedy", &bytes(*shape), Manifest::default())
            .expect_err(message);
        assert_eq!(err.to_string(), *message);
    }
    let many = on_demand
        .load("greedy", &bytes(over[3].0), Manifest::default())
        .unwrap();
    match invoke(&on_demand, &many, "conv_caps") {
        Err(Failure::Trap(reason)) => assert!(
            reason.starts_with("instantiation failed") && reason.contains("instance"),
            "{reason}"
        ),
        other => panic!("expected the instantiation to fail, got {other:?}"),
    }
}

/// Seven instances of a component at every cap, looping until their
/// deadline, hold seven of the pool's eight component instance slots (and
/// 224 core instances, 14 memories, 28 tables): echo still gets the
/// eighth, with its core instances, memory and tables. With the pool sized
/// as before (eight core instances per slot, no cap per component) the
/// greedy instances took every core instance, and echo failed to
/// instantiate ("maximum concurrent limit of 64 for core instances").
#[test]
fn greedy_instances_at_the_caps_leave_a_neighbour_its_slot() {
    let runtime = Arc::new(Runtime::new(config(true)).unwrap());
    assert!(runtime.pooling());
    let greedy = Arc::new(
        runtime
            .load(
                "greedy",
                &bytes(Shape {
                    spin: true,
                    ..AT_THE_CAPS
                }),
                Manifest::parse("[limits]\ntimeout_ms = 4000\n").unwrap(),
            )
            .unwrap(),
    );
    let echo = runtime
        .load("echo", &echo_wasm(), Manifest::default())
        .unwrap();
    let spinners: Vec<_> = (0..7)
        .map(|i| {
            let (runtime, greedy) = (runtime.clone(), greedy.clone());
            std::thread::spawn(move || invoke(&runtime, &greedy, &format!("conv_greedy_{i}")))
        })
        .collect();
    // They instantiate within this (and spin for four seconds).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(invoke(&runtime, &echo, "conv_neighbour"), Ok(1));
    for spinner in spinners {
        let outcome = spinner.join().unwrap();
        assert!(matches!(outcome, Err(Failure::Timeout(_))), "{outcome:?}");
    }
}
