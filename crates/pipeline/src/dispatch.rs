//! From a stored event to queued actions: per-conversation ordering, a bound
//! on conversations in flight, every enabled plugin in name order, and one
//! transaction that marks the event handled with its actions and KV writes.
//!
//! Ordering: one conversation's events run one at a time, in arrival order,
//! with one refinement: when several events of a conversation are waiting,
//! the one with the earliest Digishare `created_at` goes first (if they all
//! carry one). That fixes out-of-order deliveries that arrive while the
//! conversation is busy without holding any event back to wait for others:
//! a reorder window would add its length to every reply's latency.
//!
//! Who is in charge: every event of a conversation (agent messages and
//! archiving included) goes through its lane, and what it changes about
//! the conversation's state (see [`digibot_domain::lifecycle`]) is committed with
//! it. While a human is in charge, plugins are skipped (reason `human`)
//! except assist plugins, which may only write internal notes.

use crate::metrics as m;
use crate::rollout::Rollouts;
use crate::sender::Outbox;
use crate::sends::Sends;
use crate::window::WindowWarnings;
use digibot_domain::actions::{self, Scope};
use digibot_domain::event::{ConversationState, EventKind, Message, SenderKind};
use digibot_domain::lifecycle::{self, Rules};
use digibot_domain::timer::TimerOp;
use digibot_protocol::Action;
use digibot_runtime::registry::{Entry, Gate, Registry};
use digibot_runtime::{
    Call, CallSummary, EventFilter, Failure, KvRead, NoHttp, OutboundHttp, Runtime,
};
use digibot_store::{
    ConversationRecord, ConversationUpdate, Judge, Judged, KvChanges, KvScope, NewAction, Release,
    StateChange, Store, StoreError, StoredEvent, TimerChanges, now_ms,
};
use metrics::counter;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// How often the dispatcher sweeps the store for pending events nothing
/// handed it ([`Dispatcher::poll_inbox`]).
pub const SWEEP: Duration = Duration::from_secs(5);

/// What one plugin did with one event, stored with the event.
#[derive(Debug, Clone, Serialize)]
pub struct PluginOutcome {
    pub plugin: String,
    pub version: String,
    /// `ok`, `failed`, `skipped` (quarantined, or `human` in charge),
    /// `filtered` (not subscribed) or `folded` (a debounced plugin's
    /// earlier message of a burst, answered with the burst's last).
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Actions queued for sending.
    pub actions: usize,
    /// Actions refused for breaking a Digishare limit.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<String>,
    /// Its outbound HTTP requests (refusals with their reason).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<CallSummary>,
    /// What the host refused the plugin during the turn (a `kv.set` past
    /// a bound or a quota: `limit: ...`, `quota: ...`), as it was told.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// Log lines (and stdout/stderr) dropped past the plugin's log caps.
    #[serde(skip_serializing_if = "is_zero")]
    pub logs_dropped: usize,
    pub elapsed_us: u64,
    /// The actions as the plugin returned them, refused ones included
    /// (shown by `replay` and `chat`; not stored).
    #[serde(skip)]
    pub returned: Vec<Action>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Everything one event produced, ready to commit.
#[derive(Debug, Default)]
pub struct Handled {
    pub outcomes: Vec<PluginOutcome>,
    pub actions: Vec<NewAction>,
    /// The [`Action::kind`] of each of `actions`, in the same order
    /// (counted once they are committed).
    pub action_kinds: Vec<&'static str>,
    pub kv: Vec<KvChanges>,
    /// Timer schedules and cancels, per plugin, committed with the event.
    pub timers: Vec<TimerChanges>,
}

/// How often due timers are looked for ([`Dispatcher::fire_timers`]): a
/// timer fires at most this late (plus its lane's queue).
pub const TIMER_POLL: Duration = Duration::from_millis(100);

/// Timers this process scheduled fire at their due time, in batches at
/// most this often (one store transaction per batch).
const TIMER_BATCH: Duration = Duration::from_millis(5);

/// Due times kept as hints; beyond, the poll alone fires them.
const TIMER_HINTS_MAX: usize = 100_000;

/// Breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct Breaker {
    pub failures: u32,
    pub cooldown: Duration,
}

/// The span every log line about handling `event` runs in: its dedup key,
/// conversation and name. Each plugin invocation opens a child `plugin`
/// span inside it.
pub fn event_span(event: &digibot_domain::event::Event) -> tracing::Span {
    tracing::info_span!(
        "event",
        event_id = %event.key,
        conversation_id = %event.conversation_id().unwrap_or_default(),
        event = %event.name,
    )
}

/// [`run_routed`] for tools that load plugins without a registry
/// (`replay`, `chat`), on given entries (sorted by name): same routing, filters,
/// limits and request building as the server; HTTP requests are refused
/// (a replay must not call the outside world again).
pub async fn run_entries(
    runtime: &Runtime,
    entries: &[Entry],
    event: &digibot_domain::event::Event,
    state: ConversationState,
    kv: Arc<dyn KvRead>,
    breaker: Breaker,
) -> Handled {
    let http = Arc::new(NoHttp("in this command (it runs plugins offline)"));
    run(
        runtime,
        entries,
        event,
        &Burst::Alone,
        state,
        kv,
        http,
        breaker,
        true,
    )
    .await
}

/// [`run_entries`] with the turns' HTTP requests answered by `http`
/// instead of refused: `digibot test`'s stubs, or a replay of a stored turn
/// answering them from its journal.
pub async fn run_entries_with_http(
    runtime: &Runtime,
    entries: &[Entry],
    event: &digibot_domain::event::Event,
    state: ConversationState,
    kv: Arc<dyn KvRead>,
    http: Arc<dyn OutboundHttp>,
    breaker: Breaker,
) -> Handled {
    run(
        runtime,
        entries,
        event,
        &Burst::Alone,
        state,
        kv,
        http,
        breaker,
        true,
    )
    .await
}

/// [`run_entries`] without touching the process's metrics: for the
/// dashboard's simulator, whose operator test messages inside the server
/// must not count as customer traffic (nor trip failure alerts).
pub async fn run_entries_unmetered(
    runtime: &Runtime,
    entries: &[Entry],
    event: &digibot_domain::event::Event,
    state: ConversationState,
    kv: Arc<dyn KvRead>,
    breaker: Breaker,
) -> Handled {
    let http = Arc::new(NoHttp("in the simulator (its turns reach nothing outside)"));
    run(
        runtime,
        entries,
        event,
        &Burst::Alone,
        state,
        kv,
        http,
        breaker,
        false,
    )
    .await
}

/// [`run_entries_with_http`] without touching the process's metrics: a
/// rollout's shadow turns, which serve nobody.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_unrecorded(
    runtime: &Runtime,
    entries: &[Entry],
    event: &digibot_domain::event::Event,
    burst: &Burst,
    state: ConversationState,
    kv: Arc<dyn KvRead>,
    http: Arc<dyn OutboundHttp>,
    breaker: Breaker,
) -> Handled {
    run(
        runtime, entries, event, burst, state, kv, http, breaker, false,
    )
    .await
}

/// Runs `entries` (a registry snapshot's, or a rollout's routing or a
/// conversation's pins of it) on `event`, in name order, their HTTP
/// requests sent through `http`: one turn after another, each awaited (a
/// turn waiting on a host call, such as an HTTP request, holds no thread).
/// `burst`: the event's place in a debounced burst.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_routed(
    runtime: &Runtime,
    entries: &[Entry],
    event: &digibot_domain::event::Event,
    burst: &Burst,
    state: ConversationState,
    kv: Arc<dyn KvRead>,
    http: Arc<dyn OutboundHttp>,
    breaker: Breaker,
) -> Handled {
    run(
        runtime, entries, event, burst, state, kv, http, breaker, true,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn run(
    runtime: &Runtime,
    entries: &[Entry],
    event: &digibot_domain::event::Event,
    burst: &Burst,
    state: ConversationState,
    kv: Arc<dyn KvRead>,
    http: Arc<dyn OutboundHttp>,
    breaker: Breaker,
    metered: bool,
) -> Handled {
    let mut handled = Handled::default();
    let Some(call) = Call::for_event(event, state) else {
        return handled;
    };
    let earlier: &[Message] = match burst {
        Burst::Last(earlier) => earlier,
        _ => &[],
    };
    let conversation_id = call.conversation_id().to_string();
    // A timer event goes to the plugin that scheduled it, and only if it
    // can take one (a 0.3.0 plugin built before timers cannot).
    let timer_of = match &call {
        Call::Timer { timer, .. } => Some(timer.plugin.as_str()),
        _ => None,
    };
    // A hand-back goes to the plugins that export `on-resume`.
    let resume = matches!(call, Call::Resume { .. });
    for entry in entries {
        let plugin = &entry.plugin;
        if timer_of.is_some_and(|owner| owner != plugin.name || !plugin.takes_timers()) {
            continue;
        }
        if resume && !plugin.takes_resume() {
            continue;
        }
        let mut outcome = PluginOutcome {
            plugin: plugin.name.clone(),
            version: plugin.hash[..12].to_string(),
            outcome: "ok",
            reason: None,
            actions: 0,
            rejected: Vec::new(),
            calls: Vec::new(),
            refused: Vec::new(),
            logs_dropped: 0,
            elapsed_us: 0,
            returned: Vec::new(),
        };
        if !plugin.manifest.wants(call.filter()) {
            outcome.outcome = "filtered";
            handled.outcomes.push(outcome);
            continue;
        }
        let debounced = plugin.manifest.debounce().is_some();
        if debounced && matches!(burst, Burst::Folded) {
            outcome.outcome = "folded";
            outcome.reason = Some("debounced: answered with the burst's last message".into());
            handled.outcomes.push(outcome);
            continue;
        }
        // Only a debounced plugin sees the burst's earlier messages.
        let Some(call) = Call::for_event(event, state)
            .map(|call| call.with_burst(if debounced { earlier } else { &[] }))
        else {
            continue;
        };
        // While a human is in charge only assist plugins run, and they may
        // only write internal notes.
        let scope = match state {
            ConversationState::Human if plugin.manifest.assist => Scope::NotesOnly,
            ConversationState::Human => {
                outcome.outcome = "skipped";
                outcome.reason = Some("human".to_string());
                handled.outcomes.push(outcome);
                continue;
            }
            ConversationState::Bot | ConversationState::Closed => Scope::Everything,
        };
        let now = now_ms();
        if let Gate::Skip(until) = entry.health.gate(now) {
            outcome.outcome = "skipped";
            outcome.reason = Some(if until > now {
                format!("quarantined for {} ms more", until - now)
            } else {
                "quarantined: a trial event is running".to_string()
            });
            fall_back(
                &mut handled,
                &mut outcome,
                plugin,
                event,
                &conversation_id,
                scope,
                metered,
            );
            handled.outcomes.push(outcome);
            continue;
        }
        let span = tracing::info_span!("plugin", plugin = %plugin.name, version = %outcome.version);
        let invocation = runtime
            .invoke_with_http(plugin, &call, kv.clone(), http.clone())
            .instrument(span.clone())
            .await;
        let _span = span.entered();
        outcome.elapsed_us = invocation.elapsed.as_micros() as u64;
        outcome.calls = invocation.calls;
        if metered {
            metrics::histogram!(m::PLUGIN_INVOCATION_SECONDS, "plugin" => plugin.name.clone())
                .record(invocation.elapsed);
        }
        for line in &invocation.logs {
            tracing::info!(level = ?line.level, "plugin: {}", one_line(&line.message));
        }
        if !invocation.output.is_empty() {
            tracing::info!("plugin output: {}", one_line(invocation.output.trim_end()));
        }
        outcome.logs_dropped = invocation.logs_dropped;
        for refusal in &invocation.refused {
            tracing::info!(%refusal, "plugin refused by the host");
            if metered {
                let kind = refusal.split(':').next().unwrap_or("limit").to_string();
                counter!(m::PLUGIN_REFUSALS, "plugin" => plugin.name.clone(), "reason" => kind)
                    .increment(1);
            }
        }
        outcome.refused = invocation.refused;
        if invocation.logs_dropped > 0 {
            tracing::warn!(
                dropped = invocation.logs_dropped,
                "plugin log output over its cap was dropped"
            );
        }
        match invocation.outcome {
            Ok(actions) => {
                entry.health.success();
                let to = Queue {
                    plugin: &plugin.name,
                    event_key: &event.key,
                    conversation_id: &conversation_id,
                    scope,
                    metered,
                };
                to.queue(&mut handled, &mut outcome, "", &actions);
                outcome.returned = actions;
                if !invocation.kv_writes.is_empty() {
                    handled.kv.push(KvChanges {
                        plugin: plugin.name.clone(),
                        conversation_id: conversation_id.clone(),
                        writes: invocation.kv_writes,
                    });
                }
                if !invocation.timer_ops.is_empty() {
                    handled.timers.push(TimerChanges {
                        plugin: plugin.name.clone(),
                        conversation_id: conversation_id.clone(),
                        ops: invocation.timer_ops,
                    });
                }
            }
            Err(failure) => {
                let reason = failure.to_string();
                if metered {
                    counter!(m::PLUGIN_FAILURES, "plugin" => plugin.name.clone(), "reason" => failure.kind())
                        .increment(1);
                }
                tracing::warn!(%reason, "plugin failed");
                if entry
                    .health
                    .failure(&reason, breaker.failures, breaker.cooldown)
                {
                    tracing::warn!(
                        cooldown_s = breaker.cooldown.as_secs(),
                        "plugin quarantined after repeated failures"
                    );
                }
                outcome.outcome = "failed";
                outcome.reason = Some(reason);
                fall_back(
                    &mut handled,
                    &mut outcome,
                    plugin,
                    event,
                    &conversation_id,
                    scope,
                    metered,
                );
                if matches!(failure, Failure::Timeout(_)) {
                    outcome.elapsed_us = invocation.elapsed.as_micros() as u64;
                }
            }
        }
        tracing::debug!(
            outcome = outcome.outcome,
            elapsed_us = outcome.elapsed_us,
            actions = outcome.actions,
            "plugin ran"
        );
        handled.outcomes.push(outcome);
    }
    handled
}

/// Where one plugin's actions for one event go: the Messages API requests
/// queued, each checked against Digishare's limits and the plugin's scope.
struct Queue<'a> {
    plugin: &'a str,
    event_key: &'a str,
    conversation_id: &'a str,
    scope: Scope,
    metered: bool,
}

impl Queue<'_> {
    /// Queues `actions` with the keys `{event}/{plugin}/{tag}{index}`; a
    /// refused one is counted, logged and reported on the outcome.
    fn queue(
        &self,
        handled: &mut Handled,
        outcome: &mut PluginOutcome,
        tag: &str,
        actions: &[Action],
    ) {
        for (index, action) in actions.iter().enumerate() {
            match actions::to_request_in(
                self.plugin,
                index,
                self.conversation_id,
                action,
                self.scope,
            ) {
                Ok(request) => {
                    handled.actions.push(NewAction {
                        plugin: self.plugin.to_string(),
                        idempotency_key: format!("{}/{}/{tag}{index}", self.event_key, self.plugin),
                        method: request.method,
                        path: request.path,
                        body: request.body,
                    });
                    handled.action_kinds.push(action.kind());
                    outcome.actions += 1;
                }
                Err(rejected) => {
                    if self.metered {
                        counter!(m::ACTIONS_REJECTED, "kind" => rejected.kind).increment(1);
                    }
                    tracing::warn!("{rejected}");
                    outcome.rejected.push(rejected.to_string());
                }
            }
        }
    }
}

/// A failed or quarantined plugin's `[fallback]`, queued in its place so
/// the customer is not left in silence: only while the bot is in charge,
/// never for a timer or a hand-back (nobody is waiting on it).
fn fall_back(
    handled: &mut Handled,
    outcome: &mut PluginOutcome,
    plugin: &digibot_runtime::Plugin,
    event: &digibot_domain::event::Event,
    conversation_id: &str,
    scope: Scope,
    metered: bool,
) {
    let Some(fallback) = &plugin.manifest.fallback else {
        return;
    };
    if scope != Scope::Everything
        || matches!(event.kind, EventKind::Timer(_) | EventKind::Resumed(_))
    {
        return;
    }
    // Checked when the manifest was read.
    let Ok(actions) = fallback.actions() else {
        return;
    };
    let to = Queue {
        plugin: &plugin.name,
        event_key: &event.key,
        conversation_id,
        scope,
        metered,
    };
    to.queue(handled, outcome, "fallback", &actions);
    let kind = match fallback.action {
        digibot_runtime::FallbackAction::Text => "text",
        digibot_runtime::FallbackAction::HandOff => "hand_off",
    };
    tracing::warn!(
        fallback = kind,
        "plugin failed: its fallback was sent instead"
    );
    if metered {
        counter!(m::PLUGIN_FALLBACKS, "plugin" => plugin.name.clone(), "action" => kind)
            .increment(1);
    }
}

/// A plugin's text with its line breaks shown as `\n`: in text logs a raw
/// line break would let a plugin start a line that looks like the host's.
fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains(['\n', '\r']) {
        text.replace('\n', "\\n").replace('\r', "\\r").into()
    } else {
        text.into()
    }
}

/// What an agent message changes, given the conversation's `state`,
/// whether the message is digibot's own (its id came back from a send, or
/// it went through the API), whether it is the release command, and
/// whether a send was still in flight when it was judged.
fn agent_update(
    m: &Message,
    state: ConversationState,
    own: bool,
    release: bool,
    in_flight: bool,
) -> ConversationUpdate {
    let conversation = m.conversation_id.as_str();
    if m.sent_through_api() {
        tracing::debug!(conversation, message = %m.id, "agent message sent through the API: digibot's own, not a takeover");
        return ConversationUpdate::default();
    }
    if own {
        tracing::debug!(conversation, message = %m.id, "digibot's own message came back: not a takeover");
        return ConversationUpdate::default();
    }
    let who = m.sender.name.as_deref().unwrap_or("an agent");
    let mut update = ConversationUpdate {
        agent_at: Some(now_ms()),
        ..ConversationUpdate::default()
    };
    if release {
        update.change = Some(StateChange {
            from: Some(ConversationState::Human),
            to: ConversationState::Bot,
            reason: format!("release command from {who} (message {})", m.id),
        });
        return update;
    }
    let mut reason = format!("{who} wrote (message {})", m.id);
    if in_flight {
        reason.push_str(", judged while a send was still in flight");
    }
    if state != ConversationState::Human {
        update.change = Some(StateChange {
            from: None,
            to: ConversationState::Human,
            reason,
        });
    }
    update
}

/// Counts a state change the dispatcher applied (from `from`).
fn count_change(from: ConversationState, change: &StateChange) {
    match (from, change.to) {
        (_, ConversationState::Human) => counter!(m::TAKEOVERS, "cause" => "agent").increment(1),
        (ConversationState::Human, ConversationState::Closed) => {
            counter!(m::RELEASES, "reason" => "archived").increment(1)
        }
        (ConversationState::Human, ConversationState::Bot) => {
            let reason = if change.reason.starts_with("idle") {
                "idle"
            } else {
                "command"
            };
            counter!(m::RELEASES, "reason" => reason).increment(1)
        }
        _ => {}
    }
}

/// The store's KV, as plugins read it: the turn awaits the store (and
/// holds no thread meanwhile).
pub(crate) struct StoreKv {
    pub(crate) store: Store,
}

#[async_trait::async_trait]
impl KvRead for StoreKv {
    async fn get(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Option<String> {
        match self
            .store
            .kv_get_in(plugin, conversation_id, scope, key)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "kv read failed");
                None
            }
        }
    }

    async fn customer_of(&self, conversation_id: &str) -> Option<String> {
        // Only this process's completions set it: the cache has it right.
        match self.store.cached_conversation_state(conversation_id).await {
            Ok(record) => record.and_then(|r| r.customer_id),
            Err(e) => {
                // The customer scope is then refused as unknown.
                tracing::error!(error = %e, "conversation read failed");
                None
            }
        }
    }

    async fn usage(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
    ) -> digibot_store::KvUsage {
        match self.store.kv_usage_in(plugin, conversation_id, scope).await {
            Ok(u) => u,
            Err(e) => {
                // Judged against nothing held: the quota then lets this
                // turn write at most its own per-turn caps.
                tracing::error!(error = %e, "kv usage read failed");
                digibot_store::KvUsage::default()
            }
        }
    }

    async fn history(
        &self,
        conversation_id: &str,
        limit: usize,
    ) -> Vec<digibot_domain::history::HistoryEntry> {
        match self.store.history(conversation_id, limit).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::error!(error = %e, "history read failed");
                Vec::new()
            }
        }
    }

    async fn timer_names(&self, plugin: &str, conversation_id: &str) -> Vec<String> {
        match self.store.timer_names(plugin, conversation_id).await {
            Ok(names) => names,
            Err(e) => {
                // Judged against none pending: at worst a schedule that
                // should have been refused as `exists` replaces instead.
                tracing::error!(error = %e, "timer names read failed");
                Vec::new()
            }
        }
    }
}

/// The conversations this process is working on.
#[derive(Default)]
struct Lanes {
    /// Events waiting, per conversation with a lane task running.
    queues: HashMap<String, Vec<StoredEvent>>,
    /// Events queued or being handled here (an event found again in the
    /// store, by a claim or a poll, is not queued twice), each with the
    /// tick at which it was queued: see [`Lanes::tick`].
    active: HashMap<i64, u64>,
    /// Counts submissions. A lane reads it just before it reads its
    /// conversation's pending events from the store; an event queued
    /// later may have been preceded by one that reached another replica
    /// after that read, so the lane reads again before handling it.
    ticks: u64,
    /// Events handled here lately, in two generations rotated at each poll
    /// of the inbox: a poll that read the inbox before their completion
    /// committed must not queue them again. Only kept while polling
    /// (always, once [`Dispatcher::poll_inbox`] runs).
    done: [HashSet<i64>; 2],
    polling: bool,
}

impl Lanes {
    fn known(&self, seq: i64) -> bool {
        self.active.contains_key(&seq) || self.done.iter().any(|d| d.contains(&seq))
    }

    /// The tick before a read of the store: events queued up to now are
    /// covered by that read.
    fn tick(&self) -> u64 {
        self.ticks
    }

    /// Adds events read from the store to a running lane's queue (covered
    /// by that read: tick 0), skipping known ones.
    fn merge(&mut self, conversation: &str, found: Vec<StoredEvent>) {
        for stored in found {
            if !self.known(stored.seq) {
                self.active.insert(stored.seq, 0);
                self.queues
                    .entry(conversation.to_string())
                    .or_default()
                    .push(stored);
            }
        }
    }

    /// Ends a lane: its queued events stay pending in the store.
    fn remove(&mut self, conversation: &str) {
        for stored in self.queues.remove(conversation).unwrap_or_default() {
            self.active.remove(&stored.seq);
        }
    }

    /// `done`: completed in the store (else it stays pending, and a claim
    /// or poll may queue it again).
    fn finished(&mut self, seq: i64, done: bool) {
        self.active.remove(&seq);
        if done && self.polling {
            self.done[0].insert(seq);
        }
    }
}

/// Which of a lane's queued events goes next (the queue is not empty).
fn next_index(queue: &[StoredEvent]) -> usize {
    // A hand-back goes first: the release it records happened before
    // whatever is still queued was handled.
    let resume = (0..queue.len())
        .filter(|&i| matches!(queue[i].event.kind, EventKind::Resumed(_)))
        .min_by_key(|&i| queue[i].seq);
    if let Some(index) = resume {
        return index;
    }
    if queue.iter().all(|s| s.event.created_at().is_some()) {
        (0..queue.len())
            .min_by(|&a, &b| {
                let (x, y) = (&queue[a], &queue[b]);
                (x.event.created_at(), x.seq).cmp(&(y.event.created_at(), y.seq))
            })
            .unwrap_or(0)
    } else {
        (0..queue.len()).min_by_key(|&i| queue[i].seq).unwrap_or(0)
    }
}

/// Whether `event` is a customer's message (what a debounce folds).
pub(crate) fn from_customer(event: &digibot_domain::event::Event) -> Option<&Message> {
    match &event.kind {
        EventKind::Message(m) if m.sender.kind == SenderKind::Customer => Some(m),
        _ => None,
    }
}

/// The most customer messages one debounced turn answers.
pub const BURST_MAX: usize = 20;

/// A customer message's place in a debounced burst, for the plugins with
/// `debounce_ms` (the others answer each message as usual).
#[derive(Debug, Clone, Default)]
pub enum Burst {
    /// Not in a burst.
    #[default]
    Alone,
    /// One of the burst's earlier messages: debounced plugins are not
    /// called (outcome `folded`); they see it with the last one.
    Folded,
    /// The burst's last message, with the earlier ones (oldest first).
    Last(Arc<[Message]>),
}

/// How [`Dispatcher::handle`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Done,
    Pending,
    /// Queued again behind what must come first.
    Again,
}

/// How handling an event ended.
enum Handling {
    /// Completed in the store.
    Done,
    /// Left pending: the lane stops (see [`Dispatcher::handle`]).
    Pending,
    /// To be handled again after what it made go first (an idle release's
    /// hand-back).
    Again(Box<StoredEvent>),
}

/// What a lane does next.
enum Next {
    Event(Box<StoredEvent>),
    /// The next event was queued after the lane last read the store.
    Stale,
    Dry,
}

/// Hands stored events to plugins, one conversation at a time.
///
/// Before a lane handles a conversation it claims it from the store, and
/// it gives it back when it runs dry: with several replicas on one
/// database, only one handles a conversation at a time, and the claim
/// brings the conversation's events that arrived at other replicas. A
/// conversation held elsewhere is left to its holder. On a single node the
/// claims are always granted and bring nothing.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    registry: Arc<Registry>,
    outbox: Outbox,
    kv: Arc<dyn KvRead>,
    /// Where plugins' HTTP requests go (refused until
    /// [`Dispatcher::with_http`] says).
    http: Arc<dyn OutboundHttp>,
    lanes: Mutex<Lanes>,
    conversations: Arc<Semaphore>,
    /// Events whose plugin turns run at once: each holds an instance of
    /// the pool (and a fiber stack) until it is done. Lanes past the bound
    /// wait here, their events durable in the store meanwhile.
    turn_slots: Arc<Semaphore>,
    /// `turn_slots`' size.
    max_turns: usize,
    breaker: Breaker,
    rules: Rules,
    /// Sends in flight, which an agent message may have to wait for.
    sends: Sends,
    window: WindowWarnings,
    shutdown: watch::Receiver<bool>,
    tasks: Mutex<JoinSet<()>>,
    /// Due times (ms) of the timers this process scheduled, soonest first,
    /// and a wake-up for the firing loop: a timer fires at its due time
    /// rather than at the next [`TIMER_POLL`]. Hints only (a cancelled
    /// timer's stays, and wakes the loop for nothing): the poll still finds
    /// every timer (other replicas', held ones, those past the bound).
    timer_hints: Mutex<BinaryHeap<Reverse<i64>>>,
    timer_scheduled: tokio::sync::Notify,
    /// Candidates beside serving versions (see [`crate::rollout`]).
    rollouts: Arc<Rollouts>,
}

impl Dispatcher {
    // One argument more than clippy likes: each is a separate part of the
    // server (grouping them would only move the list elsewhere).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        outbox: Outbox,
        concurrency: usize,
        max_turns: usize,
        breaker: Breaker,
        rules: Rules,
        shutdown: watch::Receiver<bool>,
    ) -> Dispatcher {
        let rollouts = Arc::new(Rollouts::new(store.clone(), registry.clone()));
        Dispatcher {
            inner: Arc::new(Inner {
                kv: Arc::new(StoreKv {
                    store: store.clone(),
                }),
                http: Arc::new(NoHttp("on this server (outbound HTTP is not set up)")),
                store,
                registry,
                sends: outbox.sends().clone(),
                window: WindowWarnings::default(),
                outbox,
                lanes: Mutex::new(Lanes::default()),
                conversations: Arc::new(Semaphore::new(concurrency)),
                turn_slots: Arc::new(Semaphore::new(max_turns)),
                max_turns,
                breaker,
                rules,
                shutdown,
                tasks: Mutex::new(JoinSet::new()),
                timer_hints: Mutex::new(BinaryHeap::new()),
                timer_scheduled: tokio::sync::Notify::new(),
                rollouts,
            }),
        }
    }

    /// Sends plugins' HTTP requests through `http` (before any event is
    /// submitted: the dispatcher must not be cloned yet).
    pub fn with_http(mut self, http: Arc<dyn OutboundHttp>) -> Dispatcher {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.http = http,
            None => tracing::error!("Dispatcher::with_http after it was shared: ignored"),
        }
        self
    }

    /// The rollouts this dispatcher runs (the admin API starts and ends
    /// them; `serve` syncs them with other replicas).
    pub fn rollouts(&self) -> Arc<Rollouts> {
        self.inner.rollouts.clone()
    }

    /// Queues a stored event behind the others of its conversation.
    pub fn submit(&self, stored: StoredEvent) {
        let Some(conversation) = stored.event.conversation_id().map(str::to_string) else {
            return;
        };
        let mut lanes = self.inner.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes.known(stored.seq) {
            return;
        }
        lanes.ticks += 1;
        let tick = lanes.ticks;
        lanes.active.insert(stored.seq, tick);
        match lanes.queues.get_mut(&conversation) {
            // A lane task is running for it and will pick this up.
            Some(queue) => queue.push(stored),
            None => {
                lanes.queues.insert(conversation.clone(), vec![stored]);
                drop(lanes);
                let this = self.clone();
                let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
                // Reap finished lanes so the set does not grow.
                while tasks.try_join_next().is_some() {}
                tasks.spawn(async move { this.run_lane(conversation).await });
            }
        }
    }

    /// Requeues every pending event (at start-up).
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let pending = self.inner.store.pending_events().await?;
        let n = pending.len();
        for stored in pending {
            self.submit(stored);
        }
        Ok(n)
    }

    /// Looks in the store, until shutdown, for pending events nothing
    /// handed this dispatcher: on every [`SWEEP`] and whenever the store
    /// says some may wait (replicas). With replicas, those that arrived at
    /// other replicas (in conversations this one holds) or were left by a
    /// dead replica; on every back end, those whose webhook was cut off
    /// between its commit and its lane, or whose lane gave up on a
    /// transient error (see `Backend::claimable_events`). Events queued
    /// or handled here lately are skipped.
    pub fn poll_inbox(&self) {
        let wake = self.inner.store.inbox_wakeups();
        self.lock_lanes().polling = true;
        let this = self.clone();
        let mut shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let woken = async {
                    match &wake {
                        Some(wake) => wake.notified().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = woken => {}
                    _ = tokio::time::sleep(SWEEP) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return;
                }
                {
                    let mut lanes = this.lock_lanes();
                    let recent = std::mem::take(&mut lanes.done[0]);
                    lanes.done[1] = recent;
                }
                match this.inner.store.claimable_events(1000).await {
                    Ok(found) => {
                        for stored in found {
                            this.submit(stored);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot poll the inbox"),
                }
            }
        });
    }

    /// Turns due timers into events and hands them to their lanes, every
    /// [`TIMER_POLL`] and at the due time of each timer this process
    /// schedules, until shutdown. Each timer becomes one event in the
    /// store's transaction (see `Backend::fire_due_timers`), so replicas
    /// polling at once, or a restart right after, fire it once.
    pub fn fire_timers(&self) {
        let this = self.clone();
        let mut shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            let mut polled = tokio::time::Instant::now();
            loop {
                let hint = this.timer_hints().peek().map(|Reverse(due)| *due);
                let wake = match hint {
                    Some(due) => {
                        let ms = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
                        // Timers due close together fire together.
                        (tokio::time::Instant::now() + Duration::from_millis(ms))
                            .max(polled + TIMER_BATCH)
                            .min(polled + TIMER_POLL)
                    }
                    None => polled + TIMER_POLL,
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    // A sooner timer: wait for it instead.
                    _ = this.inner.timer_scheduled.notified() => continue,
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return;
                }
                polled = tokio::time::Instant::now();
                // The hints due now are what this firing takes.
                {
                    let now = now_ms();
                    let mut hints = this.timer_hints();
                    while hints.peek().is_some_and(|Reverse(due)| *due <= now) {
                        hints.pop();
                    }
                }
                loop {
                    match this.inner.store.fire_due_timers(now_ms(), 500).await {
                        Ok(fired) => {
                            let more = fired.len() == 500;
                            if !fired.is_empty() {
                                counter!(m::TIMERS_FIRED).increment(fired.len() as u64);
                            }
                            for stored in fired {
                                this.submit(stored);
                            }
                            if !more {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot fire due timers");
                            break;
                        }
                    }
                }
            }
        });
    }

    /// Tells the firing loop the soonest timer a committed turn scheduled.
    fn hint_timers(&self, update: &ConversationUpdate) {
        let dues: Vec<i64> = update
            .timers
            .iter()
            .flat_map(|t| &t.ops)
            .filter_map(|op| match op {
                TimerOp::Schedule { due_at, .. } => Some(*due_at),
                TimerOp::Cancel { .. } => None,
            })
            .collect();
        let Some(&soonest) = dues.iter().min() else {
            return;
        };
        let mut hints = self.timer_hints();
        let sooner = hints.peek().is_none_or(|Reverse(due)| soonest < *due);
        if hints.len() < TIMER_HINTS_MAX {
            hints.extend(dues.into_iter().map(Reverse));
        }
        drop(hints);
        if sooner {
            self.inner.timer_scheduled.notify_one();
        }
    }

    fn timer_hints(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Reverse<i64>>> {
        self.inner
            .timer_hints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn lock_lanes(&self) -> std::sync::MutexGuard<'_, Lanes> {
        self.inner.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lane's next event, if the lane's last read of the store (at
    /// `read_at`, see [`Lanes::tick`]) covers it; `Dry` when its queue is
    /// empty or the process is stopping (the lane stays registered: see
    /// `run_lane`).
    fn next_event(&self, conversation: &str, read_at: u64) -> Next {
        let mut lanes = self.lock_lanes();
        let lanes = &mut *lanes;
        let Some(queue) = lanes.queues.get_mut(conversation) else {
            return Next::Dry;
        };
        if queue.is_empty() || *self.inner.shutdown.borrow() {
            return Next::Dry;
        }
        let index = next_index(queue);
        if lanes
            .active
            .get(&queue[index].seq)
            .is_some_and(|&t| t > read_at)
        {
            return Next::Stale;
        }
        Next::Event(Box::new(queue.remove(index)))
    }

    async fn run_lane(&self, conversation: String) {
        let Ok(_permit) = self.inner.conversations.clone().acquire_owned().await else {
            return;
        };
        'claim: loop {
            let read_at = self.lock_lanes().tick();
            match self.inner.store.claim_conversation(&conversation).await {
                Ok(Some(found)) => self.lock_lanes().merge(&conversation, found),
                Ok(None) => {
                    // Another replica holds it, and was told: it handles
                    // these events too (they are in the store).
                    tracing::debug!(%conversation, "conversation held by another replica");
                    self.lock_lanes().remove(&conversation);
                    return;
                }
                Err(e) => {
                    // Its events stay pending: a later poll (or start) retries.
                    tracing::error!(%conversation, error = %e, "cannot claim a conversation");
                    self.lock_lanes().remove(&conversation);
                    return;
                }
            }
            loop {
                match self.next_event(&conversation, read_at) {
                    Next::Event(stored) => {
                        let handled = match self.debounce_window(&stored.event) {
                            Some(window) => {
                                let burst =
                                    self.collect_burst(&conversation, *stored, window).await;
                                self.handle_burst(&conversation, burst).await
                            }
                            None => self.handle(*stored, &Burst::Alone).await != Step::Pending,
                        };
                        if !handled {
                            self.lock_lanes().remove(&conversation);
                            return;
                        }
                    }
                    // Read the store again (and renew the claim) first.
                    Next::Stale => continue 'claim,
                    Next::Dry => break,
                }
            }
            let stopping = *self.inner.shutdown.borrow();
            // Dry: give the conversation back, unless events of it that
            // arrived elsewhere wait.
            match self.inner.store.release_conversation(&conversation).await {
                Ok(waiting) if !waiting.is_empty() && !stopping => {
                    self.lock_lanes().merge(&conversation, waiting);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%conversation, error = %e, "cannot release a conversation; its lease will expire")
                }
            }
            let mut lanes = self.lock_lanes();
            // Events submitted meanwhile keep the lane (and claim again).
            if stopping || lanes.queues.get(&conversation).is_none_or(Vec::is_empty) {
                lanes.remove(&conversation);
                return;
            }
        }
    }

    /// Handles one event; `false` when it stays pending, and the lane must
    /// stop: handling later events of the conversation first would break
    /// its order. The event is retried with the conversation's others, in
    /// order, by the inbox sweep ([`Dispatcher::poll_inbox`]).
    async fn handle(&self, stored: StoredEvent, burst: &Burst) -> Step {
        let seq = stored.seq;
        let span = event_span(&stored.event);
        let done = match self
            .handle_in(stored, burst, span.clone())
            .instrument(span)
            .await
        {
            Handling::Done => true,
            Handling::Pending => false,
            Handling::Again(stored) => {
                self.requeue(vec![*stored]);
                return Step::Again;
            }
        };
        self.lock_lanes().finished(seq, done);
        if done { Step::Done } else { Step::Pending }
    }

    /// Puts events taken from a lane back in its queue, still active: the
    /// lane takes them again after what must come first.
    fn requeue(&self, events: Vec<StoredEvent>) {
        let mut lanes = self.lock_lanes();
        for stored in events {
            let conversation = stored
                .event
                .conversation_id()
                .unwrap_or_default()
                .to_string();
            lanes.queues.entry(conversation).or_default().push(stored);
        }
    }

    /// The debounce a customer message waits for: the longest `debounce_ms`
    /// of the plugins that take messages; `None` for any other event.
    fn debounce_window(&self, event: &digibot_domain::event::Event) -> Option<Duration> {
        from_customer(event)?;
        self.inner
            .registry
            .snapshot()
            .plugins
            .iter()
            .filter(|e| e.plugin.manifest.wants(EventFilter::Message))
            .filter_map(|e| e.plugin.manifest.debounce())
            .max()
    }

    /// `first` and the customer messages queued behind it until none came
    /// for `window` after the last one (at most [`BURST_MAX`]): what one
    /// debounced turn answers. Until then they wait in the store, pending
    /// (a crash meanwhile loses nothing: they are collected again).
    async fn collect_burst(
        &self,
        conversation: &str,
        first: StoredEvent,
        window: Duration,
    ) -> Vec<StoredEvent> {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let mut burst = vec![first];
        let mut shutdown = self.inner.shutdown.clone();
        while burst.len() < BURST_MAX {
            let last = burst.last().map_or(0, |s| s.received_at);
            let wait = last.saturating_add(window_ms) - now_ms();
            if wait > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    _ = shutdown.changed() => {}
                }
            }
            if *self.inner.shutdown.borrow() {
                break;
            }
            let more = self.take_customer_messages(conversation, BURST_MAX - burst.len());
            if more.is_empty() {
                break;
            }
            burst.extend(more);
        }
        burst
    }

    /// Takes the customer messages at the head of a lane's queue, in the
    /// order the lane would handle them, up to the first other event.
    fn take_customer_messages(&self, conversation: &str, max: usize) -> Vec<StoredEvent> {
        let mut lanes = self.lock_lanes();
        let Some(queue) = lanes.queues.get_mut(conversation) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        while taken.len() < max && !queue.is_empty() {
            let index = next_index(queue);
            if from_customer(&queue[index].event).is_none() {
                break;
            }
            taken.push(queue.remove(index));
        }
        taken
    }

    /// Handles a burst of customer messages in order: the earlier ones
    /// without the debounced plugins, the last with them, told of the
    /// earlier ones. `false` when one stays pending (the lane stops).
    async fn handle_burst(&self, conversation: &str, mut burst: Vec<StoredEvent>) -> bool {
        if burst.len() == 1 {
            return self.handle(burst.remove(0), &Burst::Alone).await != Step::Pending;
        }
        let last = burst.len() - 1;
        let earlier: Arc<[Message]> = burst[..last]
            .iter()
            .filter_map(|s| from_customer(&s.event).cloned())
            .collect();
        tracing::debug!(conversation, messages = burst.len(), "debounced burst");
        let mut events = burst.into_iter().enumerate();
        while let Some((i, stored)) = events.next() {
            let place = if i < last {
                Burst::Folded
            } else {
                Burst::Last(earlier.clone())
            };
            match self.handle(stored, &place).await {
                Step::Done => {
                    if i < last {
                        counter!(m::MESSAGES_DEBOUNCED).increment(1);
                    }
                }
                // Handed back first (idle release): the rest wait with it,
                // to be collected again.
                Step::Again => {
                    self.requeue(events.map(|(_, s)| s).collect());
                    return true;
                }
                Step::Pending => {
                    // Pending in the store, found again by the sweep.
                    let mut lanes = self.lock_lanes();
                    for (_, rest) in events {
                        lanes.finished(rest.seq, false);
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Picks up what a release recorded in `conversation` (its hand-back
    /// event): queued in the conversation's lane, where it goes first.
    async fn pick_up(&self, conversation: &str) {
        match self.inner.store.pending_in(conversation).await {
            Ok(found) => {
                for stored in found {
                    self.submit(stored);
                }
            }
            // Found by the inbox sweep instead.
            Err(e) => {
                tracing::warn!(conversation, error = %e, "cannot read a conversation's pending events")
            }
        }
    }

    /// Hands back a conversation whose human has been idle for the
    /// configured time, as its customer writes (`record`: in a human's
    /// hands). `None` when not idle; `Some(true)` when it changed hands
    /// (handle the event again), `Some(false)` when that failed.
    async fn release_idle(&self, conversation: &str, record: &ConversationRecord) -> Option<bool> {
        let idle = self.inner.rules.idle_release?;
        let last_agent = record
            .last_agent_at
            .unwrap_or(record.changed_at)
            .max(record.changed_at);
        if now_ms() - last_agent < idle.as_millis() as i64 {
            return None;
        }
        let reason = format!("idle: no agent message for {} s", idle.as_secs());
        match self.inner.store.release(conversation, reason.clone()).await {
            Ok(Release::Released) => {
                tracing::info!(conversation, from = %ConversationState::Human, to = %ConversationState::Bot,
                    %reason, "conversation state changed");
                counter!(m::RELEASES, "reason" => "idle").increment(1);
                self.pick_up(conversation).await;
                Some(true)
            }
            // Changed meanwhile (an operator released it): read again.
            Ok(_) => Some(true),
            Err(e) => {
                tracing::error!(conversation, error = %e, "cannot hand an idle conversation back");
                Some(false)
            }
        }
    }

    /// [`Dispatcher::handle`] inside the event's `span` (which its plugin
    /// turns run in too).
    async fn handle_in(&self, stored: StoredEvent, burst: &Burst, span: tracing::Span) -> Handling {
        let conversation = stored
            .event
            .conversation_id()
            .unwrap_or_default()
            .to_string();
        // What this process last committed for it (no round trip): the
        // completion below checks it still holds (`expect`).
        let record = match self
            .inner
            .store
            .cached_conversation_state(&conversation)
            .await
        {
            Ok(record) => record,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the conversation's state; event left pending");
                return Handling::Pending;
            }
        };
        let state = record.as_ref().map(|r| r.state).unwrap_or_default();
        // An idle human hands the conversation back as the customer
        // writes: the plugins hear of the hand-back first, then of this.
        if let Some(r) = record
            .as_ref()
            .filter(|r| r.state == ConversationState::Human)
            && stored.event.invokes_plugins()
            && matches!(
                stored.event.kind,
                EventKind::Message(_) | EventKind::NewConversation(_)
            )
        {
            match self.release_idle(&conversation, r).await {
                Some(true) => return Handling::Again(Box::new(stored)),
                Some(false) => return Handling::Pending,
                None => {}
            }
        }
        // The state plugins ran in (none ran for agent messages, archiving).
        let mut ran_in = None;
        let (mut handled, update) = match &stored.event.kind {
            EventKind::Message(m) if m.sender.kind == SenderKind::Agent => {
                (Handled::default(), self.judge_agent(m, state).await)
            }
            EventKind::ConversationArchived { archived_at, .. } => (
                Handled::default(),
                ConversationUpdate {
                    change: Some(StateChange {
                        from: None,
                        to: ConversationState::Closed,
                        reason: format!("archived at {archived_at}"),
                    }),
                    archive: Some(format!(
                        "archived: the conversation was archived ({archived_at}) before this action was sent"
                    )),
                    ..ConversationUpdate::default()
                },
            ),
            // A timer reaches its plugin only while the bot is in charge:
            // the store holds timers while a human is and drops them at
            // archiving, so this is a timer turned into an event just
            // before the conversation changed hands; it is dropped, not
            // sent into a conversation the bot no longer has.
            EventKind::Timer(t) if state != ConversationState::Bot => {
                tracing::info!(conversation = %conversation, timer = %t.id, plugin = %t.plugin, %state,
                    "timer came due after the bot lost the conversation; dropped");
                (Handled::default(), ConversationUpdate::default())
            }
            // A human took it over again before the hand-back was told.
            EventKind::Resumed(_) if state != ConversationState::Bot => {
                tracing::info!(conversation = %conversation, %state,
                    "hand-back outdated (the conversation changed hands again); dropped");
                (Handled::default(), ConversationUpdate::default())
            }
            _ => match self.run(&stored, burst, record.as_ref(), span).await {
                Some((handled, mut update, state)) => {
                    ran_in = Some(state);
                    update.timers = handled.timers.clone();
                    (handled, update)
                }
                None => return Handling::Pending,
            },
        };
        let mut update = update;
        update.expect = Some(state);
        let outcomes = serde_json::to_value(&handled.outcomes).unwrap_or_default();
        let kinds = std::mem::take(&mut handled.action_kinds);
        let change = update.change.clone();
        // A completion that cannot be committed (the database is away) is
        // retried, with the plugin's outcome kept, until it commits: the
        // lane must not move on to the conversation's next event first, or
        // the replies would go out of order.
        let mut backoff = Duration::from_millis(50);
        loop {
            match self
                .inner
                .store
                .complete_event(
                    stored.seq,
                    conversation.clone(),
                    outcomes.clone(),
                    handled.actions.clone(),
                    handled.kv.clone(),
                    update.clone(),
                )
                .await
            {
                Ok(done) if done.stale => {
                    // Another process changed hands meanwhile (a CLI
                    // release): what ran was decided on a state that no
                    // longer holds, and nothing of it was kept.
                    tracing::info!(conversation = %conversation, read = %state,
                        "the conversation changed hands elsewhere; handling the event again");
                    counter!(m::STALE_STATES).increment(1);
                    return Handling::Again(Box::new(stored));
                }
                Ok(done) => {
                    self.hint_timers(&update);
                    // Archived: reopened, it starts on the serving versions.
                    if update.archive.is_some()
                        && done.completed
                        && crate::pin::any(&self.inner.registry)
                        && let Err(e) = self.inner.store.unpin(&conversation).await
                    {
                        tracing::warn!(conversation = %conversation, error = %e,
                            "cannot drop the archived conversation's pins");
                    }
                    if let Some(change) = change.filter(|_| done.changed) {
                        tracing::info!(conversation = %conversation, event = %stored.event.key,
                            from = %state, to = %change.to, reason = %change.reason, "conversation state changed");
                        count_change(state, &change);
                        if change.to == ConversationState::Bot && state == ConversationState::Human
                        {
                            self.pick_up(&conversation).await;
                        }
                    }
                    if done.completed && ran_in == Some(ConversationState::Human) {
                        counter!(m::SKIPPED_HUMAN).increment(1);
                    }
                    if done.archived > 0 {
                        counter!(m::ARCHIVED_DEAD_LETTERS).increment(done.archived as u64);
                        tracing::info!(conversation = %conversation, actions = done.archived,
                            "archived: pending actions are now dead letters");
                    }
                    if done.queued > 0 {
                        // 0 when another run already completed the event.
                        for kind in kinds {
                            counter!(m::ACTIONS, "kind" => kind).increment(1);
                        }
                        self.inner.outbox.wake();
                    }
                    // Once the serving turn is committed (its replies
                    // are on their way): the shadow candidates.
                    if done.completed
                        && let Some(state) = ran_in
                        && self.inner.rollouts.any()
                    {
                        self.inner
                            .rollouts
                            .shadow(
                                &stored.event,
                                burst,
                                state,
                                self.inner.kv.clone(),
                                &handled,
                                &self.inner.turn_slots,
                            )
                            .await;
                    }
                    return Handling::Done;
                }
                Err(StoreError::LeaseLost(_)) => {
                    // This replica was too slow and the conversation moved on:
                    // its new holder handles the event, in order.
                    tracing::warn!("conversation taken over by another replica; event left to it");
                    return Handling::Pending;
                }
                Err(e) => {
                    if *self.inner.shutdown.borrow() {
                        // Left pending: the next start handles it, in order.
                        tracing::error!(error = %e, "cannot record a handled event; it stays pending");
                        return Handling::Pending;
                    }
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64,
                        "cannot record a handled event yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Runs the plugins on a customer message, a new conversation, a timer
    /// or a hand-back, in the state the conversation is in once this event
    /// is taken into account (a closed conversation reopens).
    async fn run(
        &self,
        stored: &StoredEvent,
        burst: &Burst,
        record: Option<&ConversationRecord>,
        span: tracing::Span,
    ) -> Option<(Handled, ConversationUpdate, ConversationState)> {
        let now = now_ms();
        let mut update = ConversationUpdate {
            // Kept for the events that do not say it (timers): whose
            // customer KV scope their turns use.
            customer_id: stored.event.customer_id().map(str::to_string),
            ..ConversationUpdate::default()
        };
        let mut state = record.map(|r| r.state).unwrap_or_default();
        match &stored.event.kind {
            EventKind::Message(m) => {
                update.customer_at = Some(lifecycle::customer_wrote_at(
                    m.created_at.as_deref().and_then(lifecycle::parse_time),
                    stored.received_at,
                ));
                update.channel = m.sent_using.clone().filter(|_| !m.sent_through_api());
            }
            EventKind::NewConversation(c) => update.channel = c.channel.clone(),
            _ => {}
        }
        if state == ConversationState::Closed
            && matches!(
                stored.event.kind,
                EventKind::Message(_) | EventKind::NewConversation(_)
            )
        {
            update.change = Some(StateChange {
                from: Some(ConversationState::Closed),
                to: ConversationState::Bot,
                reason: "reopened: the customer wrote after it was archived".into(),
            });
            state = ConversationState::Bot;
        }

        let permit = self.inner.turn_slots.clone().acquire_owned().await.ok()?;
        let registry = self.inner.registry.clone();
        let kv = self.inner.kv.clone();
        let http = self.inner.http.clone();
        let breaker = self.inner.breaker;
        let rollouts = self.inner.rollouts.clone();
        let mut event = stored.event.clone();
        // Told when a send would be refused: WhatsApp, and the customer's
        // last message over 24 hours ago.
        let outside_window = || {
            let channel = record.and_then(|r| r.channel.as_deref());
            let last = record.and_then(|r| r.last_customer_at);
            lifecycle::is_whatsapp(channel)
                && last.is_some_and(|last| now - last > lifecycle::WINDOW_MS)
        };
        match &mut event.kind {
            EventKind::Timer(timer) => timer.outside_window = outside_window(),
            EventKind::Resumed(resumed) => resumed.outside_window = outside_window(),
            _ => {}
        }
        // A task of its own, awaited by the lane (so the conversation's
        // order holds): a bug that panics in a turn fails this event
        // alone, which stays pending, instead of the lane.
        let burst = burst.clone();
        let store = self.inner.store.clone();
        let handled = tokio::spawn(
            async move {
                let conversation = event.conversation_id().unwrap_or_default().to_string();
                let pinned = crate::pin::entries(&store, &registry, &conversation).await;
                let handled = rollouts
                    .run_plugins(&registry, pinned, &event, &burst, state, kv, http, breaker)
                    .await;
                drop(permit);
                handled
            }
            .instrument(span),
        )
        .await;
        let handled = match handled {
            Ok(h) => h,
            Err(e) => {
                // Left pending: the next start retries it.
                tracing::error!(event = %stored.event.key, error = %e, "plugin turn failed; event left pending");
                return None;
            }
        };

        // WhatsApp refuses free-form messages more than 24 h after the
        // customer's last message: say so before sending.
        let channel = update
            .channel
            .as_deref()
            .or(record.and_then(|r| r.channel.as_deref()));
        let last_customer = update
            .customer_at
            .max(record.and_then(|r| r.last_customer_at));
        if lifecycle::is_whatsapp(channel)
            && let Some(last) = last_customer
        {
            let conversation = stored.event.conversation_id().unwrap_or_default();
            if now - last <= lifecycle::WINDOW_MS {
                self.inner.window.open(conversation);
            } else {
                let mut plugins: Vec<&str> = handled
                    .actions
                    .iter()
                    .filter(|a| a.body.get("send_to_third") == Some(&serde_json::Value::Bool(true)))
                    .map(|a| a.plugin.as_str())
                    .collect();
                plugins.dedup();
                // Once per conversation until the customer writes again.
                if !plugins.is_empty() && self.inner.window.closed(conversation) {
                    tracing::warn!(conversation, plugins = %plugins.join(","),
                        hours = (now - last) / 3_600_000,
                        "outside WhatsApp's 24-hour window: the customer last wrote over 24 h ago, Digishare will likely refuse messages to them (warned once per conversation)");
                }
            }
        }
        Some((handled, update, state))
    }

    /// What an agent's message changes: nothing if it is digibot's own
    /// message coming back; back to the bot for the release command as an
    /// internal note; otherwise a human takes over.
    async fn judge_agent(&self, m: &Message, state: ConversationState) -> ConversationUpdate {
        let conversation = m.conversation_id.as_str();
        let release = self.is_release(m);
        // Sent through the API: digibot's own without a lookup.
        let mut own = !m.sent_through_api() && self.own_message(m).await;
        let mut in_flight = false;
        if !own && !release && !m.sent_through_api() && self.inner.sends.busy(conversation) {
            // It may be the echo of a send whose id is not known yet.
            match self
                .inner
                .sends
                .settled(conversation, self.inner.rules.echo_wait)
                .await
            {
                Some(waited) => {
                    own = self.own_message(m).await;
                    if own {
                        tracing::info!(conversation, message = %m.id, waited_ms = waited.as_millis() as u64,
                            "digibot's own message came back before its send returned: not a takeover");
                    }
                }
                None => {
                    // The send's outcome is unknown past this bound (longer
                    // than an attempt can take): fail towards the human, who
                    // is then in charge until released; the other way, the
                    // bot could talk over an agent with nothing to show it.
                    tracing::warn!(conversation, message = %m.id, waited_s = self.inner.rules.echo_wait.as_secs(),
                        "a send to this conversation is still in flight: judging the agent message without its id (takeover)");
                    in_flight = true;
                }
            }
        }
        agent_update(m, state, own, release, in_flight)
    }

    fn is_release(&self, m: &Message) -> bool {
        m.is_internal_note() && m.text().is_some_and(|t| self.inner.rules.is_release(t))
    }

    /// A judge for an agent message about to be recorded, when it can be
    /// judged in its insert's transaction ([`digibot_store::Backend::insert_judged`]):
    /// its conversation has no lane here (nothing of it is queued or being
    /// handled, so its order holds) and no send to it is in flight (every
    /// id this message could be the echo of is committed). `None`: record
    /// it for its lane, which waits for the send.
    ///
    /// An agent message and a customer message of one conversation that
    /// arrive together are then judged in the order they commit rather
    /// than in their inbox order; a turn decided before the takeover
    /// committed is refused at its completion and handled again
    /// ([`ConversationUpdate::expect`]).
    pub fn judge_at_insert(&self, event: &digibot_domain::event::Event) -> Option<Judge> {
        let EventKind::Message(m) = &event.kind else {
            return None;
        };
        if m.sender.kind != SenderKind::Agent {
            return None;
        }
        let conversation = m.conversation_id.as_str();
        if self.lock_lanes().queues.contains_key(conversation)
            || self.inner.sends.busy(conversation)
        {
            return None;
        }
        let release = self.is_release(m);
        let m = m.clone();
        Some(Box::new(move |state, own| {
            agent_update(&m, state.unwrap_or_default(), own, release, false)
        }))
    }

    /// Tells what an agent message judged as it was recorded did, as a
    /// lane would have: the state change's log line and metrics, and a
    /// hand-back's `digibot.resumed` to its lane.
    pub async fn judged(&self, event: &digibot_domain::event::Event, judged: &Judged) {
        let Judged::Handled {
            from,
            update,
            changed,
            ..
        } = judged
        else {
            return;
        };
        counter!(m::AGENT_JUDGED_AT_INSERT).increment(1);
        let conversation = event.conversation_id().unwrap_or_default();
        let Some(change) = update.change.as_ref().filter(|_| *changed) else {
            return;
        };
        tracing::info!(conversation, event = %event.key, from = %from, to = %change.to,
            reason = %change.reason, "conversation state changed");
        count_change(*from, change);
        if change.to == ConversationState::Bot && *from == ConversationState::Human {
            self.pick_up(conversation).await;
        }
    }

    async fn own_message(&self, m: &Message) -> bool {
        match self
            .inner
            .store
            .is_own_message(&m.conversation_id, &m.id)
            .await
        {
            Ok(own) => own,
            Err(e) => {
                tracing::error!(error = %e, message = %m.id, "cannot look up sent message ids");
                false
            }
        }
    }

    /// Waits until every lane has stopped (after shutdown was signalled,
    /// lanes stop between events) or the deadline passes.
    pub async fn drain(&self, deadline: Duration) -> bool {
        let mut tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        tokio::time::timeout(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok()
    }

    /// The bound on concurrent turns, for other callers that run plugins
    /// in this process (the dashboard's simulator), so they share the
    /// instance pool's budget with the dispatcher.
    pub fn turn_slots(&self) -> Arc<Semaphore> {
        self.inner.turn_slots.clone()
    }

    /// Events whose plugin turns are running (or waiting on a host call)
    /// right now, the simulator's included.
    pub fn turns_in_flight(&self) -> usize {
        self.inner
            .max_turns
            .saturating_sub(self.inner.turn_slots.available_permits())
    }

    /// Events queued in memory (for tests and metrics).
    pub fn queued(&self) -> usize {
        self.lock_lanes().queues.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn plugin_text_is_logged_on_one_line() {
        assert_eq!(one_line("plain"), "plain");
        assert_eq!(
            one_line("boom\n2026-01-01T00:00:00Z  INFO forged\r"),
            "boom\\n2026-01-01T00:00:00Z  INFO forged\\r"
        );
    }
}
