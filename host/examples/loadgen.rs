//! Load generator of the webhook benchmark (`scripts/bench-webhooks`): N
//! keep-alive connections post Digishare customer text messages (unique
//! message ids, spread over many conversations) as fast as they are
//! acknowledged, for D seconds after a warm-up, then print acknowledged
//! webhooks per second and latency percentiles.
//!
//! `cargo run --release -p digibot --example loadgen -- --url http://127.0.0.1:8080 -c 32 -d 10`

use clap::Parser;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug)]
#[command(about = "Posts webhooks and reports acknowledged req/s and latency")]
struct Args {
    /// Server base URL (the path /webhooks/digishare is appended).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrent connections (one request in flight each).
    #[arg(short, long, default_value_t = 32)]
    connections: usize,
    /// Measured seconds.
    #[arg(short, long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured seconds first (connections, caches, plugin pool).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Conversations the messages are spread over.
    #[arg(long, default_value_t = 1000)]
    conversations: usize,
    /// Webhook token, sent as `Authorization: Bearer`.
    #[arg(long)]
    token: Option<String>,
    /// Worker threads of the generator's runtime (the rest of the machine
    /// is left to the server).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Post agent messages (`model_type = "user"`): digibot records them
    /// and runs no plugin, which measures the webhook edge and the inbox
    /// alone.
    #[arg(long)]
    agent: bool,
    /// Post stickers instead of texts: plugins run, but echo answers
    /// nothing (measures the pipeline without the outbox and sender).
    #[arg(long)]
    sticker: bool,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// What one connection saw during the measured window.
#[derive(Default)]
struct Tally {
    /// Acknowledged, warm-up and tail included (each one owes a reply).
    total_acked: u64,
    acked: u64,
    failed: u64,
    latencies_us: Vec<u32>,
}

fn payload(run: u128, conn: usize, n: u64, args: &Args) -> String {
    let conversation = (conn as u64 * 7919 + n) % args.conversations as u64;
    let sender = if args.agent { "user" } else { "third" };
    let (kind, body) = if args.sticker {
        ("sticker", "null".to_string())
    } else {
        (
            "text",
            format!(r#""Bonjour, je voudrais suivre ma commande {n}""#),
        )
    };
    format!(
        r#"{{"event":"live_chat.new_message","data":{{"id":"lg_{run}_{conn}_{n}","data":{{"conversation_id":"conv_lg_{conversation}","system":false,"type":"{kind}","body":{body},"send_to_third":false,"sent_using":"whatsapp","created_at":"2026-03-14T09:12:55.000000Z","sender":{{"id":"sndr_thd_4Kd8sPq2","model_type":"{sender}","model_id":"thd_4Kd8sPq2","name":"Salma Idrissi"}}}}}}}}"#
    )
}

async fn connection(
    args: &Args,
    run: u128,
    conn: usize,
    start: Instant,
    end: Instant,
) -> anyhow::Result<Tally> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{}/webhooks/digishare", args.url.trim_end_matches('/'));
    let mut tally = Tally::default();
    let mut n = 0u64;
    loop {
        let sent = Instant::now();
        if sent >= end {
            return Ok(tally);
        }
        let mut req = client
            .post(&url)
            .header("content-type", "application/json")
            .body(payload(run, conn, n, args));
        if let Some(token) = &args.token {
            req = req.bearer_auth(token);
        }
        n += 1;
        let ok = match req.send().await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                // Read the body so the connection is reused.
                let _ = resp.bytes().await;
                ok
            }
            Err(_) => false,
        };
        let done = Instant::now();
        tally.total_acked += u64::from(ok);
        if sent < start || done > end {
            continue;
        }
        if ok {
            tally.acked += 1;
            tally
                .latencies_us
                .push((done - sent).as_micros().min(u32::MAX as u128) as u32);
        } else {
            tally.failed += 1;
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let args = std::sync::Arc::new(args);
    let tallies = runtime.block_on(async {
        let start = Instant::now() + Duration::from_secs(args.warmup);
        let end = start + Duration::from_secs(args.duration);
        let mut tasks = tokio::task::JoinSet::new();
        for conn in 0..args.connections {
            let args = args.clone();
            tasks.spawn(async move { connection(&args, run, conn, start, end).await });
        }
        let mut tallies = Vec::new();
        while let Some(t) = tasks.join_next().await {
            tallies.push(t??);
        }
        Ok::<_, anyhow::Error>(tallies)
    })?;

    let acked: u64 = tallies.iter().map(|t| t.acked).sum();
    let total_acked: u64 = tallies.iter().map(|t| t.total_acked).sum();
    let failed: u64 = tallies.iter().map(|t| t.failed).sum();
    let mut latencies: Vec<u32> = tallies.into_iter().flat_map(|t| t.latencies_us).collect();
    latencies.sort_unstable();
    let rps = acked as f64 / args.duration as f64;
    let mean = if latencies.is_empty() {
        0.0
    } else {
        latencies.iter().map(|&l| l as f64).sum::<f64>() / latencies.len() as f64 / 1000.0
    };
    let (p50, p90, p99) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
    );
    let max = latencies.last().copied().unwrap_or(0) as f64 / 1000.0;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "connections": args.connections, "seconds": args.duration,
                "acked": acked, "total_acked": total_acked, "failed": failed, "rps": rps.round(),
                "mean_ms": mean, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
            })
        );
    } else {
        println!(
            "{acked} acknowledged ({failed} failed) in {}s with {} connections: {rps:.0} req/s; latency ms mean {mean:.2} p50 {p50:.2} p90 {p90:.2} p99 {p99:.2} max {max:.2}",
            args.duration, args.connections
        );
    }
    Ok(())
}
