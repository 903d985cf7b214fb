//! Who is in charge of a conversation: hand-off and the `/bot` note, an
//! agent writing first, digibot's own messages coming back as webhooks
//! (duplicated, out of order, before the API call returned), assist
//! plugins, archiving with actions pending, states across a restart,
//! release from the CLI and the admin API, idle release and the 24-hour
//! window. Every test counts the exact requests that reach the fake.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::observability::{ensure_metrics, scrape, series};
use crate::support::concierge;
use crate::support::durable::{admin, cli, cli_dead_letters};
use crate::support::*;

/// A customer text without `created_at`: a conversation's events are then
/// handled in arrival order (the dispatcher orders by `created_at` only
/// when every waiting event has one), which these tests rely on.
fn customer(conversation: &str, id: &str, text: &str) -> Value {
    let mut v = customer_text(conversation, id, text);
    v["data"]["data"]
        .as_object_mut()
        .map(|d| d.remove("created_at"));
    v
}

/// An agent's text to the customer, without `created_at`, sent from the
/// Digishare inbox (`sent_using` absent, as a person typing it).
fn agent(conversation: &str, id: &str, text: &str) -> Value {
    let mut v = agent_text(conversation, id, text);
    let data = v["data"]["data"].as_object_mut().expect("message data");
    data.remove("created_at");
    data.remove("sent_using");
    v
}

/// An agent's internal note (`send_to_third = false`).
fn agent_note(conversation: &str, id: &str, text: &str) -> Value {
    let mut v = agent(conversation, id, text);
    v["data"]["data"]["send_to_third"] = json!(false);
    v
}

pub(crate) fn archived(conversation: &str) -> Value {
    json!({"event": "live_chat.conversation_archived",
           "data": {"conversation_id": conversation, "archived_at": "2026-11-26T10:30:00.000000Z"}})
}

fn note(conversation: &str, body: &str) -> Value {
    json!({"method": "POST", "path": "/v1/messages", "body": {
        "conversation_id": conversation, "type": "text", "body": body, "send_to_third": false}})
}

fn suggestion(conversation: &str, customer_text: &str, advice: &str) -> Value {
    note(
        conversation,
        &format!("Suggestion pour « {customer_text} » : {advice}"),
    )
}

const THANKS: &str = "Remerciez le client et demandez son numéro de commande.";
const ORDERS: &str = "Proposez le suivi de commande (menu « Mes commandes »).";

/// The fake echoes every message digibot creates back to `bot`.
fn echo(bot: &Digibot, sent_using: Option<&str>, copies: usize, timing: EchoTiming) -> Echo {
    Echo {
        url: format!("{}/webhooks/digishare", bot.url()),
        token: WEBHOOK_TOKEN.to_string(),
        sent_using: sent_using.map(str::to_string),
        copies,
        timing,
    }
}

/// `digibot conversations show ID --json` (the real CLI on the running
/// server's database).
async fn conversation(bot: &Digibot, id: &str) -> Result<Value> {
    let run = cli(&bot.data_dir, &["conversations", "show", id, "--json"])
        .await?
        .ok()?;
    serde_json::from_str(&run.stdout)
        .with_context(|| format!("`conversations show --json` printed {:?}", run.stdout))
}

/// Fails unless conversation `id` is in `state` and its reason contains
/// `reason`.
async fn ensure_state(bot: &Digibot, id: &str, state: &str, reason: &str) -> Result<Value> {
    let c = conversation(bot, id).await?;
    ensure!(
        c["state"] == state && c["reason"].as_str().is_some_and(|r| r.contains(reason)),
        "conversation {id}: expected {state} ({reason}), got {c:#}"
    );
    Ok(c)
}

/// Posts `event` and waits until it is handled and nothing is pending.
async fn handle(bot: &Digibot, event: &Value) -> Result<String> {
    let key = bot.accept(event).await?;
    bot.wait_idle(std::slice::from_ref(&key), TIMEOUT).await?;
    Ok(key)
}

/// Posts `event`, then waits until the fake has `total` successful requests
/// for `conversation` and checks them, exactly and in order.
pub(crate) async fn step(
    bot: &Digibot,
    fake: &FakeDigishare,
    conversation: &str,
    event: Value,
    expected: &[Value],
) -> Result<String> {
    let key = bot.accept(&event).await?;
    fake.wait_for_conversation(conversation, expected.len(), TIMEOUT)
        .await?;
    ensure_all_eq(
        &fake.wire_for(conversation),
        expected,
        &format!("requests for {conversation} after {}", event["data"]["id"]),
    )
    .with_context(|| format!("the fake received:\n{}", fake.dump()))?;
    bot.wait_idle(std::slice::from_ref(&key), TIMEOUT).await?;
    Ok(key)
}

/// The outcome of `plugin` in the recorded event `key`.
pub(crate) async fn outcome(bot: &Digibot, key: &str, plugin: &str) -> Result<Value> {
    let event = bot
        .wait_event(key, TIMEOUT, |e| e["status"] == "handled")
        .await?;
    event["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|o| o["plugin"] == plugin))
        .cloned()
        .with_context(|| format!("no outcome for {plugin} in {event:#}"))
}

async fn ensure_skipped_for_human(bot: &Digibot, key: &str, plugin: &str) -> Result<()> {
    let o = outcome(bot, key, plugin).await?;
    ensure!(
        o["outcome"] == "skipped" && o["reason"] == "human" && o["actions"] == 0,
        "{plugin} on {key}: {o:#}"
    );
    Ok(())
}

/// Concierge hands off: once the hand-off is delivered a human is in
/// charge, the next customer messages get no reply (concierge recorded as
/// skipped, reason `human`); the agent's `/bot` note hands it back and the
/// next message is answered again. digibot's own messages come back as
/// webhooks all along and never count as the agent.
#[tokio::test]
async fn hand_off_silences_the_bot_until_the_agent_writes_bot() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("concierge")
        .start()
        .await?;
    fake.echo_to(Some(echo(&bot, None, 1, EchoTiming::AfterResponse)));
    let c = "conv_life_handoff";

    let mut expected = vec![
        note(c, "Le client demande un conseiller. Sujet : aucun."),
        json!({"method": "PUT", "path": format!("/v1/conversations/{c}/attach/participants"),
               "body": {"users": ["usr_17"], "bots": [], "handler_id": "usr_17"}}),
        wire_text(c, "Je vous passe un conseiller, un instant."),
    ];
    step(&bot, &fake, c, customer(c, "msg_h1", "agent"), &expected).await?;
    ensure_state(&bot, c, "human", "hand-off delivered").await?;

    for (id, words) in [("msg_h2", "merci"), ("msg_h3", "vous êtes là ?")] {
        let key = handle(&bot, &customer(c, id, words)).await?;
        ensure_skipped_for_human(&bot, &key, "concierge").await?;
    }
    fake.assert_quiet(expected.len(), SETTLE).await?;

    // The agent hands it back with an internal note: concierge, told of
    // the hand-back, offers its menu again.
    let key = bot.accept(&agent_note(c, "msg_h4", "/bot")).await?;
    expected.push(concierge::welcome(
        c,
        "Me revoilà ! Puis-je vous aider pour autre chose ?",
    ));
    fake.wait_for_conversation(c, expected.len(), TIMEOUT)
        .await?;
    ensure_all_eq(&fake.wire_for(c), &expected, "after the release")?;
    bot.wait_idle(std::slice::from_ref(&key), TIMEOUT).await?;
    ensure_state(&bot, c, "bot", "release command from Agent Karim").await?;

    expected.push(json!({"method": "POST", "path": "/v1/messages", "body": {
        "conversation_id": c, "type": "text", "send_to_third": true, "reply_to": "msg_h5",
        "body": "Tapez « menu » pour les options ou « agent » pour parler à un conseiller."}}));
    step(&bot, &fake, c, customer(c, "msg_h5", "bonjour"), &expected).await?;
    // The echoes of the note, the hand-off text, the menu and that reply
    // came back as agent messages: none of them took the conversation back.
    settle_echoes(&bot, &fake, 4).await?;
    ensure_state(&bot, c, "bot", "release command").await?;
    expected.push(concierge::orders_list(c));
    step(&bot, &fake, c, customer(c, "msg_h6", "menu"), &expected).await?;
    settle_echoes(&bot, &fake, 5).await?;
    fake.settle(expected.len(), TIMEOUT).await?;
    ensure_state(&bot, c, "bot", "release command").await?;
    ensure_metrics(
        &scrape(&bot).await?,
        &[
            series(r#"digibot_takeovers_total{cause="hand_off"}"#, 1.0),
            series(r#"digibot_takeovers_total{cause="agent"}"#, 0.0),
            series(r#"digibot_releases_total{reason="command"}"#, 1.0),
            series("digibot_messages_skipped_human_total", 2.0),
        ],
    )?;
    Ok(())
}

/// Waits until `n` echo webhooks were delivered, each accepted or answered
/// duplicate, and digibot has handled them all.
async fn settle_echoes(bot: &Digibot, fake: &FakeDigishare, n: usize) -> Result<Vec<EchoDelivery>> {
    let echoes = wait_echoes(fake, n).await?;
    ensure!(
        echoes.iter().all(|e| e.status == 200),
        "an echo was refused: {echoes:?}"
    );
    let mut keys: Vec<String> = echoes
        .iter()
        .map(|e| format!("live_chat.new_message:{}", e.message_id))
        .collect();
    keys.sort();
    keys.dedup();
    bot.wait_handled(&keys, TIMEOUT).await?;
    Ok(echoes)
}

/// Waits until the fake has delivered `n` echo webhooks to digibot.
async fn wait_echoes(fake: &FakeDigishare, n: usize) -> Result<Vec<EchoDelivery>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let echoes = fake.echoes();
        if echoes.len() >= n {
            return Ok(echoes);
        }
        if Instant::now() >= deadline {
            bail!("only {} echoes delivered: {echoes:?}", echoes.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent writes in a conversation the bot was answering (no hand-off):
/// from then on the bot is silent. Also when the agent writes while a
/// reply is in flight and its echo arrived before the API call returned:
/// the echo is recognised once the send settles, the agent's message is
/// not (a human must always be able to take over).
#[tokio::test]
async fn an_agent_writing_first_silences_the_bot() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;

    // Plainly: the bot answers, an agent writes, the bot stops.
    let a = "conv_life_agent_a";
    step(
        &bot,
        &fake,
        a,
        customer(a, "msg_aa1", "bonjour"),
        &[wire_text(a, "bonjour")],
    )
    .await?;
    handle(&bot, &agent(a, "msg_aa2", "Bonjour, ici Karim")).await?;
    let state = ensure_state(&bot, a, "human", "Agent Karim wrote (message msg_aa2)").await?;
    ensure!(state["last_agent_at"].is_i64(), "{state:#}");
    for (id, words) in [("msg_aa3", "merci"), ("msg_aa4", "et ma commande ?")] {
        let key = handle(&bot, &customer(a, id, words)).await?;
        ensure_skipped_for_human(&bot, &key, "echo").await?;
    }
    fake.assert_quiet(1, SETTLE).await?;

    // In the race: the echo of the bot's reply arrives before the API call
    // returns, and the agent writes during that call.
    let b = "conv_life_agent_b";
    let hold = Duration::from_millis(1500);
    fake.echo_to(Some(echo(
        &bot,
        None,
        1,
        EchoTiming::BeforeResponse { hold },
    )));
    bot.accept(&customer(b, "msg_ab1", "bonjour")).await?;
    wait_echoes(&fake, 1).await?;
    // The reply is still in flight: the fake holds its answer.
    ensure!(
        bot.outbox().await?["pending"] == 1,
        "the reply is no longer in flight: {}",
        bot.outbox().await?
    );
    bot.accept(&agent(b, "msg_ab2", "Ici Karim, je prends la suite"))
        .await?;
    settle_echoes(&bot, &fake, 1).await?;
    bot.wait_handled(&["live_chat.new_message:msg_ab2".to_string()], TIMEOUT)
        .await?;
    ensure_state(&bot, b, "human", "Agent Karim wrote (message msg_ab2)").await?;
    bot.wait_for_log(TIMEOUT, "the echo recognised after waiting", |l| {
        l.contains("before its send returned") && l.contains(b)
    })
    .await?;
    fake.echo_to(None);
    let key = handle(&bot, &customer(b, "msg_ab3", "merci")).await?;
    ensure_skipped_for_human(&bot, &key, "echo").await?;
    ensure_all_eq(
        &fake.wire_for(b),
        &[wire_text(b, "bonjour")],
        "requests for b",
    )?;
    fake.settle(2, TIMEOUT).await?;
    Ok(())
}

/// digibot's own replies come back as agent webhooks, before the API call
/// returned, delivered twice, held and then delivered newest first, or
/// with a `sent_using` saying they came from the API: none takes over, the
/// bot answers every customer message.
#[tokio::test]
async fn own_replies_echoed_back_never_take_over() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;

    // Before the API call returns, twice each.
    let a = "conv_life_echo_a";
    let hold = Duration::from_millis(600);
    fake.echo_to(Some(echo(
        &bot,
        None,
        2,
        EchoTiming::BeforeResponse { hold },
    )));
    let mut expected = Vec::new();
    for (id, words) in [("msg_ea1", "un"), ("msg_ea2", "deux"), ("msg_ea3", "trois")] {
        expected.push(wire_text(a, words));
        step(&bot, &fake, a, customer(a, id, words), &expected).await?;
    }
    let echoes = settle_echoes(&bot, &fake, 6).await?;
    let outcomes: Vec<&str> = echoes.iter().map(|e| e.outcome.as_str()).collect();
    ensure!(
        outcomes == ["accepted", "duplicate"].repeat(3),
        "echo deliveries: {echoes:?}"
    );
    ensure_state(&bot, a, "bot", "").await?;
    bot.wait_for_log(TIMEOUT, "an echo judged after its send returned", |l| {
        l.contains("before its send returned") && l.contains(a)
    })
    .await?;

    // Held, then delivered newest first, twice each.
    let b = "conv_life_echo_b";
    fake.echo_to(Some(echo(&bot, None, 2, EchoTiming::Held)));
    let mut expected = Vec::new();
    for (id, words) in [("msg_eb1", "un"), ("msg_eb2", "deux"), ("msg_eb3", "trois")] {
        expected.push(wire_text(b, words));
        step(&bot, &fake, b, customer(b, id, words), &expected).await?;
    }
    ensure!(fake.release_echoes(true).await? == 6);
    let echoes = settle_echoes(&bot, &fake, 12).await?;
    let order: Vec<&str> = echoes[6..].iter().map(|e| e.message_id.as_str()).collect();
    ensure!(
        order[0] == order[1] && order[0] > order[2] && order[2] > order[4],
        "held echoes not newest first: {order:?}"
    );
    expected.push(wire_text(b, "quatre"));
    step(&bot, &fake, b, customer(b, "msg_eb4", "quatre"), &expected).await?;
    ensure_state(&bot, b, "bot", "").await?;

    // `sent_using` says it came from the API: not the agent, even with an
    // id digibot never saw.
    let c = "conv_life_echo_c";
    fake.echo_to(None);
    step(
        &bot,
        &fake,
        c,
        customer(c, "msg_ec1", "un"),
        &[wire_text(c, "un")],
    )
    .await?;
    let mut from_api = agent(c, "msg_someone_else_api", "Message envoyé par l'API");
    from_api["data"]["data"]["sent_using"] = json!("api");
    handle(&bot, &from_api).await?;
    step(
        &bot,
        &fake,
        c,
        customer(c, "msg_ec2", "deux"),
        &[wire_text(c, "un"), wire_text(c, "deux")],
    )
    .await?;
    ensure_state(&bot, c, "bot", "").await?;

    fake.settle(3 + 4 + 2, TIMEOUT).await?;
    Ok(())
}

/// Beside echo, an assist plugin (`assist = true`) keeps running while a
/// human is in charge: only its internal notes go out. A customer-facing
/// action from an assist plugin in that state is refused, with the reason
/// in the event's outcome.
#[tokio::test]
async fn assist_plugins_only_write_notes_while_a_human_is_in_charge() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .plugin_toml("suggest", "assist = true\n")
        .start()
        .await?;
    let c = "conv_life_assist";
    // The bot is in charge: both answer, in name order.
    let mut expected = vec![wire_text(c, "bonjour"), suggestion(c, "bonjour", THANKS)];
    step(&bot, &fake, c, customer(c, "msg_as1", "bonjour"), &expected).await?;
    handle(&bot, &agent(c, "msg_as2", "Bonjour, ici Karim")).await?;
    ensure_state(&bot, c, "human", "Agent Karim wrote").await?;

    expected.push(suggestion(c, "où est ma commande ?", ORDERS));
    let key = step(
        &bot,
        &fake,
        c,
        customer(c, "msg_as3", "où est ma commande ?"),
        &expected,
    )
    .await?;
    ensure_skipped_for_human(&bot, &key, "echo").await?;
    let o = outcome(&bot, &key, "suggest").await?;
    ensure!(o["outcome"] == "ok" && o["actions"] == 1, "suggest: {o:#}");
    fake.settle(3, TIMEOUT).await?;
    drop(bot);

    // An assist plugin that answers the customer: refused while human.
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("echo", "assist = true\n")
        .start()
        .await?;
    handle(&bot, &agent(c, "msg_as4", "Bonjour, ici Karim")).await?;
    let key = handle(&bot, &customer(c, "msg_as5", "bonjour")).await?;
    let o = outcome(&bot, &key, "echo").await?;
    ensure!(
        o["outcome"] == "ok"
            && o["actions"] == 0
            && o["rejected"]
                == json!([
                    "plugin echo: text action #0 refused: a human agent is in charge of this conversation: an assist plugin may only write internal notes"
                ]),
        "echo as an assist plugin: {o:#}"
    );
    fake.settle(0, TIMEOUT).await?;
    Ok(())
}

/// Archiving a conversation whose replies are still waiting in the outbox
/// (Digishare asked to retry in 30 s): none is sent, each becomes a dead
/// letter with reason `archived`, the state is `closed`. The customer
/// writing again reopens it with the bot in charge.
#[tokio::test]
async fn archiving_turns_pending_actions_into_dead_letters() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("concierge")
        .start()
        .await?;
    let c = "conv_life_archive";
    fake.script([Scripted::status(503).retry_after(30)]);
    let key = bot.accept(&customer(c, "msg_ar1", "agent")).await?;
    bot.wait_handled(std::slice::from_ref(&key), TIMEOUT)
        .await?;
    // The note was tried once (503), so all three actions are pending.
    let deadline = Instant::now() + TIMEOUT;
    while fake.requests().is_empty() {
        ensure!(Instant::now() < deadline, "no attempt at the note");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        bot.outbox().await?["pending"] == 3,
        "{}",
        bot.outbox().await?
    );

    handle(&bot, &archived(c)).await?;
    ensure_state(&bot, c, "closed", "archived at 2026-11-26T10:30:00").await?;
    let letters = cli_dead_letters(&bot.data_dir).await?;
    ensure!(letters.len() == 3, "dead letters: {letters:#?}");
    for letter in &letters {
        ensure!(
            letter["conversation_id"] == c
                && letter["last_error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("archived:")),
            "dead letter: {letter:#}"
        );
    }
    ensure_json_eq(&bot.outbox().await?, &json!({"dead": 3}), "outbox")?;
    ensure_metrics(
        &scrape(&bot).await?,
        &[series("digibot_archived_dead_letters_total", 3.0)],
    )?;
    // Nothing reached Digishare but the one refused attempt.
    ensure!(fake.requests().len() == 1, "{}", fake.dump());
    fake.assert_quiet(0, SETTLE).await?;

    // The customer writes again: the bot is back.
    let reply = json!({"method": "POST", "path": "/v1/messages", "body": {
        "conversation_id": c, "type": "text", "send_to_third": true, "reply_to": "msg_ar2",
        "body": "Tapez « menu » pour les options ou « agent » pour parler à un conseiller."}});
    step(&bot, &fake, c, customer(c, "msg_ar2", "bonjour"), &[reply]).await?;
    ensure_state(&bot, c, "bot", "reopened").await?;
    fake.settle(1, TIMEOUT).await?;
    Ok(())
}

/// After a restart every conversation keeps its state: human stays silent,
/// bot answers, closed reopens on the next customer message.
#[tokio::test]
async fn states_survive_a_restart() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let mut bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let (h, b, x, r) = (
        "conv_life_rs_human",
        "conv_life_rs_bot",
        "conv_life_rs_closed",
        "conv_life_rs_released",
    );
    step(
        &bot,
        &fake,
        b,
        customer(b, "msg_rs1", "un"),
        &[wire_text(b, "un")],
    )
    .await?;
    handle(&bot, &agent(h, "msg_rs2", "Ici Karim")).await?;
    handle(&bot, &archived(x)).await?;
    handle(&bot, &agent(r, "msg_rs3", "Ici Karim")).await?;
    handle(&bot, &agent_note(r, "msg_rs4", "/BOT")).await?;
    let before = cli(&bot.data_dir, &["conversations", "list", "--json"])
        .await?
        .ok()?
        .stdout;

    bot.restart().await?;
    let after = cli(&bot.data_dir, &["conversations", "list", "--json"])
        .await?
        .ok()?
        .stdout;
    ensure_json_eq(
        &serde_json::from_str(&after)?,
        &serde_json::from_str(&before)?,
        "conversations across the restart",
    )?;
    ensure_state(&bot, h, "human", "Agent Karim wrote").await?;
    ensure_state(&bot, b, "bot", "").await?;
    ensure_state(&bot, x, "closed", "archived").await?;
    ensure_state(&bot, r, "bot", "release command").await?;
    let humans = cli(
        &bot.data_dir,
        &["conversations", "list", "--state", "human"],
    )
    .await?
    .ok()?
    .stdout;
    ensure!(
        humans.contains(h) && !humans.contains(b) && !humans.contains(r),
        "list --state human:\n{humans}"
    );

    handle(&bot, &customer(h, "msg_rs5", "allô ?")).await?;
    step(
        &bot,
        &fake,
        b,
        customer(b, "msg_rs6", "deux"),
        &[wire_text(b, "un"), wire_text(b, "deux")],
    )
    .await?;
    step(
        &bot,
        &fake,
        x,
        customer(x, "msg_rs7", "trois"),
        &[wire_text(x, "trois")],
    )
    .await?;
    step(
        &bot,
        &fake,
        r,
        customer(r, "msg_rs8", "quatre"),
        &[wire_text(r, "quatre")],
    )
    .await?;
    fake.settle(4, TIMEOUT).await?;
    Ok(())
}

/// `digibot conversations release ID` (while the server runs) and
/// `POST /admin/conversations/ID/release` hand a conversation back to the
/// bot; releasing one that is not in a human's hands, or unknown, fails.
#[tokio::test]
async fn release_from_the_cli_and_the_admin_api() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let (one, two) = ("conv_life_rel_cli", "conv_life_rel_api");
    for (c, id) in [(one, "msg_rl1"), (two, "msg_rl2")] {
        handle(&bot, &agent(c, id, "Ici Karim")).await?;
        ensure_state(&bot, c, "human", "Agent Karim wrote").await?;
    }

    // The admin API's conversation views say who is in charge.
    let detail = bot
        .admin_get(&format!("/admin/conversations/{two}"))
        .await?;
    detail.expect_status(200)?;
    let detail = detail.json()?;
    ensure!(
        detail["state"]["state"] == "human"
            && detail["state"]["reason"] == "Agent Karim wrote (message msg_rl2)",
        "GET /admin/conversations/{two}: {detail:#}"
    );
    let list = bot.admin_get("/admin/conversations").await?;
    list.expect_status(200)?;
    let list = list.json()?;
    let states: Vec<(&str, &str)> = list
        .as_array()
        .context("a list")?
        .iter()
        .map(|c| {
            (
                c["conversation_id"].as_str().unwrap_or_default(),
                c["state"]["state"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    ensure!(
        states == [(two, "human"), (one, "human")],
        "GET /admin/conversations: {list:#}"
    );

    let run = cli(&bot.data_dir, &["conversations", "release", one])
        .await?
        .ok()?;
    ensure!(
        run.stdout.contains("back in the bot's hands"),
        "{}",
        run.stdout
    );
    ensure_state(&bot, one, "bot", "digibot conversations release").await?;
    let again = cli(&bot.data_dir, &["conversations", "release", one]).await?;
    ensure!(
        !again.success && again.stderr.contains("is bot, not in a human's hands"),
        "{again:?}"
    );
    ensure!(
        !cli(&bot.data_dir, &["conversations", "show", "conv_nobody"])
            .await?
            .success
    );

    let path = format!("/admin/conversations/{two}/release");
    let reply = admin(&bot, reqwest::Method::POST, &path).await?;
    reply.expect_status(200)?;
    ensure_json_eq(
        &reply.json()?,
        &json!({"conversation_id": two, "state": "bot"}),
        "release answer",
    )?;
    ensure_state(&bot, two, "bot", "admin API").await?;
    let detail = bot
        .admin_get(&format!("/admin/conversations/{two}"))
        .await?
        .json()?;
    ensure!(
        detail["state"]["state"] == "bot",
        "after the release: {detail:#}"
    );
    ensure_metrics(
        &scrape(&bot).await?,
        &[
            series(r#"digibot_takeovers_total{cause="agent"}"#, 2.0),
            series(r#"digibot_releases_total{reason="admin"}"#, 1.0),
        ],
    )?;
    admin(&bot, reqwest::Method::POST, &path)
        .await?
        .expect_status(409)?;
    admin(
        &bot,
        reqwest::Method::POST,
        "/admin/conversations/conv_nobody/release",
    )
    .await?
    .expect_status(404)?;

    step(
        &bot,
        &fake,
        one,
        customer(one, "msg_rl3", "un"),
        &[wire_text(one, "un")],
    )
    .await?;
    step(
        &bot,
        &fake,
        two,
        customer(two, "msg_rl4", "deux"),
        &[wire_text(two, "deux")],
    )
    .await?;
    fake.settle(2, TIMEOUT).await?;
    // Both agent messages were judged as they were recorded (no lane).
    // The CLI's release happened in another process, behind the server's
    // cached state ("human"): the customer's "un" was first decided on it,
    // refused at its completion as stale, and answered from a fresh read.
    ensure_metrics(
        &scrape(&bot).await?,
        &[
            series("digibot_agent_messages_judged_at_insert_total", 2.0),
            series("digibot_stale_conversation_states_total", 1.0),
        ],
    )?;
    Ok(())
}

/// With DIGIBOT_HUMAN_IDLE_RELEASE_SECS, a conversation whose agent has
/// been silent that long is the bot's again at the next customer message.
#[tokio::test]
async fn idle_human_conversations_return_to_the_bot() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .env("DIGIBOT_HUMAN_IDLE_RELEASE_SECS", "2")
        .start()
        .await?;
    let c = "conv_life_idle";
    handle(&bot, &agent(c, "msg_id1", "Ici Karim")).await?;
    // Within the idle time: still the human's.
    let key = handle(&bot, &customer(c, "msg_id2", "un")).await?;
    ensure_skipped_for_human(&bot, &key, "echo").await?;
    ensure_state(&bot, c, "human", "Agent Karim wrote").await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    step(
        &bot,
        &fake,
        c,
        customer(c, "msg_id3", "deux"),
        &[wire_text(c, "deux")],
    )
    .await?;
    ensure_state(&bot, c, "bot", "idle: no agent message for 2 s").await?;
    ensure_metrics(
        &scrape(&bot).await?,
        &[
            series(r#"digibot_releases_total{reason="idle"}"#, 1.0),
            series("digibot_messages_skipped_human_total", 1.0),
        ],
    )?;
    fake.settle(1, TIMEOUT).await?;

    // Idle too, but released by the CLI (another process) first: the
    // server's cached state still says human, the idle release finds it
    // the bot's, and the message is answered once from a fresh read.
    let cli_c = "conv_life_idle_cli";
    handle(&bot, &agent(cli_c, "msg_id4", "Ici Karim")).await?;
    ensure_state(&bot, cli_c, "human", "Agent Karim wrote").await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cli(&bot.data_dir, &["conversations", "release", cli_c])
        .await?
        .ok()?;
    step(
        &bot,
        &fake,
        cli_c,
        customer(cli_c, "msg_id5", "trois"),
        &[wire_text(cli_c, "trois")],
    )
    .await?;
    ensure_metrics(
        &scrape(&bot).await?,
        &[series(r#"digibot_releases_total{reason="idle"}"#, 1.0)],
    )?;
    fake.settle(2, TIMEOUT).await?;
    Ok(())
}

/// A reply to a WhatsApp customer who last wrote more than 24 hours ago
/// (a message Digishare delivers a day late) is flagged in the log before
/// it is sent; when Digishare refuses it for that reason, the dead letter
/// says so plainly.
#[tokio::test]
async fn outside_the_24_hour_window() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let c = "conv_life_window";
    fake.script([Scripted::status(400).body(json!({"error": {"code": 131047,
        "message": "Re-engagement message: more than 24 hours have passed since the customer last replied"}}))]);
    // Written 25 hours ago on WhatsApp (the fixture's channel).
    let written = now_ms() - 25 * 3_600_000;
    ensure!(digibot_domain::lifecycle::parse_time(&rfc3339(written)) == Some(written));
    let mut old = customer_text(c, "msg_w1", "bonjour");
    old["data"]["data"]["created_at"] = json!(rfc3339(written));
    handle(&bot, &old).await?;
    let warning = bot
        .wait_for_log(TIMEOUT, "the 24-hour warning", |l| {
            l.contains("WARN") && l.contains("24-hour window") && l.contains(c)
        })
        .await?;
    ensure!(warning.contains("echo"), "{warning}");
    let letters = cli_dead_letters(&bot.data_dir).await?;
    ensure!(letters.len() == 1, "{letters:#?}");
    let error = letters[0]["last_error"].as_str().unwrap_or_default();
    ensure!(
        letters[0]["last_status"] == 400
            && error.starts_with("refused by WhatsApp: more than 24 hours since the customer's last message (the customer last wrote")
            && error.contains("131047"),
        "dead letter: {:#}",
        letters[0]
    );
    // Refused once, never retried.
    ensure!(fake.requests().len() == 1, "{}", fake.dump());
    fake.assert_quiet(0, SETTLE).await?;
    Ok(())
}

/// The window is judged against when digibot received the customer's
/// message when the payload's `created_at` cannot be that time (months
/// old: a fixture, a replay, a wrong clock): such a message is answered
/// without a warning. A conversation truly outside its window is warned
/// about once, not once per reply or per event.
#[tokio::test]
async fn the_24_hour_window_warning_is_once_and_only_when_true() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let warnings = |c: &str| {
        bot.logs()
            .lines()
            .filter(|l| l.contains("24-hour window") && l.contains(c))
            .count()
    };

    // The fixture's 2026-03-14 on a message received now.
    let fresh = "conv_window_fresh";
    let before = now_ms();
    handle(&bot, &customer_text(fresh, "msg_wf1", "bonjour")).await?;
    let detail = bot
        .admin_get(&format!("/admin/conversations/{fresh}"))
        .await?
        .json()?;
    let wrote = detail["state"]["last_customer_at"].as_i64().unwrap_or(0);
    ensure!(
        wrote >= before && wrote <= now_ms(),
        "the customer wrote when digibot received it, not in March: {detail:#}"
    );

    // Two messages delivered a day late, each answered: one warning.
    let late = "conv_window_late";
    for (i, hours_ago) in [(1, 26), (2, 25)] {
        let mut m = customer_text(late, &format!("msg_wl{i}"), &format!("late {i}"));
        m["data"]["data"]["created_at"] = json!(rfc3339(now_ms() - hours_ago * 3_600_000));
        handle(&bot, &m).await?;
    }
    fake.settle(3, TIMEOUT).await?;
    ensure!(fake.requests_for(late).len() == 2, "{}", fake.dump());
    ensure!(warnings(fresh) == 0, "{}", bot.logs());
    ensure!(warnings(late) == 1, "{}", bot.logs());
    Ok(())
}

/// Every way a human hands a conversation back (the release command, the
/// CLI, the admin API, idle release) reaches the plugins' `on-resume` once,
/// before the customer's next message, with how many messages passed and
/// how long the human had it (state-echo answers
/// `resumed (CAUSE) after N messages, MS ms`).
#[tokio::test]
async fn every_hand_back_reaches_on_resume_once_before_the_next_message() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("state-echo")
        .env("DIGIBOT_HUMAN_IDLE_RELEASE_SECS", "2")
        .start()
        .await?;
    let [note_c, cli_c, api_c, idle_c] = [
        "conv_resume_note",
        "conv_resume_cli",
        "conv_resume_api",
        "conv_resume_idle",
    ];
    let took = Instant::now();
    for c in [note_c, cli_c, api_c, idle_c] {
        handle(&bot, &agent(c, &format!("{c}_a1"), "Ici Karim")).await?;
    }
    // While the human has it: two customer messages and an agent's.
    for (id, text) in [("n2", "un"), ("n3", "deux")] {
        handle(&bot, &customer(note_c, id, text)).await?;
    }
    handle(&bot, &agent(note_c, "n4", "Je regarde")).await?;

    // The release command, then the customer: told in that order.
    let resumed = |cause: &str, n: u32| format!("resumed ({cause}) after {n} messages, ");
    handle(&bot, &agent_note(note_c, "n5", "/bot")).await?;
    bot.accept(&customer(note_c, "n6", "trois")).await?;
    fake.wait_for_conversation(note_c, 2, TIMEOUT).await?;
    let wire = fake.wire_for(note_c);
    let human_ms = ensure_resumed(&wire[0], note_c, &resumed("command", 4))?;
    ensure!(
        human_ms as u128 <= took.elapsed().as_millis(),
        "human_ms {human_ms}"
    );
    ensure_json_eq(
        &wire[1],
        &wire_text(note_c, "bot: trois"),
        "after the hand-back",
    )?;

    // The CLI and the admin API, with no message in between.
    cli(&bot.data_dir, &["conversations", "release", cli_c])
        .await?
        .ok()?;
    admin(
        &bot,
        reqwest::Method::POST,
        &format!("/admin/conversations/{api_c}/release"),
    )
    .await?
    .expect_status(200)?;
    for c in [cli_c, api_c] {
        fake.wait_for_conversation(c, 1, TIMEOUT).await?;
        ensure_resumed(&fake.wire_for(c)[0], c, &resumed("operator", 0))?;
    }

    // Idle: the customer's message after the idle time hands it back; the
    // hand-back is told first, then the message is answered.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    bot.accept(&customer(idle_c, "i2", "allo")).await?;
    fake.wait_for_conversation(idle_c, 2, TIMEOUT).await?;
    let wire = fake.wire_for(idle_c);
    let human_ms = ensure_resumed(&wire[0], idle_c, &resumed("idle", 0))?;
    ensure!(human_ms >= 2000, "idle for {human_ms} ms");
    ensure_json_eq(
        &wire[1],
        &wire_text(idle_c, "bot: allo"),
        "after the idle hand-back",
    )?;

    // Once each: nothing more reaches the fake.
    fake.settle(6, TIMEOUT).await?;
    ensure_metrics(
        &scrape(&bot).await?,
        &[
            series(r#"digibot_releases_total{reason="command"}"#, 1.0),
            series(r#"digibot_releases_total{reason="idle"}"#, 1.0),
            series(r#"digibot_releases_total{reason="admin"}"#, 1.0),
        ],
    )?;
    Ok(())
}

/// Checks that `request` is state-echo's hand-back text starting with
/// `prefix` in `conversation`, and returns the `human-ms` it carried.
fn ensure_resumed(request: &Value, conversation: &str, prefix: &str) -> Result<u64> {
    let body = request["body"]["body"].as_str().unwrap_or_default();
    let ms = body
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(" ms"))
        .and_then(|ms| ms.parse().ok())
        .with_context(|| format!("expected `{prefix}MS ms`, got {request:#}"))?;
    ensure_json_eq(request, &wire_text(conversation, body), "a hand-back reply")?;
    Ok(ms)
}
