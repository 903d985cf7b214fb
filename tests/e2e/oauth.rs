//! OAuth client credentials instead of a static token: digibot fetches a
//! token from `/v1/oauth/token`, uses it, refreshes it before it expires,
//! and refreshes once when Digishare answers 401 (a revoked token).

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};

use crate::support::durable::Poster;
use crate::support::*;

const CLIENT_ID: &str = "digibot-client";
const CLIENT_SECRET: &str = "s3cret";

async fn oauth_fake(expires_in: u64) -> Result<FakeDigishare> {
    let fake = FakeDigishare::start().await?;
    fake.oauth_client(CLIENT_ID, CLIENT_SECRET);
    fake.oauth_expires_in(expires_in);
    // Only unexpired, unrevoked tokens issued by the fake are accepted.
    fake.require_issued_token(true);
    Ok(fake)
}

async fn oauth_bot(fake: &FakeDigishare, secret: &str) -> Result<Digibot> {
    Digibot::builder()
        .api_base(&fake.url())
        .no_api_token()
        .env("DIGIBOT_CLIENT_ID", CLIENT_ID)
        .env("DIGIBOT_CLIENT_SECRET", secret)
        .plugin("echo")
        .retry(5, 200, 30)
        .start()
        .await
}

fn token_request() -> Value {
    json!({
        "method": "POST",
        "path": "/v1/oauth/token",
        "body": {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET
        }
    })
}

fn reply(conversation: &str, text: &str) -> Value {
    json!({
        "method": "POST",
        "path": "/v1/messages",
        "body": {
            "conversation_id": conversation,
            "type": "text",
            "body": text,
            "send_to_third": true
        }
    })
}

/// (wire, Authorization, status) of every request, for exact comparison.
fn exchange(fake: &FakeDigishare) -> Vec<Value> {
    fake.requests()
        .iter()
        .map(|r| json!({"request": r.wire(), "authorization": r.authorization, "status": r.status}))
        .collect()
}

fn step(request: Value, authorization: Option<&str>, status: u16) -> Value {
    json!({"request": request, "authorization": authorization, "status": status})
}

/// The whole life of a token: fetched on first use, reused, refreshed
/// before it expires (a request at 95% of its lifetime already uses a new
/// token, with no 401 on the way), and after a revocation exactly one 401,
/// one refresh, and the reply delivered with the new token.
#[tokio::test]
async fn token_fetched_refreshed_before_expiry_and_after_401() -> Result<()> {
    const C: &str = "conv_oauth_1";
    const LIFETIME: Duration = Duration::from_secs(4);
    let fake = oauth_fake(LIFETIME.as_secs()).await?;
    let bot = oauth_bot(&fake, CLIENT_SECRET).await?;

    bot.accept(&customer_text(C, "msg_o1", "un")).await?;
    bot.accept(&customer_text(C, "msg_o2", "deux")).await?;
    fake.wait_for_conversation(C, 2, TIMEOUT).await?;
    let issued = fake.requests()[0].received_at;

    // digibot refreshes in the last tenth of the lifetime; at 95% the old
    // token still works at the fake, so only a proactive refresh explains
    // a new token here.
    tokio::time::sleep_until((issued + LIFETIME.mul_f64(0.95)).into()).await;
    bot.accept(&customer_text(C, "msg_o3", "trois")).await?;
    fake.wait_for_conversation(C, 3, TIMEOUT).await?;

    fake.revoke_tokens();
    bot.accept(&customer_text(C, "msg_o4", "quatre")).await?;
    fake.wait_for_conversation(C, 4, TIMEOUT).await?;
    fake.settle(7, TIMEOUT).await?;

    ensure_all_eq(
        &exchange(&fake),
        &[
            step(token_request(), None, 200),
            step(reply(C, "un"), Some("Bearer tok-1"), 201),
            step(reply(C, "deux"), Some("Bearer tok-1"), 201),
            step(token_request(), None, 200),
            step(reply(C, "trois"), Some("Bearer tok-2"), 201),
            step(reply(C, "quatre"), Some("Bearer tok-2"), 401),
            step(token_request(), None, 200),
            step(reply(C, "quatre"), Some("Bearer tok-3"), 201),
        ],
        "requests to the fake",
    )?;
    Ok(())
}

/// A revoked token seen by several conversations at once is refreshed
/// once, not once per 401. (A 429 lines the replies up: it pauses every
/// send until its `Retry-After` date, so the replies queued meanwhile,
/// after the token is revoked, all go out together.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_401s_refresh_once() -> Result<()> {
    const CONVERSATIONS: usize = 8;
    let fake = oauth_fake(3600).await?;
    let bot = oauth_bot(&fake, CLIENT_SECRET).await?;
    bot.accept(&customer_text("conv_oauth_w", "msg_w", "warm up"))
        .await?;
    fake.wait_for(2, TIMEOUT).await?;

    let at = std::time::SystemTime::now() + Duration::from_secs(2);
    fake.script([Scripted::status(429).retry_after(httpdate::fmt_http_date(at))]);
    bot.accept(&customer_text("conv_oauth_w", "msg_w2", "pause"))
        .await?;
    bot.wait_for_log(TIMEOUT, "the account-wide pause", |l| {
        l.contains("every send waits")
    })
    .await?;
    fake.revoke_tokens();
    let poster = Poster::new(&bot)?;
    let mut posts = tokio::task::JoinSet::new();
    for c in 0..CONVERSATIONS {
        let poster = poster.clone();
        posts.spawn(async move {
            poster
                .deliver(
                    &customer_text(
                        &format!("conv_oauth_{c}"),
                        &format!("msg_oauth_{c}"),
                        "encore",
                    ),
                    TIMEOUT,
                )
                .await
        });
    }
    while let Some(answer) = posts.join_next().await {
        ensure!(answer?? == "accepted");
    }
    ensure!(
        std::time::SystemTime::now() < at,
        "the replies were queued after the pause"
    );

    // The warm-up's token request and reply, one refresh, the paused
    // reply and 8 more.
    let ok = fake.settle(2 + 1 + 1 + CONVERSATIONS, TIMEOUT).await?;
    let unauthorized = fake.requests().iter().filter(|r| r.status == 401).count();
    ensure!(
        fake.tokens_issued() == ["tok-1", "tok-2"],
        "tokens issued after {unauthorized} 401s: {:?}\n{}",
        fake.tokens_issued(),
        fake.dump()
    );
    let replies: Vec<_> = ok.iter().filter(|r| r.path == "/v1/messages").collect();
    ensure!(
        replies.len() == CONVERSATIONS + 2
            && replies[1..]
                .iter()
                .all(|r| r.authorization.as_deref() == Some("Bearer tok-2")),
        "replies:\n{}",
        fake.dump()
    );
    eprintln!("{unauthorized} replies answered 401 before the refresh");
    Ok(())
}

/// Wrong client credentials: the token request is refused (401), the reply
/// becomes a dead letter at once (not a retry loop), with that status.
#[tokio::test]
async fn refused_credentials_make_a_dead_letter() -> Result<()> {
    let fake = oauth_fake(3600).await?;
    let bot = oauth_bot(&fake, "wrong-secret").await?;
    bot.accept(&customer_text("conv_oauth_x", "msg_x", "bonjour"))
        .await?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    let letters = loop {
        let letters = crate::support::durable::admin_dead_letters(&bot).await?;
        if !letters.is_empty() || std::time::Instant::now() >= deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    ensure!(
        letters.len() == 1 && letters[0]["last_status"] == 401 && letters[0]["attempts"] == 1,
        "dead letters: {letters:#?}"
    );
    tokio::time::sleep(SETTLE).await;
    let requests = fake.requests();
    ensure!(
        requests.len() == 1 && requests[0].path == "/v1/oauth/token" && requests[0].status == 401,
        "requests:\n{}",
        fake.dump()
    );
    Ok(())
}
