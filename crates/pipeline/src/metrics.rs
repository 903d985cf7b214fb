//! The metrics the pipeline updates, as `/metrics` names them. Each is
//! declared here once (name, help, and the label sets that read 0 before
//! their first event); `digibot-server` renders them.
//!
//! Label values must be few (plugin names, failure kinds, status codes),
//! never free text or ids: a series lives as long as the process.

use metrics::{counter, describe_counter, describe_histogram};

/// Time of one plugin invocation, instance included, by plugin.
pub const PLUGIN_INVOCATION_SECONDS: &str = "digibot_plugin_invocation_seconds";
/// Failed plugin invocations, by plugin and reason (`Failure::kind`).
pub const PLUGIN_FAILURES: &str = "digibot_plugin_failures_total";
/// Host refusals a plugin was told of and went on (`kv.set` past a bound
/// or a quota), by plugin and reason (`limit`, `quota`).
pub const PLUGIN_REFUSALS: &str = "digibot_plugin_refusals_total";
/// Actions committed to the outbox, after validation, by `Action::kind`.
pub const ACTIONS: &str = "digibot_actions_total";
/// Actions refused by validation against Digishare's limits: never sent.
pub const ACTIONS_REJECTED: &str = "digibot_actions_rejected_total";
/// One per Messages API attempt: the HTTP status, or `error` when no answer
/// came (connection error, timeout).
pub const API_REQUESTS: &str = "digibot_api_requests_total";
/// Failed Messages API attempts scheduled for a retry.
pub const API_RETRIES: &str = "digibot_api_retries_total";
/// A human took a conversation from the bot; `cause`: `hand_off` (a
/// plugin's hand-off was delivered) or `agent` (an agent wrote).
pub const TAKEOVERS: &str = "digibot_takeovers_total";
/// A conversation left a human's hands; `reason`: `command` (the agent's
/// release note), `idle`, `admin` (the admin API), `archived`.
/// `digibot conversations release` runs in its own process: not counted.
pub const RELEASES: &str = "digibot_releases_total";
/// Customer messages no plugin answered because a human is in charge.
pub const SKIPPED_HUMAN: &str = "digibot_messages_skipped_human_total";
/// Pending actions that became dead letters because their conversation
/// was archived.
pub const ARCHIVED_DEAD_LETTERS: &str = "digibot_archived_dead_letters_total";
/// Fallbacks sent for a failed or quarantined plugin, by plugin and
/// action (`text`, `hand_off`).
pub const PLUGIN_FALLBACKS: &str = "digibot_plugin_fallbacks_total";
/// Timers that came due and were turned into events (each once).
pub const TIMERS_FIRED: &str = "digibot_timers_fired_total";
/// Customer messages a debounce folded into a later message's turn.
pub const MESSAGES_DEBOUNCED: &str = "digibot_messages_debounced_total";
/// Events handled again because their conversation changed hands in
/// another process while they were handled (the state they were decided
/// in was stale).
pub const STALE_STATES: &str = "digibot_stale_conversation_states_total";
/// Agent messages judged in their insert's transaction (no lane ran).
pub const AGENT_JUDGED_AT_INSERT: &str = "digibot_agent_messages_judged_at_insert_total";

/// Plugins' outbound HTTP calls, by plugin and result: the status class
/// (`2xx`, ...) or the refusal's kind (`not-granted`, `timeout`, ...).
pub const HTTP_CALLS: &str = "digibot_plugin_http_calls_total";
/// Calls answered from the journal (a turn that ran again), by plugin.
pub const HTTP_REPLAYED: &str = "digibot_plugin_http_replayed_total";
/// Time of one outbound call (redirects and journaling included), by plugin.
pub const HTTP_CALL_SECONDS: &str = "digibot_plugin_http_call_seconds";
/// Time to journal one call's outcome durably.
pub const HTTP_JOURNAL_SECONDS: &str = "digibot_plugin_http_journal_seconds";

/// Buckets of [`PLUGIN_INVOCATION_SECONDS`]: a warm Rust plugin answers in
/// tens of µs, the default deadline is 100 ms.
pub const INVOCATION_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// Declares every pipeline metric, with its fixed label sets at 0.
pub fn describe() {
    describe_histogram!(
        PLUGIN_INVOCATION_SECONDS,
        "Time of one plugin invocation, instance included."
    );
    describe_counter!(
        PLUGIN_FAILURES,
        "Plugin invocations that failed, by plugin and reason."
    );
    describe_counter!(
        PLUGIN_REFUSALS,
        "Host refusals a plugin was told of (kv past a bound or a quota), by plugin and reason."
    );
    describe_counter!(ACTIONS, "Actions queued for Digishare, by kind.");
    describe_counter!(
        ACTIONS_REJECTED,
        "Actions refused for breaking a Digishare limit, by kind."
    );
    describe_counter!(
        API_REQUESTS,
        "Messages API requests, by HTTP status or error."
    );
    describe_counter!(
        API_RETRIES,
        "Failed Messages API attempts scheduled for a retry."
    );
    describe_counter!(
        TAKEOVERS,
        "Conversations a human took over from the bot, by cause."
    );
    describe_counter!(
        RELEASES,
        "Conversations handed back from a human, by reason."
    );
    describe_counter!(
        SKIPPED_HUMAN,
        "Customer messages not answered because a human is in charge."
    );
    describe_counter!(
        ARCHIVED_DEAD_LETTERS,
        "Pending actions turned into dead letters by archiving."
    );
    describe_counter!(
        PLUGIN_FALLBACKS,
        "Fallbacks (a canned text or a hand-off) sent for a failed or quarantined plugin."
    );
    describe_counter!(
        TIMERS_FIRED,
        "Plugin timers that came due and were turned into events."
    );
    describe_counter!(
        MESSAGES_DEBOUNCED,
        "Customer messages folded into the turn of a later message of their burst (debounce_ms)."
    );
    describe_counter!(
        HTTP_CALLS,
        "Plugins' outbound HTTP calls, by plugin and status class or refusal kind."
    );
    describe_counter!(
        HTTP_REPLAYED,
        "Outbound calls answered from the journal of an earlier run of the turn."
    );
    describe_histogram!(
        HTTP_CALL_SECONDS,
        "Time of one outbound call, redirects and journaling included."
    );
    describe_histogram!(
        HTTP_JOURNAL_SECONDS,
        "Time to record one outbound call in the journal, durably."
    );
    describe_counter!(
        STALE_STATES,
        "Events handled again because their conversation changed hands in another process meanwhile."
    );
    describe_counter!(
        AGENT_JUDGED_AT_INSERT,
        "Agent messages judged as they were recorded, in one transaction (no lane ran)."
    );
    counter!(STALE_STATES).increment(0);
    counter!(AGENT_JUDGED_AT_INSERT).increment(0);
    counter!(API_RETRIES).increment(0);
    counter!(SKIPPED_HUMAN).increment(0);
    counter!(ARCHIVED_DEAD_LETTERS).increment(0);
    counter!(TIMERS_FIRED).increment(0);
    counter!(MESSAGES_DEBOUNCED).increment(0);
    for cause in ["hand_off", "agent"] {
        counter!(TAKEOVERS, "cause" => cause).increment(0);
    }
    for reason in ["command", "idle", "admin", "archived"] {
        counter!(RELEASES, "reason" => reason).increment(0);
    }
}
