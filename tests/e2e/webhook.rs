//! The webhook endpoint: acceptance, routing to plugins, dedup, auth and
//! body validation.

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::support::*;

async fn echo_bot(fake: &FakeDigishare) -> Result<Digibot> {
    Digibot::builder().fake(fake).plugin("echo").start().await
}

/// Every fixture is accepted with its dedup key; echo answers exactly the
/// two customer texts, and nothing else (agent message, media, sticker,
/// contacts, unsupported, unknown `reaction`, buttons, location, new
/// conversations, ticket.created, archived) causes a request.
#[tokio::test]
async fn every_fixture_is_accepted_and_only_customer_texts_are_echoed() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;

    // The agent's message and the archived event go last, once the rest is
    // handled: an agent writing puts the conversation in a human's hands and
    // archiving drops what is still pending, and the sentinels below must be
    // answered.
    let (last, others): (Vec<_>, Vec<_>) = all_fixtures()
        .into_iter()
        .partition(|(name, _)| name == "message_agent" || name == "conversation_archived");
    ensure!(last.len() == 2 && others.len() >= 13, "fixtures missing");

    let mut keys = Vec::new();
    for (name, envelope) in &others {
        keys.push(event_key(envelope));
        let reply = bot.post_json(envelope).await?;
        ensure!(
            reply.status == 200,
            "{name}: expected 200, got {}: {}",
            reply.status,
            reply.body
        );
        ensure_json_eq(
            &reply.json()?,
            &json!({"status": "accepted", "event_id": event_key(envelope)}),
            &format!("answer to {name}"),
        )?;
    }

    // Sentinels: one conversation's requests go out in order, so once these
    // echoes arrive every earlier event of both conversations is done.
    keys.push(
        bot.accept(&customer_text("conv_7Hq2Lm9Xa1", "msg_sentinel_1", "fin"))
            .await?,
    );
    let mut minimal_sentinel = fixture("message_text_minimal");
    minimal_sentinel["data"]["id"] = json!("msg_min_sentinel");
    minimal_sentinel["data"]["data"]["body"] = json!("fin");
    keys.push(bot.accept(&minimal_sentinel).await?);
    bot.wait_idle(&keys, TIMEOUT).await?;

    let mut last_keys = Vec::new();
    for name in ["message_agent", "conversation_archived"] {
        let envelope = &last.iter().find(|(n, _)| n == name).context("fixture")?.1;
        let reply = bot.post_json(envelope).await?;
        reply.expect_status(200)?;
        ensure_json_eq(
            &reply.json()?,
            &json!({"status": "accepted", "event_id": event_key(envelope)}),
            &format!("answer to {name}"),
        )?;
        last_keys.push(event_key(envelope));
    }

    // Every event handled and every action delivered: nothing more can come.
    bot.wait_idle(&last_keys, TIMEOUT).await?;
    let requests = fake.settle(4, TIMEOUT).await?;
    ensure_api_headers(&requests, API_TOKEN)?;
    for r in &requests {
        ensure!(
            r.method == "POST" && r.path == "/v1/messages" && r.query.is_none(),
            "unexpected request {}",
            r.summary()
        );
    }
    ensure_all_eq(
        &fake.messages_for("conv_7Hq2Lm9Xa1"),
        &[
            json!({
                "conversation_id": "conv_7Hq2Lm9Xa1",
                "type": "text",
                "body": "Bonjour, je voudrais suivre ma commande",
                "send_to_third": true
            }),
            json!({
                "conversation_id": "conv_7Hq2Lm9Xa1",
                "type": "text",
                "body": "fin",
                "send_to_third": true
            }),
        ],
        "messages to conv_7Hq2Lm9Xa1",
    )?;
    ensure_all_eq(
        &fake.messages_for("conv_min_01"),
        &[
            json!({
                "conversation_id": "conv_min_01",
                "type": "text",
                "body": "/info",
                "send_to_third": true
            }),
            json!({
                "conversation_id": "conv_min_01",
                "type": "text",
                "body": "fin",
                "send_to_third": true
            }),
        ],
        "messages to conv_min_01",
    )?;
    Ok(())
}

/// An agent's text in a conversation never reaches echo, and puts the
/// conversation in a human's hands: the customer's next text is not
/// answered either (see lifecycle.rs for the whole lifecycle).
#[tokio::test]
async fn agent_messages_cause_no_request() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;

    let keys = vec![
        bot.accept(&agent_text("conv_agent_1", "msg_a1", "Bonjour, ici Karim"))
            .await?,
        bot.accept(&agent_text("conv_agent_1", "msg_a2", "menu"))
            .await?,
    ];
    bot.wait_idle(&keys, TIMEOUT).await?;
    // A customer text in the same conversation, after them.
    let customer = bot
        .accept(&customer_text("conv_agent_1", "msg_c1", "merci"))
        .await?;
    let handled = bot.wait_handled(&[customer], TIMEOUT).await?;
    ensure_json_eq(
        &handled[0]["plugins"][0]["reason"],
        &json!("human"),
        "echo's outcome on the customer text",
    )?;
    fake.settle(0, TIMEOUT).await?;
    Ok(())
}

/// A second delivery of the same event is answered `duplicate` and does not
/// run the plugins again; `event_id`, when present, is the key.
#[tokio::test]
async fn duplicate_delivery_is_answered_duplicate_and_replied_once() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;

    let envelope = fixture("message_text_customer");
    let first = bot.post_json(&envelope).await?;
    first.expect_status(200)?;
    ensure_json_eq(
        &first.json()?,
        &json!({"status": "accepted", "event_id": "live_chat.new_message:msg_t_0001"}),
        "first delivery",
    )?;
    for _ in 0..2 {
        let again = bot.post_json(&envelope).await?;
        again.expect_status(200)?;
        ensure_json_eq(
            &again.json()?,
            &json!({"status": "duplicate", "event_id": "live_chat.new_message:msg_t_0001"}),
            "second delivery",
        )?;
    }

    // With a top-level event_id, that is the key: a different message id
    // under the same event_id is still a duplicate.
    let mut with_id = customer_text("conv_dup_2", "msg_dup_a", "premier");
    with_id["event_id"] = json!("evt_0001");
    with_id["timestamp"] = json!("2026-03-14T09:12:55Z");
    let reply = bot.post_json(&with_id).await?;
    reply.expect_status(200)?;
    ensure_json_eq(
        &reply.json()?,
        &json!({"status": "accepted", "event_id": "evt_0001"}),
        "delivery with event_id",
    )?;
    let mut same_id = customer_text("conv_dup_2", "msg_dup_b", "second");
    same_id["event_id"] = json!("evt_0001");
    let reply = bot.post_json(&same_id).await?;
    reply.expect_status(200)?;
    ensure_json_eq(
        &reply.json()?,
        &json!({"status": "duplicate", "event_id": "evt_0001"}),
        "redelivery with the same event_id",
    )?;

    fake.settle(2, TIMEOUT).await?;
    ensure_all_eq(
        &fake.messages_for("conv_7Hq2Lm9Xa1"),
        &[json!({
            "conversation_id": "conv_7Hq2Lm9Xa1",
            "type": "text",
            "body": "Bonjour, je voudrais suivre ma commande",
            "send_to_third": true
        })],
        "replies to the duplicated message",
    )?;
    ensure_all_eq(
        &fake.messages_for("conv_dup_2"),
        &[json!({
            "conversation_id": "conv_dup_2",
            "type": "text",
            "body": "premier",
            "send_to_third": true
        })],
        "replies to the event_id duplicate",
    )?;
    Ok(())
}

fn ensure_error(reply: &HttpReply, status: u16, what: &str) -> Result<()> {
    ensure!(
        reply.status == status,
        "{what}: expected {status}, got {}: {}",
        reply.status,
        reply.body
    );
    if status != 413 {
        let body: Value = reply.json()?;
        ensure!(
            body.get("error").is_some(),
            "{what}: expected an {{\"error\": ...}} body, got {body}"
        );
    }
    Ok(())
}

/// Bearer token and X-Digishare-Secret both work; a missing or wrong one
/// is 401 and the rejected delivery is not stored.
#[tokio::test]
async fn webhook_token_auth() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;
    let body = serde_json::to_vec(&fixture("message_text_minimal"))?;
    let good = format!("Bearer {WEBHOOK_TOKEN}");

    for (headers, what) in [
        (vec![], "no auth"),
        (vec![("Authorization", "Bearer wrong")], "wrong bearer"),
        (vec![("Authorization", "Bearer ")], "empty bearer"),
        (vec![("X-Digishare-Secret", "wrong")], "wrong secret"),
        (vec![("X-Digishare-Secret", "")], "empty secret"),
    ] {
        let reply = bot.post_raw(body.clone(), &headers).await?;
        ensure_error(&reply, 401, what)?;
    }
    // Nothing was stored or run for the rejected deliveries.
    fake.assert_quiet(0, SETTLE).await?;

    let reply = bot
        .post_raw(body.clone(), &[("Authorization", good.as_str())])
        .await?;
    reply.expect_status(200)?;
    ensure_json_eq(
        &reply.json()?,
        &json!({"status": "accepted", "event_id": "live_chat.new_message:msg_min_01"}),
        "Bearer delivery",
    )?;

    let other = customer_text("conv_auth_2", "msg_auth_2", "secret header");
    let reply = bot
        .post_raw(
            serde_json::to_vec(&other)?,
            &[("X-Digishare-Secret", WEBHOOK_TOKEN)],
        )
        .await?;
    reply.expect_status(200)?;
    ensure_json_eq(
        &reply.json()?,
        &json!({"status": "accepted", "event_id": "live_chat.new_message:msg_auth_2"}),
        "X-Digishare-Secret delivery",
    )?;

    fake.settle(2, TIMEOUT).await?;
    ensure_all_eq(
        &fake.messages_for("conv_min_01"),
        &[
            json!({"conversation_id": "conv_min_01", "type": "text", "body": "/info", "send_to_third": true}),
        ],
        "reply to the Bearer delivery",
    )?;
    ensure_all_eq(
        &fake.messages_for("conv_auth_2"),
        &[
            json!({"conversation_id": "conv_auth_2", "type": "text", "body": "secret header", "send_to_third": true}),
        ],
        "reply to the secret-header delivery",
    )?;
    Ok(())
}

/// DIGIBOT_WEBHOOK_BASIC=user:pass: only that Basic credential gets in.
#[tokio::test]
async fn webhook_basic_auth() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .webhook_basic("digishare", "s3cr3t:with-colon")
        .start()
        .await?;
    let body = serde_json::to_vec(&fixture("message_text_minimal"))?;

    for (headers, what) in [
        (vec![], "no auth".to_string()),
        (
            vec![(
                "Authorization".to_string(),
                basic_auth("digishare", "wrong"),
            )],
            "wrong password".to_string(),
        ),
        (
            vec![(
                "Authorization".to_string(),
                basic_auth("other", "s3cr3t:with-colon"),
            )],
            "wrong user".to_string(),
        ),
        (
            vec![(
                "Authorization".to_string(),
                "Basic !!!notbase64".to_string(),
            )],
            "garbage Basic".to_string(),
        ),
        (
            vec![(
                "Authorization".to_string(),
                "Bearer s3cr3t:with-colon".to_string(),
            )],
            "Bearer instead of Basic".to_string(),
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let reply = bot.post_raw(body.clone(), &headers).await?;
        ensure_error(&reply, 401, &what)?;
    }
    fake.assert_quiet(0, SETTLE).await?;

    let good = basic_auth("digishare", "s3cr3t:with-colon");
    let reply = bot
        .post_raw(body, &[("Authorization", good.as_str())])
        .await?;
    reply.expect_status(200)?;
    ensure_json_eq(
        &reply.json()?,
        &json!({"status": "accepted", "event_id": "live_chat.new_message:msg_min_01"}),
        "Basic delivery",
    )?;
    fake.settle(1, TIMEOUT).await?;
    ensure_all_eq(
        &fake.messages_for("conv_min_01"),
        &[
            json!({"conversation_id": "conv_min_01", "type": "text", "body": "/info", "send_to_third": true}),
        ],
        "reply to the Basic delivery",
    )?;
    Ok(())
}

/// Bodies that are not JSON, or not an `{"event": string, "data": object}`
/// envelope, are 400 with an error body, and nothing is stored.
#[tokio::test]
async fn malformed_bodies_are_400() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = echo_bot(&fake).await?;
    let auth = format!("Bearer {WEBHOOK_TOKEN}");
    let headers = [("Authorization", auth.as_str())];

    for body in [
        "{not json",
        "",
        "[1,2]",
        "\"live_chat.new_message\"",
        "{\"data\":{}}",
        "{\"event\":\"live_chat.new_message\"}",
        "{\"event\":42,\"data\":{}}",
        "{\"event\":\"live_chat.new_message\",\"data\":\"msg_t_0001\"}",
        "{\"event\":\"live_chat.new_message\",\"data\":[]}",
    ] {
        let reply = bot.post_raw(body, &headers).await?;
        ensure_error(&reply, 400, &format!("body {body:?}"))?;
    }

    // The endpoint still works afterwards.
    bot.accept(&fixture("message_text_minimal")).await?;
    fake.settle(1, TIMEOUT).await?;
    Ok(())
}

/// DIGIBOT_WEBHOOK_MAX_BYTES caps the body: 413 above it, fine below.
#[tokio::test]
async fn oversized_body_is_413() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .max_bytes(1024)
        .start()
        .await?;

    let big = customer_text("conv_big", "msg_big", &"x".repeat(2048));
    let bytes = serde_json::to_vec(&big)?;
    ensure!(bytes.len() > 2048, "the big body is too small");
    let auth = format!("Bearer {WEBHOOK_TOKEN}");
    let reply = bot
        .post_raw(bytes, &[("Authorization", auth.as_str())])
        .await?;
    ensure_error(&reply, 413, "2 KB body with a 1 KiB limit")?;

    let small = customer_text("conv_big", "msg_small", "petit");
    ensure!(
        serde_json::to_vec(&small)?.len() < 1024,
        "small body too big"
    );
    bot.accept(&small).await?;

    fake.settle(1, TIMEOUT).await?;
    ensure_all_eq(
        &fake.messages_for("conv_big"),
        &[
            json!({"conversation_id": "conv_big", "type": "text", "body": "petit", "send_to_third": true}),
        ],
        "replies in conv_big",
    )?;
    Ok(())
}
