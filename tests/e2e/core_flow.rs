//! Conversations with the concierge plugin: every request that reaches
//! Digishare, exactly, in order.

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::support::concierge::{orders_list, post_message, welcome_buttons};
use crate::support::*;

const C: &str = "conv_7Hq2Lm9Xa1";

fn text_reply_to(conversation: &str, body: &str, reply_to: &str) -> Value {
    post_message(json!({
        "conversation_id": conversation,
        "type": "text",
        "body": body,
        "send_to_third": true,
        "reply_to": reply_to
    }))
}

fn note(conversation: &str, body: &str) -> Value {
    post_message(json!({
        "conversation_id": conversation,
        "type": "text",
        "body": body,
        "send_to_third": false
    }))
}

/// What concierge sends on "agent": a note naming the topic, the hand-off
/// to usr_17 as handler, and the customer-facing text.
fn hand_off(conversation: &str, topic: &str) -> [Value; 3] {
    [
        note(
            conversation,
            &format!("Le client demande un conseiller. Sujet : {topic}."),
        ),
        attach(conversation, "usr_17"),
        wire_text(conversation, HAND_OFF_TEXT),
    ]
}

fn attach(conversation: &str, user: &str) -> Value {
    json!({
        "method": "PUT",
        "path": format!("/v1/conversations/{conversation}/attach/participants"),
        "body": {"users": [user], "bots": [], "handler_id": user}
    })
}

fn invoice_file(conversation: &str, url: &str) -> Value {
    post_message(json!({
        "conversation_id": conversation,
        "send_to_third": true,
        "file": {"url": url, "file_name": "facture.pdf"}
    }))
}

const HAND_OFF_TEXT: &str = "Je vous passe un conseiller, un instant.";
const HELP_TEXT: &str = "Tapez « menu » pour les options ou « agent » pour parler à un conseiller.";

/// Posts `event`, then waits until `total` requests concern `conversation`
/// and checks them all, exactly and in order, against `expected[..total]`.
async fn step(
    bot: &Digibot,
    fake: &FakeDigishare,
    conversation: &str,
    event: Value,
    expected: &[Value],
) -> Result<()> {
    bot.accept(&event).await?;
    fake.wait_for_conversation(conversation, expected.len(), TIMEOUT)
        .await?;
    ensure_all_eq(
        &fake.wire_for(conversation),
        expected,
        &format!("requests for {conversation} after {}", event["data"]["id"]),
    )
    .with_context(|| format!("the fake received:\n{}", fake.dump()))
}

/// new conversation → welcome buttons; "orders" → list; list "invoice" →
/// file + text; "agent" → note naming the topic kept in KV, hand-off,
/// text; then, handed off, the bot stays quiet.
#[tokio::test]
async fn concierge_full_flow() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("concierge")
        .start()
        .await?;

    let mut expected = vec![welcome_buttons(C, "Salma Idrissi")];
    step(&bot, &fake, C, fixture("new_conversation"), &expected).await?;

    expected.push(orders_list(C));
    let orders = button_reply(C, "msg_flow_02", "orders", "Mes commandes");
    step(&bot, &fake, C, orders, &expected).await?;

    expected.push(invoice_file(C, "https://example.com/facture.pdf"));
    expected.push(wire_text(C, "Voici votre facture."));
    let invoice = list_reply(C, "msg_flow_03", "invoice", "Recevoir ma facture");
    step(&bot, &fake, C, invoice, &expected).await?;

    expected.extend(hand_off(C, "orders"));
    let agent = customer_text(C, "msg_flow_04", "agent");
    step(&bot, &fake, C, agent, &expected).await?;

    // Handed off: a further customer text gets no answer.
    let key = bot
        .accept(&customer_text(C, "msg_flow_05", "merci"))
        .await?;
    bot.wait_idle(&[key], TIMEOUT).await?;
    let all = fake.assert_quiet(expected.len(), SETTLE).await?;
    ensure_api_headers(&all, API_TOKEN)?;
    ensure_all_eq(&fake.wire_for(C), &expected, "the whole conversation")?;
    Ok(())
}

/// The topic is kept per conversation: asking for an agent in a
/// conversation that never chose a topic says "aucun", while the one that
/// chose "orders" says so.
#[tokio::test]
async fn concierge_kv_is_per_conversation() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("concierge")
        .start()
        .await?;
    let a = "conv_kv_a";
    let b = "conv_kv_b";

    let expected_a = vec![orders_list(a)];
    let menu = customer_text(a, "msg_kv_a1", "menu");
    step(&bot, &fake, a, menu, &expected_a).await?;

    let expected_b = hand_off(b, "aucun").to_vec();
    let agent_b = customer_text(b, "msg_kv_b1", "agent");
    step(&bot, &fake, b, agent_b, &expected_b).await?;

    let mut expected_a = expected_a;
    expected_a.extend(hand_off(a, "orders"));
    let agent_a = button_reply(a, "msg_kv_a2", "agent", "Parler à un agent");
    step(&bot, &fake, a, agent_a, &expected_a).await?;

    fake.assert_quiet(7, SETTLE).await?;
    Ok(())
}

/// The other branches: "stores" → location request (topic stores), a
/// shared location → store pin + text, list "track" → text, free text →
/// help quoting the message, "conseiller" → hand-off naming "stores".
#[tokio::test]
async fn concierge_stores_location_and_help() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("concierge")
        .start()
        .await?;
    let c = "conv_stores_1";

    let mut expected = vec![post_message(json!({
        "conversation_id": c,
        "type": "interactive",
        "send_to_third": true,
        "body": {
            "type": "location_request_message",
            "body": {"text": "Partagez votre position pour trouver le magasin le plus proche."},
            "action": {"name": "send_location"}
        }
    }))];
    let stores = button_reply(c, "msg_st_01", "stores", "Nos magasins");
    step(&bot, &fake, c, stores, &expected).await?;

    expected.push(post_message(json!({
        "conversation_id": c,
        "type": "location",
        "send_to_third": true,
        "body": {
            "latitude": 33.5731,
            "longitude": -7.5898,
            "name": "Digishare Store Maarif",
            "address": "Bd Al Massira, Casablanca"
        }
    })));
    expected.push(wire_text(c, "Voici le magasin le plus proche."));
    let here = customer_location(c, "msg_st_02", 33.59, -7.61);
    step(&bot, &fake, c, here, &expected).await?;

    expected.push(wire_text(
        c,
        "Votre colis est en route. Tapez « agent » pour parler à un conseiller.",
    ));
    let track = list_reply(c, "msg_st_03", "track", "Suivre un colis");
    step(&bot, &fake, c, track, &expected).await?;

    expected.push(text_reply_to(c, HELP_TEXT, "msg_st_04"));
    let hello = customer_text(c, "msg_st_04", "Bonjour, vous êtes ouverts dimanche ?");
    step(&bot, &fake, c, hello, &expected).await?;

    expected.extend(hand_off(c, "stores"));
    let advisor = customer_text(c, "msg_st_05", "conseiller");
    step(&bot, &fake, c, advisor, &expected).await?;

    let all = fake.assert_quiet(expected.len(), SETTLE).await?;
    ensure_api_headers(&all, API_TOKEN)?;
    Ok(())
}

/// Every enabled plugin gets each event, in plugin-name order, and their
/// actions go out in that order: concierge (c) before echo (e).
#[tokio::test]
async fn plugins_answer_in_name_order() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .plugin("concierge")
        .start()
        .await?;
    let c = "conv_order_1";

    let mut expected = vec![welcome_buttons(c, "Omar")];
    step(&bot, &fake, c, new_conversation(c, "Omar"), &expected).await?;

    expected.push(orders_list(c));
    expected.push(wire_text(c, "menu"));
    step(
        &bot,
        &fake,
        c,
        customer_text(c, "msg_ord_01", "menu"),
        &expected,
    )
    .await?;

    expected.push(text_reply_to(c, HELP_TEXT, "msg_ord_02"));
    expected.push(wire_text(c, "bonjour"));
    step(
        &bot,
        &fake,
        c,
        customer_text(c, "msg_ord_02", "bonjour"),
        &expected,
    )
    .await?;

    let all = fake.assert_quiet(expected.len(), SETTLE).await?;
    ensure_api_headers(&all, API_TOKEN)?;
    Ok(())
}

/// NAME.toml: `enabled = false` silences echo, `events = ["message"]`
/// keeps new conversations from concierge, and `[config]` changes the
/// agent and the invoice URL.
#[tokio::test]
async fn plugin_toml_enabled_events_and_config() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("echo", "enabled = false\n")
        .plugin_toml(
            "concierge",
            "enabled = true\nevents = [\"message\"]\n\n[config]\nagent_id = \"usr_99\"\ninvoice_url = \"https://cdn.example.com/f-123.pdf\"\n",
        )
        .start()
        .await?;
    let c = "conv_toml_1";

    // Not subscribed to new conversations: no welcome. The menu text that
    // follows (same conversation, so handled after it) is the sentinel.
    bot.accept(&new_conversation(c, "Nadia")).await?;
    let mut expected = vec![orders_list(c)];
    step(
        &bot,
        &fake,
        c,
        customer_text(c, "msg_toml_01", "menu"),
        &expected,
    )
    .await?;

    expected.push(invoice_file(c, "https://cdn.example.com/f-123.pdf"));
    expected.push(wire_text(c, "Voici votre facture."));
    let invoice = list_reply(c, "msg_toml_02", "invoice", "Recevoir ma facture");
    step(&bot, &fake, c, invoice, &expected).await?;

    expected.push(note(c, "Le client demande un conseiller. Sujet : orders."));
    expected.push(attach(c, "usr_99"));
    expected.push(wire_text(c, HAND_OFF_TEXT));
    let agent = customer_text(c, "msg_toml_03", "agent");
    step(&bot, &fake, c, agent, &expected).await?;

    fake.assert_quiet(expected.len(), SETTLE).await?;
    Ok(())
}
