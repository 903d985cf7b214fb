//! Durable timers, end to end, with `plugins/reminder` (a follow-up after
//! silence, cancelled by the customer's next message): a follow-up fires
//! once after its delay; a customer message cancels it; a kill -9 before
//! it is due, it fires once after the restart; while a human is in charge
//! it waits, and fires once the bot has the conversation back; archiving
//! drops it. A 0.3.0 plugin built before timers (`echo-v0_3`, no `on-timer`
//! export) keeps loading and answering beside it. Every test counts the
//! exact requests that reach the fake Messages API.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::observability::{ensure_metrics, scrape, series};
use crate::support::durable::cli;
use crate::support::*;

/// The follow-up delay the tests configure.
const AFTER_MS: u64 = 1500;

fn reminder(after_ms: u64) -> String {
    format!("[config]\nafter_ms = \"{after_ms}\"\n")
}

/// A customer text without `created_at` (handled in arrival order).
fn customer(conversation: &str, id: &str, text: &str) -> Value {
    let mut v = customer_text(conversation, id, text);
    v["data"]["data"]
        .as_object_mut()
        .map(|d| d.remove("created_at"));
    v
}

fn noted(c: &str, text: &str) -> Value {
    wire_text(c, &format!("Noted: {text}"))
}

fn follow_up(c: &str, text: &str) -> Value {
    wire_text(
        c,
        &format!("Still there? You wrote {text:?}; can we help with anything else?"),
    )
}

async fn handle(bot: &Digibot, event: &Value) -> Result<String> {
    let key = bot.accept(event).await?;
    bot.wait_idle(std::slice::from_ref(&key), TIMEOUT).await?;
    Ok(key)
}

/// The pending timers of `c`, as `GET /admin/conversations/ID` lists them.
async fn admin_timers(bot: &Digibot, c: &str) -> Result<Vec<Value>> {
    let detail = bot.admin_get(&format!("/admin/conversations/{c}")).await?;
    detail.expect_status(200)?;
    let detail = detail.json()?;
    Ok(detail["timers"]
        .as_array()
        .with_context(|| format!("no timers in {detail:#}"))?
        .clone())
}

/// The pending timers of `c`, as `digibot conversations show --json` lists them.
async fn cli_timers(bot: &Digibot, c: &str) -> Result<Vec<Value>> {
    let run = cli(&bot.data_dir, &["conversations", "show", c, "--json"])
        .await?
        .ok()?;
    let shown: Value = serde_json::from_str(&run.stdout)?;
    Ok(shown["timers"]
        .as_array()
        .with_context(|| format!("no timers in {shown:#}"))?
        .clone())
}

/// Waits for `c`'s requests to be exactly `expected` (in order), then for
/// `quiet` more without another one for it.
async fn ensure_exactly(
    fake: &FakeDigishare,
    c: &str,
    expected: &[Value],
    quiet: Duration,
) -> Result<()> {
    fake.wait_for_conversation(c, expected.len(), TIMEOUT)
        .await?;
    tokio::time::sleep(quiet).await;
    ensure_all_eq(&fake.wire_for(c), expected, c)
}

#[tokio::test]
async fn a_follow_up_fires_once_after_its_delay_and_a_customer_message_cancels_it() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("reminder", &reminder(AFTER_MS))
        .plugin("echo-v0_3")
        .start()
        .await?;

    // Fires once, after its delay; the 0.3.0 plugin without `on-timer`
    // answers the message and is not called for the timer.
    let c = "conv_timer_once";
    let started = std::time::Instant::now();
    handle(&bot, &customer(c, "msg_t1", "bonjour")).await?;
    let timers = admin_timers(&bot, c).await?;
    ensure!(
        timers.len() == 1
            && timers[0]["name"] == "follow-up"
            && timers[0]["plugin"] == "reminder"
            && timers[0]["payload"] == "bonjour"
            && timers[0]["cancel_on_customer_message"] == true,
        "admin timers: {timers:#?}"
    );
    ensure!(
        cli_timers(&bot, c).await? == timers,
        "the CLI shows the same timers"
    );
    let expected = [
        wire_text(c, "v0.3: bonjour"),
        noted(c, "bonjour"),
        follow_up(c, "bonjour"),
    ];
    fake.wait_for_conversation(c, 3, TIMEOUT).await?;
    ensure!(
        started.elapsed() >= Duration::from_millis(AFTER_MS),
        "the follow-up came before its delay"
    );
    tokio::time::sleep(Duration::from_millis(AFTER_MS)).await;
    ensure_all_eq(&fake.wire_for(c), &expected, c)?;
    ensure!(
        admin_timers(&bot, c).await?.is_empty(),
        "fired: none pending"
    );

    // A customer message (a location: the reminder schedules nothing for
    // it) cancels the pending follow-up.
    let d = "conv_timer_cancel";
    handle(&bot, &customer(d, "msg_t2", "une question")).await?;
    handle(&bot, &customer_location(d, "msg_t3", 36.8, 10.18)).await?;
    ensure!(
        admin_timers(&bot, d).await?.is_empty(),
        "cancelled by the message"
    );
    ensure_exactly(
        &fake,
        d,
        &[wire_text(d, "v0.3: une question"), noted(d, "une question")],
        Duration::from_millis(AFTER_MS * 2),
    )
    .await?;
    ensure_metrics(
        &scrape(&bot).await?,
        &[series("digibot_timers_fired_total", 1.0)],
    )?;
    Ok(())
}

/// `digibot test --record` on a conversation whose follow-up fired: the
/// customer's message is an event turn, the firing a `timer` turn (fired
/// in the test only because the plugin schedules it again), each expecting
/// the request it made in production; the written file passes.
#[tokio::test]
async fn a_recorded_conversation_with_a_fired_timer_passes_as_a_test() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("reminder", &reminder(300))
        .start()
        .await?;
    let c = "conv_timer_record";
    handle(&bot, &customer(c, "msg_tr1", "bonjour")).await?;
    fake.wait_for_conversation(c, 2, TIMEOUT).await?;
    ensure_all_eq(
        &fake.wire_for(c),
        &[noted(c, "bonjour"), follow_up(c, "bonjour")],
        c,
    )?;
    // The timer's turn is committed after its request is queued.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !bot
        .admin_get("/admin/events")
        .await?
        .json()?
        .to_string()
        .contains("timer:")
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "no timer event stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("recorded.toml");
    let wasm = bot.plugins_dir.join("reminder.wasm");
    let run = cli(
        &bot.data_dir,
        &[
            "test",
            &wasm.to_string_lossy(),
            "--record",
            &file.to_string_lossy(),
            "--conversation",
            c,
        ],
    )
    .await?
    .ok()?;
    ensure!(
        run.stdout.ends_with(&format!(
            "(recorded conversation {c}) ... ok (2 turns)\n1 test file: 1 passed, 0 failed\n"
        )),
        "{}",
        run.stdout
    );
    let text = std::fs::read_to_string(&file)?;
    ensure!(
        text.contains("name = \"follow-up\"") && text.contains("Still there? You wrote"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_follow_up_survives_kill_9_and_fires_once_after_the_restart() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let mut bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("reminder", &reminder(3000))
        .start()
        .await?;
    let c = "conv_timer_restart";
    handle(&bot, &customer(c, "msg_r1", "allo")).await?;
    fake.wait_for_conversation(c, 1, TIMEOUT).await?;
    bot.kill9()?;
    bot.restart().await?;
    ensure_exactly(
        &fake,
        c,
        &[noted(c, "allo"), follow_up(c, "allo")],
        Duration::from_millis(2000),
    )
    .await?;
    // Once more across a second restart: nothing fires again.
    bot.kill9()?;
    bot.restart().await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ensure_all_eq(
        &fake.wire_for(c),
        &[noted(c, "allo"), follow_up(c, "allo")],
        c,
    )?;
    Ok(())
}

#[tokio::test]
async fn a_follow_up_waits_while_a_human_is_in_charge_and_fires_after_the_release() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("reminder", &reminder(AFTER_MS))
        .start()
        .await?;
    let c = "conv_timer_human";
    handle(&bot, &customer(c, "msg_h1", "bonjour")).await?;
    fake.wait_for_conversation(c, 1, TIMEOUT).await?;
    // An agent takes over: the timer comes due and waits.
    let mut agent = agent_text(c, "msg_h2", "Ici Karim");
    let data = agent["data"]["data"].as_object_mut().context("data")?;
    data.remove("created_at");
    data.remove("sent_using");
    handle(&bot, &agent).await?;
    tokio::time::sleep(Duration::from_millis(AFTER_MS * 2)).await;
    ensure_all_eq(&fake.wire_for(c), &[noted(c, "bonjour")], c)?;
    ensure!(
        admin_timers(&bot, c).await?.len() == 1,
        "held, still pending"
    );
    // Handed back: it fires, once.
    cli(&bot.data_dir, &["conversations", "release", c])
        .await?
        .ok()?;
    ensure_exactly(
        &fake,
        c,
        &[noted(c, "bonjour"), follow_up(c, "bonjour")],
        Duration::from_millis(1000),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn archiving_drops_a_pending_follow_up() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("reminder", &reminder(AFTER_MS))
        .start()
        .await?;
    let c = "conv_timer_archive";
    handle(&bot, &customer(c, "msg_a1", "bonjour")).await?;
    handle(
        &bot,
        &json!({"event": "live_chat.conversation_archived",
                "data": {"conversation_id": c, "archived_at": "2026-11-26T10:30:00.000000Z"}}),
    )
    .await?;
    ensure!(
        admin_timers(&bot, c).await?.is_empty(),
        "dropped at archiving"
    );
    ensure_exactly(
        &fake,
        c,
        &[noted(c, "bonjour")],
        Duration::from_millis(AFTER_MS * 2),
    )
    .await?;
    Ok(())
}

/// `conversation.history` gives a plugin the conversation's exact
/// messages, oldest first: the customer's, an agent's and the bot's own.
#[tokio::test]
async fn history_returns_the_exact_messages_in_order() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("historian")
        .start()
        .await?;
    let c = "conv_history";
    handle(&bot, &customer(c, "msg_y1", "un")).await?;
    fake.wait_for_conversation(c, 1, TIMEOUT).await?;
    let first = "customer/text: un";
    handle(&bot, &customer(c, "msg_y2", "deux")).await?;
    fake.wait_for_conversation(c, 2, TIMEOUT).await?;
    let second = format!("customer/text: un | bot/text: {first} | customer/text: deux");
    ensure_exactly(
        &fake,
        c,
        &[wire_text(c, first), wire_text(c, &second)],
        Duration::from_millis(300),
    )
    .await?;
    Ok(())
}

/// No dead ends: a trapping plugin with `[fallback] action = "hand_off"`
/// hands the conversation to a human, once: its canned text and the
/// hand-off go out, and the customer's next message, now in a human's
/// hands, sends nothing more.
#[tokio::test]
async fn a_trapping_plugin_with_a_hand_off_fallback_hands_off_once() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml(
            "hostile_trap",
            "[fallback]\naction = \"hand_off\"\nuser_id = \"usr_17\"\ntext = \"Un conseiller va vous répondre.\"\n",
        )
        .start()
        .await?;
    let c = "conv_fallback";
    handle(&bot, &customer(c, "msg_f1", "bonjour")).await?;
    fake.wait_for_conversation(c, 2, TIMEOUT).await?;
    handle(&bot, &customer(c, "msg_f2", "il y a quelqu'un ?")).await?;
    ensure_exactly(
        &fake,
        c,
        &[
            wire_text(c, "Un conseiller va vous répondre."),
            json!({"method": "PUT", "path": format!("/v1/conversations/{c}/attach/participants"),
                   "body": {"users": ["usr_17"], "bots": [], "handler_id": "usr_17"}}),
        ],
        Duration::from_millis(500),
    )
    .await?;
    let metrics = scrape(&bot).await?;
    let fallbacks: Vec<(&String, &f64)> = metrics
        .iter()
        .filter(|(k, _)| k.starts_with("digibot_plugin_fallbacks_total"))
        .collect();
    ensure!(
        fallbacks.len() == 1
            && fallbacks[0].0.contains(r#"action="hand_off""#)
            && fallbacks[0].0.contains(r#"plugin="hostile_trap""#)
            && *fallbacks[0].1 == 1.0,
        "fallback metrics: {fallbacks:?}"
    );
    Ok(())
}

/// Three replicas on one PostgreSQL database; the one that scheduled the
/// follow-up (and holds the conversation) is killed with SIGKILL before it
/// is due: a survivor fires it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_three_postgres_replicas_with_one_killed_a_follow_up_fires_once() -> Result<()> {
    let Some(database) = crate::support::pg::fresh_database("timers_replicas").await? else {
        return Ok(());
    };
    let fake = FakeDigishare::start().await?;
    let mut bots = Digibot::builder()
        .fake(&fake)
        .plugin_toml("reminder", &reminder(3000))
        .database(&database)
        .env("DIGIBOT_LEASE_MS", "2000")
        .start_replicas(3)
        .await?;
    let c = "conv_timer_replicas";
    handle(&bots[0], &customer(c, "msg_p1", "allo")).await?;
    fake.wait_for_conversation(c, 1, TIMEOUT).await?;
    bots[0].kill9()?;
    ensure_exactly(
        &fake,
        c,
        &[noted(c, "allo"), follow_up(c, "allo")],
        Duration::from_millis(3000),
    )
    .await?;
    for bot in &bots[1..] {
        ensure!(
            admin_timers(bot, c).await?.is_empty(),
            "fired: none pending"
        );
    }
    Ok(())
}

/// 10,000 timers across 1,000 conversations (`plugins/ticker`: ten each,
/// 100 ms apart): every one fires once, and each conversation's replies
/// come in the order its timers were due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_timers_across_a_thousand_conversations_fire_once_each_in_order() -> Result<()>
{
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    const CONVERSATIONS: usize = 1000;
    const TIMERS: usize = 10;
    let fake = FakeDigishare::start().await?;
    // A long deadline: 64 first turns at once on a loaded 2-core machine
    // can pass 100 ms of wall clock, and this test is about timers.
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("ticker", "[limits]\ntimeout_ms = 10000\n")
        .start()
        .await?;
    let conversation = |c: usize| format!("conv_tick_{c:04}");
    let bot_ref = &bot;
    stream::iter(0..CONVERSATIONS)
        .map(|c| async move {
            bot_ref
                .accept(&customer(
                    &conversation(c),
                    &format!("msg_tick_{c:04}"),
                    &format!("tick {TIMERS} 100"),
                ))
                .await
        })
        .buffer_unordered(64)
        .try_collect::<Vec<String>>()
        .await?;
    let total = CONVERSATIONS * (TIMERS + 1);
    fake.settle(total, crate::support::burst::LONG).await?;
    for c in 0..CONVERSATIONS {
        let c = conversation(c);
        let mut expected = vec![wire_text(&c, &format!("ticking {TIMERS}"))];
        expected.extend((0..TIMERS).map(|i| wire_text(&c, &format!("t{i:02}"))));
        ensure_all_eq(&fake.wire_for(&c), &expected, &c)?;
    }
    fake.assert_quiet(total, SETTLE).await?;
    let fired = bot.metric("digibot_timers_fired_total").await?;
    ensure!(
        fired == (CONVERSATIONS * TIMERS) as f64,
        "digibot_timers_fired_total {fired}"
    );
    Ok(())
}
