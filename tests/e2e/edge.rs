//! The HTTP edge under attack: silent and half-open connections, bodies
//! that are not JSON, ids that cannot be headers, and requests for the
//! admin API under a host name that is not digibot's (DNS rebinding).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// The open-files soft limit raised to the hard one, for a test that holds
/// a thousand sockets.
fn raise_open_files() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

/// A slowloris: 1,000 connections that each send half a request head and
/// then nothing, kept up for 45 s (one the server closes is opened again
/// at once). Meanwhile every real webhook, each on a new connection, is
/// acknowledged in under a second and answered by echo; and the server
/// itself closes every half-open connection, within its header timeout
/// (10 s by default).
#[tokio::test]
async fn half_open_connections_neither_starve_webhooks_nor_stay_open() -> Result<()> {
    const HALF_OPEN: usize = 1000;
    const HOLD: Duration = Duration::from_secs(45);
    raise_open_files();
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let addr = bot.url().trim_start_matches("http://").to_string();
    let attack_started = Instant::now();
    let deadline = attack_started + HOLD;
    // The attack on a thread and runtime of its own, so that its thousand
    // sockets do not delay the test's own webhooks on the client side.
    let attack = std::thread::spawn({
        let addr = addr.clone();
        move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the attack")
                .block_on(slowloris(&addr, HALF_OPEN, deadline))
        }
    });

    // Real webhooks while the attack runs, each on a fresh connection.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    let auth = format!("Bearer {WEBHOOK_TOKEN}");
    let mut keys = Vec::new();
    let mut slowest = Duration::ZERO;
    // Let the attack fill up first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut n = 0;
    while Instant::now() + Duration::from_secs(1) < deadline {
        n += 1;
        let body = customer_text(
            &format!("conv_edge_{}", n % 5),
            &format!("msg_edge_{n}"),
            &format!("salut {n}"),
        );
        let started = Instant::now();
        let reply = client
            .post(format!("{}/webhooks/digishare", bot.url()))
            .header("Authorization", &auth)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("webhook {n} during the attack"))?;
        let took = started.elapsed();
        ensure!(reply.status() == 200, "webhook {n}: {}", reply.status());
        ensure!(
            took < Duration::from_secs(1),
            "webhook {n} took {took:?} to be acknowledged during the attack"
        );
        slowest = slowest.max(took);
        keys.push(event_key(&body));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    let Attack {
        opened,
        closed,
        longest,
        open_at_end,
    } = tokio::task::spawn_blocking(move || attack.join().expect("the attack thread")).await?;
    eprintln!(
        "slowloris: {opened} half-open connections over {HOLD:?}, {closed} closed by the server (longest open {longest:?}); {} webhooks, slowest ack {slowest:?}",
        keys.len()
    );
    ensure!(
        keys.len() >= 50,
        "only {} webhooks went through",
        keys.len()
    );
    // Each slot was closed by the server at least three times in 45 s.
    ensure!(
        closed >= 3 * HALF_OPEN,
        "the server closed only {closed} of {opened} half-open connections"
    );
    ensure!(
        longest < Duration::from_secs(15),
        "a half-open connection stayed open {longest:?}"
    );
    ensure!(
        open_at_end.iter().all(|d| *d < Duration::from_secs(15)),
        "connections older than the header timeout were still open at the end: {:?}",
        open_at_end.iter().max()
    );

    // Every webhook was answered by echo, once.
    bot.wait_idle(&keys, TIMEOUT).await?;
    let replies = fake.settle(keys.len(), TIMEOUT).await?;
    ensure_api_headers(&replies, API_TOKEN)?;
    let metrics = bot.admin_get("/metrics").await?;
    let timed_out = metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("digibot_http_refused_total{reason=\"header_timeout\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    ensure!(
        timed_out >= closed as f64 * 0.9,
        "digibot_http_refused_total{{reason=\"header_timeout\"}} is {timed_out}, {closed} were closed"
    );
    Ok(())
}

/// What a [`slowloris`] saw.
struct Attack {
    /// Half-open connections opened in all.
    opened: usize,
    /// Of them, closed by the server.
    closed: usize,
    /// The longest one stayed open before the server closed it.
    longest: Duration,
    /// How old those still open at the end were.
    open_at_end: Vec<Duration>,
}

/// `slots` connections to `addr` that each send half a request head and
/// then wait; each one the server closes is opened again, until
/// `deadline`.
async fn slowloris(addr: &str, slots: usize, deadline: Instant) -> Attack {
    let deadline = tokio::time::Instant::from_std(deadline);
    let mut attackers = tokio::task::JoinSet::new();
    for _ in 0..slots {
        let addr = addr.to_string();
        attackers.spawn(async move {
            let (mut opened, mut closed, mut longest) = (0, 0, Duration::ZERO);
            while tokio::time::Instant::now() < deadline {
                let Ok(mut socket) = TcpStream::connect(&addr).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                opened += 1;
                let since = Instant::now();
                let _ = socket
                    .write_all(b"POST /webhooks/digishare HTTP/1.1\r\nHost: digibot\r\nContent-Ty")
                    .await;
                let mut buf = [0u8; 256];
                loop {
                    match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
                        // Closed (or reset) by the server.
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            closed += 1;
                            longest = longest.max(since.elapsed());
                            break;
                        }
                        // Something before the close: read on to the end.
                        Ok(Ok(_)) => continue,
                        Err(_) => return (opened, closed, longest, Some(since.elapsed())),
                    }
                }
            }
            (opened, closed, longest, None)
        });
    }
    let mut attack = Attack {
        opened: 0,
        closed: 0,
        longest: Duration::ZERO,
        open_at_end: Vec::new(),
    };
    while let Some(Ok((opened, closed, longest, open))) = attackers.join_next().await {
        attack.opened += opened;
        attack.closed += closed;
        attack.longest = attack.longest.max(longest);
        attack.open_at_end.extend(open);
    }
    attack
}

/// Only `application/json` (any parameters) is a webhook: `text/plain`, a
/// form, or no type at all (what a web page can make a browser send
/// without asking) is 415, and nothing is stored or answered.
#[tokio::test]
async fn webhooks_that_are_not_json_are_415() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let auth = format!("Bearer {WEBHOOK_TOKEN}");
    let body = serde_json::to_vec(&customer_text("conv_ct", "msg_ct_1", "bonjour"))?;
    for content_type in [
        Some("text/plain"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonp"),
        None,
    ] {
        let mut request = client
            .post(format!("{}/webhooks/digishare", bot.url()))
            .header("Authorization", &auth)
            .body(body.clone());
        if let Some(t) = content_type {
            request = request.header("Content-Type", t);
        }
        let reply = crate::support::digibot::reply(request.send().await?).await?;
        ensure!(
            reply.status == 415,
            "{content_type:?}: {} {}",
            reply.status,
            reply.body
        );
        ensure_json_eq(
            &reply.json()?,
            &json!({"error": "webhooks must be sent with Content-Type: application/json"}),
            "415 body",
        )?;
    }
    ensure!(
        bot.events(10).await?.is_empty(),
        "a refused webhook was stored"
    );

    let reply = crate::support::digibot::reply(
        client
            .post(format!("{}/webhooks/digishare", bot.url()))
            .header("Authorization", &auth)
            .header("Content-Type", "Application/JSON; charset=utf-8")
            .body(body)
            .send()
            .await?,
    )
    .await?;
    reply.expect_status(200)?;
    fake.settle(1, TIMEOUT).await?;
    let metrics = bot.admin_get("/metrics").await?.body;
    ensure!(
        metrics.contains("digibot_webhooks_total{outcome=\"unsupported_media_type\"} 6"),
        "{metrics}"
    );
    Ok(())
}

/// An `event_id` (or message id) with CR/LF, a space, or 1 MiB long is a
/// 400 at the webhook and stored nowhere: it would otherwise become an
/// invalid `Idempotency-Key`. The longest valid id goes through once, with
/// its key intact.
#[tokio::test]
async fn ids_that_cannot_be_headers_are_400() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .max_bytes(4 << 20)
        .start()
        .await?;
    let with_event_id = |id: &str| {
        let mut body = customer_text("conv_ids", "msg_ids_1", "bonjour");
        body["event_id"] = json!(id);
        body
    };
    let huge = "e".repeat(1 << 20);
    for (what, body) in [
        ("CR/LF event_id", with_event_id("evt_1\r\nX-Injected: yes")),
        ("1 MiB event_id", with_event_id(&huge)),
        ("event_id with a space", with_event_id("evt 1")),
        (
            "CR/LF message id",
            customer_text("conv_ids", "msg\r\n1", "bonjour"),
        ),
        (
            "conversation ..",
            customer_text("..", "msg_ids_2", "bonjour"),
        ),
    ] {
        let reply = bot.post_json(&body).await?;
        ensure!(
            reply.status == 400,
            "{what}: {} {}",
            reply.status,
            reply.body
        );
        ensure!(
            reply.body.contains("is not a valid id"),
            "{what}: {}",
            reply.body
        );
    }
    ensure!(
        bot.events(10).await?.is_empty(),
        "a refused webhook was stored"
    );

    let longest = format!("evt_{}", "x".repeat(252));
    let key = bot.accept(&with_event_id(&longest)).await?;
    ensure!(key == longest, "the key is {key}");
    bot.wait_idle(&[key], TIMEOUT).await?;
    let sent = fake.settle(1, TIMEOUT).await?;
    ensure!(
        sent[0].idempotency_key.as_deref() == Some(&format!("{longest}/echo/0")),
        "{}",
        sent[0].summary()
    );
    Ok(())
}

/// DNS rebinding: a page on `evil.example` that has its name point at
/// digibot's address makes the browser send `Host: evil.example`. The
/// admin API, the dashboard and `/metrics` refuse it (403) even with the
/// right token; the same request by IP or `localhost` passes; a name in
/// DIGIBOT_ALLOWED_HOSTS passes. The webhook does not look at the host.
#[tokio::test]
async fn admin_requests_for_a_foreign_host_are_refused_even_with_the_token() -> Result<()> {
    let fake = FakeDigishare::start().await?;
    let bot = Digibot::builder()
        .fake(&fake)
        .plugin("echo")
        .start()
        .await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let port = bot.url().rsplit(':').next().context("port")?.to_string();
    let get = |path: &str, host: &str| {
        client
            .get(format!("{}{path}", bot.url()))
            .header("Host", host)
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    for path in ["/admin/events", "/admin", "/admin/plugins", "/metrics"] {
        for host in [
            "evil.example",
            "evil.example:80",
            &format!("evil.example:{port}"),
        ] {
            let reply = crate::support::digibot::reply(get(path, host).await?).await?;
            ensure!(
                reply.status == 403,
                "{path} for {host}: {} {}",
                reply.status,
                reply.body
            );
            ensure!(reply.body.contains("not allowed"), "{}", reply.body);
        }
        for host in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            "localhost".into(),
        ] {
            let reply = crate::support::digibot::reply(get(path, &host).await?).await?;
            ensure!(
                reply.status == 200,
                "{path} for {host}: {} {}",
                reply.status,
                reply.body
            );
        }
    }
    // The webhook answers whatever host Digishare was configured with.
    let reply = crate::support::digibot::reply(
        client
            .post(format!("{}/webhooks/digishare", bot.url()))
            .header("Host", "digibot.customer.example")
            .header("Authorization", format!("Bearer {WEBHOOK_TOKEN}"))
            .json(&fixture("message_text_minimal"))
            .send()
            .await?,
    )
    .await?;
    reply.expect_status(200)?;

    let named = Digibot::builder()
        .env("DIGIBOT_ALLOWED_HOSTS", "digibot.internal")
        .start()
        .await?;
    let reply = crate::support::digibot::reply(
        client
            .get(format!("{}/admin/events", named.url()))
            .header("Host", "digibot.internal:8080")
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await?,
    )
    .await?;
    reply.expect_status(200)?;
    Ok(())
}
