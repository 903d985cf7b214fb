//! The admin API under `/admin`, behind `DIGIBOT_ADMIN_TOKEN` (no token: the
//! routes do not exist). Dead letters, recent events and conversations
//! (with who is in charge, and handing one back to the bot), plugin
//! management (list, upload, delete, rollback), and the simulator's
//! routes (see `simulator`). The dashboard page itself (`dashboard`) is
//! served without the token: it holds no data and calls these routes.

use crate::registry::RegistryError;
use crate::runtime::LoadError;
use crate::server::AppState;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use std::collections::BTreeMap;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The `/admin` routes, or none when no admin token is configured.
pub fn routes(state: AppState) -> Option<Router<AppState>> {
    state.admin_token.as_ref()?;
    let router = Router::new()
        .route("/admin/dead-letters", get(dead_letters))
        .route("/admin/dead-letters/retry", post(retry_all))
        .route("/admin/dead-letters/{id}/retry", post(retry_one))
        .route("/admin/dead-letters/{id}", axum::routing::delete(drop_one))
        .route("/admin/events", get(events))
        .route("/admin/outbox", get(outbox))
        .route("/admin/plugins", get(plugins))
        .route(
            "/admin/plugins/{name}",
            axum::routing::put(upload).delete(remove),
        )
        .route("/admin/plugins/{name}/rollback", post(rollback))
        .route("/admin/conversations", get(conversations))
        .route("/admin/conversations/{id}", get(conversation))
        .merge(crate::simulator::routes())
        .route("/admin/conversations/{id}/release", post(release))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .layer(middleware::from_fn_with_state(state, require_admin));
    Some(router)
}

/// Lets a request through only with `Authorization: Bearer ADMIN_TOKEN`
/// (the admin API, the dashboard and `/metrics`).
pub async fn require_admin(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let token = app.admin_token.as_deref();
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (token, given) {
        (Some(token), Some(given)) if crate::webhook::same(given.as_bytes(), token.as_bytes()) => {
            next.run(req).await
        }
        _ => error(StatusCode::UNAUTHORIZED, "admin token required"),
    }
}

fn store_error(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn dead_letters(State(app): State<AppState>) -> Response {
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.dead_letters()).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

async fn retry(app: AppState, id: Option<i64>) -> Response {
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.retry_dead_blocking(id)).await {
        Ok(Ok(0)) if id.is_some() => error(StatusCode::NOT_FOUND, "no such dead letter"),
        Ok(Ok(n)) => {
            app.outbox.wake();
            Json(json!({ "retried": n })).into_response()
        }
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

async fn retry_all(State(app): State<AppState>) -> Response {
    retry(app, None).await
}

async fn retry_one(State(app): State<AppState>, Path(id): Path<i64>) -> Response {
    retry(app, Some(id)).await
}

async fn drop_one(State(app): State<AppState>, Path(id): Path<i64>) -> Response {
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.drop_dead_blocking(id)).await {
        Ok(Ok(true)) => Json(json!({ "dropped": id })).into_response(),
        Ok(Ok(false)) => error(StatusCode::NOT_FOUND, "no such dead letter"),
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

#[derive(serde::Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn events(State(app): State<AppState>, Query(q): Query<Limit>) -> Response {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.recent_events(limit)).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

async fn outbox(State(app): State<AppState>) -> Response {
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.outbox_counts()).await {
        Ok(Ok(rows)) => Json(
            rows.into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
        .into_response(),
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

async fn conversations(State(app): State<AppState>, Query(q): Query<Limit>) -> Response {
    let limit = q.limit.unwrap_or(50).min(1000);
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.recent_conversations(limit)).await {
        Ok(Ok(rows)) => Json(rows).into_response(),
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

async fn conversation(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.conversation(&id)).await {
        Ok(Ok(detail)) if detail.events.is_empty() && detail.actions.is_empty() => error(
            StatusCode::NOT_FOUND,
            "no recent events in this conversation",
        ),
        Ok(Ok(detail)) => Json(detail).into_response(),
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

/// Events whose recorded plugin outcomes feed the latency summary.
const LATENCY_EVENTS: usize = 1000;

/// Invocation latency of one plugin version over recent events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// p50/p99 of `elapsed_us` per plugin and version (the first 12 hex
/// digits, as outcomes record it), from the outcomes stored with recent
/// events: the runtime's own record of each invocation, so nothing is
/// counted twice. Filtered and skipped outcomes did not run and are left
/// out.
pub fn latencies(events: &[crate::store::EventSummary]) -> BTreeMap<(String, String), Latency> {
    let mut samples: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for event in events {
        for outcome in event.plugins.as_array().into_iter().flatten() {
            if !matches!(outcome["outcome"].as_str(), Some("ok" | "failed")) {
                continue;
            }
            let (Some(plugin), Some(version), Some(us)) = (
                outcome["plugin"].as_str(),
                outcome["version"].as_str(),
                outcome["elapsed_us"].as_u64(),
            ) else {
                continue;
            };
            samples
                .entry((plugin.to_string(), version.to_string()))
                .or_default()
                .push(us);
        }
    }
    samples
        .into_iter()
        .map(|(key, mut us)| {
            us.sort_unstable();
            // Nearest rank.
            let rank = |q: f64| us[((q * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1];
            let latency = Latency {
                samples: us.len(),
                p50_us: rank(0.50),
                p99_us: rank(0.99),
            };
            (key, latency)
        })
        .collect()
}

async fn plugins(State(app): State<AppState>) -> Response {
    let store = app.store.clone();
    let recent = tokio::task::spawn_blocking(move || store.recent_events(LATENCY_EVENTS)).await;
    let latency = match recent {
        Ok(Ok(events)) => latencies(&events),
        Ok(Err(e)) => return store_error(e),
        Err(e) => return store_error(e),
    };
    let plugins: Vec<serde_json::Value> = app
        .registry
        .report()
        .into_iter()
        .map(|report| {
            let key = (
                report.name.clone(),
                report.version.chars().take(12).collect::<String>(),
            );
            let mut value = json!(report);
            value["latency"] = json!(latency.get(&key));
            value
        })
        .collect();
    Json(json!({
        "pooling": app.registry.runtime().pooling(),
        "plugins": plugins,
    }))
    .into_response()
}

fn registry_error(e: RegistryError) -> Response {
    let status = match &e {
        RegistryError::NotFound(_) | RegistryError::NoPrevious(_) => StatusCode::NOT_FOUND,
        RegistryError::Load { .. } | RegistryError::Manifest { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        RegistryError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        // The database is away: nothing changed; try again.
        RegistryError::Shared { .. } => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut body = json!({ "error": e.to_string() });
    // The refused imports also as a list, for tools.
    if let RegistryError::Load {
        source: LoadError::RefusedImports(imports),
        ..
    } = &e
    {
        body["refused_imports"] = json!(imports);
    }
    (status, Json(body)).into_response()
}

fn installed(plugin: &crate::runtime::Plugin) -> Response {
    Json(json!({
        "name": plugin.name,
        "version": plugin.hash,
        "wit_version": plugin.wit_version,
        "cached": plugin.cached,
        "compile_ms": plugin.compile_time.as_millis() as u64,
    }))
    .into_response()
}

async fn upload(State(app): State<AppState>, Path(name): Path<String>, body: Bytes) -> Response {
    let registry = app.registry.clone();
    match tokio::task::spawn_blocking(move || registry.install(&name, &body)).await {
        Ok(Ok(plugin)) => installed(&plugin),
        Ok(Err(e)) => registry_error(e),
        Err(e) => store_error(e),
    }
}

async fn remove(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    // Blocking: it waits for an install in progress (a compile) to finish.
    let registry = app.registry.clone();
    let removed = name.clone();
    match tokio::task::spawn_blocking(move || registry.remove(&name)).await {
        Ok(Ok(())) => Json(json!({ "removed": removed })).into_response(),
        Ok(Err(e)) => registry_error(e),
        Err(e) => store_error(e),
    }
}

async fn rollback(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    let registry = app.registry.clone();
    match tokio::task::spawn_blocking(move || registry.rollback(&name)).await {
        Ok(Ok(plugin)) => installed(&plugin),
        Ok(Err(e)) => registry_error(e),
        Err(e) => store_error(e),
    }
}

/// `POST /admin/conversations/{id}/release`: a conversation in a human's
/// hands goes back to the bot. 404 for a conversation digibot never saw,
/// 409 when it is not in a human's hands.
async fn release(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    use crate::store::Release;
    let store = app.store.clone();
    let conversation = id.clone();
    let released = tokio::task::spawn_blocking(move || {
        store.release_blocking(&conversation, "released through the admin API".into())
    })
    .await;
    match released {
        Ok(Ok(Release::Released)) => {
            crate::metrics::metrics().releases.with(&["admin"]).inc();
            tracing::info!(conversation = %id, reason = "admin API", "conversation released to the bot");
            Json(json!({ "conversation_id": id, "state": "bot" })).into_response()
        }
        Ok(Ok(Release::NotHuman(state))) => error(
            StatusCode::CONFLICT,
            format!("conversation {id} is {state}, not in a human's hands"),
        ),
        Ok(Ok(Release::Unknown)) => error(StatusCode::NOT_FOUND, format!("no conversation {id}")),
        Ok(Err(e)) => store_error(e),
        Err(e) => store_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EventSummary;

    fn event(outcomes: serde_json::Value) -> EventSummary {
        EventSummary {
            seq: 1,
            key: "k".into(),
            event: "live_chat.new_message".into(),
            conversation_id: Some("c".into()),
            status: "handled".into(),
            received_at: 0,
            handled_at: Some(0),
            plugins: outcomes,
        }
    }

    #[test]
    fn latency_is_summarised_per_plugin_version_from_recorded_invocations() {
        let mut events: Vec<EventSummary> = (1..=100)
            .map(|us| {
                event(json!([
                    {"plugin": "echo", "version": "aaaaaaaaaaaa", "outcome": "ok", "elapsed_us": us},
                    {"plugin": "greeter", "version": "bbbbbbbbbbbb", "outcome": "filtered", "elapsed_us": 0},
                ]))
            })
            .collect();
        events.push(event(json!([
            {"plugin": "echo", "version": "cccccccccccc", "outcome": "failed", "elapsed_us": 7},
            {"plugin": "echo", "version": "aaaaaaaaaaaa", "outcome": "skipped", "elapsed_us": 0},
        ])));
        let latency = latencies(&events);
        assert_eq!(
            latency.get(&("echo".into(), "aaaaaaaaaaaa".into())),
            Some(&Latency {
                samples: 100,
                p50_us: 50,
                p99_us: 99
            })
        );
        assert_eq!(
            latency.get(&("echo".into(), "cccccccccccc".into())),
            Some(&Latency {
                samples: 1,
                p50_us: 7,
                p99_us: 7
            })
        );
        // Filtered and skipped outcomes did not run.
        assert_eq!(latency.len(), 2);
    }
}
