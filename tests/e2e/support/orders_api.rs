//! `FakeOrderApi`: a shop's order API on 127.0.0.1 for the outbound HTTP
//! tests. It records every request (with its `Authorization` and
//! `Idempotency-Key`), counts them by key, and has routes that misbehave on
//! purpose:
//!
//! - `GET /orders/{n}`: `{"order": n, "status": ...}` for a known order
//!   (after the configured delay), 404 otherwise;
//! - `GET /ok`: 200 `ok`;
//! - `GET /slow?ms=N`: 200 after N ms;
//! - `GET /redirect?to=URL`: 302 to `URL`;
//! - `GET /huge?bytes=N`: a body of N bytes (2 MiB by default);
//! - `GET /forever`: a 200 whose body never ends (a byte every 100 ms).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct OrderRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    /// Every header, values lossy.
    pub headers: Vec<(String, String)>,
    pub at: Instant,
}

#[derive(Default)]
struct Inner {
    requests: Vec<OrderRequest>,
    orders: HashMap<String, String>,
    delay: Duration,
    /// Requests being answered right now.
    in_flight: usize,
}

/// The fake order API; dropping it stops the server.
pub struct FakeOrderApi {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOrderApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Shared = Arc<Mutex<Inner>>;

fn lock(inner: &Shared) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

fn record(inner: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap) {
    let get = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    lock(inner).requests.push(OrderRequest {
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        authorization: get("authorization"),
        idempotency_key: get("idempotency-key"),
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        at: Instant::now(),
    });
}

async fn order(
    State(inner): State<Shared>,
    Path(n): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&inner, &method, &uri, &headers);
    let delay = {
        let mut i = lock(&inner);
        i.in_flight += 1;
        i.delay
    };
    tokio::time::sleep(delay).await;
    let status = {
        let mut i = lock(&inner);
        i.in_flight -= 1;
        i.orders.get(&n).cloned()
    };
    match status {
        Some(status) => axum::Json(json!({"order": n, "status": status})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "no such order"})),
        )
            .into_response(),
    }
}

async fn misc(
    State(inner): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&inner, &method, &uri, &headers);
    match uri.path() {
        "/ok" => "ok".into_response(),
        "/slow" => {
            let ms = q.get("ms").and_then(|m| m.parse().ok()).unwrap_or(1000);
            lock(&inner).in_flight += 1;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            lock(&inner).in_flight -= 1;
            "slow ok".into_response()
        }
        "/redirect" => {
            let to = q.get("to").cloned().unwrap_or_else(|| "/ok".into());
            (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
        }
        "/huge" => {
            let bytes = q
                .get("bytes")
                .and_then(|b| b.parse().ok())
                .unwrap_or(2 << 20);
            vec![b'x'; bytes].into_response()
        }
        "/forever" => {
            let stream = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Ok::<_, std::io::Error>(Bytes::from_static(b".")), ()))
            });
            Response::new(Body::from_stream(stream))
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

impl FakeOrderApi {
    /// Binds 127.0.0.1:0 and starts serving.
    pub async fn start() -> Result<FakeOrderApi> {
        let inner: Shared = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake order API")?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/orders/{n}", get(order))
            .fallback(misc)
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake order API stopped: {e}");
            }
        });
        Ok(FakeOrderApi {
            addr,
            inner,
            server,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Order `n` exists with `status`.
    pub fn set_order(&self, n: &str, status: &str) {
        lock(&self.inner)
            .orders
            .insert(n.to_string(), status.to_string());
    }

    /// `/orders/{n}` answers after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.inner).delay = delay;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<OrderRequest> {
        lock(&self.inner).requests.clone()
    }

    /// Requests answered right now (waiting on a delay).
    pub fn in_flight(&self) -> usize {
        lock(&self.inner).in_flight
    }

    /// How many requests carried each `Idempotency-Key` (`""`: none).
    pub fn count_by_key(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in lock(&self.inner).requests.iter() {
            *counts
                .entry(r.idempotency_key.clone().unwrap_or_default())
                .or_insert(0) += 1;
        }
        counts
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Result<Vec<OrderRequest>> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return Ok(requests);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the order API got {} requests after {timeout:?}, expected {n}",
                    requests.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
