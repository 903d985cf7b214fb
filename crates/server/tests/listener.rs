//! The HTTP edge's bounds and deadlines on a real socket (the serve loop
//! of `digibot_server::listener` over the real router, store and
//! dispatcher), with short limits so that each one is hit in well under a
//! second: silent and idle connections are closed, a trickling body gets
//! 408, and past the connection and in-flight bounds a 503 comes at once.

use digibot_pipeline::dispatch::{Breaker, Dispatcher};
use digibot_pipeline::sender::Outbox;
use digibot_runtime::registry::Registry;
use digibot_runtime::{Runtime, RuntimeConfig};
use digibot_server::{AppState, HttpLimits, Parts, WebhookAuth, app, listener};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Server {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::watch::Sender<bool>,
}

/// The router on a fresh store, served on 127.0.0.1 within `limits`.
async fn serve(limits: HttpLimits) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let store =
        digibot_store_sqlite::open(&data_dir, digibot_store_sqlite::Durability::Normal).unwrap();
    let runtime = Runtime::new(RuntimeConfig {
        pooling: false,
        warm_instances: 0,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let registry = Arc::new(Registry::new(Arc::new(runtime), None, &data_dir));
    registry.load_dir().await;
    let outbox = Outbox::default();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let dispatcher = Dispatcher::new(
        store.clone(),
        registry.clone(),
        outbox.clone(),
        4,
        1,
        Breaker {
            failures: 3,
            cooldown: Duration::from_secs(60),
        },
        digibot_domain::lifecycle::Rules::new("/bot", 0, Duration::from_secs(10)),
        stop_rx,
    );
    let state = AppState::new(Parts {
        store,
        dispatcher,
        registry,
        outbox,
        webhook_auth: WebhookAuth::None,
        webhook_max_bytes: 1 << 20,
        admin_token: None,
        allowed_hosts: Vec::new(),
        max_in_flight: limits.max_in_flight,
    });
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(listener::serve(
        socket,
        app(state),
        limits,
        std::future::pending(),
    ));
    Server {
        addr,
        _dir: dir,
        _stop: stop,
    }
}

/// Everything the server sends until it closes the connection (or
/// `within` passes: then `None`), and how long that took.
async fn until_closed(socket: &mut TcpStream, within: Duration) -> Option<(String, Duration)> {
    let started = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + within).into(), socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Some((
                    String::from_utf8_lossy(&all).into_owned(),
                    started.elapsed(),
                ));
            }
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// Reads one response's head and body (`Content-Length` framed).
async fn response(socket: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole answer: {:?}",
            String::from_utf8_lossy(&all)
        );
        all.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&all).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
    }
}

/// One request on a new connection; the answer.
async fn request(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.write_all(bytes).await.unwrap();
    response(&mut socket).await
}

fn post_webhook(body: &str) -> Vec<u8> {
    format!(
        "POST /webhooks/digishare HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        WEBHOOK.len()
    )
    .into_bytes()
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

const WEBHOOK: &str = r#"{"event":"live_chat.new_message","data":{"id":"m1","data":{"conversation_id":"c1","body":"hi","sender":{"model_type":"third"}}}}"#;

fn limits() -> HttpLimits {
    HttpLimits {
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(500),
        max_connections: 64,
        max_in_flight: 64,
        ..HttpLimits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_open_connections_are_closed_at_the_header_timeout() {
    let server = serve(limits()).await;
    let connected = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(b"POST /webhooks/digishare HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .await
        .unwrap();
    for socket in [&mut silent, &mut half] {
        let (said, _) = until_closed(socket, Duration::from_secs(3))
            .await
            .expect("closed by the server");
        let after = connected.elapsed();
        assert!(
            after >= Duration::from_millis(250),
            "closed after {after:?}"
        );
        assert!(!said.contains("200"), "{said}");
    }
    // A header byte every 100 ms is progress on the socket, not a head:
    // the head's deadline still runs from the connection's start.
    let mut trickle = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let closed = loop {
        if trickle.write_all(b"a").await.is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), trickle.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a trickled head kept the connection"
        );
    };
    assert!(closed < Duration::from_secs(1), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_serves_requests_then_closes_when_idle() {
    let server = serve(limits()).await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    // Several requests, each well within the idle timeout of the last.
    for _ in 0..3 {
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = response(&mut socket).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (said, after) = until_closed(&mut socket, Duration::from_secs(3))
        .await
        .expect("an idle connection is closed");
    assert!(said.is_empty(), "{said}");
    assert!(
        after >= Duration::from_millis(200),
        "closed after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_gets_408_and_is_not_recorded() {
    let server = serve(limits()).await;
    let socket = TcpStream::connect(server.addr).await.unwrap();
    let (mut read, mut write) = socket.into_split();
    let head = format!(
        "POST /webhooks/digishare HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        WEBHOOK.len()
    );
    write.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in WEBHOOK.as_bytes() {
            if write.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // Meanwhile the server answers others.
    assert!(
        request(server.addr, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200")
    );
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("}") {
        let n = tokio::time::timeout(Duration::from_secs(5), read.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&buf[..n]);
    }
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(350));
    // Not recorded: the same webhook, sent whole, is new.
    let answer = request(server.addr, &post_webhook(WEBHOOK)).await;
    assert!(answer.contains("\"accepted\""), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_bound_a_503_comes_at_once() {
    let server = serve(HttpLimits {
        header_timeout: Duration::from_secs(30),
        max_connections: 2,
        ..limits()
    })
    .await;
    let held: Vec<TcpStream> = connect_many(server.addr, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let (said, after) = until_closed(&mut third, Duration::from_secs(2))
        .await
        .expect("refused at once");
    assert!(
        said.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{said:?}"
    );
    assert!(said.contains("retry-after: 1"), "{said}");
    assert!(after < Duration::from_millis(500), "{after:?}");
    // A slot freed is a slot served.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        request(server.addr, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200")
    );
}

async fn connect_many(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::new();
    for _ in 0..n {
        sockets.push(TcpStream::connect(addr).await.unwrap());
    }
    sockets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_in_flight_bound_a_503_comes_at_once_but_probes_pass() {
    let server = serve(HttpLimits {
        body_timeout: Duration::from_secs(30),
        max_in_flight: 1,
        ..limits()
    })
    .await;
    // In flight: its head is in, its body is not.
    let mut busy = TcpStream::connect(server.addr).await.unwrap();
    let whole = post_webhook(WEBHOOK);
    let cut = whole.len() - WEBHOOK.len() + 1;
    busy.write_all(&whole[..cut]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    let answer = request(server.addr, &whole).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("too many requests in flight"), "{answer}");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(
        request(server.addr, HEALTHZ)
            .await
            .starts_with("HTTP/1.1 200"),
        "probes are outside the bound"
    );

    // The busy one finishes: the slot is free again.
    busy.write_all(&whole[cut..]).await.unwrap();
    let answer = response(&mut busy).await;
    assert!(answer.contains("\"accepted\""), "{answer}");
    let answer = request(server.addr, &whole).await;
    assert!(answer.contains("\"duplicate\""), "{answer}");
}
