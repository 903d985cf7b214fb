//! Dead letters: a reply Digishare refuses (400) or that runs out of
//! retries is kept, once, with its last status and body; it does not hold
//! up the conversation; operators list, retry and drop it with the
//! `digibot dead-letters` CLI (on the running server's data dir) or the
//! admin API.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use reqwest::Method;
use serde_json::{Value, json};

use crate::support::durable::{admin, admin_dead_letters, cli, cli_dead_letters, outbox_counts};
use crate::support::*;

/// The fake answers 400 to any text that starts with this.
const POISON: &str = "REJECT";

async fn rejecting_fake() -> Result<FakeDigishare> {
    let fake = FakeDigishare::start().await?;
    fake.reject_when(|body| {
        body["body"]
            .as_str()
            .is_some_and(|text| text.starts_with(POISON))
    });
    Ok(fake)
}

async fn echo_bot(fake: &FakeDigishare) -> Result<Digibot> {
    Digibot::builder()
        .fake(fake)
        .plugin("echo")
        .retry(5, 200, 30)
        .start()
        .await
}

fn text_reply(conversation: &str, text: &str) -> Value {
    json!({
        "conversation_id": conversation,
        "type": "text",
        "body": text,
        "send_to_third": true
    })
}

/// Polls /admin/dead-letters until there are `n`.
async fn wait_dead_letters(bot: &Digibot, n: usize) -> Result<Vec<Value>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let letters = admin_dead_letters(bot).await?;
        if letters.len() == n {
            return Ok(letters);
        }
        if Instant::now() >= deadline {
            bail!("expected {n} dead letters, have: {letters:#?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every request the fake received (answered or not) with this text.
fn attempts_with_text(fake: &FakeDigishare, text: &str) -> Vec<Recorded> {
    fake.requests()
        .into_iter()
        .filter(|r| r.body["body"] == text)
        .collect()
}

fn id_of(letter: &Value) -> Result<String> {
    Ok(letter["id"]
        .as_i64()
        .with_context(|| format!("dead letter without an id: {letter}"))?
        .to_string())
}

/// A 400 becomes one dead letter after exactly one attempt; the next reply
/// of the same conversation still goes out; the CLI lists the letter (as
/// the admin API does) and, once the cause is fixed, `dead-letters retry
/// ID` delivers it with the same Idempotency-Key.
#[tokio::test]
async fn rejected_reply_is_one_dead_letter_and_cli_retry_delivers_it() -> Result<()> {
    const C: &str = "conv_dead_1";
    let poison = format!("{POISON} this reply");
    let fake = rejecting_fake().await?;
    let bot = echo_bot(&fake).await?;

    bot.accept(&customer_text(C, "msg_dead_1", &poison)).await?;
    bot.accept(&customer_text(C, "msg_dead_2", "and this one"))
        .await?;
    // The second reply waits for the first to be settled, then goes out:
    // a dead letter does not block its conversation.
    let delivered = fake.wait_for_conversation(C, 1, TIMEOUT).await?;
    ensure_json_eq(
        &delivered[0].body,
        &text_reply(C, "and this one"),
        "the reply after the rejected one",
    )?;

    let letters = cli_dead_letters(&bot.data_dir).await?;
    ensure!(letters.len() == 1, "dead letters: {letters:#?}");
    let letter = &letters[0];
    ensure_json_eq(&letter["body"], &text_reply(C, &poison), "dead letter body")?;
    ensure!(
        letter["status"] == "dead"
            && letter["last_status"] == 400
            && letter["attempts"] == 1
            && letter["conversation_id"] == C
            && letter["plugin"] == "echo"
            && letter["method"] == "POST"
            && letter["path"] == "/v1/messages"
            && letter["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("rejected by the fake")),
        "dead letter fields: {letter:#}"
    );
    let id = id_of(letter)?;
    ensure_json_eq(
        &Value::Array(admin_dead_letters(&bot).await?),
        &Value::Array(letters.clone()),
        "GET /admin/dead-letters against the CLI",
    )?;
    let table = cli(&bot.data_dir, &["dead-letters", "list"]).await?.ok()?;
    let row = table
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{id} ")))
        .with_context(|| format!("no row for {id} in:\n{}", table.stdout))?;
    ensure!(
        row.contains(C) && row.contains("400") && row.contains("/v1/messages"),
        "table row: {row}"
    );

    // No retry loop: one attempt, answered 400, and nothing since.
    let attempts = attempts_with_text(&fake, &poison);
    ensure!(
        attempts.len() == 1 && attempts[0].status == 400,
        "attempts at the rejected reply:\n{}",
        fake.dump()
    );
    fake.assert_quiet(1, SETTLE).await?;
    ensure!(
        attempts_with_text(&fake, &poison).len() == 1,
        "retried a 400"
    );

    // The cause is fixed; the operator retries it from the CLI.
    fake.set_reject_enabled(false);
    let run = cli(&bot.data_dir, &["dead-letters", "retry", &id])
        .await?
        .ok()?;
    ensure!(
        run.stdout.contains("1 dead letter(s)"),
        "retry said: {}",
        run.stdout
    );
    let ok = fake.wait_for_conversation(C, 2, TIMEOUT).await?;
    ensure_json_eq(&ok[1].body, &text_reply(C, &poison), "the retried reply")?;
    ensure!(
        ok[1].idempotency_key == attempts[0].idempotency_key,
        "the retry changed the Idempotency-Key"
    );
    fake.settle(2, TIMEOUT).await?;
    ensure!(cli_dead_letters(&bot.data_dir).await?.is_empty());
    ensure!(admin_dead_letters(&bot).await?.is_empty());
    ensure_json_eq(&outbox_counts(&bot).await?, &json!({"sent": 2}), "outbox")?;
    Ok(())
}

/// `drop ID` deletes a letter for good (it is never sent), `drop`/`retry`
/// of an unknown id fail, and `retry --all` sends every other letter.
#[tokio::test]
async fn cli_drop_and_retry_all() -> Result<()> {
    let fake = rejecting_fake().await?;
    let bot = echo_bot(&fake).await?;
    for c in ["a", "b", "c"] {
        bot.accept(&customer_text(
            &format!("conv_dl_{c}"),
            &format!("msg_dl_{c}"),
            &format!("{POISON} {c}"),
        ))
        .await?;
    }
    let letters = wait_dead_letters(&bot, 3).await?;
    let dropped = letters
        .iter()
        .find(|l| l["conversation_id"] == "conv_dl_a")
        .context("no dead letter for conv_dl_a")?;
    let dropped_id = id_of(dropped)?;

    let run = cli(&bot.data_dir, &["dead-letters", "drop", &dropped_id])
        .await?
        .ok()?;
    ensure!(
        run.stdout
            .contains(&format!("dropped dead letter {dropped_id}")),
        "{}",
        run.stdout
    );
    let left = cli_dead_letters(&bot.data_dir).await?;
    ensure!(
        left.len() == 2 && left.iter().all(|l| l["id"] != dropped["id"]),
        "after drop: {left:#?}"
    );
    let again = cli(&bot.data_dir, &["dead-letters", "drop", &dropped_id]).await?;
    ensure!(
        !again.success && again.stderr.contains("no dead letter"),
        "dropping twice: {again:?}"
    );
    let unknown = cli(&bot.data_dir, &["dead-letters", "retry", "999999"]).await?;
    ensure!(!unknown.success, "retrying an unknown id: {unknown:?}");

    fake.set_reject_enabled(false);
    let run = cli(&bot.data_dir, &["dead-letters", "retry", "--all"])
        .await?
        .ok()?;
    ensure!(run.stdout.contains("2 dead letter(s)"), "{}", run.stdout);
    let sent = fake.settle(2, TIMEOUT).await?;
    let mut bodies: Vec<Value> = sent.iter().map(|r| r.body.clone()).collect();
    bodies.sort_by_key(|b| {
        b["conversation_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    });
    ensure_all_eq(
        &bodies,
        &[
            text_reply("conv_dl_b", &format!("{POISON} b")),
            text_reply("conv_dl_c", &format!("{POISON} c")),
        ],
        "replies after retry --all",
    )?;
    ensure!(cli_dead_letters(&bot.data_dir).await?.is_empty());
    // Three 400s, two deliveries: the dropped one was never sent again.
    ensure!(
        attempts_with_text(&fake, &format!("{POISON} a")).len() == 1,
        "the dropped letter was sent:\n{}",
        fake.dump()
    );
    ensure!(fake.requests().len() == 5, "requests:\n{}", fake.dump());
    Ok(())
}

/// The same operations on the admin API: `DELETE /admin/dead-letters/ID`,
/// `POST /admin/dead-letters/ID/retry`, `POST /admin/dead-letters/retry`;
/// unknown ids are 404; without the admin token, 401.
#[tokio::test]
async fn admin_api_drop_and_retry() -> Result<()> {
    let fake = rejecting_fake().await?;
    let bot = echo_bot(&fake).await?;
    for c in ["d", "e"] {
        bot.accept(&customer_text(
            &format!("conv_dl_{c}"),
            &format!("msg_dl_{c}"),
            &format!("{POISON} {c}"),
        ))
        .await?;
    }
    let letters = wait_dead_letters(&bot, 2).await?;
    let id = |conv: &str| -> Result<String> {
        id_of(
            letters
                .iter()
                .find(|l| l["conversation_id"] == conv)
                .with_context(|| format!("no dead letter for {conv}"))?,
        )
    };
    let (d, e) = (id("conv_dl_d")?, id("conv_dl_e")?);

    let unauthenticated = bot.get("/admin/dead-letters").await?;
    ensure!(unauthenticated.status == 401, "{unauthenticated:?}");

    let dropped = admin(&bot, Method::DELETE, &format!("/admin/dead-letters/{d}")).await?;
    ensure!(dropped.status == 200, "DELETE: {dropped:?}");
    ensure_json_eq(
        &dropped.json()?,
        &json!({"dropped": d.parse::<i64>()?}),
        "DELETE answer",
    )?;
    let again = admin(&bot, Method::DELETE, &format!("/admin/dead-letters/{d}")).await?;
    ensure!(again.status == 404, "DELETE twice: {again:?}");
    let unknown = admin(&bot, Method::POST, "/admin/dead-letters/999999/retry").await?;
    ensure!(unknown.status == 404, "retry unknown: {unknown:?}");

    fake.set_reject_enabled(false);
    let retried = admin(
        &bot,
        Method::POST,
        &format!("/admin/dead-letters/{e}/retry"),
    )
    .await?;
    ensure!(retried.status == 200, "retry: {retried:?}");
    ensure_json_eq(&retried.json()?, &json!({"retried": 1}), "retry answer")?;
    let sent = fake.settle(1, TIMEOUT).await?;
    ensure_json_eq(
        &sent[0].body,
        &text_reply("conv_dl_e", &format!("{POISON} e")),
        "the retried reply",
    )?;
    let none = admin(&bot, Method::POST, "/admin/dead-letters/retry").await?;
    ensure_json_eq(&none.json()?, &json!({"retried": 0}), "retry all of none")?;
    ensure!(admin_dead_letters(&bot).await?.is_empty());
    ensure_json_eq(&outbox_counts(&bot).await?, &json!({"sent": 1}), "outbox")?;
    Ok(())
}

/// A reply that keeps failing with 503 is retried up to
/// DIGIBOT_RETRY_MAX_ATTEMPTS (3 here), then kept as a dead letter with
/// the last status and body; it is not tried again.
#[tokio::test]
async fn exhausted_retries_become_a_dead_letter() -> Result<()> {
    const C: &str = "conv_dl_503";
    let fake = FakeDigishare::start().await?;
    fake.fail_every(Some((1, 503)));
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .retry(5, 20, 3)
        .start()
        .await?;
    bot.accept(&customer_text(C, "msg_503", "encore")).await?;
    let letters = wait_dead_letters(&bot, 1).await?;
    ensure!(
        letters[0]["last_status"] == 503
            && letters[0]["attempts"] == 3
            && letters[0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("injected failure")),
        "dead letter: {:#}",
        letters[0]
    );
    tokio::time::sleep(SETTLE).await;
    let attempts = fake.requests();
    ensure!(
        attempts.len() == 3 && attempts.iter().all(|r| r.status == 503),
        "attempts:\n{}",
        fake.dump()
    );
    Ok(())
}
