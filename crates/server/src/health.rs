//! The health probes, unauthenticated (they say nothing secret):
//! `/healthz` (the process serves) and `/readyz` (the store answers through
//! the path webhooks take, and the plugins folder has been loaded).
//!
//! `/readyz` is open to anyone who can reach the port, so it must not cost
//! a database connection per call: the store's answer is kept for
//! [`READY_CACHE`], and callers arriving while a check runs wait for that
//! one check instead of starting their own.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use digibot_runtime::registry::Registry;
use digibot_store::Store;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long `/readyz` waits for the store before calling it not ready.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the store's answer is reused.
pub const READY_CACHE: Duration = Duration::from_secs(1);

/// What the probes look at.
#[derive(Clone)]
pub struct HealthState {
    store: Store,
    registry: Arc<Registry>,
    /// The last store check: when it finished and what it said.
    last: Arc<Mutex<Option<(Instant, String)>>>,
}

impl HealthState {
    pub fn new(store: Store, registry: Arc<Registry>) -> HealthState {
        HealthState {
            store,
            registry,
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// `"ok"` or why the store is not ready, at most [`READY_CACHE`] old.
    async fn store_check(&self) -> String {
        // Held across the ping: concurrent probes share one check.
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() < READY_CACHE
        {
            return answer.clone();
        }
        let answer = match tokio::time::timeout(READY_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} s", READY_TIMEOUT.as_secs()),
        };
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

/// `GET /healthz`: always 200 while the process serves.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: 200 when the store answers (through its writer, which
/// every webhook needs) and the plugins folder has been loaded; else 503
/// with what is not ready.
pub async fn readyz(State(health): State<HealthState>) -> Response {
    let store = health.store_check().await;
    let plugins = if health.registry.loaded() {
        "ok".to_string()
    } else {
        "not loaded yet".to_string()
    };
    let ready = store == "ok" && plugins == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "checks": { "store": store, "plugins": plugins },
        "plugins_loaded": health.registry.snapshot().plugins.len(),
    });
    (status, Json(body)).into_response()
}
