//! The HTTP edge for Digishare: authenticate, cap the size, parse into a
//! typed [`Event`], record it durably, then answer. A 200 means the event is
//! committed; anything digibot cannot store is answered 503 so Digishare
//! retries rather than losing it.

use crate::event::Event;
use crate::metrics::metrics;
use crate::server::AppState;
use crate::store::{Inserted, StoredEvent};
use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;

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

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Counts the webhook under `outcome` (see `digibot_webhooks_total`).
fn count(outcome: &str) {
    metrics().webhooks.with(&[outcome]).inc();
}

/// `POST /webhooks/digishare`.
pub async fn receive(State(app): State<AppState>, request: Request) -> Response {
    if !app.webhook_auth.allows(request.headers()) {
        count("unauthorized");
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong webhook credentials",
        );
    }
    let limit = app.webhook_max_bytes;
    let body = match axum::body::to_bytes(request.into_body(), limit).await {
        Ok(body) => body,
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            count(if too_large { "too_large" } else { "malformed" });
            return if too_large {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("webhook body over {limit} bytes"),
                )
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}"),
                )
            };
        }
    };
    let event = match Event::parse(&body) {
        Ok(event) => event,
        Err(e) => {
            count("malformed");
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let key = event.key.clone();
    let dispatch = event.dispatched().then(|| event.clone());
    match app.store.insert_event(event).await {
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
                    app.dispatcher.submit(StoredEvent { seq, event });
                }
                None => count("ignored"),
            }
            Json(json!({"status": "accepted", "event_id": key})).into_response()
        }
        Ok(Inserted::Duplicate) => {
            count("duplicate");
            Json(json!({"status": "duplicate", "event_id": key})).into_response()
        }
        Err(e) => {
            count("unavailable");
            tracing::error!(event_id = %key, error = %e, "cannot record a webhook");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot record the event now; retry",
            )
        }
    }
}

/// Answers JSON for requests nobody routes.
pub async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route")
}
