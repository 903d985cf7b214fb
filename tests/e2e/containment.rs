//! Untrusted plugins: each hostile plugin from plugins/ served beside the
//! well-behaved `greeter`. The server stays up, the reason is recorded with
//! the event, and the greeter answers every event. Also the circuit
//! breaker, per-plugin limits and config, and refusal at load.
//!
//! The hostile plugins are installed as `bad-*` so they sort (and run)
//! before `greeter`: each event first goes through the hostile one.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::support::*;

const GREETER_TOML: &str = "[config]\ngreeting = \"Salam\"\napi_token = \"greeter-secret\"\n";

/// A plugin to serve: `source` (built by `cargo build-plugins`) installed
/// as `name`, with an optional `name.toml`.
struct Plug {
    name: &'static str,
    source: &'static str,
    toml: Option<String>,
}

fn plug(name: &'static str, source: &'static str, toml: Option<&str>) -> Plug {
    Plug {
        name,
        source,
        toml: toml.map(str::to_string),
    }
}

fn greeter() -> Plug {
    plug("greeter", "greeter", Some(GREETER_TOML))
}

/// Starts digibot with `plugins` in its folder under their own names (the
/// builder names a plugin after its file, so: start empty, stop, fill the
/// folder, start again with the same data).
async fn start_with(builder: DigibotBuilder, plugins: &[Plug]) -> Result<Digibot> {
    let mut bot = builder.start().await?;
    bot.kill9()?;
    for p in plugins {
        let target = bot.plugins_dir.join(format!("{}.wasm", p.name));
        std::fs::copy(plugin_wasm(p.source), &target)
            .with_context(|| format!("copying {} to {}", p.source, target.display()))?;
        if let Some(toml) = &p.toml {
            std::fs::write(bot.plugins_dir.join(format!("{}.toml", p.name)), toml)?;
        }
    }
    bot.restart().await?;
    Ok(bot)
}

/// An admin client (PUT/DELETE/POST are not in the support driver).
pub(crate) struct Admin {
    client: reqwest::Client,
    base: String,
}

impl Admin {
    pub(crate) fn new(bot: &Digibot) -> Result<Admin> {
        Ok(Admin {
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()?,
            base: bot.url().to_string(),
        })
    }

    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Value)> {
        let resp = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .body(body)
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, json))
    }

    pub(crate) async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(u16, Value)> {
        self.send(
            reqwest::Method::PUT,
            &format!("/admin/plugins/{name}"),
            bytes,
        )
        .await
    }

    /// GET /admin/plugins: the `plugins` array.
    pub(crate) async fn plugins(&self) -> Result<Vec<Value>> {
        let (status, body) = self
            .send(reqwest::Method::GET, "/admin/plugins", Vec::new())
            .await?;
        ensure!(status == 200, "GET /admin/plugins: {status} {body}");
        Ok(body["plugins"].as_array().cloned().unwrap_or_default())
    }

    pub(crate) async fn plugin(&self, name: &str) -> Result<Value> {
        self.plugins()
            .await?
            .into_iter()
            .find(|p| p["name"] == name)
            .with_context(|| format!("{name} is not in /admin/plugins"))
    }
}

/// The outcome entry of `plugin` in a recorded event.
fn outcome<'a>(event: &'a Value, plugin: &str) -> Result<&'a Value> {
    event["plugins"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["plugin"] == plugin))
        .with_context(|| format!("no outcome for {plugin} in {event}"))
}

/// Server still answering, process still running.
async fn ensure_up(bot: &mut Digibot) -> Result<()> {
    ensure!(bot.is_running(), "digibot exited; log:\n{}", bot.logs());
    bot.get("/healthz").await?.expect_status(200)?;
    Ok(())
}

/// Posts one customer text per entry of `texts` (in `conversation`),
/// waits until all are handled and returns their recorded events.
async fn post_texts(
    bot: &Digibot,
    conversation: &str,
    prefix: &str,
    texts: &[&str],
) -> Result<Vec<Value>> {
    let mut keys = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        keys.push(
            bot.accept(&customer_text(conversation, &format!("{prefix}_{i}"), t))
                .await?,
        );
    }
    bot.wait_handled(&keys, TIMEOUT).await
}

/// The common containment check: `hostile` (installed as `name`) beside
/// the greeter; three messages in two conversations; every event records
/// `reason` for the hostile plugin and one action for the greeter, whose
/// replies reach Digishare exactly.
async fn contained(
    name: &'static str,
    source: &'static str,
    toml: Option<&str>,
    reason: impl Fn(&str) -> bool,
) -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let mut bot = start_with(
        Digibot::builder()
            .fake(&fake)
            // Not the breaker's test: every event runs the plugin.
            .env("DIGIBOT_BREAKER_FAILURES", "1000"),
        &[plug(name, source, toml), greeter()],
    )
    .await?;
    let (a, b) = (format!("conv_{name}_a"), format!("conv_{name}_b"));
    let mut events = post_texts(&bot, &a, name, &["one", "two"]).await?;
    events.extend(post_texts(&bot, &b, &format!("{name}_b"), &["three"]).await?);

    for event in &events {
        let bad = outcome(event, name)?;
        ensure!(
            bad["outcome"] == "failed",
            "{name} should fail every event: {event}"
        );
        let why = bad["reason"].as_str().unwrap_or_default();
        ensure!(reason(why), "{name}: unexpected reason {why:?} in {event}");
        let good = outcome(event, "greeter")?;
        ensure!(
            good["outcome"] == "ok" && good["actions"] == 1,
            "the greeter must answer despite {name}: {event}"
        );
        let order: Vec<&str> = event["plugins"]
            .as_array()
            .map(|ps| ps.iter().filter_map(|p| p["plugin"].as_str()).collect())
            .unwrap_or_default();
        ensure!(
            order == [name, "greeter"],
            "plugins in name order: {order:?}"
        );
    }
    fake.settle(3, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(&a),
        &[wire_text(&a, "Salam one"), wire_text(&a, "Salam two")],
        &format!("requests for {a}"),
    )?;
    ensure_all_eq(
        &fake.wire_for(&b),
        &[wire_text(&b, "Salam three")],
        &format!("requests for {b}"),
    )?;
    ensure_up(&mut bot).await?;
    let report = Admin::new(&bot)?.plugin(name).await?;
    ensure!(
        report["failures"] == 3 && report["last_failure"].as_str().is_some_and(&reason),
        "/admin/plugins counts the failures: {report}"
    );
    Ok(())
}

#[tokio::test]
async fn an_endless_loop_times_out_and_the_neighbour_answers() -> Result<()> {
    // Default limits: compute and wall budgets are both 100 ms, so which
    // one stops it depends on how much CPU the machine gives the turn.
    contained("bad-loop", "hostile_loop", None, |r| {
        r == "timeout: compute budget of 100 ms spent"
            || r == "timeout: wall-clock deadline of 100 ms passed"
    })
    .await
}

#[tokio::test]
async fn a_memory_bomb_hits_the_cap_and_the_neighbour_answers() -> Result<()> {
    // Default memory cap (64 MiB); a long deadline so a slow machine
    // reports `memory`, not `timeout`.
    let toml = "[limits]\ntimeout_ms = 10000\n";
    contained("bad-memory", "hostile_memory", Some(toml), |r| {
        r == "memory"
    })
    .await
}

#[tokio::test]
async fn a_panic_is_recorded_with_its_message_and_the_neighbour_answers() -> Result<()> {
    contained("bad-trap", "hostile_trap", None, |r| {
        r.starts_with("trap: ") && r.contains("boom: hostile-trap panicked")
    })
    .await
}

#[tokio::test]
async fn ten_thousand_actions_are_refused_and_the_neighbour_answers() -> Result<()> {
    // A long deadline: lifting 10,000 actions in a debug build is slow.
    let toml = "[limits]\ntimeout_ms = 10000\n";
    contained("bad-flood", "hostile_flood", Some(toml), |r| {
        r == "too many actions (10000, limit 50)"
    })
    .await
}

/// The escape plugin tries files, directories, the environment (the API
/// token is set), a socket to a port that listens (the fake's), and the
/// clock: it gets none of them.
#[tokio::test]
async fn files_env_token_network_and_clock_are_out_of_reach() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let port = fake.addr().port();
    let toml = format!("[config]\nport = \"{port}\"\n");
    let mut bot = start_with(
        Digibot::builder().fake(&fake).api_token(API_TOKEN),
        &[plug("bad-escape", "hostile_escape", Some(&toml)), greeter()],
    )
    .await?;
    let c = "conv_escape";
    let events = post_texts(&bot, c, "escape", &["let me out"]).await?;
    ensure!(
        outcome(&events[0], "bad-escape")?["outcome"] == "ok",
        "{}",
        events[0]
    );
    fake.settle(2, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(c),
        &[
            wire_text(c, "fs:err dir:err env:0 token:absent net:err clock:0"),
            wire_text(c, "Salam let me out"),
        ],
        "the escape report, then the greeter",
    )?;
    ensure_api_headers(&fake.requests(), API_TOKEN)?;
    ensure_up(&mut bot).await
}

/// The intruder tries another conversation's KV, the host's token and
/// another plugin's config, and actions aimed at another conversation.
#[tokio::test]
async fn a_plugin_stays_in_its_conversation_and_its_own_config() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let mut bot = start_with(
        Digibot::builder().fake(&fake).api_token(API_TOKEN),
        &[plug("bad-intruder", "hostile_intruder", None), greeter()],
    )
    .await?;
    let (a, b) = ("conv_intruder_a", "conv_intruder_b");

    // Stored (and committed) in A before anyone peeks.
    post_texts(&bot, a, "intr_a0", &["store s3cret"]).await?;
    post_texts(&bot, b, "intr_b", &["peek"]).await?;
    let events = post_texts(&bot, a, "intr_a1", &["peek", "config", "hijack"]).await?;

    let hijack = events
        .iter()
        .find(|e| e["key"].as_str().is_some_and(|k| k.contains("intr_a1_2")))
        .context("the hijack event")?;
    let intruder = outcome(hijack, "bad-intruder")?;
    ensure!(
        intruder["outcome"] == "ok" && intruder["actions"] == 1,
        "only the valid action is queued: {hijack}"
    );
    let rejected = intruder["rejected"].as_array().cloned().unwrap_or_default();
    ensure!(
        rejected.len() == 2,
        "both forged actions are recorded as rejected: {hijack}"
    );

    fake.settle(10, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(a),
        &[
            wire_text(a, "stored"),
            wire_text(a, "Salam store s3cret"),
            wire_text(a, "secret=s3cret"),
            wire_text(a, "Salam peek"),
            wire_text(a, "api_token=None other=None"),
            wire_text(a, "Salam config"),
            wire_text(a, "hijack attempted"),
            wire_text(a, "Salam hijack"),
        ],
        "conversation A",
    )?;
    ensure_all_eq(
        &fake.wire_for(b),
        &[wire_text(b, "secret=none"), wire_text(b, "Salam peek")],
        "conversation B sees nothing of A",
    )?;
    // Nothing else was called: no participant route, no other conversation.
    for r in fake.requests() {
        ensure!(
            r.method == "POST"
                && r.path == "/v1/messages"
                && [a, b].contains(&r.conversation_id().unwrap_or_default().as_str()),
            "unexpected request {}",
            r.summary()
        );
    }
    ensure_up(&mut bot).await
}

/// Per-plugin `[limits]` in NAME.toml apply to that plugin only, and show
/// on /admin/plugins.
#[tokio::test]
async fn per_plugin_limits_override_the_defaults() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = start_with(
        Digibot::builder()
            .fake(&fake)
            .env("DIGIBOT_BREAKER_FAILURES", "1000"),
        &[
            plug(
                "bad-flood",
                "hostile_flood",
                Some("[limits]\nmax_actions = 10\ntimeout_ms = 10000\n"),
            ),
            plug(
                "bad-loop",
                "hostile_loop",
                Some("[limits]\ntimeout_ms = 20\n"),
            ),
            plug(
                "bad-memory",
                "hostile_memory",
                Some("[limits]\nmemory_mb = 8\ntimeout_ms = 10000\n"),
            ),
            greeter(),
        ],
    )
    .await?;
    let c = "conv_limits";
    let events = post_texts(&bot, c, "limits", &["a", "b"]).await?;
    for event in &events {
        for (plugin, reason) in [
            ("bad-flood", "too many actions (10000, limit 10)"),
            ("bad-loop", "timeout: compute budget of 20 ms spent"),
            ("bad-memory", "memory"),
        ] {
            let o = outcome(event, plugin)?;
            ensure!(
                o["outcome"] == "failed" && o["reason"] == reason,
                "{plugin}: expected {reason:?}: {event}"
            );
        }
        ensure!(outcome(event, "greeter")?["actions"] == 1, "{event}");
    }
    fake.settle(2, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(c),
        &[wire_text(c, "Salam a"), wire_text(c, "Salam b")],
        "the greeter's replies",
    )?;

    let admin = Admin::new(&bot)?;
    let limits = |p: &Value| p["limits"].clone();
    let flood = limits(&admin.plugin("bad-flood").await?);
    let looping = limits(&admin.plugin("bad-loop").await?);
    let memory = limits(&admin.plugin("bad-memory").await?);
    let greeter = limits(&admin.plugin("greeter").await?);
    ensure!(
        flood["max_actions"] == 10 && greeter["max_actions"] == 50,
        "{flood} / {greeter}"
    );
    ensure!(
        looping["compute"] == json!({"secs": 0, "nanos": 20_000_000})
            && looping["wall"] == json!({"secs": 0, "nanos": 20_000_000})
            && greeter["compute"] == json!({"secs": 0, "nanos": 100_000_000})
            && greeter["wall"] == json!({"secs": 0, "nanos": 100_000_000}),
        "{looping} / {greeter}"
    );
    ensure!(
        memory["memory_bytes"] == 8 << 20 && greeter["memory_bytes"] == 64 << 20,
        "{memory} / {greeter}"
    );
    Ok(())
}

/// After three consecutive failures the plugin is quarantined: events skip
/// it (recorded as `skipped`), /admin/plugins says so; after the cool-down
/// it runs again. The greeter answers throughout.
#[tokio::test]
async fn the_breaker_quarantines_then_retries() -> Result<()> {
    // Long enough that the skipped events and the admin check land inside
    // it on a loaded machine; it is also how long this test waits.
    const COOLDOWN: Duration = Duration::from_secs(3);
    let fake = FakeDigishare::start().await?;
    let bot = start_with(
        Digibot::builder()
            .fake(&fake)
            .env("DIGIBOT_BREAKER_FAILURES", "3")
            .env(
                "DIGIBOT_BREAKER_COOLDOWN_SECS",
                &COOLDOWN.as_secs().to_string(),
            ),
        &[plug("bad-trap", "hostile_trap", None), greeter()],
    )
    .await?;
    let admin = Admin::new(&bot)?;
    let c = "conv_breaker";

    // Five events queued at once in one conversation: they run back to
    // back, so the fourth and fifth meet the open breaker.
    let events = post_texts(&bot, c, "brk", &["1", "2", "3", "4", "5"]).await?;
    let report = admin.plugin("bad-trap").await?;
    let mut by_key: Vec<&Value> = events.iter().collect();
    by_key.sort_by_key(|e| e["seq"].as_i64());
    let states: Vec<&str> = by_key
        .iter()
        .map(|e| outcome(e, "bad-trap").map(|o| o["outcome"].as_str().unwrap_or("?")))
        .collect::<Result<_>>()?;
    ensure!(
        states == ["failed", "failed", "failed", "skipped", "skipped"],
        "outcomes in order: {states:?}"
    );
    for e in &by_key[3..] {
        let o = outcome(e, "bad-trap")?;
        ensure!(
            o["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("quarantined for ")),
            "{o}"
        );
    }
    ensure!(
        report["state"] == "quarantined"
            && report["consecutive_failures"] == 3
            && report["failures"] == 3
            && report["invocations"] == 3
            && report["skipped"] == 2
            && report["quarantined_until"].is_i64(),
        "/admin/plugins during quarantine: {report}"
    );

    // Cool-down over: the plugin is tried again (and, failing, re-opens).
    wait_state(&admin, "bad-trap", "half-open", COOLDOWN + TIMEOUT).await?;
    let retried = post_texts(&bot, c, "brk_after", &["6"]).await?;
    let o = outcome(&retried[0], "bad-trap")?;
    ensure!(
        o["outcome"] == "failed"
            && o["reason"]
                .as_str()
                .is_some_and(|r| r.contains("boom: hostile-trap panicked")),
        "tried again after the cool-down: {o}"
    );
    let report = admin.plugin("bad-trap").await?;
    ensure!(
        report["invocations"] == 4 && report["state"] == "quarantined",
        "one failure after the cool-down re-opens the breaker: {report}"
    );

    fake.settle(6, TIMEOUT).await?;
    let expected: Vec<Value> = (1..=6)
        .map(|i| wire_text(c, &format!("Salam {i}")))
        .collect();
    ensure_all_eq(&fake.wire_for(c), &expected, "the greeter's replies")?;
    Ok(())
}

/// Polls /admin/plugins until `plugin` is in breaker state `state`.
async fn wait_state(admin: &Admin, plugin: &str, state: &str, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let report = admin.plugin(plugin).await?;
        if report["state"] == state {
            return Ok(report);
        }
        if Instant::now() > deadline {
            bail!("{plugin} not {state} after {timeout:?}: {report}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Half-open means one trial: after the cool-down, of several events
/// arriving together (in different conversations, so they run in
/// parallel) exactly one runs the endless loop; the others skip it instead
/// of each burning a plugin thread for a whole deadline.
#[tokio::test]
async fn half_open_runs_a_single_trial() -> Result<()> {
    const COOLDOWN: Duration = Duration::from_secs(2);
    let fake = FakeDigishare::start().await?;
    let bot = start_with(
        Digibot::builder()
            .fake(&fake)
            .env("DIGIBOT_BREAKER_FAILURES", "1")
            .env(
                "DIGIBOT_BREAKER_COOLDOWN_SECS",
                &COOLDOWN.as_secs().to_string(),
            ),
        &[plug("bad-loop", "hostile_loop", None), greeter()],
    )
    .await?;
    let admin = Admin::new(&bot)?;
    let first = post_texts(&bot, "conv_trial_0", "trial_first", &["first"]).await?;
    // Compute and wall budgets are both 100 ms: on a loaded machine the
    // wall clock can stop the loop first. Either way it is a timeout.
    ensure!(
        outcome(&first[0], "bad-loop")?["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("timeout: ")),
        "{}",
        first[0]
    );
    wait_state(&admin, "bad-loop", "half-open", COOLDOWN + TIMEOUT).await?;

    let bodies: Vec<Value> = (1..=4)
        .map(|i| {
            customer_text(
                &format!("conv_trial_{i}"),
                &format!("trial_{i}"),
                "together",
            )
        })
        .collect();
    let post = |i: usize| bot.accept(&bodies[i - 1]);
    let (a, b, c, d) = tokio::join!(post(1), post(2), post(3), post(4));
    let keys = vec![a?, b?, c?, d?];
    let events = bot.wait_handled(&keys, TIMEOUT).await?;
    let outcomes: Vec<String> = events
        .iter()
        .map(|e| outcome(e, "bad-loop").map(|o| o["outcome"].as_str().unwrap_or("?").to_string()))
        .collect::<Result<_>>()?;
    let ran = outcomes.iter().filter(|o| *o == "failed").count();
    let skipped = outcomes.iter().filter(|o| *o == "skipped").count();
    ensure!(
        ran == 1 && skipped == 3,
        "one trial, three skipped: {outcomes:?}"
    );
    let report = admin.plugin("bad-loop").await?;
    ensure!(
        report["invocations"] == 2 && report["state"] == "quarantined",
        "{report}"
    );
    fake.settle(5, TIMEOUT).await?;
    Ok(())
}

/// The two imports the forbidden-imports test plugin adds to the world.
const FORBIDDEN: [&str; 2] = [
    "digibot-test:forbidden/exfiltrate@0.1.0",
    "digibot-test:forbidden/spawn@0.1.0",
];

#[tokio::test]
async fn an_upload_with_foreign_imports_is_refused_with_the_list() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("greeter")
        .start()
        .await?;
    let admin = Admin::new(&bot)?;
    let bytes = std::fs::read(plugin_wasm("forbidden_imports"))?;
    let (status, body) = admin.put("spy", bytes).await?;
    ensure!(status == 422, "expected 422, got {status}: {body}");
    let error = body["error"].as_str().unwrap_or_default();
    for import in FORBIDDEN {
        ensure!(error.contains(import), "{import} missing from {error:?}");
    }
    ensure!(
        body["refused_imports"] == json!(FORBIDDEN),
        "refused_imports: {body}"
    );
    let names: Vec<Value> = admin
        .plugins()
        .await?
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    ensure!(names == [json!("greeter")], "{names:?}");
    ensure!(
        !bot.plugins_dir.join("spy.wasm").exists(),
        "a refused upload is not written to the plugins folder"
    );

    post_texts(&bot, "conv_refused", "ref", &["still here"]).await?;
    fake.settle(1, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for("conv_refused"),
        &[wire_text("conv_refused", "Hello still here")],
        "the greeter serves",
    )?;
    Ok(())
}

#[tokio::test]
async fn what_is_not_a_component_is_refused() -> Result<()> {
    let bot = Digibot::builder().plugin("echo").start().await?;
    let admin = Admin::new(&bot)?;
    let cases: [(&str, Vec<u8>); 3] = [
        ("garbage", b"MZ\x90\0 definitely not wasm".to_vec()),
        ("core module", b"\0asm\x01\0\0\0".to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in cases {
        let (status, body) = admin.put("echo", bytes).await?;
        ensure!(status == 422, "{what}: expected 422, got {status}: {body}");
        ensure!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("not a WebAssembly component")),
            "{what}: {body}"
        );
    }
    // A path in the name never reaches the file system.
    let (status, body) = admin.put("..%2Fescape", b"\0asm".to_vec()).await?;
    ensure!(status == 422, "bad name: {status} {body}");
    let names: Vec<Value> = admin
        .plugins()
        .await?
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    ensure!(names == [json!("echo")], "{names:?}");
    Ok(())
}

/// At start-up, a component with foreign imports is logged with the list
/// and skipped; the other plugins serve.
#[tokio::test]
async fn startup_refuses_foreign_imports_and_serves_the_rest() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = start_with(
        Digibot::builder().fake(&fake),
        &[plug("spy", "forbidden_imports", None), greeter()],
    )
    .await?;
    let line = bot
        .wait_for_log(TIMEOUT, "the refused plugin", |l| {
            l.contains("spy") && FORBIDDEN.iter().all(|i| l.contains(i))
        })
        .await?;
    ensure!(line.contains("ERROR"), "logged as an error: {line}");
    let names: BTreeSet<String> = Admin::new(&bot)?
        .plugins()
        .await?
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    ensure!(
        names == BTreeSet::from(["greeter".to_string()]),
        "{names:?}"
    );
    post_texts(&bot, "conv_startup", "st", &["bonjour"]).await?;
    fake.settle(1, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for("conv_startup"),
        &[wire_text("conv_startup", "Salam bonjour")],
        "the greeter serves",
    )?;
    Ok(())
}

/// Issue 15's sleeping plugin: `std::thread::sleep` in every
/// `on_message` (a WASI sleep, a host call the epoch deadline never
/// interrupted), installed twice: `bad-sleep` without the clock grant
/// (its sleeps return at once in virtual time, so it spins: its compute
/// budget stops it, or its wall-clock deadline when twelve spinners share
/// the two workers and none gets 100 ms of CPU in time) and
/// `bad-sleep-real` with it (its sleeps are real, it computes nothing, and
/// the wall-clock deadline cuts them). Twelve of their events at once in
/// twelve conversations, then five normal messages in five others: echo
/// answers every one, each sleeper fails with its `timeout` reason until
/// the breaker (five failures) quarantines it, and the later events skip
/// it.
#[tokio::test]
async fn a_sleeping_plugin_is_cut_and_the_neighbour_answers_everyone() -> Result<()> {
    const COMPUTE: &str = "timeout: compute budget of 100 ms spent";
    const WALL: &str = "timeout: wall-clock deadline of 100 ms passed";
    let fake = FakeDigishare::start().await?;
    let mut bot = start_with(
        Digibot::builder().fake(&fake),
        &[
            plug("bad-sleep", "hostile_sleep", None),
            plug(
                "bad-sleep-real",
                "hostile_sleep",
                Some("[grants]\nclock = true\n"),
            ),
            plug("echo", "echo", None),
        ],
    )
    .await?;
    let sleepy: Vec<String> = (0..12).map(|i| format!("conv_sleep_{i:02}")).collect();
    // Posted back to back: their turns overlap.
    let mut first = Vec::new();
    for c in &sleepy {
        first.push(
            bot.accept(&customer_text(
                c,
                &format!("{c}_m"),
                &format!("hello from {c}"),
            ))
            .await?,
        );
    }
    let first = bot.wait_handled(&first, TIMEOUT).await?;

    let normal: Vec<String> = (0..5).map(|i| format!("conv_normal_{i}")).collect();
    let mut later = Vec::new();
    for c in &normal {
        later.push(
            bot.accept(&customer_text(
                c,
                &format!("{c}_m"),
                &format!("hi from {c}"),
            ))
            .await?,
        );
    }
    let later = bot.wait_handled(&later, TIMEOUT).await?;

    // The reasons each may give: a spinner either, a waiter the wall's.
    for (name, reasons) in [
        ("bad-sleep", &[COMPUTE, WALL][..]),
        ("bad-sleep-real", &[WALL][..]),
    ] {
        let reason = |r: &Value| reasons.iter().any(|ok| r == ok);
        let mut failed = 0;
        for event in &first {
            let o = outcome(event, name)?;
            match o["outcome"].as_str() {
                Some("failed") => {
                    ensure!(reason(&o["reason"]), "{name}: {event}");
                    failed += 1;
                }
                Some("skipped") => ensure!(
                    o["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("quarantined")),
                    "{name}: {event}"
                ),
                _ => bail!("{name} neither failed nor was skipped: {event}"),
            }
        }
        ensure!(failed >= 5, "{name}: {failed} failures before the breaker");
        for event in &later {
            let o = outcome(event, name)?;
            ensure!(
                o["outcome"] == "skipped"
                    && o["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("quarantined for ")),
                "{name} quarantined for the later events: {event}"
            );
        }
        let report = Admin::new(&bot)?.plugin(name).await?;
        ensure!(
            report["state"] == "quarantined"
                && report["failures"] == failed
                && reason(&report["last_failure"]),
            "/admin/plugins: {report}"
        );
    }
    for event in first.iter().chain(&later) {
        let echo = outcome(event, "echo")?;
        ensure!(
            echo["outcome"] == "ok" && echo["actions"] == 1,
            "echo answers despite the sleepers: {event}"
        );
    }
    fake.settle(17, TIMEOUT).await?;
    for c in &sleepy {
        ensure_all_eq(
            &fake.wire_for(c),
            &[wire_text(c, &format!("hello from {c}"))],
            c,
        )?;
    }
    for c in &normal {
        ensure_all_eq(
            &fake.wire_for(c),
            &[wire_text(c, &format!("hi from {c}"))],
            c,
        )?;
    }
    ensure_up(&mut bot).await
}
