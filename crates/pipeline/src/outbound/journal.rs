//! The journal of outbound calls, as the pipeline uses it: before a call,
//! the answer an earlier run of the same turn recorded (if it asked for the
//! same thing: method, URL and body); after a call, its outcome, recorded
//! durably before the plugin sees it. What is stored never holds a secret:
//! request headers as the plugin wrote them (placeholders), credentials
//! redacted, responses already scrubbed.

use super::CREDENTIAL_HEADERS;
use digibot_domain::outbound::{Refusal, Target};
use digibot_runtime::{OutboundRequest, OutboundResponse};
use digibot_store::{JournalEntry, JournalOutcome, JournalRequest, Store, now_ms};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// What a request asks for, as the journal keeps it.
pub fn asked(request: &OutboundRequest, target: &Target) -> JournalRequest {
    let body: &[u8] = request.body.as_deref().unwrap_or_default();
    JournalRequest {
        method: request.method.clone(),
        url: target.to_string(),
        headers: request
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), redacted(name, value)))
            .collect(),
        body_bytes: body.len() as u64,
        body_sha256: hex::encode(Sha256::digest(body)),
    }
}

/// A header value fit for the journal: placeholders shown as written,
/// other credentials hidden.
fn redacted(name: &str, value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    if CREDENTIAL_HEADERS.contains(&name) && !text.contains("{{secret:") {
        return "[redacted]".to_string();
    }
    text.into_owned()
}

/// The recorded answer to this call, if an earlier run made the same one.
/// A read that fails is logged and treated as "not recorded": the call is
/// made again, with the same `Idempotency-Key`.
pub async fn recorded(
    store: &Store,
    request: &OutboundRequest,
    asked: &JournalRequest,
) -> Option<Result<OutboundResponse, Refusal>> {
    let entries = match store
        .journal(&request.event_id, Some(&request.plugin))
        .await
    {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the call journal; calling again");
            return None;
        }
    };
    answer_from(&entries, request, asked)
}

/// The answer `entries` (an event's journal) hold for this call: the same
/// plugin, call number, method, URL and body; `None` otherwise.
pub fn answer_from(
    entries: &[JournalEntry],
    request: &OutboundRequest,
    asked: &JournalRequest,
) -> Option<Result<OutboundResponse, Refusal>> {
    let entry = entries
        .iter()
        .find(|e| e.plugin == *request.plugin && e.call == request.call)?;
    let same = entry.request.method == asked.method
        && entry.request.url == asked.url
        && entry.request.body_sha256 == asked.body_sha256;
    if !same {
        tracing::warn!(
            plugin = %request.plugin, call = request.call,
            recorded = %format!("{} {}", entry.request.method, entry.request.url),
            now = %format!("{} {}", asked.method, asked.url),
            "this turn asks for another request than its journal recorded: the recorded answer is not used"
        );
        return None;
    }
    Some(match &entry.outcome {
        JournalOutcome::Response {
            status,
            headers,
            body,
        } => Ok(OutboundResponse {
            status: *status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.clone(), v.clone().into_bytes()))
                .collect(),
            body: body.clone().into(),
        }),
        JournalOutcome::Failed { refusal } => Err(refusal.clone()),
    })
}

/// Records a call's outcome, retrying briefly; a record that cannot be
/// written is logged (a re-run would then make the call again, with the
/// same `Idempotency-Key`).
pub async fn record(
    store: &Store,
    request: &OutboundRequest,
    asked: JournalRequest,
    result: &Result<OutboundResponse, Refusal>,
    elapsed: Duration,
) {
    let outcome = match result {
        Ok(r) => JournalOutcome::Response {
            status: r.status,
            headers: r
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
            body: r.body.to_vec(),
        },
        Err(refusal) => JournalOutcome::Failed {
            refusal: refusal.clone(),
        },
    };
    let entry = JournalEntry {
        event_key: request.event_id.to_string(),
        plugin: request.plugin.to_string(),
        call: request.call,
        request: asked,
        outcome,
        elapsed_ms: elapsed.as_millis() as u64,
        recorded_at: now_ms(),
    };
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(20);
    for attempt in 1..=3 {
        match store.record_call(entry.clone()).await {
            Ok(()) => {
                metrics::histogram!(crate::metrics::HTTP_JOURNAL_SECONDS).record(started.elapsed());
                return;
            }
            Err(e) if attempt < 3 => {
                tracing::warn!(error = %e, attempt, "cannot journal an outbound call yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 4;
            }
            Err(e) => {
                tracing::error!(error = %e, plugin = %request.plugin, call = request.call,
                    "cannot journal an outbound call: a re-run of this turn would make it again");
            }
        }
    }
}
