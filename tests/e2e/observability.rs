//! What an operator sees: `/metrics` after a scripted conversation (exact
//! values of every metric), JSON logs whose span fields tie each line to
//! its event, conversation and plugin, and the health endpoints.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::support::*;

const C: &str = "conv_obs_1";
/// Concierge's answer to "agent"; the fake refuses it (400): a dead letter.
const HAND_OFF_TEXT: &str = "Je vous passe un conseiller, un instant.";

/// `/metrics` as `series -> value`, where a series is written as in the
/// exposition (`name{a="x",b="y"}` or `name`). Fails on a malformed line.
fn parse_metrics(text: &str) -> Result<BTreeMap<String, f64>> {
    let mut series = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("metric line without a value: {line:?}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?,
        };
        ensure!(
            series.insert(name.to_string(), value).is_none(),
            "series {name} twice"
        );
    }
    Ok(series)
}

pub(crate) async fn scrape(bot: &Digibot) -> Result<BTreeMap<String, f64>> {
    let reply = bot.admin_get("/metrics").await?;
    reply.expect_status(200)?;
    ensure!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "content type {:?}",
        reply.header("content-type")
    );
    parse_metrics(&reply.body)
}

/// Every `(series, value)` in `expected` is in `metrics` with that value;
/// lists all the differences at once.
pub(crate) fn ensure_metrics(
    metrics: &BTreeMap<String, f64>,
    expected: &[(String, f64)],
) -> Result<()> {
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(series, value)| metrics.get(series) != Some(value))
        .map(|(series, value)| format!("{series}: expected {value}, got {:?}", metrics.get(series)))
        .collect();
    if !wrong.is_empty() {
        bail!(
            "metrics differ:\n  {}\n--- /metrics:\n{metrics:#?}",
            wrong.join("\n  ")
        );
    }
    Ok(())
}

pub(crate) fn series(s: &str, value: f64) -> (String, f64) {
    (s.to_string(), value)
}

/// Posts one plugin-invoking webhook and waits until it is handled, so the
/// conversation's events run (and its replies go out) in script order.
async fn step(bot: &Digibot, body: &Value) -> Result<String> {
    let key = bot.accept(body).await?;
    bot.wait_handled(std::slice::from_ref(&key), TIMEOUT)
        .await?;
    Ok(key)
}

/// A scripted conversation with concierge and a plugin that always fails
/// (quarantined after its third failure), every kind of webhook outcome,
/// a 500 from Digishare (one retry) and a 400 (one dead letter); then every
/// metric has exactly the value the script implies, and the API counts
/// match what the fake received.
#[tokio::test]
async fn metrics_after_a_scripted_conversation() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    // The first request (concierge's welcome buttons) fails once.
    fake.script([Scripted::status(500)]);
    fake.reject_when(|body| body["body"] == HAND_OFF_TEXT);
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("concierge")
        .plugin("hostile_trap")
        .env("DIGIBOT_BREAKER_FAILURES", "3")
        .env("DIGIBOT_BREAKER_COOLDOWN_SECS", "3600")
        .max_bytes(4096)
        .start()
        .await?;

    // Before anything: every outcome is there, at 0, and the gauges too.
    let before = scrape(&bot).await?;
    ensure_metrics(
        &before,
        &[
            series(r#"digibot_webhooks_total{outcome="accepted"}"#, 0.0),
            series(r#"digibot_webhooks_total{outcome="too_large"}"#, 0.0),
            series("digibot_outbox_depth", 0.0),
            series("digibot_dead_letters", 0.0),
            series("digibot_api_retries_total", 0.0),
        ],
    )?;

    // hostile_trap: an error on the new conversation, a trap on each
    // message; its third failure quarantines it for an hour.
    let mut keys = vec![step(&bot, &new_conversation(C, "Salma")).await?];
    let hello = customer_text(C, "obs_m1", "bonjour");
    keys.push(step(&bot, &hello).await?);
    let again = bot.post_json(&hello).await?;
    again.expect_status(200)?;
    ensure!(again.json()?["status"] == "duplicate", "{}", again.body);
    keys.push(step(&bot, &button_reply(C, "obs_m2", "orders", "Mes commandes")).await?);
    keys.push(
        step(
            &bot,
            &list_reply(C, "obs_m3", "invoice", "Recevoir ma facture"),
        )
        .await?,
    );
    keys.push(step(&bot, &customer_text(C, "obs_m4", "agent")).await?);

    // Recorded, but for no plugin.
    let agent = bot
        .post_json(&agent_text(C, "obs_m5", "Bonjour, ici Karim."))
        .await?;
    ensure!(agent.json()?["status"] == "accepted", "{}", agent.body);
    let other = bot.post_fixture("other_event_ticket_created").await?;
    ensure!(other.json()?["status"] == "accepted", "{}", other.body);
    // Refused.
    let body = serde_json::to_vec(&customer_text(C, "obs_m6", "x"))?;
    bot.post_raw(body, &[]).await?.expect_status(401)?;
    let auth = bot.auth_header().context("webhook auth")?;
    let auth = [(auth.0.as_str(), auth.1.as_str())];
    bot.post_raw("{not json", &auth).await?.expect_status(400)?;
    let huge = serde_json::to_vec(&customer_text(C, "obs_m7", &"x".repeat(8000)))?;
    bot.post_raw(huge, &auth).await?.expect_status(413)?;

    bot.wait_idle(&keys, TIMEOUT).await?;

    // What reached the fake: 8 actions, the first twice (500, then ok), the
    // hand-off text refused.
    let requests = fake.requests();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for r in &requests {
        *by_status.entry(r.status).or_default() += 1;
    }
    ensure!(
        requests.len() == 9
            && by_status.get(&500) == Some(&1)
            && by_status.get(&400) == Some(&1)
            && requests.iter().filter(|r| r.ok()).count() == 7,
        "requests at the fake:\n{}",
        fake.dump()
    );

    let metrics = scrape(&bot).await?;
    let mut expected = vec![
        series(r#"digibot_webhooks_total{outcome="accepted"}"#, 5.0),
        series(r#"digibot_webhooks_total{outcome="duplicate"}"#, 1.0),
        series(r#"digibot_webhooks_total{outcome="ignored"}"#, 2.0),
        series(r#"digibot_webhooks_total{outcome="unauthorized"}"#, 1.0),
        series(r#"digibot_webhooks_total{outcome="malformed"}"#, 1.0),
        series(r#"digibot_webhooks_total{outcome="too_large"}"#, 1.0),
        series(r#"digibot_webhooks_total{outcome="unavailable"}"#, 0.0),
        // Concierge ran on all five; hostile_trap on the first three.
        series(
            r#"digibot_plugin_invocation_seconds_count{plugin="concierge"}"#,
            5.0,
        ),
        series(
            r#"digibot_plugin_invocation_seconds_bucket{plugin="concierge",le="+Inf"}"#,
            5.0,
        ),
        series(
            r#"digibot_plugin_invocation_seconds_count{plugin="hostile_trap"}"#,
            3.0,
        ),
        series(
            r#"digibot_plugin_failures_total{plugin="hostile_trap",reason="error"}"#,
            1.0,
        ),
        series(
            r#"digibot_plugin_failures_total{plugin="hostile_trap",reason="trap"}"#,
            2.0,
        ),
        // Welcome buttons; help text; orders list; file and its text; note,
        // hand-off and its text.
        series(r#"digibot_actions_total{kind="buttons"}"#, 1.0),
        series(r#"digibot_actions_total{kind="text"}"#, 3.0),
        series(r#"digibot_actions_total{kind="list"}"#, 1.0),
        series(r#"digibot_actions_total{kind="file"}"#, 1.0),
        series(r#"digibot_actions_total{kind="note"}"#, 1.0),
        series(r#"digibot_actions_total{kind="hand_off"}"#, 1.0),
        series("digibot_api_retries_total", 1.0),
        series("digibot_outbox_depth", 0.0),
        series("digibot_dead_letters", 1.0),
        series(
            r#"digibot_plugin_state{plugin="concierge",state="active"}"#,
            1.0,
        ),
        series(
            r#"digibot_plugin_state{plugin="concierge",state="quarantined"}"#,
            0.0,
        ),
        series(
            r#"digibot_plugin_state{plugin="hostile_trap",state="quarantined"}"#,
            1.0,
        ),
        series(
            r#"digibot_plugin_state{plugin="hostile_trap",state="active"}"#,
            0.0,
        ),
        series(
            r#"digibot_plugin_state{plugin="hostile_trap",state="half_open"}"#,
            0.0,
        ),
    ];
    // The API requests by status, exactly as the fake answered them.
    for (status, n) in &by_status {
        expected.push(series(
            &format!(r#"digibot_api_requests_total{{status="{status}"}}"#),
            *n as f64,
        ));
    }
    ensure_metrics(&metrics, &expected)?;
    let statuses = metrics
        .keys()
        .filter(|s| s.starts_with("digibot_api_requests_total{"))
        .count();
    ensure!(
        statuses == by_status.len(),
        "statuses digibot never got: {metrics:#?}"
    );
    ensure!(
        metrics
            .keys()
            .filter(|s| s.starts_with("digibot_actions_total{"))
            .count()
            == 6,
        "action kinds: {metrics:#?}"
    );
    ensure!(
        metrics
            .keys()
            .any(|s| s.starts_with(r#"digibot_plugin_info{plugin="concierge",version=""#)),
        "no digibot_plugin_info for concierge"
    );
    ensure!(
        metrics[r#"digibot_plugin_invocation_seconds_sum{plugin="concierge"}"#] > 0.0,
        "invocation time sum"
    );

    // Text logs (the default) carry the same spans as a prefix, and
    // RUST_LOG=info (the harness's) leaves the debug lines out.
    let logs = bot.logs();
    let trap_key = &keys[1];
    ensure!(
        logs.lines().any(|l| l.contains("plugin failed")
            && l.contains(&format!("event{{event_id={trap_key} conversation_id={C}"))
            && l.contains("plugin{plugin=hostile_trap")),
        "no `plugin failed` line in the event and plugin spans:\n{logs}"
    );
    ensure!(
        !logs.contains("plugin ran"),
        "a debug line at RUST_LOG=info"
    );

    // No token, no metrics.
    let anonymous = bot.get("/metrics").await?;
    ensure!(
        anonymous.status == 401,
        "GET /metrics without the token: {anonymous:?}"
    );
    Ok(())
}

/// `DIGIBOT_LOG_FORMAT=json`: every line is one JSON object, and the lines
/// about handling a message carry its event id, conversation and plugin in
/// their span fields; the sender's carry the conversation.
#[tokio::test]
async fn json_logs_carry_event_conversation_and_plugin() -> Result<()> {
    const CONV: &str = "conv_obs_json";
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .env("DIGIBOT_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,digibot=debug")
        .start()
        .await?;
    let key = bot
        .accept(&customer_text(CONV, "obs_json_1", "bonjour"))
        .await?;
    fake.wait_for_conversation(CONV, 1, TIMEOUT).await?;

    let lines = |message: &'static str| {
        let key = key.clone();
        move |line: &str| {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                return false;
            };
            let spans = v["spans"].as_array().cloned().unwrap_or_default();
            let in_span = |name: &str, field: &str, value: &str| {
                spans
                    .iter()
                    .any(|s| s["name"] == name && s[field] == json!(value))
            };
            v["fields"]["message"] == message
                && match message {
                    "plugin ran" => {
                        in_span("event", "event_id", &key)
                            && in_span("event", "conversation_id", CONV)
                            && in_span("event", "event", "live_chat.new_message")
                            && in_span("plugin", "plugin", "echo")
                            && v["span"]["name"] == "plugin"
                    }
                    _ => {
                        in_span("send", "conversation_id", CONV)
                            && in_span("send", "plugin", "echo")
                    }
                }
        }
    };
    bot.wait_for_log(
        TIMEOUT,
        "a `plugin ran` line in the event and plugin spans",
        lines("plugin ran"),
    )
    .await?;
    bot.wait_for_log(TIMEOUT, "a `sent` line in the send span", lines("sent"))
        .await?;
    for line in bot.logs().lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("a log line that is not JSON: {line:?}"))?;
        ensure!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "log line without level or timestamp: {line}"
        );
    }
    Ok(())
}

/// An unknown log format is a clear start-up error, not a silent default.
#[tokio::test]
async fn an_unknown_log_format_is_refused() -> Result<()> {
    let mut bot = Digibot::builder()
        .no_api_token()
        .env("DIGIBOT_LOG_FORMAT", "xml")
        .spawn()?;
    let status = bot.wait_exit(TIMEOUT).await?;
    ensure!(status.code() == Some(2), "exit status {status}");
    let logs = bot.logs();
    ensure!(
        logs.contains("DIGIBOT_LOG_FORMAT must be `text` or `json`"),
        "{logs}"
    );
    Ok(())
}

/// `/healthz` and `/readyz` answer without any token; `/readyz` reports
/// the store and the plugins ready once serving.
#[tokio::test]
async fn health_endpoints_need_no_token() -> Result<()> {
    let bot = Digibot::builder()
        .no_api_token()
        .plugin("echo")
        .start()
        .await?;
    let health = bot.get("/healthz").await?;
    ensure!(health.status == 200 && health.body == "ok", "{health:?}");
    let ready = bot.get("/readyz").await?;
    ready.expect_status(200)?;
    ensure_json_eq(
        &ready.json()?,
        &json!({"ready": true, "checks": {"store": "ok", "plugins": "ok"}, "plugins_loaded": 1}),
        "/readyz",
    )?;
    Ok(())
}
