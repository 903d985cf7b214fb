//! The durable store's interface: inbox (events), outbox (actions and dead
//! letters), plugin KV state, and who is in charge of each conversation
//! (with the ids of the messages digibot sent, to recognise their echoes).
//!
//! [`Store`] is the handle every other crate uses; it does not say which
//! database is behind it. Each back end is a crate of its own that holds all
//! of its SQL and its database client, implements [`Backend`], and passes
//! the conformance [`suite`] (feature `suite`). Every operation gives the
//! same guarantees on every back end: a write returns only after it is
//! committed, an event is recorded once per key, and an event's completion
//! (status, actions, KV writes, its conversation's state change) is one
//! transaction.
//!
//! - `digibot-store-sqlite`: the embedded default, a file under the data
//!   dir, with a group-commit writer thread; one node.
//! - `digibot-store-postgres`: `DIGIBOT_DATABASE_URL=postgres://...`,
//!   shared by several replicas, which split the work through conversation
//!   leases and outbox claims, and keep their plugins in [`PluginRecords`].
//!
//! Work sharing is part of the boundary, so the dispatcher and the sender
//! need not know which back end they run on: a dispatcher lane claims its
//! conversation before handling it and releases it when it runs dry, and
//! `outbox_heads` claims what it returns. On SQLite, with one node, these
//! claims are free and always granted.
//!
//! Adding an operation: a method on [`Backend`], its implementation in
//! every back end, and a test in [`suite`] (run against every back end).

pub mod rollout;
#[cfg(feature = "suite")]
pub mod suite;

use digibot_domain::event::{ConversationState, Event};
pub use digibot_domain::history::HistoryEntry;
pub use digibot_domain::kv::{KvChanges, KvScope, KvSize, KvUsage, KvWrite, Scope};
pub use digibot_domain::outbound::Refusal;
pub use digibot_domain::time::now_ms;
pub use digibot_domain::timer::{TimerChanges, TimerFired, TimerOp, TimerRecord};
pub use rollout::{Comparison, RolloutRecord};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed (each back end says why).
    #[error("database error: {0}")]
    Database(String),
    /// The database did not answer in time (a pool or statement timeout).
    #[error("database busy: {0}")]
    Timeout(String),
    #[error("{0}")]
    Config(String),
    #[error("conversation {0} is now handled by another replica")]
    LeaseLost(String),
    #[error("commit failed: {0}")]
    Commit(String),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store is shut down")]
    Closed,
    #[error("bad stored value: {0}")]
    Corrupt(String),
}

/// On a single node, how long an event stays pending before
/// [`Backend::claimable_events`] counts it orphaned: longer than an event
/// takes from its commit to its lane, so that the sweep does not race the
/// webhook that recorded it.
pub const ORPHANED_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Result of recording a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new event, with its inbox sequence number.
    New(i64),
    /// Already recorded (a redelivery).
    Duplicate,
}

/// How an agent message is judged as it is recorded
/// ([`Backend::insert_judged`]): given its conversation's state (`None`:
/// digibot has not seen it) and whether the message is one digibot sent
/// (its id is among the Messages API's answers), what it changes.
pub type Judge = Box<dyn FnOnce(Option<ConversationState>, bool) -> ConversationUpdate + Send>;

/// What [`Backend::insert_judged`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judged {
    /// Recorded and handled in one transaction: nothing is left for the
    /// dispatcher but to say so.
    Handled {
        seq: i64,
        /// The conversation's state before (the bot's for a new one).
        from: ConversationState,
        /// What the judge decided.
        update: ConversationUpdate,
        /// Whether its state change applied.
        changed: bool,
    },
    /// Recorded as pending, for its conversation's lane (a back end that
    /// does not judge as it records).
    Pending(i64),
    /// Already recorded (a redelivery).
    Duplicate,
}

/// An event waiting for (or past) dispatch.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: i64,
    pub event: Event,
    /// When digibot received it (ms since the epoch): the customer wrote no
    /// later than this, whatever the payload says.
    pub received_at: i64,
}

/// An action ready to be written to the outbox.
#[derive(Debug, Clone, Serialize)]
pub struct NewAction {
    pub plugin: String,
    pub idempotency_key: String,
    pub method: String,
    pub path: String,
    pub body: serde_json::Value,
}

/// An outbox row.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxAction {
    pub id: i64,
    pub event_seq: i64,
    pub conversation_id: String,
    pub plugin: String,
    pub idempotency_key: String,
    pub method: String,
    pub path: String,
    pub body: serde_json::Value,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
}

/// A recent event, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct EventSummary {
    pub seq: i64,
    pub key: String,
    pub event: String,
    pub conversation_id: Option<String>,
    pub status: String,
    pub received_at: i64,
    pub handled_at: Option<i64>,
    pub plugins: serde_json::Value,
}

/// Outbox rows still needing attention (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutboxDepth {
    /// Waiting to be sent, retries included.
    pub pending: i64,
    /// Dead letters.
    pub dead: i64,
}

/// How many of the most recent events (and outbox rows) the conversation
/// views look at.
pub const CONVERSATION_WINDOW: i64 = 20_000;

/// Outbox actions of a conversation by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ActionCounts {
    pub sent: i64,
    pub pending: i64,
    pub dead: i64,
}

/// A recently active conversation, for the dashboard.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationSummary {
    pub conversation_id: String,
    pub events: i64,
    pub pending_events: i64,
    pub first_event_at: i64,
    pub last_event_at: i64,
    /// The name of its latest event (`live_chat.new_message`, ...).
    pub last_event: String,
    pub actions: ActionCounts,
    /// Who is in charge, since when and why (none before its first event
    /// is handled).
    pub state: Option<ConversationRecord>,
}

/// A conversation's recent events and the actions they queued.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationDetail {
    pub conversation_id: String,
    pub events: Vec<EventSummary>,
    pub actions: Vec<OutboxAction>,
    /// Who is in charge, since when and why.
    pub state: Option<ConversationRecord>,
    /// Its pending timers, soonest due first.
    pub timers: Vec<TimerRecord>,
}

/// Who is in charge of a conversation, since when and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConversationRecord {
    pub id: String,
    pub state: ConversationState,
    /// When the state last changed (ms).
    pub changed_at: i64,
    /// Why it last changed.
    pub reason: String,
    /// The customer's channel (`whatsapp`, ...), when known.
    pub channel: Option<String>,
    /// When the customer last wrote (ms): Digishare's `created_at` when it
    /// is plausible, else when digibot received the message.
    pub last_customer_at: Option<i64>,
    /// When an agent last wrote (ms), echoes of digibot's own excluded.
    pub last_agent_at: Option<i64>,
    /// The customer's Digishare id (the third's), once an event said it:
    /// whose `customer` KV scope its turns use.
    pub customer_id: Option<String>,
}

/// A change of state, applied only if the conversation is in `from` (any
/// other state than `to` when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    pub from: Option<ConversationState>,
    pub to: ConversationState,
    pub reason: String,
}

/// What handling one event changes about its conversation, committed with
/// the event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversationUpdate {
    pub channel: Option<String>,
    /// The customer's id, when the event says it (kept once known).
    pub customer_id: Option<String>,
    pub customer_at: Option<i64>,
    pub agent_at: Option<i64>,
    pub change: Option<StateChange>,
    /// Pending outbox actions of the conversation become dead letters with
    /// this error (the conversation was archived). Its pending timers are
    /// dropped.
    pub archive: Option<String>,
    /// Timers the event's turns scheduled or cancelled. When the event is
    /// a customer message (`customer_at` set), the conversation's timers
    /// marked cancel-on-customer-message are dropped first, so a timer
    /// scheduled in answer to that message stands.
    pub timers: Vec<TimerChanges>,
    /// The state the event was handled in, as the dispatcher read it
    /// (the bot's for a conversation it had not seen). A back end whose
    /// [`Backend::cached_conversation_state`] can be stale refuses the
    /// completion when the conversation is no longer in it
    /// ([`Completed::stale`]); one that always reads afresh may ignore it.
    pub expect: Option<ConversationState>,
}

/// What [`Store::complete_event`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completed {
    /// Whether this call completed the event (false: it already was).
    pub completed: bool,
    /// Actions queued (0 when the event was already completed).
    pub queued: usize,
    /// Whether the update's state change applied.
    pub changed: bool,
    /// Pending actions turned into dead letters by archiving.
    pub archived: usize,
    /// Nothing was done: the conversation is no longer in the state the
    /// update expects (another process changed it). Handle the event
    /// again, from a fresh read.
    pub stale: bool,
}

/// What [`Store::release_blocking`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// It was `human`; it is `bot` now.
    Released,
    /// It was not in a human's hands (already `bot`, or `closed`).
    NotHuman(ConversationState),
    /// digibot has never seen that conversation.
    Unknown,
}

/// A state as stored (`bot`, `human`, `closed`).
pub fn parse_state(s: &str) -> Result<ConversationState, StoreError> {
    match s {
        "bot" => Ok(ConversationState::Bot),
        "human" => Ok(ConversationState::Human),
        "closed" => Ok(ConversationState::Closed),
        other => Err(StoreError::Corrupt(format!(
            "unknown conversation state {other:?}"
        ))),
    }
}

/// What retention removes: each field is a cut-off time (ms), `None`
/// keeps that kind of record forever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Handled events and sent actions finished before this go (with the
    /// ids of sent messages as old). Pending work never goes, nor an event
    /// whose action is pending or a dead letter.
    pub finished_before: Option<i64>,
    /// Dead letters that died before this go.
    pub dead_before: Option<i64>,
    /// Conversations with no event handled since this go: their state (who
    /// is in charge) and every plugin's KV in them. One with a pending
    /// event, or leased by a replica, stays.
    pub idle_before: Option<i64>,
    /// KV values (of every scope) whose TTL ran out before this go: the
    /// time retention runs at.
    pub expired_before: Option<i64>,
    /// A plugin's memory of one customer (its `customer` scope) last
    /// written before this goes.
    pub customer_idle_before: Option<i64>,
}

/// What retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub events: usize,
    /// Sent actions.
    pub actions: usize,
    pub dead_letters: usize,
    pub conversations: usize,
    /// KV entries of the conversations that went.
    pub kv_entries: usize,
    /// KV values whose TTL ran out (every scope).
    pub kv_expired: usize,
    /// Customer-scope entries of customers idle past their retention.
    pub customer_entries: usize,
    /// Journaled outbound calls.
    pub calls: usize,
}

impl Pruned {
    /// Whether anything went.
    pub fn any(&self) -> bool {
        *self != Pruned::default()
    }

    fn add(&mut self, o: Pruned) {
        self.events += o.events;
        self.actions += o.actions;
        self.dead_letters += o.dead_letters;
        self.conversations += o.conversations;
        self.kv_entries += o.kv_entries;
        self.kv_expired += o.kv_expired;
        self.customer_entries += o.customer_entries;
        self.calls += o.calls;
    }
}

/// Runs `batch` until it removes fewer than `size` rows of every kind:
/// retention works in batches, each its own transaction, so webhooks keep
/// flowing while it runs.
pub async fn prune_in_batches<F, Fut>(size: usize, mut batch: F) -> Result<Pruned, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Pruned, StoreError>>,
{
    let mut total = Pruned::default();
    loop {
        let p = batch().await?;
        total.add(p);
        if [
            p.events,
            p.actions,
            p.dead_letters,
            p.conversations,
            p.calls,
            p.kv_expired,
            p.customer_entries,
        ]
        .iter()
        .all(|n| *n < size)
        {
            return Ok(total);
        }
    }
}

/// One outbound HTTP call a plugin made while handling an event, as the
/// journal keeps it: the request as the plugin wrote it (secrets as their
/// placeholders, other credentials redacted) and what came back (secret
/// values scrubbed). Keyed by (event, plugin, call number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JournalEntry {
    /// The event's dedup key.
    pub event_key: String,
    pub plugin: String,
    /// The call's number in the plugin's turn, from 0.
    pub call: u32,
    pub request: JournalRequest,
    pub outcome: JournalOutcome,
    /// From sending to the last byte (redirects included).
    pub elapsed_ms: u64,
    /// When it was recorded (ms).
    pub recorded_at: i64,
}

/// The request side of a [`JournalEntry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct JournalRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body_bytes: u64,
    /// SHA-256 of the body, hex: a re-run replays the call only if it
    /// asks for the same thing.
    pub body_sha256: String,
}

/// What a journaled call got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JournalOutcome {
    Response {
        status: u16,
        headers: Vec<(String, String)>,
        #[serde(serialize_with = "lossy_text")]
        body: Vec<u8>,
    },
    /// The call went out and failed (timeout, response cap, a redirect
    /// refused, ...).
    Failed { refusal: Refusal },
}

fn lossy_text<S: serde::Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(body))
}

/// Handle to the store; cheap to clone. Derefs to the [`Backend`] behind
/// it, so callers write `store.insert_event(event).await`.
#[derive(Clone)]
pub struct Store(Arc<dyn Backend>);

impl Store {
    pub fn new(backend: impl Backend) -> Store {
        Store(Arc::new(backend))
    }
}

impl std::ops::Deref for Store {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

/// What every back end does. A trait object (one boxed future per call,
/// tens of nanoseconds) so that the crates above never name a database.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Finishes the writes already queued; later writes fail with
    /// [`StoreError::Closed`].
    fn close(&self);

    /// Whether the store answers, through the path webhooks take (the
    /// writer, for SQLite): readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    // ---- inbox ---------------------------------------------------------

    /// Records a delivered webhook, committed before this returns. Events
    /// the dispatcher handles ([`Event::dispatched`]) are stored as
    /// `pending`, the others as `recorded`; a key already recorded is a [`Inserted::Duplicate`].
    async fn insert_event(&self, event: Event) -> Result<Inserted, StoreError>;

    /// Events not yet dispatched, oldest first (recovery after a restart).
    async fn pending_events(&self) -> Result<Vec<StoredEvent>, StoreError>;

    /// The event recorded under `key`, if it is still pending (a
    /// redelivery of it is then handed to its lane again).
    async fn pending_event(&self, key: &str) -> Result<Option<StoredEvent>, StoreError>;

    /// One conversation's pending events, oldest first (what a release
    /// recorded for the dispatcher to pick up).
    async fn pending_in(&self, conversation_id: &str) -> Result<Vec<StoredEvent>, StoreError>;

    /// The event recorded under `key`, whatever its status (what
    /// `digibot replay --event` runs again).
    async fn event(&self, key: &str) -> Result<Option<StoredEvent>, StoreError>;

    /// Marks an event handled, with what each plugin did, and in the same
    /// transaction queues its actions, applies its KV writes and what it
    /// changes about its conversation (creating it in the bot's hands if
    /// new; a state change applies only from its `from` state; `archive`
    /// turns the conversation's pending actions into dead letters). An
    /// event already completed (a recovery race) changes nothing: a retried
    /// event never queues twice nor applies its state change twice.
    async fn complete_event(
        &self,
        seq: i64,
        conversation_id: String,
        outcomes: serde_json::Value,
        actions: Vec<NewAction>,
        kv: Vec<KvChanges>,
        update: ConversationUpdate,
    ) -> Result<Completed, StoreError>;

    /// Records an agent message and, in the same transaction, judges it
    /// with `judge` and applies what it decides to its conversation: one
    /// round trip instead of a lane's four. The caller makes sure nothing
    /// else of the conversation is being handled, and no send to it is in
    /// flight (whose message id this one could be). A back end that cannot
    /// records it as [`Judged::Pending`], which is what this default does.
    async fn insert_judged(&self, event: Event, judge: Judge) -> Result<Judged, StoreError> {
        drop(judge);
        Ok(match self.insert_event(event).await? {
            Inserted::New(seq) => Judged::Pending(seq),
            Inserted::Duplicate => Judged::Duplicate,
        })
    }

    // ---- conversations -----------------------------------------------------

    /// One conversation's state, if digibot has seen it.
    async fn conversation_state(&self, id: &str) -> Result<Option<ConversationRecord>, StoreError>;

    /// [`conversation_state`](Self::conversation_state), possibly from what
    /// this process last committed: it can miss a change another process
    /// made, so a turn decided on it says so in
    /// [`ConversationUpdate::expect`]. The default reads afresh.
    async fn cached_conversation_state(
        &self,
        id: &str,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        self.conversation_state(id).await
    }

    /// Conversations, most recently changed first, optionally only those in
    /// `state`.
    async fn conversation_states(
        &self,
        state: Option<ConversationState>,
        limit: usize,
    ) -> Result<Vec<ConversationRecord>, StoreError>;

    /// Whether the Messages API gave digibot this message id when it sent
    /// something to this conversation.
    async fn is_own_message(
        &self,
        conversation_id: &str,
        message_id: &str,
    ) -> Result<bool, StoreError>;

    /// Hands a conversation in a human's hands back to the bot, saying why.
    async fn release(&self, id: &str, reason: String) -> Result<Release, StoreError>;

    /// Takes (or renews) this replica's lease on a conversation before its
    /// events are handled. `None`: another replica holds it (and is told an
    /// event waits). `Some`: the conversation's pending events, which may
    /// include some this replica never received (always empty on a single
    /// node, where the dispatcher already has them all).
    async fn claim_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Option<Vec<StoredEvent>>, StoreError>;

    /// Gives a conversation's lease back once its lane ran dry, unless
    /// events of it still wait: then the lease is kept and those returned.
    async fn release_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Pending events this replica should pick up although the webhook
    /// may never have handed them to its dispatcher: in conversations it
    /// holds, or orphaned (their replica died; on a single node, pending
    /// for longer than [`ORPHANED_AFTER`]: a delivery cut off after its
    /// commit, a lane that gave up on a transient error). The dispatcher
    /// skips those it is working on. Oldest first, at most `limit`.
    async fn claimable_events(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;

    /// Woken when [`claimable_events`](Self::claimable_events) may have
    /// something sooner than the dispatcher's periodic sweep; `None` when
    /// work only ever arrives through this process.
    fn inbox_wakeups(&self) -> Option<Arc<tokio::sync::Notify>>;

    /// Recent events, newest first.
    async fn recent_events(&self, limit: usize) -> Result<Vec<EventSummary>, StoreError>;

    /// The conversations with events among the last
    /// [`CONVERSATION_WINDOW`] events, most recently active first, at most
    /// `limit`, with their action counts (dashboard).
    async fn recent_conversations(
        &self,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, StoreError>;

    /// One conversation's events (oldest first, with what each plugin did)
    /// and the actions they queued, with their API status, within the last
    /// [`CONVERSATION_WINDOW`] events and outbox rows.
    async fn conversation(&self, conversation_id: &str) -> Result<ConversationDetail, StoreError>;

    // ---- timers ------------------------------------------------------------

    /// Turns timers due at `now` (ms) into `digibot.timer` events in the
    /// inbox, at most `limit`, soonest due first, in one transaction: each
    /// timer leaves the timers table as its event (key `timer:ID`) enters
    /// the inbox, so it fires once whatever replica or restart gets there.
    /// Timers of conversations in a human's hands are held (not turned);
    /// those of closed conversations were dropped at archiving. Returns
    /// the new pending events, for the dispatcher.
    async fn fire_due_timers(&self, now: i64, limit: usize)
    -> Result<Vec<StoredEvent>, StoreError>;

    /// The conversation's last messages (at most `limit`, and at most
    /// [`HISTORY_MAX`](digibot_domain::history::HISTORY_MAX)), oldest
    /// first: customer and agent messages from the inbox (digibot's own
    /// messages coming back excluded) and the messages digibot queued.
    async fn history(
        &self,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError>;

    /// The names of a plugin's pending timers in one conversation.
    async fn timer_names(
        &self,
        plugin: &str,
        conversation_id: &str,
    ) -> Result<Vec<String>, StoreError>;

    // ---- KV --------------------------------------------------------------

    /// A plugin's stored value for one conversation.
    async fn kv_get(
        &self,
        plugin: &str,
        conversation_id: &str,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        self.kv_get_in(plugin, conversation_id, &KvScope::Conversation, key)
            .await
    }

    /// A plugin's stored value in `scope` (`conversation_id` names the
    /// conversation scope's conversation): absent once its TTL ran out,
    /// even before retention removes it.
    async fn kv_get_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Result<Option<String>, StoreError>;

    /// How much KV a plugin holds in one conversation and in all of them.
    async fn kv_usage(&self, plugin: &str, conversation_id: &str) -> Result<KvUsage, StoreError> {
        self.kv_usage_in(plugin, conversation_id, &KvScope::Conversation)
            .await
    }

    /// How much KV a plugin holds in one scope and in all of them
    /// ([`KvUsage`]: keys, and bytes of keys plus values), as committed
    /// (values past their TTL count until retention removes them). Kept
    /// up to date by [`complete_event`](Self::complete_event) and
    /// [`prune`](Self::prune) in their own transactions, so reading it
    /// costs one lookup whatever the plugin holds.
    async fn kv_usage_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
    ) -> Result<KvUsage, StoreError>;

    // ---- outbox ------------------------------------------------------------

    /// The first pending action of each conversation (later actions of a
    /// conversation wait for the first one), soonest due first, at most
    /// `limit`. The sender starts the due ones and sleeps until the first
    /// that is not: one query serves both. With replicas, the heads
    /// returned are claimed for this one (its own claims included), and
    /// no other replica gets them until they are settled or the claim
    /// runs out. It runs on every wake of the sender, so a back end must
    /// make it cost the heads it returns, not the pending backlog.
    async fn outbox_heads(&self, limit: usize) -> Result<Vec<OutboxAction>, StoreError>;

    /// Counts of outbox rows by status.
    async fn outbox_counts(&self) -> Result<Vec<(String, i64)>, StoreError>;

    /// Pending actions and dead letters (for metrics).
    async fn outbox_depth(&self) -> Result<OutboxDepth, StoreError>;

    /// Records a delivered action, with the message id Digishare gave it
    /// (kept to recognise the message when it comes back as a webhook). A
    /// delivered hand-off puts its conversation in a human's hands (if the
    /// bot had it) in the same transaction; returns whether it did.
    async fn mark_sent(
        &self,
        id: i64,
        status: u16,
        message_id: Option<String>,
        hand_off: bool,
    ) -> Result<bool, StoreError>;

    /// Records a failed attempt to be retried at `next_attempt_at` (unless
    /// the action stopped being pending meanwhile, e.g. archived).
    async fn mark_retry(
        &self,
        id: i64,
        next_attempt_at: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), StoreError>;

    /// Turns a pending action into a dead letter, keeping the last status
    /// and body (an action archived meanwhile keeps its reason).
    async fn mark_dead(
        &self,
        id: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), StoreError>;

    // ---- dead letters ------------------------------------------------------

    /// Every dead letter, oldest first.
    async fn dead_letters(&self) -> Result<Vec<OutboxAction>, StoreError>;

    /// Puts dead letters back in the outbox (one id, or all when `None`),
    /// due now with a fresh attempt count. Returns how many.
    async fn retry_dead(&self, id: Option<i64>) -> Result<usize, StoreError>;

    /// Deletes a dead letter. Returns whether it existed.
    async fn drop_dead(&self, id: i64) -> Result<bool, StoreError>;

    // ---- outbound call journal ---------------------------------------------

    /// Records one outbound call, committed before this returns; a call
    /// already recorded under the same (event, plugin, call) is replaced.
    async fn record_call(&self, entry: JournalEntry) -> Result<(), StoreError>;

    /// The calls recorded for an event, by plugin then call number: one
    /// plugin's (what a re-run of its turn replays) or every plugin's.
    async fn journal(
        &self,
        event_key: &str,
        plugin: Option<&str>,
    ) -> Result<Vec<JournalEntry>, StoreError>;

    // ---- rollouts ----------------------------------------------------------

    /// Starts a rollout of `rollout.plugin` with the candidate's `bytes`,
    /// replacing the plugin's previous one (and its comparisons); its
    /// totals start at 0.
    async fn start_rollout(&self, rollout: RolloutRecord, bytes: Vec<u8>)
    -> Result<(), StoreError>;

    /// Ends the active rollout `id` of `plugin` (`state`: `promoted`,
    /// `aborted`, `rolled_back`); false when it is not the active one (it
    /// ended already, on this replica or another).
    async fn end_rollout(
        &self,
        plugin: &str,
        id: &str,
        state: &str,
        reason: Option<String>,
    ) -> Result<bool, StoreError>;

    /// The plugin's latest rollout, active or ended.
    async fn rollout(&self, plugin: &str) -> Result<Option<RolloutRecord>, StoreError>;

    /// Every plugin's latest rollout, by plugin name.
    async fn rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError>;

    /// The candidate bytes of rollout `id` of `plugin`.
    async fn rollout_bytes(&self, plugin: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Records one comparison and counts it in its rollout's totals, once
    /// per (rollout, event): false when that event was compared already.
    /// Keeps the newest [`rollout::COMPARISONS_KEPT`].
    async fn record_comparison(&self, comparison: Comparison) -> Result<bool, StoreError>;

    /// The newest `limit` comparisons of rollout `id` of `plugin`, newest
    /// first.
    async fn comparisons(
        &self,
        plugin: &str,
        id: &str,
        limit: usize,
    ) -> Result<Vec<Comparison>, StoreError>;

    // ---- pinned versions -------------------------------------------------

    /// The version of `plugin` that `conversation_id` is pinned to
    /// (`pin = "conversation"`), pinning it to `version` when it has none.
    async fn pin_version(
        &self,
        plugin: &str,
        conversation_id: &str,
        version: &str,
    ) -> Result<String, StoreError>;

    /// Drops a conversation's pins (archived: reopened, it starts on the
    /// serving versions). How many there were.
    async fn unpin(&self, conversation_id: &str) -> Result<usize, StoreError>;

    /// A conversation's pins: (plugin, version), by plugin.
    async fn pins(&self, conversation_id: &str) -> Result<Vec<(String, String)>, StoreError>;

    // ---- retention ---------------------------------------------------------

    /// Deletes what `retention` says is old enough (see [`Retention`]),
    /// in batches; journaled calls go with their finished events. Pending
    /// work (and the calls of pending events) is never pruned.
    async fn prune(&self, retention: Retention) -> Result<Pruned, StoreError>;

    // ---- replicas ----------------------------------------------------------

    /// Where replicas sharing this database keep their plugins; `None` on
    /// a back end that serves one node.
    fn plugin_records(&self) -> Option<Arc<dyn PluginRecords>> {
        None
    }
}

/// A plugin as the cluster records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedPlugin {
    /// The version every replica serves; `None` once removed (the name
    /// stays known, so a replica's stale folder cannot bring it back).
    pub hash: Option<String>,
    /// Versions a rollback goes back to, oldest first.
    pub previous: Vec<String>,
}

/// One replica's published breaker report for one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthRow {
    pub replica: String,
    pub name: String,
    pub hash: String,
    /// The report as JSON (the runtime's `HealthReport`).
    pub report: String,
    /// When that replica last reported (ms).
    pub reported_at: i64,
}

/// The record of plugins that replicas sharing a database serve: bytes,
/// the serving version, rollback history, and every replica's breakers.
/// A change is announced to every replica ([`PluginRecords::changes`]).
#[async_trait::async_trait]
pub trait PluginRecords: Send + Sync {
    /// This replica, as it signs its breaker reports.
    fn replica(&self) -> &str;

    /// Records `bytes` as the version of `name` every replica serves; the
    /// version it replaces becomes the latest rollback target.
    async fn put(&self, name: &str, hash: &str, bytes: &[u8]) -> Result<(), StoreError>;

    /// Takes `name` out of service everywhere; false when it was not served.
    async fn remove(&self, name: &str) -> Result<bool, StoreError>;

    /// Makes the latest rollback target current (dropping it and the
    /// version rolled back from from the targets) and returns its bytes;
    /// `None` when there is no target.
    async fn rollback(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every plugin name the cluster knows.
    async fn list(&self) -> Result<BTreeMap<String, RecordedPlugin>, StoreError>;

    /// The bytes of one recorded version.
    async fn bytes(&self, name: &str, hash: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Publishes this replica's breakers (`(name, version, report JSON)`)
    /// and forgets replicas that stopped reporting.
    async fn publish_health(
        &self,
        plugins: Vec<(String, String, String)>,
    ) -> Result<(), StoreError>;

    /// Every live replica's breaker reports, by plugin name then replica.
    async fn health(&self) -> Result<Vec<HealthRow>, StoreError>;

    /// Woken when another replica changed the record (and at times
    /// without a change: callers re-read, they do not trust a count).
    /// `None` once the store is gone.
    async fn changed(&self) -> Option<()>;
}

/// The metrics every back end updates, as `/metrics` names them.
pub mod metrics {
    /// PostgreSQL: every statement sent (a first prepare on a connection
    /// counts too); SQLite: every job handed to the writer thread and every
    /// read on a reader connection. Divided by events: the store's cost.
    pub const ROUND_TRIPS: &str = "digibot_store_round_trips_total";
    /// SQLite group commits: one fsync each with durability `full`.
    pub const COMMITS: &str = "digibot_store_commits_total";

    /// Declares them (help text, and a 0 before the first update).
    pub fn describe() {
        ::metrics::describe_counter!(
            ROUND_TRIPS,
            "Requests to the database (statements to PostgreSQL; writer jobs and reads on SQLite)."
        );
        ::metrics::describe_counter!(
            COMMITS,
            "SQLite transactions committed by the writer (one per group commit)."
        );
        ::metrics::counter!(ROUND_TRIPS).increment(0);
        ::metrics::counter!(COMMITS).increment(0);
    }
}
