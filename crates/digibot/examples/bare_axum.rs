//! The ceiling of the load benchmark (`scripts/bench-load`): an axum
//! server whose `POST /webhooks/digishare` only parses the body as JSON and
//! answers 200, i.e. the fastest a Rust webhook endpoint can acknowledge,
//! with no auth, no storage and no work behind it.
//!
//! `cargo run --release -p digibot --example bare_axum -- 127.0.0.1:8090`

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

async fn receive(body: Bytes) -> Response {
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(_) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            r#"{"status":"accepted"}"#,
        )
            .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/webhooks/digishare", post(receive));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bare axum listening on {addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
