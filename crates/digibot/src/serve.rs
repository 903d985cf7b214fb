//! `digibot serve`: builds every part from the settings, wires them
//! (store → dispatcher → runtime → sender, the HTTP surfaces over them),
//! runs the background tasks (dispatcher, sender, plugin watcher, replica
//! sync, retention), and shuts down gracefully, leaving unfinished work
//! durable for the next start.

use crate::config::Settings;
use digibot_pipeline::cluster::{self, ClusterPlugins};
use digibot_pipeline::dispatch::{Breaker, Dispatcher};
use digibot_pipeline::sender::{Outbox, Sender};
use digibot_runtime::registry::Registry;
use digibot_runtime::{Runtime, watch};
use digibot_server::{AppState, HttpLimits, Parts, WebhookAuth};
use digibot_store::now_ms;
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
    Store(#[from] digibot_store::StoreError),
    #[error("plugin runtime: {0}")]
    Runtime(String),
    #[error(transparent)]
    Client(#[from] digibot_pipeline::sender::ClientError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the plugin runtime from settings.
pub fn runtime(settings: &Settings) -> Result<Arc<Runtime>, ServeError> {
    Runtime::new(settings.runtime_config())
        .map(Arc::new)
        .map_err(|e| ServeError::Runtime(format!("{e:#}")))
}

/// Runs the server until SIGTERM or ctrl-c.
pub async fn serve(settings: Settings, insecure: bool) -> Result<(), ServeError> {
    // First, so that every update from here on is recorded.
    digibot_server::metrics::install();
    let webhook_auth = match (&settings.webhook_token, &settings.webhook_basic) {
        (Some(token), _) => WebhookAuth::Token(token.expose().to_string()),
        (None, Some(basic)) => WebhookAuth::Basic(basic.expose().to_string()),
        (None, None) => WebhookAuth::None,
    };
    if matches!(webhook_auth, WebhookAuth::None) {
        if !settings.listen.ip().is_loopback() && !insecure {
            return Err(ServeError::Unauthenticated(settings.listen));
        }
        tracing::warn!("webhooks are not authenticated (set DIGIBOT_WEBHOOK_TOKEN)");
    }

    // Before anything writes there: the compile cache holds native code
    // loaded without re-validation, so no one else may write it.
    private_dir(&settings.data_dir)?;
    let store = crate::config::open_store(&settings).await?;
    // Before the plugins compile: a base URL the token must not travel to
    // stops the start at once.
    let outbox = Outbox::default();
    let sender = Sender::new(&settings.sender_config(), store.clone(), outbox.clone())?;
    let runtime = runtime(&settings)?;
    let mut registry = Registry::new(runtime, settings.plugins_dir.clone(), &settings.data_dir);
    // With replicas, plugins are the cluster's (see `cluster`).
    let shared = store
        .plugin_records()
        .map(|records| Arc::new(ClusterPlugins::new(records)));
    if let Some(shared) = &shared {
        registry = registry.with_shared(shared.clone());
    }
    let registry = Arc::new(registry);
    let errors = registry.load_dir().await;
    for error in errors {
        tracing::error!("{error}");
    }
    let (stop_tx, stop_rx) = signal::channel(false);
    let plugin_sync =
        shared.map(|shared| tokio::spawn(cluster::run(registry.clone(), shared, stop_rx.clone())));
    let breaker = Breaker {
        failures: settings.runtime.breaker_failures,
        cooldown: Duration::from_secs(settings.runtime.breaker_cooldown_secs),
    };
    // Turns hold no thread, so their bound is the instance pool's: a
    // quarter of it may be warm and a quarter waiting to be reset, turns
    // use the other half (each holds one instance until it is done).
    let max_turns = (settings.runtime.pool_instances as usize / 2).max(1);
    let dispatcher = Dispatcher::new(
        store.clone(),
        registry.clone(),
        outbox.clone(),
        settings.concurrency,
        max_turns,
        breaker,
        settings.lifecycle_rules(),
        stop_rx.clone(),
    );
    // Plugins' outbound HTTP: one client per plugin, the journal in the store.
    let outbound = settings
        .outbound_config(std::env::vars())
        .map_err(|e| ServeError::Runtime(format!("outbound HTTP: {e}")))?;
    if !outbound.secrets.is_empty() {
        let names: Vec<&str> = outbound.secrets.names().map(|n| n.as_str()).collect();
        tracing::info!(secrets = ?names, "plugin secrets loaded (names only)");
    }
    let dispatcher = dispatcher.with_http(Arc::new(digibot_pipeline::outbound::Outbound::new(
        outbound,
        Some(store.clone()),
    )));
    // Rollouts (candidates in shadow or canary), as the store records
    // them: resumed after a restart, in step with other replicas.
    let rollout_sync = tokio::spawn(dispatcher.rollouts().run(stop_rx.clone()));
    let recovered = dispatcher.recover().await?;
    // Pending events nothing handed the dispatcher (a webhook cut off after
    // its commit, a lane that gave up), and with a shared database those
    // that other replicas leave to this one.
    dispatcher.poll_inbox();
    // Timers plugins scheduled, turned into events as they come due.
    dispatcher.fire_timers();
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
    let pruner = tokio::spawn({
        let store = store.clone();
        let settings = settings.clone();
        async move {
            loop {
                match store.prune(settings.retention(now_ms())).await {
                    Ok(p) if p.any() => tracing::info!(
                        events = p.events,
                        actions = p.actions,
                        dead_letters = p.dead_letters,
                        conversations = p.conversations,
                        kv_entries = p.kv_entries,
                        calls = p.calls,
                        "retention pruned"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "retention failed"),
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
    });

    let state = AppState::new(Parts {
        store: store.clone(),
        dispatcher: dispatcher.clone(),
        registry: registry.clone(),
        outbox,
        webhook_auth,
        webhook_max_bytes: settings.webhook_max_bytes,
        admin_token: settings
            .admin_token
            .as_ref()
            .map(|t| t.expose().to_string()),
        allowed_hosts: settings.http.allowed_hosts.0.clone(),
        max_in_flight: settings.http.max_in_flight,
    });
    let limits = within_open_files(settings.http_limits());
    let listener =
        digibot_server::listener::bind(settings.listen).map_err(|source| ServeError::Bind {
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
    digibot_server::listener::serve(
        listener,
        digibot_server::app(state),
        limits,
        shutdown_signal(),
    )
    .await;

    tracing::info!("shutting down: draining in-flight work");
    let _ = stop_tx.send(true);
    let drained = dispatcher.drain(grace).await;
    let _ = tokio::time::timeout(grace, sender_task).await;
    pruner.abort();
    rollout_sync.abort();
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

/// Creates `dir` (and its parents) readable and writable by this user
/// only, and warns when it already exists open to others.
fn private_dir(dir: &std::path::Path) -> Result<(), ServeError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o022 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777),
                "the data folder is writable by other users: they could plant native code in its compile cache (chmod 700 it)");
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// Raises the open-files soft limit to the hard one (as Go's runtime
/// does), and keeps `max_connections` under it with room for the
/// database, the plugins and the outgoing requests: past the limit,
/// accepting would fail instead of answering 503.
fn within_open_files(mut limits: HttpLimits) -> HttpLimits {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut nofile = getrlimit(Resource::Nofile);
        if nofile.current < nofile.maximum {
            let raised = rustix::process::Rlimit {
                current: nofile.maximum,
                maximum: nofile.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                nofile = getrlimit(Resource::Nofile);
            }
        }
        if let Some(files) = nofile.current {
            const RESERVE: u64 = 256;
            let room = usize::try_from(files.saturating_sub(RESERVE).max(16)).unwrap_or(usize::MAX);
            if limits.max_connections > room {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    open_files = files,
                    using = room,
                    "http.max_connections is over what the open-files limit allows (ulimit -n); using {room}"
                );
                limits.max_connections = room;
            }
        }
    }
    limits
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
