//! Several digibot replicas on one PostgreSQL database (issue 10): a
//! burst spread round-robin over three replicas with one killed by -9, the
//! same webhook delivered to two replicas at once, a plugin uploaded to one
//! replica serving on another, and the database stopped under load. And
//! how a replica reaches the database (issue 15): over TLS verified
//! against the cluster's CA (`sslmode=verify-full`, the URL
//! `scripts/pg-cluster` gives), refusing a plaintext-only server with
//! `sslmode=require`, and answering 503 within its timeouts when the
//! database hangs or stops answering. Every test counts exactly what
//! reached the fake Digishare API.
//!
//! Each needs PostgreSQL (`DIGIBOT_TEST_DATABASE_URL`, set by
//! `scripts/test`): without it a test is skipped loudly, or fails under CI.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::support::burst::*;
use crate::support::durable::{Poster, admin, admin_dead_letters};
use crate::support::pg::{
    FreezableProxy, OwnCluster, fresh_database, host_port, psql_exec, with_host_port, with_param,
};
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
        .long_deadline()
        .database(database)
        .env("DIGIBOT_LEASE_MS", LEASE_MS)
}

/// Checks the duplicates [`check_replies`] returned: each is a reply the
/// killed (or cut off) side had sent but not yet recorded as sent, sent
/// again once its claim ran out: exactly two copies, the first before
/// `cut` (plus the time a request the dead process wrote may sit in the
/// fake's socket), the second after it; at most one per conversation (only
/// a conversation's head of line is in flight) and at most `SEND_CONCURRENCY`
/// per replica cut.
fn explain_duplicates(
    duplicates: &BTreeMap<String, Vec<Recorded>>,
    cut: Instant,
    replicas_cut: usize,
) -> Result<()> {
    let mut conversations = HashSet::new();
    for (key, copies) in duplicates {
        ensure!(
            copies.len() == 2,
            "{key} was sent {} times: {:#?}",
            copies.len(),
            copies.iter().map(Recorded::summary).collect::<Vec<_>>()
        );
        ensure!(
            copies[0].received_at < cut + Duration::from_secs(1) && copies[1].received_at > cut,
            "{key} was duplicated without a cut in between: {} / {}",
            copies[0].summary(),
            copies[1].summary()
        );
        ensure!(
            conversations.insert(copies[0].conversation_id()),
            "two duplicates in one conversation: only its head of line can be in flight"
        );
    }
    ensure!(
        duplicates.len() <= SEND_CONCURRENCY * replicas_cut,
        "{} duplicates, more than could be in flight",
        duplicates.len()
    );
    Ok(())
}

/// Three replicas on one database; 1,200 webhooks over 60 conversations,
/// posted round-robin over the three (24 in flight; a webhook that gets no
/// 200 is redelivered to the next replica, as Digishare retries through
/// the load balancer). Once about half are acknowledged, replica 3 is
/// killed with SIGKILL and not restarted. Every acknowledged webhook gets
/// exactly its echo, in posting order within each conversation; the
/// conversations the dead replica held are taken over when its leases
/// expire.
///
/// Duplicates: replies the killed replica had sent and not yet recorded
/// as sent are sent again by a survivor with the same Idempotency-Key once
/// the claim expires (see [`explain_duplicates`]). Acknowledged webhooks
/// answered `duplicate` are redeliveries of ones the killed replica had
/// committed but whose answer was lost with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_kill9_mid_burst_every_reply_once_in_order() -> Result<()> {
    const TEST: &str = "repl";
    const CONVERSATIONS: usize = 60;
    const PER_CONVERSATION: usize = 20;
    const TOTAL: usize = CONVERSATIONS * PER_CONVERSATION;
    let Some(database) = fresh_database("replicas_burst").await? else {
        return Ok(());
    };

    let fake = FakeDigishare::start().await?;
    let mut bots = echo_replicas(&fake, &database).start_replicas(3).await?;
    let poster = Poster::round_robin(&bots.iter().collect::<Vec<_>>())?;
    let acked = Arc::new(AtomicUsize::new(0));
    let tasks = post_burst(
        &poster,
        TEST,
        CONVERSATIONS,
        PER_CONVERSATION,
        24,
        acked.clone(),
    );

    let deadline = Instant::now() + LONG;
    while acked.load(Ordering::SeqCst) < TOTAL / 2 {
        ensure!(Instant::now() < deadline, "the burst stalled before half");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bots[2].kill9()?;
    let killed_at = Instant::now();
    let acked_at_kill = acked.load(Ordering::SeqCst);
    let replies_at_kill = fake.successful().len();

    let answers = join_answers(tasks).await?;
    ensure!(
        answers.values().sum::<usize>() == TOTAL,
        "not every webhook was acknowledged: {answers:?}"
    );
    wait_distinct_replies(&fake, TOTAL, LONG).await?;
    wait_outbox(&bots[0], json!({"sent": TOTAL})).await?;
    let total_requests = fake.successful().len();
    fake.assert_quiet(total_requests, SETTLE).await?;

    let duplicates = check_replies(&fake, TEST, CONVERSATIONS, PER_CONVERSATION)?;
    explain_duplicates(&duplicates, killed_at, 1)?;
    // The survivors' admin APIs see the whole cluster: every event handled.
    for bot in &bots[..2] {
        let events = bot.events(TOTAL + 10).await?;
        ensure!(
            events.len() == TOTAL,
            "{} sees {} events, not {TOTAL}",
            bot.url(),
            events.len()
        );
        ensure!(
            events.iter().all(|e| e["status"] != "pending"),
            "events left pending"
        );
        ensure!(admin_dead_letters(bot).await?.is_empty(), "dead letters");
    }
    eprintln!(
        "kill -9 of replica 3 after {acked_at_kill} acknowledged webhooks and {replies_at_kill} \
         replies; answers {answers:?}; {total_requests} requests for {TOTAL} replies, {} duplicates",
        duplicates.len(),
    );
    Ok(())
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

    // As in the durability test: the agent's message and the archiving
    // change who is in charge, so they get a conversation of their own.
    let mut envelopes: Vec<(String, Value)> = all_fixtures()
        .into_iter()
        .map(|(name, mut envelope)| {
            match name.as_str() {
                "message_agent" => {
                    envelope["data"]["data"]["conversation_id"] = json!("conv_twice_agent")
                }
                "conversation_archived" => {
                    envelope["data"]["conversation_id"] = json!("conv_twice_agent")
                }
                _ => {}
            }
            (name, envelope)
        })
        .collect();
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

/// The database stopped for a few seconds under load (a cluster of the
/// test's own, so the other tests keep theirs): meanwhile both replicas
/// answer webhooks 503 (so Digishare retries) and `/readyz` 503; once it is
/// back, processing resumes by itself and every acknowledged webhook gets
/// exactly its echo, in order. Webhooks redelivered after a 503 count as
/// new deliveries: nothing answered 200 is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_answers_503_and_resumes() -> Result<()> {
    const TEST: &str = "outage";
    const CONVERSATIONS: usize = 20;
    const PER_CONVERSATION: usize = 10;
    const TOTAL: usize = CONVERSATIONS * PER_CONVERSATION;
    let Some(cluster) = OwnCluster::start("outage").await? else {
        return Ok(());
    };
    let database = cluster.database("replicas_outage").await?;
    let fake = FakeDigishare::start().await?;
    // The default lease (30 s), longer than the outage: each replica keeps
    // its conversations through it, as in production.
    let bots = echo_replicas(&fake, &database)
        .env_remove("DIGIBOT_LEASE_MS")
        .start_replicas(2)
        .await?;
    for bot in &bots {
        bot.get("/readyz").await?.expect_status(200)?;
    }
    let poster = Poster::round_robin(&[&bots[0], &bots[1]])?;
    let acked = Arc::new(AtomicUsize::new(0));
    let tasks = post_burst(
        &poster,
        TEST,
        CONVERSATIONS,
        PER_CONVERSATION,
        8,
        acked.clone(),
    );
    let deadline = Instant::now() + LONG;
    while acked.load(Ordering::SeqCst) < TOTAL / 4 {
        ensure!(Instant::now() < deadline, "the burst stalled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    cluster.stop().await?;
    let stopped_at = Instant::now();
    let acked_at_stop = acked.load(Ordering::SeqCst);
    // Each replica: a new webhook gets 503, and /readyz says not ready.
    let probe = customer_text("conv_outage_probe", "msg_outage_probe", "probe");
    for (i, bot) in bots.iter().enumerate() {
        let reply = poster.post_to(i, &probe).await?;
        ensure!(
            reply.status == 503,
            "replica {i} answered {} while the database was down: {}",
            reply.status,
            reply.body
        );
        // /readyz keeps its answer for a second: the last "ok" may still
        // be served just after the stop, never past the second.
        let asked = Instant::now();
        let ready = loop {
            let ready = bot.get("/readyz").await?;
            if ready.status == 503 || asked.elapsed() > Duration::from_millis(1500) {
                break ready;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        ensure!(
            ready.status == 503,
            "replica {i} ready without a database: {}",
            ready.body
        );
    }
    let acked_during = acked.load(Ordering::SeqCst) - acked_at_stop;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        acked.load(Ordering::SeqCst) == acked_at_stop,
        "webhooks acknowledged while the database was down"
    );
    cluster.restart().await?;
    let restarted_at = Instant::now();

    let answers = join_answers(tasks).await?;
    ensure!(
        answers.values().sum::<usize>() == TOTAL,
        "not every webhook was acknowledged: {answers:?}"
    );
    wait_distinct_replies(&fake, TOTAL, LONG).await?;
    wait_outbox(&bots[1], json!({"sent": TOTAL})).await?;
    let total_requests = fake.successful().len();
    fake.assert_quiet(total_requests, SETTLE).await?;
    let duplicates = check_replies(&fake, TEST, CONVERSATIONS, PER_CONVERSATION)?;
    // A reply sent while its success could not be recorded is sent again.
    explain_duplicates(&duplicates, stopped_at, 2)?;
    let probe_reply = poster.post_to(0, &probe).await?;
    probe_reply.expect_status(200)?;
    for (i, bot) in bots.iter().enumerate() {
        let ready = bot.get("/readyz").await?;
        ensure!(ready.status == 200, "replica {i} not ready: {}", ready.body);
        ensure!(admin_dead_letters(bot).await?.is_empty(), "dead letters");
    }
    eprintln!(
        "database stopped after {acked_at_stop} acknowledged webhooks ({acked_during} more acknowledged \
         before the stop took effect), back after {:?}; answers {answers:?}; {total_requests} requests \
         for {TOTAL} replies, {} duplicates",
        restarted_at - stopped_at,
        duplicates.len()
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
        .long_deadline()
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
    // Answered before the rollback, else a loaded machine may run the
    // turn after it, on v1.
    fake.wait_for_conversation("conv_plug", 2, TIMEOUT).await?;

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

/// The digibot sessions on `database` (by `application_name`): how many,
/// and how many of them are not encrypted.
async fn digibot_sessions(database: &str) -> Result<(usize, usize)> {
    let out = psql_exec(
        database,
        &["SELECT count(*), count(*) FILTER (WHERE NOT s.ssl)
           FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
           WHERE a.datname = current_database() AND a.application_name = 'digibot'"],
    )
    .await?;
    let (all, plain) = out
        .split_once('|')
        .with_context(|| format!("psql printed {out:?}"))?;
    Ok((all.trim().parse()?, plain.trim().parse()?))
}

/// Two replicas on the test cluster's URL, which asks for
/// `sslmode=verify-full` against the cluster's own CA: they start, echo
/// answers through both, and every session digibot holds (the pools and
/// the listeners) is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reach_postgres_over_tls_verified_against_its_ca() -> Result<()> {
    let Some(database) = fresh_database("replicas_tls").await? else {
        return Ok(());
    };
    ensure!(
        database.contains("sslmode=verify-full") && database.contains("sslrootcert="),
        "the test cluster's URL does not verify TLS: {database} (restart it with scripts/pg-cluster)"
    );
    let fake = FakeDigishare::start().await?;
    let bots = echo_replicas(&fake, &database).start_replicas(2).await?;
    for (i, bot) in bots.iter().enumerate() {
        bot.accept(&customer_text(
            &format!("conv_tls_{i}"),
            &format!("msg_tls_{i}"),
            &format!("tls {i}"),
        ))
        .await?;
    }
    for i in 0..2 {
        let replies = fake
            .wait_for_conversation(&format!("conv_tls_{i}"), 1, TIMEOUT)
            .await?;
        ensure!(replies[0].body["body"] == format!("tls {i}"), "{replies:?}");
    }
    let (sessions, plaintext) = digibot_sessions(&database).await?;
    // Each replica: its listener and at least one pooled connection.
    ensure!(sessions >= 4, "{sessions} digibot sessions");
    ensure!(
        plaintext == 0,
        "{plaintext} of {sessions} sessions in plaintext"
    );
    fake.assert_quiet(2, SETTLE).await?;
    Ok(())
}

/// A server that offers no TLS (a cluster started with `ssl=off`):
/// with `sslmode=require` digibot refuses it and exits saying why, having
/// sent nothing in the clear; with `sslmode=prefer` it falls back to
/// plaintext, as libpq does, and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_refuses_a_plaintext_only_server() -> Result<()> {
    let Some(cluster) = OwnCluster::start_plaintext("plaintext").await? else {
        return Ok(());
    };
    let database = cluster.database("replicas_plaintext").await?;
    let fake = FakeDigishare::start().await?;

    let mut refused = echo_replicas(&fake, &with_param(&database, "sslmode", "require")).spawn()?;
    let status = refused.wait_exit(Duration::from_secs(30)).await?;
    ensure!(
        !status.success(),
        "digibot started on a plaintext server with sslmode=require"
    );
    let logs = refused.logs();
    ensure!(
        logs.contains("server does not support TLS"),
        "no reason given:\n{logs}"
    );
    // Nothing reached the database: no migration ran.
    let tables = psql_exec(
        &database,
        &["SELECT count(*) FROM pg_tables WHERE tablename = 'digibot_migrations'"],
    )
    .await?;
    ensure!(tables == "0", "migrated over plaintext: {tables}");

    let preferring = echo_replicas(&fake, &with_param(&database, "sslmode", "prefer"))
        .start()
        .await?;
    preferring
        .accept(&customer_text("conv_plain", "msg_plain", "in the clear"))
        .await?;
    fake.wait_for_conversation("conv_plain", 1, TIMEOUT).await?;
    let (sessions, plaintext) = digibot_sessions(&database).await?;
    ensure!(
        sessions > 0 && plaintext == sessions,
        "{plaintext} of {sessions}"
    );
    Ok(())
}

/// The `events` table locked by another session for longer than the
/// statement timeout (1 s here): the webhook's insert waits for the lock
/// until PostgreSQL cancels it, and the webhook is answered 503 after
/// about a second instead of stalling; once the lock is gone the same
/// webhook is accepted and echoed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_the_timeout_answers_503_not_a_stall() -> Result<()> {
    let Some(database) = fresh_database("replicas_locked").await? else {
        return Ok(());
    };
    let fake = FakeDigishare::start().await?;
    let bot = echo_replicas(&fake, &database)
        .env("DIGIBOT_DATABASE_STATEMENT_TIMEOUT_MS", "1000")
        .start()
        .await?;
    bot.accept(&customer_text("conv_locked", "msg_locked_1", "before"))
        .await?;
    fake.wait_for_conversation("conv_locked", 1, TIMEOUT)
        .await?;
    wait_outbox(&bot, json!({"sent": 1})).await?;

    let locker = {
        let database = database.clone();
        tokio::spawn(async move {
            psql_exec(
                &database,
                &["BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(6); COMMIT;"],
            )
            .await
        })
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let held = psql_exec(
            &database,
            &[
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
               WHERE c.relname = 'events' AND l.mode = 'AccessExclusiveLock' AND l.granted",
            ],
        )
        .await?;
        if held == "1" {
            break;
        }
        ensure!(Instant::now() < deadline, "the lock was never taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let blocked = customer_text("conv_locked", "msg_locked_2", "during");
    let started = Instant::now();
    let reply = bot.post_json(&blocked).await?;
    let waited = started.elapsed();
    ensure!(
        reply.status == 503,
        "answered {} while the table was locked: {}",
        reply.status,
        reply.body
    );
    ensure!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "answered after {waited:?}, not at the 1 s statement timeout"
    );
    ensure!(
        bot.logs().contains("database busy"),
        "the 503 is not logged as a timeout"
    );

    locker.await??;
    let reply = bot.post_json(&blocked).await?;
    reply.expect_status(200)?;
    let replies = fake
        .wait_for_conversation("conv_locked", 2, TIMEOUT)
        .await?;
    let bodies: Vec<&Value> = replies.iter().map(|r| &r.body["body"]).collect();
    ensure!(bodies == [&json!("before"), &json!("during")], "{bodies:?}");
    fake.assert_quiet(2, SETTLE).await?;
    Ok(())
}

/// The database host stops answering altogether (a proxy in front of
/// PostgreSQL that holds every byte, like a partition: no error, no
/// reset, so the server's own statement timeout cannot help): a webhook is
/// answered 503 within the client-side deadline (statement timeout 1 s +
/// 1 s) and `/readyz` 503 within its 2 s; once the host answers again,
/// the webhook redelivered is acknowledged and echoed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_answers_503_within_the_deadline() -> Result<()> {
    let Some(database) = fresh_database("replicas_frozen").await? else {
        return Ok(());
    };
    let proxy = FreezableProxy::start(&host_port(&database)?).await?;
    // TLS end to end through the proxy (same address as the certificate's),
    // and a bound on a new connection's startup.
    let through = with_param(
        &with_host_port(&database, &proxy.addr)?,
        "connect_timeout",
        "1",
    );
    let fake = FakeDigishare::start().await?;
    let bot = echo_replicas(&fake, &through)
        .env("DIGIBOT_DATABASE_STATEMENT_TIMEOUT_MS", "1000")
        .env("DIGIBOT_DATABASE_ACQUIRE_TIMEOUT_MS", "1000")
        .start()
        .await?;
    bot.accept(&customer_text("conv_frozen", "msg_frozen_1", "before"))
        .await?;
    fake.wait_for_conversation("conv_frozen", 1, TIMEOUT)
        .await?;
    // Its delivery recorded too: a reply whose success cannot be recorded
    // is sent again (same Idempotency-Key), which is not this test's point.
    wait_outbox(&bot, json!({"sent": 1})).await?;

    proxy.freeze();
    let stuck = customer_text("conv_frozen", "msg_frozen_2", "during");
    let started = Instant::now();
    let reply = bot.post_json(&stuck).await?;
    let waited = started.elapsed();
    ensure!(
        reply.status == 503,
        "answered {} with the database silent: {}",
        reply.status,
        reply.body
    );
    ensure!(
        waited < Duration::from_secs(4),
        "answered after {waited:?}, past the 2 s deadline"
    );
    let started = Instant::now();
    let ready = bot.get("/readyz").await?;
    ensure!(
        ready.status == 503,
        "ready with a silent database: {}",
        ready.body
    );
    ensure!(
        started.elapsed() < Duration::from_secs(4),
        "/readyz took {:?}",
        started.elapsed()
    );

    proxy.thaw();
    // Digishare redelivers until it gets a 200. The first attempt's insert
    // may have reached the database late (the proxy held it): then the
    // redelivery is a duplicate, and the event is still handled once.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let reply = bot.post_json(&stuck).await?;
        if reply.status == 200 {
            break;
        }
        ensure!(
            reply.status == 503 && Instant::now() < deadline,
            "after the thaw: {} {}",
            reply.status,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let replies = fake
        .wait_for_conversation("conv_frozen", 2, TIMEOUT)
        .await?;
    let bodies: Vec<&Value> = replies.iter().map(|r| &r.body["body"]).collect();
    ensure!(bodies == [&json!("before"), &json!("during")], "{bodies:?}");
    fake.assert_quiet(2, SETTLE).await?;
    let deadline = Instant::now() + TIMEOUT;
    while bot.get("/readyz").await?.status != 200 {
        ensure!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
