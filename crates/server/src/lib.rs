//! digibot's HTTP surfaces, on one axum router: the webhook edge Digishare
//! posts to, the admin API with its dashboard and chat simulator, `/metrics`,
//! and the health probes.
//!
//! Each surface has a small state of its own, taken from [`AppState`] with
//! axum's `FromRef`, so a handler can reach only what its surface needs:
//! the webhook a store and the dispatcher, the simulator the registry and
//! its in-memory conversations (no store at all), the admin API the store,
//! the registry and the outbox. Each surface has one error type that turns
//! into its HTTP answer (`IntoResponse`).
//!
//! Under the router, [`listener`] accepts connections within the edge's
//! bounds and deadlines; around every route but the health probes, a
//! bound on requests in flight answers `503` at once beyond it; the admin
//! routes sit behind the [`hosts`] allow-list, then the admin token.

pub mod admin;
pub mod dashboard;
pub mod health;
pub mod hosts;
pub mod listener;
pub mod metrics;
pub mod simulator;
pub mod webhook;

use axum::Router;
use axum::extract::{FromRef, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use digibot_pipeline::dispatch::Dispatcher;
use digibot_pipeline::sender::Outbox;
use digibot_runtime::registry::Registry;
use digibot_store::Store;
use std::sync::Arc;
use tokio::sync::Semaphore;

pub use admin::{AdminAuth, AdminState};
pub use health::HealthState;
pub use hosts::AllowedHosts;
pub use listener::HttpLimits;
pub use metrics::MetricsState;
pub use simulator::SimulatorState;
pub use webhook::{WebhookAuth, WebhookState};

/// Every surface's state; each handler takes only its own part.
#[derive(Clone, FromRef)]
pub struct AppState {
    pub webhook: WebhookState,
    pub health: HealthState,
    /// No token: no admin API, dashboard or `/metrics`.
    pub admin_auth: AdminAuth,
    pub admin: AdminState,
    pub simulator: SimulatorState,
    pub metrics: MetricsState,
    /// Hosts the admin routes answer (DNS rebinding defence).
    pub allowed_hosts: AllowedHosts,
    pub in_flight: InFlight,
}

/// The bound on requests being handled at once (every route but the
/// health probes): a request past it is answered `503` at once, so that
/// Digishare retries rather than waits.
#[derive(Clone)]
pub struct InFlight(Arc<Semaphore>);

impl InFlight {
    pub fn new(max: usize) -> InFlight {
        InFlight(Arc::new(Semaphore::new(max.max(1))))
    }
}

async fn bound_in_flight(
    State(InFlight(slots)): State<InFlight>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(permit) = slots.try_acquire_owned() else {
        ::metrics::counter!(metrics::HTTP_REFUSED, "reason" => "in_flight").increment(1);
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            error_body("too many requests in flight; try again"),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let response = next.run(request).await;
    drop(permit);
    response
}

/// What the server is made of, as `digibot serve` wires it.
pub struct Parts {
    pub store: Store,
    pub dispatcher: Dispatcher,
    pub registry: Arc<Registry>,
    pub outbox: Outbox,
    pub webhook_auth: WebhookAuth,
    pub webhook_max_bytes: usize,
    pub admin_token: Option<String>,
    /// Host names the admin routes answer besides IP literals and
    /// `localhost` (`*`: any).
    pub allowed_hosts: Vec<String>,
    /// Requests handled at once (see [`InFlight`]).
    pub max_in_flight: usize,
}

impl AppState {
    /// Each surface's state from the server's parts.
    pub fn new(parts: Parts) -> AppState {
        let Parts {
            store,
            dispatcher,
            registry,
            outbox,
            webhook_auth,
            webhook_max_bytes,
            admin_token,
            allowed_hosts,
            max_in_flight,
        } = parts;
        AppState {
            allowed_hosts: AllowedHosts::new(&allowed_hosts),
            in_flight: InFlight::new(max_in_flight),
            simulator: SimulatorState {
                simulator: Arc::default(),
                registry: registry.clone(),
                turn_slots: dispatcher.turn_slots(),
            },
            health: HealthState::new(store.clone(), registry.clone()),
            metrics: MetricsState {
                store: store.clone(),
                registry: registry.clone(),
                dispatcher: dispatcher.clone(),
                handle: metrics::install(),
            },
            admin_auth: AdminAuth(admin_token.map(Arc::from)),
            admin: AdminState {
                store: store.clone(),
                registry,
                outbox,
                rollouts: dispatcher.rollouts(),
            },
            webhook: WebhookState {
                store,
                dispatcher,
                auth: webhook_auth,
                max_bytes: webhook_max_bytes,
            },
        }
    }
}

/// The HTTP routes.
pub fn app(state: AppState) -> Router {
    let mut router = Router::new().route("/webhooks/digishare", post(webhook::receive));
    if state.admin_auth.0.is_some() {
        let admin_only = axum::middleware::from_fn_with_state(state.clone(), admin::require_admin);
        // Outermost, so a refused host never reaches the token check.
        let known_host = axum::middleware::from_fn_with_state(
            state.allowed_hosts.clone(),
            hosts::require_allowed_host,
        );
        router = router
            .merge(
                admin::routes()
                    .layer(admin_only.clone())
                    .layer(known_host.clone()),
            )
            .merge(dashboard::routes().layer(known_host.clone()))
            // Like the admin API: only with an admin token, and behind it.
            .merge(metrics::routes().layer(admin_only).layer(known_host));
    }
    router
        .fallback(webhook::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.in_flight.clone(),
            bound_in_flight,
        ))
        // Outside the bound: probes answer however busy the server is.
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .with_state(state)
}

/// The JSON body of every error answer: `{"error": "..."}`.
pub(crate) fn error_body(message: impl std::fmt::Display) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "error": message.to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use digibot_pipeline::dispatch::Breaker;
    use digibot_runtime::{Runtime, RuntimeConfig};
    use serde_json::json;
    use std::time::Duration;
    use tokio::sync::watch as signal;
    use tower::ServiceExt;

    /// The server's state over a fresh store and an empty plugins folder,
    /// with the plugins not loaded yet.
    fn state(dir: &std::path::Path, admin_token: Option<&str>) -> AppState {
        let store =
            digibot_store_sqlite::open(&dir.join("data"), digibot_store_sqlite::Durability::Normal)
                .unwrap();
        let runtime = Arc::new(
            Runtime::new(RuntimeConfig {
                pooling: false,
                warm_instances: 0,
                ..RuntimeConfig::default()
            })
            .unwrap(),
        );
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        let registry = Arc::new(Registry::new(runtime, Some(plugins), &dir.join("data")));
        let outbox = Outbox::default();
        let (_stop, stop_rx) = signal::channel(false);
        let breaker = Breaker {
            failures: 5,
            cooldown: Duration::from_secs(30),
        };
        let dispatcher = Dispatcher::new(
            store.clone(),
            registry.clone(),
            outbox.clone(),
            4,
            1,
            breaker,
            digibot_domain::lifecycle::Rules::new("/bot", 0, Duration::from_secs(10)),
            stop_rx,
        );
        AppState::new(Parts {
            store,
            dispatcher,
            registry,
            outbox,
            webhook_auth: WebhookAuth::None,
            webhook_max_bytes: 1 << 20,
            admin_token: admin_token.map(str::to_string),
            allowed_hosts: Vec::new(),
            max_in_flight: 64,
        })
    }

    async fn get(app: &AppState, path: &str, bearer: Option<&str>) -> (StatusCode, String) {
        let mut request = Request::get(path);
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = super::app(app.clone())
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readyz_waits_for_the_plugins_and_fails_once_the_store_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let app = state(dir.path(), None);
        assert_eq!(
            get(&app, "/healthz", None).await,
            (StatusCode::OK, "ok".into())
        );

        let (status, body) = get(&app, "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            json!({"ready": false, "checks": {"store": "ok", "plugins": "not loaded yet"}, "plugins_loaded": 0})
        );

        assert!(app.admin.registry.load_dir().await.is_empty());
        let (status, body) = get(&app, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            json!({"ready": true, "checks": {"store": "ok", "plugins": "ok"}, "plugins_loaded": 0})
        );

        app.admin.store.close();
        // The store's answer is kept for a second (health::READY_CACHE).
        tokio::time::sleep(health::READY_CACHE + std::time::Duration::from_millis(100)).await;
        let (status, body) = get(&app, "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["ready"], false);
        assert_eq!(body["checks"]["store"], "the store is shut down");
        assert_eq!(body["checks"]["plugins"], "ok");
        // Alive all the same: the process serves.
        assert_eq!(get(&app, "/healthz", None).await.0, StatusCode::OK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_want_the_admin_token_and_exist_only_with_one() {
        let dir = tempfile::tempdir().unwrap();
        let app = state(dir.path(), Some("s3cret"));
        assert_eq!(
            get(&app, "/metrics", None).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            get(&app, "/metrics", Some("wrong")).await.0,
            StatusCode::UNAUTHORIZED
        );
        let (status, body) = get(&app, "/metrics", Some("s3cret")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\ndigibot_outbox_depth 0\n"), "{body}");
        assert!(body.contains("\ndigibot_dead_letters 0\n"), "{body}");
        assert!(
            body.contains("# TYPE digibot_webhooks_total counter\n"),
            "{body}"
        );

        // Every webhook outcome reads 0 before its first webhook, so
        // dashboards and alerts see each series from the start.
        for outcome in crate::metrics::WEBHOOK_OUTCOMES {
            let line = format!("\ndigibot_webhooks_total{{outcome=\"{outcome}\"}} ");
            assert!(body.contains(&line), "{outcome}: {body}");
        }
        assert!(body.contains("\ndigibot_api_retries_total 0\n"), "{body}");

        let dir = tempfile::tempdir().unwrap();
        let open = state(dir.path(), None);
        assert_eq!(get(&open, "/metrics", None).await.0, StatusCode::NOT_FOUND);
    }
}
