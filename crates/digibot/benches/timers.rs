//! Timer firing lateness (a benchmark, not a test): the real binary serving
//! `plugins/reminder`, which answers every customer text at once ("Noted")
//! and schedules a follow-up `after_ms` later. Customers write at a steady
//! rate (default 1,000 messages/s, each in its own conversation), so as
//! many timers come due per second.
//!
//! Measured: the **lateness** of each follow-up (its arrival at the fake
//! Messages API, minus its "Noted" reply's arrival, minus `after_ms`: when
//! the customer sees it against when it was due, the time the follow-up
//! takes through the pipeline included), and beside it, in the same run,
//! the **baseline**: the webhook-to-"Noted" latency of the same messages
//! (what any reply costs at that rate). Guard: every message exactly one
//! "Noted" and one follow-up; exits 1 otherwise.
//!
//! Needs `cargo build-plugins`. Run: `cargo bench -p digibot --bench
//! timers [-- --rate 1000 --seconds 5 --after-ms 2000]`.

// The end-to-end tests' fake Digishare and process driver.
#[path = "../../../tests/e2e/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::json;
use support::durable::Poster;
use support::stats::percentile;
use support::{Digibot, FakeDigishare, customer_text};

#[derive(Parser, Debug)]
struct Args {
    /// Customer messages (and so timers coming due) per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of messages.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The follow-up's delay.
    #[arg(long, default_value_t = 2000)]
    after_ms: u64,
    /// Where the results go (JSON), relative to the repository.
    #[arg(long, default_value = "bench/timers.json")]
    out: String,
    // `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(&args))
}

async fn run(args: &Args) -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin_toml(
            "reminder",
            &format!("[config]\nafter_ms = \"{}\"\n", args.after_ms),
        )
        .env("RUST_LOG", "warn")
        .start()
        .await?;
    let poster = Poster::new(&bot)?;
    let total = (args.rate * args.seconds) as usize;
    let mut sent_at: HashMap<String, Instant> = HashMap::with_capacity(total);
    let mut posts = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..total {
        tick.tick().await;
        let conversation = format!("conv_timer_{n:05}");
        let body = customer_text(&conversation, &format!("msg_timer_{n:05}"), "merci");
        sent_at.insert(conversation, Instant::now());
        let poster = poster.clone();
        posts.spawn(async move { poster.deliver(&body, Duration::from_secs(60)).await });
    }
    while let Some(posted) = posts.join_next().await {
        let status = posted??;
        ensure!(status == "accepted", "{status}");
    }
    let posting = started.elapsed();
    // Every message's two replies.
    let deadline = Instant::now() + Duration::from_millis(args.after_ms) + Duration::from_secs(120);
    while fake.received() < 2 * total {
        ensure!(
            Instant::now() < deadline,
            "{} of {} replies",
            fake.received(),
            2 * total
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut noted: HashMap<String, Instant> = HashMap::with_capacity(total);
    let mut followed: HashMap<String, Instant> = HashMap::with_capacity(total);
    for r in fake.requests() {
        ensure!(
            r.method == "POST" && r.path == "/v1/messages" && r.status < 300,
            "unexpected request: {} {} {}",
            r.method,
            r.path,
            r.status
        );
        let conversation = r.body["conversation_id"]
            .as_str()
            .context("a reply without a conversation")?
            .to_string();
        let text = r.body["body"].as_str().unwrap_or_default();
        let seen = if text.starts_with("Noted") {
            &mut noted
        } else {
            &mut followed
        };
        ensure!(
            seen.insert(conversation.clone(), r.received_at).is_none(),
            "{conversation}: two replies of a kind ({text})"
        );
    }
    ensure!(
        noted.len() == total && followed.len() == total,
        "{} noted, {} follow-ups of {total}",
        noted.len(),
        followed.len()
    );
    let after = Duration::from_millis(args.after_ms);
    let mut lateness = Vec::with_capacity(total);
    let mut reply = Vec::with_capacity(total);
    for (conversation, sent) in &sent_at {
        let (n, f) = (noted[conversation], followed[conversation]);
        reply.push(n.duration_since(*sent).as_secs_f64() * 1e3);
        lateness.push((f.duration_since(n).as_secs_f64() - after.as_secs_f64()) * 1e3);
    }
    lateness.sort_by(f64::total_cmp);
    reply.sort_by(f64::total_cmp);
    let line = |what: &str, v: &[f64]| {
        println!(
            "{what:<44} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().copied().unwrap_or_default()
        )
    };
    println!(
        "{total} messages at {} /s (posted in {:.2} s), follow-ups {} ms later",
        args.rate,
        posting.as_secs_f64(),
        args.after_ms
    );
    line("baseline: webhook -> \"Noted\" reply", &reply);
    line("timer lateness: follow-up - (Noted + after)", &lateness);
    let results = json!({
        "date": httpdate::fmt_http_date(std::time::SystemTime::now()),
        "messages": total,
        "rate_per_s": args.rate,
        "posted_in_s": posting.as_secs_f64(),
        "after_ms": args.after_ms,
        "reply_ms": {"p50": percentile(&reply, 50.0), "p99": percentile(&reply, 99.0)},
        "lateness_ms": {"p50": percentile(&lateness, 50.0), "p99": percentile(&lateness, 99.0),
                        "max": lateness.last()},
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(&args.out);
    std::fs::write(&out, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("results: {}", out.display());
    Ok(())
}
