//! Turns that wait on a slow outside API (a benchmark, not a test): the real
//! binary serving `plugins/orders`, whose every turn makes one granted call
//! to a local fake order API, at 1,000 conversations at once.
//!
//! Waves: every conversation's customer writes once (a text naming an order
//! number), and the next wave starts when all 1,000 replies reached the fake
//! Digishare, so each wave has 1,000 turns waiting on the API together.
//! Three targets, each started fresh, in the same run:
//!
//! - **echo**: `plugins/echo`, no outbound call (the pipeline's own cost);
//! - **api-0ms**: `orders` against an API that answers at once (what the
//!   call, its grant check, secret substitution and journal add);
//! - **api-200ms**: the same API answering after 200 ms.
//!
//! Measured per target: turns/s (replies over the waves' wall time),
//! webhook-to-reply latency p50/p99 (the POST's start to the fake's arrival
//! of the reply whose Idempotency-Key names that event), the server's peak
//! thread count against its idle count, CPU per turn (`/proc/PID/stat`,
//! all threads), and from `/metrics` the journal's record time per call
//! (`digibot_plugin_http_journal_seconds`: the durable write of one call's
//! outcome before the plugin sees it). The guard: every message got exactly
//! one reply and the API exactly one request per turn; exits 1 otherwise.
//!
//! Needs `cargo build-plugins`. Run: `cargo bench -p digibot --bench
//! slow_api [-- --conversations 1000 --waves 5 --delay-ms 200]`.

// The end-to-end tests' fake Digishare, fake order API and process driver.
#[path = "../../../tests/e2e/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde_json::{Value, json};
use support::durable::Poster;
use support::orders_api::FakeOrderApi;
use support::procfs::{cpu_seconds, threads};
use support::stats::percentile;
use support::{Digibot, FakeDigishare, customer_text};
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
struct Args {
    /// Conversations writing at once (one turn each per wave).
    #[arg(long, default_value_t = 1000)]
    conversations: usize,
    /// Waves of one message per conversation.
    #[arg(long, default_value_t = 5)]
    waves: usize,
    /// The slow API's answer time.
    #[arg(long, default_value_t = 200)]
    delay_ms: u64,
    /// Webhook POSTs in flight from the load generator.
    #[arg(long, default_value_t = 128)]
    posters: usize,
    /// Where the results go (JSON), relative to the repository.
    #[arg(long, default_value = "bench/slow_api.json")]
    out: String,
    // `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Echo,
    Api(u64),
}

impl Target {
    fn name(self) -> String {
        match self {
            Target::Echo => "echo".into(),
            Target::Api(ms) => format!("api-{ms}ms"),
        }
    }
    fn plugin(self) -> &'static str {
        match self {
            Target::Echo => "echo",
            Target::Api(_) => "orders",
        }
    }
}

#[derive(Debug)]
struct Run {
    target: Target,
    turns: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    idle_threads: usize,
    peak_threads: usize,
    peak_turns_in_flight: usize,
    cpu_us_per_turn: f64,
    journal_us_per_call: Option<f64>,
    api_requests: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let targets = [Target::Echo, Target::Api(0), Target::Api(args.delay_ms)];
    let mut runs = Vec::new();
    for target in targets {
        let run = runtime.block_on(run(&args, target))?;
        println!("{}", line(&run));
        runs.push(run);
    }
    let results = json!({
        "date": httpdate::fmt_http_date(std::time::SystemTime::now()),
        "conversations": args.conversations,
        "waves": args.waves,
        "runs": runs.iter().map(|r| json!({
            "target": r.target.name(),
            "turns": r.turns,
            "seconds": r.seconds,
            "turns_per_s": r.turns as f64 / r.seconds,
            "latency_ms": { "p50": r.p50_ms, "p99": r.p99_ms, "max": r.max_ms },
            "threads": { "idle": r.idle_threads, "peak": r.peak_threads },
            "peak_turns_in_flight": r.peak_turns_in_flight,
            "cpu_us_per_turn": r.cpu_us_per_turn,
            "journal_us_per_call": r.journal_us_per_call,
            "api_requests": r.api_requests,
        })).collect::<Vec<Value>>(),
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(&args.out);
    std::fs::write(&out, serde_json::to_string_pretty(&results)? + "\n")?;
    println!("results: {}", out.display());
    Ok(())
}

fn line(r: &Run) -> String {
    format!(
        "{:<10} {:>6} turns in {:>6.2} s = {:>7.0} turns/s; reply p50 {:>7.1} ms, p99 {:>7.1} ms, max {:>7.1} ms; threads {} idle, {} peak; turns in flight peak {}; CPU {:.0} µs/turn; journal {}",
        r.target.name(),
        r.turns,
        r.seconds,
        r.turns as f64 / r.seconds,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.idle_threads,
        r.peak_threads,
        r.peak_turns_in_flight,
        r.cpu_us_per_turn,
        r.journal_us_per_call
            .map_or("-".into(), |us| format!("{us:.0} µs/call")),
    )
}

fn conversation(c: usize) -> String {
    format!("conv_slow_{c:04}")
}

fn message_id(c: usize, wave: usize) -> String {
    format!("msg_slow_{c:04}_{wave:02}")
}

/// The order the message of `(c, wave)` asks about (every one known).
fn order(c: usize, wave: usize) -> String {
    format!("{}", 100_000 + c * 100 + wave)
}

async fn run(args: &Args, target: Target) -> Result<Run> {
    let fake = FakeDigishare::start().await?;
    let api = FakeOrderApi::start().await?;
    api.set_delay(Duration::from_millis(match target {
        Target::Api(ms) => ms,
        Target::Echo => 0,
    }));
    for c in 0..args.conversations {
        for wave in 0..args.waves {
            api.set_order(&order(c, wave), "shipped");
        }
    }
    let mut builder = Digibot::builder()
        .fake(&fake)
        .plugin(target.plugin())
        // Every conversation at once: lanes and turns above the thousand
        // (half the instance pool serves turns), a small resident set per
        // pooled memory (as the waiting-turns test).
        .env("DIGIBOT_CONCURRENCY", "1200")
        .env("DIGIBOT_POOL_INSTANCES", "2200")
        .env("DIGIBOT_KEEP_RESIDENT_KB", "64")
        .env("RUST_LOG", "warn")
        .env("DIGIBOT_SECRET_ORDERS_TOKEN", "tok_bench");
    if target != Target::Echo {
        builder = builder.plugin_toml(
            "orders",
            &format!(
                "[config]\norders_api = \"{url}\"\n[grants]\nhttp = [\"{url}/orders/\"]\nsecrets = [\"ORDERS_TOKEN\"]\n",
                url = api.url()
            ),
        );
    }
    let bot = builder.start().await?;
    let pid = bot.pid().context("digibot's pid")?;
    let idle_threads = threads(pid)?;
    let poster = Poster::new(&bot)?;
    let permits = Arc::new(Semaphore::new(args.posters));
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let mut peak_threads = idle_threads;
    let mut peak_turns = 0;
    let cpu_before = cpu_seconds(pid).context("cpu time")?;
    let started = Instant::now();
    for wave in 0..args.waves {
        let mut posts = tokio::task::JoinSet::new();
        for c in 0..args.conversations {
            let (poster, permits) = (poster.clone(), permits.clone());
            let id = message_id(c, wave);
            let body = customer_text(
                &conversation(c),
                &id,
                &format!("Bonjour, où en est ma commande {} ?", order(c, wave)),
            );
            posts.spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let at = Instant::now();
                let status = poster.deliver(&body, Duration::from_secs(120)).await?;
                ensure!(status == "accepted", "{id}: {status}");
                anyhow::Ok((id, at))
            });
        }
        while let Some(posted) = posts.join_next().await {
            let (id, at) = posted??;
            sent_at.insert(id, at);
        }
        // The wave is done when every one of its replies arrived.
        let want = (wave + 1) * args.conversations;
        let deadline = Instant::now() + Duration::from_secs(300);
        while fake.received() < want {
            ensure!(
                Instant::now() < deadline,
                "wave {wave}: {} of {want} replies after 300 s",
                fake.received()
            );
            peak_threads = peak_threads.max(threads(pid)?);
            peak_turns = peak_turns.max(
                bot.metric("digibot_plugin_turns_in_flight")
                    .await
                    .unwrap_or(0.0) as usize,
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).context("cpu time")? - cpu_before;
    // A straggler would be a duplicate: give one a moment to show.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let turns = args.conversations * args.waves;
    let mut latencies = Vec::with_capacity(turns);
    let mut replies: HashMap<String, usize> = HashMap::new();
    for r in fake.requests() {
        if r.method != "POST" || r.path != "/v1/messages" || r.status >= 300 {
            bail!(
                "unexpected request to the fake: {} {} {}",
                r.method,
                r.path,
                r.status
            );
        }
        let key = r.idempotency_key.clone().unwrap_or_default();
        let id = key
            .strip_prefix("live_chat.new_message:")
            .and_then(|k| k.split('/').next())
            .context("an Idempotency-Key that names no event")?
            .to_string();
        *replies.entry(id.clone()).or_default() += 1;
        let sent = sent_at
            .get(&id)
            .with_context(|| format!("a reply to {id}"))?;
        latencies.push(r.received_at.duration_since(*sent).as_secs_f64() * 1e3);
    }
    ensure!(
        replies.len() == turns && replies.values().all(|&n| n == 1),
        "every message exactly one reply: {} distinct of {turns}, {} sent twice",
        replies.len(),
        replies.values().filter(|&&n| n > 1).count()
    );
    let api_requests = api.requests().len();
    if target != Target::Echo {
        ensure!(
            api_requests == turns,
            "one API request per turn: {api_requests} for {turns}"
        );
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Run {
        target,
        turns,
        seconds,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: latencies.last().copied().unwrap_or_default(),
        idle_threads,
        peak_threads,
        peak_turns_in_flight: peak_turns,
        cpu_us_per_turn: cpu * 1e6 / turns as f64,
        journal_us_per_call: journal_mean_us(&bot).await,
        api_requests,
    })
}

/// The journal's mean record time per call, from its histogram.
async fn journal_mean_us(bot: &Digibot) -> Option<f64> {
    let sum = bot
        .metric("digibot_plugin_http_journal_seconds_sum")
        .await
        .ok()?;
    let count = bot
        .metric("digibot_plugin_http_journal_seconds_count")
        .await
        .ok()?;
    (count > 0.0).then(|| sum / count * 1e6)
}
