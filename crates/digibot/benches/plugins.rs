//! Plugin lifecycle benchmarks (not tests), against the real `digibot
//! serve` binary (release) and the end-to-end tests' fake Digishare:
//!
//! - **swap**: from the start of `PUT /admin/plugins/echo` to the first
//!   reply of the new version received by the fake, while webhooks stream
//!   in (one every 2 ms over 8 conversations). A never-seen component
//!   (compiled on upload) and a known one (in the compile cache).
//! - **cold start**: process spawn to the first `/healthz` 200 with 10
//!   distinct plugins, warm compile cache vs empty, and with no plugins
//!   (the floor).
//! - **neighbour**: the greeter's latency (webhook accepted to request
//!   received by the fake), p50/p99, alone and beside `hostile-loop`
//!   (default limits and breaker, then a 1 s cool-down so it is retried
//!   often).
//!
//! Needs `cargo build-plugins` first. Run: `scripts/bench-plugins`, or
//! `cargo bench -p digibot --bench plugins [-- swap|start|neighbour]`.

// The end-to-end tests' fake Digishare and process driver.
#[path = "../../../tests/e2e/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use support::{Digibot, FakeDigishare, customer_text, free_port, plugin_wasm};

const SWAP_RUNS: usize = 7;
const START_RUNS: usize = 10;
/// 60 s at 200/s: long enough that the one-time transient before the
/// breaker opens is weighed against a realistic stretch of traffic (its
/// size is printed separately).
const NEIGHBOUR_EVENTS: usize = 12_000;
const NEIGHBOUR_RATE_PER_S: u64 = 200;

fn main() -> Result<()> {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "digibot plugin benchmarks ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if wants("swap") {
        runtime.block_on(swap())?;
    }
    if wants("start") {
        cold_start()?;
    }
    if wants("neighbour") {
        runtime.block_on(neighbour())?;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    percentile(&v, 50.0)
}

fn fmt_runs(v: &[Duration]) -> String {
    v.iter()
        .map(|d| format!("{:.1}", ms(*d)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `component` with a custom section appended: the same code under a new
/// hash, so digibot treats it as a version it has never compiled.
fn with_custom_section(component: &[u8], tag: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"digibot-bench";
    let mut payload = Vec::new();
    leb(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = component.to_vec();
    out.push(0);
    leb(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

// ---- swap latency -------------------------------------------------------

async fn swap() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Arc::new(
        Digibot::builder()
            .fake(&fake)
            .env("RUST_LOG", "warn")
            .plugin("echo")
            .start()
            .await?,
    );
    let client = reqwest::Client::builder().no_proxy().build()?;
    let v1 = std::fs::read(plugin_wasm("echo"))?;
    let v2 = std::fs::read(plugin_wasm("echo_v2"))?;

    // The steady stream: one message every 2 ms, 8 conversations; message
    // `s{i}` is answered `s{i}` or `v2: s{i}`.
    let stop = Arc::new(AtomicBool::new(false));
    let sent_at = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let poster = tokio::spawn({
        let (bot, stop, sent_at) = (bot.clone(), stop.clone(), sent_at.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let text = format!("s{i}");
                let body = customer_text(&format!("conv_swap_{}", i % 8), &text, &text);
                sent_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Instant::now());
                let bot = bot.clone();
                tokio::spawn(async move {
                    let _ = bot.post_json(&body).await;
                });
                i += 1;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let is_v2 = |r: &support::Recorded| {
        r.body["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("v2:"))
    };
    let mut cold = Vec::new();
    let mut cold_put = Vec::new();
    let mut cold_compile = Vec::new();
    let mut cached = Vec::new();
    let mut cached_put = Vec::new();
    for run in 0..SWAP_RUNS {
        // To a never-seen v2 (compiled on upload), then back to the
        // original echo (in the compile cache).
        let fresh = with_custom_section(&v2, &format!("run-{run}-{}", std::process::id()));
        for (bytes, new_is_v2) in [(&fresh, true), (&v1, false)] {
            let t0 = Instant::now();
            let resp = client
                .put(format!("{}/admin/plugins/echo", bot.url()))
                .bearer_auth(support::ADMIN_TOKEN)
                .body(bytes.clone())
                .send()
                .await?;
            let put_done = t0.elapsed();
            let status = resp.status();
            let body: serde_json::Value = resp.json().await?;
            if !status.is_success() {
                bail!("upload failed: {status} {body}");
            }
            let first = fake
                .wait_until(
                    Duration::from_secs(30),
                    "a reply of the new version",
                    |ok| {
                        ok.iter()
                            .any(|r| r.received_at > t0 && is_v2(r) == new_is_v2)
                    },
                )
                .await?
                .into_iter()
                .filter(|r| r.received_at > t0 && is_v2(r) == new_is_v2)
                .map(|r| r.received_at)
                .min()
                .context("no reply")?;
            if new_is_v2 {
                cold.push(first - t0);
                cold_put.push(put_done);
                cold_compile.push(Duration::from_millis(
                    body["compile_ms"].as_u64().unwrap_or_default(),
                ));
            } else {
                cached.push(first - t0);
                cached_put.push(put_done);
            }
            // Let in-flight replies of the old version drain.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = poster.await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The stream's own latency (POST sent -> reply at the fake), which a
    // swap adds to its PUT time before a reply shows the new version.
    let sent_at = sent_at.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut pipeline: Vec<Duration> = fake
        .successful()
        .iter()
        .filter_map(|r| {
            let body = r.body["body"].as_str()?;
            let i: usize = body
                .trim_start_matches("v2: ")
                .strip_prefix('s')?
                .parse()
                .ok()?;
            Some(r.received_at.saturating_duration_since(*sent_at.get(i)?))
        })
        .collect();
    pipeline.sort();

    println!("\n## swap latency: PUT start -> first reply of the new version at the fake");
    println!(
        "stream: 1 webhook / 2 ms over 8 conversations, {} posted; its latency (sent -> reply): p50 {:.1} ms, p99 {:.1} ms",
        sent_at.len(),
        ms(percentile(&pipeline, 50.0)),
        ms(percentile(&pipeline, 99.0)),
    );
    println!(
        "new component (compiled on upload): median {:.1} ms (PUT answered {:.1} ms, of which compile {:.1} ms); runs: {}",
        ms(median(cold.clone())),
        ms(median(cold_put.clone())),
        ms(median(cold_compile.clone())),
        fmt_runs(&cold)
    );
    println!(
        "known component (compile cache):    median {:.1} ms (PUT answered {:.1} ms); runs: {}",
        ms(median(cached.clone())),
        ms(median(cached_put.clone())),
        fmt_runs(&cached)
    );
    Ok(())
}

// ---- cold start -----------------------------------------------------------

/// Spawns `digibot serve` on `dir`, polls `/healthz` every 0.2 ms, returns
/// the time from spawn to the first 200, and stops it.
fn time_to_healthy(dir: &Path, port: u16) -> Result<Duration> {
    let bin = env!("CARGO_BIN_EXE_digibot");
    let started = Instant::now();
    let mut child = Command::new(bin)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("DIGIBOT_LISTEN", format!("127.0.0.1:{port}"))
        .env("DIGIBOT_PLUGINS_DIR", dir.join("plugins"))
        .env("DIGIBOT_DATA_DIR", dir.join("data"))
        .env("DIGIBOT_WEBHOOK_TOKEN", "bench")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join("digibot.log"))?))
        .spawn()?;
    let deadline = started + Duration::from_secs(60);
    let elapsed = loop {
        if healthz(port) {
            break started.elapsed();
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "digibot exited ({status}): {}",
                std::fs::read_to_string(dir.join("digibot.log")).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("digibot not healthy after 60 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    child.kill()?;
    child.wait()?;
    Ok(elapsed)
}

fn healthz(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

fn cold_start() -> Result<()> {
    let root = tempfile::tempdir()?;
    let dir = root.path();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    let port = free_port()?;

    let empty = (0..START_RUNS)
        .map(|_| time_to_healthy(dir, port))
        .collect::<Result<Vec<_>>>()?;

    // Ten distinct components (greeter and echo, each under five hashes).
    for i in 0..10 {
        let source = if i % 2 == 0 { "greeter" } else { "echo" };
        let bytes = std::fs::read(plugin_wasm(source))?;
        std::fs::write(
            plugins.join(format!("p{i:02}.wasm")),
            with_custom_section(&bytes, &format!("p{i:02}")),
        )?;
    }
    let cache = dir.join("data/cache");
    let mut uncached = Vec::new();
    for _ in 0..START_RUNS.min(5) {
        let _ = std::fs::remove_dir_all(&cache);
        uncached.push(time_to_healthy(dir, port)?);
    }
    let entries = std::fs::read_dir(&cache)?.count();
    let warm = (0..START_RUNS)
        .map(|_| time_to_healthy(dir, port))
        .collect::<Result<Vec<_>>>()?;

    let parts = start_parts(dir)?;

    println!("\n## cold start: spawn -> first /healthz 200 (polled every 0.2 ms)");
    println!(
        "no plugins:                 median {:.1} ms; runs: {}",
        ms(median(empty.clone())),
        fmt_runs(&empty)
    );
    println!(
        "10 plugins, warm cache ({entries} files): median {:.1} ms; runs: {}",
        ms(median(warm.clone())),
        fmt_runs(&warm)
    );
    println!(
        "10 plugins, empty cache:    median {:.1} ms; runs: {}",
        ms(median(uncached.clone())),
        fmt_runs(&uncached)
    );
    println!("in-process parts of a warm start (median of {START_RUNS}):");
    for (what, runs) in parts {
        println!("  {what:<44} {:.2} ms", ms(median(runs)));
    }
    Ok(())
}

/// Where a warm start goes, measured in this process on the same folders:
/// opening the store, building the engine, loading the 10 cached plugins.
fn start_parts(dir: &Path) -> Result<Vec<(&'static str, Vec<Duration>)>> {
    use digibot_runtime::registry::Registry;
    use digibot_runtime::{Runtime, RuntimeConfig};
    use digibot_store_sqlite::Durability;
    let data = dir.join("data");
    let config = |pooling| RuntimeConfig {
        pooling,
        cache_dir: Some(data.join("cache")),
        ..RuntimeConfig::default()
    };
    let (mut store, mut engine, mut engine_plain, mut load) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // `serve` loads plugins on its runtime; so does this.
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for _ in 0..START_RUNS {
        let t = Instant::now();
        let s = digibot_store_sqlite::open(&data, Durability::Full)?;
        store.push(t.elapsed());
        s.close();

        let t = Instant::now();
        let runtime = Arc::new(Runtime::new(config(true)).map_err(|e| anyhow::anyhow!("{e:#}"))?);
        engine.push(t.elapsed());
        let t = Instant::now();
        drop(Runtime::new(config(false)).map_err(|e| anyhow::anyhow!("{e:#}"))?);
        engine_plain.push(t.elapsed());

        let registry = Registry::new(runtime, Some(dir.join("plugins")), &data);
        let t = Instant::now();
        let errors = tokio.block_on(registry.load_dir());
        load.push(t.elapsed());
        if !errors.is_empty() || registry.snapshot().plugins.len() != 10 {
            bail!("loading the plugins failed: {errors:?}");
        }
    }
    Ok(vec![
        ("Store::open (existing database)", store),
        ("Runtime::new, pooling allocator", engine),
        ("Runtime::new, on-demand allocator", engine_plain),
        ("Registry::load_dir, 10 cached plugins", load),
    ])
}

// ---- latency beside a hostile neighbour ----------------------------------

struct Latencies {
    from_accepted: Vec<Duration>,
    from_sent: Vec<Duration>,
}

/// Streams [`NEIGHBOUR_EVENTS`] messages at [`NEIGHBOUR_RATE_PER_S`] over
/// 20 conversations to a digibot with `plugins` (`(name, source, toml)`)
/// and `env`; returns the greeter's reply latencies.
async fn greeter_latency(
    plugins: &[(&str, &str, Option<&str>)],
    env: &[(&str, &str)],
) -> Result<Latencies> {
    let fake = FakeDigishare::start().await?;
    let mut builder = Digibot::builder().fake(&fake).env("RUST_LOG", "warn");
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    // Start empty, then fill the folder under the names given (the
    // builder names plugins after their files) and start again.
    let mut bot = builder.start().await?;
    bot.kill9()?;
    for (name, source, toml) in plugins {
        std::fs::copy(
            plugin_wasm(source),
            bot.plugins_dir.join(format!("{name}.wasm")),
        )?;
        if let Some(toml) = toml {
            std::fs::write(bot.plugins_dir.join(format!("{name}.toml")), toml)?;
        }
    }
    bot.restart().await?;
    let bot = Arc::new(bot);

    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / NEIGHBOUR_RATE_PER_S));
    let mut posts = Vec::with_capacity(NEIGHBOUR_EVENTS);
    for i in 0..NEIGHBOUR_EVENTS {
        tick.tick().await;
        let bot = bot.clone();
        let body = customer_text(
            &format!("conv_n_{}", i % 20),
            &format!("n{i}"),
            &format!("m{i:05}"),
        );
        posts.push(tokio::spawn(async move {
            let sent = Instant::now();
            let reply = bot.post_json(&body).await?;
            reply.expect_status(200)?;
            anyhow::Ok((i, sent, Instant::now()))
        }));
    }
    let mut timing = Vec::with_capacity(NEIGHBOUR_EVENTS);
    for p in posts {
        timing.push(p.await??);
    }
    let replies = fake
        .wait_for(NEIGHBOUR_EVENTS, Duration::from_secs(120))
        .await?;
    let mut at = std::collections::HashMap::new();
    for r in &replies {
        if let Some(b) = r.body["body"]
            .as_str()
            .and_then(|b| b.strip_prefix("Hello "))
        {
            at.insert(b.to_string(), r.received_at);
        }
    }
    let mut out = Latencies {
        from_accepted: Vec::new(),
        from_sent: Vec::new(),
    };
    for (i, sent, accepted) in timing {
        let received = *at
            .get(&format!("m{i:05}"))
            .context("a greeter reply is missing")?;
        out.from_accepted
            .push(received.saturating_duration_since(accepted));
        out.from_sent.push(received.saturating_duration_since(sent));
    }
    out.from_accepted.sort();
    out.from_sent.sort();
    Ok(out)
}

async fn neighbour() -> Result<()> {
    let greeter = ("greeter", "greeter", None);
    let hostile = ("bad-loop", "hostile_loop", None);
    let alone = greeter_latency(&[greeter], &[]).await?;
    let beside = greeter_latency(&[hostile, greeter], &[]).await?;
    let retried = greeter_latency(
        &[hostile, greeter],
        &[("DIGIBOT_BREAKER_COOLDOWN_SECS", "1")],
    )
    .await?;
    println!(
        "\n## greeter latency, {NEIGHBOUR_EVENTS} webhooks at {NEIGHBOUR_RATE_PER_S}/s over 20 conversations"
    );
    println!("(webhook accepted -> request at the fake; in brackets: from POST sent)");
    let slow = 2 * percentile(&alone.from_accepted, 99.0);
    for (what, l) in [
        ("alone", &alone),
        ("beside hostile-loop (100 ms, breaker 5 / 30 s)", &beside),
        ("beside hostile-loop (100 ms, breaker 5 / 1 s)", &retried),
    ] {
        let over = l.from_accepted.iter().filter(|d| **d > slow).count();
        println!(
            "{what:<48} p50 {:>6.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  max {:>7.2} ms  >2x alone p99: {over:>4}  [p50 {:.2} p99 {:.2}]",
            ms(percentile(&l.from_accepted, 50.0)),
            ms(percentile(&l.from_accepted, 99.0)),
            ms(percentile(&l.from_accepted, 99.9)),
            ms(*l.from_accepted.last().unwrap_or(&Duration::ZERO)),
            ms(percentile(&l.from_sent, 50.0)),
            ms(percentile(&l.from_sent, 99.0)),
        );
    }
    Ok(())
}
