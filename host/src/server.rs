//! Wiring `digibot serve`: the router, the shared state, the background
//! tasks (dispatcher, sender, plugin watcher, retention), and a graceful
//! shutdown that leaves unfinished work durable for the next start.

use crate::admin;
use crate::cluster;
use crate::config::Settings;
use crate::dashboard;
use crate::dispatch::{Breaker, Dispatcher};
use crate::metrics;
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::sender::{Outbox, Sender};
use crate::store::{Store, now_ms};
use crate::watch;
use crate::webhook::{self, WebhookAuth};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch as signal;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {0} without webhook authentication: set DIGIBOT_WEBHOOK_TOKEN or DIGIBOT_WEBHOOK_BASIC, or pass --insecure"
    )]
    Unauthenticated(std::net::SocketAddr),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("plugin runtime: {0}")]
    Runtime(String),
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub dispatcher: Dispatcher,
    pub registry: Arc<Registry>,
    pub outbox: Outbox,
    pub webhook_auth: WebhookAuth,
    pub webhook_max_bytes: usize,
    pub admin_token: Option<String>,
    /// The dashboard's simulated conversations.
    pub simulator: Arc<crate::simulator::Simulator>,
}

/// The HTTP routes.
pub fn app(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/webhooks/digishare", post(webhook::receive));
    if let Some(admin) = admin::routes(state.clone()) {
        router = router.merge(admin).merge(dashboard::routes());
    }
    // Like the admin API: only with an admin token, and behind it.
    if state.admin_token.is_some() {
        router = router.route(
            "/metrics",
            get(metrics::handler).layer(axum::middleware::from_fn_with_state(
                state.clone(),
                admin::require_admin,
            )),
        );
    }
    router.fallback(webhook::not_found).with_state(state)
}

/// How long `/readyz` waits for the store before calling it not ready.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /readyz`: 200 when the store answers (through its writer, which
/// every webhook needs) and the plugins folder has been loaded; else 503
/// with what is not ready. Unauthenticated: it says nothing secret.
async fn readyz(State(app): State<AppState>) -> Response {
    let store = match tokio::time::timeout(READY_TIMEOUT, app.store.ping()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {} s", READY_TIMEOUT.as_secs()),
    };
    let plugins = if app.registry.loaded() {
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
        "plugins_loaded": app.registry.snapshot().plugins.len(),
    });
    (status, Json(body)).into_response()
}

/// Builds the plugin runtime from settings.
pub fn runtime(settings: &Settings) -> Result<Arc<Runtime>, ServeError> {
    Runtime::new(settings.runtime_config())
        .map(Arc::new)
        .map_err(|e| ServeError::Runtime(format!("{e:#}")))
}

/// Runs the server until SIGTERM or ctrl-c.
pub async fn serve(settings: Settings, insecure: bool) -> Result<(), ServeError> {
    let webhook_auth = match (&settings.webhook_token, &settings.webhook_basic) {
        (Some(token), _) => WebhookAuth::Token(token.clone()),
        (None, Some(basic)) => WebhookAuth::Basic(basic.clone()),
        (None, None) => WebhookAuth::None,
    };
    if matches!(webhook_auth, WebhookAuth::None) {
        if !settings.listen.ip().is_loopback() && !insecure {
            return Err(ServeError::Unauthenticated(settings.listen));
        }
        tracing::warn!("webhooks are not authenticated (set DIGIBOT_WEBHOOK_TOKEN)");
    }

    let store = Store::from_settings(&settings)?;
    let runtime = runtime(&settings)?;
    let mut registry = Registry::new(runtime, settings.plugins_dir.clone(), &settings.data_dir);
    // On PostgreSQL, plugins are the cluster's (see `cluster`).
    let shared = cluster::PgPlugins::new(&store, tokio::runtime::Handle::current()).map(Arc::new);
    if let Some(shared) = &shared {
        registry = registry.with_shared(shared.clone());
    }
    let registry = Arc::new(registry);
    // Blocking: compiles, and reads the shared record on PostgreSQL.
    let loading = registry.clone();
    let errors = tokio::task::spawn_blocking(move || loading.load_dir())
        .await
        .map_err(|e| ServeError::Runtime(format!("loading plugins: {e}")))?;
    for error in errors {
        tracing::error!("{error}");
    }
    let (stop_tx, stop_rx) = signal::channel(false);
    let plugin_sync =
        shared.map(|shared| tokio::spawn(cluster::run(registry.clone(), shared, stop_rx.clone())));
    let outbox = Outbox::default();
    let sender = Sender::new(&settings, store.clone(), outbox.clone())?;
    let breaker = Breaker {
        failures: settings.runtime.breaker_failures,
        cooldown: Duration::from_secs(settings.runtime.breaker_cooldown_secs),
    };
    // Deadlines are wall-clock, so more invocations than cores do not
    // stretch them, and a plugin stuck until its deadline then holds one
    // slot of several instead of a whole core's worth of conversations.
    let plugin_threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .saturating_mul(4)
        .max(4);
    // Warm pools may hold half the instance pool; invocations use the rest.
    let plugin_threads = plugin_threads
        .min(settings.runtime.pool_instances as usize / 2)
        .max(1);
    let dispatcher = Dispatcher::new(
        store.clone(),
        registry.clone(),
        outbox.clone(),
        settings.concurrency,
        plugin_threads,
        breaker,
        crate::lifecycle::Rules::from_settings(&settings),
        stop_rx.clone(),
    );
    let recovered = dispatcher.recover()?;
    // With a shared database: events that other replicas leave to this one.
    dispatcher.poll_inbox();
    let grace = Duration::from_secs(settings.shutdown_grace_secs);
    let sender_task = tokio::spawn(sender.run(stop_rx.clone(), grace));
    let _watcher = match (&settings.plugins_dir, settings.watch_plugins) {
        (Some(dir), true) => match watch::watch(dir, registry.clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the plugins folder; hot reload off");
                None
            }
        },
        _ => None,
    };
    let retention = Duration::from_secs(settings.retention_hours * 3600);
    let pruner = tokio::spawn({
        let store = store.clone();
        async move {
            loop {
                match store.prune(now_ms() - retention.as_millis() as i64).await {
                    Ok(p) if p.events + p.actions > 0 => {
                        tracing::info!(events = p.events, actions = p.actions, "retention pruned")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "retention failed"),
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
    });

    let state = AppState {
        store: store.clone(),
        dispatcher: dispatcher.clone(),
        registry: registry.clone(),
        outbox,
        webhook_auth,
        webhook_max_bytes: settings.webhook_max_bytes,
        admin_token: settings.admin_token.clone(),
        simulator: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.listen,
            source,
        })?;
    let plugins: Vec<String> = registry
        .snapshot()
        .plugins
        .iter()
        .map(|e| e.plugin.name.clone())
        .collect();
    tracing::info!(
        listen = %listener.local_addr()?,
        plugins = ?plugins,
        dry_run = settings.dry_run(),
        recovered,
        "digibot listening on {}",
        listener.local_addr()?
    );
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;

    tracing::info!("shutting down: draining in-flight work");
    let _ = stop_tx.send(true);
    let drained = dispatcher.drain(grace).await;
    let _ = tokio::time::timeout(grace, sender_task).await;
    pruner.abort();
    if let Some(sync) = plugin_sync {
        sync.abort();
    }
    store.close();
    tracing::info!(
        drained,
        "stopped; unfinished work resumes at the next start"
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RuntimeConfig;
    use crate::store::Durability;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// The server's state over a fresh store and an empty plugins folder,
    /// with the plugins not loaded yet.
    fn state(dir: &std::path::Path, admin_token: Option<&str>) -> AppState {
        let store = Store::open(&dir.join("data"), Durability::Normal).unwrap();
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
            crate::lifecycle::Rules::from_settings(&crate::config::Settings::default()),
            stop_rx,
        );
        AppState {
            store,
            dispatcher,
            registry,
            outbox,
            webhook_auth: WebhookAuth::None,
            webhook_max_bytes: 1 << 20,
            admin_token: admin_token.map(str::to_string),
            simulator: Arc::default(),
        }
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

        assert!(app.registry.load_dir().is_empty());
        let (status, body) = get(&app, "/readyz", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            json!({"ready": true, "checks": {"store": "ok", "plugins": "ok"}, "plugins_loaded": 0})
        );

        app.store.close();
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

        let dir = tempfile::tempdir().unwrap();
        let open = state(dir.path(), None);
        assert_eq!(get(&open, "/metrics", None).await.0, StatusCode::NOT_FOUND);
    }
}
