//! The HTTP edge for Digishare: authenticate, require JSON, cap the size
//! and the time the body takes, parse into a typed [`Event`], record it
//! durably, hand it to its conversation's lane, then answer. A 200 means
//! the event is committed; anything digibot cannot store is answered 503
//! so Digishare retries rather than losing it.
//!
//! Only `Content-Type: application/json` is taken (Digishare always sends
//! it): a web page can make a visitor's browser POST `text/plain` (or a
//! typeless blob) anywhere without asking, but not JSON.

use crate::error_body;
use crate::metrics::WEBHOOKS;
use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use digibot_domain::event::{Event, ParseError};
use digibot_pipeline::dispatch::Dispatcher;
use digibot_store::{Inserted, Judged, Store, StoredEvent};
use serde_json::json;

/// What the webhook edge needs: where events go.
#[derive(Clone)]
pub struct WebhookState {
    pub store: Store,
    pub dispatcher: Dispatcher,
    pub auth: WebhookAuth,
    /// Largest body accepted.
    pub max_bytes: usize,
}

/// Why a webhook was refused; each is counted under its outcome and
/// answered with its status and a JSON `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("missing or wrong webhook credentials")]
    Unauthorized,
    #[error("webhooks must be sent with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("webhook body over {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Timeout(String),
    #[error("cannot read the body: {0}")]
    Unreadable(String),
    #[error("{0}")]
    Malformed(#[from] ParseError),
    /// Not recorded: Digishare must retry.
    #[error("cannot record the event now; retry")]
    Unavailable,
}

impl WebhookError {
    /// Its outcome in `digibot_webhooks_total`.
    fn outcome(&self) -> &'static str {
        match self {
            WebhookError::Unauthorized => "unauthorized",
            WebhookError::UnsupportedMediaType => "unsupported_media_type",
            WebhookError::TooLarge(_) => "too_large",
            WebhookError::Timeout(_) => "timeout",
            WebhookError::Unreadable(_) | WebhookError::Malformed(_) => "malformed",
            WebhookError::Unavailable => "unavailable",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            WebhookError::Unauthorized => StatusCode::UNAUTHORIZED,
            WebhookError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            WebhookError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            WebhookError::Unreadable(_) | WebhookError::Malformed(_) => StatusCode::BAD_REQUEST,
            WebhookError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        count(self.outcome());
        (self.status(), error_body(&self)).into_response()
    }
}

/// How a webhook must authenticate.
#[derive(Debug, Clone)]
pub enum WebhookAuth {
    /// No auth (loopback only, or `--insecure`).
    None,
    /// `Authorization: Bearer T` or `X-Digishare-Secret: T`.
    Token(String),
    /// HTTP Basic with this `user:password`.
    Basic(String),
}

/// Compares without an early exit, so timing does not leak the secret.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl WebhookAuth {
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        match self {
            WebhookAuth::None => true,
            WebhookAuth::Token(token) => {
                let bearer = authorization
                    .strip_prefix("Bearer ")
                    .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()));
                let secret = headers
                    .get("x-digishare-secret")
                    .is_some_and(|v| same(v.as_bytes(), token.as_bytes()));
                bearer || secret
            }
            WebhookAuth::Basic(expected) => authorization
                .strip_prefix("Basic ")
                .and_then(|b64| {
                    base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .ok()
                })
                .is_some_and(|decoded| same(&decoded, expected.as_bytes())),
        }
    }
}

/// Counts the webhook under `outcome` (see `digibot_webhooks_total`).
fn count(outcome: &'static str) {
    metrics::counter!(WEBHOOKS, "outcome" => outcome).increment(1);
}

/// Whether the body is declared JSON (`application/json`, any parameters).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// `POST /webhooks/digishare`.
pub async fn receive(
    State(edge): State<WebhookState>,
    request: Request,
) -> Result<Response, WebhookError> {
    if !edge.auth.allows(request.headers()) {
        return Err(WebhookError::Unauthorized);
    }
    if !is_json(request.headers()) {
        return Err(WebhookError::UnsupportedMediaType);
    }
    let limit = edge.max_bytes;
    let body = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                WebhookError::TooLarge(limit)
            } else if crate::listener::is_body_timeout(&e) {
                WebhookError::Timeout(e.to_string())
            } else {
                WebhookError::Unreadable(e.to_string())
            }
        })?;
    let event = Event::parse(&body)?;
    let key = event.key.clone();
    // In a task of its own: once the insert is under way, a client that
    // hangs up cancels this handler, not the commit's hand-off to the
    // dispatcher (the event would otherwise stay pending until a sweep).
    let recording = tokio::spawn(record(edge.store, edge.dispatcher, event));
    match recording.await {
        Ok(Ok(status)) => Ok(Json(json!({"status": status, "event_id": key})).into_response()),
        Ok(Err(e)) => {
            tracing::error!(event_id = %key, error = %e, "cannot record a webhook");
            Err(WebhookError::Unavailable)
        }
        Err(e) => {
            tracing::error!(event_id = %key, error = %e, "recording a webhook failed");
            Err(WebhookError::Unavailable)
        }
    }
}

/// Records `event`, hands it to its lane and counts it; its answer's
/// `status`: `accepted` or `duplicate`.
async fn record(
    store: Store,
    dispatcher: Dispatcher,
    event: Event,
) -> Result<&'static str, digibot_store::StoreError> {
    let dispatch = event.dispatched().then(|| event.clone());
    let key = event.key.clone();
    // An agent message whose conversation has nothing in flight here is
    // judged in its insert's transaction: one round trip, no lane.
    let judge = dispatch
        .as_ref()
        .and_then(|e| dispatcher.judge_at_insert(e));
    let inserted = match (judge, &dispatch) {
        (Some(judge), Some(copy)) => match store.insert_judged(event, judge).await? {
            judged @ Judged::Handled { .. } => {
                count("ignored");
                dispatcher.judged(copy, &judged).await;
                return Ok("accepted");
            }
            Judged::Pending(seq) => Inserted::New(seq),
            Judged::Duplicate => Inserted::Duplicate,
        },
        _ => store.insert_event(event).await?,
    };
    match inserted {
        Inserted::New(seq) => {
            // `accepted` when plugins will run; agent messages and
            // archiving go through the dispatcher too (they change who is
            // in charge) but run no plugin: `ignored`, as before.
            match dispatch {
                Some(event) => {
                    count(if event.invokes_plugins() {
                        "accepted"
                    } else {
                        "ignored"
                    });
                    dispatcher.submit(StoredEvent {
                        seq,
                        event,
                        // The store's own time of this insert, within a
                        // commit's length.
                        received_at: digibot_store::now_ms(),
                    });
                }
                None => count("ignored"),
            }
            Ok("accepted")
        }
        Inserted::Duplicate => {
            count("duplicate");
            // Digishare redelivers what it believes lost. If the first
            // copy is still pending and no lane has it (its delivery was
            // cut off, or its lane gave up), this hands it over now; the
            // dispatcher skips an event it already has.
            if dispatch.is_some() {
                match store.pending_event(&key).await {
                    Ok(Some(stored)) => dispatcher.submit(stored),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(event_id = %key, error = %e,
                        "cannot look up a redelivered event; the pending sweep will find it"),
                }
            }
            Ok("duplicate")
        }
    }
}

/// Answers JSON for requests nobody routes.
pub async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, error_body("no such route")).into_response()
}
