//! Load benchmark (not a test): digibot against its ceiling, in the same
//! run, with the same load (`scripts/bench-load` builds, runs this, and
//! writes the report).
//!
//! Targets, each started fresh and loaded by `wrk` with `benches/load.lua`
//! (a unique message id per request, bodies from the shared fixtures):
//!
//! - **bare**: `examples/bare_axum.rs`, an axum handler that only parses
//!   the JSON and answers 200: the ceiling.
//! - **inbox**: `digibot serve` (durability on, echo loaded, real sender)
//!   fed agent messages: each is authenticated, parsed, committed to the
//!   inbox and acknowledged, and runs no plugin (the edge alone).
//! - **pipeline**: the same digibot fed customer texts: each is committed,
//!   dispatched, answered by echo, queued in the outbox and sent to the
//!   end-to-end tests' fake Digishare, all while the load runs.
//! - **paced**: the same pipeline at a steady rate it sustains (each
//!   connection waits between requests), so that webhook-to-API latency is
//!   the pipeline's and not the length of a backlog.
//! - **pg1**, **pg2**, **pg3** (replicas mode): the pipeline on PostgreSQL
//!   (a fresh database in the cluster of `DIGIBOT_TEST_DATABASE_URL`) with
//!   1, 2 or 3 replicas sharing one fake Digishare, the connections split
//!   over one wrk per replica (as a load balancer would); their figures
//!   add up (rates, CPU, RSS) or take the worst (latency percentiles).
//!   Also reported for every digibot target: database round trips per
//!   acknowledged webhook (`digibot_store_round_trips_total` of every
//!   replica, background work included).
//!
//! Measured per target: acknowledged webhooks/s, ack latency p50/p99 (wrk),
//! webhook-to-API latency p50/p99 (the client's send time, carried in the
//! message id, to the fake's arrival time of the Messages API request whose
//! Idempotency-Key names that event), peak RSS (`VmHWM`) and the server's
//! CPU time per acknowledged webhook (`/proc/PID/stat`, all threads: the
//! figure other load on the machine disturbs least); each as a ratio to
//! the bare handler of the same round. The correctness guard
//! checks that every acknowledged webhook produced exactly one API request
//! (pipeline) or none (inbox); the process exits 1 if it does not hold.
//!
//! Needs `wrk`, the echo plugin and the `bare_axum` example built in
//! release. Run: `scripts/bench-load`, or
//! `cargo bench -p digibot --bench load -- --help`.

// The end-to-end tests' fake Digishare, process driver and fixtures.
#[path = "../../../tests/e2e/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use support::procfs::{cpu_seconds, peak_rss_kib};
use support::stats::percentile;
use support::{Digibot, FakeDigishare, WEBHOOK_TOKEN, agent_text, customer_text, free_port};

/// The event key digibot gives a `live_chat.new_message` (and puts first in
/// the Idempotency-Key of the requests it causes).
const KEY_PREFIX: &str = "live_chat.new_message:";

#[derive(Parser, Debug)]
#[command(about = "digibot vs a bare axum handler under the same wrk load")]
struct Args {
    /// Open connections (one request in flight each).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Measured seconds per target.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured seconds before each measurement (connections, caches,
    /// warm pools).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// wrk threads (the rest of the machine is the server's).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Rounds of all targets; the table shows each figure's median.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Conversations the messages are spread over.
    #[arg(long, default_value_t = 1000)]
    conversations: usize,
    /// DIGIBOT_DURABILITY of the digibot targets.
    #[arg(long, default_value = "full")]
    durability: String,
    /// The steady rate of the paced target, webhooks/s.
    #[arg(long, default_value_t = 1000)]
    paced_rate: u64,
    /// Targets, in order, each round.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bare,inbox,pipeline,paced"
    )]
    targets: Vec<Target>,
    /// Write the results (every round, medians, machine) here as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A note on the conditions, kept in the results.
    #[arg(long, default_value = "")]
    note: String,
    /// A setting of every digibot target, `KEY=VALUE` (repeatable), e.g.
    /// `--set DIGIBOT_DATABASE_POOL=32`: kept in the results' settings.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = setting)]
    settings: Vec<(String, String)>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// `--set`'s value, split once when parsed (refused unless `KEY=VALUE`).
fn setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Bare,
    Inbox,
    Pipeline,
    Paced,
    Pg1,
    Pg2,
    Pg3,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Bare => "bare",
            Target::Inbox => "inbox",
            Target::Pipeline => "pipeline",
            Target::Paced => "paced",
            Target::Pg1 => "pg1",
            Target::Pg2 => "pg2",
            Target::Pg3 => "pg3",
        }
    }

    /// Replicas on PostgreSQL (0: SQLite, or not digibot).
    fn replicas(self) -> usize {
        match self {
            Target::Pg1 => 1,
            Target::Pg2 => 2,
            Target::Pg3 => 3,
            _ => 0,
        }
    }

    fn label(self, args: &Args) -> String {
        match self {
            Target::Bare => "bare axum: parse JSON, answer 200 (ceiling)".into(),
            Target::Inbox => "digibot edge + durable inbox (agent messages, no plugin runs)".into(),
            Target::Pipeline => {
                "digibot full pipeline (echo answers every text, real sender)".into()
            }
            Target::Paced => format!(
                "digibot full pipeline, paced at ≤ {} webhooks/s (no backlog)",
                args.paced_rate
            ),
            Target::Pg1 | Target::Pg2 | Target::Pg3 => format!(
                "digibot full pipeline on PostgreSQL, {} replica(s)",
                self.replicas()
            ),
        }
    }

    /// Whether it runs as fast as answers come (its rate and ack latency
    /// compare with the ceiling's).
    fn saturating(self) -> bool {
        self != Target::Paced
    }

    /// Each acknowledged webhook owes one Messages API request.
    fn answers(self) -> bool {
        matches!(self, Target::Pipeline | Target::Paced) || self.replicas() > 0
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let work = tempfile::Builder::new().prefix("digibot-load-").tempdir()?;
    let machine_before = machine();
    eprintln!(
        "load benchmark: {} connections, {} s measured after {} s warm-up, wrk {} thread(s), {} round(s), durability {}",
        args.connections, args.seconds, args.warmup, args.threads, args.rounds, args.durability
    );
    let started = Instant::now();
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for &target in &args.targets {
            let run = runtime
                .block_on(run_target(&args, target, round, work.path()))
                .with_context(|| format!("round {round}, {}", target.name()))?;
            eprintln!("{}", one_line(&run));
            runs.push(run);
        }
    }
    let summary = summarise(&args, &runs);
    let guard_ok = runs.iter().all(|r| r.guard_ok());
    let results = json!({
        "settings": {
            "connections": args.connections, "seconds": args.seconds, "warmup": args.warmup,
            "wrk_threads": args.threads, "rounds": args.rounds,
            "set": args.settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "conversations": args.conversations, "durability": args.durability,
        },
        "note": args.note,
        "machine": machine_before,
        "load_after": loadavg(),
        "elapsed_s": started.elapsed().as_secs_f64(),
        "summary": summary,
        "table": table(&summary),
        "runs": runs.iter().map(Run::to_json).collect::<Vec<_>>(),
        "guard_ok": guard_ok,
    });
    println!("{}", table(&summary));
    println!("{}", serde_json::to_string(&results["summary"])?);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&results)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("results written to {}", out.display());
    }
    if !guard_ok {
        bail!("the correctness guard failed: see `guard` in the runs above");
    }
    Ok(())
}

// ---- one target ------------------------------------------------------------

/// What wrk reported for one run (`done()` in load.lua).
#[derive(Debug, Default)]
struct Wrk {
    duration: Duration,
    sent: u64,
    acked: u64,
    refused: u64,
    socket_errors: u64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Event keys of the acknowledged webhooks (digibot answers them).
    ids: Vec<String>,
}

impl Wrk {
    /// Several wrk runs at once (one per replica) as one: counts add up,
    /// the duration is the longest, each latency percentile the worst.
    fn merge(runs: Vec<Wrk>) -> Wrk {
        let mut all = Wrk::default();
        for w in runs {
            all.duration = all.duration.max(w.duration);
            all.sent += w.sent;
            all.acked += w.acked;
            all.refused += w.refused;
            all.socket_errors += w.socket_errors;
            all.p50_us = all.p50_us.max(w.p50_us);
            all.p90_us = all.p90_us.max(w.p90_us);
            all.p99_us = all.p99_us.max(w.p99_us);
            all.max_us = all.max_us.max(w.max_us);
            all.ids.extend(w.ids);
        }
        all
    }
}

/// Every acknowledged webhook vs the Messages API requests that reached the
/// fake, joined on the event key.
#[derive(Debug, Default)]
struct Guard {
    /// Acknowledged (warm-up and measured runs).
    acked: usize,
    /// 2xx answers wrk counted whose event id it could not read.
    acked_without_id: usize,
    api_requests: usize,
    /// Acknowledged webhooks with no request.
    missing: usize,
    /// Event keys with more than one request.
    duplicated: usize,
    /// Requests for webhooks wrk sent but had no answer to when it stopped
    /// (digibot committed them; at most one per connection and run).
    in_flight_at_stop: usize,
    /// Requests whose Idempotency-Key names no webhook of this run.
    foreign: usize,
    /// Requests digibot owes: one per acknowledged webhook (pipeline) or
    /// none (inbox).
    expected_per_webhook: usize,
    /// Seconds from the end of the load to the last request owed.
    drain_s: f64,
    allowed_in_flight: usize,
}

impl Guard {
    fn ok(&self) -> bool {
        self.acked_without_id == 0
            && self.missing == 0
            && self.duplicated == 0
            && self.foreign == 0
            && self.in_flight_at_stop <= self.allowed_in_flight
    }
}

struct Run {
    target: Target,
    round: usize,
    wrk: Wrk,
    acked_per_s: f64,
    /// Send to arrival at the fake, measured run only.
    e2e_us: Option<(f64, f64)>,
    peak_rss_kib: Option<u64>,
    /// The server's CPU time (all threads, user + system) from the start
    /// of the warm-up to the end of the drain, per webhook acknowledged:
    /// the figure the machine's other load disturbs least.
    cpu_us_per_webhook: Option<f64>,
    /// Database round trips (all replicas, background work included) per
    /// webhook acknowledged.
    round_trips_per_webhook: Option<f64>,
    guard: Option<Guard>,
}

impl Run {
    fn guard_ok(&self) -> bool {
        self.guard.as_ref().is_none_or(Guard::ok)
    }

    fn to_json(&self) -> Value {
        json!({
            "target": self.target.name(),
            "round": self.round,
            "acked_per_s": self.acked_per_s.round(),
            "ack_ms": {
                "p50": self.wrk.p50_us / 1000.0, "p90": self.wrk.p90_us / 1000.0,
                "p99": self.wrk.p99_us / 1000.0, "max": self.wrk.max_us / 1000.0,
            },
            "webhook_to_api_ms": self.e2e_us.map(|(p50, p99)| json!({"p50": p50 / 1000.0, "p99": p99 / 1000.0})),
            "peak_rss_kib": self.peak_rss_kib,
            "cpu_us_per_webhook": self.cpu_us_per_webhook,
            "round_trips_per_webhook": self.round_trips_per_webhook,
            "wrk": {
                "seconds": self.wrk.duration.as_secs_f64(), "sent": self.wrk.sent,
                "acked": self.wrk.acked, "refused": self.wrk.refused,
                "socket_errors": self.wrk.socket_errors,
            },
            "guard": self.guard.as_ref().map(|g| json!({
                "ok": g.ok(),
                "acked": g.acked, "acked_without_id": g.acked_without_id,
                "api_requests": g.api_requests, "expected_per_webhook": g.expected_per_webhook,
                "missing": g.missing, "duplicated": g.duplicated,
                "in_flight_at_stop": g.in_flight_at_stop,
                "allowed_in_flight": g.allowed_in_flight, "foreign": g.foreign,
                "drain_s": g.drain_s,
            })),
        })
    }
}

/// The server under load: a child process either way.
enum Server {
    Bare(Child),
    /// One digibot, or several replicas on one database, and their fake.
    Digibot(Vec<Digibot>, FakeDigishare),
}

impl Server {
    fn pids(&self) -> Vec<u32> {
        match self {
            Server::Bare(child) => vec![child.id()],
            Server::Digibot(bots, _) => bots.iter().filter_map(Digibot::pid).collect(),
        }
    }

    /// Summed over the processes; `None` if one has no figure.
    fn sum(&self, f: impl Fn(u32) -> Option<f64>) -> Option<f64> {
        self.pids().into_iter().map(f).sum()
    }
}

/// `digibot_store_round_trips_total` summed over `bots` (their /metrics).
async fn round_trips(bots: &[Digibot]) -> Option<f64> {
    let mut total = 0.0;
    for bot in bots {
        let text = bot.admin_get("/metrics").await.ok()?.body;
        total += text
            .lines()
            .find(|l| l.starts_with("digibot_store_round_trips_total "))?
            .split_whitespace()
            .nth(1)?
            .parse::<f64>()
            .ok()?;
    }
    Some(total)
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Bare(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `<target>/release/examples/bare_axum`, next to the digibot binary.
fn bare_axum_bin() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_digibot"))
        .with_file_name("examples")
        .join("bare_axum")
}

async fn start(args: &Args, target: Target, round: usize) -> Result<(Server, Vec<String>)> {
    if target == Target::Bare {
        let bin = bare_axum_bin();
        if !bin.is_file() {
            bail!(
                "{} not found: `cargo build --release -p digibot --example bare_axum` first",
                bin.display()
            );
        }
        let addr = format!("127.0.0.1:{}", free_port()?);
        let child = Command::new(&bin)
            .arg(&addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let url = format!("http://{addr}");
        let server = Server::Bare(child);
        wait_healthy(&url).await?;
        return Ok((server, vec![url]));
    }
    let fake = FakeDigishare::start().await?;
    let mut builder = Digibot::builder()
        .fake(&fake)
        .env("RUST_LOG", "warn")
        .env("DIGIBOT_DURABILITY", &args.durability)
        .env("DIGIBOT_WATCH_PLUGINS", "false")
        .plugin("echo");
    for (key, value) in &args.settings {
        builder = builder.env(key, value);
    }
    let bots = match target.replicas() {
        0 => vec![builder.start().await?],
        n => {
            let name = format!("bench_{}_{round}", target.name());
            let database = support::pg::fresh_database(&name).await?.context(
                "the replica targets need DIGIBOT_TEST_DATABASE_URL (scripts/pg-cluster start)",
            )?;
            builder.database(&database).start_replicas(n).await?
        }
    };
    let urls = bots.iter().map(|b| b.url().to_string()).collect();
    Ok((Server::Digibot(bots, fake), urls))
}

async fn wait_healthy(url: &str) -> Result<()> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} not healthy after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_target(args: &Args, target: Target, round: usize, work: &Path) -> Result<Run> {
    let (server, urls) = start(args, target, round).await?;
    // The same bytes for the ceiling and the pipeline; agent messages for
    // the inbox.
    let template = match target {
        Target::Inbox => agent_text(
            "@CONV@",
            "@ID@",
            "Bonjour Salma, je regarde votre commande.",
        ),
        _ => customer_text("@CONV@", "@ID@", "Bonjour, je voudrais suivre ma commande"),
    };
    let template_path = work.join(format!("{}.json", target.name()));
    std::fs::write(&template_path, serde_json::to_string(&template)? + "\n")?;
    let token = match target {
        Target::Bare => "",
        _ => WEBHOOK_TOKEN,
    };
    let tag = |phase: &str| format!("{phase}{round}{}", &target.name()[..1]);
    // Paced: every connection waits between requests, so that all of
    // them together post about `paced_rate` a second.
    let delay_ms = match target {
        Target::Paced => (args.connections as u64 * 1000).div_ceil(args.paced_rate.max(1)),
        _ => 0,
    };
    // One wrk per replica, the connections split between them.
    let wrk_run = |phase: &str, seconds: u64| {
        let connections = args.connections.div_ceil(urls.len()).max(1);
        let loads: Vec<Load> = urls
            .iter()
            .enumerate()
            .map(|(i, url)| Load {
                url,
                template: &template_path,
                token,
                tag: if urls.len() == 1 {
                    tag(phase)
                } else {
                    format!("{}r{i}", tag(phase))
                },
                seconds,
                delay_ms,
                connections,
                ids_out: work.join(format!("{}-{phase}-{i}.ids", target.name())),
            })
            .collect();
        std::thread::scope(|scope| {
            let runs: Vec<_> = loads
                .iter()
                .map(|load| scope.spawn(move || wrk(args, load)))
                .collect();
            let mut all = Vec::new();
            for run in runs {
                all.push(
                    run.join()
                        .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??,
                );
            }
            Ok::<_, anyhow::Error>(Wrk::merge(all))
        })
    };
    let cpu_before = server.sum(cpu_seconds);
    let warm = wrk_run("w", args.warmup)?;
    let measured = wrk_run("m", args.seconds)?;
    let load_stopped = Instant::now();
    let acked_per_s = measured.acked as f64 / measured.duration.as_secs_f64().max(1e-9);

    let mut run = Run {
        target,
        round,
        wrk: Wrk::default(),
        acked_per_s,
        e2e_us: None,
        peak_rss_kib: None,
        cpu_us_per_webhook: None,
        round_trips_per_webhook: None,
        guard: None,
    };
    if let Server::Digibot(bots, fake) = &server {
        let owed = if target.answers() {
            warm.ids.len() + measured.ids.len()
        } else {
            0
        };
        drain(fake, owed).await;
        let drain_s = load_stopped.elapsed().as_secs_f64();
        let requests = fake.requests();
        let (guard, e2e) = check(args, target, &warm, &measured, &requests, &tag("m"));
        run.guard = Some(Guard { drain_s, ..guard });
        run.e2e_us = e2e;
        if bots.iter().any(|b| b.pid().is_none()) {
            bail!("digibot is not running");
        }
        let webhooks = (warm.acked + measured.acked).max(1) as f64;
        run.round_trips_per_webhook = round_trips(bots).await.map(|n| n / webhooks);
    }
    // After the drain: the peak and the CPU time cover the backlog too.
    run.peak_rss_kib = server
        .sum(|pid| peak_rss_kib(pid).map(|k| k as f64))
        .map(|k| k as u64);
    let cpu_after = server.sum(cpu_seconds);
    let webhooks = (warm.acked + measured.acked).max(1) as f64;
    run.cpu_us_per_webhook = cpu_before
        .zip(cpu_after)
        .map(|(before, after)| (after - before) * 1e6 / webhooks);
    run.wrk = measured;
    drop(server);
    Ok(run)
}

/// Waits until `owed` requests arrived (2 min at most), then until none
/// arrive for half a second, so that late duplicates are seen.
async fn drain(fake: &FakeDigishare, owed: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while fake.received() < owed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen = fake.received();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(500) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = fake.received();
        if now != seen {
            seen = now;
            quiet_since = Instant::now();
        }
    }
}

/// The client's send time (µs since the epoch) in a message id
/// `TAG-THREAD-N-SENTUS`.
fn sent_us(message_id: &str) -> Option<u64> {
    message_id.rsplit('-').next()?.parse().ok()
}

/// The guard, and the webhook-to-API latency percentiles of the measured
/// run (`measured_tag`).
fn check(
    args: &Args,
    target: Target,
    warm: &Wrk,
    measured: &Wrk,
    requests: &[support::Recorded],
    measured_tag: &str,
) -> (Guard, Option<(f64, f64)>) {
    // Wall clock of an Instant, to compare with the client's send times.
    let (wall_now, mono_now) = (SystemTime::now(), Instant::now());
    let wall_us = |at: Instant| {
        let wall = wall_now - mono_now.saturating_duration_since(at);
        wall.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    };
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    let mut foreign = 0;
    let mut latencies = Vec::new();
    for r in requests {
        let event = r
            .idempotency_key
            .as_deref()
            .and_then(|k| k.split('/').next())
            .filter(|k| k.starts_with(KEY_PREFIX));
        let Some(event) = event else {
            foreign += 1;
            continue;
        };
        *per_key.entry(event).or_default() += 1;
        let id = &event[KEY_PREFIX.len()..];
        // `TAG-…`, or `TAGrI-…` with one wrk per replica.
        if id.starts_with(measured_tag)
            && let Some(sent) = sent_us(id)
        {
            latencies.push(wall_us(r.received_at).saturating_sub(sent) as f64);
        }
    }
    let acked: Vec<&str> = warm
        .ids
        .iter()
        .chain(&measured.ids)
        .map(String::as_str)
        .collect();
    let expected_per_webhook = usize::from(target.answers());
    let mut guard = Guard {
        acked: acked.len(),
        acked_without_id: ((warm.acked + measured.acked) as usize).saturating_sub(acked.len()),
        api_requests: requests.len(),
        expected_per_webhook,
        allowed_in_flight: 2 * args.connections,
        ..Guard::default()
    };
    if expected_per_webhook == 0 {
        // Nothing is owed: every request is one too many.
        guard.foreign = requests.len();
        return (guard, None);
    }
    let acked_set: std::collections::HashSet<&str> = acked.iter().copied().collect();
    guard.missing = acked.iter().filter(|k| !per_key.contains_key(*k)).count();
    guard.duplicated = per_key.values().filter(|&&n| n > 1).count();
    guard.in_flight_at_stop = per_key.keys().filter(|k| !acked_set.contains(*k)).count();
    guard.foreign = foreign;
    latencies.sort_by(f64::total_cmp);
    let e2e = (!latencies.is_empty())
        .then(|| (percentile(&latencies, 50.0), percentile(&latencies, 99.0)));
    (guard, e2e)
}

/// One wrk run of load.lua.
struct Load<'a> {
    url: &'a str,
    /// The webhook, one line, with `@ID@` and `@CONV@`.
    template: &'a Path,
    /// Webhook bearer token (empty: none).
    token: &'a str,
    /// First part of every message id: tells the runs apart.
    tag: String,
    seconds: u64,
    /// Pause of each connection between requests (0: none).
    delay_ms: u64,
    /// Open connections of this wrk.
    connections: usize,
    /// Where load.lua writes the acknowledged event ids.
    ids_out: PathBuf,
}

/// Runs wrk for `load.seconds` and reads its summary.
fn wrk(args: &Args, load: &Load) -> Result<Wrk> {
    let Load {
        url,
        template,
        token,
        ref tag,
        seconds,
        delay_ms,
        connections,
        ref ids_out,
    } = *load;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/load.lua");
    let output = Command::new("wrk")
        .env("WRK_IDS_OUT", ids_out)
        .env("WRK_DELAY_MS", delay_ms.to_string())
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--timeout")
        .arg("10s")
        .arg("-s")
        .arg(&script)
        .arg(url)
        .arg("--")
        .arg(template)
        .arg(token)
        .arg(tag)
        .arg(args.conversations.to_string())
        .stdin(Stdio::null())
        .output()
        .context("running wrk (scripts/bench-load installs it)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let (true, Some(line)) = (output.status.success(), line) else {
        bail!(
            "wrk failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let v: Value = serde_json::from_str(line).with_context(|| format!("wrk printed {line}"))?;
    let n = |k: &str| v[k].as_u64().unwrap_or_default();
    let lat = |k: &str| v["latency_us"][k].as_f64().unwrap_or_default();
    let ids = std::fs::read_to_string(ids_out)
        .with_context(|| format!("reading {}", ids_out.display()))?
        .lines()
        .map(str::to_string)
        .collect();
    Ok(Wrk {
        duration: Duration::from_micros(n("duration_us")),
        sent: n("sent"),
        acked: n("acked"),
        refused: n("refused"),
        socket_errors: n("socket_errors"),
        p50_us: lat("p50"),
        p90_us: lat("p90"),
        p99_us: lat("p99"),
        max_us: lat("max"),
        ids,
    })
}

// ---- report ----------------------------------------------------------------

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Per target: the median of each figure over the rounds, and of its
/// ratio to the same round's bare handler.
fn summarise(args: &Args, runs: &[Run]) -> Value {
    let bare = |round: usize| {
        runs.iter()
            .find(|r| r.round == round && r.target == Target::Bare)
    };
    let mut out = Vec::new();
    for &target in &args.targets {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.target == target).collect();
        let figure =
            |f: &dyn Fn(&Run) -> Option<f64>| median(mine.iter().filter_map(|r| f(r)).collect());
        let ratio = |f: &dyn Fn(&Run) -> Option<f64>| {
            median(
                mine.iter()
                    .filter_map(|r| Some(f(r)? / f(bare(r.round)?)?))
                    .collect(),
            )
        };
        // A paced target's rate and latency are set by the pacing, not
        // comparable with the saturated ceiling.
        let loaded_ratio = |f: &dyn Fn(&Run) -> Option<f64>| {
            if target.saturating() { ratio(f) } else { None }
        };
        let acked = |r: &Run| Some(r.acked_per_s);
        let p50 = |r: &Run| Some(r.wrk.p50_us / 1000.0);
        let p99 = |r: &Run| Some(r.wrk.p99_us / 1000.0);
        let rss = |r: &Run| r.peak_rss_kib.map(|k| k as f64 / 1024.0);
        let cpu = |r: &Run| r.cpu_us_per_webhook;
        out.push(json!({
            "target": target.name(),
            "label": target.label(args),
            "saturating": target.saturating(),
            "rounds": mine.len(),
            "acked_per_s": figure(&acked).map(f64::round),
            "acked_vs_ceiling": loaded_ratio(&acked),
            "ack_p50_ms": figure(&p50),
            "ack_p50_vs_ceiling": loaded_ratio(&p50),
            "ack_p99_ms": figure(&p99),
            "ack_p99_vs_ceiling": loaded_ratio(&p99),
            "webhook_to_api_p50_ms": figure(&|r: &Run| Some(r.e2e_us?.0 / 1000.0)),
            "webhook_to_api_p99_ms": figure(&|r: &Run| Some(r.e2e_us?.1 / 1000.0)),
            "peak_rss_mib": figure(&rss),
            "peak_rss_vs_ceiling": ratio(&rss),
            "cpu_us_per_webhook": figure(&cpu),
            "cpu_vs_ceiling": ratio(&cpu),
            "round_trips_per_webhook": figure(&|r: &Run| r.round_trips_per_webhook),
            "guard_ok": mine.iter().all(|r| r.guard_ok()),
            "acked_per_s_runs": mine.iter().map(|r| r.acked_per_s.round()).collect::<Vec<_>>(),
        }));
    }
    Value::Array(out)
}

/// The summary as a Markdown table (scripts/bench-load-report writes the
/// same one into BENCHMARKS.md).
fn table(summary: &Value) -> String {
    let num = |v: &Value, digits: usize| {
        v.as_f64()
            .map_or("—".to_string(), |x| format!("{x:.digits$}"))
    };
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("—".to_string(), |x| format!("{:.1}%", x * 100.0))
    };
    let times = |v: &Value| v.as_f64().map_or("—".to_string(), |x| format!("{x:.2}×"));
    let mut out = String::from(
        "| target | acked/s | vs ceiling | ack p50 ms | ack p99 ms | webhook→API p50 ms | webhook→API p99 ms | peak RSS MiB | server CPU µs/webhook | guard |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in summary.as_array().into_iter().flatten() {
        out += &format!(
            "| {} | {} | {} | {} ({}) | {} ({}) | {} | {} | {} ({}) | {} ({}) | {} |\n",
            s["label"].as_str().unwrap_or_default(),
            num(&s["acked_per_s"], 0),
            pct(&s["acked_vs_ceiling"]),
            num(&s["ack_p50_ms"], 2),
            times(&s["ack_p50_vs_ceiling"]),
            num(&s["ack_p99_ms"], 2),
            times(&s["ack_p99_vs_ceiling"]),
            num(&s["webhook_to_api_p50_ms"], 2),
            num(&s["webhook_to_api_p99_ms"], 2),
            num(&s["peak_rss_mib"], 1),
            times(&s["peak_rss_vs_ceiling"]),
            num(&s["cpu_us_per_webhook"], 1),
            times(&s["cpu_vs_ceiling"]),
            if s["target"] == "bare" {
                "—"
            } else if s["guard_ok"] == true {
                "ok"
            } else {
                "FAILED"
            },
        );
    }
    out
}

fn one_line(run: &Run) -> String {
    let mut line = format!(
        "round {} {:<8} {:>8.0} acked/s  ack p50 {:.2} ms p99 {:.2} ms",
        run.round,
        run.target.name(),
        run.acked_per_s,
        run.wrk.p50_us / 1000.0,
        run.wrk.p99_us / 1000.0
    );
    if let Some((p50, p99)) = run.e2e_us {
        line += &format!(
            "  webhook→API p50 {:.2} ms p99 {:.2} ms",
            p50 / 1000.0,
            p99 / 1000.0
        );
    }
    if let Some(kib) = run.peak_rss_kib {
        line += &format!("  peak RSS {:.1} MiB", kib as f64 / 1024.0);
    }
    if let Some(cpu) = run.cpu_us_per_webhook {
        line += &format!("  CPU {cpu:.1} µs/webhook");
    }
    if let Some(trips) = run.round_trips_per_webhook {
        line += &format!("  {trips:.2} store round trips/webhook");
    }
    if let Some(g) = &run.guard {
        line += &format!(
            "\n    guard {}: {} acked, {} API requests (owed {} each), {} missing, {} duplicated, {} for webhooks in flight at stop, {} foreign; drained {:.1} s after the load",
            if g.ok() { "ok" } else { "FAILED" },
            g.acked,
            g.api_requests,
            g.expected_per_webhook,
            g.missing,
            g.duplicated,
            g.in_flight_at_stop,
            g.foreign,
            g.drain_s
        );
    }
    line
}

// ---- the machine -----------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
        })
        .unwrap_or_default()
}

/// The version of `package` in the workspace's Cargo.lock.
fn locked_version(package: &str) -> String {
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    let text = std::fs::read_to_string(lock).unwrap_or_default();
    let needle = format!("name = \"{package}\"\nversion = \"");
    text.find(&needle)
        .and_then(|i| text[i + needle.len()..].split('"').next())
        .unwrap_or_default()
        .to_string()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map(|kib| (kib / 1024.0 / 1024.0).round());
    json!({
        "date": httpdate::fmt_http_date(SystemTime::now()),
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "rustc": command_line("rustc", &["-V"]),
        "wasmtime": locked_version("wasmtime"),
        "wrk": command_line("wrk", &["-v"]),
        "load_before": loadavg(),
    })
}
