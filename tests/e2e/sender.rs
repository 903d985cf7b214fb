//! The sender against what Digishare may answer: absurd delays and token
//! lifetimes, redirects, an account-wide rate limit; and where it may send
//! the token at all.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::json;

use crate::support::*;

fn text(conversation: &str, body: &str) -> serde_json::Value {
    json!({"conversation_id": conversation, "type": "text", "body": body, "send_to_third": true})
}

/// `Retry-After: 1e20` on a 503 (more seconds than a `Duration` holds):
/// no panic; that reply is rescheduled (an hour at most) and stays pending,
/// and the other conversations are answered meanwhile.
#[tokio::test]
async fn retry_after_1e20_is_capped_and_other_conversations_are_served() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    fake.script([Scripted::status(503).retry_after("1e20")]);
    let mut bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;

    let first = bot
        .accept(&customer_text("conv_ra_1", "msg_ra_1", "un"))
        .await?;
    fake.wait_until(TIMEOUT, "the 503", |_| fake.received() >= 1)
        .await?;
    let mut keys = vec![first];
    for i in 2..=4 {
        keys.push(
            bot.accept(&customer_text(
                &format!("conv_ra_{i}"),
                &format!("msg_ra_{i}"),
                "deux",
            ))
            .await?,
        );
    }
    bot.wait_handled(&keys, TIMEOUT).await?;
    for i in 2..=4 {
        let conversation = format!("conv_ra_{i}");
        fake.wait_for_conversation(&conversation, 1, TIMEOUT)
            .await?;
        ensure_all_eq(
            &fake.messages_for(&conversation),
            &[text(&conversation, "deux")],
            "the other conversations' replies",
        )?;
    }
    tokio::time::sleep(SETTLE).await;
    ensure!(bot.is_running(), "digibot died:\n{}", bot.logs());
    let requests = fake.requests();
    ensure!(
        requests.len() == 4 && requests[0].status == 503,
        "the 1e20 reply was retried already:\n{}",
        fake.dump()
    );
    let outbox = bot.outbox().await?;
    ensure!(
        outbox["pending"] == 1 && outbox["sent"] == 3 && outbox.get("dead").is_none(),
        "outbox: {outbox}"
    );
    bot.wait_for_log(TIMEOUT, "the capped retry", |l| {
        l.contains("send failed, will retry") && l.contains("retry_in_ms=3600000")
    })
    .await?;
    Ok(())
}

/// OAuth `expires_in: u64::MAX`: no panic, every conversation answered,
/// with one token (trusted for a day at most, so not refreshed here).
#[tokio::test]
async fn oauth_expires_in_u64_max_is_answered_without_a_panic() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    fake.oauth_expires_in(u64::MAX);
    fake.require_issued_token(true);
    let mut bot = oauth_bot(&fake).await?;
    let mut keys = Vec::new();
    for i in 1..=3 {
        keys.push(
            bot.accept(&customer_text(
                &format!("conv_exp_{i}"),
                &format!("msg_exp_{i}"),
                "bonjour",
            ))
            .await?,
        );
    }
    bot.wait_idle(&keys, TIMEOUT).await?;
    ensure!(bot.is_running(), "digibot died:\n{}", bot.logs());
    ensure!(
        fake.tokens_issued() == ["tok-1"],
        "tokens: {:?}\n{}",
        fake.tokens_issued(),
        fake.dump()
    );
    for i in 1..=3 {
        let c = format!("conv_exp_{i}");
        ensure_all_eq(&fake.messages_for(&c), &[text(&c, "bonjour")], "reply")?;
    }
    Ok(())
}

/// OAuth `expires_in: -5`: no panic; the token is used for the attempt it
/// was fetched for, and the next send fetches a new one.
#[tokio::test]
async fn oauth_expires_in_negative_is_an_expired_token() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    fake.failures_include_oauth(true);
    fake.script([Scripted::status(200)
        .body(json!({"token_type": "Bearer", "expires_in": -5, "access_token": "tok-negative"}))]);
    let mut bot = oauth_bot(&fake).await?;
    let c = "conv_exp_neg";
    let keys = vec![
        bot.accept(&customer_text(c, "msg_neg_1", "un")).await?,
        bot.accept(&customer_text(c, "msg_neg_2", "deux")).await?,
    ];
    bot.wait_idle(&keys, TIMEOUT).await?;
    ensure!(bot.is_running(), "digibot died:\n{}", bot.logs());
    let seen: Vec<(String, Option<String>)> = fake
        .requests()
        .iter()
        .map(|r| (r.path.clone(), r.authorization.clone()))
        .collect();
    let token = |t: &str| Some(format!("Bearer {t}"));
    ensure!(
        seen == [
            ("/v1/oauth/token".to_string(), None),
            ("/v1/messages".to_string(), token("tok-negative")),
            ("/v1/oauth/token".to_string(), None),
            ("/v1/messages".to_string(), token("tok-1")),
        ],
        "{}",
        fake.dump()
    );
    ensure_all_eq(
        &fake.messages_for(c),
        &[text(c, "un"), text(c, "deux")],
        "replies",
    )?;
    Ok(())
}

async fn oauth_bot(fake: &FakeDigishare) -> Result<Digibot> {
    Digibot::builder()
        .api_base(&fake.url())
        .no_api_token()
        .env("DIGIBOT_CLIENT_ID", "digibot-client")
        .env("DIGIBOT_CLIENT_SECRET", "s3cret")
        .plugin("echo")
        .start()
        .await
}

/// A 307 to another URL is not followed (it would re-post the message and
/// the token wherever it points): one request, a dead letter naming the
/// redirect, and the conversation's next reply still goes out.
#[tokio::test]
async fn redirects_are_not_followed() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let elsewhere = format!("{}/v1/elsewhere", fake.url());
    fake.script([Scripted::status(307).header("Location", &elsewhere)]);
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let c = "conv_redirect";
    let keys = vec![
        bot.accept(&customer_text(c, "msg_rd_1", "un")).await?,
        bot.accept(&customer_text(c, "msg_rd_2", "deux")).await?,
    ];
    bot.wait_idle(&keys, TIMEOUT).await?;
    fake.settle(1, TIMEOUT).await?;
    let wire: Vec<(u16, String)> = fake
        .requests()
        .iter()
        .map(|r| (r.status, r.path.clone()))
        .collect();
    ensure!(
        wire == [
            (307, "/v1/messages".to_string()),
            (201, "/v1/messages".to_string())
        ],
        "{}",
        fake.dump()
    );
    let dead = crate::support::durable::admin_dead_letters(&bot).await?;
    ensure!(
        dead.len() == 1
            && dead[0]["last_status"] == 307
            && dead[0]["attempts"] == 1
            && dead[0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("redirect") && e.contains(&elsewhere)),
        "dead letters: {dead:#?}"
    );
    ensure_all_eq(&fake.messages_for(c), &[text(c, "deux")], "replies")?;
    Ok(())
}

/// A 429 is the account's limit: after it, no send to any conversation
/// starts before its `Retry-After` (2 s), then all go out.
#[tokio::test]
async fn a_429_pauses_every_send() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    fake.script([Scripted::status(429).retry_after(2)]);
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let mut keys = vec![
        bot.accept(&customer_text("conv_rl_a", "msg_rl_a", "a"))
            .await?,
    ];
    fake.wait_until(TIMEOUT, "the 429", |_| fake.received() >= 1)
        .await?;
    for c in ["conv_rl_b", "conv_rl_c"] {
        keys.push(
            bot.accept(&customer_text(c, &format!("msg_{c}"), "b"))
                .await?,
        );
    }
    bot.wait_idle(&keys, TIMEOUT).await?;
    let requests = fake.requests();
    ensure!(
        requests.len() == 4 && requests[0].status == 429,
        "{}",
        fake.dump()
    );
    let limited = requests[0].received_at;
    for r in &requests[1..] {
        let after = r.received_at.duration_since(limited);
        ensure!(
            after >= Duration::from_millis(1900),
            "a send started {after:?} after the 429 (Retry-After: 2):\n{}",
            fake.dump()
        );
    }
    for c in ["conv_rl_a", "conv_rl_b", "conv_rl_c"] {
        ensure!(fake.messages_for(c).len() == 1, "{c}:\n{}", fake.dump());
    }
    Ok(())
}

/// The API token never travels in the clear: an http base URL that is not
/// on loopback stops the start with a clear error.
#[tokio::test]
async fn a_plain_http_api_base_is_refused_at_start() -> Result<()> {
    let mut bot = Digibot::builder()
        .api_base("http://api.digishare.ma")
        .api_token(API_TOKEN)
        .spawn()?;
    let status = bot.wait_exit(Duration::from_secs(30)).await?;
    ensure!(
        !status.success(),
        "digibot started with http://api.digishare.ma"
    );
    let logs = bot.logs();
    ensure!(
        logs.contains("http://api.digishare.ma") && logs.contains("must use https"),
        "the refusal does not say why:\n{logs}"
    );
    Ok(())
}
