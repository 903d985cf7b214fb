//! The operator's web dashboard at `/admin`: one static page (HTML, CSS and
//! plain JS, embedded in the binary; no front-end build). The page holds no
//! data and is served without the token; its script asks for the admin
//! token, keeps it in the browser's `sessionStorage`, and calls the JSON
//! admin API (`admin`, `simulator`) with `Authorization: Bearer`. Served
//! only when the admin API is on.
//!
//! The Content-Security-Policy allows scripts and styles from this origin
//! only (nothing inline), so text from conversations, which the script
//! inserts as text nodes anyway, can never run as code next to the token.

use crate::AppState;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("dashboard/index.html");
const CSS: &str = include_str!("dashboard/dashboard.css");
const JS: &str = include_str!("dashboard/dashboard.js");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}

/// `GET /admin` (the page), `/admin/dashboard.css`, `/admin/dashboard.js`.
pub fn routes() -> Router<AppState> {
    let index = get(|| async { asset("text/html; charset=utf-8", INDEX) });
    Router::new()
        .route("/admin", index.clone())
        .route("/admin/", index)
        .route(
            "/admin/dashboard.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/admin/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
}
