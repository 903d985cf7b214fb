//! Pending events found again without a restart: an event committed to the
//! inbox that never reached its lane (its webhook was cut off after the
//! commit, or its lane gave up on a transient error) is handled by the
//! dispatcher's sweep, or at once when Digishare redelivers it.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use digibot_domain::event::Event;
use digibot_store::Inserted;
use serde_json::json;

use crate::support::*;

/// Commits `envelope` straight into the running server's SQLite inbox, as
/// a webhook cut off between its commit and its lane leaves it: pending,
/// and in no lane.
async fn commit_behind_its_back(bot: &Digibot, envelope: &serde_json::Value) -> Result<()> {
    let store = digibot_store_sqlite::open(&bot.data_dir, digibot_store_sqlite::Durability::Full)?;
    let event = Event::parse(&serde_json::to_vec(envelope)?)?;
    let inserted = store.insert_event(event).await?;
    store.close();
    ensure!(matches!(inserted, Inserted::New(_)), "{inserted:?}");
    Ok(())
}

/// An event pending in the store that no webhook handed to the dispatcher
/// is answered by the sweep, within its period plus the age that makes it
/// orphaned (5 s each), without a restart and without a redelivery.
#[tokio::test]
async fn an_event_that_never_reached_its_lane_is_swept_up() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let envelope = customer_text("conv_swept", "msg_swept_1", "perdu ?");
    let started = Instant::now();
    commit_behind_its_back(&bot, &envelope).await?;
    fake.wait_for_conversation("conv_swept", 1, Duration::from_secs(20))
        .await?;
    let took = started.elapsed();
    ensure!(
        took >= Duration::from_secs(4),
        "answered after {took:?}: before it could count as orphaned?"
    );
    bot.wait_idle(&[event_key(&envelope)], TIMEOUT).await?;
    fake.settle(1, TIMEOUT).await?;
    ensure_all_eq(
        &fake.messages_for("conv_swept"),
        &[
            json!({"conversation_id": "conv_swept", "type": "text", "body": "perdu ?", "send_to_third": true}),
        ],
        "the swept event's reply",
    )?;
    eprintln!("swept up after {took:?}");
    Ok(())
}

/// Digishare's redelivery of an event still pending is answered
/// `duplicate`, and hands the event to its lane at once: answered well
/// before the sweep could have found it, and only once.
#[tokio::test]
async fn a_redelivered_pending_event_is_dispatched_at_once() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let envelope = customer_text("conv_redelivered", "msg_redelivered_1", "encore");
    let started = Instant::now();
    commit_behind_its_back(&bot, &envelope).await?;
    let reply = bot.post_json(&envelope).await?;
    reply.expect_status(200)?;
    ensure_json_eq(
        &reply.json()?,
        &json!({"status": "duplicate", "event_id": event_key(&envelope)}),
        "answer to the redelivery",
    )?;
    fake.wait_for_conversation("conv_redelivered", 1, TIMEOUT)
        .await?;
    let took = started.elapsed();
    ensure!(
        took < Duration::from_secs(4),
        "answered after {took:?}: by the sweep, not by the redelivery"
    );
    // A second redelivery, now that it is handled, changes nothing.
    bot.post_json(&envelope).await?.expect_status(200)?;
    bot.wait_idle(&[event_key(&envelope)], TIMEOUT).await?;
    // Past a sweep and the orphan age: still exactly one reply.
    fake.assert_quiet(1, Duration::from_secs(6)).await?;
    Ok(())
}
