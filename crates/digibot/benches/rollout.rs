//! The cost of a shadow rollout (a benchmark, not a test): the real binary
//! serving `echo`, customers writing at a steady rate over many
//! conversations, once with no rollout and once with `echo-v2` shadowing
//! `echo` (so every event runs two turns and records one comparison).
//!
//! Measured per run: the webhook-to-reply latency (the shadow turn runs
//! after the serving turn commits, so it should not move), the digibot
//! process's CPU time per event, and how long after the last reply the
//! last comparison was recorded. Guard: every message exactly one reply,
//! echo's; with the shadow, every message compared `different`.
//!
//! Needs `cargo build-plugins`. Run: `cargo bench -p digibot --bench
//! rollout [-- --rate 200 --messages 2000]`.

// The end-to-end tests' fake Digishare and process driver.
#[path = "../../../tests/e2e/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::{Value, json};
use support::durable::Poster;
use support::procfs::cpu_seconds;
use support::stats::percentile;
use support::{ADMIN_TOKEN, Digibot, FakeDigishare, customer_text, plugin_wasm};

#[derive(Parser, Debug)]
struct Args {
    /// Customer messages per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Messages per run.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Conversations they are spread over.
    #[arg(long, default_value_t = 100)]
    conversations: usize,
    /// Where the results go (JSON), relative to the repository.
    #[arg(long, default_value = "bench/rollout.json")]
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
        .block_on(async {
            let baseline = run(&args, false).await?;
            let shadow = run(&args, true).await?;
            let out = json!({
                "rate": args.rate,
                "messages": args.messages,
                "conversations": args.conversations,
                "baseline": baseline,
                "shadow": shadow,
            });
            println!("{out:#}");
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(&args.out);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, format!("{out:#}\n"))?;
            anyhow::Ok(())
        })
}

async fn report(client: &reqwest::Client, bot: &Digibot) -> Result<Value> {
    Ok(client
        .get(format!("{}/admin/plugins/echo/rollout?limit=1", bot.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .json()
        .await?)
}

async fn run(args: &Args, shadow: bool) -> Result<Value> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .env("RUST_LOG", "warn")
        .start()
        .await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    if shadow {
        let bytes = std::fs::read(plugin_wasm("echo_v2"))?;
        let status = client
            .put(format!("{}/admin/plugins/echo?mode=shadow", bot.url()))
            .bearer_auth(ADMIN_TOKEN)
            .body(bytes)
            .send()
            .await?
            .status();
        ensure!(status == 201, "starting the shadow: {status}");
    }
    let pid = bot.pid().context("no pid")?;
    let poster = Poster::new(&bot)?;
    let total = args.messages;
    let mut sent_at: HashMap<String, Instant> = HashMap::with_capacity(total);
    let mut posts = tokio::task::JoinSet::new();
    let cpu_before = cpu_seconds(pid).context("cpu time")?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..total {
        tick.tick().await;
        let conversation = format!("conv_ro_{:04}", n % args.conversations);
        let text = format!("m{n:05}");
        let body = customer_text(&conversation, &format!("msg_ro_{n:05}"), &text);
        sent_at.insert(text, Instant::now());
        let poster = poster.clone();
        posts.spawn(async move { poster.deliver(&body, Duration::from_secs(60)).await });
    }
    while let Some(posted) = posts.join_next().await {
        let status = posted??;
        ensure!(status == "accepted", "{status}");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while fake.received() < total {
        ensure!(
            Instant::now() < deadline,
            "{} of {total} replies",
            fake.received()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last_reply = Instant::now();
    let mut compared_after_ms = 0.0;
    if shadow {
        loop {
            let r = report(&client, &bot).await?;
            if r["totals"]["compared"] == total {
                ensure!(r["totals"]["different"] == total, "{:#}", r["totals"]);
                break;
            }
            ensure!(Instant::now() < deadline, "{:#}", r["totals"]);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        compared_after_ms = last_reply.elapsed().as_secs_f64() * 1e3;
    }
    let cpu = cpu_seconds(pid).context("cpu time")? - cpu_before;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut latency = Vec::with_capacity(total);
    for r in fake.requests() {
        let text = r.body["body"].as_str().unwrap_or_default();
        let sent = sent_at
            .remove(text)
            .with_context(|| format!("an unexpected or second reply: {text:?}"))?;
        latency.push(r.received_at.duration_since(sent).as_secs_f64() * 1e3);
    }
    ensure!(sent_at.is_empty(), "{} messages unanswered", sent_at.len());
    latency.sort_by(f64::total_cmp);
    Ok(json!({
        "reply_ms": {
            "p50": percentile(&latency, 50.0),
            "p99": percentile(&latency, 99.0),
            "max": percentile(&latency, 100.0),
        },
        "cpu_us_per_event": cpu * 1e6 / total as f64,
        "last_comparison_after_last_reply_ms": compared_after_ms,
    }))
}
