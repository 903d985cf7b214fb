//! Never lose, never double: kill -9 in the middle of a burst, a flaky
//! Digishare API (500s and 429 with `Retry-After`), every fixture delivered
//! five times at once, and a graceful shutdown with work left to do. Every
//! test counts exactly what reached the fake Digishare API.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::support::burst::*;
use crate::support::durable::{Blackhole, Poster, admin_dead_letters};
use crate::support::*;

/// 1,200 webhooks over 60 conversations, 24 in flight; digibot is killed
/// with SIGKILL once about half are acknowledged and restarted on the same
/// data dir while the poster keeps going (webhooks that got no answer are
/// redelivered, as Digishare does). Every webhook gets exactly its echo,
/// in posting order per conversation.
///
/// Duplicates: a reply Digishare received but whose success digibot had
/// not yet committed when it died is sent again after the restart, with
/// the same Idempotency-Key. Only requests in flight at the kill can be
/// duplicated: a conversation has at most one request in flight (its head
/// of line), and at most `send_concurrency` (32) are in flight at once. So
/// every duplicate is a key seen exactly twice, first before the restart
/// and again after it, at most one per conversation and at most 32.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_burst_loses_nothing() -> Result<()> {
    const TEST: &str = "burst";
    const CONVERSATIONS: usize = 60;
    const PER_CONVERSATION: usize = 20;
    const TOTAL: usize = CONVERSATIONS * PER_CONVERSATION;

    let fake = FakeDigishare::start().await?;
    let mut bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .retry(5, 200, 30)
        .long_deadline()
        .start()
        .await?;
    let poster = Poster::new(&bot)?;
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
    bot.kill9()?;
    let acked_at_kill = acked.load(Ordering::SeqCst);
    // A request the dead process wrote may still sit in the fake's socket
    // buffer: wait until the fake has recorded everything (no new request
    // for 200 ms); from then on, anything it records comes from the new
    // process.
    let mut seen = fake.requests().len();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = fake.requests().len();
        if now == seen {
            break;
        }
        seen = now;
    }
    let replies_at_kill = fake.successful().len();
    let restarted_at = Instant::now();
    bot.restart().await?;

    let answers = join_answers(tasks).await?;
    ensure!(
        answers.values().sum::<usize>() == TOTAL,
        "not every webhook was acknowledged: {answers:?}"
    );
    wait_distinct_replies(&fake, TOTAL, LONG).await?;
    wait_outbox(&bot, json!({"sent": TOTAL})).await?;
    // Nothing else may trickle in.
    let total_requests = fake.successful().len();
    fake.assert_quiet(total_requests, SETTLE).await?;

    let duplicates = check_replies(&fake, TEST, CONVERSATIONS, PER_CONVERSATION)?;
    let mut duplicated_conversations = HashSet::new();
    for (key, copies) in &duplicates {
        ensure!(
            copies.len() == 2,
            "{key} was sent {} times: {:#?}",
            copies.len(),
            copies.iter().map(Recorded::summary).collect::<Vec<_>>()
        );
        ensure!(
            copies[0].received_at < restarted_at && copies[1].received_at > restarted_at,
            "{key} was duplicated without a kill in between: {} / {}",
            copies[0].summary(),
            copies[1].summary()
        );
        ensure!(
            duplicated_conversations.insert(copies[0].conversation_id()),
            "two duplicates in one conversation: only its head of line can be in flight"
        );
    }
    ensure!(
        duplicates.len() <= SEND_CONCURRENCY,
        "{} duplicates, more than could be in flight",
        duplicates.len()
    );
    ensure!(admin_dead_letters(&bot).await?.is_empty(), "dead letters");
    let recovered = bot
        .logs()
        .lines()
        .filter(|l| l.contains("digibot listening"))
        .nth(1)
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "kill -9 after {acked_at_kill} acknowledged webhooks and {replies_at_kill} replies; \
         answers {answers:?}; {} requests for {TOTAL} replies, {} duplicates; restart: {recovered}",
        total_requests,
        duplicates.len(),
    );
    Ok(())
}

/// 20 conversations × 10 messages against an API that answers 500 to a
/// (seeded) 30% of calls, plus two bursts of 429 with `Retry-After: 1`:
/// every reply arrives exactly once and in order; a request answered 429
/// is not retried before the second has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_api_every_reply_once_and_in_order() -> Result<()> {
    const TEST: &str = "flaky";
    const CONVERSATIONS: usize = 20;
    const PER_CONVERSATION: usize = 10;
    const TOTAL: usize = CONVERSATIONS * PER_CONVERSATION;
    const BURST: usize = 4;

    let fake = FakeDigishare::start().await?;
    fake.fail_fraction(Some((7, 0.3, 500)));
    fake.script(vec![Scripted::status(429).retry_after(1); BURST]);
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .retry(5, 200, 30)
        .long_deadline()
        .start()
        .await?;
    let poster = Poster::new(&bot)?;
    let acked = Arc::new(AtomicUsize::new(0));
    let tasks = post_burst(
        &poster,
        TEST,
        CONVERSATIONS,
        PER_CONVERSATION,
        CONVERSATIONS,
        acked,
    );
    // A second burst of 429s half-way through.
    wait_distinct_replies(&fake, TOTAL / 2, LONG).await?;
    fake.script(vec![Scripted::status(429).retry_after(1); BURST]);

    let answers = join_answers(tasks).await?;
    ensure!(
        answers == BTreeMap::from([("accepted".to_string(), TOTAL)]),
        "{answers:?}"
    );
    wait_distinct_replies(&fake, TOTAL, LONG).await?;
    wait_outbox(&bot, json!({"sent": TOTAL})).await?;
    fake.assert_quiet(TOTAL, SETTLE).await?;
    let duplicates = check_replies(&fake, TEST, CONVERSATIONS, PER_CONVERSATION)?;
    ensure!(
        duplicates.is_empty(),
        "replies sent twice: {:?}",
        duplicates.keys()
    );

    let requests = fake.requests();
    let failed_500 = requests.iter().filter(|r| r.status == 500).count();
    let rate_limited: Vec<&Recorded> = requests.iter().filter(|r| r.status == 429).collect();
    ensure!(
        rate_limited.len() == 2 * BURST,
        "expected {} 429s, the fake answered {}",
        2 * BURST,
        rate_limited.len()
    );
    ensure!(failed_500 >= TOTAL / 10, "only {failed_500} injected 500s");
    ensure!(
        requests.len() == TOTAL + failed_500 + rate_limited.len(),
        "requests other than replies, 500s and 429s:\n{}",
        fake.dump()
    );
    // Retry-After: the next attempt of a rate-limited request comes at
    // least a second later (less a little for clock granularity: digibot
    // schedules on the wall clock in milliseconds).
    for limited in rate_limited {
        let next = requests
            .iter()
            .find(|r| r.seq > limited.seq && r.idempotency_key == limited.idempotency_key)
            .with_context(|| format!("no retry after {}", limited.summary()))?;
        let gap = next.received_at - limited.received_at;
        ensure!(
            gap >= Duration::from_millis(950),
            "retried {gap:?} after a 429 with Retry-After: 1: {} then {}",
            limited.summary(),
            next.summary()
        );
    }
    ensure!(admin_dead_letters(&bot).await?.is_empty(), "dead letters");
    eprintln!(
        "{} requests for {TOTAL} replies: {failed_500} answered 500, {} answered 429",
        requests.len(),
        2 * BURST
    );
    Ok(())
}

/// Every fixture delivered five times at once (75 concurrent webhooks):
/// each delivery is answered 200, one `accepted` and four `duplicate` per
/// fixture; the inbox holds each event once; echo answers the two customer
/// texts exactly once and nothing else causes a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fixture_five_times_concurrently_replies_once() -> Result<()> {
    const COPIES: usize = 5;
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .retry(5, 200, 30)
        .long_deadline()
        .start()
        .await?;
    let poster = Poster::new(&bot)?;
    // The agent's message and the archiving change who is in charge of
    // their conversation, and posted all at once they would land before or
    // after the customer's text: they go to a conversation of their own.
    let fixtures: Vec<(String, Value)> = all_fixtures()
        .into_iter()
        .map(|(name, mut envelope)| {
            match name.as_str() {
                "message_agent" => {
                    envelope["data"]["data"]["conversation_id"] = json!("conv_dur_agent")
                }
                "conversation_archived" => {
                    envelope["data"]["conversation_id"] = json!("conv_dur_agent")
                }
                _ => {}
            }
            (name, envelope)
        })
        .collect();
    ensure!(fixtures.len() >= 15, "fixtures missing");

    let mut tasks = JoinSet::new();
    for (name, envelope) in &fixtures {
        for _ in 0..COPIES {
            let (poster, name, envelope) = (poster.clone(), name.clone(), envelope.clone());
            tasks.spawn(async move {
                let reply = poster.post(&envelope).await?;
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
        let json = reply.json()?;
        let envelope = &fixtures.iter().find(|(n, _)| *n == name).unwrap().1;
        ensure!(
            json["event_id"] == event_key(envelope),
            "{name}: answered {json}"
        );
        answers
            .entry(name)
            .or_default()
            .push(json["status"].as_str().unwrap_or_default().to_string());
    }
    for (name, _) in &fixtures {
        let mut got = answers.get(name).cloned().unwrap_or_default();
        got.sort();
        let mut expected = vec!["duplicate".to_string(); COPIES - 1];
        expected.insert(0, "accepted".to_string());
        ensure!(got == expected, "{name}: answers {got:?}");
    }

    let keys: Vec<String> = fixtures.iter().map(|(_, e)| event_key(e)).collect();
    bot.wait_handled(&keys, TIMEOUT).await?;
    let events = bot.events(1000).await?;
    ensure!(
        events.len() == fixtures.len(),
        "the inbox holds {} events for {} fixtures",
        events.len(),
        fixtures.len()
    );

    let requests = fake.settle(2, TIMEOUT).await?;
    ensure_api_headers(&requests, API_TOKEN)?;
    ensure_all_eq(
        &fake.messages_for("conv_7Hq2Lm9Xa1"),
        &[json!({
            "conversation_id": "conv_7Hq2Lm9Xa1",
            "type": "text",
            "body": "Bonjour, je voudrais suivre ma commande",
            "send_to_third": true
        })],
        "replies to message_text_customer",
    )?;
    ensure_all_eq(
        &fake.messages_for("conv_min_01"),
        &[json!({
            "conversation_id": "conv_min_01",
            "type": "text",
            "body": "/info",
            "send_to_third": true
        })],
        "replies to message_text_minimal",
    )?;
    Ok(())
}

/// SIGTERM while replies hang in flight (the API accepts connections and
/// never answers), more are queued, and webhooks are still arriving:
/// digibot stops accepting, waits at most its grace period (2 s here; the
/// hung requests would take 120 s) and exits 0. Restarted against a
/// working API, it delivers every acknowledged webhook's reply exactly
/// once (the hung requests never reached Digishare, so none is doubled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_within_grace_and_restart_delivers_the_rest() -> Result<()> {
    const TEST: &str = "term";
    const CONVERSATIONS: usize = 10;
    const PER_CONVERSATION: usize = 20;
    const TOTAL: usize = CONVERSATIONS * PER_CONVERSATION;

    let fake = FakeDigishare::start().await?;
    let hole = Blackhole::start().await?;
    let mut bot = Digibot::builder()
        .api_base(&hole.url())
        .api_token(API_TOKEN)
        .plugin("echo")
        .retry(5, 200, 30)
        .long_deadline()
        .env("DIGIBOT_SHUTDOWN_GRACE_SECS", "2")
        .env("DIGIBOT_REQUEST_TIMEOUT_MS", "120000")
        .start()
        .await?;
    let poster = Poster::new(&bot)?;
    let acked = Arc::new(AtomicUsize::new(0));
    let tasks = post_burst(
        &poster,
        TEST,
        CONVERSATIONS,
        PER_CONVERSATION,
        8,
        acked.clone(),
    );

    // Replies are hanging and about half the webhooks are in: stop.
    let deadline = Instant::now() + LONG;
    while hole.hanging() == 0 || acked.load(Ordering::SeqCst) < TOTAL / 2 {
        ensure!(
            Instant::now() < deadline,
            "no reply in flight / burst stalled"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    bot.sigterm()?;
    let status = bot.wait_exit(Duration::from_secs(60)).await?;
    ensure!(
        status.code() == Some(0),
        "digibot exited with {status} after SIGTERM"
    );
    let logs = bot.logs();
    ensure!(
        logs.contains("unfinished work resumes at the next start"),
        "no shutdown message in the log"
    );
    ensure!(
        fake.requests().is_empty(),
        "nothing can have reached the real API yet"
    );

    hole.forward_to(fake.addr());
    bot.restart().await?;
    let answers = join_answers(tasks).await?;
    ensure!(
        answers.values().sum::<usize>() == TOTAL,
        "not every webhook was acknowledged: {answers:?}"
    );
    wait_distinct_replies(&fake, TOTAL, LONG).await?;
    wait_outbox(&bot, json!({"sent": TOTAL})).await?;
    fake.assert_quiet(TOTAL, SETTLE).await?;
    let duplicates = check_replies(&fake, TEST, CONVERSATIONS, PER_CONVERSATION)?;
    ensure!(
        duplicates.is_empty(),
        "replies sent twice: {:?}",
        duplicates.keys()
    );
    eprintln!(
        "SIGTERM with {} requests hanging; answers {answers:?}",
        hole.hanging()
    );
    Ok(())
}
