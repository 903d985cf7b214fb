//! `debounce_ms`: customer messages that arrive within the window become
//! one turn of the debounced plugin, which sees them all; a plugin without
//! it still answers each; a message after the window starts a new turn.

use anyhow::{Result, ensure};

use crate::observability::{ensure_metrics, scrape, series};
use crate::support::*;

/// Three messages 100 ms apart with `debounce_ms = 1500`: state-echo (with
/// it) answers once, with the three texts; echo (without) answers each; a
/// fourth message after the window is a turn of its own.
#[tokio::test]
async fn a_burst_of_three_messages_is_one_turn() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml("state-echo", "debounce_ms = 1500")
        .plugin("echo")
        .start()
        .await?;
    let c = "conv_debounce";
    let mut keys = Vec::new();
    for (id, text) in [
        ("d1", "bonjour"),
        ("d2", "je voudrais"),
        ("d3", "suivre ma commande"),
    ] {
        keys.push(bot.accept(&customer_text(c, id, text)).await?);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    bot.wait_idle(&keys, TIMEOUT).await?;
    fake.wait_for_conversation(c, 4, TIMEOUT).await?;
    let mut expected = vec![
        wire_text(c, "bonjour"),
        wire_text(c, "je voudrais"),
        wire_text(c, "suivre ma commande"),
        wire_text(c, "bot: bonjour | je voudrais | suivre ma commande"),
    ];
    ensure_all_eq(&fake.wire_for(c), &expected, "a debounced burst")?;

    // The earlier two were folded into the third's turn.
    for key in &keys[..2] {
        let event = bot
            .wait_event(key, TIMEOUT, |e| e["status"] == "handled")
            .await?;
        let folded = event["plugins"]
            .as_array()
            .and_then(|p| p.iter().find(|o| o["plugin"] == "state-echo"))
            .cloned()
            .unwrap_or_default();
        ensure!(folded["outcome"] == "folded", "{key}: {event:#}");
    }

    // After the window: a turn of its own.
    let key = bot.accept(&customer_text(c, "d4", "merci")).await?;
    bot.wait_idle(std::slice::from_ref(&key), TIMEOUT).await?;
    expected.extend([wire_text(c, "merci"), wire_text(c, "bot: merci")]);
    fake.wait_for_conversation(c, expected.len(), TIMEOUT)
        .await?;
    fake.settle(expected.len(), TIMEOUT).await?;
    let mut wire = fake.wire_for(c);
    // echo's and state-echo's replies to d4 are two plugins' turns of one
    // event, in plugin name order.
    ensure_all_eq(&wire.split_off(4), &expected[4..], "after the window")?;
    ensure_metrics(
        &scrape(&bot).await?,
        &[series("digibot_messages_debounced_total", 2.0)],
    )?;
    Ok(())
}
