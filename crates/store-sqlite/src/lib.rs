//! The SQLite back end (the embedded default): one database file under the
//! data dir. All of its SQL lives here.
//!
//! Writes go through one writer thread that commits every job waiting in its
//! queue in one transaction (group commit): a burst of webhooks costs one
//! fsync, not one each. Each job runs inside its own savepoint, so one
//! failing job does not undo its neighbours, and its caller hears back only
//! after the commit is durable. Reads use a small pool of WAL readers.
//!
//! Durability (`Durability::Full`, the default): `synchronous = FULL` in WAL
//! mode fsyncs the WAL at every commit, so an acknowledged event survives a
//! process crash *and* a power loss. `Durability::Normal` skips that fsync:
//! still safe against a process crash (kill -9), but the last commits can be
//! lost on power loss; it also moves checkpoints off the commit path (see
//! `checkpoint_loop`).

use digibot_domain::event::{ConversationState, Event};
use digibot_domain::kv::entry_bytes;
use digibot_domain::resume::{Cause, Resumed};
use digibot_store::HistoryEntry;
use digibot_store::{
    ActionCounts, Backend, CONVERSATION_WINDOW, Completed, ConversationDetail, ConversationRecord,
    ConversationSummary, ConversationUpdate, EventSummary, Inserted, JournalEntry, JournalOutcome,
    JournalRequest, Judge, Judged, KvChanges, KvScope, KvSize, KvUsage, KvWrite, NewAction,
    ORPHANED_AFTER, OutboxAction, OutboxDepth, Pruned, Release, Retention, StateChange, Store,
    StoreError, StoredEvent, TimerFired, TimerOp, TimerRecord, now_ms, parse_state,
};
mod pins;
mod rollouts;
mod states;
use states::States;

use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use tokio::sync::oneshot;

/// How hard a commit waits for the disk (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Full,
    Normal,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Durability::Full),
            "normal" => Ok(Durability::Normal),
            _ => Err("expected full or normal".into()),
        }
    }
}

/// Opens (and creates or migrates) the database under `data_dir`.
pub fn open(data_dir: &Path, durability: Durability) -> Result<Store, StoreError> {
    Ok(Store::new(Sqlite(Arc::new(Db::open(
        data_dir, durability,
    )?))))
}

/// What goes wrong inside this back end; a [`StoreError`] at its boundary.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Error> for StoreError {
    fn from(e: Error) -> StoreError {
        match e {
            Error::Sqlite(e) => StoreError::Database(e.to_string()),
            Error::Store(e) => e,
        }
    }
}

/// The metrics this back end updates (names as on `/metrics`).
fn count_round_trip() {
    metrics::counter!(digibot_store::metrics::ROUND_TRIPS).increment(1);
}

type Completion = Box<dyn FnOnce(Option<&str>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Completion + Send>;

/// The SQLite back end behind a [`Store`].
struct Sqlite(Arc<Db>);

/// The open SQLite database: its writer thread and reader pool.
struct Db {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    readers: Mutex<Vec<Connection>>,
    /// One per reader connection: reads beyond wait here (as tasks), so a
    /// burst of them takes neither more blocking threads nor more
    /// connections than there are readers.
    read_slots: tokio::sync::Semaphore,
    path: PathBuf,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Dropping the sender stops the checkpoint thread.
    checkpoint: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// Conversation states as this process last committed them.
    states: Arc<States>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    conversation_id TEXT,
    created_at TEXT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    handled_at INTEGER,
    outcomes TEXT
);
CREATE INDEX IF NOT EXISTS events_pending ON events(seq) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq INTEGER NOT NULL,
    conversation_id TEXT NOT NULL,
    plugin TEXT NOT NULL,
    -- Not unique: complete_event's status guard already queues an event's
    -- actions once, and every index here costs a write per reply.
    idempotency_key TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    done_at INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(conversation_id, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox(id) WHERE status = 'dead';
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    changed_at INTEGER NOT NULL,
    reason TEXT NOT NULL,
    channel TEXT,
    last_customer_at INTEGER,
    last_agent_at INTEGER
);
-- The ids the Messages API returned, to recognise digibot's own messages
-- when they come back as webhooks. Pruned with the outbox.
CREATE TABLE IF NOT EXISTS sent_messages (
    conversation_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    action_id INTEGER NOT NULL,
    sent_at INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, message_id)
);
CREATE TABLE IF NOT EXISTS kv (
    plugin TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (plugin, conversation_id, key)
) WITHOUT ROWID;
-- Each outbound HTTP call of a plugin's turn, recorded as it completes,
-- so that a turn that runs again replays it instead of calling again.
CREATE TABLE IF NOT EXISTS http_journal (
    event_key TEXT NOT NULL,
    plugin TEXT NOT NULL,
    call INTEGER NOT NULL,
    request TEXT NOT NULL,
    status INTEGER,
    response_headers TEXT,
    body BLOB,
    error_kind TEXT,
    refusal TEXT,
    elapsed_ms INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (event_key, plugin, call)
) WITHOUT ROWID;
"#;

/// Schema changes after the first, each applied once, in order, in a
/// transaction that also records its version (`user_version`).
const MIGRATIONS: &[(i32, &str)] = &[
    (
        2,
        r#"
-- When the conversation last had an event handled (retention of idle
-- conversations and their KV).
ALTER TABLE conversations ADD COLUMN active_at INTEGER NOT NULL DEFAULT 0;
UPDATE conversations SET active_at = MAX(changed_at, COALESCE(last_customer_at, 0), COALESCE(last_agent_at, 0));
CREATE INDEX conversations_active ON conversations(active_at);
-- How much KV each plugin holds per conversation and in all, kept with
-- every KV write (quotas read one row, not the plugin's entries).
CREATE TABLE kv_usage (
    conversation_id TEXT NOT NULL,
    plugin TEXT NOT NULL,
    keys INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, plugin)
) WITHOUT ROWID;
INSERT INTO kv_usage (conversation_id, plugin, keys, bytes)
    SELECT conversation_id, plugin, COUNT(*), SUM(length(CAST(key AS BLOB)) + length(CAST(value AS BLOB)))
    FROM kv GROUP BY conversation_id, plugin;
CREATE TABLE kv_plugin_usage (
    plugin TEXT PRIMARY KEY,
    keys INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO kv_plugin_usage (plugin, keys, bytes)
    SELECT plugin, SUM(keys), SUM(bytes) FROM kv_usage GROUP BY plugin;
"#,
    ),
    (
        3,
        r#"
-- Durable timers: one row per pending timer, a name unique per plugin and
-- conversation. A due timer leaves this table as it enters the inbox.
CREATE TABLE timers (
    id TEXT PRIMARY KEY,
    plugin TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    scheduled_at INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    cancel_on_message INTEGER NOT NULL,
    UNIQUE (conversation_id, plugin, name)
);
CREATE INDEX timers_due ON timers(due_at);
"#,
    ),
    (
        4,
        r#"
-- Messages (the customer's and the agents') handled since the
-- conversation last changed hands: a hand-back tells the plugins how many
-- passed while the human had it.
ALTER TABLE conversations ADD COLUMN messages INTEGER NOT NULL DEFAULT 0;
"#,
    ),
    (
        5,
        r#"
-- KV scopes beyond the conversation: values with a TTL (every scope), the
-- customer's id per conversation, and the `customer` and `plugin` scopes
-- (owner: the customer id, '' for the plugin's shared entries).
ALTER TABLE kv ADD COLUMN expires_at INTEGER;
CREATE INDEX kv_expiring ON kv(expires_at) WHERE expires_at IS NOT NULL;
ALTER TABLE conversations ADD COLUMN customer_id TEXT;
CREATE TABLE kv_scoped (
    plugin TEXT NOT NULL,
    scope TEXT NOT NULL,
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    expires_at INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (plugin, scope, owner, key)
) WITHOUT ROWID;
CREATE INDEX kv_scoped_expiring ON kv_scoped(expires_at) WHERE expires_at IS NOT NULL;
-- What each plugin holds per customer and in its shared scope, and when
-- it last wrote there (idle customer memory is retained that long).
CREATE TABLE kv_scoped_usage (
    plugin TEXT NOT NULL,
    scope TEXT NOT NULL,
    owner TEXT NOT NULL,
    keys INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    active_at INTEGER NOT NULL,
    PRIMARY KEY (plugin, scope, owner)
) WITHOUT ROWID;
CREATE INDEX kv_scoped_idle ON kv_scoped_usage(scope, active_at);
"#,
    ),
    (6, rollouts::MIGRATION),
    (7, pins::MIGRATION),
    (
        8,
        r#"
-- The sender's read walks pending actions in due order and stops after the
-- heads it can start: the read costs the heads it returns, not the backlog.
CREATE INDEX outbox_due ON outbox(next_attempt_at, id) WHERE status = 'pending';
"#,
    ),
];

/// Creates the first schema if the database is new, then applies the
/// migrations it lacks.
fn migrate(conn: &Connection) -> Result<(), Error> {
    conn.execute_batch(SCHEMA)?;
    let mut version: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == 0 {
        version = 1;
        conn.pragma_update(None, "user_version", version)?;
    }
    for (to, sql) in MIGRATIONS.iter().filter(|(to, _)| *to > version) {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {to};\nCOMMIT;"
        ))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
    }
    Ok(())
}

fn connect(path: &Path, durability: Durability) -> Result<Connection, Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        },
    )?;
    Ok(conn)
}

/// Runs one statement through the statement cache (no parse per call:
/// the writer runs these for every job).
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Runs `f` in a savepoint: on error only its own writes are undone.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, Error>,
) -> Result<T, Error> {
    run(conn, "SAVEPOINT job")?;
    let mark = states::mark();
    match f(conn) {
        Ok(v) => {
            run(conn, "RELEASE job")?;
            Ok(v)
        }
        Err(e) => {
            states::undo_since(mark);
            run(conn, "ROLLBACK TO job")?;
            run(conn, "RELEASE job")?;
            Err(e)
        }
    }
}

fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Job>, states: Arc<States>) {
    // Bounding the batch keeps one transaction (and its callers' latency) small.
    const MAX_BATCH: usize = 512;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = run(&conn, "BEGIN IMMEDIATE") {
            // Dropping the jobs drops their reply channels: callers get an
            // error and nothing is half-written.
            tracing::error!(error = %e, jobs = batch.len(), "store: cannot begin a transaction");
            continue;
        }
        let mut completions = Vec::with_capacity(batch.len());
        for job in batch {
            completions.push(job(&conn));
        }
        let commit = run(&conn, "COMMIT");
        if commit.is_ok() {
            metrics::counter!(digibot_store::metrics::COMMITS).increment(1);
        }
        let error = commit.as_ref().err().map(|e| e.to_string());
        if error.is_some() {
            let _ = run(&conn, "ROLLBACK");
        }
        // Before the callers hear back: what they read next is committed.
        states.apply(error.is_none());
        for c in completions {
            c(error.as_deref());
        }
    }
}

/// Copies the WAL back into the database every 250 ms, on its own
/// connection, until `stop` is dropped (with [`Durability::Normal`] only).
/// The writer's automatic checkpoint is then off: copying pages and
/// syncing the database file would otherwise happen inside a commit, and
/// every webhook of that batch would wait for it. PASSIVE never blocks the
/// writer or the readers. Measured on 2 cores: +35% acknowledged webhooks
/// with `normal`; with `full`, where every commit already waits for an
/// fsync, a concurrent checkpoint's fsync made commits slower (-10%), so
/// `full` keeps SQLite's checkpoint in the writer.
fn checkpoint_loop(conn: Connection, stop: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(std::time::Duration::from_millis(250))
    {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "store: checkpoint failed");
        }
    }
}

impl Db {
    fn open(data_dir: &Path, durability: Durability) -> Result<Db, Error> {
        // Readable by this user only: the database holds every message.
        let mut folder = std::fs::DirBuilder::new();
        folder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut folder, 0o700);
        folder
            .create(data_dir)
            .map_err(|source| StoreError::DataDir {
                path: data_dir.to_path_buf(),
                source,
            })?;
        let path = data_dir.join("digibot.db");
        let conn = connect(&path, durability)?;
        migrate(&conn)?;
        conn.set_prepared_statement_cache_capacity(64);
        let readers = (0..READERS)
            .map(|_| connect(&path, durability))
            .collect::<Result<Vec<_>, _>>()?;
        let checkpoint = if durability == Durability::Normal {
            conn.pragma_update(None, "wal_autocheckpoint", 0)?;
            let checkpointer = connect(&path, durability)?;
            let (stop_tx, stop_rx) = mpsc::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("digibot-checkpoint".into())
                .spawn(move || checkpoint_loop(checkpointer, stop_rx))
                .map_err(|e| {
                    StoreError::Commit(format!("cannot start the checkpoint thread: {e}"))
                })?;
            Some((stop_tx, thread))
        } else {
            None
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let states = Arc::new(States::default());
        let writer_states = states.clone();
        let writer = std::thread::Builder::new()
            .name("digibot-store".into())
            .spawn(move || writer_loop(conn, rx, writer_states))
            .map_err(|e| StoreError::Commit(format!("cannot start the writer thread: {e}")))?;
        Ok(Db {
            jobs: Mutex::new(Some(tx)),
            readers: Mutex::new(readers),
            read_slots: tokio::sync::Semaphore::new(READERS),
            path,
            writer: Mutex::new(Some(writer)),
            checkpoint: Mutex::new(checkpoint),
            states,
        })
    }

    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<T, Error>>, Error> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = in_savepoint(conn, f);
            Box::new(move |commit_error: Option<&str>| {
                let _ = tx.send(match commit_error {
                    None => result,
                    Some(e) => Err(StoreError::Commit(e.to_string()).into()),
                });
            })
        });
        count_round_trip();
        let jobs = self.jobs.lock().map_err(|_| StoreError::Closed)?;
        jobs.as_ref()
            .ok_or(StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Runs `f` in the next group commit and waits until it is durable.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.submit(f)?.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a reader connection (blocking).
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        count_round_trip();
        let conn = self.readers.lock().ok().and_then(|mut r| r.pop());
        let conn = match conn {
            Some(c) => c,
            None => connect(&self.path, Durability::Normal)?,
        };
        let result = f(&conn);
        if let Ok(mut readers) = self.readers.lock() {
            readers.push(conn);
        }
        result
    }

    /// A no-op job through the writer: fails when the store is closed or
    /// the writer does not answer.
    async fn ping(&self) -> Result<(), Error> {
        self.write(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }

    /// Stops the writer after the jobs already queued; later writes fail
    /// with [`StoreError::Closed`].
    fn close(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        if let Some((stop, handle)) = self.checkpoint.lock().ok().and_then(|mut c| c.take()) {
            drop(stop);
            let _ = handle.join();
        }
        if let Some(handle) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = handle.join();
        }
    }

    // ---- inbox ---------------------------------------------------------

    /// Records a delivered webhook. Events that invoke no plugin are
    /// stored as `recorded`, the others as `pending`.
    async fn insert_event(&self, event: Event) -> Result<Inserted, Error> {
        self.write(move |conn| insert_event(conn, &event)).await
    }

    /// Records an agent message handled, judged in the same transaction.
    async fn insert_judged(&self, event: Event, judge: Judge) -> Result<Judged, Error> {
        self.write(move |conn| {
            let now = now_ms();
            let Inserted::New(seq) = insert_event_as(conn, &event, "handled", now)? else {
                return Ok(Judged::Duplicate);
            };
            let id = event.conversation_id().unwrap_or_default();
            let message = match &event.kind {
                digibot_domain::event::EventKind::Message(m) => m.id.as_str(),
                _ => "",
            };
            let state = state_of(conn, id)?;
            let update = judge(state, own_message(conn, id, message)?);
            let changed = update_conversation(conn, id, &update, now)?;
            Ok(Judged::Handled {
                seq,
                from: state.unwrap_or_default(),
                update,
                changed,
            })
        })
        .await
    }

    /// Events not yet dispatched, oldest first (recovery after a restart).
    fn pending_events(&self) -> Result<Vec<StoredEvent>, Error> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare("SELECT seq, payload, received_at FROM events WHERE status = 'pending' ORDER BY seq")?;
            stored_events(stmt.query([])?)
        })
    }

    /// One conversation's pending events, oldest first.
    fn pending_in(&self, conversation_id: &str) -> Result<Vec<StoredEvent>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, payload, received_at FROM events
                 WHERE status = 'pending' AND conversation_id = ?1 ORDER BY seq",
            )?;
            stored_events(stmt.query([conversation_id])?)
        })
    }

    /// The pending event recorded under `key`, if any.
    fn pending_event(&self, key: &str) -> Result<Option<StoredEvent>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, payload, received_at FROM events WHERE key = ?1 AND status = 'pending'",
            )?;
            Ok(stored_events(stmt.query([key])?)?.pop())
        })
    }

    /// The event recorded under `key`, whatever its status.
    fn event(&self, key: &str) -> Result<Option<StoredEvent>, Error> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare_cached("SELECT seq, payload, received_at FROM events WHERE key = ?1")?;
            Ok(stored_events(stmt.query([key])?)?.pop())
        })
    }

    /// Pending events received before `before` (ms), oldest first.
    fn pending_before(&self, before: i64, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        self.read(|conn| {
            // By seq, the order they arrived in (and that of the partial
            // index): `received_at` grows with it.
            let mut stmt = conn.prepare_cached(
                "SELECT seq, payload, received_at FROM events
                 WHERE status = 'pending' AND received_at < ?1 ORDER BY seq LIMIT ?2",
            )?;
            stored_events(stmt.query(params![before, limit as i64])?)
        })
    }

    /// Marks an event handled, with what each plugin did, and in the same
    /// transaction queues its actions, applies its KV writes and what it
    /// changes about its conversation. An event already completed (a
    /// recovery race) changes nothing: a retried event never applies its
    /// state change twice.
    async fn complete_event(
        &self,
        seq: i64,
        conversation_id: String,
        outcomes: serde_json::Value,
        actions: Vec<NewAction>,
        kv: Vec<KvChanges>,
        update: ConversationUpdate,
    ) -> Result<Completed, Error> {
        self.write(move |conn| {
            let now = now_ms();
            if let Some(expected) = update.expect
                && !conversation_id.is_empty()
                && state_of(conn, &conversation_id)?.unwrap_or_default() != expected
            {
                states::touch(&conversation_id);
                return Ok(Completed {
                    stale: true,
                    ..Completed::default()
                });
            }
            let changed = conn
                .prepare_cached(
                    "UPDATE events SET status = 'handled', handled_at = ?2, outcomes = ?3
                     WHERE seq = ?1 AND status = 'pending'",
                )?
                .execute(params![seq, now, outcomes.to_string()])?;
            if changed == 0 {
                return Ok(Completed::default());
            }
            let mut done = Completed {
                completed: true,
                ..Completed::default()
            };
            if !conversation_id.is_empty() {
                done.changed = update_conversation(conn, &conversation_id, &update, now)?;
                if let Some(error) = &update.archive {
                    done.archived = conn
                        .prepare_cached(
                            "UPDATE outbox SET status = 'dead', last_status = NULL, last_error = ?2, done_at = ?3
                             WHERE conversation_id = ?1 AND status = 'pending'",
                        )?
                        .execute(params![conversation_id, error, now])?;
                }
            }
            let mut insert = conn.prepare_cached(
                "INSERT INTO outbox (event_seq, conversation_id, plugin, idempotency_key, method, path, body, status, next_attempt_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?8)
",
            )?;
            for a in &actions {
                done.queued += insert.execute(params![
                    seq,
                    conversation_id,
                    a.plugin,
                    a.idempotency_key,
                    a.method,
                    a.path,
                    a.body.to_string(),
                    now
                ])?;
            }
            for change in &kv {
                apply_kv(conn, change, now)?;
            }
            if !conversation_id.is_empty() {
                apply_timers(conn, &conversation_id, &update, now)?;
            }
            Ok(done)
        })
        .await
    }

    // ---- conversations -----------------------------------------------------

    /// One conversation's state, if digibot has seen it.
    fn conversation_state(&self, id: &str) -> Result<Option<ConversationRecord>, Error> {
        self.read(|conn| conversation_state(conn, id))
    }

    /// Conversations, most recently changed first, optionally only those in
    /// `state`.
    fn conversation_states(
        &self,
        state: Option<ConversationState>,
        limit: usize,
    ) -> Result<Vec<ConversationRecord>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {CONVERSATION_COLUMNS} FROM conversations
                 WHERE ?1 IS NULL OR state = ?1 ORDER BY changed_at DESC, id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(
                params![state.map(|s| s.as_str()), limit as i64],
                conversation_row,
            )?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Whether the Messages API gave digibot this message id when it sent
    /// something to this conversation.
    fn is_own_message(&self, conversation_id: &str, message_id: &str) -> Result<bool, Error> {
        self.read(|conn| own_message(conn, conversation_id, message_id))
    }

    /// Hands a conversation in a human's hands back to the bot, saying why.
    async fn release(&self, id: &str, reason: String) -> Result<Release, Error> {
        let id = id.to_string();
        self.write(move |conn| {
            // Whatever it finds: a caller that asked on a stale cached
            // state (another process released it) reads afresh next.
            states::touch(&id);
            let Some(state) = state_of(conn, &id)? else {
                return Ok(Release::Unknown);
            };
            let change = StateChange {
                from: Some(ConversationState::Human),
                to: ConversationState::Bot,
                reason,
            };
            if change_state(conn, &id, &change, now_ms())? {
                Ok(Release::Released)
            } else {
                Ok(Release::NotHuman(state))
            }
        })
        .await
    }

    /// Recent events, newest first.
    fn recent_events(&self, limit: usize) -> Result<Vec<EventSummary>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT seq, key, name, conversation_id, status, received_at, handled_at, outcomes
                 FROM events ORDER BY seq DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], event_summary)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// The conversations with events among the last
    /// [`CONVERSATION_WINDOW`] events, most recently active first, at most
    /// `limit`, with their action counts (dashboard).
    fn recent_conversations(&self, limit: usize) -> Result<Vec<ConversationSummary>, Error> {
        self.read(|conn| {
            // Bounded by primary-key ranges: no conversation index to
            // maintain on every webhook for a page an operator opens.
            let mut stmt = conn.prepare(
                "SELECT conversation_id, COUNT(*), MIN(received_at), MAX(received_at),
                        SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END), MAX(seq)
                 FROM events
                 WHERE seq > (SELECT COALESCE(MAX(seq), 0) FROM events) - ?1
                   AND conversation_id IS NOT NULL
                 GROUP BY conversation_id ORDER BY MAX(seq) DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![CONVERSATION_WINDOW, limit as i64], |r| {
                let summary = ConversationSummary {
                    conversation_id: r.get(0)?,
                    events: r.get(1)?,
                    first_event_at: r.get(2)?,
                    last_event_at: r.get(3)?,
                    pending_events: r.get(4)?,
                    last_event: String::new(),
                    actions: ActionCounts::default(),
                    state: None,
                };
                Ok((summary, r.get::<_, i64>(5)?))
            })?;
            let mut conversations = rows.collect::<Result<Vec<_>, _>>()?;
            let mut last = conn.prepare_cached("SELECT name FROM events WHERE seq = ?1")?;
            let mut counts = conn.prepare_cached(
                "SELECT status, COUNT(*) FROM outbox
                 WHERE id > (SELECT COALESCE(MAX(id), 0) FROM outbox) - ?1 AND conversation_id = ?2
                 GROUP BY status",
            )?;
            for (c, last_seq) in &mut conversations {
                c.last_event = last.query_row([*last_seq], |r| r.get(0))?;
                c.state = conversation_state(conn, &c.conversation_id)?;
                let rows = counts
                    .query_map(params![CONVERSATION_WINDOW, c.conversation_id], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                    })?;
                for row in rows {
                    let (status, n) = row?;
                    match status.as_str() {
                        "sent" => c.actions.sent = n,
                        "pending" => c.actions.pending = n,
                        "dead" => c.actions.dead = n,
                        _ => {}
                    }
                }
            }
            Ok(conversations.into_iter().map(|(c, _)| c).collect())
        })
    }

    /// One conversation's events (oldest first, with what each plugin did)
    /// and the actions they queued, with their API status, within the last
    /// [`CONVERSATION_WINDOW`] events and actions.
    fn conversation(&self, conversation_id: &str) -> Result<ConversationDetail, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT seq, key, name, conversation_id, status, received_at, handled_at, outcomes
                 FROM events
                 WHERE seq > (SELECT COALESCE(MAX(seq), 0) FROM events) - ?1 AND conversation_id = ?2
                 ORDER BY seq",
            )?;
            let events = stmt
                .query_map(params![CONVERSATION_WINDOW, conversation_id], event_summary)?
                .collect::<Result<Vec<_>, _>>()?;
            let mut stmt = conn.prepare(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox
                 WHERE id > (SELECT COALESCE(MAX(id), 0) FROM outbox) - ?1 AND conversation_id = ?2
                 ORDER BY id"
            ))?;
            let actions = stmt
                .query_map(params![CONVERSATION_WINDOW, conversation_id], outbox_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ConversationDetail {
                conversation_id: conversation_id.to_string(),
                events,
                actions,
                state: conversation_state(conn, conversation_id)?,
                timers: pending_timers(conn, conversation_id)?,
            })
        })
    }

    // ---- timers ------------------------------------------------------------

    /// Turns due timers into inbox events; see [`Backend::fire_due_timers`].
    async fn fire_due_timers(&self, now: i64, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {TIMER_COLUMNS} FROM timers t
                 WHERE t.due_at <= ?1 AND COALESCE(
                     (SELECT state FROM conversations c WHERE c.id = t.conversation_id), 'bot') = 'bot'
                 ORDER BY t.due_at, t.id LIMIT ?2"
            ))?;
            let timers = stmt
                .query_map(params![now, limit as i64], timer_row)?
                .collect::<Result<Vec<_>, _>>()?;
            let mut fired = Vec::new();
            for t in timers {
                conn.prepare_cached("DELETE FROM timers WHERE id = ?1")?
                    .execute([&t.id])?;
                let event = TimerFired {
                    id: t.id,
                    plugin: t.plugin,
                    conversation_id: t.conversation_id,
                    name: t.name,
                    payload: t.payload,
                    scheduled_at: t.scheduled_at,
                    due_at: t.due_at,
                    outside_window: false,
                }
                .into_event();
                if let Inserted::New(seq) = insert_event(conn, &event)? {
                    fired.push(StoredEvent {
                        seq,
                        event,
                        received_at: now_ms(),
                    });
                }
            }
            Ok(fired)
        })
        .await
    }

    /// The conversation's last messages; see [`Backend::history`].
    fn history(&self, conversation_id: &str, limit: usize) -> Result<Vec<HistoryEntry>, Error> {
        let limit = limit.min(digibot_domain::history::HISTORY_MAX);
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq, payload, received_at FROM events
                 WHERE conversation_id = ?1 AND name = 'live_chat.new_message'
                 ORDER BY seq DESC LIMIT ?2",
            )?;
            // Twice the limit: some may be echoes of digibot's own.
            let received =
                stored_events(stmt.query(params![conversation_id, (limit * 2) as i64])?)?
                    .into_iter()
                    .map(|s| (s.event, s.received_at, s.seq))
                    .collect();
            let mut stmt = conn.prepare_cached(
                "SELECT message_id FROM sent_messages WHERE conversation_id = ?1
                 ORDER BY sent_at DESC LIMIT ?2",
            )?;
            let own = stmt
                .query_map(params![conversation_id, (limit * 4) as i64], |r| r.get(0))?
                .collect::<Result<std::collections::HashSet<String>, _>>()?;
            let mut stmt = conn.prepare_cached(
                "SELECT body, created_at, event_seq FROM outbox
                 WHERE conversation_id = ?1 AND status IN ('sent', 'pending')
                 ORDER BY id DESC LIMIT ?2",
            )?;
            let requests = stmt
                .query_map(params![conversation_id, limit as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .filter_map(|(body, at, seq)| Some((serde_json::from_str(&body).ok()?, at, seq)))
                .collect();
            Ok(digibot_domain::history::assemble(
                received, &own, requests, limit,
            ))
        })
    }

    /// Whether a timer is due at `now`: most polls find none, and need no
    /// write.
    fn any_timer_due(&self, now: i64) -> Result<bool, Error> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM timers WHERE due_at <= ?1 LIMIT 1")?
                .query_row([now], |r| r.get::<_, i64>(0))
                .optional()?
                .is_some())
        })
    }

    /// The names of a plugin's pending timers in one conversation.
    fn timer_names(&self, plugin: &str, conversation_id: &str) -> Result<Vec<String>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT name FROM timers WHERE plugin = ?1 AND conversation_id = ?2 ORDER BY name",
            )?;
            let rows = stmt.query_map(params![plugin, conversation_id], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    // ---- KV --------------------------------------------------------------

    /// A plugin's stored value in a scope, unless its TTL ran out.
    fn kv_get_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Result<Option<String>, Error> {
        let now = now_ms();
        self.read(|conn| {
            Ok(match scope {
                KvScope::Conversation => conn
                    .prepare_cached(
                        "SELECT value FROM kv WHERE plugin = ?1 AND conversation_id = ?2 AND key = ?3
                           AND (expires_at IS NULL OR expires_at > ?4)",
                    )?
                    .query_row(params![plugin, conversation_id, key, now], |r| r.get(0))
                    .optional()?,
                _ => conn
                    .prepare_cached(
                        "SELECT value FROM kv_scoped WHERE plugin = ?1 AND scope = ?2 AND owner = ?3 AND key = ?4
                           AND (expires_at IS NULL OR expires_at > ?5)",
                    )?
                    .query_row(
                        params![plugin, scope.scope().as_str(), scope.owner(), key, now],
                        |r| r.get(0),
                    )
                    .optional()?,
            })
        })
    }

    /// How much KV a plugin holds in one scope and in all.
    fn kv_usage_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
    ) -> Result<KvUsage, Error> {
        let usage = |r: &rusqlite::Row<'_>| {
            Ok(KvUsage {
                scope: KvSize {
                    keys: r.get(0)?,
                    bytes: r.get(1)?,
                },
                plugin: KvSize {
                    keys: r.get(2)?,
                    bytes: r.get(3)?,
                },
            })
        };
        self.read(|conn| {
            Ok(match scope {
                KvScope::Conversation => conn
                    .prepare_cached(
                        "SELECT COALESCE((SELECT keys FROM kv_usage WHERE conversation_id = ?2 AND plugin = ?1), 0),
                                COALESCE((SELECT bytes FROM kv_usage WHERE conversation_id = ?2 AND plugin = ?1), 0),
                                COALESCE((SELECT keys FROM kv_plugin_usage WHERE plugin = ?1), 0),
                                COALESCE((SELECT bytes FROM kv_plugin_usage WHERE plugin = ?1), 0)",
                    )?
                    .query_row(params![plugin, conversation_id], usage)?,
                _ => conn
                    .prepare_cached(
                        "SELECT COALESCE((SELECT keys FROM kv_scoped_usage WHERE plugin = ?1 AND scope = ?2 AND owner = ?3), 0),
                                COALESCE((SELECT bytes FROM kv_scoped_usage WHERE plugin = ?1 AND scope = ?2 AND owner = ?3), 0),
                                COALESCE((SELECT keys FROM kv_plugin_usage WHERE plugin = ?1), 0),
                                COALESCE((SELECT bytes FROM kv_plugin_usage WHERE plugin = ?1), 0)",
                    )?
                    .query_row(params![plugin, scope.scope().as_str(), scope.owner()], usage)?,
            })
        })
    }

    // ---- outbox ------------------------------------------------------------

    /// The first pending action of each conversation (later actions of a
    /// conversation wait for the first one), soonest due first, at most
    /// `limit`. The sender starts the due ones and sleeps until the first
    /// that is not: one query serves both.
    fn outbox_heads(&self, limit: usize) -> Result<Vec<OutboxAction>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(&OUTBOX_HEADS_SQL)?;
            let rows = stmt.query_map([], outbox_row)?;
            Ok(rows.take(limit).collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Counts of outbox rows by status.
    fn outbox_counts(&self) -> Result<Vec<(String, i64)>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare("SELECT status, COUNT(*) FROM outbox GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Pending actions and dead letters, counted on their partial indexes
    /// (sent rows are never scanned).
    fn outbox_depth(&self) -> Result<OutboxDepth, Error> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT (SELECT COUNT(*) FROM outbox WHERE status = 'pending'),
                            (SELECT COUNT(*) FROM outbox WHERE status = 'dead')",
                )?
                .query_row([], |r| {
                    Ok(OutboxDepth {
                        pending: r.get(0)?,
                        dead: r.get(1)?,
                    })
                })?)
        })
    }

    /// Records a delivered action, with the message id Digishare gave it.
    /// A delivered hand-off puts its conversation in a human's hands (if
    /// the bot had it), in the same transaction; returns whether it did.
    async fn mark_sent(
        &self,
        id: i64,
        status: u16,
        message_id: Option<String>,
        hand_off: bool,
    ) -> Result<bool, Error> {
        self.write(move |conn| {
            let now = now_ms();
            let conversation: Option<String> = conn
                .prepare_cached(
                    "UPDATE outbox SET status = 'sent', attempts = attempts + 1, last_status = ?2, last_error = NULL, done_at = ?3
                     WHERE id = ?1 RETURNING conversation_id",
                )?
                .query_row(params![id, status, now], |r| r.get(0))
                .optional()?;
            let Some(conversation) = conversation else {
                return Ok(false);
            };
            if let Some(message_id) = message_id {
                conn.prepare_cached(
                    "INSERT INTO sent_messages (conversation_id, message_id, action_id, sent_at)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (conversation_id, message_id) DO NOTHING",
                )?
                .execute(params![conversation, message_id, id, now])?;
            }
            if !hand_off {
                return Ok(false);
            }
            let change = StateChange {
                from: Some(ConversationState::Bot),
                to: ConversationState::Human,
                reason: format!("hand-off delivered (action {id})"),
            };
            update_conversation(
                conn,
                &conversation,
                &ConversationUpdate {
                    change: Some(change),
                    ..ConversationUpdate::default()
                },
                now,
            )
        })
        .await
    }

    /// Records a failed attempt to be retried at `next_attempt_at`.
    async fn mark_retry(
        &self,
        id: i64,
        next_attempt_at: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), Error> {
        self.write(move |conn| {
            conn.prepare_cached(
                // Only while pending: an action archived during its attempt
                // stays a dead letter.
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2, last_status = ?3, last_error = ?4 WHERE id = ?1 AND status = 'pending'",
            )?
            .execute(params![id, next_attempt_at, last_status, last_error])?;
            Ok(())
        })
        .await
    }

    /// Turns an action into a dead letter, keeping the last status and body.
    async fn mark_dead(
        &self,
        id: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), Error> {
        self.write(move |conn| {
            conn.prepare_cached(
                // An action archived during its attempt keeps its reason.
                "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_status = ?2, last_error = ?3, done_at = ?4 WHERE id = ?1 AND status = 'pending'",
            )?
            .execute(params![id, last_status, last_error, now_ms()])?;
            Ok(())
        })
        .await
    }

    // ---- dead letters ------------------------------------------------------

    /// Every dead letter, oldest first.
    fn dead_letters(&self) -> Result<Vec<OutboxAction>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {OUTBOX_COLUMNS} FROM outbox WHERE status = 'dead' ORDER BY id"
            ))?;
            let rows = stmt.query_map([], outbox_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Puts dead letters back in the outbox (one id, or all when `None`),
    /// due now with a fresh attempt count. Returns how many.
    async fn retry_dead(&self, id: Option<i64>) -> Result<usize, Error> {
        self.write(move |conn| {
            let sql = "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?2, done_at = NULL
                       WHERE status = 'dead' AND (?1 IS NULL OR id = ?1)";
            Ok(conn.execute(sql, params![id, now_ms()])?)
        })
        .await
    }

    /// Deletes a dead letter. Returns whether it existed.
    async fn drop_dead(&self, id: i64) -> Result<bool, Error> {
        self.write(move |conn| {
            Ok(conn.execute("DELETE FROM outbox WHERE status = 'dead' AND id = ?1", [id])? > 0)
        })
        .await
    }

    // ---- outbound call journal ---------------------------------------------

    async fn record_call(&self, entry: JournalEntry) -> Result<(), Error> {
        self.write(move |conn| {
            let request = serde_json::to_string(&entry.request)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let (status, headers, body, kind, message) = match entry.outcome {
                JournalOutcome::Response {
                    status,
                    headers,
                    body,
                } => (
                    Some(status),
                    Some(serde_json::to_string(&headers).unwrap_or_default()),
                    Some(body),
                    None,
                    None,
                ),
                JournalOutcome::Failed { refusal } => (
                    None,
                    None,
                    None,
                    Some(refusal.kind().to_string()),
                    Some(serde_json::to_string(&refusal).unwrap_or_default()),
                ),
            };
            conn.prepare_cached(
                "INSERT OR REPLACE INTO http_journal
                   (event_key, plugin, call, request, status, response_headers, body, error_kind, refusal, elapsed_ms, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                entry.event_key,
                entry.plugin,
                entry.call,
                request,
                status,
                headers,
                body,
                kind,
                message,
                entry.elapsed_ms as i64,
                entry.recorded_at
            ])?;
            Ok(())
        })
        .await
    }

    fn journal(&self, event_key: &str, plugin: Option<&str>) -> Result<Vec<JournalEntry>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT event_key, plugin, call, request, status, response_headers, body, error_kind, refusal, elapsed_ms, recorded_at
                 FROM http_journal WHERE event_key = ?1 AND (?2 IS NULL OR plugin = ?2)
                 ORDER BY plugin, call",
            )?;
            let rows = stmt.query_map(params![event_key, plugin], journal_row)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row??);
            }
            Ok(out)
        })
    }

    // ---- retention ---------------------------------------------------------

    /// Deletes what `retention` says is old enough, in batches, each its
    /// own transaction, so webhooks keep flowing; in key order, where the
    /// oldest rows are, so events and actions need no time index.
    async fn prune(&self, retention: Retention) -> Result<Pruned, StoreError> {
        const BATCH: usize = 5000;
        let db = self;
        digibot_store::prune_in_batches(BATCH, move || async move {
            Ok(db
                .write(move |conn| prune_batch(conn, retention, BATCH as i64))
                .await?)
        })
        .await
    }
}

/// One batch of [`Db::prune`], at most `limit` rows of each kind.
fn prune_batch(conn: &Connection, retention: Retention, limit: i64) -> Result<Pruned, Error> {
    let mut pruned = Pruned::default();
    if let Some(before) = retention.finished_before {
        pruned.events = conn.execute(
            "DELETE FROM events WHERE seq IN (
               SELECT seq FROM events
               WHERE status <> 'pending' AND COALESCE(handled_at, received_at) < ?1
                 AND seq NOT IN (SELECT event_seq FROM outbox WHERE status = 'pending'
                                 UNION SELECT event_seq FROM outbox WHERE status = 'dead')
               ORDER BY seq LIMIT ?2)",
            params![before, limit],
        )?;
        pruned.actions = conn.execute(
            "DELETE FROM outbox WHERE id IN (
               SELECT id FROM outbox WHERE status = 'sent' AND done_at < ?1
               ORDER BY id LIMIT ?2)",
            params![before, limit],
        )?;
        // Echoes come back within seconds: ids as old as the pruned
        // actions are of no use.
        conn.prepare_cached("DELETE FROM sent_messages WHERE sent_at < ?1")?
            .execute([before])?;
        pruned.calls = conn.execute(
            "DELETE FROM http_journal WHERE (event_key, plugin, call) IN (
               SELECT j.event_key, j.plugin, j.call FROM http_journal j
               WHERE j.recorded_at < ?1
                 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.key = j.event_key AND e.status = 'pending')
               LIMIT ?2)",
            params![before, limit],
        )?;
    }
    if let Some(before) = retention.dead_before {
        pruned.dead_letters = conn.execute(
            "DELETE FROM outbox WHERE id IN (
               SELECT id FROM outbox WHERE status = 'dead' AND done_at < ?1
               ORDER BY id LIMIT ?2)",
            params![before, limit],
        )?;
    }
    if let Some(before) = retention.idle_before {
        let idle: Vec<String> = conn
            .prepare_cached(
                // A pending timer is work still to come: not idle.
                "SELECT id FROM conversations c WHERE active_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM events e WHERE e.status = 'pending' AND e.conversation_id = c.id)
                   AND NOT EXISTS (SELECT 1 FROM timers t WHERE t.conversation_id = c.id)
                 ORDER BY active_at LIMIT ?2",
            )?
            .query_map(params![before, limit], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        for id in &idle {
            pruned.kv_entries += forget_conversation(conn, id)?;
        }
        pruned.conversations = idle.len();
    }
    if let Some(before) = retention.expired_before {
        pruned.kv_expired = prune_expired(conn, before, limit)?;
    }
    if let Some(before) = retention.customer_idle_before {
        pruned.customer_entries = forget_idle_customers(conn, before, limit)?;
    }
    Ok(pruned)
}

/// Deletes up to `limit` KV values of each table whose TTL ran out before
/// `before`, keeping the usage counts right; returns how many went.
fn prune_expired(conn: &Connection, before: i64, limit: i64) -> Result<usize, Error> {
    let expired: Vec<(String, String, String, i64)> = conn
        .prepare_cached(
            "SELECT plugin, conversation_id, key, length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))
             FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2",
        )?
        .query_map(params![before, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    for (plugin, conversation, key, size) in &expired {
        conn.prepare_cached(
            "DELETE FROM kv WHERE plugin = ?1 AND conversation_id = ?2 AND key = ?3",
        )?
        .execute(params![plugin, conversation, key])?;
        conn.prepare_cached(
            "UPDATE kv_usage SET keys = keys - 1, bytes = bytes - ?3 WHERE conversation_id = ?1 AND plugin = ?2",
        )?
        .execute(params![conversation, plugin, size])?;
        add_plugin_usage(conn, plugin, -1, -size)?;
    }
    let scoped: Vec<(String, String, String, String, i64)> = conn
        .prepare_cached(
            "SELECT plugin, scope, owner, key, length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))
             FROM kv_scoped WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2",
        )?
        .query_map(params![before, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<Result<_, _>>()?;
    for (plugin, scope, owner, key, size) in &scoped {
        conn.prepare_cached(
            "DELETE FROM kv_scoped WHERE plugin = ?1 AND scope = ?2 AND owner = ?3 AND key = ?4",
        )?
        .execute(params![plugin, scope, owner, key])?;
        conn.prepare_cached(
            "UPDATE kv_scoped_usage SET keys = keys - 1, bytes = bytes - ?4 WHERE plugin = ?1 AND scope = ?2 AND owner = ?3",
        )?
        .execute(params![plugin, scope, owner, size])?;
        add_plugin_usage(conn, plugin, -1, -size)?;
    }
    Ok(expired.len() + scoped.len())
}

/// Forgets up to `limit` (plugin, customer) memories last written before
/// `before`; returns the entries that went.
fn forget_idle_customers(conn: &Connection, before: i64, limit: i64) -> Result<usize, Error> {
    let idle: Vec<(String, String, i64, i64)> = conn
        .prepare_cached(
            "SELECT plugin, owner, keys, bytes FROM kv_scoped_usage
             WHERE scope = 'customer' AND active_at < ?1 ORDER BY active_at LIMIT ?2",
        )?
        .query_map(params![before, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut entries = 0;
    for (plugin, owner, keys, bytes) in &idle {
        entries += conn
            .prepare_cached(
                "DELETE FROM kv_scoped WHERE plugin = ?1 AND scope = 'customer' AND owner = ?2",
            )?
            .execute(params![plugin, owner])?;
        conn.prepare_cached(
            "DELETE FROM kv_scoped_usage WHERE plugin = ?1 AND scope = 'customer' AND owner = ?2",
        )?
        .execute(params![plugin, owner])?;
        add_plugin_usage(conn, plugin, -keys, -bytes)?;
    }
    Ok(entries)
}

/// Deletes a conversation's state and every plugin's KV in it, keeping
/// the plugins' usage totals right; returns the KV entries deleted.
fn forget_conversation(conn: &Connection, id: &str) -> Result<usize, Error> {
    let usage: Vec<(String, i64, i64)> = conn
        .prepare_cached("SELECT plugin, keys, bytes FROM kv_usage WHERE conversation_id = ?1")?
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut entries = 0;
    for (plugin, keys, bytes) in usage {
        entries += conn
            .prepare_cached("DELETE FROM kv WHERE plugin = ?1 AND conversation_id = ?2")?
            .execute(params![plugin, id])?;
        add_plugin_usage(conn, &plugin, -keys, -bytes)?;
    }
    conn.prepare_cached("DELETE FROM kv_usage WHERE conversation_id = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM pins WHERE conversation_id = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM conversations WHERE id = ?1")?
        .execute([id])?;
    states::touch(id);
    Ok(entries)
}

/// Reader connections, and so reads running at once.
const READERS: usize = 4;

/// Runs a read of `db` on a blocking thread (SQLite reads block), once one
/// of the [`READERS`] is free.
async fn reading<T: Send + 'static>(
    db: &Arc<Db>,
    f: impl FnOnce(&Db) -> Result<T, Error> + Send + 'static,
) -> Result<T, StoreError> {
    let _slot = db
        .read_slots
        .acquire()
        .await
        .map_err(|_| StoreError::Closed)?;
    let db = db.clone();
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(|e| StoreError::Commit(format!("store read thread: {e}")))?
        .map_err(Into::into)
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    fn close(&self) {
        self.0.close()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.0.ping().await?)
    }

    async fn insert_event(&self, event: Event) -> Result<Inserted, StoreError> {
        Ok(self.0.insert_event(event).await?)
    }

    async fn insert_judged(&self, event: Event, judge: Judge) -> Result<Judged, StoreError> {
        Ok(self.0.insert_judged(event, judge).await?)
    }

    async fn pending_events(&self) -> Result<Vec<StoredEvent>, StoreError> {
        reading(&self.0, |db| db.pending_events()).await
    }

    async fn pending_in(&self, conversation_id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let c = conversation_id.to_string();
        reading(&self.0, move |db| db.pending_in(&c)).await
    }

    async fn pending_event(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        let key = key.to_string();
        reading(&self.0, move |db| db.pending_event(&key)).await
    }

    async fn event(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        let key = key.to_string();
        reading(&self.0, move |db| db.event(&key)).await
    }

    async fn complete_event(
        &self,
        seq: i64,
        conversation_id: String,
        outcomes: serde_json::Value,
        actions: Vec<NewAction>,
        kv: Vec<KvChanges>,
        update: ConversationUpdate,
    ) -> Result<Completed, StoreError> {
        Ok(self
            .0
            .complete_event(seq, conversation_id, outcomes, actions, kv, update)
            .await?)
    }

    async fn conversation_state(&self, id: &str) -> Result<Option<ConversationRecord>, StoreError> {
        let id = id.to_string();
        reading(&self.0, move |db| db.conversation_state(&id)).await
    }

    /// From what this process's writer last committed when it has it; a
    /// read fills it otherwise (see `states`).
    async fn cached_conversation_state(
        &self,
        id: &str,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        let states = self.0.states.clone();
        if let Some(record) = states.get(id) {
            return Ok(Some(record));
        }
        let generation = states.generation();
        let record = self.conversation_state(id).await?;
        if let Some(record) = &record {
            states.fill(generation, record);
        }
        Ok(record)
    }

    async fn conversation_states(
        &self,
        state: Option<ConversationState>,
        limit: usize,
    ) -> Result<Vec<ConversationRecord>, StoreError> {
        reading(&self.0, move |db| db.conversation_states(state, limit)).await
    }

    async fn is_own_message(
        &self,
        conversation_id: &str,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        let (c, m) = (conversation_id.to_string(), message_id.to_string());
        reading(&self.0, move |db| db.is_own_message(&c, &m)).await
    }

    async fn release(&self, id: &str, reason: String) -> Result<Release, StoreError> {
        Ok(self.0.release(id, reason).await?)
    }

    /// One node: every conversation is ours, and the dispatcher already
    /// has every pending event.
    async fn claim_conversation(
        &self,
        _conversation_id: &str,
    ) -> Result<Option<Vec<StoredEvent>>, StoreError> {
        Ok(Some(Vec::new()))
    }

    async fn release_conversation(
        &self,
        _conversation_id: &str,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(Vec::new())
    }

    /// One node: no work arrives through another process, but an event
    /// pending for longer than [`ORPHANED_AFTER`] may have lost its way to
    /// the dispatcher.
    async fn claimable_events(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let before = now_ms() - ORPHANED_AFTER.as_millis() as i64;
        reading(&self.0, move |db| db.pending_before(before, limit)).await
    }

    fn inbox_wakeups(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    async fn recent_events(&self, limit: usize) -> Result<Vec<EventSummary>, StoreError> {
        reading(&self.0, move |db| db.recent_events(limit)).await
    }

    async fn recent_conversations(
        &self,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        reading(&self.0, move |db| db.recent_conversations(limit)).await
    }

    async fn conversation(&self, conversation_id: &str) -> Result<ConversationDetail, StoreError> {
        let id = conversation_id.to_string();
        reading(&self.0, move |db| db.conversation(&id)).await
    }

    async fn fire_due_timers(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if !reading(&self.0, move |db| db.any_timer_due(now)).await? {
            return Ok(Vec::new());
        }
        Ok(self.0.fire_due_timers(now, limit).await?)
    }

    async fn history(
        &self,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let c = conversation_id.to_string();
        reading(&self.0, move |db| db.history(&c, limit)).await
    }

    async fn timer_names(
        &self,
        plugin: &str,
        conversation_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let (p, c) = (plugin.to_string(), conversation_id.to_string());
        reading(&self.0, move |db| db.timer_names(&p, &c)).await
    }

    async fn kv_get_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        let (p, c, s, k) = (
            plugin.to_string(),
            conversation_id.to_string(),
            scope.clone(),
            key.to_string(),
        );
        reading(&self.0, move |db| db.kv_get_in(&p, &c, &s, &k)).await
    }

    async fn kv_usage_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
    ) -> Result<KvUsage, StoreError> {
        let (p, c, s) = (
            plugin.to_string(),
            conversation_id.to_string(),
            scope.clone(),
        );
        reading(&self.0, move |db| db.kv_usage_in(&p, &c, &s)).await
    }

    async fn outbox_heads(&self, limit: usize) -> Result<Vec<OutboxAction>, StoreError> {
        reading(&self.0, move |db| db.outbox_heads(limit)).await
    }

    async fn outbox_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        reading(&self.0, |db| db.outbox_counts()).await
    }

    async fn outbox_depth(&self) -> Result<OutboxDepth, StoreError> {
        reading(&self.0, |db| db.outbox_depth()).await
    }

    async fn mark_sent(
        &self,
        id: i64,
        status: u16,
        message_id: Option<String>,
        hand_off: bool,
    ) -> Result<bool, StoreError> {
        Ok(self.0.mark_sent(id, status, message_id, hand_off).await?)
    }

    async fn mark_retry(
        &self,
        id: i64,
        next_attempt_at: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), StoreError> {
        Ok(self
            .0
            .mark_retry(id, next_attempt_at, last_status, last_error)
            .await?)
    }

    async fn mark_dead(
        &self,
        id: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), StoreError> {
        Ok(self.0.mark_dead(id, last_status, last_error).await?)
    }

    async fn dead_letters(&self) -> Result<Vec<OutboxAction>, StoreError> {
        reading(&self.0, |db| db.dead_letters()).await
    }

    async fn retry_dead(&self, id: Option<i64>) -> Result<usize, StoreError> {
        Ok(self.0.retry_dead(id).await?)
    }

    async fn drop_dead(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self.0.drop_dead(id).await?)
    }

    async fn record_call(&self, entry: JournalEntry) -> Result<(), StoreError> {
        Ok(self.0.record_call(entry).await?)
    }

    async fn journal(
        &self,
        event_key: &str,
        plugin: Option<&str>,
    ) -> Result<Vec<JournalEntry>, StoreError> {
        let (event_key, plugin) = (event_key.to_string(), plugin.map(str::to_string));
        reading(&self.0, move |db| db.journal(&event_key, plugin.as_deref())).await
    }

    async fn prune(&self, retention: Retention) -> Result<Pruned, StoreError> {
        self.0.prune(retention).await
    }

    async fn start_rollout(
        &self,
        rollout: digibot_store::RolloutRecord,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        Ok(self.0.start_rollout(rollout, bytes).await?)
    }

    async fn end_rollout(
        &self,
        plugin: &str,
        id: &str,
        state: &str,
        reason: Option<String>,
    ) -> Result<bool, StoreError> {
        Ok(self
            .0
            .end_rollout(plugin.into(), id.into(), state.into(), reason)
            .await?)
    }

    async fn rollout(
        &self,
        plugin: &str,
    ) -> Result<Option<digibot_store::RolloutRecord>, StoreError> {
        rollouts::rollout(&self.0, plugin).await
    }

    async fn rollouts(&self) -> Result<Vec<digibot_store::RolloutRecord>, StoreError> {
        rollouts::all(&self.0).await
    }

    async fn rollout_bytes(&self, plugin: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        rollouts::bytes(&self.0, plugin, id).await
    }

    async fn record_comparison(
        &self,
        comparison: digibot_store::Comparison,
    ) -> Result<bool, StoreError> {
        Ok(self.0.record_comparison(comparison).await?)
    }

    async fn pin_version(
        &self,
        plugin: &str,
        conversation_id: &str,
        version: &str,
    ) -> Result<String, StoreError> {
        pins::pin_version(&self.0, plugin, conversation_id, version).await
    }

    async fn unpin(&self, conversation_id: &str) -> Result<usize, StoreError> {
        pins::unpin(&self.0, conversation_id).await
    }

    async fn pins(&self, conversation_id: &str) -> Result<Vec<(String, String)>, StoreError> {
        pins::pins(&self.0, conversation_id).await
    }

    async fn comparisons(
        &self,
        plugin: &str,
        id: &str,
        limit: usize,
    ) -> Result<Vec<digibot_store::Comparison>, StoreError> {
        rollouts::comparisons(&self.0, plugin, id, limit).await
    }
}

/// Reads a `http_journal` row (every column, in table order).
fn journal_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<JournalEntry, Error>> {
    let request: String = r.get(3)?;
    let status: Option<u16> = r.get(4)?;
    let headers: Option<String> = r.get(5)?;
    let body: Option<Vec<u8>> = r.get(6)?;
    let refusal: Option<String> = r.get(8)?;
    let elapsed: i64 = r.get(9)?;
    let (event_key, plugin, call, recorded_at): (String, String, u32, i64) =
        (r.get(0)?, r.get(1)?, r.get(2)?, r.get(10)?);
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Corrupt(format!("journal {event_key}/{plugin}/{call}: {what}: {e}")).into()
    };
    let request: JournalRequest = match serde_json::from_str(&request) {
        Ok(r) => r,
        Err(e) => return Ok(Err(corrupt("request", &e))),
    };
    let outcome = match status {
        Some(status) => JournalOutcome::Response {
            status,
            headers: match serde_json::from_str(headers.as_deref().unwrap_or("[]")) {
                Ok(h) => h,
                Err(e) => return Ok(Err(corrupt("headers", &e))),
            },
            body: body.unwrap_or_default(),
        },
        None => match serde_json::from_str(refusal.as_deref().unwrap_or("")) {
            Ok(refusal) => JournalOutcome::Failed { refusal },
            Err(e) => return Ok(Err(corrupt("refusal", &e))),
        },
    };
    Ok(Ok(JournalEntry {
        event_key,
        plugin,
        call,
        request,
        outcome,
        elapsed_ms: elapsed.max(0) as u64,
        recorded_at,
    }))
}

const OUTBOX_COLUMNS: &str = "id, event_seq, conversation_id, plugin, idempotency_key, method, path, body, status, attempts, next_attempt_at, last_status, last_error, created_at";

/// The sender's read: each conversation's oldest pending action, soonest
/// due first. It walks `outbox_due` and probes `outbox_pending` per row,
/// lazily, so a caller that stops after `limit` rows reads only those
/// heads; the `GROUP BY conversation_id` it replaces read every pending
/// row on each wake (14% of the saturated pipeline's CPU with a backlog of
/// a few thousand replies). No `LIMIT ?`: SQLite plans a bound LIMIT by
/// its value, so every execution prepared the statement again (10% of the
/// paced pipeline's samples).
static OUTBOX_HEADS_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {OUTBOX_COLUMNS} FROM outbox o
         WHERE status = 'pending'
           AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.status = 'pending'
                           AND p.conversation_id = o.conversation_id AND p.id < o.id)
         ORDER BY next_attempt_at, id"
    )
});

fn outbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxAction> {
    let body: String = r.get(7)?;
    Ok(OutboxAction {
        id: r.get(0)?,
        event_seq: r.get(1)?,
        conversation_id: r.get(2)?,
        plugin: r.get(3)?,
        idempotency_key: r.get(4)?,
        method: r.get(5)?,
        path: r.get(6)?,
        body: serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
        status: r.get(8)?,
        attempts: r.get(9)?,
        next_attempt_at: r.get(10)?,
        last_status: r.get(11)?,
        last_error: r.get(12)?,
        created_at: r.get(13)?,
    })
}

/// `seq, payload, received_at` rows as stored events.
fn stored_events(mut rows: rusqlite::Rows<'_>) -> Result<Vec<StoredEvent>, Error> {
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let payload: String = row.get(1)?;
        let received_at: i64 = row.get(2)?;
        let event = serde_json::from_str(&payload)
            .map_err(|e| StoreError::Corrupt(format!("event {seq}: {e}")))?;
        out.push(StoredEvent {
            seq,
            event,
            received_at,
        });
    }
    Ok(out)
}

/// Reads `seq, key, name, conversation_id, status, received_at,
/// handled_at, outcomes`.
fn event_summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventSummary> {
    let outcomes: Option<String> = r.get(7)?;
    Ok(EventSummary {
        seq: r.get(0)?,
        key: r.get(1)?,
        event: r.get(2)?,
        conversation_id: r.get(3)?,
        status: r.get(4)?,
        received_at: r.get(5)?,
        handled_at: r.get(6)?,
        plugins: outcomes
            .and_then(|o| serde_json::from_str(&o).ok())
            .unwrap_or(serde_json::Value::Array(vec![])),
    })
}

/// Who is in charge of conversation `id`, if digibot has seen it.
fn state_of(conn: &Connection, id: &str) -> Result<Option<ConversationState>, Error> {
    Ok(conn
        .prepare_cached("SELECT state FROM conversations WHERE id = ?1")?
        .query_row([id], |r| r.get::<_, String>(0))
        .optional()?
        .map(|s| parse_state(&s))
        .transpose()?)
}

fn own_message(conn: &Connection, conversation_id: &str, message_id: &str) -> Result<bool, Error> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM sent_messages WHERE conversation_id = ?1 AND message_id = ?2",
        )?
        .query_row([conversation_id, message_id], |_| Ok(()))
        .optional()?
        .is_some())
}

fn insert_event(conn: &Connection, event: &Event) -> Result<Inserted, Error> {
    let status = if event.dispatched() {
        "pending"
    } else {
        "recorded"
    };
    insert_event_as(conn, event, status, now_ms())
}

/// Records `event` as `status` (`handled` and `recorded` with `now` as
/// their handling time; `handled`: no plugin ran, its outcomes `[]`).
fn insert_event_as(
    conn: &Connection,
    event: &Event,
    status: &str,
    now: i64,
) -> Result<Inserted, Error> {
    let payload = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (key, name, conversation_id, created_at, payload, status, received_at, handled_at, outcomes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, CASE WHEN ?6 = 'pending' THEN NULL ELSE ?7 END,
                     CASE WHEN ?6 = 'handled' THEN '[]' END)
             ON CONFLICT(key) DO NOTHING",
        )?
        .execute(params![
            event.key,
            event.name,
            event.conversation_id(),
            event.created_at(),
            payload,
            status,
            now
        ])?;
    Ok(if inserted == 1 {
        Inserted::New(conn.last_insert_rowid())
    } else {
        Inserted::Duplicate
    })
}

const CONVERSATION_COLUMNS: &str =
    "id, state, changed_at, reason, channel, last_customer_at, last_agent_at, customer_id";

fn conversation_state(conn: &Connection, id: &str) -> Result<Option<ConversationRecord>, Error> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ?1"
        ))?
        .query_row([id], conversation_row)
        .optional()?)
}

fn conversation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ConversationRecord> {
    let state: String = r.get(1)?;
    let state = parse_state(&state).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(ConversationRecord {
        id: r.get(0)?,
        state,
        changed_at: r.get(2)?,
        reason: r.get(3)?,
        channel: r.get(4)?,
        last_customer_at: r.get(5)?,
        last_agent_at: r.get(6)?,
        customer_id: r.get(7)?,
    })
}

/// Applies `change` if the conversation is in its `from` state; returns
/// whether it did.
fn change_state(
    conn: &Connection,
    id: &str,
    change: &StateChange,
    now: i64,
) -> Result<bool, Error> {
    // A hand-back records its `digibot.resumed` event in the same
    // transaction: what the human's turn was, read before it ends.
    let handing_back =
        change.from == Some(ConversationState::Human) && change.to == ConversationState::Bot;
    let human: Option<(i64, i64)> = if handing_back {
        conn.prepare_cached(
            "SELECT changed_at, messages FROM conversations WHERE id = ?1 AND state = 'human'",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
    } else {
        None
    };
    let changed =
        conn.prepare_cached(
            "UPDATE conversations SET state = ?2, changed_at = ?3, reason = ?4, messages = 0
             WHERE id = ?1 AND state <> ?2 AND (?5 IS NULL OR state = ?5)",
        )?
        .execute(params![
            id,
            change.to.as_str(),
            now,
            change.reason,
            change.from.map(|s| s.as_str())
        ])? > 0;
    if changed {
        states::touch(id);
    }
    if changed && let Some((taken_at, messages)) = human {
        let resumed = Resumed {
            conversation_id: id.to_string(),
            cause: Cause::of_reason(&change.reason),
            reason: change.reason.clone(),
            taken_at,
            released_at: now,
            messages: u32::try_from(messages).unwrap_or(u32::MAX),
            outside_window: false,
        };
        insert_event(conn, &resumed.into_event())?;
    }
    Ok(changed)
}

/// Creates the conversation (in the bot's hands) if new, then applies
/// `update`; returns whether its state change applied.
fn update_conversation(
    conn: &Connection,
    id: &str,
    update: &ConversationUpdate,
    now: i64,
) -> Result<bool, Error> {
    // One statement: created in the bot's hands if new, its activity, its
    // message count and what the event says about it, and the row back.
    // Times only move forward: events can be handled out of order.
    let row = conn
        .prepare_cached(&format!(
            "INSERT INTO conversations (id, state, changed_at, reason, active_at, messages, channel, customer_id, last_customer_at, last_agent_at)
             VALUES (?1, 'bot', ?2, 'first event', ?2, (?4 IS NOT NULL) + (?5 IS NOT NULL), ?3, ?6, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET
               active_at = MAX(active_at, excluded.active_at),
               messages = messages + (?4 IS NOT NULL) + (?5 IS NOT NULL),
               channel = COALESCE(?3, channel),
               customer_id = COALESCE(?6, customer_id),
               last_customer_at = CASE WHEN ?4 IS NOT NULL AND (last_customer_at IS NULL OR ?4 > last_customer_at) THEN ?4 ELSE last_customer_at END,
               last_agent_at = CASE WHEN ?5 IS NOT NULL AND (last_agent_at IS NULL OR ?5 > last_agent_at) THEN ?5 ELSE last_agent_at END
             RETURNING {CONVERSATION_COLUMNS}"
        ))?
        .query_row(
            params![
                id,
                now,
                update.channel,
                update.customer_at,
                update.agent_at,
                update.customer_id
            ],
            conversation_row,
        )?;
    let changed = match &update.change {
        Some(change) => change_state(conn, id, change, now)?,
        None => false,
    };
    // What the conversation's next event reads, without a round trip.
    if changed {
        if let Some(record) = conversation_state(conn, id)? {
            states::fresh(record);
        }
    } else {
        states::fresh(row);
    }
    Ok(changed)
}

/// Applies one plugin's KV writes in one conversation, in order, and
/// what they change to its usage.
const TIMER_COLUMNS: &str = "t.id, t.plugin, t.conversation_id, t.name, t.payload, t.scheduled_at, t.due_at, t.cancel_on_message";

fn timer_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TimerRecord> {
    Ok(TimerRecord {
        id: r.get(0)?,
        plugin: r.get(1)?,
        conversation_id: r.get(2)?,
        name: r.get(3)?,
        payload: r.get(4)?,
        scheduled_at: r.get(5)?,
        due_at: r.get(6)?,
        cancel_on_customer_message: r.get::<_, i64>(7)? != 0,
    })
}

/// A conversation's pending timers, soonest due first.
fn pending_timers(conn: &Connection, conversation_id: &str) -> Result<Vec<TimerRecord>, Error> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {TIMER_COLUMNS} FROM timers t WHERE t.conversation_id = ?1 ORDER BY t.due_at, t.id"
    ))?;
    let rows = stmt.query_map([conversation_id], timer_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// What an event's completion does to its conversation's timers: archiving
/// drops them all; a customer message drops those cancelled by one; then
/// the turns' own schedules and cancels, in the order they made them.
fn apply_timers(
    conn: &Connection,
    conversation_id: &str,
    update: &ConversationUpdate,
    now: i64,
) -> Result<(), Error> {
    if update.archive.is_some() {
        conn.prepare_cached("DELETE FROM timers WHERE conversation_id = ?1")?
            .execute([conversation_id])?;
        return Ok(());
    }
    if update.customer_at.is_some() {
        conn.prepare_cached(
            "DELETE FROM timers WHERE conversation_id = ?1 AND cancel_on_message = 1",
        )?
        .execute([conversation_id])?;
    }
    for change in &update.timers {
        for op in &change.ops {
            match op {
                TimerOp::Schedule {
                    id,
                    name,
                    due_at,
                    payload,
                    cancel_on_customer_message,
                } => {
                    conn.prepare_cached(
                        "INSERT INTO timers (id, plugin, conversation_id, name, payload, scheduled_at, due_at, cancel_on_message)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                         ON CONFLICT (conversation_id, plugin, name) DO UPDATE SET
                             id = excluded.id, payload = excluded.payload, scheduled_at = excluded.scheduled_at,
                             due_at = excluded.due_at, cancel_on_message = excluded.cancel_on_message",
                    )?
                    .execute(params![
                        id,
                        change.plugin,
                        conversation_id,
                        name,
                        payload,
                        now,
                        due_at,
                        *cancel_on_customer_message as i64
                    ])?;
                }
                TimerOp::Cancel { name } => {
                    conn.prepare_cached(
                        "DELETE FROM timers WHERE conversation_id = ?1 AND plugin = ?2 AND name = ?3",
                    )?
                    .execute(params![conversation_id, change.plugin, name])?;
                }
            }
        }
    }
    Ok(())
}

fn apply_kv(conn: &Connection, change: &KvChanges, now: i64) -> Result<(), Error> {
    let (plugin, conversation) = (&change.plugin, &change.conversation_id);
    // What the writes change, per scope written (in first-written order).
    let mut deltas: Vec<(&KvScope, KvSize)> = Vec::new();
    for write in &change.writes {
        let (scope, key) = (write.scope(), write.key());
        let (name, owner) = (scope.scope().as_str(), scope.owner());
        let old: Option<i64> = match scope {
            KvScope::Conversation => conn
                .prepare_cached(
                    "SELECT length(CAST(key AS BLOB)) + length(CAST(value AS BLOB)) FROM kv
                     WHERE plugin = ?1 AND conversation_id = ?2 AND key = ?3",
                )?
                .query_row(params![plugin, conversation, key], |r| r.get(0))
                .optional()?,
            _ => conn
                .prepare_cached(
                    "SELECT length(CAST(key AS BLOB)) + length(CAST(value AS BLOB)) FROM kv_scoped
                     WHERE plugin = ?1 AND scope = ?2 AND owner = ?3 AND key = ?4",
                )?
                .query_row(params![plugin, name, owner, key], |r| r.get(0))
                .optional()?,
        };
        let delta = match write {
            KvWrite::Set {
                value, expires_at, ..
            } => {
                match scope {
                    KvScope::Conversation => conn.prepare_cached(
                        "INSERT INTO kv (plugin, conversation_id, key, value, updated_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT(plugin, conversation_id, key) DO UPDATE SET value = excluded.value,
                           updated_at = excluded.updated_at, expires_at = excluded.expires_at",
                    )?
                    .execute(params![plugin, conversation, key, value, now, expires_at])?,
                    _ => conn.prepare_cached(
                        "INSERT INTO kv_scoped (plugin, scope, owner, key, value, updated_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                         ON CONFLICT(plugin, scope, owner, key) DO UPDATE SET value = excluded.value,
                           updated_at = excluded.updated_at, expires_at = excluded.expires_at",
                    )?
                    .execute(params![plugin, name, owner, key, value, now, expires_at])?,
                };
                KvSize {
                    keys: i64::from(old.is_none()),
                    bytes: entry_bytes(key, value) - old.unwrap_or(0),
                }
            }
            KvWrite::Delete { .. } => match old {
                Some(old) => {
                    match scope {
                        KvScope::Conversation => conn
                            .prepare_cached(
                                "DELETE FROM kv WHERE plugin = ?1 AND conversation_id = ?2 AND key = ?3",
                            )?
                            .execute(params![plugin, conversation, key])?,
                        _ => conn
                            .prepare_cached(
                                "DELETE FROM kv_scoped WHERE plugin = ?1 AND scope = ?2 AND owner = ?3 AND key = ?4",
                            )?
                            .execute(params![plugin, name, owner, key])?,
                    };
                    KvSize {
                        keys: -1,
                        bytes: -old,
                    }
                }
                None => KvSize::default(),
            },
        };
        match deltas.iter_mut().find(|(s, _)| *s == scope) {
            Some((_, d)) => *d += delta,
            None => deltas.push((scope, delta)),
        }
    }
    let mut total = KvSize::default();
    for (scope, delta) in deltas {
        total += delta;
        match scope {
            KvScope::Conversation if delta != KvSize::default() => {
                conn.prepare_cached(
                    "INSERT INTO kv_usage (conversation_id, plugin, keys, bytes) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (conversation_id, plugin) DO UPDATE SET keys = keys + excluded.keys, bytes = bytes + excluded.bytes",
                )?
                .execute(params![conversation, plugin, delta.keys, delta.bytes])?;
            }
            KvScope::Conversation => {}
            // Every write renews the scope (idle customer memory's clock).
            _ => {
                add_scoped_usage(conn, plugin, scope, delta, Some(now))?;
            }
        }
    }
    if total != KvSize::default() {
        add_plugin_usage(conn, plugin, total.keys, total.bytes)?;
    }
    Ok(())
}

/// Adds to what a plugin holds in a customer or shared scope, and renews
/// it when `active_at` is given.
fn add_scoped_usage(
    conn: &Connection,
    plugin: &str,
    scope: &KvScope,
    delta: KvSize,
    active_at: Option<i64>,
) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO kv_scoped_usage (plugin, scope, owner, keys, bytes, active_at) VALUES (?1, ?2, ?3, ?4, ?5, COALESCE(?6, 0))
         ON CONFLICT (plugin, scope, owner) DO UPDATE SET keys = keys + excluded.keys, bytes = bytes + excluded.bytes,
           active_at = COALESCE(?6, active_at)",
    )?
    .execute(params![
        plugin,
        scope.scope().as_str(),
        scope.owner(),
        delta.keys,
        delta.bytes,
        active_at
    ])?;
    Ok(())
}

/// Adds to a plugin's KV totals.
fn add_plugin_usage(conn: &Connection, plugin: &str, keys: i64, bytes: i64) -> Result<(), Error> {
    conn.prepare_cached(
        "INSERT INTO kv_plugin_usage (plugin, keys, bytes) VALUES (?1, ?2, ?3)
         ON CONFLICT (plugin) DO UPDATE SET keys = keys + excluded.keys, bytes = bytes + excluded.bytes",
    )?
    .execute(params![plugin, keys, bytes])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use digibot_store::store_suite;
    use digibot_store::suite::{TestDb, action, event};

    fn fixture() -> Option<TestDb> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        Some(TestDb::new(
            move || std::future::ready(open(&path, Durability::Full).unwrap()),
            dir,
        ))
    }

    store_suite!(fixture);

    /// The sender's read must cost the heads it returns: it walks the due
    /// index in order (no sort of every pending row) and finds an earlier
    /// action of the same conversation by index.
    #[test]
    fn the_senders_read_walks_the_due_index_without_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let conn = connect(&dir.path().join("digibot.db"), Durability::Full).unwrap();
        migrate(&conn).unwrap();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", *OUTBOX_HEADS_SQL))
            .unwrap();
        let plan: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("SCAN o USING INDEX outbox_due"), "{plan}");
        assert!(
            plan.contains("outbox_pending (conversation_id=? AND id<?)"),
            "{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }

    /// The sender reads the outbox on every wake: its statement is
    /// prepared once per connection, not again at each execution (a bound
    /// `LIMIT` made SQLite prepare it again every time), and it still
    /// returns at most the heads asked for.
    #[tokio::test]
    async fn the_senders_read_is_prepared_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), Durability::Full).unwrap();
        for i in 0..3 {
            let conv = format!("c{i}");
            let Inserted::New(seq) = db.insert_event(event(&conv, &conv)).await.unwrap() else {
                panic!("a new event");
            };
            let actions = vec![action(&conv)];
            db.complete_event(
                seq,
                conv,
                serde_json::json!([]),
                actions,
                vec![],
                Default::default(),
            )
            .await
            .unwrap();
            let heads = db.outbox_heads(2).unwrap();
            assert_eq!(heads.len(), (i + 1).min(2));
        }
        for _ in 0..READERS * 2 {
            db.outbox_heads(1).unwrap();
        }
        let mut reprepared = 0;
        for conn in db.readers.lock().unwrap().iter() {
            let stmt = conn.prepare_cached(&OUTBOX_HEADS_SQL).unwrap();
            reprepared += stmt.get_status(rusqlite::StatementStatus::RePrepare);
        }
        assert_eq!(reprepared, 0);
    }

    /// A database of the first schema, with KV and a conversation, gets
    /// the usage tables filled from what it holds and its conversations'
    /// activity from their times.
    #[tokio::test]
    async fn a_first_schema_database_is_migrated_with_its_kv_usage() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("digibot.db")).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO kv VALUES ('echo', 'c1', 'clé', 'été', 1), ('echo', 'c1', 'a', '1', 1),
                                       ('echo', 'c2', 'b', '22', 1), ('other', 'c1', 'x', 'y', 1);
                 INSERT INTO conversations (id, state, changed_at, reason, last_customer_at)
                     VALUES ('c1', 'bot', 1000, 'first event', 5000);",
            )
            .unwrap();
        }
        let store = open(dir.path(), Durability::Full).unwrap();
        let usage = store.kv_usage("echo", "c1").await.unwrap();
        assert_eq!(
            (usage.scope, usage.plugin),
            (KvSize { keys: 2, bytes: 11 }, KvSize { keys: 3, bytes: 14 })
        );
        assert_eq!(store.kv_usage("other", "c1").await.unwrap().plugin.bytes, 2);
        store.close();
        drop(store);
        let conn = Connection::open(dir.path().join("digibot.db")).unwrap();
        let (version, active): (i32, i64) = (
            conn.pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap(),
            conn.query_row(
                "SELECT active_at FROM conversations WHERE id = 'c1'",
                [],
                |r| r.get(0),
            )
            .unwrap(),
        );
        assert_eq!((version, active), (MIGRATIONS.last().unwrap().0, 5000));
        // Opening again applies nothing twice.
        drop(conn);
        let store = open(dir.path(), Durability::Full).unwrap();
        assert_eq!(store.kv_usage("echo", "c1").await.unwrap().scope.keys, 2);
    }

    /// On one node, a pending event is claimable once it is older than
    /// [`ORPHANED_AFTER`] (never while its webhook may still be handing it
    /// over), oldest first, until it is handled.
    #[tokio::test]
    async fn pending_events_become_claimable_once_orphaned() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Normal).unwrap();
        let mut seqs = Vec::new();
        for id in ["m1", "m2", "m3"] {
            let Inserted::New(seq) = store.insert_event(event(id, "c")).await.unwrap() else {
                panic!("{id} is new")
            };
            seqs.push(seq);
        }
        assert!(
            store.claimable_events(10).await.unwrap().is_empty(),
            "too recent"
        );
        // m1 and m2 were received long ago.
        let old = now_ms() - ORPHANED_AFTER.as_millis() as i64 - 1000;
        let conn = Connection::open(dir.path().join("digibot.db")).unwrap();
        conn.execute(
            "UPDATE events SET received_at = ?1 WHERE seq IN (?2, ?3)",
            params![old, seqs[0], seqs[1]],
        )
        .unwrap();
        let found: Vec<i64> = store
            .claimable_events(10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(found, seqs[..2]);
        assert_eq!(store.claimable_events(1).await.unwrap().len(), 1);
        store
            .complete_event(
                seqs[0],
                "c".into(),
                serde_json::json!([]),
                Vec::new(),
                Vec::new(),
                ConversationUpdate::default(),
            )
            .await
            .unwrap();
        let found: Vec<i64> = store
            .claimable_events(10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(found, [seqs[1]]);
    }

    #[tokio::test]
    async fn normal_durability_checkpoints_off_the_writer_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Normal).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.insert_event(event(&format!("m{i}"), "c")).await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap().unwrap(), Inserted::New(_)));
        }
        assert_eq!(store.pending_events().await.unwrap().len(), 200);
        // `normal` checkpoints on its own thread: closing stops it, and
        // everything is still there after a reopen.
        store.close();
        let store = open(dir.path(), Durability::Normal).unwrap();
        assert_eq!(store.pending_events().await.unwrap().len(), 200);
    }
}
