//! How digibot starts: dry-run without an API token, refusing to listen in
//! public without webhook auth, the admin API switch.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::json;

use crate::support::*;

/// Without DIGIBOT_API_TOKEN nothing is sent: the request is logged as a
/// `dry-run` line with the method, the path and the JSON body.
#[tokio::test]
async fn dry_run_logs_instead_of_sending() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .api_base(&fake.url())
        .no_api_token()
        .plugin("echo")
        .start()
        .await?;

    bot.accept(&fixture("message_text_customer")).await?;
    let line = bot
        .wait_for_log(TIMEOUT, "dry-run and /v1/messages", |l| {
            l.contains("dry-run") && l.contains("/v1/messages")
        })
        .await?;
    ensure!(
        line.contains("POST"),
        "dry-run line without the method: {line}"
    );
    let expected = json!({
        "conversation_id": "conv_7Hq2Lm9Xa1",
        "type": "text",
        "body": "Bonjour, je voudrais suivre ma commande",
        "send_to_third": true
    });
    let objects = json_objects_in(&line);
    ensure!(
        objects.contains(&expected),
        "dry-run line without the JSON body {expected}: {line}\n(found {objects:?})"
    );

    fake.assert_quiet(0, SETTLE).await?;
    Ok(())
}

/// The demo's first minute: concierge in dry-run and the README's two
/// webhooks. Each would-be request is logged exactly once (`dry-run, not
/// sent: METHOD PATH BODY`), with no "no message id" warning (nothing was
/// sent, so nothing answered; the sender records an id of its own), and
/// nothing reaches the API.
#[tokio::test]
async fn dry_run_logs_each_request_once_and_no_warning() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .api_base(&fake.url())
        .no_api_token()
        .plugin("concierge")
        .start()
        .await?;
    let keys = [
        bot.accept(&fixture("new_conversation")).await?,
        bot.accept(&fixture("message_text_customer")).await?,
    ];
    bot.wait_idle(&keys, TIMEOUT).await?;
    let detail = bot
        .admin_get("/admin/conversations/conv_7Hq2Lm9Xa1")
        .await?
        .json()?;
    let actions = detail["actions"].as_array().cloned().unwrap_or_default();
    // The welcome buttons, then the help text quoting the customer.
    ensure!(
        actions.len() == 2 && actions.iter().all(|a| a["status"] == "sent"),
        "{detail:#}"
    );
    let logs = bot.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("dry-run, not sent: POST /v1/messages"))
        .collect();
    ensure!(lines.len() == actions.len(), "{logs}");
    for action in &actions {
        let logged = lines
            .iter()
            .filter(|l| json_objects_in(l).contains(&action["body"]))
            .count();
        ensure!(
            logged == 1,
            "{} logged {logged} times:\n{logs}",
            action["body"]
        );
    }
    ensure!(
        !logs.contains("no message id") && !logs.contains("24-hour window"),
        "a warning in a dry-run:\n{logs}"
    );
    fake.assert_quiet(0, SETTLE).await?;
    Ok(())
}

/// 0.0.0.0 with no webhook auth and no --insecure: exit non-zero, saying
/// --insecure would allow it.
#[tokio::test]
async fn refuses_public_listen_without_auth() -> Result<()> {
    let port = free_port()?;
    let mut bot = Digibot::builder()
        .no_webhook_auth()
        .listen(&format!("0.0.0.0:{port}"))
        .spawn()?;
    let status = bot.wait_exit(Duration::from_secs(30)).await?;
    ensure!(
        !status.success(),
        "digibot accepted 0.0.0.0 without auth ({status})"
    );
    let logs = bot.logs();
    ensure!(
        logs.contains("--insecure"),
        "the refusal does not mention --insecure:\n{logs}"
    );
    Ok(())
}

/// ...but starts with --insecure, and then takes unauthenticated webhooks.
#[tokio::test]
async fn public_listen_with_insecure() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let port = free_port()?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .no_webhook_auth()
        .listen(&format!("0.0.0.0:{port}"))
        .insecure()
        .start()
        .await?;
    bot.get("/healthz").await?.expect_status(200)?;
    let reply = bot
        .post_raw(serde_json::to_vec(&fixture("message_text_minimal"))?, &[])
        .await?;
    reply.expect_status(200)?;
    fake.settle(1, TIMEOUT).await?;
    ensure_all_eq(
        &fake.messages_for("conv_min_01"),
        &[
            json!({"conversation_id": "conv_min_01", "type": "text", "body": "/info", "send_to_third": true}),
        ],
        "reply to the unauthenticated webhook",
    )?;
    Ok(())
}

/// 0.0.0.0 is fine without --insecure once webhooks need a token.
#[tokio::test]
async fn public_listen_with_webhook_token() -> Result<()> {
    let port = free_port()?;
    let bot = Digibot::builder()
        .listen(&format!("0.0.0.0:{port}"))
        .start()
        .await?;
    bot.get("/healthz").await?.expect_status(200)?;
    Ok(())
}

/// The admin API: 404 everywhere without DIGIBOT_ADMIN_TOKEN; with it, a
/// wrong bearer is refused and /admin/events lists handled events.
#[tokio::test]
async fn admin_api_switch_and_events() -> Result<()> {
    let fake = FakeDigishare::start().await?;

    let bot = Digibot::builder()
        .fake(&fake)
        .no_admin_token()
        .start()
        .await?;
    let reply = bot.get("/admin/events?limit=5").await?;
    ensure!(reply.status == 404, "admin API without a token: {reply:?}");
    drop(bot);

    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let reply = bot.get("/admin/events?limit=5").await?;
    ensure!(
        matches!(reply.status, 401 | 403 | 404),
        "admin API without a bearer: {reply:?}"
    );
    let key = bot.accept(&fixture("message_text_minimal")).await?;
    fake.settle(1, TIMEOUT).await?;
    let event = bot
        .wait_event(&key, TIMEOUT, |e| {
            e["plugins"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["plugin"] == "echo"))
        })
        .await?;
    ensure!(
        event["event"] == "live_chat.new_message" && event["conversation_id"] == "conv_min_01",
        "unexpected event record {event}"
    );
    ensure!(
        event["plugins"][0]["actions"] == json!(1) || event["plugins"][0]["actions"].is_array(),
        "echo's record has no actions: {event}"
    );
    Ok(())
}
