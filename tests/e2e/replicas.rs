//! Several digibot replicas on one PostgreSQL database (issue 10): the
//! same webhook delivered to two replicas at once, and a plugin uploaded
//! to one replica serving on another. Every test counts exactly what
//! reached the fake Digishare API.
//!
//! Each needs PostgreSQL (`DIGIBOT_TEST_DATABASE_URL`, set by
//! `scripts/test`): without it a test is skipped loudly, or fails under CI.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::support::burst::*;
use crate::support::durable::{Poster, admin};
use crate::support::pg::fresh_database;
use crate::support::*;

/// How long a dead replica's conversations wait before another replica
/// takes them over (short, so the tests do not wait 30 s).
const LEASE_MS: &str = "2000";

/// Replicas of echo on `database`, sending to `fake`.
fn echo_replicas(fake: &FakeDigishare, database: &str) -> DigibotBuilder {
    Digibot::builder()
        .fake(fake)
        .plugin("echo")
        .retry(5, 200, 30)
        .database(database)
        .env("DIGIBOT_LEASE_MS", LEASE_MS)
}

/// Every fixture, and 40 more customer messages, each delivered to two
/// replicas at the same moment: each pair is answered 200 twice, one
/// `accepted` and one `duplicate`; the shared inbox holds each event once
/// and echo's reply to each customer text reaches Digishare exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_webhook_to_two_replicas_at_once_one_reply() -> Result<()> {
    const MESSAGES: usize = 40;
    let Some(database) = fresh_database("replicas_twice").await? else {
        return Ok(());
    };
    let fake = FakeDigishare::start().await?;
    let bots = echo_replicas(&fake, &database).start_replicas(2).await?;
    let poster = Poster::round_robin(&[&bots[0], &bots[1]])?;

    let mut envelopes: Vec<(String, Value)> = all_fixtures();
    for i in 0..MESSAGES {
        envelopes.push((
            format!("message {i}"),
            customer_text(
                &format!("conv_twice_{i:02}"),
                &format!("msg_twice_{i:02}"),
                &format!("twice {i}"),
            ),
        ));
    }
    let mut tasks = JoinSet::new();
    for (name, envelope) in &envelopes {
        for replica in 0..2 {
            let (poster, name, envelope) = (poster.clone(), name.clone(), envelope.clone());
            tasks.spawn(async move {
                let reply = poster.post_to(replica, &envelope).await?;
                Ok::<_, anyhow::Error>((name, reply))
            });
        }
    }
    let mut answers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while let Some(result) = tasks.join_next().await {
        let (name, reply) = result??;
        ensure!(
            reply.status == 200,
            "{name}: HTTP {}: {}",
            reply.status,
            reply.body
        );
        answers
            .entry(name)
            .or_default()
            .push(reply.json()?["status"].as_str().unwrap_or_default().into());
    }
    for (name, _) in &envelopes {
        let mut got = answers.get(name).cloned().unwrap_or_default();
        got.sort();
        ensure!(got == ["accepted", "duplicate"], "{name}: answers {got:?}");
    }

    let keys: Vec<String> = envelopes.iter().map(|(_, e)| event_key(e)).collect();
    bots[1].wait_handled(&keys, LONG).await?;
    let events = bots[0].events(1000).await?;
    ensure!(
        events.len() == envelopes.len(),
        "the inbox holds {} events for {} webhooks",
        events.len(),
        envelopes.len()
    );
    // Two fixtures are customer texts echo answers, plus the 40 messages.
    let requests = fake.settle(2 + MESSAGES, LONG).await?;
    ensure_api_headers(&requests, API_TOKEN)?;
    for i in 0..MESSAGES {
        let conversation = format!("conv_twice_{i:02}");
        ensure_all_eq(
            &fake.messages_for(&conversation),
            &[json!({
                "conversation_id": conversation,
                "type": "text",
                "body": format!("twice {i}"),
                "send_to_third": true
            })],
            &format!("replies in {conversation}"),
        )?;
    }
    ensure!(
        fake.messages_for("conv_7Hq2Lm9Xa1").len() == 1
            && fake.messages_for("conv_min_01").len() == 1,
        "the fixtures' customer texts were not answered once each:\n{}",
        fake.dump()
    );
    Ok(())
}

/// A plugin uploaded to replica A serves events that arrive at replica B
/// (B has no plugin of its own); a new version uploaded to A replaces it on
/// B; a rollback through B brings the first version back on A; removing it
/// through A stops it on B. `/admin/plugins` on either shows both
/// replicas' breaker state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_uploaded_to_one_replica_serves_on_another() -> Result<()> {
    let Some(database) = fresh_database("replicas_plugins").await? else {
        return Ok(());
    };
    let fake = FakeDigishare::start().await?;
    let bots = Digibot::builder()
        .fake(&fake)
        .retry(5, 200, 30)
        .database(&database)
        .env("DIGIBOT_LEASE_MS", LEASE_MS)
        .start_replicas(2)
        .await?;
    let (a, b) = (&bots[0], &bots[1]);
    let echo = std::fs::read(plugin_wasm("echo"))?;
    let echo_v2 = std::fs::read(plugin_wasm("echo_v2"))?;

    let uploaded = upload(a, "echo", echo).await?;
    let v1 = uploaded["version"]
        .as_str()
        .context("no version")?
        .to_string();
    wait_plugin(b, "echo", Some(&v1)).await?;
    b.accept(&customer_text("conv_plug", "msg_plug_1", "one"))
        .await?;
    fake.wait_for_conversation("conv_plug", 1, TIMEOUT).await?;
    ensure_all_eq(
        &fake.messages_for("conv_plug"),
        &[
            json!({"conversation_id": "conv_plug", "type": "text", "body": "one", "send_to_third": true}),
        ],
        "echo uploaded to A, answering at B",
    )?;

    let uploaded = upload(a, "echo", echo_v2).await?;
    let v2 = uploaded["version"]
        .as_str()
        .context("no version")?
        .to_string();
    wait_plugin(b, "echo", Some(&v2)).await?;
    b.accept(&customer_text("conv_plug", "msg_plug_2", "two"))
        .await?;

    let rolled = admin(b, reqwest::Method::POST, "/admin/plugins/echo/rollback").await?;
    rolled.expect_status(200)?;
    ensure!(rolled.json()?["version"] == v1.as_str(), "{}", rolled.body);
    wait_plugin(a, "echo", Some(&v1)).await?;
    a.accept(&customer_text("conv_plug", "msg_plug_3", "three"))
        .await?;
    let replies = fake.wait_for_conversation("conv_plug", 3, TIMEOUT).await?;
    let bodies: Vec<&Value> = replies.iter().map(|r| &r.body["body"]).collect();
    ensure!(
        bodies == [&json!("one"), &json!("v2: two"), &json!("three")],
        "replies {bodies:?}"
    );

    // Both replicas' breakers, on either replica's admin API.
    let listed = a.admin_get("/admin/plugins").await?.json()?;
    let replicas = listed["plugins"][0]["replicas"]
        .as_array()
        .with_context(|| format!("no replicas in {listed}"))?;
    ensure!(replicas.len() == 2, "replicas {replicas:?}");
    ensure!(
        replicas.iter().all(|r| r["state"] == "active"),
        "{replicas:?}"
    );

    admin(a, reqwest::Method::DELETE, "/admin/plugins/echo")
        .await?
        .expect_status(200)?;
    wait_plugin(b, "echo", None).await?;
    b.accept(&customer_text("conv_plug", "msg_plug_4", "four"))
        .await?;
    fake.assert_quiet(3, SETTLE).await?;
    Ok(())
}

/// `PUT /admin/plugins/NAME` with `bytes`; the answer.
async fn upload(bot: &Digibot, name: &str, bytes: Vec<u8>) -> Result<Value> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client
        .put(format!("{}/admin/plugins/{name}", bot.url()))
        .bearer_auth(ADMIN_TOKEN)
        .body(bytes)
        .send()
        .await?;
    let status = resp.status();
    let body: Value = resp.json().await?;
    ensure!(status == 200, "upload {name}: {status} {body}");
    Ok(body)
}

/// Polls `/admin/plugins` until `name` serves `version` (`None`: until it
/// is gone). Within a second is the promise; a loaded CI machine gets more.
async fn wait_plugin(bot: &Digibot, name: &str, version: Option<&str>) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let listed = bot.admin_get("/admin/plugins").await?.json()?;
        let serving = listed["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["version"].as_str().map(str::to_string));
        if serving.as_deref() == version {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} serves {name} {serving:?}, not {version:?}",
            bot.url()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
