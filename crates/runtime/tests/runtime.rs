//! The plugin runtime against real components built from plugins/ (run
//! `cargo build-plugins` first): what a plugin answers, every limit a
//! hostile plugin can hit and the reason it comes back with, the sandbox,
//! refusal at load, and the compile cache.

use digibot_domain::event::{ConversationState, Event};
use digibot_domain::outbound::Refusal;
use digibot_protocol::Action;
use digibot_runtime::{
    Budget, Call, Failure, Invocation, KvRead, LoadError, Manifest, MemoryKv, OutboundHttp,
    OutboundRequest, OutboundResponse, Plugin, Runtime, RuntimeConfig, Sent,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn wasm(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo build-plugins` first", path.display()))
}

fn fixture_json(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/webhooks")
        .join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn fixture(name: &str) -> Event {
    Event::parse(&serde_json::to_vec(&fixture_json(name)).unwrap()).unwrap()
}

/// A customer text `text` in `conversation`.
fn customer_text(conversation: &str, id: &str, text: &str) -> Event {
    let mut v = fixture_json("message_text_customer");
    v["data"]["id"] = id.into();
    v["data"]["data"]["conversation_id"] = conversation.into();
    v["data"]["data"]["body"] = text.into();
    Event::parse(&serde_json::to_vec(&v).unwrap()).unwrap()
}

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).unwrap()
}

fn load(runtime: &Runtime, name: &str, source: &str, manifest: &str) -> Plugin {
    runtime
        .load(name, &wasm(source), Manifest::parse(manifest).unwrap())
        .unwrap_or_else(|e| panic!("loading {source}: {e}"))
}

fn invoke(runtime: &Runtime, plugin: &Plugin, event: &Event, kv: Arc<dyn KvRead>) -> Invocation {
    invoke_in(runtime, plugin, event, ConversationState::Bot, kv)
}

/// [`invoke`] in a conversation that is in `state`.
fn invoke_in(
    runtime: &Runtime,
    plugin: &Plugin,
    event: &Event,
    state: ConversationState,
    kv: Arc<dyn KvRead>,
) -> Invocation {
    let call = Call::for_event(event, state).expect("an event plugins handle");
    block_on(runtime.invoke(plugin, &call, kv))
}

/// Drives one async turn from a plain test (the tests of turns that wait
/// at once are `#[tokio::test]`s of their own).
fn block_on<F: std::future::Future>(turn: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(turn)
}

fn on_text(runtime: &Runtime, plugin: &Plugin, text: &str) -> Invocation {
    invoke(
        runtime,
        plugin,
        &customer_text("conv_rt", "msg_rt", text),
        Arc::new(MemoryKv::default()),
    )
}

/// The single text body of a successful invocation.
fn single_text(invocation: Invocation) -> String {
    match invocation.outcome {
        Ok(actions) => match actions.as_slice() {
            [Action::Text { body, .. }] => body.clone(),
            other => panic!("expected one text action, got {other:?}"),
        },
        Err(failure) => panic!("expected actions, got {failure}"),
    }
}

#[test]
fn echo_answers_a_customer_text() {
    let runtime = runtime();
    let echo = load(&runtime, "echo", "echo", "");
    assert_eq!(echo.wit_version, "0.3.0");
    let out = invoke(
        &runtime,
        &echo,
        &fixture("message_text_customer"),
        Arc::new(MemoryKv::default()),
    );
    assert_eq!(
        out.outcome.unwrap(),
        vec![Action::text("Bonjour, je voudrais suivre ma commande").unwrap()]
    );
}

/// Rule 4 of docs/wit-versioning.md: plugins built against 0.1.0 and
/// 0.2.0 (frozen in plugins/echo-v0_1 and echo-v0_2) load and answer
/// beside 0.3.0 plugins in one runtime, whatever the conversation's state
/// (0.1.0 is not told it, 0.2.0 is).
#[test]
fn plugins_of_every_wit_version_load_and_answer_side_by_side() {
    let runtime = runtime();
    let old = load(&runtime, "old", "echo_v0_1", "");
    let mid = load(&runtime, "mid", "echo_v0_2", "");
    let new = load(&runtime, "new", "echo", "");
    assert_eq!(
        (old.wit_version, mid.wit_version, new.wit_version),
        ("0.1.0", "0.2.0", "0.3.0")
    );
    assert!(
        old.imports.iter().any(|i| i == "digishare:bot/types@0.1.0")
            && mid.imports.iter().any(|i| i == "digishare:bot/types@0.2.0")
            && new.imports.iter().any(|i| i == "digishare:bot/types@0.3.0"),
        "{:?} {:?} {:?}",
        old.imports,
        mid.imports,
        new.imports
    );
    let text = "Bonjour, je voudrais suivre ma commande";
    for state in [
        ConversationState::Bot,
        ConversationState::Human,
        ConversationState::Closed,
    ] {
        let message = fixture("message_text_customer");
        let kv = || -> Arc<dyn KvRead> { Arc::new(MemoryKv::default()) };
        let out = invoke_in(&runtime, &old, &message, state, kv());
        assert_eq!(
            out.outcome.unwrap(),
            vec![Action::text(format!("v0.1: {text}")).unwrap()]
        );
        let out = invoke_in(&runtime, &mid, &message, state, kv());
        assert_eq!(
            out.outcome.unwrap(),
            vec![Action::text(format!("v0.2 ({state}): {text}")).unwrap()]
        );
        let out = invoke_in(&runtime, &new, &message, state, kv());
        assert_eq!(out.outcome.unwrap(), vec![Action::text(text).unwrap()]);
        for plugin in [&old, &mid, &new] {
            let out = invoke_in(&runtime, plugin, &fixture("new_conversation"), state, kv());
            assert_eq!(out.outcome.unwrap(), vec![], "{}", plugin.name);
        }
    }
}

/// A 0.3.0 plugin built against the plain `bot` world (before timers, no
/// `on-timer` export) still loads and answers; the SDK's plugins take
/// timers: a reminder schedules on a message and answers its timer.
#[test]
fn a_0_3_0_plugin_without_on_timer_loads_beside_one_with_timers() {
    use digibot_domain::timer::{TimerFired, TimerOp};
    let runtime = runtime();
    let plain = load(&runtime, "plain", "echo_v0_3", "");
    let reminder = load(
        &runtime,
        "reminder",
        "reminder",
        "[config]\nafter_ms = \"5000\"\n",
    );
    assert_eq!(
        (plain.wit_version, reminder.wit_version),
        ("0.3.0", "0.3.0")
    );
    assert!(!plain.takes_timers() && reminder.takes_timers());
    assert!(
        !plain
            .imports
            .iter()
            .any(|i| i.starts_with("digishare:bot/timers"))
    );
    assert_eq!(
        single_text(on_text(&runtime, &plain, "salut")),
        "v0.3: salut"
    );

    let out = on_text(&runtime, &reminder, "salut");
    match out.timer_ops.as_slice() {
        [
            TimerOp::Schedule {
                name,
                payload,
                cancel_on_customer_message: true,
                ..
            },
        ] => {
            assert_eq!((name.as_str(), payload.as_str()), ("follow-up", "salut"))
        }
        other => panic!("expected one follow-up schedule, got {other:?}"),
    }
    assert_eq!(single_text(out), "Noted: salut");

    let fired = TimerFired {
        id: "t1".into(),
        plugin: "reminder".into(),
        conversation_id: "conv_rt".into(),
        name: "follow-up".into(),
        payload: "salut".into(),
        scheduled_at: 1,
        due_at: 2,
        outside_window: true,
    }
    .into_event();
    let out = invoke(&runtime, &reminder, &fired, Arc::new(MemoryKv::default()));
    match out.outcome.unwrap().as_slice() {
        [Action::Note { body }] => assert!(body.contains("24-hour window"), "{body}"),
        other => panic!("expected a note outside the window, got {other:?}"),
    }
    // The plain plugin is never called for timers (the dispatcher checks
    // `takes_timers`); called anyway, it answers nothing.
    let out = invoke(&runtime, &plain, &fired, Arc::new(MemoryKv::default()));
    assert_eq!(out.outcome.unwrap(), vec![]);
}

/// A plugin of 0.2.0 or later is told the state the host passes, for both
/// events.
#[test]
fn a_0_2_0_plugin_is_told_the_conversation_state() {
    let runtime = runtime();
    let plugin = load(&runtime, "state-echo", "state_echo", "");
    assert_eq!(plugin.wit_version, "0.3.0");
    for (state, name) in [
        (ConversationState::Bot, "bot"),
        (ConversationState::Human, "human"),
        (ConversationState::Closed, "closed"),
    ] {
        let message = customer_text("conv_state", "msg_state", "where is my order?");
        let out = invoke_in(
            &runtime,
            &plugin,
            &message,
            state,
            Arc::new(MemoryKv::default()),
        );
        assert_eq!(
            single_text(out),
            format!("{name}: where is my order?"),
            "{state:?}"
        );
        let out = invoke_in(
            &runtime,
            &plugin,
            &fixture("new_conversation"),
            state,
            Arc::new(MemoryKv::default()),
        );
        assert_eq!(single_text(out), format!("state: {name}"), "{state:?}");
    }
}

#[test]
fn an_endless_loop_is_stopped_at_its_deadline() {
    let runtime = runtime();
    let looping = load(
        &runtime,
        "hostile-loop",
        "hostile_loop",
        "[limits]\ntimeout_ms = 30\n",
    );
    let spent = Failure::Timeout(Budget::Compute(Duration::from_millis(30)));
    let out = on_text(&runtime, &looping, "hi");
    assert_eq!(out.outcome.unwrap_err(), spent);
    // The instance is gone, not stuck: the next call is stopped again.
    let again = on_text(&runtime, &looping, "hi");
    assert_eq!(again.outcome.unwrap_err(), spent);
    assert_eq!(spent.to_string(), "timeout: compute budget of 30 ms spent");
    assert_eq!(spent.kind(), "timeout");
}

#[test]
fn a_memory_bomb_hits_the_memory_cap() {
    let runtime = runtime();
    // A long deadline so a slow machine reports memory, not timeout.
    let bomb = load(
        &runtime,
        "hostile-memory",
        "hostile_memory",
        "[limits]\nmemory_mb = 8\ntimeout_ms = 10000\n",
    );
    assert_eq!(bomb.limits.memory_bytes, 8 << 20);
    let out = on_text(&runtime, &bomb, "hi");
    assert_eq!(out.outcome.unwrap_err(), Failure::Memory);
}

#[test]
fn a_panic_is_a_trap_with_its_message_and_an_err_is_an_error() {
    let runtime = runtime();
    let trap = load(&runtime, "hostile-trap", "hostile_trap", "");
    match on_text(&runtime, &trap, "hi").outcome {
        Err(Failure::Trap(reason)) => assert!(
            reason.contains("boom: hostile-trap panicked"),
            "the panic message is missing from {reason:?}"
        ),
        other => panic!("expected a trap, got {other:?}"),
    }
    let out = invoke(
        &runtime,
        &trap,
        &fixture("new_conversation"),
        Arc::new(MemoryKv::default()),
    );
    assert_eq!(
        out.outcome.unwrap_err(),
        Failure::Error("refused to greet".into())
    );
}

#[test]
fn a_flood_of_actions_is_refused_whole() {
    let runtime = runtime();
    // A long deadline: lifting 10,000 actions in a debug build is slow.
    let flood = load(
        &runtime,
        "hostile-flood",
        "hostile_flood",
        "[limits]\ntimeout_ms = 10000\n",
    );
    let failure = on_text(&runtime, &flood, "hi").outcome.unwrap_err();
    assert_eq!(
        failure,
        Failure::TooManyActions {
            count: 10_000,
            max: 50
        }
    );
    assert_eq!(failure.to_string(), "too many actions (10000, limit 50)");

    let capped = load(
        &runtime,
        "hostile-flood",
        "hostile_flood",
        "[limits]\ntimeout_ms = 10000\nmax_actions = 7\n",
    );
    assert_eq!(
        on_text(&runtime, &capped, "hi").outcome.unwrap_err(),
        Failure::TooManyActions {
            count: 10_000,
            max: 7
        }
    );
}

#[test]
fn the_sandbox_grants_no_files_env_network_or_clock() {
    let runtime = runtime();
    // A port something listens on, so `net:err` means refused, not absent.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let escape = load(
        &runtime,
        "hostile-escape",
        "hostile_escape",
        &format!("[config]\nport = \"{port}\"\n"),
    );
    assert_eq!(
        single_text(on_text(&runtime, &escape, "hi")),
        "fs:err dir:err env:0 token:absent net:err clock:0"
    );

    // The clock grant is the one capability a manifest can give.
    let timed = load(
        &runtime,
        "hostile-escape",
        "hostile_escape",
        &format!("[config]\nport = \"{port}\"\n[grants]\nclock = true\n"),
    );
    let report = single_text(on_text(&runtime, &timed, "hi"));
    assert!(
        report.starts_with("fs:err dir:err env:0 token:absent net:err clock:")
            && !report.ends_with("clock:0"),
        "a granted clock reads the real time: {report}"
    );
}

// ---- Async turns: waits hold no thread, budgets, virtual time -------------

/// The sleeper without the clock grant: its sleeps return at once (time is
/// virtual), so sleeping forever is a busy loop its compute budget stops.
/// With the grant its sleeps are real, and the wall-clock deadline cuts the
/// wait. The reason says which.
#[test]
fn a_sleeper_is_cut_by_its_compute_budget_or_its_wall_deadline() {
    let runtime = runtime();
    let virtual_time = load(&runtime, "sleeper", "hostile_sleep", "");
    let started = std::time::Instant::now();
    let out = on_text(&runtime, &virtual_time, "zzz");
    assert_eq!(
        out.outcome.unwrap_err(),
        Failure::Timeout(Budget::Compute(Duration::from_millis(100)))
    );
    let real = load(
        &runtime,
        "sleeper",
        "hostile_sleep",
        "[grants]\nclock = true\n[limits]\nwall_ms = 300\n",
    );
    let out = on_text(&runtime, &real, "zzz");
    let failure = out.outcome.unwrap_err();
    assert_eq!(
        failure,
        Failure::Timeout(Budget::Wall(Duration::from_millis(300)))
    );
    assert_eq!(
        failure.to_string(),
        "timeout: wall-clock deadline of 300 ms passed"
    );
    assert!(
        out.elapsed >= Duration::from_millis(300) && out.elapsed < Duration::from_secs(5),
        "cut at its deadline: {:?}",
        out.elapsed
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Without the clock grant a plugin cannot tell how long anything took:
/// an `Instant` around a sleep, spinning on a timer, counting timers that
/// expire during a fixed loop all see virtual time, which only its own
/// sleeps move. The report is the same on every run, whatever the load,
/// and a ten-second nap answers at once.
#[test]
fn without_the_clock_grant_time_cannot_be_measured() {
    let runtime = runtime();
    let spy = load(
        &runtime,
        "spy",
        "hostile_sleep",
        "[limits]\ncompute_ms = 5000\nwall_ms = 5000\n",
    );
    // 50 ms slept; no spin before the 20 ms timer is ready; every one of
    // the 3,000 checks finds its 1 ms timer expired; `now` is the sum of
    // what was slept and subscribed: 50 + 20 + 1 + 3,000 ms.
    let expected = "slept_ns=50000000 spins_until_20ms=0 ms_ticks_in_loop=3000 now_ns=3071000000";
    for _ in 0..3 {
        assert_eq!(single_text(on_text(&runtime, &spy, "spy")), expected);
    }

    let napper = load(
        &runtime,
        "napper",
        "hostile_sleep",
        "[config]\nnap_ms = \"10000\"\n",
    );
    let out = on_text(&runtime, &napper, "after a nap");
    assert!(
        out.elapsed < Duration::from_millis(100),
        "{:?}",
        out.elapsed
    );
    assert_eq!(single_text(out), "after a nap");

    // With the grant the same spy sees real time pass.
    let granted = load(
        &runtime,
        "spy",
        "hostile_sleep",
        "[grants]\nclock = true\n[limits]\ncompute_ms = 5000\nwall_ms = 5000\n",
    );
    let report = single_text(on_text(&runtime, &granted, "spy"));
    let slept: u128 = report
        .strip_prefix("slept_ns=")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(slept >= 50_000_000, "{report}");
    assert_ne!(report, expected);
}

/// A KV read that waits on its store counts against the turn's wall clock,
/// not its compute budget.
#[test]
fn a_slow_kv_read_is_wall_time_not_compute() {
    struct SlowKv(Duration);
    #[async_trait::async_trait]
    impl KvRead for SlowKv {
        async fn get(
            &self,
            _: &str,
            _: &str,
            _: &digibot_runtime::KvScope,
            _: &str,
        ) -> Option<String> {
            tokio::time::sleep(self.0).await;
            Some("late".into())
        }
        async fn usage(
            &self,
            _: &str,
            _: &str,
            _: &digibot_runtime::KvScope,
        ) -> digibot_runtime::KvUsage {
            digibot_runtime::KvUsage::default()
        }
    }
    let runtime = runtime();
    let slow: Arc<dyn KvRead> = Arc::new(SlowKv(Duration::from_millis(300)));
    let reader = load(
        &runtime,
        "reader",
        "hostile_intruder",
        "[limits]\ncompute_ms = 100\nwall_ms = 2000\n",
    );
    let peek = customer_text("conv_slow", "m1", "peek");
    let out = invoke(&runtime, &reader, &peek, slow.clone());
    assert!(
        out.elapsed >= Duration::from_millis(300),
        "{:?}",
        out.elapsed
    );
    assert_eq!(single_text(out), "secret=late");

    let hurried = load(
        &runtime,
        "reader",
        "hostile_intruder",
        "[limits]\ncompute_ms = 100\nwall_ms = 150\n",
    );
    let out = invoke(&runtime, &hurried, &peek, slow);
    assert_eq!(
        out.outcome.unwrap_err(),
        Failure::Timeout(Budget::Wall(Duration::from_millis(150)))
    );
}

/// Two hundred turns sleeping 500 ms each at once, on one thread: they all
/// answer, together in about one nap, not two hundred.
#[tokio::test(flavor = "current_thread")]
async fn turns_that_wait_share_one_thread() {
    let runtime = Runtime::new(RuntimeConfig {
        pool_instances: 512,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let napper = load(
        &runtime,
        "napper",
        "hostile_sleep",
        "[config]\nnap_ms = \"500\"\n[grants]\nclock = true\n[limits]\nwall_ms = 20000\n",
    );
    let events: Vec<Event> = (0..200)
        .map(|i| customer_text(&format!("conv_{i}"), &format!("m{i}"), &format!("nap {i}")))
        .collect();
    let calls: Vec<Call<'_>> = events
        .iter()
        .map(|e| Call::for_event(e, ConversationState::Bot).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let turns = calls.iter().map(|call| {
        let kv: Arc<dyn KvRead> = Arc::new(MemoryKv::default());
        runtime.invoke(&napper, call, kv)
    });
    let outs = join_all(turns).await;
    let took = started.elapsed();
    for (i, out) in outs.into_iter().enumerate() {
        let elapsed = out.elapsed;
        assert_eq!(single_text(out), format!("nap {i}"));
        assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    }
    assert!(
        took < Duration::from_secs(20),
        "200 naps of 500 ms on one thread took {took:?}"
    );
}

/// Polls every future to completion on the current task (no spawn: the
/// test's runtime has one thread, and that is the point).
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (slot, fut) in done.iter_mut().zip(pending.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(out) => *slot = Some(out),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    done.into_iter()
        .map(|o| o.expect("every turn finished"))
        .collect()
}

#[test]
fn config_is_visible_to_its_own_plugin_only() {
    let runtime = runtime();
    // The greeter has both keys the intruder asks for; the intruder has
    // none of its own.
    let greeter = load(
        &runtime,
        "greeter",
        "greeter",
        "[config]\ngreeting = \"Salam\"\napi_token = \"greeter-secret\"\n",
    );
    let intruder = load(&runtime, "hostile-intruder", "hostile_intruder", "");
    assert_eq!(
        single_text(on_text(&runtime, &greeter, "hi")),
        "Salam hi",
        "a plugin reads its own config"
    );
    assert_eq!(
        single_text(on_text(&runtime, &intruder, "config")),
        "api_token=None other=None"
    );

    let own = load(
        &runtime,
        "hostile-intruder",
        "hostile_intruder",
        "[config]\napi_token = \"intruder-own\"\n",
    );
    assert_eq!(
        single_text(on_text(&runtime, &own, "config")),
        "api_token=Some(\"intruder-own\") other=None"
    );
}

#[test]
fn kv_is_scoped_to_plugin_and_conversation() {
    let runtime = runtime();
    let kv = Arc::new(MemoryKv::default());
    let intruder = load(&runtime, "intruder", "hostile_intruder", "");
    let twin = load(&runtime, "twin", "hostile_intruder", "");

    let stored = invoke(
        &runtime,
        &intruder,
        &customer_text("conv_a", "m1", "store s3cret"),
        kv.clone(),
    );
    kv.apply("intruder", "conv_a", &stored.kv_writes);
    assert_eq!(single_text(stored), "stored");

    let peek = |plugin: &Plugin, conversation: &str| {
        single_text(invoke(
            &runtime,
            plugin,
            &customer_text(conversation, "m2", "peek"),
            kv.clone(),
        ))
    };
    assert_eq!(peek(&intruder, "conv_a"), "secret=s3cret");
    assert_eq!(peek(&intruder, "conv_b"), "secret=none");
    assert_eq!(peek(&twin, "conv_a"), "secret=none");
}

#[test]
fn a_failed_call_keeps_no_kv_writes() {
    // The same `store` succeeds, then fails on a zero action cap: its KV
    // write must go with the answer.
    let runtime = runtime();
    let intruder = load(&runtime, "intruder", "hostile_intruder", "");
    let out = on_text(&runtime, &intruder, "store x");
    assert_eq!(out.kv_writes.len(), 1);
    let capped = load(
        &runtime,
        "intruder",
        "hostile_intruder",
        "[limits]\nmax_actions = 0\n",
    );
    let out = on_text(&runtime, &capped, "store x");
    assert_eq!(
        out.outcome.unwrap_err(),
        Failure::TooManyActions { count: 1, max: 0 }
    );
    assert!(out.kv_writes.is_empty(), "{:?}", out.kv_writes);
}

#[test]
fn foreign_imports_are_refused_and_listed() {
    let runtime = runtime();
    let err = runtime
        .load("spy", &wasm("forbidden_imports"), Manifest::default())
        .unwrap_err();
    let LoadError::RefusedImports(imports) = &err else {
        panic!("expected refused imports, got {err}");
    };
    assert_eq!(
        imports,
        &[
            "digibot-test:forbidden/exfiltrate@0.1.0".to_string(),
            "digibot-test:forbidden/spawn@0.1.0".to_string(),
        ]
    );
    assert_eq!(
        err.to_string(),
        "imports what digibot does not provide: digibot-test:forbidden/exfiltrate@0.1.0, digibot-test:forbidden/spawn@0.1.0"
    );
}

#[test]
fn what_is_not_a_component_is_refused() {
    let runtime = runtime();
    let echo = wasm("echo");
    let cases: [(&str, &[u8]); 4] = [
        ("empty", b""),
        ("core module", b"\0asm\x01\0\0\0"),
        ("text", b"hello, this is not wasm at all"),
        ("truncated header", &echo[..6]),
    ];
    for (what, bytes) in cases {
        let err = runtime
            .load("x", bytes, Manifest::default())
            .expect_err(what);
        assert!(
            matches!(err, LoadError::NotAComponent),
            "{what}: expected not a component, got {err}"
        );
        assert!(err.to_string().contains("not a WebAssembly component"));
    }
    // A component cut in half: right preamble, does not compile.
    let err = runtime
        .load("x", &echo[..echo.len() / 2], Manifest::default())
        .unwrap_err();
    assert!(matches!(err, LoadError::Compile(_)), "{err}");
    // A name that could escape the plugins folder.
    let err = runtime
        .load("../echo", &echo, Manifest::default())
        .unwrap_err();
    assert!(matches!(err, LoadError::BadName(_)), "{err}");
}

#[test]
fn compiled_components_are_cached_by_hash_and_engine() {
    let dir = tempfile::tempdir().unwrap();
    let config = || RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let first = Runtime::new(config()).unwrap();
    let echo = load(&first, "echo", "echo", "");
    assert!(!echo.cached, "nothing was cached yet");
    let entries: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(
        entries[0].starts_with(&format!("{}-", echo.hash)) && entries[0].ends_with(".cwasm"),
        "cache file named by hash and engine: {entries:?}"
    );

    // A new engine (a restart) loads it without compiling, and it works.
    let second = Runtime::new(config()).unwrap();
    let again = load(&second, "echo", "echo", "");
    assert!(again.cached);
    assert_eq!(again.hash, echo.hash);
    assert_eq!(single_text(on_text(&second, &again, "cached")), "cached");

    // A corrupt entry is dropped and the component compiled again.
    let path = dir.path().join(&entries[0]);
    std::fs::write(&path, b"garbage").unwrap();
    let third = Runtime::new(config()).unwrap();
    let rebuilt = load(&third, "echo", "echo", "");
    assert!(!rebuilt.cached);
    assert_eq!(single_text(on_text(&third, &rebuilt, "fresh")), "fresh");
    assert!(std::fs::metadata(&path).unwrap().len() > 100, "rewritten");
}

// ---- The registry: versions in and out of service -----------------------

mod registry {
    use super::*;
    use digibot_runtime::registry::{Registry, RegistryError};

    fn registry(root: &std::path::Path) -> Registry {
        let plugins = root.join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: Some(root.join("cache")),
            ..RuntimeConfig::default()
        })
        .unwrap();
        Registry::new(Arc::new(runtime), Some(plugins), &root.join("data"))
    }

    fn serving(registry: &Registry, name: &str) -> Option<String> {
        registry.snapshot().get(name).map(|e| e.plugin.hash.clone())
    }

    #[tokio::test]
    async fn install_refuse_rollback_remove() {
        let root = tempfile::tempdir().unwrap();
        let registry = registry(root.path());
        let dir = root.path().join("plugins");
        let v1 = registry.install("echo", &wasm("echo")).await.unwrap();
        let v2 = registry.install("echo", &wasm("echo_v2")).await.unwrap();
        assert_ne!(v1.hash, v2.hash);
        assert_eq!(
            std::fs::read(dir.join("echo.wasm")).unwrap(),
            wasm("echo_v2")
        );

        // Refused: v2 keeps serving, the folder keeps v2.
        let v2_bytes = wasm("echo_v2");
        let err = registry
            .install("echo", &v2_bytes[..v2_bytes.len() / 2])
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Load { .. }), "{err}");
        assert_eq!(serving(&registry, "echo"), Some(v2.hash.clone()));
        assert_eq!(std::fs::read(dir.join("echo.wasm")).unwrap(), v2_bytes);

        let back = registry.rollback("echo").await.unwrap();
        assert_eq!(back.hash, v1.hash);
        assert_eq!(std::fs::read(dir.join("echo.wasm")).unwrap(), wasm("echo"));
        assert!(matches!(
            registry.rollback("echo").await,
            Err(RegistryError::NoPrevious(_))
        ));

        registry.remove("echo").await.unwrap();
        assert_eq!(serving(&registry, "echo"), None);
        assert!(!dir.join("echo.wasm").exists());
        assert!(matches!(
            registry.remove("echo").await,
            Err(RegistryError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn the_folder_is_the_source_of_truth_for_reload() {
        let root = tempfile::tempdir().unwrap();
        let registry = registry(root.path());
        let dir = root.path().join("plugins");
        std::fs::write(dir.join("echo.wasm"), wasm("echo")).unwrap();
        assert!(registry.reload("echo").await.unwrap());
        assert!(!registry.reload("echo").await.unwrap(), "unchanged: no-op");

        // A changed manifest alone is a new entry with the same bytes.
        std::fs::write(dir.join("echo.toml"), "[limits]\ntimeout_ms = 20\n").unwrap();
        assert!(registry.reload("echo").await.unwrap());
        let entry = registry.snapshot().get("echo").cloned().unwrap();
        assert_eq!(entry.plugin.limits.compute.as_millis(), 20);
        assert_eq!(entry.plugin.limits.wall.as_millis(), 20);

        // An upload writes the folder, so a reload triggered by an older
        // change finds the uploaded bytes and does nothing.
        let v2 = registry.install("echo", &wasm("echo_v2")).await.unwrap();
        assert!(!registry.reload("echo").await.unwrap());
        assert_eq!(serving(&registry, "echo"), Some(v2.hash.clone()));

        std::fs::remove_file(dir.join("echo.wasm")).unwrap();
        assert!(registry.reload("echo").await.unwrap());
        assert_eq!(serving(&registry, "echo"), None);
    }

    #[tokio::test]
    async fn a_refused_file_is_reported_and_can_be_removed() {
        let root = tempfile::tempdir().unwrap();
        let registry = registry(root.path());
        let dir = root.path().join("plugins");
        std::fs::write(dir.join("spy.wasm"), wasm("forbidden_imports")).unwrap();
        std::fs::write(dir.join("echo.wasm"), wasm("echo")).unwrap();
        let errors = registry.load_dir().await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let message = errors[0].to_string();
        assert!(
            message.starts_with("plugin spy: imports what digibot does not provide:")
                && message.contains("digibot-test:forbidden/exfiltrate@0.1.0"),
            "{message}"
        );
        assert!(serving(&registry, "echo").is_some());
        registry.remove("spy").await.unwrap();
        assert!(!dir.join("spy.wasm").exists());
    }

    #[tokio::test]
    async fn names_never_reach_the_file_system() {
        let root = tempfile::tempdir().unwrap();
        let registry = registry(root.path());
        for name in ["../escape", "a/b", ".hidden", ""] {
            assert!(
                registry.install(name, &wasm("echo")).await.is_err(),
                "{name:?}"
            );
            assert!(registry.remove(name).await.is_err(), "{name:?}");
            assert!(registry.rollback(name).await.is_err(), "{name:?}");
        }
        assert!(!root.path().join("escape.wasm").exists());
        assert!(registry.snapshot().plugins.is_empty());
    }
}

/// How [`Scripted`] answers a request.
type Script = Box<dyn Fn(&OutboundRequest) -> Result<OutboundResponse, Refusal> + Send + Sync>;

/// An [`OutboundHttp`] that records what it is handed and answers from a
/// script: what the runtime gives the pipeline, and what a plugin gets back.
struct Scripted {
    seen: std::sync::Mutex<Vec<OutboundRequest>>,
    answer: Script,
}

#[async_trait::async_trait]
impl OutboundHttp for Scripted {
    async fn send(&self, request: OutboundRequest) -> Sent {
        let result = (self.answer)(&request);
        self.seen.lock().unwrap().push(request);
        Sent {
            result,
            replayed: false,
        }
    }
}

fn scripted(
    answer: impl Fn(&OutboundRequest) -> Result<OutboundResponse, Refusal> + Send + Sync + 'static,
) -> Arc<Scripted> {
    Arc::new(Scripted {
        seen: Default::default(),
        answer: Box::new(answer),
    })
}

/// A plugin's wasi:http requests reach the host's `OutboundHttp` with the
/// event, the plugin, their numbers and the headers as written (the
/// placeholder not substituted: that is the pipeline's job, at send time);
/// a refusal reaches the plugin as an error with its kind and reason
/// (`outbound.last-refusal`), never a trap, and the invocation lists every
/// call.
#[test]
fn http_requests_go_through_the_hosts_outbound_and_refusals_reach_the_plugin() {
    let runtime = runtime();
    let plugin = load(
        &runtime,
        "hostile",
        "hostile_fetch",
        "[grants]\nhttp = [\"https://api.shop.example\"]\n",
    );
    assert_eq!(plugin.wit_version, "0.3.0");
    assert!(
        plugin
            .imports
            .iter()
            .any(|i| i.starts_with("wasi:http/outgoing-handler@0.2"))
    );
    let out = scripted(|r| {
        if r.authority == "api.shop.example" {
            Ok(OutboundResponse {
                status: 201,
                headers: vec![("content-type".into(), b"text/plain".to_vec())],
                body: bytes::Bytes::from_static(b"made"),
            })
        } else {
            Err(Refusal::NotGranted { url: r.url() })
        }
    });
    let event = customer_text(
        "conv_http",
        "msg_http",
        "https://api.shop.example/orders/1?x=2 https://evil.example/steal",
    );
    let call = Call::for_event(&event, ConversationState::Bot).unwrap();
    let invocation = block_on(runtime.invoke_with_http(
        &plugin,
        &call,
        Arc::new(MemoryKv::default()),
        out.clone(),
    ));
    let calls = invocation.calls.clone();
    assert_eq!(
        single_text(invocation),
        "status 201\nrefused: not-granted: https://evil.example/steal is outside this plugin's http grant"
    );
    let seen = out.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        (&*seen[0].plugin, &*seen[0].event_id, seen[0].call),
        ("hostile", event.key.as_str(), 0)
    );
    assert_eq!(seen[1].call, 1);
    assert_eq!(
        (
            seen[0].method.as_str(),
            seen[0].scheme.as_str(),
            seen[0].path_and_query.as_str()
        ),
        ("GET", "https", "/orders/1?x=2")
    );
    assert!(
        seen[0]
            .headers
            .iter()
            .any(|(n, v)| n == "authorization" && v == b"Bearer {{secret:ORDERS_TOKEN}}"),
        "{:?}",
        seen[0].headers
    );
    assert_eq!(
        seen[0].policy.grants[0].to_string(),
        "https://api.shop.example"
    );
    assert_eq!(seen[0].body.as_deref().ok(), Some(&b""[..]));
    assert_eq!(calls.len(), 2);
    assert_eq!((calls[0].status, calls[0].bytes), (Some(201), 4));
    assert_eq!(
        calls[1].refused.as_ref().map(|r| r.kind),
        Some("not-granted")
    );
}

/// Without an outbound configured (tools, tests), requests are refused as
/// `offline`, and the plugin still answers.
#[test]
fn without_outbound_http_requests_are_refused_offline() {
    let runtime = runtime();
    let plugin = load(&runtime, "hostile", "hostile_fetch", "");
    let answer = single_text(on_text(&runtime, &plugin, "https://api.shop.example/x"));
    assert!(
        answer.starts_with("refused: offline: outbound HTTP is off"),
        "{answer}"
    );
}

/// A fresh instance never sees what an earlier one left in memory, in the
/// pages kept resident between instances (reset by the pooling allocator,
/// only those a turn touched) or past them (returned to the kernel): each
/// turn leaves a new marker over 4 MiB of heap and a static, and the next
/// turn, in the same reused slot, scans its whole memory for it. The same
/// scan finds a marker its own instance wrote (the control).
#[test]
fn a_fresh_instance_sees_nothing_an_earlier_one_left_in_memory() {
    for warm_instances in [0, 4] {
        let runtime = Runtime::new(RuntimeConfig {
            warm_instances,
            ..RuntimeConfig::default()
        })
        .unwrap();
        // The scan reads a few MiB byte by byte: room beyond the default budget.
        let plugin = load(
            &runtime,
            "intruder",
            "hostile_intruder",
            "[limits]\ncompute_ms = 5000\nwall_ms = 10000\n",
        );
        let kv = || -> Arc<dyn KvRead> { Arc::new(MemoryKv::default()) };
        let say = |text: &str| {
            single_text(invoke(
                &runtime,
                &plugin,
                &customer_text("conv_mem", "msg_mem", text),
                kv(),
            ))
        };
        assert_ne!(
            say("both CONTROL-mk"),
            "found 0",
            "the scan finds its own marker"
        );
        for round in 0..6 {
            let marker = format!("LEFT-{warm_instances}-{round}-zq");
            assert_eq!(say(&format!("leave {marker}")), "left");
            let reversed: String = marker.chars().rev().collect();
            assert_eq!(
                say(&format!("look {reversed}")),
                "found 0",
                "round {round}, warm pool {warm_instances}: a fresh instance found the last one's memory"
            );
        }
    }
}
