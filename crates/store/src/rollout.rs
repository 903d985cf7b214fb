//! What the store keeps of a rollout (see `digibot_pipeline::rollout`): one
//! record per plugin (the candidate version, its mode, how it ended) and
//! the comparisons of the candidate's turns with the serving version's,
//! newest [`COMPARISONS_KEPT`] per rollout, with running totals.

use serde::Serialize;

/// Comparisons kept per rollout; older ones are deleted (the totals keep
/// counting them).
pub const COMPARISONS_KEPT: i64 = 1000;

/// A plugin's rollout, as every replica reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutRecord {
    pub plugin: String,
    /// Unique per rollout (`{hash12}-{started_at}`): comparisons belong
    /// to one, and ending one names it, so a stale replica cannot end the
    /// next.
    pub id: String,
    /// `shadow` or `canary`.
    pub mode: String,
    /// Share of conversations the candidate serves in `canary` mode.
    pub percent: u8,
    /// The candidate's SHA-256 (hex).
    pub candidate: String,
    /// `active`, `promoted`, `aborted` or `rolled_back`.
    pub state: String,
    /// Why it ended (a rollback's reason, who aborted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_at: i64,
    pub changed_at: i64,
    /// Totals over every comparison recorded (kept ones and pruned).
    pub same: u64,
    pub different: u64,
    pub failed: u64,
}

/// One event's serving turn beside the candidate's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub plugin: String,
    pub rollout: String,
    pub event_key: String,
    pub conversation_id: String,
    /// `same`, `different` or `failed` (the candidate's turn).
    pub verdict: String,
    /// The serving version's requests, as queued for the Messages API.
    pub serving: serde_json::Value,
    /// The candidate's requests (what it would have sent).
    pub candidate: serde_json::Value,
    /// Why the candidate failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: i64,
}
