//! Bursts of echo conversations: many conversations posted at once (each
//! one's messages in order, redelivered until acknowledged, as Digishare
//! does), and the exact check of what reached the fake Digishare API:
//! every message its echo, in order per conversation, duplicates returned
//! for the test to explain. Used by the durability and replica tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::digibot::{API_TOKEN, Digibot};
use super::durable::{Poster, outbox_counts};
use super::fake::{FakeDigishare, Recorded};
use super::fixtures::customer_text;
use super::{ensure_api_headers, ensure_json_eq};

/// Long enough for a thousand replies on a loaded 2-core CI machine.
pub const LONG: Duration = Duration::from_secs(180);

/// digibot's default `send_concurrency`: requests to Digishare in flight.
pub const SEND_CONCURRENCY: usize = 32;

pub fn conversation(test: &str, c: usize) -> String {
    format!("conv_{test}_{c:02}")
}

/// The text of message `i` of conversation `c`: it names the message, so a
/// reply body tells which webhook it answers.
pub fn text(test: &str, c: usize, i: usize) -> String {
    format!("{test} c{c:02} m{i:03}")
}

pub fn message(test: &str, c: usize, i: usize) -> Value {
    customer_text(
        &conversation(test, c),
        &format!("msg_{test}_{c:02}_{i:03}"),
        &text(test, c, i),
    )
}

/// The Idempotency-Key digibot gives echo's reply to `message(test, c, i)`.
pub fn reply_key(test: &str, c: usize, i: usize) -> String {
    format!("live_chat.new_message:msg_{test}_{c:02}_{i:03}/echo/0")
}

/// Echo's reply to `message(test, c, i)`, as the fake sees the body.
pub fn reply_body(test: &str, c: usize, i: usize) -> Value {
    json!({
        "conversation_id": conversation(test, c),
        "type": "text",
        "body": text(test, c, i),
        "send_to_third": true
    })
}

/// The successful `POST /v1/messages` the fake received, by Idempotency-Key
/// (each with every copy, in arrival order).
pub fn replies_by_key(fake: &FakeDigishare) -> BTreeMap<String, Vec<Recorded>> {
    let mut by_key: BTreeMap<String, Vec<Recorded>> = BTreeMap::new();
    for r in fake.successful() {
        if r.method == "POST" && r.path == "/v1/messages" {
            by_key
                .entry(r.idempotency_key.clone().unwrap_or_default())
                .or_default()
                .push(r);
        }
    }
    by_key
}

/// Checks that `conversations × per_conversation` messages got exactly
/// their echo (right key, right body) and nothing else arrived, and that
/// each conversation's replies, first copies taken, came in posting order.
/// Returns the keys that arrived more than once.
pub fn check_replies(
    fake: &FakeDigishare,
    test: &str,
    conversations: usize,
    per_conversation: usize,
) -> Result<BTreeMap<String, Vec<Recorded>>> {
    let by_key = replies_by_key(fake);
    let mut expected_keys = HashSet::new();
    for c in 0..conversations {
        for i in 0..per_conversation {
            let key = reply_key(test, c, i);
            let copies = by_key
                .get(&key)
                .with_context(|| format!("no reply for message {i} of conversation {c} ({key})"))?;
            for copy in copies {
                ensure_json_eq(&copy.body, &reply_body(test, c, i), &format!("reply {key}"))?;
                ensure_api_headers(std::slice::from_ref(copy), API_TOKEN)?;
            }
            expected_keys.insert(key);
        }
    }
    for (key, copies) in &by_key {
        ensure!(
            expected_keys.contains(key),
            "unexpected reply {key}: {}",
            copies[0].summary()
        );
    }

    // Order: walk the replies in arrival order; the first copy of each key
    // must be the next message of its conversation.
    let mut seen = HashSet::new();
    let mut next: HashMap<String, usize> = HashMap::new();
    let replies = fake
        .successful()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/messages");
    for r in replies {
        let key = r.idempotency_key.clone().unwrap_or_default();
        if !seen.insert(key) {
            continue;
        }
        let conv = r.conversation_id().unwrap_or_default();
        let c: usize = conv
            .rsplit('_')
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("odd conversation id in {}", r.summary()))?;
        let i = next.entry(conv.clone()).or_insert(0);
        ensure!(
            r.body["body"] == text(test, c, *i),
            "{conv}: reply out of order: expected {:?} next, got {}",
            text(test, c, *i),
            r.summary()
        );
        *i += 1;
    }

    Ok(by_key.into_iter().filter(|(_, v)| v.len() > 1).collect())
}

/// Polls until the fake has a successful reply for `n` distinct keys.
pub async fn wait_distinct_replies(
    fake: &FakeDigishare,
    n: usize,
    timeout: Duration,
) -> Result<()> {
    fake.wait_until(timeout, &format!("{n} distinct replies"), |ok| {
        ok.iter()
            .filter(|r| r.path == "/v1/messages")
            .filter_map(|r| r.idempotency_key.as_deref())
            .collect::<HashSet<_>>()
            .len()
            >= n
    })
    .await?;
    Ok(())
}

/// Polls /admin/outbox until it is exactly `expected`.
pub async fn wait_outbox(bot: &Digibot, expected: Value) -> Result<()> {
    let deadline = Instant::now() + LONG;
    loop {
        let counts = outbox_counts(bot).await?;
        if counts == expected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("/admin/outbox is {counts}, expected {expected}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts `per_conversation` messages in each of `conversations`: one task
/// per conversation posting its messages one after the other (so posting
/// order is defined), at most `in_flight` webhooks at once overall. A
/// webhook that gets no 200 is posted again until it does, as Digishare
/// redelivers. Counts acknowledgements in `acked`; each task returns its
/// answers (`accepted` / `duplicate`).
pub fn post_burst(
    poster: &Poster,
    test: &'static str,
    conversations: usize,
    per_conversation: usize,
    in_flight: usize,
    acked: Arc<AtomicUsize>,
) -> JoinSet<Result<Vec<String>>> {
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut tasks = JoinSet::new();
    for c in 0..conversations {
        let poster = poster.clone();
        let permits = permits.clone();
        let acked = acked.clone();
        tasks.spawn(async move {
            let mut answers = Vec::with_capacity(per_conversation);
            for i in 0..per_conversation {
                let _permit = permits.acquire().await?;
                let answer = poster.deliver(&message(test, c, i), LONG).await?;
                acked.fetch_add(1, Ordering::SeqCst);
                answers.push(answer);
            }
            Ok(answers)
        });
    }
    tasks
}

pub async fn join_answers(
    mut tasks: JoinSet<Result<Vec<String>>>,
) -> Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    while let Some(answers) = tasks.join_next().await {
        for answer in answers?? {
            *counts.entry(answer).or_insert(0) += 1;
        }
    }
    Ok(counts)
}
