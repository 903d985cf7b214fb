//! The durable store: inbox (events), outbox (actions and dead letters),
//! plugin KV state, and who is in charge of each conversation (with the ids
//! of the messages digibot sent, to recognise their echoes). [`Store`] is the handle every other module uses; it does
//! not say which database is behind it. Each back end (a module here) holds
//! all of its own SQL and gives every operation the same guarantees:
//! a write returns only after it is committed, an event is recorded once per
//! key, and an event's completion (status, actions, KV writes, its
//! conversation's state change) is one transaction.
//!
//! - [`sqlite`]: the embedded default, a file under the data dir, with a
//!   group-commit writer thread; one node.
//! - [`postgres`]: `DIGIBOT_DATABASE_URL=postgres://...`, shared by several
//!   replicas, which split the work through conversation leases and outbox
//!   claims (see its module docs).
//!
//! Work sharing is part of the boundary, so the dispatcher and the sender
//! need not know which back end they run on: a dispatcher lane claims its
//! conversation before handling it and releases it when it runs dry, and
//! `outbox_heads` claims what it returns. On SQLite, with one node, these
//! claims are free and always granted.
//!
//! Adding an operation: a method here that delegates with `on_backend!`,
//! the same method on every back end, and a test in `suite` (run against
//! every back end).

pub mod postgres;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

use crate::event::{ConversationState, Event};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
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

/// How hard a SQLite commit waits for the disk; see [`sqlite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Full,
    Normal,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
}

/// The database behind a [`Store`]. An enum rather than a trait object: the
/// operations are async, and a `match` costs nothing on SQLite's hot path.
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

/// Runs the same call on whichever back end the store has.
macro_rules! on_backend {
    ($store:expr, $b:ident => $call:expr) => {
        match &*$store.backend {
            Backend::Sqlite($b) => $call,
            Backend::Postgres($b) => $call,
        }
    };
}

/// Result of recording a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new event, with its inbox sequence number.
    New(i64),
    /// Already recorded (a redelivery).
    Duplicate,
}

/// An event waiting for (or past) dispatch.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: i64,
    pub event: Event,
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

/// A plugin's KV write, applied with the event it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    Set { key: String, value: String },
    Delete { key: String },
}

/// The KV writes of one plugin for one conversation.
#[derive(Debug, Clone)]
pub struct KvChanges {
    pub plugin: String,
    pub conversation_id: String,
    pub writes: Vec<KvWrite>,
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
    /// When the customer last wrote (Digishare's time when it sent one, ms).
    pub last_customer_at: Option<i64>,
    /// When an agent last wrote (ms), echoes of digibot's own excluded.
    pub last_agent_at: Option<i64>,
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
    pub customer_at: Option<i64>,
    pub agent_at: Option<i64>,
    pub change: Option<StateChange>,
    /// Pending outbox actions of the conversation become dead letters with
    /// this error (the conversation was archived).
    pub archive: Option<String>,
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
pub(crate) fn parse_state(s: &str) -> Result<ConversationState, StoreError> {
    match s {
        "bot" => Ok(ConversationState::Bot),
        "human" => Ok(ConversationState::Human),
        "closed" => Ok(ConversationState::Closed),
        other => Err(StoreError::Corrupt(format!(
            "unknown conversation state {other:?}"
        ))),
    }
}

/// What retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub events: usize,
    pub actions: usize,
}

impl Store {
    /// Opens (and creates or migrates) the SQLite database under `data_dir`.
    pub fn open(data_dir: &Path, durability: Durability) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Arc::new(Backend::Sqlite(sqlite::Sqlite::open(data_dir, durability)?)),
        })
    }

    /// Connects to the PostgreSQL database at `config` (and migrates it).
    pub fn open_postgres(
        config: tokio_postgres::Config,
        options: postgres::Options,
    ) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Arc::new(Backend::Postgres(postgres::Postgres::open(
                config, options,
            )?)),
        })
    }

    /// The store the settings ask for: PostgreSQL when `database_url` is
    /// set, else SQLite under the data dir.
    pub fn from_settings(settings: &crate::config::Settings) -> Result<Store, StoreError> {
        match &settings.database_url {
            Some(url) => {
                let lease = std::time::Duration::from_millis(settings.lease_ms);
                Store::open_postgres(
                    postgres::parse_url(url)?,
                    postgres::Options {
                        pool_size: settings.database_pool,
                        lease,
                        // Longer than one request, so a live sender keeps it.
                        claim: lease
                            + std::time::Duration::from_millis(settings.request_timeout_ms),
                        ..postgres::Options::default()
                    },
                )
            }
            None => Store::open(&settings.data_dir, settings.durability),
        }
    }

    /// The PostgreSQL back end, for modules with PostgreSQL-only work
    /// (notifications between replicas).
    pub fn postgres(&self) -> Option<&postgres::Postgres> {
        match &*self.backend {
            Backend::Postgres(pg) => Some(pg),
            Backend::Sqlite(_) => None,
        }
    }

    /// Finishes the writes already queued; later writes fail with
    /// [`StoreError::Closed`].
    pub fn close(&self) {
        on_backend!(self, b => b.close())
    }

    /// Whether the store answers, through the path webhooks take (the
    /// writer, for SQLite): readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self, b => b.ping().await)
    }

    // ---- inbox ---------------------------------------------------------

    /// Records a delivered webhook, committed before this returns. Events
    /// the dispatcher handles ([`Event::dispatched`]) are stored as
    /// `pending`, the others as `recorded`; a key already recorded is a [`Inserted::Duplicate`].
    pub async fn insert_event(&self, event: Event) -> Result<Inserted, StoreError> {
        on_backend!(self, b => b.insert_event(event).await)
    }

    /// Events not yet dispatched, oldest first (recovery after a restart).
    pub fn pending_events(&self) -> Result<Vec<StoredEvent>, StoreError> {
        on_backend!(self, b => b.pending_events())
    }

    /// Marks an event handled, with what each plugin did, and in the same
    /// transaction queues its actions, applies its KV writes and what it
    /// changes about its conversation (creating it in the bot's hands if
    /// new; a state change applies only from its `from` state; `archive`
    /// turns the conversation's pending actions into dead letters). An
    /// event already completed (a recovery race) changes nothing: a retried
    /// event never queues twice nor applies its state change twice.
    pub async fn complete_event(
        &self,
        seq: i64,
        conversation_id: String,
        outcomes: serde_json::Value,
        actions: Vec<NewAction>,
        kv: Vec<KvChanges>,
        update: ConversationUpdate,
    ) -> Result<Completed, StoreError> {
        on_backend!(self, b => b.complete_event(seq, conversation_id, outcomes, actions, kv, update).await)
    }

    // ---- conversations -----------------------------------------------------

    /// One conversation's state, if digibot has seen it.
    pub fn conversation_state(&self, id: &str) -> Result<Option<ConversationRecord>, StoreError> {
        on_backend!(self, b => b.conversation_state(id))
    }

    /// Conversations, most recently changed first, optionally only those in
    /// `state`.
    pub fn conversation_states(
        &self,
        state: Option<ConversationState>,
        limit: usize,
    ) -> Result<Vec<ConversationRecord>, StoreError> {
        on_backend!(self, b => b.conversation_states(state, limit))
    }

    /// Whether the Messages API gave digibot this message id when it sent
    /// something to this conversation.
    pub fn is_own_message(
        &self,
        conversation_id: &str,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        on_backend!(self, b => b.is_own_message(conversation_id, message_id))
    }

    /// Hands a conversation in a human's hands back to the bot, saying why.
    pub fn release_blocking(&self, id: &str, reason: String) -> Result<Release, StoreError> {
        on_backend!(self, b => b.release_blocking(id, reason))
    }

    /// Takes (or renews) this replica's lease on a conversation before its
    /// events are handled. `None`: another replica holds it (and is told an
    /// event waits). `Some`: the conversation's pending events, which may
    /// include some this replica never received (always empty on a single
    /// node, where the dispatcher already has them all).
    pub async fn claim_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Option<Vec<StoredEvent>>, StoreError> {
        on_backend!(self, b => b.claim_conversation(conversation_id).await)
    }

    /// Gives a conversation's lease back once its lane ran dry, unless
    /// events of it still wait: then the lease is kept and those returned.
    pub async fn release_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        on_backend!(self, b => b.release_conversation(conversation_id).await)
    }

    /// Pending events this replica should pick up although it did not
    /// receive them: in conversations it holds, or orphaned (their
    /// replica died). Oldest first, at most `limit`.
    pub async fn claimable_events(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        on_backend!(self, b => b.claimable_events(limit).await)
    }

    /// Woken when [`claimable_events`](Self::claimable_events) may have
    /// something; `None` when work only ever arrives through this process.
    pub fn inbox_wakeups(&self) -> Option<Arc<tokio::sync::Notify>> {
        on_backend!(self, b => b.inbox_wakeups())
    }

    /// Recent events, newest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<EventSummary>, StoreError> {
        on_backend!(self, b => b.recent_events(limit))
    }

    /// The conversations with events among the last
    /// [`CONVERSATION_WINDOW`] events, most recently active first, at most
    /// `limit`, with their action counts (dashboard).
    pub fn recent_conversations(
        &self,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        on_backend!(self, b => b.recent_conversations(limit))
    }

    /// One conversation's events (oldest first, with what each plugin did)
    /// and the actions they queued, with their API status, within the last
    /// [`CONVERSATION_WINDOW`] events and outbox rows.
    pub fn conversation(&self, conversation_id: &str) -> Result<ConversationDetail, StoreError> {
        on_backend!(self, b => b.conversation(conversation_id))
    }

    // ---- KV --------------------------------------------------------------

    /// A plugin's stored value for one conversation.
    pub fn kv_get(
        &self,
        plugin: &str,
        conversation_id: &str,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        on_backend!(self, b => b.kv_get(plugin, conversation_id, key))
    }

    // ---- outbox ------------------------------------------------------------

    /// The first pending action of each conversation (later actions of a
    /// conversation wait for the first one), soonest due first, at most
    /// `limit`. The sender starts the due ones and sleeps until the first
    /// that is not: one query serves both. With replicas, the heads
    /// returned are claimed for this one (its own claims included), and
    /// no other replica gets them until they are settled or the claim
    /// runs out.
    pub fn outbox_heads(&self, limit: usize) -> Result<Vec<OutboxAction>, StoreError> {
        on_backend!(self, b => b.outbox_heads(limit))
    }

    /// Counts of outbox rows by status.
    pub fn outbox_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        on_backend!(self, b => b.outbox_counts())
    }

    /// Pending actions and dead letters (for metrics).
    pub fn outbox_depth(&self) -> Result<OutboxDepth, StoreError> {
        on_backend!(self, b => b.outbox_depth())
    }
    /// Records a delivered action, with the message id Digishare gave it
    /// (kept to recognise the message when it comes back as a webhook). A
    /// delivered hand-off puts its conversation in a human's hands (if the
    /// bot had it) in the same transaction; returns whether it did.
    pub async fn mark_sent(
        &self,
        id: i64,
        status: u16,
        message_id: Option<String>,
        hand_off: bool,
    ) -> Result<bool, StoreError> {
        on_backend!(self, b => b.mark_sent(id, status, message_id, hand_off).await)
    }

    /// Records a failed attempt to be retried at `next_attempt_at` (unless
    /// the action stopped being pending meanwhile, e.g. archived).
    pub async fn mark_retry(
        &self,
        id: i64,
        next_attempt_at: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.mark_retry(id, next_attempt_at, last_status, last_error).await)
    }

    /// Turns a pending action into a dead letter, keeping the last status
    /// and body (an action archived meanwhile keeps its reason).
    pub async fn mark_dead(
        &self,
        id: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.mark_dead(id, last_status, last_error).await)
    }

    // ---- dead letters ------------------------------------------------------

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<OutboxAction>, StoreError> {
        on_backend!(self, b => b.dead_letters())
    }

    /// Puts dead letters back in the outbox (one id, or all when `None`),
    /// due now with a fresh attempt count. Returns how many.
    pub fn retry_dead_blocking(&self, id: Option<i64>) -> Result<usize, StoreError> {
        on_backend!(self, b => b.retry_dead_blocking(id))
    }

    /// Deletes a dead letter. Returns whether it existed.
    pub fn drop_dead_blocking(&self, id: i64) -> Result<bool, StoreError> {
        on_backend!(self, b => b.drop_dead_blocking(id))
    }

    // ---- retention ---------------------------------------------------------

    /// Deletes handled events and sent actions finished before `before`
    /// (ms). Pending work and dead letters are never pruned.
    pub async fn prune(&self, before: i64) -> Result<Pruned, StoreError> {
        on_backend!(self, b => b.prune(before).await)
    }
}
