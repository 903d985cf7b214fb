//! Support for the end-to-end tests: a fake Digishare API, the real digibot
//! binary as a child process, and the webhook fixtures.
//!
//! Later test modules use parts the first ones do not.
#![allow(dead_code, unused_imports)]

pub mod browser;
pub mod burst;
pub mod concierge;
pub mod digibot;
pub mod durable;
pub mod fake;
pub mod fixtures;
pub mod orders_api;
pub mod pg;
pub mod procfs;
pub mod stats;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use serde_json::Value;

pub use self::digibot::{
    ADMIN_TOKEN, API_TOKEN, Digibot, DigibotBuilder, HttpReply, WEBHOOK_TOKEN, WebhookAuth,
    basic_auth, free_port,
};
pub use self::fake::{
    Echo, EchoDelivery, EchoTiming, FakeDigishare, Recorded, SETTLE, Scripted, wire_text,
};
pub use self::fixtures::{
    agent_text, all_fixtures, button_reply, customer_location, customer_text, event_key, fixture,
    list_reply, new_conversation, now_ms, plugin_wasm, rfc3339,
};

/// How long to wait for replies that should come (generous: CI has 2 cores
/// and runs tests in parallel).
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Fails with both sides pretty-printed unless `actual == expected`.
pub fn ensure_json_eq(actual: &Value, expected: &Value, what: &str) -> Result<()> {
    if actual != expected {
        bail!(
            "{what} differ\n--- expected:\n{}\n--- actual:\n{}",
            serde_json::to_string_pretty(expected)?,
            serde_json::to_string_pretty(actual)?
        );
    }
    Ok(())
}

/// The same for two lists (e.g. [`FakeDigishare::wire_for`] against the
/// expected requests).
pub fn ensure_all_eq(actual: &[Value], expected: &[Value], what: &str) -> Result<()> {
    ensure_json_eq(
        &Value::Array(actual.to_vec()),
        &Value::Array(expected.to_vec()),
        what,
    )
}

/// Every request carries `Authorization: Bearer token`, a JSON content
/// type and an `Idempotency-Key`, and no two requests share a key.
pub fn ensure_api_headers(requests: &[Recorded], token: &str) -> Result<()> {
    let mut keys = HashSet::new();
    for r in requests {
        ensure!(
            r.authorization.as_deref() == Some(&format!("Bearer {token}")),
            "request without `Authorization: Bearer {token}`: {}",
            r.summary()
        );
        ensure!(
            r.content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("application/json")),
            "request without `Content-Type: application/json` (got {:?}): {}",
            r.content_type,
            r.summary()
        );
        let key = r
            .idempotency_key
            .as_deref()
            .filter(|k| !k.trim().is_empty());
        let Some(key) = key else {
            bail!("request without an Idempotency-Key: {}", r.summary());
        };
        ensure!(
            keys.insert(key.to_string()),
            "two requests share Idempotency-Key {key}; latest: {}",
            r.summary()
        );
    }
    Ok(())
}

/// Every JSON object embedded in `line` (also inside an escaped string such
/// as `"{\"a\":1}"`), outermost first.
pub fn json_objects_in(line: &str) -> Vec<Value> {
    let mut found = Vec::new();
    for text in [line.to_string(), line.replace("\\\"", "\"")] {
        for (i, _) in text.match_indices('{') {
            let mut stream = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>();
            if let Some(Ok(value)) = stream.next()
                && value.is_object()
                && !found.contains(&value)
            {
                found.push(value);
            }
        }
    }
    found
}
