//! Turns that wait hold no thread: a thousand conversations whose plugin
//! turns each sleep 2 s (a clock-granted plugin, its wall-clock deadline
//! raised) are all answered, in order, while the server's thread count
//! stays flat and its turns in flight reach the thousands' order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::support::burst::{LONG, check_replies, join_answers, post_burst, wait_distinct_replies};
use crate::support::durable::Poster;
use crate::support::procfs::threads;
use crate::support::*;

const TEST: &str = "naps";
const CONVERSATIONS: usize = 1000;
const PER_CONVERSATION: usize = 2;
const NAP_MS: u64 = 2000;

#[tokio::test]
async fn a_thousand_sleeping_turns_are_answered_in_order_on_a_few_threads() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let mut bot = Digibot::builder()
        .fake(&fake)
        // Every conversation at once: lanes and turns are bounded above
        // the thousand (half of the instance pool serves turns); a small
        // resident set per pooled memory keeps the test's memory modest.
        .env("DIGIBOT_CONCURRENCY", "1200")
        .env("DIGIBOT_POOL_INSTANCES", "2200")
        .env("DIGIBOT_KEEP_RESIDENT_KB", "64")
        .start()
        .await?;
    // The sleeper, napping before it answers the text as echo does, is
    // installed as `echo`: the burst's exact checks (keys, bodies, order)
    // then apply as they are.
    bot.kill9()?;
    std::fs::copy(
        plugin_wasm("hostile_sleep"),
        bot.plugins_dir.join("echo.wasm"),
    )?;
    std::fs::write(
        bot.plugins_dir.join("echo.toml"),
        format!(
            "[config]\nnap_ms = \"{NAP_MS}\"\n[grants]\nclock = true\n[limits]\nwall_ms = 20000\n"
        ),
    )?;
    bot.restart().await?;
    let pid = bot.pid().context("digibot's pid")?;
    let idle_threads = threads(pid)?;

    let poster = Poster::new(&bot)?;
    let acked = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks = post_burst(&poster, TEST, CONVERSATIONS, PER_CONVERSATION, 64, acked);

    // Sampled while the turns sleep: threads and turns in flight.
    let done = AtomicBool::new(false);
    let max_threads = AtomicUsize::new(idle_threads);
    let max_turns = AtomicUsize::new(0);
    let watch = async {
        while !done.load(Ordering::Relaxed) {
            max_threads.fetch_max(threads(pid)?, Ordering::Relaxed);
            max_turns.fetch_max(
                bot.metric("digibot_plugin_turns_in_flight").await? as usize,
                Ordering::Relaxed,
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    };
    let work = async {
        let answers = join_answers(tasks).await?;
        ensure!(
            answers.get("accepted") == Some(&(CONVERSATIONS * PER_CONVERSATION)),
            "every webhook accepted once: {answers:?}"
        );
        wait_distinct_replies(&fake, CONVERSATIONS * PER_CONVERSATION, LONG).await?;
        done.store(true, Ordering::Relaxed);
        anyhow::Ok(())
    };
    let (watched, worked) = tokio::join!(watch, work);
    worked?;
    watched?;
    let took = started.elapsed();

    let duplicates = check_replies(&fake, TEST, CONVERSATIONS, PER_CONVERSATION)?;
    ensure!(duplicates.is_empty(), "sent twice: {:?}", duplicates.keys());
    let max_threads = max_threads.into_inner();
    let max_turns = max_turns.into_inner();
    eprintln!(
        "{} naps of {NAP_MS} ms in {CONVERSATIONS} conversations: {took:?}; threads {idle_threads} idle, {max_threads} at most; turns in flight at most {max_turns}",
        CONVERSATIONS * PER_CONVERSATION
    );
    ensure!(
        max_turns >= CONVERSATIONS / 2,
        "the naps overlapped: at most {max_turns} turns in flight"
    );
    // A thread per waiting turn would be hundreds more.
    ensure!(
        max_threads <= idle_threads + 16,
        "threads grew from {idle_threads} to {max_threads} with {max_turns} turns in flight"
    );
    // Two naps per conversation back to back: about 4 s of naps, not
    // 2,000 × 2 s. Generous for a loaded 2-core machine.
    ensure!(took < Duration::from_secs(120), "the naps took {took:?}");
    let _ = &mut bot;
    Ok(())
}
