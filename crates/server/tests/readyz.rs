//! `/readyz` through the real router on a real SQLite store: it is
//! unauthenticated, so a flood of probes must not become a flood of store
//! pings. Counted with the store's own round-trip metric (the one
//! BENCHMARKS.md reports), in a test binary of its own so nothing else
//! touches the store meanwhile.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use digibot_runtime::registry::Registry;
use digibot_runtime::{Runtime, RuntimeConfig};
use digibot_server::health::READY_CACHE;
use digibot_server::{AppState, Parts, WebhookAuth, app};
use digibot_store::Store;
use digibot_store_sqlite::Durability;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// `digibot_store_round_trips_total` as `/metrics` renders it.
fn round_trips(handle: &PrometheusHandle) -> u64 {
    handle
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("digibot_store_round_trips_total "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

async fn state(store: &Store, data_dir: &std::path::Path) -> AppState {
    let runtime = Runtime::new(RuntimeConfig {
        pooling: false,
        warm_instances: 0,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let registry = Arc::new(Registry::new(Arc::new(runtime), None, data_dir));
    assert!(registry.load_dir().await.is_empty());
    let outbox = digibot_pipeline::sender::Outbox::default();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let dispatcher = digibot_pipeline::dispatch::Dispatcher::new(
        store.clone(),
        registry.clone(),
        outbox.clone(),
        1,
        1,
        digibot_pipeline::dispatch::Breaker {
            failures: 3,
            cooldown: Duration::from_secs(60),
        },
        digibot_domain::lifecycle::Rules::new("/bot", 0, Duration::from_secs(10)),
        stop_rx,
    );
    AppState::new(Parts {
        store: store.clone(),
        dispatcher,
        registry,
        outbox,
        webhook_auth: WebhookAuth::Token("hook".into()),
        webhook_max_bytes: 1 << 20,
        admin_token: None,
        allowed_hosts: Vec::new(),
        max_in_flight: 64,
    })
}

async fn readyz(state: &AppState) -> StatusCode {
    let request = Request::get("/readyz").body(Body::empty()).unwrap();
    app(state.clone()).oneshot(request).await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_probes_in_a_second_cost_one_store_ping() {
    let handle = digibot_server::metrics::install();
    let dir = tempfile::tempdir().unwrap();
    let store = digibot_store_sqlite::open(&dir.path().join("data"), Durability::Normal).unwrap();
    let state = state(&store, dir.path()).await;

    let before = round_trips(&handle);
    let started = Instant::now();
    let mut probes = JoinSet::new();
    for _ in 0..100 {
        let state = state.clone();
        probes.spawn(async move { readyz(&state).await });
    }
    while let Some(status) = probes.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < READY_CACHE,
        "100 probes took {elapsed:?}: the test cannot tell one ping from two"
    );
    assert_eq!(round_trips(&handle) - before, 1, "100 probes, one ping");

    // Past the second, the next probe checks again, and sees the truth.
    tokio::time::sleep(READY_CACHE + Duration::from_millis(100)).await;
    assert_eq!(readyz(&state).await, StatusCode::OK);
    assert_eq!(round_trips(&handle) - before, 2);
    store.close();
    assert_eq!(
        readyz(&state).await,
        StatusCode::OK,
        "within the second, the cached answer"
    );
    tokio::time::sleep(READY_CACHE + Duration::from_millis(100)).await;
    assert_eq!(readyz(&state).await, StatusCode::SERVICE_UNAVAILABLE);
}
