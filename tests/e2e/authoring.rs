//! The plugin author's tools, as a new author uses them: `digibot new`,
//! `build`, `check`, `replay` on the shared fixtures, and `chat` in a real
//! terminal (tmux). Every command is the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::Digest;

use crate::support::fixtures::fixtures_dir;
use crate::support::*;

/// The plugin deadline the tools get here: these tests are about what a
/// plugin answers, and the server's 100 ms can pass on a loaded CI machine.
const PLUGIN_TIMEOUT_MS: &str = "10000";

/// The real `digibot` with none of the caller's DIGIBOT_* settings.
fn digibot() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_digibot"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DIGIBOT_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUST_LOG", "warn")
        .env("DIGIBOT_PLUGIN_TIMEOUT_MS", PLUGIN_TIMEOUT_MS)
        .stdin(Stdio::null());
    cmd
}

struct Ran {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn ok(self, what: &str) -> Result<Ran> {
        ensure!(
            self.success,
            "{what} failed\n--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not JSON: {}", self.stdout))
    }
}

fn run(cmd: &mut Command) -> Result<Ran> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(Ran {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Every fixture file, sorted by name.
fn fixture_files() -> Vec<(String, PathBuf)> {
    all_fixtures()
        .into_iter()
        .map(|(name, _)| {
            let path = fixtures_dir().join(format!("{name}.json"));
            (name, path)
        })
        .collect()
}

/// `digibot replay FILES --plugin WASM [EXTRA]`.
fn replay(files: &[PathBuf], wasm: &Path, extra: &[&str]) -> Result<Ran> {
    run(digibot()
        .arg("replay")
        .args(files)
        .arg("--plugin")
        .arg(wasm)
        .args(extra))
}

/// A text action and the request it becomes.
fn text(conversation: &str, body: &str) -> (Value, Value) {
    (
        json!({"kind": "text", "body": body}),
        json!({"method": "POST", "path": "/v1/messages", "body": {
            "conversation_id": conversation, "type": "text", "send_to_third": true, "body": body}}),
    )
}

/// What one plugin did in the replay output, when it succeeded.
fn ok(plugin: &str, replies: Vec<(Value, Value)>) -> Value {
    let (actions, requests): (Vec<Value>, Vec<Value>) = replies.into_iter().unzip();
    json!({"plugin": plugin, "outcome": "ok", "actions": actions, "requests": requests})
}

/// The replay entry of a file: `plugins` is `None` when the event must not
/// reach plugins (agent messages, other events).
fn entry(
    file: &Path,
    conversation: Option<&str>,
    envelope: &Value,
    plugins: Option<Value>,
) -> Value {
    json!({
        "file": file.display().to_string(),
        "event": event_key(envelope),
        "type": envelope["event"],
        "conversation_id": conversation,
        "dispatched": plugins.is_some(),
        "plugins": plugins.map(|p| vec![p]).unwrap_or_default(),
    })
}

/// Replay entries for every fixture for an echo-like plugin: `texts` maps a
/// fixture to the texts it answers; other dispatched fixtures get none.
fn expected_echo_like(plugin: &str, texts: &dyn Fn(&str) -> Vec<&'static str>) -> Result<Value> {
    let mut entries = Vec::new();
    // Files run in name order: once message_agent has run, an agent is in
    // charge of conv_7Hq2Lm9Xa1 and the plugin is skipped there (reason
    // `human`), as in the server.
    let mut human = false;
    for (name, path) in fixture_files() {
        let envelope = fixture(&name);
        let (conversation, dispatched) = match name.as_str() {
            "message_agent" => (Some("conv_7Hq2Lm9Xa1"), false),
            "conversation_archived" => (Some("conv_7Hq2Lm9Xa1"), false),
            "other_event_ticket_created" => (None, false),
            "new_conversation_minimal" | "message_text_minimal" => (Some("conv_min_01"), true),
            _ => (Some("conv_7Hq2Lm9Xa1"), true),
        };
        let conv = conversation.unwrap_or_default();
        let plugins = dispatched.then(|| {
            if human && conv == "conv_7Hq2Lm9Xa1" {
                json!({"plugin": plugin, "outcome": "skipped", "reason": "human",
                       "actions": [], "requests": []})
            } else {
                ok(
                    plugin,
                    texts(&name).into_iter().map(|t| text(conv, t)).collect(),
                )
            }
        });
        entries.push(entry(&path, conversation, &envelope, plugins));
        human |= name == "message_agent";
    }
    Ok(Value::Array(entries))
}

/// What a new author does: scaffold, edit nothing, build, check, replay
/// the shared fixtures. The scaffold greets and echoes.
#[test]
fn new_build_check_replay_a_scaffolded_bot() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    run(digibot().args(["new", "mybot", "--dir"]).arg(dir))?.ok("digibot new")?;
    let root = dir.join("mybot");
    for file in ["Cargo.toml", "src/lib.rs", "tests/bot.rs", "README.md"] {
        ensure!(root.join(file).is_file(), "digibot new made no {file}");
    }

    // Never overwrites, and refuses names that cannot be a plugin.
    std::fs::write(root.join("src/lib.rs.mine"), "keep")?;
    let again = run(digibot().args(["new", "mybot", "--dir"]).arg(dir))?;
    ensure!(!again.success, "digibot new overwrote an existing crate");
    ensure!(again.stderr.contains("already exists"), "{}", again.stderr);
    ensure!(root.join("src/lib.rs.mine").is_file());
    let bad = run(digibot().args(["new", "My Bot", "--dir"]).arg(dir))?;
    ensure!(
        !bad.success && bad.stderr.contains("invalid plugin name"),
        "{}",
        bad.stderr
    );
    ensure!(!dir.join("My Bot").exists());

    // One build, in the new crate's own target dir (the cargo running this
    // test holds the lock on ours).
    let built = run(digibot()
        .arg("build")
        .arg(&root)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR"))?
    .ok("digibot build")?;
    let wasm = PathBuf::from(built.stdout.trim());
    ensure!(
        wasm == root.join("target/wasm32-wasip2/release/mybot.wasm") && wasm.is_file(),
        "digibot build printed {:?}",
        built.stdout
    );

    let check = run(digibot().arg("check").arg(&wasm))?.ok("digibot check")?;
    ensure!(
        check
            .stdout
            .contains("world:         digishare:bot/bot@0.3.0")
            && check.stdout.contains("OK: this component loads in digibot"),
        "{}",
        check.stdout
    );

    let files: Vec<PathBuf> = fixture_files().into_iter().map(|(_, p)| p).collect();
    let out = replay(&files, &wasm, &[])?.ok("digibot replay")?;
    let expected = expected_echo_like("mybot", &|name| match name {
        "new_conversation" => vec!["Hello Salma Idrissi! Write anything and I will say it back."],
        "new_conversation_minimal" => vec!["Hello Youssef! Write anything and I will say it back."],
        "message_text_customer" => vec!["Bonjour, je voudrais suivre ma commande"],
        "message_text_minimal" => vec!["/info"],
        _ => vec![],
    })?;
    ensure_json_eq(&out.json()?, &expected, "replay of the scaffold")?;

    // Its conversation test passes as scaffolded, found from the folder.
    let tested = run(digibot().arg("test").current_dir(&root))?.ok("digibot test")?;
    ensure!(
        tested.stdout.ends_with("1 test file: 1 passed, 0 failed\n"),
        "{}",
        tested.stdout
    );
    Ok(())
}

/// `digibot test` with the compile cache under target/ (a Python or
/// TypeScript component takes seconds to compile).
fn digibot_test() -> Command {
    let mut cmd = digibot();
    cmd.arg("test").env(
        "XDG_CACHE_HOME",
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("digibot-test-cache"),
    );
    cmd
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The plugin `name` of each language (Rust, Python, TypeScript), as built
/// by `cargo build-plugins`, scripts/build-python-plugins and
/// scripts/build-typescript-plugins.
fn every_language(name: &str) -> Result<Vec<PathBuf>> {
    let root = repo_root();
    [
        (
            format!("target/wasm32-wasip2/release/{name}.wasm"),
            "cargo build-plugins",
        ),
        (
            format!("target/guests/{name}_py.wasm"),
            "scripts/build-python-plugins",
        ),
        (
            format!("target/guests/{name}_ts.wasm"),
            "scripts/build-typescript-plugins",
        ),
    ]
    .into_iter()
    .map(|(path, built_by)| {
        let path = root.join(path);
        ensure!(
            path.is_file(),
            "{} is missing: build it with `{built_by}`",
            path.display()
        );
        Ok(path)
    })
    .collect()
}

fn echoes() -> Result<Vec<PathBuf>> {
    every_language("echo")
}

/// One conversation test file, tests/conversations/echo.toml (text, emoji,
/// button, list row, location, whole webhooks, an agent taking over),
/// passes against the Rust, Python and TypeScript echo alike, and so does
/// the same file in YAML (echo.yaml).
#[test]
fn one_conversation_test_passes_against_every_languages_echo() -> Result<()> {
    for file in ["echo.toml", "echo.yaml"] {
        let file = repo_root().join("tests/conversations").join(file);
        for wasm in echoes()? {
            let out = run(digibot_test().arg(&wasm).arg(&file))?.ok("digibot test")?;
            ensure!(
                out.stdout
                    == format!(
                        "{} (echo repeats text and nothing else) ... ok (8 turns)\n\
                         1 test file: 1 passed, 0 failed\n",
                        file.display()
                    ),
                "{}: {}",
                wasm.display(),
                out.stdout
            );
        }
    }
    Ok(())
}

/// Timers and history through `digibot test`, in every language: the
/// reminder's follow-up is scheduled (payload, delay, cancelled by the
/// customer's next message), fired by a `timer` turn with its payload as
/// scheduled (inside and outside WhatsApp's window), held while an agent
/// is in charge; the historian reads back the conversation the test made.
/// One file each passes against the Rust, Python and TypeScript plugin.
#[test]
fn timers_and_history_pass_the_same_conversation_test_in_every_language() -> Result<()> {
    for (plugin, file, title, turns) in [
        (
            "reminder",
            "reminder.toml",
            "reminder follows up after silence",
            9,
        ),
        (
            "historian",
            "historian.toml",
            "historian reads the conversation back",
            3,
        ),
    ] {
        let file = repo_root().join("tests/conversations").join(file);
        for wasm in every_language(plugin)? {
            let out = run(digibot_test().arg(&wasm).arg(&file))?.ok("digibot test")?;
            ensure!(
                out.stdout
                    == format!(
                        "{} ({title}) ... ok ({turns} turns)\n1 test file: 1 passed, 0 failed\n",
                        file.display()
                    ),
                "{}: {}",
                wasm.display(),
                out.stdout
            );
        }
    }
    Ok(())
}

/// A timer turn fires only a timer the plugin has pending, and a wrong
/// timer expectation prints its diff (the delay as the plugin gave it).
#[test]
fn a_timer_turn_needs_a_pending_timer() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("timers.toml");
    std::fs::write(
        &file,
        r#"
[config]
after_ms = "60000"

[[turn]]
message = "x"
scheduled = [{ name = "follow-up", payload = "y", after_ms = 60000, cancel_on_customer_message = true }]

[[turn]]
timer = "reminder"
"#,
    )?;
    let out = run(digibot_test().arg(plugin_wasm("reminder")).arg(&file))?;
    ensure!(!out.success, "a failing test exited 0: {}", out.stdout);
    let expected = format!(
        "{} ... FAILED
  turn 1 (message \"x\"): scheduled timers differ (exact match; - expected, + actual)
    [
      {{
        \"after_ms\": 60000,
        \"cancel_on_customer_message\": true,
        \"name\": \"follow-up\",
  -     \"payload\": \"y\"
  +     \"payload\": \"x\"
      }}
    ]
  turn 2: timer \"reminder\": no timer \"reminder\" pending in conv_1 (pending: \"follow-up\")
1 test file: 0 passed, 1 failed
",
        file.display()
    );
    ensure!(
        out.stdout == expected,
        "got:\n{}\nexpected:\n{expected}",
        out.stdout
    );
    Ok(())
}

/// A wrong expectation fails the run, with a diff of what was expected
/// against what the plugin did, and says which turn; a stubbed service
/// answers the plugin's request and an unstubbed one is refused.
#[test]
fn a_wrong_expectation_fails_with_a_readable_diff() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("wrong.toml");
    std::fs::write(
        &file,
        r#"
[[turn]]
message = "Bonjour !"
actions = [{ kind = "text", body = "Bonsoir !" }]

[[turn]]
message = "ok"
match = "partial"
requests = [{ body = { body = "ok" } }]
kv = { count = "1" }
"#,
    )?;
    let wasm = repo_root().join("target/wasm32-wasip2/release/echo.wasm");
    let out = run(digibot_test().arg(&wasm).arg(&file))?;
    ensure!(!out.success, "a failing test exited 0: {}", out.stdout);
    let expected = format!(
        "{} ... FAILED
  turn 1 (message \"Bonjour !\"): actions differ (exact match; - expected, + actual)
    [
      {{
  -     \"body\": \"Bonsoir !\",
  +     \"body\": \"Bonjour !\",
        \"kind\": \"text\"
      }}
    ]
  turn 2 (message \"ok\"): kv \"count\" is absent, expected \"1\"
1 test file: 0 passed, 1 failed
",
        file.display()
    );
    ensure!(
        out.stdout == expected,
        "got:\n{}\nexpected:\n{expected}",
        out.stdout
    );

    // An invalid file is named, and nothing runs.
    std::fs::write(&file, "[[turn]]\nmesage = \"hi\"\n")?;
    let out = run(digibot_test().arg(&wasm).arg(&file))?;
    ensure!(
        !out.success && out.stdout.contains("INVALID") && out.stdout.contains("mesage"),
        "{}",
        out.stdout
    );
    Ok(())
}

#[test]
fn replay_echo_on_every_fixture() -> Result<()> {
    let files: Vec<PathBuf> = fixture_files().into_iter().map(|(_, p)| p).collect();
    let out = replay(&files, &plugin_wasm("echo"), &[])?.ok("replay echo")?;
    let expected = expected_echo_like("echo", &|name| match name {
        "message_text_customer" => vec!["Bonjour, je voudrais suivre ma commande"],
        "message_text_minimal" => vec!["/info"],
        _ => vec![],
    })?;
    ensure_json_eq(&out.json()?, &expected, "replay of echo")
}

/// The concierge flow across files: KV (the topic) carries from one file
/// to the next, `--config` overrides config, agent messages run nothing, a
/// hand-off puts a human in charge (concierge skipped), and a repeated event
/// is a duplicate.
#[test]
fn replay_concierge_flow_keeps_state_across_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let conv = "conv_7Hq2Lm9Xa1";
    let write = |name: &str, value: Value| -> Result<PathBuf> {
        let path = tmp.path().join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec(&value)?)?;
        Ok(path)
    };
    let files = [
        fixtures_dir().join("new_conversation.json"),
        write(
            "orders",
            button_reply(conv, "msg_e2e_1", "orders", "Mes commandes"),
        )?,
        write(
            "invoice",
            list_reply(conv, "msg_e2e_2", "invoice", "Recevoir ma facture"),
        )?,
        write("agent", customer_text(conv, "msg_e2e_3", "agent"))?,
        fixtures_dir().join("message_agent.json"),
        write("after", customer_text(conv, "msg_e2e_4", "merci"))?,
        write(
            "orders-again",
            button_reply(conv, "msg_e2e_1", "orders", "Mes commandes"),
        )?,
    ];
    let out = replay(
        &files,
        &plugin_wasm("concierge"),
        &[
            "--config",
            "agent_id=usr_99",
            "--config",
            "invoice_url=https://shop.example/f/42.pdf",
        ],
    )?
    .ok("replay concierge")?;

    let message = |file: &Path, id: &str, plugin: Value| {
        json!({"file": file.display().to_string(), "event": format!("live_chat.new_message:{id}"),
               "type": "live_chat.new_message", "conversation_id": conv, "dispatched": true,
               "plugins": [plugin]})
    };
    let interactive = |body: Value| {
        json!({"method": "POST", "path": "/v1/messages", "body": {
            "conversation_id": conv, "type": "interactive", "send_to_third": true, "body": body}})
    };
    let expected = json!([
        {"file": files[0].display().to_string(),
         "event": "live_chat.new_conversation:conv_7Hq2Lm9Xa1",
         "type": "live_chat.new_conversation", "conversation_id": conv, "dispatched": true,
         "plugins": [{"plugin": "concierge", "outcome": "ok",
            "actions": [{"kind": "buttons", "header": "Bienvenue",
                "body": "Bonjour Salma Idrissi ! Comment puis-je vous aider ?",
                "buttons": [{"id": "orders", "title": "Mes commandes"},
                            {"id": "stores", "title": "Nos magasins"},
                            {"id": "agent", "title": "Parler à un agent"}]}],
            "requests": [interactive(json!({"type": "button",
                "header": {"type": "text", "text": "Bienvenue"},
                "body": {"text": "Bonjour Salma Idrissi ! Comment puis-je vous aider ?"},
                "action": {"buttons": [
                    {"type": "reply", "reply": {"id": "orders", "title": "Mes commandes"}},
                    {"type": "reply", "reply": {"id": "stores", "title": "Nos magasins"}},
                    {"type": "reply", "reply": {"id": "agent", "title": "Parler à un agent"}}
                ]}}))]}]},
        message(&files[1], "msg_e2e_1", json!({"plugin": "concierge", "outcome": "ok",
            "actions": [{"kind": "list", "header": "Commandes", "body": "Que voulez-vous faire ?",
                "button": "Options", "sections": [{"title": "Commandes", "rows": [
                    {"id": "track", "title": "Suivre un colis", "description": null},
                    {"id": "return", "title": "Retourner un article", "description": null},
                    {"id": "invoice", "title": "Recevoir ma facture", "description": null}]}]}],
            "requests": [interactive(json!({"type": "list",
                "header": {"type": "text", "text": "Commandes"},
                "body": {"text": "Que voulez-vous faire ?"},
                "action": {"button": "Options", "sections": [{"title": "Commandes", "rows": [
                    {"id": "track", "title": "Suivre un colis"},
                    {"id": "return", "title": "Retourner un article"},
                    {"id": "invoice", "title": "Recevoir ma facture"}]}]}}))]})),
        message(&files[2], "msg_e2e_2", json!({"plugin": "concierge", "outcome": "ok",
            "actions": [
                {"kind": "file", "url": "https://shop.example/f/42.pdf", "file_name": "facture.pdf",
                 "extension": null, "voice": false},
                {"kind": "text", "body": "Voici votre facture."}],
            "requests": [
                {"method": "POST", "path": "/v1/messages", "body": {"conversation_id": conv,
                  "send_to_third": true,
                  "file": {"url": "https://shop.example/f/42.pdf", "file_name": "facture.pdf"}}},
                text(conv, "Voici votre facture.").1]})),
        message(&files[3], "msg_e2e_3", json!({"plugin": "concierge", "outcome": "ok",
            "actions": [
                {"kind": "note", "body": "Le client demande un conseiller. Sujet : orders."},
                {"kind": "hand_off", "user_id": "usr_99", "as_handler": true},
                {"kind": "text", "body": "Je vous passe un conseiller, un instant."}],
            "requests": [
                {"method": "POST", "path": "/v1/messages", "body": {"conversation_id": conv,
                  "type": "text", "send_to_third": false,
                  "body": "Le client demande un conseiller. Sujet : orders."}},
                {"method": "PUT", "path": "/v1/conversations/conv_7Hq2Lm9Xa1/attach/participants",
                 "body": {"users": ["usr_99"], "bots": [], "handler_id": "usr_99"}},
                text(conv, "Je vous passe un conseiller, un instant.").1]})),
        {"file": files[4].display().to_string(), "event": "live_chat.new_message:msg_agent_0001",
         "type": "live_chat.new_message", "conversation_id": conv, "dispatched": false,
         "plugins": []},
        // The hand-off (and the agent's message) put a human in charge.
        message(&files[5], "msg_e2e_4", json!({"plugin": "concierge", "outcome": "skipped",
            "reason": "human", "actions": [], "requests": []})),
        {"file": files[6].display().to_string(), "event": "live_chat.new_message:msg_e2e_1",
         "type": "live_chat.new_message", "conversation_id": conv, "dispatched": false,
         "duplicate": true, "plugins": []},
    ]);
    ensure_json_eq(&out.json()?, &expected, "replay of the concierge flow")
}

/// A plugin error or a refused action: exit non-zero, with the reason, and
/// the other actions of the event still shown.
#[test]
fn replay_fails_with_the_reason() -> Result<()> {
    let file = fixtures_dir().join("message_text_customer.json");
    let trap = replay(
        std::slice::from_ref(&file),
        &plugin_wasm("hostile_trap"),
        &[],
    )?;
    ensure!(!trap.success, "a trapping plugin must fail replay");
    ensure!(
        trap.stderr.contains("plugin hostile_trap failed: trap")
            && trap.stderr.contains("boom: hostile-trap panicked"),
        "stderr without the reason: {}",
        trap.stderr
    );
    let report = &trap.json()?[0]["plugins"][0];
    ensure!(report["outcome"] == "failed", "{report}");
    ensure!(
        report["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("trap: ") && r.contains("boom: hostile-trap panicked")),
        "{report}"
    );

    let tmp = tempfile::tempdir()?;
    let hijack = tmp.path().join("hijack.json");
    std::fs::write(
        &hijack,
        serde_json::to_vec(&customer_text("conv_1", "msg_1", "hijack"))?,
    )?;
    let out = replay(&[hijack], &plugin_wasm("hostile_intruder"), &[])?;
    ensure!(!out.success, "a refused action must fail replay");
    ensure!(
        out.stderr.contains("hand_off action #0 refused"),
        "{}",
        out.stderr
    );
    let report = &out.json()?[0]["plugins"][0];
    ensure!(
        report["actions"].as_array().map(Vec::len) == Some(3),
        "{report}"
    );
    ensure!(
        report["rejected"].as_array().map(Vec::len) == Some(2),
        "{report}"
    );
    ensure_json_eq(
        &report["requests"],
        &json!([text("conv_1", "hijack attempted").1]),
        "requests of the valid action",
    )
}

#[test]
fn check_reports_what_will_load() -> Result<()> {
    // SDK plugins target the newest interface; echo_v0_1 and echo_v0_2
    // stay on 0.1.0 and 0.2.0, which this host still loads.
    for (name, version) in [
        ("echo", "0.3.0"),
        ("concierge", "0.3.0"),
        ("echo_v0_2", "0.2.0"),
        ("echo_v0_1", "0.1.0"),
    ] {
        let wasm = plugin_wasm(name);
        let bytes = std::fs::read(&wasm)?;
        let mut report = run(digibot().args(["check", "--json"]).arg(&wasm))?
            .ok("check")?
            .json()?;
        ensure!(report["compile_ms"].is_u64(), "{report}");
        let imports = report
            .as_object_mut()
            .and_then(|r| r.remove("imports"))
            .context("no imports")?;
        report["compile_ms"] = json!(null);
        ensure_json_eq(
            &report,
            &json!({"file": wasm.display().to_string(), "ok": true, "problem": null,
                "size": bytes.len(), "sha256": hex::encode(sha2::Sha256::digest(&bytes)),
                "world": format!("digishare:bot/bot@{version}"), "wit_version": version,
                "supported_wit_versions": ["0.1.0", "0.2.0", "0.3.0"], "compile_ms": null, "manifest": null}),
            &format!("check {name}"),
        )?;
        let imports = imports.as_array().context("imports")?;
        ensure!(
            imports.contains(
                &json!({"name": format!("digishare:bot/types@{version}"), "status": "ok"})
            ),
            "{imports:?}"
        );
        ensure!(
            imports.iter().all(|i| i["status"] == "ok"
                && i["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("digishare:bot/") || n.starts_with("wasi:"))),
            "{imports:?}"
        );
    }
    // concierge uses kv and config: they are imported.
    let concierge = run(digibot().arg("check").arg(plugin_wasm("concierge")))?.ok("check")?;
    for import in [
        "digishare:bot/kv@0.3.0",
        "digishare:bot/config@0.3.0",
        "wasi:http/outgoing-handler@0.2.12",
        "digishare:bot/outbound@0.3.0",
    ] {
        ensure!(concierge.stdout.contains(import), "{}", concierge.stdout);
    }
    let old = run(digibot().arg("check").arg(plugin_wasm("echo_v0_1")))?.ok("check")?;
    ensure!(
        old.stdout
            .contains("world:         digishare:bot/bot@0.1.0")
            && old
                .stdout
                .contains("digishare:bot: 0.1.0 (this host loads 0.1.0, 0.2.0, 0.3.0)")
            && old.stdout.contains("OK: this component loads in digibot"),
        "{}",
        old.stdout
    );
    Ok(())
}

#[test]
fn check_fails_on_what_will_not_load() -> Result<()> {
    // echo, with its `wasi:cli/environment` import renamed to an interface
    // digibot does not provide (same length, so the binary stays valid).
    let tmp = tempfile::tempdir()?;
    let bytes = std::fs::read(plugin_wasm("echo"))?;
    let patched = replace_all(&bytes, b"wasi:cli/environment", b"evil:cli/environment");
    ensure!(
        patched != bytes,
        "echo.wasm does not import wasi:cli/environment"
    );
    let forbidden = tmp.path().join("evil.wasm");
    std::fs::write(&forbidden, &patched)?;

    let out = run(digibot().args(["check", "--json"]).arg(&forbidden))?;
    ensure!(
        !out.success,
        "a component with a refused import passed check"
    );
    let report = out.json()?;
    ensure!(report["ok"] == false, "{report}");
    ensure!(
        report["problem"].as_str().is_some_and(
            |p| p.starts_with("imports what digibot does not provide: evil:cli/environment@")
        ),
        "{report}"
    );
    let imports = report["imports"].as_array().context("imports")?;
    ensure!(
        imports.len() == 1
            && imports[0]["status"] == "refused"
            && imports[0]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("evil:cli/environment@")),
        "{report}"
    );
    let human = run(digibot().arg("check").arg(&forbidden))?;
    ensure!(human.stdout.contains("REFUSED"), "{}", human.stdout);

    // A plugin built against a digishare:bot this host does not know: the
    // 0.1.0 echo with its version rewritten (same length).
    let future = tmp.path().join("future.wasm");
    std::fs::write(
        &future,
        replace_all(
            &std::fs::read(plugin_wasm("echo_v0_1"))?,
            b"digishare:bot/types@0.1.0",
            b"digishare:bot/types@0.9.0",
        ),
    )?;
    let out = run(digibot().args(["check", "--json"]).arg(&future))?;
    ensure!(!out.success, "an unknown version passed check");
    let report = out.json()?;
    ensure!(
        report["ok"] == false
            && report["wit_version"] == "0.9.0"
            && report["problem"]
                == "targets digishare:bot@0.9.0, this host supports 0.1.0, 0.2.0, 0.3.0"
            && report["supported_wit_versions"] == json!(["0.1.0", "0.2.0", "0.3.0"]),
        "{report}"
    );

    // Not a component at all, and a plugin whose NAME.toml is broken.
    let text = tmp.path().join("notes.wasm");
    std::fs::write(&text, "not wasm")?;
    let out = run(digibot().arg("check").arg(&text))?;
    ensure!(
        !out.success && out.stdout.contains("PROBLEM: not a WebAssembly component"),
        "{}",
        out.stdout
    );
    let echo = tmp.path().join("echo.wasm");
    std::fs::copy(plugin_wasm("echo"), &echo)?;
    std::fs::write(tmp.path().join("echo.toml"), "enabeld = false\n")?;
    let out = run(digibot().arg("check").arg(&echo))?;
    ensure!(
        !out.success && out.stdout.contains("PROBLEM: invalid") && out.stdout.contains("echo.toml"),
        "{}",
        out.stdout
    );
    Ok(())
}

/// `bytes` with every `from` replaced by `to`.
fn replace_all(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Without the wasm32-wasip2 target, `build` says exactly what to run. A
/// stand-in `rustup` reports only the host target.
#[test]
fn build_says_how_to_install_the_target() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin)?;
    let rustup = bin.join("rustup");
    std::fs::write(&rustup, "#!/bin/sh\necho x86_64-unknown-linux-gnu\n")?;
    let mut perms = std::fs::metadata(&rustup)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&rustup, perms)?;
    let krate = tmp.path().join("bot");
    std::fs::create_dir(&krate)?;
    std::fs::write(krate.join("Cargo.toml"), "[package]\nname = \"bot\"\n")?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(digibot().arg("build").arg(&krate).env("PATH", path))?;
    ensure!(!out.success, "build succeeded without the target");
    ensure!(
        out.stderr.contains("run `rustup target add wasm32-wasip2`"),
        "{}",
        out.stderr
    );
    Ok(())
}

/// `chat` from a pipe: location request and answer, KV across turns (the
/// topic in the hand-off note), a human in charge after the hand-off until
/// `/bot`, `/new` starting over.
#[test]
fn chat_from_a_pipe() -> Result<()> {
    let mut child = digibot()
        .args(["chat", "--name", "Omar", "--plugin"])
        .arg(plugin_wasm("concierge"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let input = "2\n/location 33.5 -7.6\nagent\nmerci\n/bot\nmerci\n/new\n/quit\nnever read\n";
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, input.as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "chat failed: {stdout}\n{stderr}");
    let expected_in_order = [
        "concierge> *Bienvenue*",
        "           Bonjour Omar ! Comment puis-je vous aider ?",
        "           [2] Nos magasins",
        "you> 2",
        "concierge> Partagez votre position pour trouver le magasin le plus proche.",
        "           [asks for your location: type /location LAT LON]",
        "you> /location 33.5 -7.6",
        "concierge> [location] Digishare Store Maarif, Bd Al Massira, Casablanca (33.5731, -7.5898)",
        "concierge> Voici le magasin le plus proche.",
        "you> agent",
        "concierge> [internal note, agents only] Le client demande un conseiller. Sujet : stores.",
        "concierge> [hand-off] agent usr_17 joins the conversation as the handler",
        "concierge> Je vous passe un conseiller, un instant.",
        "you> merci",
        "(no reply)",
        "[a human agent is in charge since the hand-off: /bot hands it back]",
        "you> /bot",
        "[the agent hands the conversation back to the bot]",
        "you> merci",
        "concierge> (replying to msg_chat_5) Tapez « menu » pour les options ou « agent » pour parler à un conseiller.",
        "you> /new",
        "--- new conversation conv_chat_2 with Omar ---",
        "           Bonjour Omar ! Comment puis-je vous aider ?",
        "you> /quit",
    ];
    let mut rest: &str = &stdout;
    for line in expected_in_order {
        match rest.find(line) {
            Some(at) => rest = &rest[at + line.len()..],
            None => bail!("chat output lacks {line:?} (in order):\n{stdout}\n{stderr}"),
        }
    }
    ensure!(!stdout.contains("never read"), "{stdout}");
    Ok(())
}

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
    config: PathBuf,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-u")
            .arg("-f")
            .arg(&self.config)
            .args(["-L", &self.socket])
            .stdin(Stdio::null());
        cmd
    }

    fn tmux(&self, args: &[&str]) -> Result<String> {
        Ok(run(self.cmd().args(args))?
            .ok(&format!("tmux {args:?}"))?
            .stdout)
    }

    fn screen(&self) -> Result<String> {
        self.tmux(&["capture-pane", "-p", "-J", "-S", "-", "-t", "chat"])
    }

    fn type_line(&self, line: &str) -> Result<()> {
        self.tmux(&["send-keys", "-t", "chat", "-l", line])?;
        self.tmux(&["send-keys", "-t", "chat", "Enter"])?;
        Ok(())
    }

    /// Polls the screen until `done` holds for it.
    fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let screen = self.screen()?;
            if done(&screen) {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                bail!("the chat screen never showed {what}:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

/// Whether tmux runs here, installing it with apt-get if it is missing.
fn tmux_available() -> bool {
    let works = || {
        Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works() {
        return true;
    }
    let apt = |args: &[&str]| {
        let _ = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output();
    };
    apt(&["install", "-y", "-q", "tmux"]);
    if !works() {
        // A fresh machine may have no package lists yet.
        apt(&["update", "-q"]);
        apt(&["install", "-y", "-q", "tmux"]);
    }
    works()
}

/// The line of `screen` offering `title`, as `[N] title`: its number.
fn choice_number(screen: &str, title: &str) -> Option<String> {
    let line = screen.lines().rev().find(|l| l.contains(title))?;
    let open = line.find('[')?;
    let close = line[open..].find(']')? + open;
    Some(line[open + 1..close].to_string())
}

/// A real terminal session through the concierge flow: numbered buttons,
/// a list picked by number, the invoice, the hand-off.
#[test]
fn chat_in_a_terminal() -> Result<()> {
    if !tmux_available() {
        eprintln!(
            "SKIPPED chat_in_a_terminal: tmux is not installed and apt-get could not install it"
        );
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("tmux.conf");
    // Keep the pane after the program exits, to read its exit status.
    std::fs::write(
        &config,
        "set -g remain-on-exit on\nset -g history-limit 10000\n",
    )?;
    let tmux = Tmux {
        socket: format!("digibot-e2e-{}", std::process::id()),
        config,
    };
    // The shell prints chat's exit code: tmux's own pane_dead_status is
    // sometimes empty for a pane that did exit 0 (seen with tmux 3.3a).
    let command = format!(
        "env RUST_LOG=warn DIGIBOT_PLUGIN_TIMEOUT_MS={PLUGIN_TIMEOUT_MS} '{}' chat \
         --plugin '{}' --name Salma; echo \"chat-exit=$?\"",
        env!("CARGO_BIN_EXE_digibot"),
        plugin_wasm("concierge").display()
    );
    tmux.tmux(&[
        "new-session",
        "-d",
        "-s",
        "chat",
        "-x",
        "200",
        "-y",
        "50",
        &command,
    ])?;

    let screen = tmux.wait_for("the greeting buttons", |s| s.contains("Parler à un agent"))?;
    ensure!(
        screen.contains("*Bienvenue*")
            && screen.contains("[1] Mes commandes")
            && screen.contains("[2] Nos magasins")
            && screen.contains("[3] Parler à un agent"),
        "greeting not rendered with numbered buttons:\n{screen}"
    );
    let orders = choice_number(&screen, "Mes commandes").context("no number for Mes commandes")?;
    tmux.type_line(&orders)?;

    let screen = tmux.wait_for("the orders list", |s| s.contains("Recevoir ma facture"))?;
    ensure!(
        screen.contains("*Commandes*") && screen.contains("Que voulez-vous faire ?"),
        "{screen}"
    );
    let invoice =
        choice_number(&screen, "Recevoir ma facture").context("no number for the invoice")?;
    ensure!(invoice == "3", "the invoice row should be [3]:\n{screen}");
    tmux.type_line(&invoice)?;

    let screen = tmux.wait_for("the invoice", |s| s.contains("Voici votre facture."))?;
    ensure!(
        screen.contains("[file] facture.pdf https://example.com/facture.pdf"),
        "{screen}"
    );
    tmux.type_line("agent")?;

    let screen = tmux.wait_for("the hand-off", |s| s.contains("un instant."))?;
    ensure!(
        screen.contains(
            "[internal note, agents only] Le client demande un conseiller. Sujet : orders."
        ) && screen.contains("[hand-off] agent usr_17 joins the conversation as the handler"),
        "note and hand-off not shown:\n{screen}"
    );

    tmux.type_line("/quit")?;
    let screen = tmux.wait_for("chat to exit after /quit", |s| s.contains("chat-exit="))?;
    ensure!(
        screen.contains("chat-exit=0"),
        "chat did not exit 0 after /quit:\n{screen}"
    );
    Ok(())
}

/// `[[http]]` stubs answer the orders plugin's lookups by URL (200 with
/// JSON, 404), inside the grant the test file's `[plugin]` gives; a URL no
/// stub answers is refused to the plugin, which says the service is down.
/// The same file passes against the Rust, Python and TypeScript (`fetch()`)
/// orders plugin.
#[test]
fn stubbed_http_answers_the_orders_plugin_in_every_language() -> Result<()> {
    let file = repo_root().join("tests/conversations/orders.toml");
    for wasm in every_language("orders")? {
        // The plugins' log lines are `info` events of the host.
        let out = run(digibot_test().arg(&wasm).arg(&file).env("RUST_LOG", "info"))?
            .ok("digibot test")?;
        ensure!(
            out.stdout
                .ends_with("... ok (3 turns)\n1 test file: 1 passed, 0 failed\n"),
            "{}: {}",
            wasm.display(),
            out.stdout
        );
        ensure!(
            out.stderr
                .contains("no [[http]] stub answers GET https://api.shop.example/orders/C-999"),
            "{}",
            out.stderr
        );
    }
    Ok(())
}

/// As a new author of `lang`: `digibot new shop --lang LANG` in `dir`
/// makes `files`, then `digibot build` and `digibot test` pass from the new
/// folder (returned) on the scaffold's conversation test.
fn new_build_test_in(dir: &Path, lang: &str, files: &[&str]) -> Result<PathBuf> {
    run(digibot()
        .args(["new", "shop", "--lang", lang, "--dir"])
        .arg(dir))?
    .ok(&format!("digibot new --lang {lang}"))?;
    let root = dir.join("shop");
    for file in files {
        ensure!(root.join(file).is_file(), "digibot new made no {file}");
    }
    let built = run(digibot().arg("build").current_dir(&root))?.ok("digibot build")?;
    let wasm = PathBuf::from(built.stdout.trim());
    ensure!(
        wasm == root.canonicalize()?.join("target/shop.wasm") && wasm.is_file(),
        "digibot build printed {:?}\n{}",
        built.stdout,
        built.stderr
    );
    let tested = run(digibot_test().current_dir(&root))?.ok("digibot test")?;
    ensure!(
        tested.stdout
            == "tests/conversation.toml (shop greets and echoes) ... ok (3 turns)\n\
                1 test file: 1 passed, 0 failed\n",
        "{}",
        tested.stdout
    );
    Ok(root)
}

/// [`new_build_test_in`] in a temporary folder.
fn new_build_test(lang: &str, files: &[&str]) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    new_build_test_in(tmp.path(), lang, files).map(drop)
}

/// A new TypeScript author: `digibot new shop --lang ts`, `digibot build`
/// (tsc, esbuild, componentize-js against the SDK and the jco typings),
/// `digibot test` on the scaffold's conversation test, all from the new
/// folder, and the component loads at digishare:bot 0.3.0.
#[test]
fn new_build_test_a_typescript_bot() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = new_build_test_in(
        tmp.path(),
        "ts",
        &[
            "package.json",
            "tsconfig.json",
            "src/index.ts",
            "tests/conversation.toml",
            "README.md",
            ".gitignore",
        ],
    )?;

    // A type error stops the build, with tsc's words.
    std::fs::write(
        root.join("src/index.ts"),
        "import { Action } from \"digibot-sdk\";\nexport const x: number = Action.text(\"hi\");\n",
    )?;
    let broken = run(digibot().arg("build").current_dir(&root))?;
    ensure!(
        !broken.success && broken.stderr.contains("error TS"),
        "{}",
        broken.stderr
    );
    Ok(())
}

/// A new Python author: `digibot new shop --lang python`, `digibot build`
/// (componentize-py at digishare:bot 0.3.0), `digibot test` pass as
/// scaffolded.
#[test]
fn new_build_test_a_python_bot() -> Result<()> {
    new_build_test(
        "python",
        &[
            "app.py",
            "wit-version",
            "tests/conversation.toml",
            "README.md",
        ],
    )?;
    Ok(())
}
