//! `GET /metrics`: every metric digibot exports, in Prometheus' text
//! format (0.0.4), through the `metrics` facade and its Prometheus
//! exporter (no listener of its own: rendered by this route).
//!
//! Two kinds of metric:
//!
//! - **Instruments** (counters, histograms) each crate declares where it
//!   updates them (`digibot_pipeline::metrics`, `digibot_store::metrics`,
//!   and [`WEBHOOKS`] here), with `metrics::counter!(NAME, "label" =>
//!   value).increment(1)` where things happen.
//! - **State read at scrape time**: outbox depth, dead letters, plugin
//!   states and turns in flight are read from the store, the registry and
//!   the dispatcher when Prometheus asks,
//!   so they are right after a restart and need no bookkeeping on the hot
//!   paths. A gauge not set by the latest scrapes (a removed plugin's)
//!   drops out after [`SCRAPE_GAUGE_IDLE`].
//!
//! ## Adding a metric
//!
//! A name constant and a `describe_*!` line (with its fixed label sets at
//! 0) in the `metrics` module of the crate that updates it, then the
//! update where it happens. Names: `digibot_` prefix, `_total` for
//! counters, base units (`_seconds`, `_bytes`). List the metric in
//! docs/operations.md.
//!
//! `/metrics` is protected like the admin API: it exists only when
//! `DIGIBOT_ADMIN_TOKEN` is set, and wants `Authorization: Bearer TOKEN`.

use crate::AppState;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use digibot_pipeline::dispatch::Dispatcher;
use digibot_runtime::registry::Registry;
use digibot_store::{Store, StoreError};
use metrics::{describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Webhooks received, by outcome: `accepted` (recorded, plugins will run),
/// `ignored` (recorded, no plugin runs: agent or system messages, archived
/// conversations, unknown events), `duplicate`, `unauthorized`,
/// `unsupported_media_type` (not `application/json`: 415), `malformed`,
/// `too_large`, `timeout` (the body did not arrive in time: 408),
/// `unavailable` (could not be recorded: 503).
pub const WEBHOOKS: &str = "digibot_webhooks_total";
/// Every outcome of [`WEBHOOKS`], at 0 before its first webhook.
pub const WEBHOOK_OUTCOMES: &[&str] = &[
    "accepted",
    "ignored",
    "duplicate",
    "unauthorized",
    "unsupported_media_type",
    "malformed",
    "too_large",
    "timeout",
    "unavailable",
];

/// Connections and requests the HTTP edge refused or cut, by reason:
/// `connections` (over the connection bound: 503 and closed), `in_flight`
/// (over the bound on requests in flight: 503), `header_timeout` (no
/// complete request head in time: closed), `body_timeout` (the body did
/// not arrive in time).
pub const HTTP_REFUSED: &str = "digibot_http_refused_total";
/// Every reason of [`HTTP_REFUSED`].
pub const HTTP_REFUSED_REASONS: &[&str] =
    &["connections", "in_flight", "header_timeout", "body_timeout"];

const OUTBOX_DEPTH: &str = "digibot_outbox_depth";
const DEAD_LETTERS: &str = "digibot_dead_letters";
const PLUGIN_STATE: &str = "digibot_plugin_state";
const PLUGIN_INFO: &str = "digibot_plugin_info";
const TURNS_IN_FLIGHT: &str = "digibot_plugin_turns_in_flight";

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// How long a scrape-time gauge outlives the last scrape that set it.
pub const SCRAPE_GAUGE_IDLE: Duration = Duration::from_secs(1);

/// What `/metrics` reads at scrape time, and the exporter's handle.
#[derive(Clone)]
pub struct MetricsState {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub dispatcher: Dispatcher,
    pub handle: PrometheusHandle,
}

/// The process's exporter, installed as the `metrics` recorder on first
/// use, with every metric declared. Later calls return the same handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(digibot_pipeline::metrics::PLUGIN_INVOCATION_SECONDS.into()),
                    digibot_pipeline::metrics::INVOCATION_BUCKETS,
                )
                .expect("the invocation buckets are not empty")
                .idle_timeout(MetricKindMask::GAUGE, Some(SCRAPE_GAUGE_IDLE))
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder already installed (a test's): keep ours
            // for rendering; what it records goes to that one.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            // Histogram samples wait in a buffer until drained: keep it
            // small between scrapes.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("digibot-metrics".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP);
                        upkeep.run_upkeep();
                    }
                });
            handle
        })
        .clone()
}

/// Declares every metric of every crate, fixed label sets at 0.
fn describe() {
    describe_counter!(WEBHOOKS, "Webhooks received, by outcome.");
    for outcome in WEBHOOK_OUTCOMES {
        metrics::counter!(WEBHOOKS, "outcome" => *outcome).increment(0);
    }
    describe_counter!(
        HTTP_REFUSED,
        "Connections and requests refused or cut at the HTTP edge, by reason."
    );
    for reason in HTTP_REFUSED_REASONS {
        metrics::counter!(HTTP_REFUSED, "reason" => *reason).increment(0);
    }
    describe_gauge!(
        OUTBOX_DEPTH,
        "Actions waiting to be sent (retries included)."
    );
    describe_gauge!(
        DEAD_LETTERS,
        "Actions Digishare refused or that ran out of retries, kept for an operator."
    );
    describe_gauge!(
        PLUGIN_STATE,
        "1 for the breaker state each plugin is in (active, quarantined, half_open), 0 for the others."
    );
    describe_gauge!(
        PLUGIN_INFO,
        "1 per loaded plugin: its version (SHA-256 prefix) and WIT version."
    );
    describe_gauge!(
        TURNS_IN_FLIGHT,
        "Events whose plugin turns are running or waiting on a host call now (bounded by half the instance pool)."
    );
    digibot_pipeline::metrics::describe();
    digibot_store::metrics::describe();
}

/// Sets the scrape-time gauges from the store and the registry.
async fn read_state(state: &MetricsState) -> Result<(), StoreError> {
    let depth = state.store.outbox_depth().await?;
    gauge!(OUTBOX_DEPTH).set(depth.pending as f64);
    gauge!(DEAD_LETTERS).set(depth.dead as f64);
    gauge!(TURNS_IN_FLIGHT).set(state.dispatcher.turns_in_flight() as f64);
    for p in state.registry.report() {
        for s in ["active", "quarantined", "half_open"] {
            let current = p.health.state.replace('-', "_") == s;
            gauge!(PLUGIN_STATE, "plugin" => p.name.clone(), "state" => s)
                .set(f64::from(u8::from(current)));
        }
        gauge!(
            PLUGIN_INFO,
            "plugin" => p.name.clone(),
            "version" => p.version[..12.min(p.version.len())].to_string(),
            "wit_version" => p.wit_version.to_string()
        )
        .set(1.0);
    }
    Ok(())
}

/// `GET /metrics`; the caller adds the admin token check.
pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(handler))
}

async fn handler(State(state): State<MetricsState>) -> Response {
    match read_state(&state).await {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            state.handle.render(),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the store: {e}\n"),
        )
            .into_response(),
    }
}
