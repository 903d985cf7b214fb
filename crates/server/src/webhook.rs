//! The HTTP edge for Digishare: authenticate, cap the size, parse into a
//! typed [`Event`], record it durably, then answer. A 200 means the event is
//! committed; anything digibot cannot store is answered 503 so Digishare
//! retries rather than losing it.

use crate::error_body;
use crate::metrics::WEBHOOKS;
use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use digibot_domain::event::{Event, ParseError};
use digibot_pipeline::dispatch::Dispatcher;
use digibot_store::{Inserted, Store, StoredEvent};
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
    #[error("webhook body over {0} bytes")]
    TooLarge(usize),
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
            WebhookError::TooLarge(_) => "too_large",
            WebhookError::Unreadable(_) | WebhookError::Malformed(_) => "malformed",
            WebhookError::Unavailable => "unavailable",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            WebhookError::Unauthorized => StatusCode::UNAUTHORIZED,
            WebhookError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
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

/// `POST /webhooks/digishare`.
pub async fn receive(
    State(edge): State<WebhookState>,
    request: Request,
) -> Result<Response, WebhookError> {
    if !edge.auth.allows(request.headers()) {
        return Err(WebhookError::Unauthorized);
    }
    let limit = edge.max_bytes;
    let body = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                WebhookError::TooLarge(limit)
            } else {
                WebhookError::Unreadable(e.to_string())
            }
        })?;
    let event = Event::parse(&body)?;
    let key = event.key.clone();
    let dispatch = event.dispatched().then(|| event.clone());
    match edge.store.insert_event(event).await {
        Ok(Inserted::New(seq)) => {
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
                    edge.dispatcher.submit(StoredEvent {
                        seq,
                        event,
                        // The store's own time of this insert, within a
                        // commit's length.
                        received_at: digibot_store::now_ms(),
                    });
                }
                None => count("ignored"),
            }
            Ok(Json(json!({"status": "accepted", "event_id": key})).into_response())
        }
        Ok(Inserted::Duplicate) => {
            count("duplicate");
            Ok(Json(json!({"status": "duplicate", "event_id": key})).into_response())
        }
        Err(e) => {
            tracing::error!(event_id = %key, error = %e, "cannot record a webhook");
            Err(WebhookError::Unavailable)
        }
    }
}

/// Answers JSON for requests nobody routes.
pub async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, error_body("no such route")).into_response()
}
