//! The sandbox under attack (issue 15): each hostile behaviour beside
//! echo, with its exact outcome and the reason recorded on the event, and
//! echo answering every event in every conversation:
//! - a component with more memories than a plugin may have (refused at
//!   start and at upload), and one at every cap spinning in many
//!   conversations at once (it cannot take the pool from echo);
//! - a KV disk fill, stopped by the conversation and plugin quotas, the
//!   plugin told why, the usage surviving a restart;
//! - huge keys and values handed to `kv` and `config`, and thousands of
//!   distinct reads;
//! - floods of empty `log` calls and a huge log message.
//!
//! Hostile plugins are installed as `bad-*` so they run before echo.

use anyhow::{Context, Result, ensure};
use hostile_memories::{Shape, component_wat};
use serde_json::{Value, json};

use crate::containment::Admin;
use crate::support::*;

/// A plugin file to put in the folder: its name, bytes and NAME.toml.
struct File {
    name: &'static str,
    bytes: Vec<u8>,
    toml: Option<&'static str>,
}

fn built(name: &'static str, source: &str, toml: Option<&'static str>) -> Result<File> {
    let path = plugin_wasm(source);
    Ok(File {
        name,
        bytes: std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        toml,
    })
}

fn echo() -> Result<File> {
    built("echo", "echo", None)
}

fn hand_written(name: &'static str, shape: Shape, toml: Option<&'static str>) -> Result<File> {
    Ok(File {
        name,
        bytes: wat::parse_str(component_wat(shape))?,
        toml,
    })
}

/// Starts digibot with `files` in its plugins folder (start empty, stop,
/// fill the folder, start again with the same data).
async fn start_with(builder: DigibotBuilder, files: &[File]) -> Result<Digibot> {
    let mut bot = builder
        // Not the breaker's test: every event runs every plugin.
        .env("DIGIBOT_BREAKER_FAILURES", "1000")
        .start()
        .await?;
    bot.kill9()?;
    for f in files {
        std::fs::write(bot.plugins_dir.join(format!("{}.wasm", f.name)), &f.bytes)?;
        if let Some(toml) = f.toml {
            std::fs::write(bot.plugins_dir.join(format!("{}.toml", f.name)), toml)?;
        }
    }
    bot.restart().await?;
    Ok(bot)
}

/// The outcome of `plugin` in a recorded event.
fn outcome<'a>(event: &'a Value, plugin: &str) -> Result<&'a Value> {
    event["plugins"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["plugin"] == plugin))
        .with_context(|| format!("no outcome for {plugin} in {event}"))
}

/// Posts `(conversation, message id, text)` messages (their
/// conversations' lanes run at once), waits until all are handled, and
/// returns their recorded events in the same order.
async fn post_all(bot: &Digibot, messages: &[(&str, &str, &str)]) -> Result<Vec<Value>> {
    let mut keys = Vec::new();
    for (c, id, t) in messages {
        keys.push(bot.accept(&customer_text(c, id, t)).await?);
    }
    let events = bot.wait_handled(&keys, TIMEOUT * 3).await?;
    keys.iter()
        .map(|k| {
            events
                .iter()
                .find(|e| e["key"] == k.as_str())
                .cloned()
                .with_context(|| format!("{k} not handled"))
        })
        .collect()
}

/// Echo answered `event` with one action.
fn echoed(event: &Value) -> Result<()> {
    let o = outcome(event, "echo")?;
    ensure!(
        o["outcome"] == "ok" && o["actions"] == 1,
        "echo must answer: {event}"
    );
    Ok(())
}

/// The many-memories component (16 memories, as many instances) is
/// refused at start, logged with its numbers, and refused at upload; a
/// component at every cap that spins until its deadline, in eight
/// conversations at once, fails each event with `timeout` while echo
/// answers all of them.
#[tokio::test]
async fn a_many_memories_component_is_refused_and_a_greedy_one_cannot_starve_echo() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let greedy = Shape {
        memories: 2,
        tables: 4,
        core_instances: 32,
        spin: true,
    };
    let bot = start_with(
        Digibot::builder().fake(&fake),
        &[
            hand_written("bad-memories", Shape::memories(16), None)?,
            hand_written("bad-greedy", greedy, Some("[limits]\ntimeout_ms = 1000\n"))?,
            echo()?,
        ],
    )
    .await?;
    let refusal = "has 16 linear memories; a plugin may have at most 2";
    let line = bot
        .wait_for_log(TIMEOUT, "the refused component", |l| {
            l.contains("bad-memories") && l.contains(refusal)
        })
        .await?;
    ensure!(line.contains("ERROR"), "logged as an error: {line}");
    let admin = Admin::new(&bot)?;
    let names: Vec<Value> = admin
        .plugins()
        .await?
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    ensure!(names == [json!("bad-greedy"), json!("echo")], "{names:?}");
    let (status, body) = admin
        .put(
            "bad-memories",
            wat::parse_str(component_wat(Shape::memories(16)))?,
        )
        .await?;
    ensure!(
        status == 422 && body["error"] == format!("plugin bad-memories: {refusal}"),
        "the upload is refused with the numbers: {status} {body}"
    );

    let conversations: Vec<String> = (0..8).map(|i| format!("conv_greedy_{i}")).collect();
    let ids: Vec<String> = (0..8).map(|i| format!("greedy_{i}")).collect();
    let messages: Vec<(&str, &str, &str)> = conversations
        .iter()
        .zip(&ids)
        .map(|(c, id)| (c.as_str(), id.as_str(), "still there?"))
        .collect();
    let events = post_all(&bot, &messages).await?;
    for event in &events {
        let bad = outcome(event, "bad-greedy")?;
        ensure!(
            bad["outcome"] == "failed"
                && bad["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("timeout")),
            "{event}"
        );
        echoed(event)?;
    }
    fake.settle(8, TIMEOUT).await?;
    for c in &conversations {
        ensure_all_eq(&fake.wire_for(c), &[wire_text(c, "still there?")], c)?;
    }
    Ok(())
}

/// The per-conversation quota (1 MiB) stops a plugin filling one
/// conversation, the per-plugin quota (2 MiB here) stops it filling many;
/// the plugin is told why (its answer quotes the host), the refusal is
/// recorded on the event, and what it holds survives a restart.
#[tokio::test]
async fn a_kv_disk_fill_is_stopped_by_the_quotas_and_the_plugin_is_told() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let mut bot = start_with(
        Digibot::builder()
            .fake(&fake)
            .env("DIGIBOT_KV_PLUGIN_BYTES", "2097152"),
        // A deadline that is not this test's subject: sixteen 64 KiB
        // writes, each looking up what it replaces, on a busy machine.
        &[
            built(
                "bad-kv",
                "hostile_kv",
                Some("[limits]\ntimeout_ms = 10000\n"),
            )?,
            echo()?,
        ],
    )
    .await?;
    // Each entry: a 7-byte key (`fa1/000`) and a 64 KiB value.
    const ENTRY: i64 = 7 + 65_536;
    let conversation = |would: i64| {
        format!("quota: this conversation's kv would hold {would} bytes, the quota is 1048576")
    };
    let plugin = |would: i64| {
        format!("quota: this plugin's kv would hold {would} bytes, the quota is 2097152")
    };
    // A: 15 entries fit in 1 MiB, the 16th does not. B: the same (the
    // plugin then holds 30). C: one more fits in the plugin's 2 MiB.
    // A again: full.
    let cases = [
        ("conv_fill_a", "fa1", 15, conversation(16 * ENTRY)),
        ("conv_fill_b", "fb1", 15, conversation(16 * ENTRY)),
        ("conv_fill_c", "fc1", 1, plugin(32 * ENTRY)),
        ("conv_fill_a", "fa2", 0, conversation(16 * ENTRY)),
    ];
    let mut expected = Vec::new();
    for (c, id, stored, refusal) in &cases {
        // One at a time: each case counts on the ones before.
        let event = post_all(&bot, &[(c, id, "fill")]).await?.remove(0);
        let bad = outcome(&event, "bad-kv")?;
        ensure!(
            bad["outcome"] == "ok" && bad["refused"] == json!([refusal]),
            "{id}: the refusal is recorded: {event}"
        );
        echoed(&event)?;
        expected.push((
            c,
            wire_text(c, &format!("stored {stored}, refused: {refusal}")),
        ));
        expected.push((c, wire_text(c, "fill")));
    }
    // A plugin that gives up on the refusal (`kv::set(..)?`): the turn
    // fails with the host's reason, its writes discarded; echo answers.
    let event = post_all(&bot, &[("conv_fill_a", "fa3", "fill-strict")])
        .await?
        .remove(0);
    let bad = outcome(&event, "bad-kv")?;
    ensure!(
        bad["outcome"] == "failed" && bad["reason"] == conversation(16 * ENTRY).as_str(),
        "fa3: the host's reason is the plugin's: {event}"
    );
    echoed(&event)?;
    expected.push((&"conv_fill_a", wire_text("conv_fill_a", "fill-strict")));
    fake.settle(9, TIMEOUT).await?;
    for c in ["conv_fill_a", "conv_fill_b", "conv_fill_c"] {
        let want: Vec<Value> = expected
            .iter()
            .filter(|(conv, _)| **conv == c)
            .map(|(_, v)| v.clone())
            .collect();
        ensure_all_eq(&fake.wire_for(c), &want, c)?;
    }

    // The usage is the store's: after a restart C is still at the
    // plugin's quota.
    bot.restart().await?;
    let event = post_all(&bot, &[("conv_fill_c", "fc2", "fill")])
        .await?
        .remove(0);
    let refusal = plugin(32 * ENTRY);
    ensure!(
        outcome(&event, "bad-kv")?["refused"] == json!([refusal]),
        "{event}"
    );
    fake.settle(11, TIMEOUT).await?;
    let c_wire = fake.wire_for("conv_fill_c");
    ensure_all_eq(
        &c_wire[2..],
        &[
            wire_text("conv_fill_c", &format!("stored 0, refused: {refusal}")),
            wire_text("conv_fill_c", "fill"),
        ],
        "conv_fill_c after the restart",
    )?;
    Ok(())
}

/// Keys and values past their bounds: `kv.set` and the scoped calls
/// (`get-in`, `set-in`, `delete-in`, a TTL past a year) answer an error the
/// plugin sees; calls with no error to return (`kv.get`, `kv.delete`,
/// `config.get`, a 257th distinct read) stop the turn with reason
/// `limit: ...`. Echo answers every event.
#[tokio::test]
async fn huge_keys_and_values_and_endless_reads_are_refused() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = start_with(
        Digibot::builder().fake(&fake),
        &[
            built(
                "bad-kv",
                "hostile_kv",
                Some("[limits]\ntimeout_ms = 10000\n"),
            )?,
            echo()?,
        ],
    )
    .await?;
    let c = "conv_huge";
    let huge = 16 << 20;
    let answered = [
        (
            "huge-set",
            "refused: limit: kv key is 16777216 bytes, the limit is 256".to_string(),
        ),
        (
            "huge-value",
            "refused: limit: kv value is 16777216 bytes, the limit is 65536".to_string(),
        ),
        (
            "huge-timer",
            "refused: limit: a timer name is 1 to 64 bytes (this one is 16777216)".to_string(),
        ),
        (
            "huge-timer-payload",
            "refused: limit: a timer payload is at most 4096 bytes (this one is 16777216)"
                .to_string(),
        ),
        (
            "huge-get-in",
            "refused: limit: kv.get-in key is 16777216 bytes, the limit is 256".to_string(),
        ),
        (
            "huge-set-in",
            "refused: limit: kv key is 16777216 bytes, the limit is 256".to_string(),
        ),
        (
            "huge-value-in",
            "refused: limit: kv value is 16777216 bytes, the limit is 65536".to_string(),
        ),
        (
            "huge-delete-in",
            "refused: limit: kv.delete-in key is 16777216 bytes, the limit is 256".to_string(),
        ),
        (
            "huge-ttl",
            format!(
                "refused: limit: kv ttl is {} ms, the limit is 31536000000 (365 days)",
                u64::MAX
            ),
        ),
    ];
    let failed = [
        (
            "huge-get",
            format!("limit: kv.get key is {huge} bytes, the limit is 256"),
        ),
        (
            "huge-delete",
            format!("limit: kv.delete key is {huge} bytes, the limit is 256"),
        ),
        (
            "huge-config",
            format!("limit: config.get key is {huge} bytes, the limit is 256"),
        ),
        (
            "many-reads",
            "limit: more than 256 distinct kv keys read in one event".to_string(),
        ),
    ];
    let mut wire = Vec::new();
    for (i, (command, answer)) in answered.iter().enumerate() {
        let event = post_all(&bot, &[(c, &format!("huge_ok_{i}"), command)])
            .await?
            .remove(0);
        let bad = outcome(&event, "bad-kv")?;
        let refusal = answer.trim_start_matches("refused: ");
        ensure!(
            bad["outcome"] == "ok" && bad["refused"] == json!([refusal]),
            "{command}: {event}"
        );
        echoed(&event)?;
        wire.push(wire_text(c, answer));
        wire.push(wire_text(c, command));
    }
    for (i, (command, reason)) in failed.iter().enumerate() {
        let event = post_all(&bot, &[(c, &format!("huge_fail_{i}"), command)])
            .await?
            .remove(0);
        let bad = outcome(&event, "bad-kv")?;
        ensure!(
            bad["outcome"] == "failed" && bad["reason"] == reason.as_str(),
            "{command}: expected {reason:?}: {event}"
        );
        echoed(&event)?;
        wire.push(wire_text(c, command));
    }
    fake.settle(wire.len(), TIMEOUT).await?;
    ensure_all_eq(&fake.wire_for(c), &wire, c)
}

/// 200,000 empty `log` calls in one turn become 100 lines of the host's
/// log (the line cap) and one summary line with the count; a 16 MiB
/// message becomes none. The event records how many were dropped.
#[tokio::test]
async fn an_empty_log_flood_is_cut_at_the_line_cap_with_one_summary() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = start_with(
        Digibot::builder().fake(&fake),
        &[
            built(
                "bad-log",
                "hostile_log",
                Some("[limits]\ntimeout_ms = 30000\n"),
            )?,
            echo()?,
        ],
    )
    .await?;
    let c = "conv_log";
    let flood = post_all(&bot, &[(c, "log_flood", "empty 200000")])
        .await?
        .remove(0);
    let huge = post_all(&bot, &[(c, "log_huge", "huge")]).await?.remove(0);
    for (event, dropped) in [(&flood, 199_900), (&huge, 1)] {
        let bad = outcome(event, "bad-log")?;
        ensure!(
            bad["outcome"] == "ok" && bad["logs_dropped"] == dropped,
            "{event}"
        );
        echoed(event)?;
    }
    fake.settle(4, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(c),
        &[
            wire_text(c, "logged"),
            wire_text(c, "empty 200000"),
            wire_text(c, "logged"),
            wire_text(c, "huge"),
        ],
        c,
    )?;
    let logs = bot.logs();
    let of = |event: &str| -> Vec<&str> {
        logs.lines()
            .filter(|l| l.contains(event) && l.contains("plugin=bad-log"))
            .collect()
    };
    let flood_lines = of("log_flood");
    let plugin_lines = flood_lines
        .iter()
        // `plugin: MESSAGE level=..`: an empty message.
        .filter(|l| l.contains("dispatch: plugin:  level="))
        .count();
    let summaries: Vec<&&str> = flood_lines
        .iter()
        .filter(|l| l.contains("plugin log output over its cap was dropped"))
        .collect();
    ensure!(
        plugin_lines == 100 && summaries.len() == 1 && summaries[0].contains("dropped=199900"),
        "{plugin_lines} plugin lines, summaries {summaries:?}"
    );
    let huge_lines = of("log_huge");
    ensure!(
        huge_lines
            .iter()
            .all(|l| !l.contains("xxxxxxxx") && l.len() < 4096),
        "no line carries the huge message"
    );
    Ok(())
}
