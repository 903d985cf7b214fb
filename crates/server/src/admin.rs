//! The admin API under `/admin`, behind `DIGIBOT_ADMIN_TOKEN` (no token: the
//! routes do not exist). Dead letters, recent events (with the journal of
//! their plugins' outbound HTTP calls) and conversations
//! (with who is in charge, and handing one back to the bot), plugin
//! management (list, upload, delete, rollback), and the simulator's
//! routes (see `simulator`). The dashboard page itself (`dashboard`) is
//! served without the token: it holds no data and calls these routes.

use crate::{AppState, error_body, simulator};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use digibot_pipeline::rollout::{
    Mode, Promotion, REPLAY_DEFAULT, REPLAY_MAX, RolloutError, Rollouts,
};
use digibot_pipeline::sender::Outbox;
use digibot_runtime::registry::{Registry, RegistryError};
use digibot_runtime::{LoadError, Plugin};
use digibot_store::{EventSummary, JournalEntry, JournalOutcome, Release, Store, StoreError};
use metrics::counter;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The admin token (`None`: the admin routes do not exist).
#[derive(Clone)]
pub struct AdminAuth(pub Option<Arc<str>>);

/// What the admin API works on.
#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    pub registry: Arc<Registry>,
    /// Woken when dead letters go back to the outbox.
    pub outbox: Outbox,
    /// Candidates in shadow or canary (the dispatcher's).
    pub rollouts: Arc<Rollouts>,
}

/// Why an admin request failed, as its HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin token required")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A conflict with the evidence for it (a promotion's replay).
    #[error("{message}")]
    ConflictWith {
        message: String,
        details: serde_json::Value,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    BadRequest(String),
    /// A blocking task (a compile) died.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match &self {
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) | AdminError::ConflictWith { .. } => StatusCode::CONFLICT,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::Store(_) | AdminError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::Registry(e) => match e {
                RegistryError::NotFound(_) | RegistryError::NoPrevious(_) => StatusCode::NOT_FOUND,
                RegistryError::Load { .. } | RegistryError::Manifest { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                RegistryError::Io { .. } | RegistryError::CompilerPanicked(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                // The database is away: nothing changed; try again.
                RegistryError::Shared { .. } => StatusCode::SERVICE_UNAVAILABLE,
            },
        };
        let mut body = error_body(&self);
        // The refused imports also as a list, for tools.
        if let AdminError::Registry(RegistryError::Load {
            source: LoadError::RefusedImports(imports),
            ..
        }) = &self
        {
            body["refused_imports"] = json!(imports);
        }
        if let AdminError::ConflictWith { details, .. } = &self
            && let (Some(body), Some(details)) = (body.as_object_mut(), details.as_object())
        {
            body.extend(details.clone());
        }
        (status, body).into_response()
    }
}

type Answer = Result<Response, AdminError>;

fn ok(value: impl serde::Serialize) -> Answer {
    Ok(Json(value).into_response())
}

/// The `/admin` routes, the simulator's among them; the caller adds the
/// token check ([`require_admin`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/dead-letters", get(dead_letters))
        .route("/admin/dead-letters/retry", post(retry_all))
        .route("/admin/dead-letters/{id}/retry", post(retry_one))
        .route("/admin/dead-letters/{id}", axum::routing::delete(drop_one))
        .route("/admin/events", get(events))
        .route("/admin/events/{key}/journal", get(journal))
        .route("/admin/outbox", get(outbox))
        .route("/admin/plugins", get(plugins))
        .route(
            "/admin/plugins/{name}",
            axum::routing::put(upload).delete(remove),
        )
        .route("/admin/plugins/{name}/rollback", post(rollback))
        .route("/admin/plugins/{name}/rollout", get(rollout))
        .route("/admin/plugins/{name}/promote", post(promote))
        .route("/admin/plugins/{name}/abort", post(abort))
        .route("/admin/conversations", get(conversations))
        .route("/admin/conversations/{id}", get(conversation))
        .merge(simulator::routes())
        .route("/admin/conversations/{id}/release", post(release))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
}

/// Lets a request through only with `Authorization: Bearer ADMIN_TOKEN`
/// (the admin API and `/metrics`).
pub async fn require_admin(
    State(AdminAuth(token)): State<AdminAuth>,
    req: Request,
    next: Next,
) -> Response {
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
        _ => AdminError::Unauthorized.into_response(),
    }
}

async fn dead_letters(State(admin): State<AdminState>) -> Answer {
    ok(admin.store.dead_letters().await?)
}

async fn retry(admin: AdminState, id: Option<i64>) -> Answer {
    match admin.store.retry_dead(id).await? {
        0 if id.is_some() => Err(AdminError::NotFound("no such dead letter".into())),
        n => {
            admin.outbox.wake();
            ok(json!({ "retried": n }))
        }
    }
}

async fn retry_all(State(admin): State<AdminState>) -> Answer {
    retry(admin, None).await
}

async fn retry_one(State(admin): State<AdminState>, Path(id): Path<i64>) -> Answer {
    retry(admin, Some(id)).await
}

async fn drop_one(State(admin): State<AdminState>, Path(id): Path<i64>) -> Answer {
    if admin.store.drop_dead(id).await? {
        ok(json!({ "dropped": id }))
    } else {
        Err(AdminError::NotFound("no such dead letter".into()))
    }
}

#[derive(serde::Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn events(State(admin): State<AdminState>, Query(q): Query<Limit>) -> Answer {
    let limit = q.limit.unwrap_or(100).min(10_000);
    ok(admin.store.recent_events(limit).await?)
}

/// Response bodies shown in the journal view are cut here.
const JOURNAL_BODY_SHOWN: usize = 4096;

/// Response headers hidden in the journal view (the journal keeps them for
/// replays).
const HIDDEN_RESPONSE_HEADERS: &[&str] = &["set-cookie", "authorization"];

/// One journaled call as the admin API shows it: secrets were never in the
/// journal (placeholders, scrubbed responses); session cookies and long
/// bodies are cut here.
fn journal_view(entry: JournalEntry) -> serde_json::Value {
    let outcome = match entry.outcome {
        JournalOutcome::Response {
            status,
            headers,
            body,
        } => {
            let headers: Vec<(String, String)> = headers
                .into_iter()
                .map(|(name, value)| {
                    if HIDDEN_RESPONSE_HEADERS.contains(&name.as_str()) {
                        (name, "[redacted]".to_string())
                    } else {
                        (name, value)
                    }
                })
                .collect();
            let shown = &body[..body.len().min(JOURNAL_BODY_SHOWN)];
            json!({
                "response": {
                    "status": status,
                    "headers": headers,
                    "body": String::from_utf8_lossy(shown),
                    "body_bytes": body.len(),
                    "truncated": body.len() > JOURNAL_BODY_SHOWN,
                }
            })
        }
        JournalOutcome::Failed { refusal } => json!({
            "refused": {"kind": refusal.kind(), "message": refusal.to_string()}
        }),
    };
    let mut view = json!({
        "plugin": entry.plugin,
        "call": entry.call,
        "request": entry.request,
        "elapsed_ms": entry.elapsed_ms,
        "recorded_at": entry.recorded_at,
    });
    if let (Some(view), Some(outcome)) = (view.as_object_mut(), outcome.as_object()) {
        view.extend(outcome.clone());
    }
    view
}

/// The outbound calls the plugins made while handling one event, as
/// journaled (by plugin, then call number).
async fn journal(State(admin): State<AdminState>, Path(key): Path<String>) -> Answer {
    let entries = admin.store.journal(&key, None).await?;
    ok(json!({
        "event": key,
        "calls": entries.into_iter().map(journal_view).collect::<Vec<_>>(),
    }))
}

async fn outbox(State(admin): State<AdminState>) -> Answer {
    let counts = admin.store.outbox_counts().await?;
    ok(counts.into_iter().collect::<BTreeMap<_, _>>())
}

async fn conversations(State(admin): State<AdminState>, Query(q): Query<Limit>) -> Answer {
    let limit = q.limit.unwrap_or(50).min(1000);
    ok(admin.store.recent_conversations(limit).await?)
}

async fn conversation(State(admin): State<AdminState>, Path(id): Path<String>) -> Answer {
    let detail = admin.store.conversation(&id).await?;
    if detail.events.is_empty() && detail.actions.is_empty() {
        return Err(AdminError::NotFound(
            "no recent events in this conversation".into(),
        ));
    }
    // The versions it is pinned to (`pin = "conversation"`), by plugin.
    let pins: BTreeMap<String, String> = admin.store.pins(&id).await?.into_iter().collect();
    let mut body = serde_json::to_value(&detail).unwrap_or_default();
    body["pins"] = json!(pins);
    ok(body)
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
pub fn latencies(events: &[EventSummary]) -> BTreeMap<(String, String), Latency> {
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

async fn plugins(State(admin): State<AdminState>) -> Answer {
    let latency = latencies(&admin.store.recent_events(LATENCY_EVENTS).await?);
    let plugins: Vec<serde_json::Value> = admin
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
    ok(json!({
        "pooling": admin.registry.runtime().pooling(),
        "plugins": plugins,
    }))
}

fn installed(plugin: &Plugin) -> Answer {
    ok(json!({
        "name": plugin.name,
        "version": plugin.hash,
        "wit_version": plugin.wit_version,
        "cached": plugin.cached,
        "compile_ms": plugin.compile_time.as_millis() as u64,
    }))
}

/// Runs a registry change to its end on its own task: a client that hangs
/// up mid-upload does not cancel a change half-way through its steps
/// (compile, record, publish).
async fn change<T: Send + 'static, E: Into<AdminError> + Send + 'static>(
    change: impl Future<Output = Result<T, E>> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::spawn(change).await?.map_err(Into::into)
}

impl From<RolloutError> for AdminError {
    fn from(e: RolloutError) -> AdminError {
        match e {
            RolloutError::Registry(e) => AdminError::Registry(e),
            RolloutError::Store(e) => AdminError::Store(e),
            RolloutError::NotServing(_) | RolloutError::NoRollout(_) => {
                AdminError::NotFound(e.to_string())
            }
            RolloutError::BadRequest(m) => AdminError::BadRequest(m),
            RolloutError::NotReady(m) => AdminError::Conflict(m),
            RolloutError::ReplayDiffers { message, replay } => AdminError::ConflictWith {
                message,
                details: json!({ "replay": replay }),
            },
        }
    }
}

/// `PUT /admin/plugins/{name}`'s query: with `mode`, the body is a
/// rollout's candidate instead of the new serving version.
#[derive(Debug, serde::Deserialize)]
struct UploadQuery {
    mode: Option<String>,
    percent: Option<u8>,
}

async fn upload(
    State(admin): State<AdminState>,
    Path(name): Path<String>,
    Query(query): Query<UploadQuery>,
    body: Bytes,
) -> Answer {
    if let Some(mode) = &query.mode {
        let mode = Mode::parse(mode, query.percent)?;
        let rollouts = admin.rollouts.clone();
        let record =
            change(async move { rollouts.start(&name, body.to_vec(), mode).await }).await?;
        return Ok((StatusCode::CREATED, Json(json!({ "rollout": record }))).into_response());
    }
    if query.percent.is_some() {
        return Err(AdminError::BadRequest("percent is for mode=canary".into()));
    }
    let registry = admin.registry.clone();
    let plugin = change(async move { registry.install(&name, &body).await }).await?;
    installed(&plugin)
}

async fn remove(State(admin): State<AdminState>, Path(name): Path<String>) -> Answer {
    let (registry, removed) = (admin.registry.clone(), name.clone());
    change(async move { registry.remove(&name).await }).await?;
    ok(json!({ "removed": removed }))
}

async fn rollback(State(admin): State<AdminState>, Path(name): Path<String>) -> Answer {
    let registry = admin.registry.clone();
    let plugin = change(async move { registry.rollback(&name).await }).await?;
    installed(&plugin)
}

/// `GET /admin/plugins/{name}/rollout`'s query.
#[derive(Debug, serde::Deserialize)]
struct RolloutQuery {
    /// Newest comparisons shown (default 100, at most 1000).
    limit: Option<usize>,
}

/// `GET /admin/plugins/{name}/rollout`: the plugin's latest rollout, its
/// totals and its newest comparisons (the same on every replica), and
/// whether this replica runs it.
async fn rollout(
    State(admin): State<AdminState>,
    Path(name): Path<String>,
    Query(query): Query<RolloutQuery>,
) -> Answer {
    let Some(record) = admin.store.rollout(&name).await? else {
        return Err(AdminError::NotFound(format!(
            "plugin {name} has no rollout"
        )));
    };
    let limit = query.limit.unwrap_or(100).min(1000);
    let events = admin.store.comparisons(&name, &record.id, limit).await?;
    ok(json!({
        "totals": {
            "compared": record.same + record.different + record.failed,
            "same": record.same,
            "different": record.different,
            "failed": record.failed,
        },
        "running_here": admin.rollouts.runs(&name, &record.id),
        "canary": admin.rollouts.canary_view(&name),
        "rollout": record,
        "events": events,
    }))
}

/// `POST /admin/plugins/{name}/promote`'s query.
#[derive(Debug, serde::Deserialize)]
struct PromoteQuery {
    require_same: Option<u64>,
    #[serde(default)]
    accept_differences: bool,
    /// Recent production turns replayed against the candidate first.
    replay: Option<usize>,
}

/// `POST /admin/plugins/{name}/promote`: the candidate becomes the serving
/// version (409 when the evidence asked for is not there, or the recent
/// turns replayed against it differ: the body has them).
async fn promote(
    State(admin): State<AdminState>,
    Path(name): Path<String>,
    Query(query): Query<PromoteQuery>,
) -> Answer {
    let rollouts = admin.rollouts.clone();
    if query.replay.is_some_and(|n| n > REPLAY_MAX) {
        return Err(AdminError::BadRequest(format!(
            "replay={} is more than {REPLAY_MAX}",
            query.replay.unwrap_or_default()
        )));
    }
    let ask = Promotion {
        require_same: query.require_same,
        accept_differences: query.accept_differences,
        replay: query.replay.unwrap_or(REPLAY_DEFAULT),
    };
    let promoted = change(async move { rollouts.promote(&name, ask).await }).await?;
    ok(json!({
        "rollout": promoted.record,
        "version": promoted.plugin.hash,
        "promoted": promoted.plugin.name,
        "replay": promoted.replay,
    }))
}

/// `POST /admin/plugins/{name}/abort`: the candidate stops; the serving
/// version stays.
async fn abort(State(admin): State<AdminState>, Path(name): Path<String>) -> Answer {
    let rollouts = admin.rollouts.clone();
    let record = change(async move { rollouts.abort(&name).await }).await?;
    ok(json!({ "rollout": record }))
}

/// `POST /admin/conversations/{id}/release`: a conversation in a human's
/// hands goes back to the bot. 404 for a conversation digibot never saw,
/// 409 when it is not in a human's hands.
async fn release(State(admin): State<AdminState>, Path(id): Path<String>) -> Answer {
    match admin
        .store
        .release(&id, "released through the admin API".into())
        .await?
    {
        Release::Released => {
            counter!(digibot_pipeline::metrics::RELEASES, "reason" => "admin").increment(1);
            tracing::info!(conversation = %id, reason = "admin API", "conversation released to the bot");
            ok(json!({ "conversation_id": id, "state": "bot" }))
        }
        Release::NotHuman(state) => Err(AdminError::Conflict(format!(
            "conversation {id} is {state}, not in a human's hands"
        ))),
        Release::Unknown => Err(AdminError::NotFound(format!("no conversation {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
