//! The PostgreSQL back end, for several replicas sharing one database
//! (`DIGIBOT_DATABASE_URL=postgres://...`). All of its SQL lives here.
//!
//! Connections: a `deadpool-postgres` pool (see `pool`) over TLS as the
//! URL's `sslmode` asks (see `connect`). Connection tasks, the listener and
//! the poll timer run on the runtime that opened the store (the server's,
//! or the one a CLI command builds): the store has no runtime of its own.
//! Every statement has a deadline (the server's `statement_timeout` and a
//! client-side one), and so does acquiring a connection: a database that
//! hangs is a [`StoreError::Timeout`], which the webhook answers with 503.
//!
//! Round trips: every stage of an event is one statement, so one round
//! trip, and commits on its own (data-modifying CTEs keep an event's
//! completion, with its actions and KV writes, one atomic statement). A
//! webhook costs three at most: its insert (which also takes the lease and
//! reads what the lane's claim would: see `held`), its completion (which
//! also gives the lease back when nothing else of the conversation waits),
//! and its delivery, which shares a statement with the deliveries recorded
//! at the same time (see `sent`). Statements are prepared once per
//! connection.
//!
//! Work sharing between replicas, without a coordinator:
//! - a conversation is handled by one replica at a time: its lease (a row of
//!   `conversation_leases`: owner replica, expiry) is taken by the insert
//!   of an event for a lane (or by the lane's claim), renewed by every
//!   completion, given back by the completion after which nothing of the
//!   conversation waits; a dead replica's lease expires and another
//!   replica takes the conversation over. A completion whose conversation is leased to
//!   another replica is refused, so a replica that lost its lease cannot
//!   reorder the conversation.
//! - the outbox head of a conversation is claimed (`FOR UPDATE SKIP LOCKED`,
//!   then `claimed_by`/`claim_expires`) by one replica's sender, which alone
//!   sends it, when due: only the oldest pending action of a conversation
//!   is in flight, cluster-wide.
//! - events that arrive at a replica whose conversation another replica
//!   holds stay in the inbox, and a `NOTIFY digibot_inbox` tells the owner;
//!   every replica also polls for orphaned events (lease expired, or never
//!   taken), so nothing waits on a notification that was missed.
//!
//! Schema changes are versioned migrations, applied at start inside a
//! transaction holding an advisory lock: replicas starting together apply
//! each migration once.

mod connect;
mod held;
mod pins;
mod plugins;
mod pool;
mod rollouts;
mod sent;
mod stats;

pub use connect::{DatabaseUrl, SslMode};

use digibot_domain::event::{ConversationState, Event};
use digibot_domain::resume::{Cause, Resumed};
use digibot_store::{
    ActionCounts, Backend, CONVERSATION_WINDOW, Completed, ConversationDetail, ConversationRecord,
    ConversationSummary, ConversationUpdate, EventSummary, HistoryEntry, Inserted, JournalEntry,
    JournalOutcome, JournalRequest, KvChanges, KvScope, KvSize, KvUsage, KvWrite, NewAction,
    OutboxAction, OutboxDepth, PluginRecords, Pruned, Release, Retention, Store, StoreError,
    StoredEvent, TimerChanges, TimerFired, TimerOp, TimerRecord, now_ms, parse_state,
};
use pool::{Conn, Pool, Timeouts};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Row};

/// What goes wrong inside this back end; a [`StoreError`] at its boundary.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Error> for StoreError {
    fn from(e: Error) -> StoreError {
        match e {
            // The server's statement_timeout (or lock_timeout) cut it.
            Error::Postgres(e)
                if matches!(
                    e.code(),
                    Some(&SqlState::QUERY_CANCELED | &SqlState::LOCK_NOT_AVAILABLE)
                ) =>
            {
                StoreError::Timeout(describe(&e))
            }
            Error::Postgres(e) => StoreError::Database(describe(&e)),
            Error::Store(e) => e,
        }
    }
}

/// A tokio-postgres error with its causes ("error performing TLS
/// handshake: invalid peer certificate: ...", "db error: ERROR: ..."):
/// its own `Display` names only the kind.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Connects to the PostgreSQL database at `url`, migrates it, and starts
/// listening to the other replicas (on the current tokio runtime).
pub async fn open(url: &DatabaseUrl, options: Options) -> Result<Store, StoreError> {
    Ok(Store::new(PgStore(Arc::new(
        Postgres::open(url, options).await?,
    ))))
}

/// The PostgreSQL back end behind a [`Store`].
struct PgStore(Arc<Postgres>);

/// The channel a replica notifies when it leaves an event to the
/// conversation's owner.
pub const INBOX_CHANNEL: &str = "digibot_inbox";

/// Channels every replica listens on; their notifications are broadcast
/// to [`Postgres::notifications`] subscribers.
pub const CHANNELS: &[&str] = &[INBOX_CHANNEL, PLUGINS_CHANNEL];

/// The channel a replica notifies when it changed the cluster's plugins
/// (see `cluster`).
pub const PLUGINS_CHANNEL: &str = "digibot_plugins";

/// Versioned schema changes, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    conversation_id TEXT,
    created_at TEXT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    handled_at BIGINT,
    outcomes TEXT
);
CREATE INDEX events_pending ON events (conversation_id, seq) WHERE status = 'pending';
CREATE TABLE outbox (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_seq BIGINT NOT NULL,
    conversation_id TEXT NOT NULL,
    plugin TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_status BIGINT,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    done_at BIGINT,
    -- The replica sending it, until claim_expires (a dead replica's claim
    -- runs out and another replica sends it, with the same idempotency key).
    claimed_by TEXT,
    claim_expires TIMESTAMPTZ
);
CREATE INDEX outbox_pending ON outbox (conversation_id, id) WHERE status = 'pending';
CREATE INDEX outbox_dead ON outbox (id) WHERE status = 'dead';
CREATE TABLE kv (
    plugin TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (plugin, conversation_id, key)
);
CREATE TABLE conversation_leases (
    conversation_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"#,
    ),
    (
        2,
        // Plugins across replicas (see `cluster`): every version's bytes,
        // what serves now with its rollback targets, each replica's breakers.
        r#"
CREATE TABLE plugin_versions (
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    bytes BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (name, hash)
);
CREATE TABLE plugins (
    name TEXT PRIMARY KEY,
    -- NULL once removed: the name stays known.
    hash TEXT,
    -- Rollback targets, oldest first.
    previous TEXT[] NOT NULL DEFAULT '{}',
    updated_at BIGINT NOT NULL
);
CREATE TABLE plugin_health (
    replica TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    report TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (replica, name)
);
"#,
    ),
    (
        3,
        r#"
-- Who is in charge of each conversation, and the ids the Messages API
-- returned (to recognise digibot's own messages coming back as webhooks).
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    changed_at BIGINT NOT NULL,
    reason TEXT NOT NULL,
    channel TEXT,
    last_customer_at BIGINT,
    last_agent_at BIGINT
);
CREATE TABLE sent_messages (
    conversation_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    action_id BIGINT NOT NULL,
    sent_at BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, message_id)
);
"#,
    ),
    (
        4,
        r#"
-- When the conversation last had an event handled (retention of idle
-- conversations and their KV).
ALTER TABLE conversations ADD COLUMN active_at BIGINT NOT NULL DEFAULT 0;
UPDATE conversations SET active_at = GREATEST(changed_at, last_customer_at, last_agent_at);
CREATE INDEX conversations_active ON conversations (active_at);
-- How much KV each plugin holds per conversation, kept by every
-- completion that writes KV (quotas read one row, not the entries).
CREATE TABLE kv_usage (
    conversation_id TEXT NOT NULL,
    plugin TEXT NOT NULL,
    keys BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, plugin)
);
INSERT INTO kv_usage (conversation_id, plugin, keys, bytes)
    SELECT conversation_id, plugin, count(*), sum(octet_length(key) + octet_length(value))
    FROM kv GROUP BY conversation_id, plugin;
-- And in all: in 16 shards by conversation, so that replicas completing
-- events of one plugin in different conversations rarely wait on one row.
CREATE TABLE kv_plugin_usage (
    plugin TEXT NOT NULL,
    shard INT NOT NULL,
    keys BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (plugin, shard)
);
INSERT INTO kv_plugin_usage (plugin, shard, keys, bytes)
    SELECT plugin, hashtext(conversation_id) & 15, sum(keys), sum(bytes)
    FROM kv_usage GROUP BY plugin, hashtext(conversation_id) & 15;
"#,
    ),
    (
        5,
        r#"
-- Each outbound HTTP call of a plugin's turn, recorded as it completes,
-- so that a turn that runs again (on any replica) replays it.
CREATE TABLE http_journal (
    event_key TEXT NOT NULL,
    plugin TEXT NOT NULL,
    call INTEGER NOT NULL,
    request TEXT NOT NULL,
    status INTEGER,
    response_headers TEXT,
    body BYTEA,
    error_kind TEXT,
    refusal TEXT,
    elapsed_ms BIGINT NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (event_key, plugin, call)
);
CREATE INDEX http_journal_recorded ON http_journal (recorded_at);
"#,
    ),
    (
        6,
        r#"
-- Durable timers: one row per pending timer, a name unique per plugin and
-- conversation. A due timer leaves this table as it enters the inbox.
CREATE TABLE timers (
    id TEXT PRIMARY KEY,
    plugin TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    name TEXT NOT NULL,
    payload TEXT NOT NULL,
    scheduled_at BIGINT NOT NULL,
    due_at BIGINT NOT NULL,
    cancel_on_message BOOLEAN NOT NULL,
    UNIQUE (conversation_id, plugin, name)
);
CREATE INDEX timers_due ON timers (due_at);
"#,
    ),
    (
        7,
        r#"
-- Messages (the customer's and the agents') handled since the
-- conversation last changed hands: a hand-back tells the plugins how many
-- passed while the human had it.
ALTER TABLE conversations ADD COLUMN messages BIGINT NOT NULL DEFAULT 0;
"#,
    ),
    (
        8,
        r#"
-- KV scopes beyond the conversation: values with a TTL (every scope), the
-- customer's id per conversation, and the `customer` and `plugin` scopes
-- (owner: the customer id, '' for the plugin's shared entries).
ALTER TABLE kv ADD COLUMN expires_at BIGINT;
CREATE INDEX kv_expiring ON kv (expires_at) WHERE expires_at IS NOT NULL;
ALTER TABLE conversations ADD COLUMN customer_id TEXT;
CREATE TABLE kv_scoped (
    plugin TEXT NOT NULL,
    scope TEXT NOT NULL,
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    expires_at BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (plugin, scope, owner, key)
);
CREATE INDEX kv_scoped_expiring ON kv_scoped (expires_at) WHERE expires_at IS NOT NULL;
-- What each plugin holds per customer and in its shared scope, and when
-- it last wrote there. Its row is the lock every writer of the scope
-- takes first (two conversations may write one customer's memory at
-- once): the usage it keeps is counted from the rows as they are.
CREATE TABLE kv_scoped_usage (
    plugin TEXT NOT NULL,
    scope TEXT NOT NULL,
    owner TEXT NOT NULL,
    keys BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    active_at BIGINT NOT NULL,
    PRIMARY KEY (plugin, scope, owner)
);
CREATE INDEX kv_scoped_idle ON kv_scoped_usage (scope, active_at);
"#,
    ),
    (9, rollouts::MIGRATION),
    (10, pins::MIGRATION),
    (
        11,
        r#"
-- The sender's claim walks pending actions in due order and stops after the
-- heads it can start: the claim costs the heads it returns, not the backlog.
CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE status = 'pending';
"#,
    ),
    (
        12,
        r#"
-- Every update of a conversation bumps its version, whoever makes it: a
-- replica keeps the record at the highest version it has seen (see
-- `held::Records`), so an older read that answers late never wins.
ALTER TABLE conversations ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
CREATE FUNCTION digibot_conversation_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$;
CREATE TRIGGER conversations_version BEFORE UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION digibot_conversation_version();
"#,
    ),
];

/// Any `pg_advisory_xact_lock` key of digibot's own; this one guards
/// migrations.
const MIGRATION_LOCK: i64 = 0x6469_6769_626f_7401;

/// How the PostgreSQL back end is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Connections in the pool (each replica has its own pool).
    pub pool_size: usize,
    /// How long a conversation lease lasts without renewal: how long a dead
    /// replica's conversations wait before another replica takes them.
    pub lease: Duration,
    /// How long a claimed outbox action stays with its sender (longer than
    /// one request to Digishare).
    pub claim: Duration,
    /// How often a replica looks for orphaned work; also how old an
    /// unleased event must be before a replica other than the one that
    /// received it takes it.
    pub poll: Duration,
    /// The longest wait for a free pooled connection.
    pub acquire_timeout: Duration,
    /// The server's `statement_timeout` for every statement (migrations
    /// excepted); the client gives up a second later.
    pub statement_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pool_size: 8,
            lease: Duration::from_secs(30),
            claim: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// A notification from another replica (or our own), on one of
/// [`CHANNELS`]. After a lost listener connection comes back, every
/// channel gets one with an empty payload: something may have been missed.
#[derive(Debug, Clone)]
pub struct Notification {
    pub channel: String,
    pub payload: String,
}

/// The open PostgreSQL back end.
struct Postgres {
    pool: Pool,
    /// This replica, as it appears in leases and claims.
    replica: String,
    options: Options,
    notifications: broadcast::Sender<Notification>,
    /// Woken by inbox notifications and the poll timer.
    inbox: Arc<Notify>,
    /// The listener and the poll timer, stopped with the store.
    tasks: Vec<JoinHandle<()>>,
    /// Leases the inserts took, for the lanes' claims.
    claims: held::Claims,
    /// Conversation records, at the highest version seen.
    records: held::Records,
    /// Deliveries recorded together.
    deliveries: sent::Deliveries,
    /// The outbox's planner statistics, refreshed as actions are queued.
    outbox_stats: Arc<stats::OutboxStats>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Postgres {
    /// Connects, applies pending migrations, and starts listening.
    async fn open(url: &DatabaseUrl, options: Options) -> Result<Postgres, Error> {
        let pool = Pool::new(
            url,
            options.pool_size,
            Timeouts {
                acquire: options.acquire_timeout,
                statement: options.statement_timeout,
            },
        )?;
        let replica = format!(
            "{}-{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "digibot".into()),
            std::process::id(),
            rand::random::<u32>()
        );
        let (notifications, _) = broadcast::channel(1024);
        migrate(&pool).await?;
        let (deliveries, recording) = sent::Deliveries::start(pool.clone());
        let mut pg = Postgres {
            outbox_stats: stats::OutboxStats::new(pool.clone()),
            pool,
            replica,
            options,
            notifications,
            inbox: Arc::new(Notify::new()),
            tasks: vec![recording],
            claims: held::Claims::default(),
            records: held::Records::default(),
            deliveries,
        };
        pg.start_listener(url)?;
        Ok(pg)
    }

    /// This replica's name in leases and claims.
    fn replica(&self) -> &str {
        &self.replica
    }

    /// Notifications on [`CHANNELS`], from every replica.
    fn notifications(&self) -> broadcast::Receiver<Notification> {
        self.notifications.subscribe()
    }

    /// Keeps one connection LISTENing on [`CHANNELS`] (reconnecting when it
    /// drops), and wakes the inbox watchers on every inbox notification and
    /// every poll interval.
    fn start_listener(&mut self, url: &DatabaseUrl) -> Result<(), Error> {
        let config = url.session(self.options.statement_timeout);
        let tls = url.tls()?;
        let tx = self.notifications.clone();
        let inbox = self.inbox.clone();
        let poll = self.options.poll;
        self.tasks.push(tokio::spawn({
            let inbox = inbox.clone();
            async move {
                loop {
                    tokio::time::sleep(poll).await;
                    inbox.notify_one();
                }
            }
        }));
        // Bounds the whole startup, as the pool's create timeout does.
        let connect_within = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        self.tasks.push(tokio::spawn(async move {
            let mut first = true;
            loop {
                match tokio::time::timeout(connect_within, config.connect(tls.clone())).await {
                    Ok(Ok((client, mut connection))) => {
                        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
                        let forward = tx.clone();
                        let wake = inbox.clone();
                        let driver = tokio::spawn(async move {
                            loop {
                                let message =
                                    std::future::poll_fn(|cx| connection.poll_message(cx)).await;
                                match message {
                                    Some(Ok(AsyncMessage::Notification(n))) => {
                                        if n.channel() == INBOX_CHANNEL {
                                            wake.notify_one();
                                        }
                                        let _ = forward.send(Notification {
                                            channel: n.channel().to_string(),
                                            payload: n.payload().to_string(),
                                        });
                                    }
                                    Some(Ok(_)) => {}
                                    Some(Err(e)) => {
                                        tracing::warn!(error = %e, "postgres listener lost its connection");
                                        break;
                                    }
                                    None => break,
                                }
                            }
                            let _ = done_tx.send(());
                        });
                        let listen: String =
                            CHANNELS.iter().map(|c| format!("LISTEN {c};")).collect();
                        if let Err(e) = client.batch_execute(&listen).await {
                            tracing::warn!(error = %e, "postgres LISTEN failed");
                        } else if !first {
                            // Anything sent while we were away is lost:
                            // tell every subscriber to look again.
                            for c in CHANNELS {
                                let _ = tx.send(Notification {
                                    channel: c.to_string(),
                                    payload: String::new(),
                                });
                            }
                            inbox.notify_one();
                        }
                        first = false;
                        let _ = (&mut done_rx).await;
                        driver.abort();
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "postgres listener cannot connect");
                        first = false;
                    }
                    Err(_) => {
                        tracing::debug!("postgres listener: no answer from the server");
                        first = false;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
        Ok(())
    }

    /// Later operations fail with [`StoreError::Closed`].
    fn close(&self) {
        self.pool.close();
    }

    async fn conn(&self) -> Result<Conn, Error> {
        self.pool.get().await
    }

    /// A round trip on a pooled connection: fails when the database cannot
    /// be reached (or the store is closed).
    async fn ping(&self) -> Result<(), Error> {
        let mut c = self.conn().await?;
        c.query("SELECT 1", &[]).await?;
        Ok(())
    }

    // ---- inbox ---------------------------------------------------------

    async fn insert_event(&self, event: Event) -> Result<Inserted, Error> {
        let payload =
            serde_json::to_string(&event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let status = if event.dispatched() {
            "pending"
        } else {
            "recorded"
        };
        let now = now_ms();
        let handled_at = (status != "pending").then_some(now);
        let conversation = event.conversation_id().filter(|_| event.dispatched());
        let mut c = self.conn().await?;
        // The event a lane will handle takes its conversation's lease in
        // the same statement, as the lane's claim would, and reads what the
        // claim reads (the conversation's other pending events and its
        // record): the claim then costs nothing (see `held`).
        let rows = c
            .query(
                "WITH ins AS (
                    INSERT INTO events (key, name, conversation_id, created_at, payload, status, received_at, handled_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                    ON CONFLICT (key) DO NOTHING RETURNING seq
                 ), lease AS (
                    INSERT INTO conversation_leases (conversation_id, owner, expires_at)
                    SELECT $9, $10, now() + make_interval(secs => $11) FROM ins WHERE $9::text IS NOT NULL
                    ON CONFLICT (conversation_id) DO UPDATE
                    SET owner = excluded.owner, expires_at = excluded.expires_at
                    WHERE conversation_leases.owner = excluded.owner
                       OR conversation_leases.expires_at < now()
                    RETURNING 1
                 ), held AS (
                    SELECT count(*) AS n FROM lease
                 ), nudge AS (
                    SELECT pg_notify('digibot_inbox', $9) FROM ins, held
                    WHERE $9::text IS NOT NULL AND held.n = 0
                 )
                 SELECT ins.seq, held.n, (SELECT count(*) FROM nudge),
                        c.id, c.state, c.changed_at, c.reason, c.channel, c.last_customer_at, c.last_agent_at, c.customer_id, c.version,
                        e.seq, e.payload, e.received_at
                 FROM ins CROSS JOIN held
                 LEFT JOIN conversations c ON held.n > 0 AND c.id = $9
                 LEFT JOIN events e ON held.n > 0 AND e.conversation_id = $9 AND e.status = 'pending'
                 ORDER BY e.seq",
                &[
                    &event.key,
                    &event.name,
                    &event.conversation_id(),
                    &event.created_at(),
                    &payload,
                    &status,
                    &now,
                    &handled_at,
                    &conversation,
                    &self.replica,
                    &secs(self.options.lease),
                ],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(Inserted::Duplicate);
        };
        let seq: i64 = first.try_get(0)?;
        if let Some(conversation) = conversation {
            let claim = if first.try_get::<_, i64>(1)? == 0 {
                held::Claim::Elsewhere
            } else {
                held::Claim::Held(self.claimed(conversation, &rows, 3)?)
            };
            self.claims.taken(conversation, claim, self.claim_age());
        }
        Ok(Inserted::New(seq))
    }

    /// How long an insert's claim stands for the lane's: a third of the
    /// lease, so the lease it took has most of its time left.
    fn claim_age(&self) -> Duration {
        self.options.lease / 3
    }

    async fn pending_events(&self) -> Result<Vec<StoredEvent>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT seq, payload, received_at FROM events WHERE status = 'pending' ORDER BY seq",
                &[],
            )
            .await?;
        stored_events(&rows)
    }

    async fn pending_in(&self, conversation_id: &str) -> Result<Vec<StoredEvent>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT seq, payload, received_at FROM events
                 WHERE conversation_id = $1 AND status = 'pending' ORDER BY seq",
                &[&conversation_id],
            )
            .await?;
        stored_events(&rows)
    }

    async fn pending_event(&self, key: &str) -> Result<Option<StoredEvent>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT seq, payload, received_at FROM events WHERE key = $1 AND status = 'pending'",
                &[&key],
            )
            .await?;
        Ok(stored_events(&rows)?.pop())
    }

    async fn event(&self, key: &str) -> Result<Option<StoredEvent>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT seq, payload, received_at FROM events WHERE key = $1",
                &[&key],
            )
            .await?;
        Ok(stored_events(&rows)?.pop())
    }

    async fn complete_event(
        &self,
        seq: i64,
        conversation_id: String,
        outcomes: serde_json::Value,
        actions: Vec<NewAction>,
        kv: Vec<KvChanges>,
        update: ConversationUpdate,
    ) -> Result<Completed, Error> {
        let now = now_ms();
        let outcomes = outcomes.to_string();
        let mut a: [Vec<String>; 5] = Default::default();
        for action in &actions {
            a[0].push(action.plugin.clone());
            a[1].push(action.idempotency_key.clone());
            a[2].push(action.method.clone());
            a[3].push(action.path.clone());
            a[4].push(action.body.to_string());
        }
        let (sets, deletes) = kv_final(&kv);
        let scoped = scoped_final(&kv);
        let mut c = self.conn().await?;
        // Timer schedules and customer and plugin KV writes follow the
        // statement below in one transaction (only when the turns made
        // some: the usual event needs none).
        let timer_ops = update.archive.is_none() && update.timers.iter().any(|t| !t.ops.is_empty());
        // So does a hand-back's `digibot.resumed` event.
        let handing_back = update.change.as_ref().is_some_and(hands_back);
        let transaction = timer_ops || handing_back || !scoped.is_empty();
        if transaction {
            c.execute("BEGIN", &[]).await?;
        }
        let applied = async {
            let human = match handing_back {
                true => human_turn(&mut c, &conversation_id).await?,
                false => None,
            };
            let done = self
                .complete_in(
                    &mut c,
                    seq,
                    &conversation_id,
                    &outcomes,
                    &a,
                    &sets,
                    &deletes,
                    &update,
                    now,
                    // A hand-back queues its `digibot.resumed` event after
                    // the statement: the lease stays for it.
                    !handing_back,
                )
                .await?;
            if done.completed && timer_ops {
                apply_timer_ops(&mut c, &conversation_id, &update.timers, now).await?;
            }
            if done.completed && !scoped.is_empty() {
                apply_scoped_kv(&mut c, &scoped, now).await?;
            }
            if let (true, Some(change), Some((taken_at, messages))) =
                (done.changed, &update.change, human)
            {
                // This event's own message counts too (the statement above
                // reset the count as it changed hands).
                let own =
                    i64::from(update.customer_at.is_some()) + i64::from(update.agent_at.is_some());
                record_resume(
                    &mut c,
                    &conversation_id,
                    &change.reason,
                    taken_at,
                    messages + own,
                    now,
                )
                .await?;
            }
            Ok::<_, Error>(done)
        }
        .await;
        if !transaction {
            if let Ok(done) = &applied {
                self.outbox_stats.queued(done.queued);
            }
            return applied;
        }
        match applied {
            Ok(done) => {
                c.execute("COMMIT", &[]).await?;
                self.outbox_stats.queued(done.queued);
                if handing_back {
                    // The resume's record came after the statement's row.
                    self.records.forget(&conversation_id);
                }
                Ok(done)
            }
            Err(e) => {
                let _ = c.execute("ROLLBACK", &[]).await;
                Err(e)
            }
        }
    }

    /// [`complete_event`](Self::complete_event)'s one statement.
    #[allow(clippy::too_many_arguments)]
    async fn complete_in(
        &self,
        c: &mut Conn,
        seq: i64,
        conversation_id: &str,
        outcomes: &str,
        a: &[Vec<String>; 5],
        (sets, expires): &([Vec<String>; 4], Vec<Option<i64>>),
        deletes: &[Vec<String>; 3],
        update: &ConversationUpdate,
        now: i64,
        may_release: bool,
    ) -> Result<Completed, Error> {
        let change_to = update.change.as_ref().map(|c| c.to.as_str());
        let change_from = update
            .change
            .as_ref()
            .and_then(|c| c.from)
            .map(|s| s.as_str());
        let reason = update.change.as_ref().map(|c| c.reason.as_str());
        let kv_writes = !sets[0].is_empty() || !deletes[0].is_empty();
        // One statement, so one round trip and one atomic commit: the lease
        // check, the status guard (a second completion queues nothing), the
        // lease renewal, the actions in order, the KV writes.
        let row = c
            .query_one(
                if kv_writes {
                    &COMPLETE_WITH_KV
                } else {
                    &COMPLETE_WITHOUT_KV
                },
                &[
                    &seq,
                    &conversation_id,
                    &now,
                    &outcomes,
                    &self.replica,
                    &secs(self.options.lease),
                    &a[0],
                    &a[1],
                    &a[2],
                    &a[3],
                    &a[4],
                    &sets[0],
                    &sets[1],
                    &sets[2],
                    &sets[3],
                    &deletes[0],
                    &deletes[1],
                    &deletes[2],
                    &change_to,
                    &change_from,
                    &reason,
                    &update.channel,
                    &update.customer_at,
                    &update.agent_at,
                    &update.archive,
                    expires,
                    &update.customer_id,
                    &update.expect.map(|s| s.as_str()),
                    &may_release,
                ],
            )
            .await?;
        if row.try_get::<_, bool>(1)? {
            return Err(StoreError::LeaseLost(conversation_id.to_string()).into());
        }
        if row.try_get::<_, bool>(6)? {
            self.records.forget(conversation_id);
            return Ok(Completed {
                stale: true,
                ..Completed::default()
            });
        }
        if row.try_get::<_, bool>(7)? {
            self.claims.released(conversation_id);
        }
        if row.try_get::<_, Option<String>>(8)?.is_some() {
            self.records
                .seen(row.try_get(16)?, conversation_record(&row, 8)?);
        }
        Ok(Completed {
            queued: row.try_get::<_, i64>(0)? as usize,
            completed: row.try_get(3)?,
            changed: row.try_get(4)?,
            archived: row.try_get::<_, i64>(5)? as usize,
            stale: false,
        })
    }

    // ---- conversation state ------------------------------------------------

    async fn conversation_state(&self, id: &str) -> Result<Option<ConversationRecord>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT id, state, changed_at, reason, channel, last_customer_at, last_agent_at, customer_id, version
                 FROM conversations WHERE id = $1",
                &[&id],
            )
            .await?;
        let Some(row) = rows.first() else {
            self.records.forget(id);
            return Ok(None);
        };
        let record = conversation_record(row, 0)?;
        self.records.seen(row.try_get(8)?, record.clone());
        Ok(Some(record))
    }

    /// What this replica last read or wrote of the conversation (see
    /// `held::Records`), else a read.
    async fn cached_conversation_state(
        &self,
        id: &str,
    ) -> Result<Option<ConversationRecord>, Error> {
        match self.records.get(id) {
            Some(record) => Ok(Some(record)),
            None => self.conversation_state(id).await,
        }
    }

    async fn conversation_states(
        &self,
        state: Option<ConversationState>,
        limit: usize,
    ) -> Result<Vec<ConversationRecord>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT id, state, changed_at, reason, channel, last_customer_at, last_agent_at, customer_id
                 FROM conversations WHERE $1::text IS NULL OR state = $1
                 ORDER BY changed_at DESC, id LIMIT $2",
                &[&state.map(|s| s.as_str()), &(limit as i64)],
            )
            .await?;
        rows.iter().map(|r| conversation_record(r, 0)).collect()
    }

    async fn is_own_message(&self, conversation_id: &str, message_id: &str) -> Result<bool, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT 1 FROM sent_messages WHERE conversation_id = $1 AND message_id = $2",
                &[&conversation_id, &message_id],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn release(&self, id: &str, reason: String) -> Result<Release, Error> {
        let mut c = self.conn().await?;
        let now = now_ms();
        c.execute("BEGIN", &[]).await?;
        let released = async {
            let row = c
                .query_opt(
                    "SELECT state, changed_at, messages FROM conversations WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?;
            let Some(row) = row else {
                return Ok(Release::Unknown);
            };
            let state = parse_state(row.try_get(0)?)?;
            if state != ConversationState::Human {
                return Ok(Release::NotHuman(state));
            }
            c.execute(
                "UPDATE conversations SET state = 'bot', changed_at = $2, reason = $3, messages = 0
                 WHERE id = $1",
                &[&id, &now, &reason],
            )
            .await?;
            record_resume(&mut c, id, &reason, row.try_get(1)?, row.try_get(2)?, now).await?;
            Ok::<_, Error>(Release::Released)
        }
        .await;
        match released {
            Ok(release) => {
                c.execute("COMMIT", &[]).await?;
                self.records.forget(id);
                Ok(release)
            }
            Err(e) => {
                let _ = c.execute("ROLLBACK", &[]).await;
                Err(e)
            }
        }
    }

    async fn recent_events(&self, limit: usize) -> Result<Vec<EventSummary>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT seq, key, name, conversation_id, status, received_at, handled_at, outcomes
                 FROM events ORDER BY seq DESC LIMIT $1",
                &[&(limit as i64)],
            )
            .await?;
        rows.iter().map(event_summary).collect()
    }

    async fn recent_conversations(&self, limit: usize) -> Result<Vec<ConversationSummary>, Error> {
        let mut c = self.conn().await?;
        // The window is a range of sequence numbers, as on SQLite (here
        // duplicates use up numbers too, so it may hold a few fewer).
        let rows = c
            .query(
                "WITH recent AS (
                    SELECT conversation_id, COUNT(*) AS events, MIN(received_at) AS first_at,
                           MAX(received_at) AS last_at,
                           SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END)::BIGINT AS pending,
                           MAX(seq) AS last_seq
                    FROM events
                    WHERE seq > (SELECT COALESCE(MAX(seq), 0) FROM events) - $1
                      AND conversation_id IS NOT NULL
                    GROUP BY conversation_id ORDER BY MAX(seq) DESC LIMIT $2
                 ), actions AS (
                    SELECT conversation_id,
                           COUNT(*) FILTER (WHERE status = 'sent') AS sent,
                           COUNT(*) FILTER (WHERE status = 'pending') AS pending,
                           COUNT(*) FILTER (WHERE status = 'dead') AS dead
                    FROM outbox
                    WHERE id > (SELECT COALESCE(MAX(id), 0) FROM outbox) - $1
                      AND conversation_id IN (SELECT conversation_id FROM recent)
                    GROUP BY conversation_id
                 )
                 SELECT r.conversation_id, r.events, r.first_at, r.last_at, r.pending, e.name,
                        COALESCE(a.sent, 0), COALESCE(a.pending, 0), COALESCE(a.dead, 0),
                        s.id, s.state, s.changed_at, s.reason, s.channel, s.last_customer_at, s.last_agent_at, s.customer_id
                 FROM recent r JOIN events e ON e.seq = r.last_seq
                 LEFT JOIN actions a ON a.conversation_id = r.conversation_id
                 LEFT JOIN conversations s ON s.id = r.conversation_id
                 ORDER BY r.last_seq DESC",
                &[&CONVERSATION_WINDOW, &(limit as i64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ConversationSummary {
                    conversation_id: r.try_get(0)?,
                    events: r.try_get(1)?,
                    first_event_at: r.try_get(2)?,
                    last_event_at: r.try_get(3)?,
                    pending_events: r.try_get(4)?,
                    last_event: r.try_get(5)?,
                    actions: ActionCounts {
                        sent: r.try_get(6)?,
                        pending: r.try_get(7)?,
                        dead: r.try_get(8)?,
                    },
                    state: match r.try_get::<_, Option<String>>(9)? {
                        Some(_) => Some(conversation_record(r, 9)?),
                        None => None,
                    },
                })
            })
            .collect()
    }

    async fn conversation(&self, conversation_id: &str) -> Result<ConversationDetail, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT seq, key, name, conversation_id, status, received_at, handled_at, outcomes
                 FROM events
                 WHERE seq > (SELECT COALESCE(MAX(seq), 0) FROM events) - $1 AND conversation_id = $2
                 ORDER BY seq",
                &[&CONVERSATION_WINDOW, &conversation_id],
            )
            .await?;
        let events = rows.iter().map(event_summary).collect::<Result<_, _>>()?;
        let rows = c
            .query(
                "SELECT id, event_seq, conversation_id, plugin, idempotency_key, method, path, body,
                        status, attempts, next_attempt_at, last_status, last_error, created_at
                 FROM outbox
                 WHERE id > (SELECT COALESCE(MAX(id), 0) FROM outbox) - $1 AND conversation_id = $2
                 ORDER BY id",
                &[&CONVERSATION_WINDOW, &conversation_id],
            )
            .await?;
        let actions = rows.iter().map(outbox_row).collect::<Result<_, _>>()?;
        let rows = c
            .query(
                "SELECT id, state, changed_at, reason, channel, last_customer_at, last_agent_at, customer_id
                 FROM conversations WHERE id = $1",
                &[&conversation_id],
            )
            .await?;
        let state = rows
            .first()
            .map(|r| conversation_record(r, 0))
            .transpose()?;
        Ok(ConversationDetail {
            conversation_id: conversation_id.to_string(),
            events,
            actions,
            state,
            timers: self.pending_timers(&mut c, conversation_id).await?,
        })
    }

    // ---- timers --------------------------------------------------------

    async fn pending_timers(
        &self,
        c: &mut Conn,
        conversation_id: &str,
    ) -> Result<Vec<TimerRecord>, Error> {
        let rows = c
            .query(
                "SELECT id, plugin, conversation_id, name, payload, scheduled_at, due_at, cancel_on_message
                 FROM timers WHERE conversation_id = $1 ORDER BY due_at, id",
                &[&conversation_id],
            )
            .await?;
        rows.iter().map(timer_row).collect()
    }

    async fn history(
        &self,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, Error> {
        let limit = limit.min(digibot_domain::history::HISTORY_MAX) as i64;
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT seq, payload, received_at FROM events
                 WHERE conversation_id = $1 AND name = 'live_chat.new_message'
                 ORDER BY seq DESC LIMIT $2",
                &[&conversation_id, &(limit * 2)],
            )
            .await?;
        let received = stored_events(&rows)?
            .into_iter()
            .map(|s| (s.event, s.received_at, s.seq))
            .collect();
        let rows = c
            .query(
                "SELECT message_id FROM sent_messages WHERE conversation_id = $1
                 ORDER BY sent_at DESC LIMIT $2",
                &[&conversation_id, &(limit * 4)],
            )
            .await?;
        let own = rows
            .iter()
            .map(|r| r.try_get::<_, String>(0))
            .collect::<Result<std::collections::HashSet<_>, _>>()?;
        let rows = c
            .query(
                "SELECT body, created_at, event_seq FROM outbox
                 WHERE conversation_id = $1 AND status IN ('sent', 'pending')
                 ORDER BY id DESC LIMIT $2",
                &[&conversation_id, &limit],
            )
            .await?;
        let mut requests = Vec::new();
        for r in &rows {
            let body: String = r.try_get(0)?;
            if let Ok(body) = serde_json::from_str(&body) {
                requests.push((body, r.try_get::<_, i64>(1)?, r.try_get::<_, i64>(2)?));
            }
        }
        Ok(digibot_domain::history::assemble(
            received,
            &own,
            requests,
            limit as usize,
        ))
    }

    async fn timer_names(&self, plugin: &str, conversation_id: &str) -> Result<Vec<String>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT name FROM timers WHERE plugin = $1 AND conversation_id = $2 ORDER BY name",
                &[&plugin, &conversation_id],
            )
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    /// Turns due timers into inbox events in one transaction; the rows are
    /// locked `SKIP LOCKED`, so replicas polling at once take different
    /// timers, and each timer becomes one event.
    async fn fire_due_timers(&self, now: i64, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        let mut c = self.conn().await?;
        let any = c
            .query_opt("SELECT 1 FROM timers WHERE due_at <= $1 LIMIT 1", &[&now])
            .await?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        c.execute("BEGIN", &[]).await?;
        let fired = Self::fire_in(&mut c, now, limit).await;
        match fired {
            Ok(fired) => {
                c.execute("COMMIT", &[]).await?;
                if !fired.is_empty() {
                    let _ = c
                        .execute("SELECT pg_notify($1, '')", &[&INBOX_CHANNEL])
                        .await;
                }
                Ok(fired)
            }
            Err(e) => {
                let _ = c.execute("ROLLBACK", &[]).await;
                Err(e)
            }
        }
    }

    async fn fire_in(c: &mut Conn, now: i64, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        let rows = c
            .query(
                "WITH due AS (
                    SELECT t.id FROM timers t
                    WHERE t.due_at <= $1
                      AND COALESCE((SELECT state FROM conversations c WHERE c.id = t.conversation_id), 'bot') = 'bot'
                    ORDER BY t.due_at, t.id LIMIT $2 FOR UPDATE SKIP LOCKED
                 )
                 DELETE FROM timers USING due WHERE timers.id = due.id
                 RETURNING timers.id, timers.plugin, timers.conversation_id, timers.name, timers.payload,
                           timers.scheduled_at, timers.due_at, timers.cancel_on_message",
                &[&now, &(limit as i64)],
            )
            .await?;
        let mut timers = rows.iter().map(timer_row).collect::<Result<Vec<_>, _>>()?;
        timers.sort_by(|a, b| (a.due_at, &a.id).cmp(&(b.due_at, &b.id)));
        let mut fired = Vec::new();
        for t in timers {
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
            let payload =
                serde_json::to_string(&event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let received_at = now_ms();
            let row = c
                .query_opt(
                    "INSERT INTO events (key, name, conversation_id, created_at, payload, status, received_at)
                     VALUES ($1, $2, $3, NULL, $4, 'pending', $5)
                     ON CONFLICT (key) DO NOTHING RETURNING seq",
                    &[&event.key, &event.name, &event.conversation_id(), &payload, &received_at],
                )
                .await?;
            if let Some(row) = row {
                fired.push(StoredEvent {
                    seq: row.try_get(0)?,
                    event,
                    received_at,
                });
            }
        }
        Ok(fired)
    }

    // ---- conversations -------------------------------------------------

    async fn claim_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Option<Vec<StoredEvent>>, Error> {
        // The webhook's insert claimed it moments ago (see `insert_event`).
        match self.claims.take(conversation_id, self.claim_age()) {
            Some(held::Claim::Held(others)) => return Ok(Some(others)),
            Some(held::Claim::Elsewhere) => return Ok(None),
            None => {}
        }
        let mut c = self.conn().await?;
        // Taken when free, expired, or already ours; when another replica
        // holds it, that replica is told (NOTIFY) an event waits for it.
        let rows = c
            .query(
                "WITH lease AS (
                    INSERT INTO conversation_leases (conversation_id, owner, expires_at)
                    VALUES ($1, $2, now() + make_interval(secs => $3))
                    ON CONFLICT (conversation_id) DO UPDATE
                    SET owner = excluded.owner, expires_at = excluded.expires_at
                    WHERE conversation_leases.owner = excluded.owner
                       OR conversation_leases.expires_at < now()
                    RETURNING 1
                 ), held AS (
                    SELECT count(*) AS n FROM lease
                 ), nudge AS (
                    SELECT pg_notify('digibot_inbox', $1) FROM held WHERE n = 0
                 )
                 SELECT held.n, (SELECT count(*) FROM nudge),
                        c.id, c.state, c.changed_at, c.reason, c.channel, c.last_customer_at, c.last_agent_at, c.customer_id, c.version,
                        e.seq, e.payload, e.received_at
                 FROM held
                 LEFT JOIN conversations c ON held.n > 0 AND c.id = $1
                 LEFT JOIN events e
                   ON held.n > 0 AND e.conversation_id = $1 AND e.status = 'pending'
                 ORDER BY e.seq",
                &[&conversation_id, &self.replica, &secs(self.options.lease)],
            )
            .await?;
        let held = rows
            .first()
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()?
            .unwrap_or(0);
        if held == 0 {
            return Ok(None);
        }
        self.claims.claimed(conversation_id);
        Ok(Some(self.claimed(conversation_id, &rows, 2)?))
    }

    /// What a claim's rows hold from column `at` on: the conversation's
    /// record and its version (kept in `records`; none yet: read afresh
    /// when needed), then its pending events (`seq`, `payload`,
    /// `received_at`), one a row.
    fn claimed(
        &self,
        conversation: &str,
        rows: &[Row],
        at: usize,
    ) -> Result<Vec<StoredEvent>, Error> {
        if let Some(first) = rows.first() {
            match first.try_get::<_, Option<String>>(at)? {
                Some(_) => self
                    .records
                    .seen(first.try_get(at + 8)?, conversation_record(first, at)?),
                None => self.records.forget(conversation),
            }
        }
        let mut events = Vec::new();
        for r in rows {
            if let Some(seq) = r.try_get::<_, Option<i64>>(at + 9)? {
                events.push(stored_event(seq, r.try_get(at + 10)?, r.try_get(at + 11)?)?);
            }
        }
        Ok(events)
    }

    async fn release_conversation(&self, conversation_id: &str) -> Result<Vec<StoredEvent>, Error> {
        // Its last completion gave the lease back already.
        if self.claims.was_released(conversation_id) {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        // Kept (and the events returned) while events of the conversation
        // wait: those arrived at other replicas meanwhile.
        let rows = c
            .query(
                "WITH waiting AS (
                    SELECT seq, payload, received_at FROM events
                    WHERE conversation_id = $1 AND status = 'pending'
                 ), released AS (
                    DELETE FROM conversation_leases
                    WHERE conversation_id = $1 AND owner = $2
                      -- Not if an insert renewed it since this statement's
                      -- snapshot (its event is pending, unseen here): a
                      -- changed row fails this on the recheck.
                      AND expires_at = (SELECT expires_at FROM conversation_leases WHERE conversation_id = $1)
                      AND NOT EXISTS (SELECT 1 FROM waiting)
                    RETURNING 1
                 )
                 SELECT seq, payload, received_at, (SELECT count(*) FROM released) FROM waiting ORDER BY seq",
                &[&conversation_id, &self.replica],
            )
            .await?;
        stored_events(&rows)
    }

    async fn claimable_events(&self, limit: usize) -> Result<Vec<StoredEvent>, Error> {
        let mut c = self.conn().await?;
        // Ours, or orphaned: no live lease, and old enough that the replica
        // which received it had its chance.
        let settled = now_ms() - self.options.poll.as_millis() as i64 * 2;
        let rows = c
            .query(
                "SELECT e.seq, e.payload, e.received_at FROM events e
                 LEFT JOIN conversation_leases l ON l.conversation_id = e.conversation_id
                 WHERE e.status = 'pending' AND e.conversation_id IS NOT NULL
                   AND (l.owner = $1 OR ((l.owner IS NULL OR l.expires_at < now()) AND e.received_at < $2))
                 ORDER BY e.seq LIMIT $3",
                &[&self.replica, &settled, &(limit as i64)],
            )
            .await?;
        stored_events(&rows)
    }

    /// Woken when work may wait in the inbox for this replica.
    fn inbox_wakeups(&self) -> Option<Arc<Notify>> {
        Some(self.inbox.clone())
    }

    // ---- KV --------------------------------------------------------------

    async fn kv_get_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Result<Option<String>, Error> {
        let mut c = self.conn().await?;
        let now = now_ms();
        let rows = match scope {
            KvScope::Conversation => {
                c.query(
                    "SELECT value FROM kv WHERE plugin = $1 AND conversation_id = $2 AND key = $3
                       AND (expires_at IS NULL OR expires_at > $4)",
                    &[&plugin, &conversation_id, &key, &now],
                )
                .await?
            }
            _ => {
                c.query(
                    "SELECT value FROM kv_scoped WHERE plugin = $1 AND scope = $2 AND owner = $3 AND key = $4
                       AND (expires_at IS NULL OR expires_at > $5)",
                    &[&plugin, &scope.scope().as_str(), &scope.owner(), &key, &now],
                )
                .await?
            }
        };
        Ok(rows.first().map(|r| r.try_get(0)).transpose()?)
    }

    async fn kv_usage_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
    ) -> Result<KvUsage, Error> {
        let mut c = self.conn().await?;
        let row = match scope {
            KvScope::Conversation => c
                .query_one(
                    "SELECT COALESCE((SELECT keys FROM kv_usage WHERE conversation_id = $2 AND plugin = $1), 0),
                            COALESCE((SELECT bytes FROM kv_usage WHERE conversation_id = $2 AND plugin = $1), 0),
                            COALESCE((SELECT sum(keys) FROM kv_plugin_usage WHERE plugin = $1), 0)::bigint,
                            COALESCE((SELECT sum(bytes) FROM kv_plugin_usage WHERE plugin = $1), 0)::bigint",
                    &[&plugin, &conversation_id],
                )
                .await?,
            _ => c
                .query_one(
                    "SELECT COALESCE((SELECT keys FROM kv_scoped_usage WHERE plugin = $1 AND scope = $2 AND owner = $3), 0),
                            COALESCE((SELECT bytes FROM kv_scoped_usage WHERE plugin = $1 AND scope = $2 AND owner = $3), 0),
                            COALESCE((SELECT sum(keys) FROM kv_plugin_usage WHERE plugin = $1), 0)::bigint,
                            COALESCE((SELECT sum(bytes) FROM kv_plugin_usage WHERE plugin = $1), 0)::bigint",
                    &[&plugin, &scope.scope().as_str(), &scope.owner()],
                )
                .await?,
        };
        Ok(KvUsage {
            scope: KvSize {
                keys: row.try_get(0)?,
                bytes: row.try_get(1)?,
            },
            plugin: KvSize {
                keys: row.try_get(2)?,
                bytes: row.try_get(3)?,
            },
        })
    }

    // ---- outbox ------------------------------------------------------------

    async fn outbox_heads(&self, limit: usize) -> Result<Vec<OutboxAction>, Error> {
        let replica = self.replica.clone();
        let claim = secs(self.options.claim);
        let mut c = self.conn().await?;
        // Every head returned is claimed for this replica, due or not:
        // the sender starts those due by its own clock and sleeps until
        // the next, so it must never see one it does not hold. Its own
        // claims come back too (renewed); it skips what it has in
        // flight. Conditions on `o` are rechecked on the latest row
        // version after the lock, so a head sent or claimed meanwhile
        // is passed over.
        let mut rows = c
            .query(OUTBOX_CLAIM_SQL, &[&replica, &(limit as i64), &claim])
            .await?
            .iter()
            .map(outbox_row)
            .collect::<Result<Vec<_>, _>>()?;
        rows.sort_by_key(|a| (a.next_attempt_at, a.id));
        Ok(rows)
    }

    async fn outbox_counts(&self) -> Result<Vec<(String, i64)>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query("SELECT status, COUNT(*) FROM outbox GROUP BY status", &[])
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn outbox_depth(&self) -> Result<OutboxDepth, Error> {
        let mut c = self.conn().await?;
        let row = c
            .query_one(
                "SELECT (SELECT COUNT(*) FROM outbox WHERE status = 'pending'),
                        (SELECT COUNT(*) FROM outbox WHERE status = 'dead')",
                &[],
            )
            .await?;
        Ok(OutboxDepth {
            pending: row.try_get(0)?,
            dead: row.try_get(1)?,
        })
    }

    async fn mark_sent(
        &self,
        id: i64,
        status: u16,
        message_id: Option<String>,
        hand_off: bool,
    ) -> Result<bool, Error> {
        if !hand_off {
            self.deliveries
                .record(sent::Delivery {
                    id,
                    status,
                    message_id,
                })
                .await?;
            return Ok(false);
        }
        let mut c = self.conn().await?;
        let reason = format!("hand-off delivered (action {id})");
        // One statement: the delivery, its message id, and a delivered
        // hand-off taking the conversation from the bot.
        let row = c
            .query_one(
                "WITH sent AS (
                    UPDATE outbox SET status = 'sent', attempts = attempts + 1, last_status = $2, last_error = NULL,
                    done_at = $3, claimed_by = NULL, claim_expires = NULL WHERE id = $1
                    RETURNING conversation_id
                 ), ids AS (
                    INSERT INTO sent_messages (conversation_id, message_id, action_id, sent_at)
                    SELECT conversation_id, $4::text, $1, $3 FROM sent WHERE $4::text IS NOT NULL
                    ON CONFLICT (conversation_id, message_id) DO NOTHING
                    RETURNING 1
                 ), handed AS (
                    INSERT INTO conversations (id, state, changed_at, reason)
                    SELECT conversation_id, 'human', $3, $5 FROM sent WHERE $6
                    ON CONFLICT (id) DO UPDATE
                    SET state = 'human', changed_at = excluded.changed_at, reason = excluded.reason, messages = 0
                    WHERE conversations.state = 'bot'
                    RETURNING 1
                 )
                 SELECT EXISTS (SELECT 1 FROM handed), (SELECT count(*) FROM ids), (SELECT conversation_id FROM sent)",
                &[
                    &id,
                    &(status as i64),
                    &now_ms(),
                    &message_id,
                    &reason,
                    &hand_off,
                ],
            )
            .await?;
        let handed: bool = row.try_get(0)?;
        if handed && let Some(conversation) = row.try_get::<_, Option<&str>>(2)? {
            self.records.forget(conversation);
        }
        Ok(handed)
    }

    async fn mark_retry(
        &self,
        id: i64,
        next_attempt_at: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), Error> {
        let mut c = self.conn().await?;
        c
            .execute(
                // Only while pending: an action archived during its attempt
                // stays a dead letter.
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $2, last_status = $3, last_error = $4,
                 claimed_by = NULL, claim_expires = NULL WHERE id = $1 AND status = 'pending'",
                &[
                    &id,
                    &next_attempt_at,
                    &last_status.map(i64::from),
                    &last_error,
                ],
            )
            .await?;
        Ok(())
    }

    async fn mark_dead(
        &self,
        id: i64,
        last_status: Option<u16>,
        last_error: String,
    ) -> Result<(), Error> {
        let mut c = self.conn().await?;
        c
            .execute(
                // An action archived during its attempt keeps its reason.
                "UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_status = $2, last_error = $3,
                 done_at = $4, claimed_by = NULL, claim_expires = NULL WHERE id = $1 AND status = 'pending'",
                &[&id, &last_status.map(i64::from), &last_error, &now_ms()],
            )
            .await?;
        Ok(())
    }

    // ---- dead letters ------------------------------------------------------

    async fn dead_letters(&self) -> Result<Vec<OutboxAction>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT id, event_seq, conversation_id, plugin, idempotency_key, method, path, body,
                        status, attempts, next_attempt_at, last_status, last_error, created_at
                 FROM outbox WHERE status = 'dead' ORDER BY id",
                &[],
            )
            .await?;
        rows.iter().map(outbox_row).collect()
    }

    async fn retry_dead(&self, id: Option<i64>) -> Result<usize, Error> {
        let mut c = self.conn().await?;
        let n = c
            .execute(
                "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2, done_at = NULL,
                 claimed_by = NULL, claim_expires = NULL
                 WHERE status = 'dead' AND ($1::BIGINT IS NULL OR id = $1)",
                &[&id, &now_ms()],
            )
            .await?;
        Ok(n as usize)
    }

    async fn drop_dead(&self, id: i64) -> Result<bool, Error> {
        let mut c = self.conn().await?;
        let n = c
            .execute(
                "DELETE FROM outbox WHERE status = 'dead' AND id = $1",
                &[&id],
            )
            .await?;
        Ok(n > 0)
    }

    // ---- outbound call journal ---------------------------------------------

    async fn record_call(&self, entry: JournalEntry) -> Result<(), Error> {
        let request = serde_json::to_string(&entry.request)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (status, headers, body, kind, message) = match entry.outcome {
            JournalOutcome::Response {
                status,
                headers,
                body,
            } => (
                Some(i32::from(status)),
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
        let mut c = self.conn().await?;
        c.execute(
                "INSERT INTO http_journal
                   (event_key, plugin, call, request, status, response_headers, body, error_kind, refusal, elapsed_ms, recorded_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (event_key, plugin, call) DO UPDATE SET
                   request = EXCLUDED.request, status = EXCLUDED.status,
                   response_headers = EXCLUDED.response_headers, body = EXCLUDED.body,
                   error_kind = EXCLUDED.error_kind, refusal = EXCLUDED.refusal,
                   elapsed_ms = EXCLUDED.elapsed_ms, recorded_at = EXCLUDED.recorded_at",
                &[
                    &entry.event_key,
                    &entry.plugin,
                    &(entry.call as i32),
                    &request,
                    &status,
                    &headers,
                    &body,
                    &kind,
                    &message,
                    &(entry.elapsed_ms as i64),
                    &entry.recorded_at,
                ],
            )
            .await?;
        Ok(())
    }

    async fn journal(
        &self,
        event_key: &str,
        plugin: Option<&str>,
    ) -> Result<Vec<JournalEntry>, Error> {
        let mut c = self.conn().await?;
        let plugin = plugin.map(str::to_string);
        let rows = c
            .query(
                "SELECT event_key, plugin, call, request, status, response_headers, body, error_kind, refusal, elapsed_ms, recorded_at
                 FROM http_journal WHERE event_key = $1 AND ($2::TEXT IS NULL OR plugin = $2)
                 ORDER BY plugin, call",
                &[&event_key, &plugin],
            )
            .await?;
        rows.iter().map(journal_row).collect()
    }

    // ---- retention ---------------------------------------------------------

    /// Deletes what `retention` says is old enough, in batches, each its
    /// own statements, so webhooks keep flowing.
    async fn prune(&self, retention: Retention) -> Result<Pruned, StoreError> {
        const BATCH: i64 = 5000;
        digibot_store::prune_in_batches(BATCH as usize, move || async move {
            Ok(self.prune_batch(retention, BATCH).await?)
        })
        .await
    }

    async fn prune_batch(&self, retention: Retention, limit: i64) -> Result<Pruned, Error> {
        // Idle conversations may go: their records are read afresh.
        self.records.clear();
        let mut c = self.conn().await?;
        let mut pruned = Pruned::default();
        if let Some(before) = retention.finished_before {
            pruned.events = c
                .execute(
                    "DELETE FROM events WHERE seq IN (
                       SELECT seq FROM events
                       WHERE status <> 'pending' AND COALESCE(handled_at, received_at) < $1
                         AND seq NOT IN (SELECT event_seq FROM outbox WHERE status IN ('pending', 'dead'))
                       ORDER BY seq LIMIT $2)",
                    &[&before, &limit],
                )
                .await? as usize;
            pruned.actions = c
                .execute(
                    "DELETE FROM outbox WHERE id IN (
                       SELECT id FROM outbox WHERE status = 'sent' AND done_at < $1
                       ORDER BY id LIMIT $2)",
                    &[&before, &limit],
                )
                .await? as usize;
            // Echoes come back within seconds: ids as old as the pruned
            // actions are of no use.
            c.execute("DELETE FROM sent_messages WHERE sent_at < $1", &[&before])
                .await?;
            pruned.calls = c
                .execute(
                    "DELETE FROM http_journal WHERE (event_key, plugin, call) IN (
                       SELECT j.event_key, j.plugin, j.call FROM http_journal j
                       WHERE j.recorded_at < $1
                         AND NOT EXISTS (SELECT 1 FROM events e WHERE e.key = j.event_key AND e.status = 'pending')
                       LIMIT $2)",
                    &[&before, &limit],
                )
                .await? as usize;
        }
        if let Some(before) = retention.dead_before {
            pruned.dead_letters = c
                .execute(
                    "DELETE FROM outbox WHERE id IN (
                       SELECT id FROM outbox WHERE status = 'dead' AND done_at < $1
                       ORDER BY id LIMIT $2)",
                    &[&before, &limit],
                )
                .await? as usize;
        }
        if let Some(before) = retention.idle_before {
            // One statement: the conversations, their KV and the plugins'
            // totals go together. A conversation a replica holds stays.
            let row = c
                .query_one(
                    "WITH idle AS (
                        SELECT id FROM conversations c
                        WHERE active_at < $1
                          AND NOT EXISTS (SELECT 1 FROM events e WHERE e.conversation_id = c.id AND e.status = 'pending')
                          AND NOT EXISTS (SELECT 1 FROM conversation_leases l WHERE l.conversation_id = c.id AND l.expires_at > now())
                          -- A pending timer is work still to come: not idle.
                          AND NOT EXISTS (SELECT 1 FROM timers t WHERE t.conversation_id = c.id)
                        ORDER BY active_at LIMIT $2
                        FOR UPDATE SKIP LOCKED
                     ), usage AS (
                        DELETE FROM kv_usage u USING idle WHERE u.conversation_id = idle.id
                        RETURNING u.conversation_id, u.plugin, u.keys, u.bytes
                     ), totals AS (
                        UPDATE kv_plugin_usage t SET keys = t.keys - g.keys, bytes = t.bytes - g.bytes
                        FROM (SELECT plugin, hashtext(conversation_id) & 15 AS shard,
                                     sum(keys)::bigint AS keys, sum(bytes)::bigint AS bytes
                              FROM usage GROUP BY plugin, hashtext(conversation_id) & 15) g
                        WHERE t.plugin = g.plugin AND t.shard = g.shard
                        RETURNING 1
                     ), entries AS (
                        DELETE FROM kv USING usage
                        WHERE kv.plugin = usage.plugin AND kv.conversation_id = usage.conversation_id
                        RETURNING 1
                     ), unpinned AS (
                        DELETE FROM pins p USING idle WHERE p.conversation_id = idle.id
                     ), gone AS (
                        DELETE FROM conversations c USING idle WHERE c.id = idle.id RETURNING 1
                     )
                     SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM entries), (SELECT count(*) FROM totals)",
                    &[&before, &limit],
                )
                .await?;
            pruned.conversations = row.try_get::<_, i64>(0)? as usize;
            pruned.kv_entries = row.try_get::<_, i64>(1)? as usize;
        }
        if let Some(before) = retention.expired_before {
            pruned.kv_expired = prune_expired(&mut c, before, limit).await?;
        }
        if let Some(before) = retention.customer_idle_before {
            pruned.customer_entries = in_transaction(&mut c, |c| {
                Box::pin(forget_idle_customers(c, before, limit))
            })
            .await?;
        }
        Ok(pruned)
    }
}

/// Applies the migrations this database lacks, under an advisory lock held
/// by the transaction: a replica starting at the same time waits, then
/// finds them applied.
#[async_trait::async_trait]
impl Backend for PgStore {
    fn close(&self) {
        self.0.close()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.0.ping().await?)
    }

    async fn insert_event(&self, event: Event) -> Result<Inserted, StoreError> {
        Ok(self.0.insert_event(event).await?)
    }

    async fn pending_events(&self) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self.0.pending_events().await?)
    }

    async fn pending_event(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        Ok(self.0.pending_event(key).await?)
    }

    async fn pending_in(&self, conversation_id: &str) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self.0.pending_in(conversation_id).await?)
    }

    async fn event(&self, key: &str) -> Result<Option<StoredEvent>, StoreError> {
        Ok(self.0.event(key).await?)
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
        Ok(self.0.conversation_state(id).await?)
    }

    async fn cached_conversation_state(
        &self,
        id: &str,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        Ok(self.0.cached_conversation_state(id).await?)
    }

    async fn conversation_states(
        &self,
        state: Option<ConversationState>,
        limit: usize,
    ) -> Result<Vec<ConversationRecord>, StoreError> {
        Ok(self.0.conversation_states(state, limit).await?)
    }

    async fn is_own_message(
        &self,
        conversation_id: &str,
        message_id: &str,
    ) -> Result<bool, StoreError> {
        Ok(self.0.is_own_message(conversation_id, message_id).await?)
    }

    async fn release(&self, id: &str, reason: String) -> Result<Release, StoreError> {
        Ok(self.0.release(id, reason).await?)
    }

    async fn claim_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Option<Vec<StoredEvent>>, StoreError> {
        Ok(self.0.claim_conversation(conversation_id).await?)
    }

    async fn release_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self.0.release_conversation(conversation_id).await?)
    }

    async fn claimable_events(&self, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self.0.claimable_events(limit).await?)
    }

    fn inbox_wakeups(&self) -> Option<Arc<Notify>> {
        self.0.inbox_wakeups()
    }

    async fn recent_events(&self, limit: usize) -> Result<Vec<EventSummary>, StoreError> {
        Ok(self.0.recent_events(limit).await?)
    }

    async fn recent_conversations(
        &self,
        limit: usize,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        Ok(self.0.recent_conversations(limit).await?)
    }

    async fn fire_due_timers(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self.0.fire_due_timers(now, limit).await?)
    }

    async fn history(
        &self,
        conversation_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        Ok(self.0.history(conversation_id, limit).await?)
    }

    async fn timer_names(
        &self,
        plugin: &str,
        conversation_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self.0.timer_names(plugin, conversation_id).await?)
    }

    async fn conversation(&self, conversation_id: &str) -> Result<ConversationDetail, StoreError> {
        Ok(self.0.conversation(conversation_id).await?)
    }

    async fn kv_get_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .0
            .kv_get_in(plugin, conversation_id, scope, key)
            .await?)
    }

    async fn kv_usage_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
    ) -> Result<KvUsage, StoreError> {
        Ok(self.0.kv_usage_in(plugin, conversation_id, scope).await?)
    }

    async fn outbox_heads(&self, limit: usize) -> Result<Vec<OutboxAction>, StoreError> {
        Ok(self.0.outbox_heads(limit).await?)
    }

    async fn outbox_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(self.0.outbox_counts().await?)
    }

    async fn outbox_depth(&self) -> Result<OutboxDepth, StoreError> {
        Ok(self.0.outbox_depth().await?)
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
        Ok(self.0.dead_letters().await?)
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
        Ok(self.0.journal(event_key, plugin).await?)
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
        Ok(self.0.end_rollout(plugin, id, state, reason).await?)
    }

    async fn rollout(
        &self,
        plugin: &str,
    ) -> Result<Option<digibot_store::RolloutRecord>, StoreError> {
        Ok(self.0.rollouts(Some(plugin)).await?.into_iter().next())
    }

    async fn rollouts(&self) -> Result<Vec<digibot_store::RolloutRecord>, StoreError> {
        Ok(self.0.rollouts(None).await?)
    }

    async fn rollout_bytes(&self, plugin: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.rollout_bytes(plugin, id).await?)
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
        Ok(self.0.pin_version(plugin, conversation_id, version).await?)
    }

    async fn unpin(&self, conversation_id: &str) -> Result<usize, StoreError> {
        Ok(self.0.unpin(conversation_id).await?)
    }

    async fn pins(&self, conversation_id: &str) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self.0.pins(conversation_id).await?)
    }

    async fn comparisons(
        &self,
        plugin: &str,
        id: &str,
        limit: usize,
    ) -> Result<Vec<digibot_store::Comparison>, StoreError> {
        Ok(self.0.comparisons(plugin, id, limit).await?)
    }

    fn plugin_records(&self) -> Option<Arc<dyn PluginRecords>> {
        Some(Arc::new(plugins::PgPlugins::new(self.0.clone())))
    }
}

fn timer_row(r: &Row) -> Result<TimerRecord, Error> {
    Ok(TimerRecord {
        id: r.try_get(0)?,
        plugin: r.try_get(1)?,
        conversation_id: r.try_get(2)?,
        name: r.try_get(3)?,
        payload: r.try_get(4)?,
        scheduled_at: r.try_get(5)?,
        due_at: r.try_get(6)?,
        cancel_on_customer_message: r.try_get(7)?,
    })
}

/// Whether `change` hands a conversation back from a human to the bot.
fn hands_back(change: &digibot_store::StateChange) -> bool {
    change.from == Some(ConversationState::Human) && change.to == ConversationState::Bot
}

/// The human's turn in a conversation in their hands, locked until the
/// transaction ends: when it began, and the messages since.
async fn human_turn(c: &mut Conn, id: &str) -> Result<Option<(i64, i64)>, Error> {
    let row = c
        .query_opt(
            "SELECT changed_at, messages FROM conversations WHERE id = $1 AND state = 'human' FOR UPDATE",
            &[&id],
        )
        .await?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
}

/// Records a hand-back's `digibot.resumed` event (in the caller's
/// transaction, with the release).
async fn record_resume(
    c: &mut Conn,
    id: &str,
    reason: &str,
    taken_at: i64,
    messages: i64,
    now: i64,
) -> Result<(), Error> {
    let event = Resumed {
        conversation_id: id.to_string(),
        cause: Cause::of_reason(reason),
        reason: reason.to_string(),
        taken_at,
        released_at: now,
        messages: u32::try_from(messages).unwrap_or(u32::MAX),
        outside_window: false,
    }
    .into_event();
    let payload = serde_json::to_string(&event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    c.execute(
        "INSERT INTO events (key, name, conversation_id, created_at, payload, status, received_at)
         VALUES ($1, $2, $3, NULL, $4, 'pending', $5)
         ON CONFLICT (key) DO NOTHING",
        &[
            &event.key,
            &event.name,
            &event.conversation_id(),
            &payload,
            &now,
        ],
    )
    .await?;
    Ok(())
}

/// A completed event's timer schedules and cancels, in the order its turns
/// made them, inside `complete_event`'s transaction.
async fn apply_timer_ops(
    c: &mut Conn,
    conversation_id: &str,
    changes: &[TimerChanges],
    now: i64,
) -> Result<(), Error> {
    for change in changes {
        for op in &change.ops {
            match op {
                TimerOp::Schedule {
                    id,
                    name,
                    due_at,
                    payload,
                    cancel_on_customer_message,
                } => {
                    c.execute(
                        "INSERT INTO timers (id, plugin, conversation_id, name, payload, scheduled_at, due_at, cancel_on_message)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                         ON CONFLICT (conversation_id, plugin, name) DO UPDATE SET
                             id = excluded.id, payload = excluded.payload, scheduled_at = excluded.scheduled_at,
                             due_at = excluded.due_at, cancel_on_message = excluded.cancel_on_message",
                        &[id, &change.plugin, &conversation_id, name, payload, &now, due_at, cancel_on_customer_message],
                    )
                    .await?;
                }
                TimerOp::Cancel { name } => {
                    c.execute(
                        "DELETE FROM timers WHERE conversation_id = $1 AND plugin = $2 AND name = $3",
                        &[&conversation_id, &change.plugin, name],
                    )
                    .await?;
                }
            }
        }
    }
    Ok(())
}

async fn migrate(pool: &Pool) -> Result<(), Error> {
    let mut c = pool.get().await?;
    let tx = c.client().transaction().await?;
    // No "already exists, skipping" notices in every replica's log; no
    // statement_timeout (a migration may rewrite a large table, and the
    // advisory lock waits for another replica's migrations).
    tx.batch_execute("SET LOCAL client_min_messages = warning; SET LOCAL statement_timeout = 0")
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS digibot_migrations (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let applied: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM digibot_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    for (version, sql) in MIGRATIONS {
        if *version > applied {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO digibot_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, "database migrated");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Reads a `http_journal` row (every column, in table order).
fn journal_row(r: &Row) -> Result<JournalEntry, Error> {
    let event_key: String = r.try_get(0)?;
    let plugin: String = r.try_get(1)?;
    let call: i32 = r.try_get(2)?;
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        Error::from(StoreError::Corrupt(format!(
            "journal {event_key}/{plugin}/{call}: {what}: {e}"
        )))
    };
    let request: String = r.try_get(3)?;
    let request: JournalRequest =
        serde_json::from_str(&request).map_err(|e| corrupt("request", &e))?;
    let status: Option<i32> = r.try_get(4)?;
    let outcome = match status {
        Some(status) => {
            let headers: Option<String> = r.try_get(5)?;
            let body: Option<Vec<u8>> = r.try_get(6)?;
            JournalOutcome::Response {
                status: u16::try_from(status).map_err(|e| corrupt("status", &e))?,
                headers: serde_json::from_str(headers.as_deref().unwrap_or("[]"))
                    .map_err(|e| corrupt("headers", &e))?,
                body: body.unwrap_or_default(),
            }
        }
        None => {
            let refusal: Option<String> = r.try_get(8)?;
            JournalOutcome::Failed {
                refusal: serde_json::from_str(refusal.as_deref().unwrap_or(""))
                    .map_err(|e| corrupt("refusal", &e))?,
            }
        }
    };
    let elapsed: i64 = r.try_get(9)?;
    Ok(JournalEntry {
        event_key: event_key.clone(),
        plugin: plugin.clone(),
        call: call as u32,
        request,
        outcome,
        elapsed_ms: elapsed.max(0) as u64,
        recorded_at: r.try_get(10)?,
    })
}

/// Each conversation-scoped key's last write, as parallel arrays for
/// `unnest`: upserts (plugin, conversation, key, value; and expiries) and
/// deletes (plugin, conversation, key). One statement cannot touch a row
/// twice, and the last write is what the plugin meant.
#[allow(clippy::type_complexity)]
fn kv_final(changes: &[KvChanges]) -> (([Vec<String>; 4], Vec<Option<i64>>), [Vec<String>; 3]) {
    let mut sets: ([Vec<String>; 4], Vec<Option<i64>>) = Default::default();
    let mut deletes: [Vec<String>; 3] = Default::default();
    for change in changes {
        for write in change.last_writes() {
            let (plugin, conv) = (change.plugin.clone(), change.conversation_id.clone());
            match write {
                KvWrite::Set {
                    scope: KvScope::Conversation,
                    key,
                    value,
                    expires_at,
                } => {
                    sets.0[0].push(plugin);
                    sets.0[1].push(conv);
                    sets.0[2].push(key.clone());
                    sets.0[3].push(value.clone());
                    sets.1.push(*expires_at);
                }
                KvWrite::Delete {
                    scope: KvScope::Conversation,
                    key,
                } => {
                    deletes[0].push(plugin);
                    deletes[1].push(conv);
                    deletes[2].push(key.clone());
                }
                _ => {}
            }
        }
    }
    (sets, deletes)
}

/// The customer and plugin scopes' last writes, per (plugin, scope,
/// owner), in the order their locks are taken (sorted, bytewise).
type ScopedWrites<'a> = Vec<((&'a str, &'a str, &'a str), Vec<&'a KvWrite>)>;

fn scoped_final(changes: &[KvChanges]) -> ScopedWrites<'_> {
    let mut groups: ScopedWrites = Vec::new();
    for change in changes {
        for write in change.last_writes() {
            let scope = write.scope();
            if *scope == KvScope::Conversation {
                continue;
            }
            let id = (
                change.plugin.as_str(),
                scope.scope().as_str(),
                scope.owner(),
            );
            match groups.iter_mut().find(|(g, _)| *g == id) {
                Some((_, writes)) => writes.push(write),
                None => groups.push((id, vec![write])),
            }
        }
    }
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    groups
}

/// The totals shard a customer or plugin scope (`t`) counts in: 16 to
/// 31, apart from the conversations' 0 to 15.
const SCOPED_SHARD: &str = "16 + (hashtext(t.scope || '/' || t.owner) & 15)";

/// Runs `f` in a transaction of its own on `c`.
async fn in_transaction<T>(
    c: &mut Conn,
    f: impl for<'c> FnOnce(
        &'c mut Conn,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<T, Error>> + Send + 'c>,
    >,
) -> Result<T, Error> {
    c.execute("BEGIN", &[]).await?;
    match f(c).await {
        Ok(v) => {
            c.execute("COMMIT", &[]).await?;
            Ok(v)
        }
        Err(e) => {
            let _ = c.execute("ROLLBACK", &[]).await;
            Err(e)
        }
    }
}

/// Deletes KV values whose TTL ran out before `before`, at most `limit`
/// of each table, keeping the usage counts right; returns how many went.
/// Conversation values of a conversation at work (a pending event, a
/// replica's lease) wait for the next run, as idle conversations do.
async fn prune_expired(c: &mut Conn, before: i64, limit: i64) -> Result<usize, Error> {
    let row = c
        .query_one(
            "WITH gone AS (
                DELETE FROM kv WHERE (plugin, conversation_id, key) IN (
                    SELECT plugin, conversation_id, key FROM kv k
                    WHERE k.expires_at IS NOT NULL AND k.expires_at <= $1
                      AND NOT EXISTS (SELECT 1 FROM events e WHERE e.conversation_id = k.conversation_id AND e.status = 'pending')
                      AND NOT EXISTS (SELECT 1 FROM conversation_leases l WHERE l.conversation_id = k.conversation_id AND l.expires_at > now())
                    LIMIT $2 FOR UPDATE SKIP LOCKED)
                AND expires_at <= $1
                RETURNING plugin, conversation_id, octet_length(key) + octet_length(value) AS size
             ), usage AS (
                UPDATE kv_usage u SET keys = u.keys - g.keys, bytes = u.bytes - g.bytes
                FROM (SELECT plugin, conversation_id, count(*)::bigint AS keys, sum(size)::bigint AS bytes
                      FROM gone GROUP BY plugin, conversation_id) g
                WHERE u.plugin = g.plugin AND u.conversation_id = g.conversation_id
                RETURNING 1
             ), totals AS (
                UPDATE kv_plugin_usage t SET keys = t.keys - g.keys, bytes = t.bytes - g.bytes
                FROM (SELECT plugin, hashtext(conversation_id) & 15 AS shard, count(*)::bigint AS keys, sum(size)::bigint AS bytes
                      FROM gone GROUP BY plugin, hashtext(conversation_id) & 15) g
                WHERE t.plugin = g.plugin AND t.shard = g.shard
                RETURNING 1
             )
             SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM usage) + (SELECT count(*) FROM totals)",
            &[&before, &limit],
        )
        .await?;
    let conversation = row.try_get::<_, i64>(0)? as usize;
    let scoped = in_transaction(c, |c| Box::pin(prune_expired_scoped(c, before, limit))).await?;
    Ok(conversation + scoped)
}

/// The customer and plugin scopes' expired values: each scope's usage row
/// locked first (skipped when a completion holds it: the next run), then
/// its expired rows deleted and counted off.
async fn prune_expired_scoped(c: &mut Conn, before: i64, limit: i64) -> Result<usize, Error> {
    let locked = c
        .query(
            "SELECT u.plugin, u.scope, u.owner FROM kv_scoped_usage u
             JOIN (SELECT DISTINCT plugin, scope, owner FROM kv_scoped
                   WHERE expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2) x
               ON u.plugin = x.plugin AND u.scope = x.scope AND u.owner = x.owner
             FOR UPDATE OF u SKIP LOCKED",
            &[&before, &limit],
        )
        .await?;
    if locked.is_empty() {
        return Ok(0);
    }
    let mut g: [Vec<String>; 3] = Default::default();
    for r in &locked {
        for (i, col) in g.iter_mut().enumerate() {
            col.push(r.try_get(i)?);
        }
    }
    let rows = c
        .query(
            "WITH g AS (
                SELECT * FROM unnest($2::text[], $3::text[], $4::text[]) AS g(plugin, scope, owner)
             ), gone AS (
                DELETE FROM kv_scoped k USING g
                WHERE k.plugin = g.plugin AND k.scope = g.scope AND k.owner = g.owner
                  AND k.expires_at IS NOT NULL AND k.expires_at <= $1
                RETURNING k.plugin, k.scope, k.owner, octet_length(k.key) + octet_length(k.value) AS size
             ), per AS (
                SELECT plugin, scope, owner, count(*)::bigint AS keys, sum(size)::bigint AS bytes
                FROM gone GROUP BY plugin, scope, owner
             ), usage AS (
                UPDATE kv_scoped_usage u SET keys = u.keys - per.keys, bytes = u.bytes - per.bytes
                FROM per WHERE u.plugin = per.plugin AND u.scope = per.scope AND u.owner = per.owner
                RETURNING 1
             )
             SELECT plugin, scope, owner, keys, bytes, (SELECT count(*) FROM usage) FROM per",
            &[&before, &g[0], &g[1], &g[2]],
        )
        .await?;
    let mut gone = 0;
    let mut totals = Vec::new();
    for r in &rows {
        let (keys, bytes): (i64, i64) = (r.try_get(3)?, r.try_get(4)?);
        gone += keys as usize;
        totals.push((
            (
                r.try_get::<_, &str>(0)?,
                r.try_get::<_, &str>(1)?,
                r.try_get::<_, &str>(2)?,
            ),
            -keys,
            -bytes,
        ));
    }
    add_scoped_totals(c, &totals).await?;
    Ok(gone)
}

/// Forgets up to `limit` (plugin, customer) memories last written before
/// `before` (a completion writing one now holds its row: skipped, and
/// renewed by it); returns the entries that went.
async fn forget_idle_customers(c: &mut Conn, before: i64, limit: i64) -> Result<usize, Error> {
    let idle = c
        .query(
            "SELECT plugin, owner, keys, bytes FROM kv_scoped_usage
             WHERE scope = 'customer' AND active_at < $1
             ORDER BY active_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            &[&before, &limit],
        )
        .await?;
    if idle.is_empty() {
        return Ok(0);
    }
    let (mut plugins, mut owners): (Vec<String>, Vec<String>) = Default::default();
    for r in &idle {
        plugins.push(r.try_get(0)?);
        owners.push(r.try_get(1)?);
    }
    let row = c
        .query_one(
            "WITH g AS (
                SELECT * FROM unnest($1::text[], $2::text[]) AS g(plugin, owner)
             ), entries AS (
                DELETE FROM kv_scoped k USING g
                WHERE k.plugin = g.plugin AND k.scope = 'customer' AND k.owner = g.owner
                RETURNING 1
             ), usage AS (
                DELETE FROM kv_scoped_usage u USING g
                WHERE u.plugin = g.plugin AND u.scope = 'customer' AND u.owner = g.owner
                RETURNING 1
             )
             SELECT (SELECT count(*) FROM entries), (SELECT count(*) FROM usage)",
            &[&plugins, &owners],
        )
        .await?;
    let mut totals = Vec::new();
    for (r, (plugin, owner)) in idle.iter().zip(plugins.iter().zip(&owners)) {
        totals.push((
            (plugin.as_str(), "customer", owner.as_str()),
            -r.try_get::<_, i64>(2)?,
            -r.try_get::<_, i64>(3)?,
        ));
    }
    add_scoped_totals(c, &totals).await?;
    Ok(row.try_get::<_, i64>(0)? as usize)
}

/// Applies the customer and plugin scopes' writes inside the completion's
/// transaction. Each scope's usage row is locked first, in one order for
/// every writer (sorted), so two conversations writing one customer's
/// memory at once take turns: the second sees the first's rows, the last
/// committed write of a key wins, and the usage counts stay exact. The
/// plugin's totals are locked after every usage row, shards in order.
async fn apply_scoped_kv(c: &mut Conn, groups: &ScopedWrites<'_>, now: i64) -> Result<(), Error> {
    let mut totals: Vec<((&str, &str, &str), i64, i64)> = Vec::new();
    for ((plugin, scope, owner), writes) in groups {
        c.execute(
            "INSERT INTO kv_scoped_usage (plugin, scope, owner, keys, bytes, active_at) VALUES ($1, $2, $3, 0, 0, $4)
             ON CONFLICT (plugin, scope, owner) DO UPDATE SET active_at = GREATEST(kv_scoped_usage.active_at, excluded.active_at)",
            &[plugin, scope, owner, &now],
        )
        .await?;
        let (mut keys, mut values, mut expires): (Vec<&str>, Vec<Option<&str>>, Vec<Option<i64>>) =
            Default::default();
        for w in writes {
            keys.push(w.key());
            match w {
                KvWrite::Set {
                    value, expires_at, ..
                } => {
                    values.push(Some(value));
                    expires.push(*expires_at);
                }
                KvWrite::Delete { .. } => {
                    values.push(None);
                    expires.push(None);
                }
            }
        }
        // The lock is held: this statement's snapshot has every earlier
        // writer's rows.
        let row = c
            .query_one(
                "WITH w AS (
                    SELECT * FROM unnest($4::text[], $5::text[], $6::bigint[]) AS w(key, value, expires)
                 ), old AS (
                    SELECT k.key, octet_length(k.key) + octet_length(k.value) AS size
                    FROM kv_scoped k JOIN w ON k.key = w.key
                    WHERE k.plugin = $1 AND k.scope = $2 AND k.owner = $3
                 ), up AS (
                    INSERT INTO kv_scoped (plugin, scope, owner, key, value, expires_at, updated_at)
                    SELECT $1, $2, $3, w.key, w.value, w.expires, $7 FROM w WHERE w.value IS NOT NULL
                    ON CONFLICT (plugin, scope, owner, key) DO UPDATE
                    SET value = excluded.value, expires_at = excluded.expires_at, updated_at = excluded.updated_at
                    RETURNING 1
                 ), del AS (
                    DELETE FROM kv_scoped k USING w
                    WHERE w.value IS NULL AND k.plugin = $1 AND k.scope = $2 AND k.owner = $3 AND k.key = w.key
                    RETURNING 1
                 ), delta AS (
                    SELECT COALESCE(sum(CASE WHEN w.value IS NULL THEN -(o.key IS NOT NULL)::int
                                             ELSE (o.key IS NULL)::int END), 0)::bigint AS keys,
                           COALESCE(sum(CASE WHEN w.value IS NULL THEN -COALESCE(o.size, 0)
                                             ELSE octet_length(w.key) + octet_length(w.value) - COALESCE(o.size, 0) END), 0)::bigint AS bytes
                    FROM w LEFT JOIN old o ON o.key = w.key
                 ), usage AS (
                    UPDATE kv_scoped_usage u SET keys = u.keys + delta.keys, bytes = u.bytes + delta.bytes, active_at = $7
                    FROM delta WHERE u.plugin = $1 AND u.scope = $2 AND u.owner = $3
                    RETURNING 1
                 )
                 SELECT keys, bytes, (SELECT count(*) FROM up) + (SELECT count(*) FROM del) + (SELECT count(*) FROM usage)
                 FROM delta",
                &[plugin, scope, owner, &keys, &values, &expires, &now],
            )
            .await?;
        totals.push(((plugin, scope, owner), row.try_get(0)?, row.try_get(1)?));
    }
    add_scoped_totals(c, &totals).await
}

/// Adds to the plugins' totals what the customer and plugin scopes
/// changed by, each scope in its shard, in shard order.
async fn add_scoped_totals(
    c: &mut Conn,
    totals: &[((&str, &str, &str), i64, i64)],
) -> Result<(), Error> {
    let (mut plugins, mut scopes, mut owners) =
        (Vec::<&str>::new(), Vec::<&str>::new(), Vec::<&str>::new());
    let (mut keys, mut bytes) = (Vec::<i64>::new(), Vec::<i64>::new());
    for ((plugin, scope, owner), k, b) in totals {
        if (*k, *b) == (0, 0) {
            continue;
        }
        plugins.push(plugin);
        scopes.push(scope);
        owners.push(owner);
        keys.push(*k);
        bytes.push(*b);
    }
    if plugins.is_empty() {
        return Ok(());
    }
    let shard = SCOPED_SHARD;
    c.execute(
        &format!(
            "INSERT INTO kv_plugin_usage (plugin, shard, keys, bytes)
             SELECT t.plugin, {shard}, sum(t.keys)::bigint, sum(t.bytes)::bigint
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS t(plugin, scope, owner, keys, bytes)
             GROUP BY t.plugin, {shard} ORDER BY t.plugin COLLATE \"C\", {shard}
             ON CONFLICT (plugin, shard) DO UPDATE
             SET keys = kv_plugin_usage.keys + excluded.keys, bytes = kv_plugin_usage.bytes + excluded.bytes"
        ),
        &[&plugins, &scopes, &owners, &keys, &bytes],
    )
    .await?;
    Ok(())
}

fn stored_event(seq: i64, payload: &str, received_at: i64) -> Result<StoredEvent, Error> {
    let event = serde_json::from_str(payload)
        .map_err(|e| StoreError::Corrupt(format!("event {seq}: {e}")))?;
    Ok(StoredEvent {
        seq,
        event,
        received_at,
    })
}

/// Rows of (seq, payload, received_at, ...).
fn stored_events(rows: &[Row]) -> Result<Vec<StoredEvent>, Error> {
    rows.iter()
        .map(|r| stored_event(r.try_get(0)?, r.try_get::<_, &str>(1)?, r.try_get(2)?))
        .collect()
}

/// Reads `seq, key, name, conversation_id, status, received_at,
/// handled_at, outcomes`.
fn event_summary(r: &Row) -> Result<EventSummary, Error> {
    let outcomes: Option<String> = r.try_get(7)?;
    Ok(EventSummary {
        seq: r.try_get(0)?,
        key: r.try_get(1)?,
        event: r.try_get(2)?,
        conversation_id: r.try_get(3)?,
        status: r.try_get(4)?,
        received_at: r.try_get(5)?,
        handled_at: r.try_get(6)?,
        plugins: outcomes
            .and_then(|o| serde_json::from_str(&o).ok())
            .unwrap_or(serde_json::Value::Array(vec![])),
    })
}

/// Reads `id, state, changed_at, reason, channel, last_customer_at,
/// last_agent_at, customer_id` from column `at` on.
fn conversation_record(r: &Row, at: usize) -> Result<ConversationRecord, Error> {
    Ok(ConversationRecord {
        id: r.try_get(at)?,
        state: parse_state(r.try_get::<_, &str>(at + 1)?)?,
        changed_at: r.try_get(at + 2)?,
        reason: r.try_get(at + 3)?,
        channel: r.try_get(at + 4)?,
        last_customer_at: r.try_get(at + 5)?,
        last_agent_at: r.try_get(at + 6)?,
        customer_id: r.try_get(at + 7)?,
    })
}

/// [`Postgres::complete_in`]'s statement up to its actions: the lease
/// check, the status guard, the lease renewal or release, the actions.
const COMPLETE_HEAD: &str = "WITH blocked AS (
                    SELECT 1 FROM conversation_leases
                    WHERE conversation_id = $2 AND owner <> $5 AND expires_at > now()
                 ), stale AS (
                    -- Decided on a record another process changed since.
                    SELECT 1 FROM conversations WHERE id = $2 AND $28::text IS NOT NULL AND state <> $28::text
                 ), done AS (
                    UPDATE events SET status = 'handled', handled_at = $3, outcomes = $4
                    WHERE seq = $1 AND status = 'pending' AND NOT EXISTS (SELECT 1 FROM blocked)
                      AND NOT EXISTS (SELECT 1 FROM stale)
                    RETURNING seq
                 ), dry AS (
                    -- Nothing else of the conversation waits: the lease goes
                    -- back with this commit, not in a statement of its own.
                    SELECT $29::boolean AND EXISTS (SELECT 1 FROM done)
                           AND NOT EXISTS (SELECT 1 FROM events WHERE conversation_id = $2 AND status = 'pending' AND seq <> $1) AS yes
                 ), renewed AS (
                    UPDATE conversation_leases SET expires_at = now() + make_interval(secs => $6)
                    WHERE conversation_id = $2 AND owner = $5 AND NOT (SELECT yes FROM dry) RETURNING 1
                 ), released AS (
                    DELETE FROM conversation_leases
                    WHERE conversation_id = $2 AND owner = $5 AND (SELECT yes FROM dry)
                      -- Not if an insert renewed it since this statement's
                      -- snapshot (see `release_conversation`).
                      AND expires_at = (SELECT expires_at FROM conversation_leases WHERE conversation_id = $2)
                    RETURNING 1
                 ), queued AS (
                    INSERT INTO outbox (event_seq, conversation_id, plugin, idempotency_key, method, path, body, status, next_attempt_at, created_at)
                    SELECT done.seq, $2, a.plugin, a.key, a.method, a.path, a.body, 'pending', $3, $3
                    FROM done, unnest($7::text[], $8::text[], $9::text[], $10::text[], $11::text[])
                         WITH ORDINALITY AS a(plugin, key, method, path, body, n)
                    ORDER BY a.n
                    RETURNING id
                 ";

/// Its KV writes and the usage counts they change.
const COMPLETE_KV: &str = "), kv_set AS (
                    INSERT INTO kv (plugin, conversation_id, key, value, updated_at, expires_at)
                    SELECT s.plugin, s.conv, s.key, s.value, $3, s.expires
                    FROM done, unnest($12::text[], $13::text[], $14::text[], $15::text[], $26::bigint[]) AS s(plugin, conv, key, value, expires)
                    ON CONFLICT (plugin, conversation_id, key)
                    DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at, expires_at = excluded.expires_at
                    RETURNING 1
                 ), kv_delete AS (
                    DELETE FROM kv USING done, unnest($16::text[], $17::text[], $18::text[]) AS d(plugin, conv, key)
                    WHERE kv.plugin = d.plugin AND kv.conversation_id = d.conv AND kv.key = d.key
                    RETURNING 1
                 ), kv_old AS (
                    -- The sizes of the entries written, before (every part
                    -- of one statement sees the same snapshot).
                    SELECT kv.plugin, kv.conversation_id AS conv, kv.key,
                           octet_length(kv.key) + octet_length(kv.value) AS size
                    FROM kv JOIN (SELECT * FROM unnest($12::text[], $13::text[], $14::text[])
                                  UNION ALL SELECT * FROM unnest($16::text[], $17::text[], $18::text[])) AS w(plugin, conv, key)
                         ON kv.plugin = w.plugin AND kv.conversation_id = w.conv AND kv.key = w.key
                 ), kv_delta AS (
                    SELECT x.plugin, x.conv, sum(x.keys)::bigint AS keys, sum(x.bytes)::bigint AS bytes
                    FROM (SELECT s.plugin, s.conv, CASE WHEN o.key IS NULL THEN 1 ELSE 0 END AS keys,
                                 octet_length(s.key) + octet_length(s.value) - COALESCE(o.size, 0) AS bytes
                          FROM unnest($12::text[], $13::text[], $14::text[], $15::text[]) AS s(plugin, conv, key, value)
                          LEFT JOIN kv_old o ON o.plugin = s.plugin AND o.conv = s.conv AND o.key = s.key
                          UNION ALL
                          SELECT o.plugin, o.conv, -1, -o.size
                          FROM unnest($16::text[], $17::text[], $18::text[]) AS d(plugin, conv, key)
                          JOIN kv_old o ON o.plugin = d.plugin AND o.conv = d.conv AND o.key = d.key) AS x
                    GROUP BY x.plugin, x.conv
                    HAVING sum(x.keys) <> 0 OR sum(x.bytes) <> 0
                 ), kv_usage_up AS (
                    INSERT INTO kv_usage (conversation_id, plugin, keys, bytes)
                    SELECT d.conv, d.plugin, d.keys, d.bytes FROM done, kv_delta d
                    ON CONFLICT (conversation_id, plugin) DO UPDATE
                    SET keys = kv_usage.keys + excluded.keys, bytes = kv_usage.bytes + excluded.bytes
                    RETURNING 1
                 ), kv_totals_up AS (
                    INSERT INTO kv_plugin_usage (plugin, shard, keys, bytes)
                    SELECT d.plugin, hashtext(d.conv) & 15, sum(d.keys)::bigint, sum(d.bytes)::bigint
                    FROM done, kv_delta d GROUP BY d.plugin, hashtext(d.conv) & 15
                    ON CONFLICT (plugin, shard) DO UPDATE
                    SET keys = kv_plugin_usage.keys + excluded.keys, bytes = kv_plugin_usage.bytes + excluded.bytes
                    RETURNING 1
                 ";

/// Its conversation upsert, archive and timer cancels, and the answer
/// (`{kv_count}` is how many KV writes the statement made).
const COMPLETE_TAIL: &str = "), old AS (
                    SELECT state FROM conversations WHERE id = $2
                 ), applies AS (
                    -- The state change applies from its `from` state (any
                    -- other state when none); a new conversation is `bot`.
                    SELECT $19::text IS NOT NULL
                           AND COALESCE((SELECT state FROM old), 'bot') <> $19::text
                           AND ($20::text IS NULL OR COALESCE((SELECT state FROM old), 'bot') = $20::text) AS yes
                 ), conv AS (
                    INSERT INTO conversations (id, state, changed_at, reason, channel, last_customer_at, last_agent_at, active_at, customer_id)
                    SELECT $2, CASE WHEN applies.yes THEN $19::text ELSE 'bot' END, $3,
                           CASE WHEN applies.yes THEN $21::text ELSE 'first event' END,
                           $22::text, $23::bigint, $24::bigint, $3, $27::text
                    FROM done, applies WHERE $2 <> ''
                    ON CONFLICT (id) DO UPDATE SET
                       active_at = GREATEST(conversations.active_at, $3),
                       customer_id = COALESCE($27::text, conversations.customer_id),
                       state = CASE WHEN (SELECT yes FROM applies) THEN $19::text ELSE conversations.state END,
                       changed_at = CASE WHEN (SELECT yes FROM applies) THEN $3 ELSE conversations.changed_at END,
                       messages = CASE WHEN (SELECT yes FROM applies) THEN 0
                                  ELSE conversations.messages + ($23::bigint IS NOT NULL)::int + ($24::bigint IS NOT NULL)::int END,
                       reason = CASE WHEN (SELECT yes FROM applies) THEN $21::text ELSE conversations.reason END,
                       channel = COALESCE($22::text, conversations.channel),
                       -- Times only move forward (GREATEST skips NULLs).
                       last_customer_at = GREATEST(conversations.last_customer_at, $23::bigint),
                       last_agent_at = GREATEST(conversations.last_agent_at, $24::bigint)
                    RETURNING id, state, changed_at, reason, channel, last_customer_at, last_agent_at, customer_id, version
                 ), archived AS (
                    UPDATE outbox SET status = 'dead', last_status = NULL, last_error = $25::text, done_at = $3,
                           claimed_by = NULL, claim_expires = NULL
                    FROM done
                    WHERE $25::text IS NOT NULL AND outbox.conversation_id = $2 AND outbox.status = 'pending'
                    RETURNING 1
                 ), timers_dropped AS (
                    -- Archiving drops the conversation's timers; a customer
                    -- message those it cancels (the turns' own schedules
                    -- follow, in the same transaction).
                    DELETE FROM timers USING done
                    WHERE timers.conversation_id = $2
                      AND ($25::text IS NOT NULL OR ($23::bigint IS NOT NULL AND timers.cancel_on_message))
                    RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM queued),
                        EXISTS (SELECT 1 FROM blocked),
                        {kv_count} + (SELECT count(*) FROM renewed),
                        EXISTS (SELECT 1 FROM done),
                        EXISTS (SELECT 1 FROM conv) AND (SELECT yes FROM applies),
                        (SELECT count(*) FROM archived),
                        EXISTS (SELECT 1 FROM stale),
                        EXISTS (SELECT 1 FROM released),
                        conv.id, conv.state, conv.changed_at, conv.reason, conv.channel,
                        conv.last_customer_at, conv.last_agent_at, conv.customer_id, conv.version
                 FROM (SELECT 1) AS one LEFT JOIN conv ON true";

/// The completion of a turn that wrote KV entries.
static COMPLETE_WITH_KV: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let tail = COMPLETE_TAIL.replace(
        "{kv_count}",
        "(SELECT count(*) FROM kv_set) + (SELECT count(*) FROM kv_delete)",
    );
    format!("{COMPLETE_HEAD}{COMPLETE_KV}{tail}")
});

/// The completion of a turn that wrote none, the usual one: without the KV
/// parts, which cost the executor even when their arrays are empty. Their
/// parameters keep their types in a part nothing reads (never executed),
/// so both statements take the same arguments.
static COMPLETE_WITHOUT_KV: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let tail = COMPLETE_TAIL.replace("{kv_count}", "0");
    format!(
        "{COMPLETE_HEAD}), kv_unused AS (
                    SELECT $12::text[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[],
                           $18::text[], $26::bigint[]
                 {tail}"
    )
});

/// The sender's claim: the first pending action of each conversation,
/// soonest due first, at most `$2`, not held by another replica (`$1` is
/// this one), claimed for `$3` seconds. Its plan walks `outbox_due` in
/// order, probes `outbox_pending` once per candidate and stops at the limit,
/// so it costs the heads it returns, not the backlog, as long as the
/// statistics are current (see `stats`); the claim itself is one index
/// lookup of the ids (an `= ANY` on the primary key, never a join the
/// planner could hash over the table).
const OUTBOX_CLAIM_SQL: &str = "WITH mine AS (
    SELECT o.id FROM outbox o
    WHERE o.status = 'pending'
      AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.status = 'pending'
                      AND p.conversation_id = o.conversation_id AND p.id < o.id)
      AND (o.claimed_by IS NULL OR o.claimed_by = $1 OR o.claim_expires < now())
    ORDER BY o.next_attempt_at, o.id
    LIMIT $2
    FOR UPDATE OF o SKIP LOCKED
 )
 UPDATE outbox SET claimed_by = $1, claim_expires = now() + make_interval(secs => $3)
 WHERE id = ANY(ARRAY(SELECT id FROM mine))
 RETURNING id, event_seq, conversation_id, plugin, idempotency_key, method, path, body,
           status, attempts, next_attempt_at, last_status, last_error, created_at";

fn outbox_row(r: &Row) -> Result<OutboxAction, Error> {
    let body: String = r.try_get(7)?;
    Ok(OutboxAction {
        id: r.try_get(0)?,
        event_seq: r.try_get(1)?,
        conversation_id: r.try_get(2)?,
        plugin: r.try_get(3)?,
        idempotency_key: r.try_get(4)?,
        method: r.try_get(5)?,
        path: r.try_get(6)?,
        body: serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
        status: r.try_get(8)?,
        attempts: r.try_get(9)?,
        next_attempt_at: r.try_get(10)?,
        last_status: r.try_get(11)?,
        last_error: r.try_get(12)?,
        created_at: r.try_get(13)?,
    })
}

/// Test databases: each test gets a database of its own on the server at
/// `DIGIBOT_TEST_DATABASE_URL`, dropped afterwards.
#[cfg(test)]
pub(crate) mod testdb {
    use super::*;

    /// The test server's URL; `None` (with a loud note) when none is
    /// configured; under `CI` that fails the test instead.
    pub(crate) fn server() -> Option<DatabaseUrl> {
        let Ok(url) = std::env::var("DIGIBOT_TEST_DATABASE_URL") else {
            if std::env::var_os("CI").is_some() {
                panic!("DIGIBOT_TEST_DATABASE_URL is not set: CI must run the PostgreSQL tests");
            }
            eprintln!("SKIPPED: PostgreSQL test (set DIGIBOT_TEST_DATABASE_URL to run it)");
            return None;
        };
        Some(DatabaseUrl::parse(&url).unwrap())
    }

    /// A fresh database on the test server, and the guard that drops it.
    pub(crate) fn create() -> Option<(DatabaseUrl, DropDb)> {
        let admin = server()?;
        let name = format!("digibot_test_{:016x}", rand::random::<u64>());
        on_own_runtime({
            let (admin, name) = (admin.clone(), name.clone());
            async move {
                let client = connect_one(&admin).await.unwrap();
                client
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
            }
        });
        Some((admin.with_dbname(&name), DropDb { admin, name }))
    }

    /// One connection outside any pool, its task on the current runtime.
    pub(crate) async fn connect_one(url: &DatabaseUrl) -> Result<tokio_postgres::Client, Error> {
        let config = url.session(Duration::from_secs(30));
        let (client, connection) = config.connect(url.tls()?).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Drops its database (and its connections) when dropped.
    pub(crate) struct DropDb {
        admin: DatabaseUrl,
        name: String,
    }

    impl DropDb {
        /// The database's name.
        pub(crate) fn name(&self) -> &str {
            &self.name
        }
    }

    impl Drop for DropDb {
        fn drop(&mut self) {
            let (admin, name) = (self.admin.clone(), self.name.clone());
            on_own_runtime(async move {
                if let Ok(client) = connect_one(&admin).await {
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        }
    }

    /// Runs `f` to completion on a runtime of its own, on a thread of its
    /// own (callable from inside a test's runtime).
    fn on_own_runtime(f: impl Future<Output = ()> + Send + 'static) {
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f)
        })
        .join()
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use digibot_store::store_suite;
    use digibot_store::suite::TestDb;
    use std::sync::Mutex;

    fn fixture() -> Option<TestDb> {
        let (url, guard) = testdb::create()?;
        Some(TestDb::new(
            move || {
                let url = url.clone();
                async move { open(&url, Options::default()).await.unwrap() }
            },
            guard,
        ))
    }

    store_suite!(fixture);

    use digibot_store::suite::{action, event};

    /// Two stores on one fresh database, as two replicas would have.
    async fn two_replicas(options: Options) -> Option<(Store, Store, testdb::DropDb)> {
        let (url, guard) = testdb::create()?;
        let a = open(&url, options.clone()).await.unwrap();
        let b = open(&url, options).await.unwrap();
        Some((a, b, guard))
    }

    async fn insert(store: &Store, id: &str, conv: &str) -> StoredEvent {
        let e = event(id, conv);
        let Inserted::New(seq) = store.insert_event(e.clone()).await.unwrap() else {
            panic!("{id} is a duplicate")
        };
        StoredEvent {
            seq,
            event: e,
            received_at: digibot_store::now_ms(),
        }
    }

    /// Inserts customer message `id` in `conv` and completes it with one
    /// action, keyed `key`.
    async fn handled(store: &Store, id: &str, conv: &str, key: &str) {
        let e = insert(store, id, conv).await;
        store
            .complete_event(
                e.seq,
                conv.to_string(),
                serde_json::json!([]),
                vec![action(key)],
                vec![],
                digibot_store::ConversationUpdate::default(),
            )
            .await
            .unwrap();
    }

    fn seqs(events: &[StoredEvent]) -> Vec<i64> {
        events.iter().map(|e| e.seq).collect()
    }

    /// Waits (generously, polling) until `f` returns `Some`.
    async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_replica_holds_a_conversation_and_gets_the_events_of_both() {
        let Some((a, b, _db)) = two_replicas(Options::default()).await else {
            return;
        };
        let complete = |store: &Store, seq: i64, actions: Vec<NewAction>| {
            let store = store.clone();
            async move {
                store
                    .complete_event(
                        seq,
                        "c".into(),
                        serde_json::json!([]),
                        actions,
                        vec![],
                        digibot_store::ConversationUpdate::default(),
                    )
                    .await
            }
        };
        // A's insert takes the lease in its own statement; B's finds it
        // held (and tells A). A's next insert reads what waits, in order:
        // its own first event and the one B received.
        let e1 = insert(&a, "m1", "c").await;
        let e2 = insert(&b, "m2", "c").await;
        let e3 = insert(&a, "m3", "c").await;
        // The lanes' claims are the inserts' (see the next test).
        let got = a.claim_conversation("c").await.unwrap().unwrap();
        assert_eq!(seqs(&got), [e1.seq, e2.seq]);
        assert!(b.claim_conversation("c").await.unwrap().is_none());
        // B cannot complete an event of it either.
        let refused = complete(&b, e1.seq, vec![action("x")]).await;
        assert!(
            matches!(refused, Err(StoreError::LeaseLost(_))),
            "{refused:?}"
        );
        // A completes the first; the others wait, so the lease stays, and
        // an event B receives meanwhile comes back to A at release.
        assert_eq!(
            complete(&a, e1.seq, vec![action("k1")])
                .await
                .unwrap()
                .queued,
            1
        );
        let e4 = insert(&b, "m4", "c").await;
        assert!(b.claim_conversation("c").await.unwrap().is_none());
        let waiting = a.release_conversation("c").await.unwrap();
        assert_eq!(seqs(&waiting), [e2.seq, e3.seq, e4.seq]);
        assert!(b.claim_conversation("c").await.unwrap().is_none());
        // B's inbox poll finds nothing of A's conversation; A's finds them.
        assert!(b.claimable_events(100).await.unwrap().is_empty());
        assert_eq!(
            seqs(&a.claimable_events(100).await.unwrap()),
            [e2.seq, e3.seq, e4.seq]
        );
        for e in [&e2, &e3, &e4] {
            complete(&a, e.seq, vec![]).await.unwrap();
        }
        // Dry: the last completion gave the lease back, so the lane's
        // release sends nothing (it works with A's database gone), and now
        // B may take it.
        a.close();
        assert!(a.release_conversation("c").await.unwrap().is_empty());
        assert_eq!(b.claim_conversation("c").await.unwrap().unwrap().len(), 0);
        assert!(matches!(
            a.claim_conversation("c").await,
            Err(StoreError::Closed)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_recorded_together_each_keep_their_message_id() {
        let Some((url, _db)) = testdb::create() else {
            return;
        };
        let store = open(&url, Options::default()).await.unwrap();
        for i in 0..40 {
            handled(&store, &format!("m{i}"), &format!("c{i}"), &format!("k{i}")).await;
        }
        let heads = store.outbox_heads(100).await.unwrap();
        assert_eq!(heads.len(), 40);
        // All at once: they share statements (`sent`), each still recorded
        // as its own delivery, with its own message id; one of them is a
        // hand-off, which goes alone and takes its conversation.
        let mut marks = tokio::task::JoinSet::new();
        for (i, head) in heads.iter().enumerate() {
            let (store, id, conv) = (store.clone(), head.id, head.conversation_id.clone());
            marks.spawn(async move {
                let handed = store
                    .mark_sent(id, 200, Some(format!("msg-{conv}")), i == 7)
                    .await
                    .unwrap();
                (conv, handed, i == 7)
            });
        }
        while let Some(done) = marks.join_next().await {
            let (conv, handed, hand_off) = done.unwrap();
            assert_eq!(handed, hand_off, "{conv}");
            assert!(
                store
                    .is_own_message(&conv, &format!("msg-{conv}"))
                    .await
                    .unwrap()
            );
            assert!(!store.is_own_message(&conv, "msg-other").await.unwrap());
        }
        assert!(store.outbox_heads(100).await.unwrap().is_empty());
        assert_eq!(store.outbox_depth().await.unwrap().pending, 0);
        let humans = store
            .conversation_states(Some(ConversationState::Human), 100)
            .await
            .unwrap();
        assert_eq!(humans.len(), 1);
        assert_eq!(humans[0].id, heads[7].conversation_id);
        // A delivery of a closed store is an error, not a hang.
        store.close();
        assert!(
            store
                .mark_sent(heads[0].id, 200, None, false)
                .await
                .is_err()
        );
    }

    /// The claim walks the due index and probes the pending index on a
    /// backlog grown from nothing: the replica's own analyses keep the
    /// statistics of an empty outbox from choosing a sort of every pending
    /// row, or a probe by the wrong index (see `stats`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_claim_walks_the_due_index_on_a_backlog_grown_from_nothing() {
        let Some((url, _db)) = testdb::create() else {
            return;
        };
        let store = open(&url, Options::default()).await.unwrap();
        let c = testdb::connect_one(&url).await.unwrap();
        // As a new database is: its outbox analyzed while empty.
        c.execute("ANALYZE outbox", &[]).await.unwrap();
        let due_rows = async |c: &tokio_postgres::Client| -> f32 {
            c.query_one(
                "SELECT reltuples FROM pg_class WHERE relname = 'outbox_due'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
        };
        assert_eq!(due_rows(&c).await, 0.0);
        let queued = stats::MIN_QUEUED as usize + 100;
        for i in 0..queued {
            let conv = format!("c{}", i % 200);
            handled(&store, &format!("m{i}"), &conv, &format!("k{i}")).await;
        }
        let rows = eventually("the replica analyzes its outbox", async || {
            let rows = due_rows(&c).await;
            (rows >= stats::MIN_QUEUED as f32).then_some(rows)
        })
        .await;
        assert!(rows <= queued as f32 * 1.1, "{rows}");
        let plan: Vec<String> = c
            .query(
                &format!("EXPLAIN {OUTBOX_CLAIM_SQL}"),
                &[&"explain".to_string(), &64i64, &30.0f64],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        for wanted in [
            "Index Scan using outbox_due on outbox o",
            "Index Scan using outbox_pending on outbox p",
            "Index Cond: ((conversation_id = o.conversation_id) AND (id < o.id))",
            "Index Scan using outbox_pkey on outbox",
        ] {
            assert!(plan.contains(wanted), "{wanted} is not in\n{plan}");
        }
        for unwanted in ["Seq Scan", "Sort", "Hash", "Bitmap"] {
            assert!(!plan.contains(unwanted), "{unwanted} is in\n{plan}");
        }
        // It claims the 64 soonest heads, one per conversation.
        let heads = store.outbox_heads(64).await.unwrap();
        let keys: Vec<String> = heads.iter().map(|h| h.idempotency_key.clone()).collect();
        let expected: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
        assert_eq!(keys, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_replicas_lease_expires_and_another_takes_over() {
        let options = Options {
            lease: Duration::from_millis(300),
            poll: Duration::from_millis(50),
            ..Options::default()
        };
        let Some((a, b, _db)) = two_replicas(options).await else {
            return;
        };
        let e1 = insert(&a, "m1", "c").await;
        // A "dies" holding the conversation, which its insert claimed: the
        // lane's claim is that one (no statement: it works with A's
        // database gone). B's poll finds the event once the lease ran out,
        // and B's claim then succeeds.
        a.close();
        assert!(a.claim_conversation("c").await.unwrap().is_some());
        let found = eventually("B finds the orphaned event", async || {
            let found = b.claimable_events(100).await.unwrap();
            (!found.is_empty()).then_some(found)
        })
        .await;
        assert_eq!(seqs(&found), [e1.seq]);
        let got = b.claim_conversation("c").await.unwrap().unwrap();
        assert_eq!(seqs(&got), [e1.seq]);
        assert_eq!(
            b.complete_event(
                e1.seq,
                "c".into(),
                serde_json::json!([]),
                vec![action("k")],
                vec![],
                digibot_store::ConversationUpdate::default()
            )
            .await
            .unwrap()
            .queued,
            1
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unleased_events_wait_for_their_replica_before_others_poll_them() {
        let options = Options {
            poll: Duration::from_millis(200),
            ..Options::default()
        };
        let Some((url, _db)) = testdb::create() else {
            return;
        };
        let a = open(&url, options.clone()).await.unwrap();
        let b = open(&url, options).await.unwrap();
        let e = insert(&a, "m1", "c").await;
        // Fresh: left to A, which received it (and polls nothing of its own).
        assert!(b.claimable_events(100).await.unwrap().is_empty());
        // A never claims it (it died right after the insert): B takes it.
        let found = eventually("B polls the old unleased event", async || {
            let found = b.claimable_events(100).await.unwrap();
            (!found.is_empty()).then_some(found)
        })
        .await;
        assert_eq!(seqs(&found), [e.seq]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_outbox_head_is_claimed_by_one_replica_and_order_holds() {
        let Some((a, b, _db)) = two_replicas(Options::default()).await else {
            return;
        };
        // 40 conversations, two actions each.
        for i in 0..40 {
            let conv = format!("c{i}");
            let e = insert(&a, &format!("m{i}"), &conv).await;
            a.complete_event(
                e.seq,
                conv.clone(),
                serde_json::json!([]),
                vec![
                    action(&format!("{conv}/first")),
                    action(&format!("{conv}/second")),
                ],
                vec![],
                digibot_store::ConversationUpdate::default(),
            )
            .await
            .unwrap();
        }
        // Both replicas read the outbox at once.
        let (ra, rb) = (a.clone(), b.clone());
        let ta = tokio::spawn(async move { ra.outbox_heads(1000).await.unwrap() });
        let tb = tokio::spawn(async move { rb.outbox_heads(1000).await.unwrap() });
        let (ha, hb) = (ta.await.unwrap(), tb.await.unwrap());
        let mut all: Vec<String> = ha
            .iter()
            .chain(&hb)
            .map(|h| h.idempotency_key.clone())
            .collect();
        all.sort();
        let mut expected: Vec<String> = (0..40).map(|i| format!("c{i}/first")).collect();
        expected.sort();
        // Every head exactly once, none of the second actions.
        assert_eq!(all, expected);
        // A replica's own claims come back to it, never to the other.
        let again_b = b.outbox_heads(1000).await.unwrap();
        let mut keys_b: Vec<_> = again_b.iter().map(|h| h.idempotency_key.clone()).collect();
        let mut had_b: Vec<_> = hb.iter().map(|h| h.idempotency_key.clone()).collect();
        keys_b.sort();
        had_b.sort();
        assert_eq!(keys_b, had_b);
        // A sends its heads: the second actions of those conversations are
        // next, and go to whoever reads first (B here).
        for h in &ha {
            a.mark_sent(h.id, 201, None, false).await.unwrap();
        }
        let next = b.outbox_heads(1000).await.unwrap();
        let mut keys: Vec<String> = next.iter().map(|h| h.idempotency_key.clone()).collect();
        keys.sort();
        let mut expected: Vec<String> = ha
            .iter()
            .map(|h| format!("{}/second", h.conversation_id))
            .chain(hb.iter().map(|h| h.idempotency_key.clone()))
            .collect();
        expected.sort();
        assert_eq!(keys, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_senders_racing_send_each_action_once_in_order() {
        let Some((a, b, _db)) = two_replicas(Options::default()).await else {
            return;
        };
        const CONVERSATIONS: usize = 20;
        const PER: usize = 10;
        for i in 0..PER {
            for c in 0..CONVERSATIONS {
                let conv = format!("c{c}");
                let e = insert(&a, &format!("m{c}_{i}"), &conv).await;
                a.complete_event(
                    e.seq,
                    conv.clone(),
                    serde_json::json!([]),
                    vec![action(&format!("{conv}/{i}"))],
                    vec![],
                    digibot_store::ConversationUpdate::default(),
                )
                .await
                .unwrap();
            }
        }
        let sent = Arc::new(Mutex::new(Vec::<String>::new()));
        let sender = |store: Store, sent: Arc<Mutex<Vec<String>>>| {
            tokio::spawn(async move {
                loop {
                    let s = store.clone();
                    let heads = tokio::spawn(async move { s.outbox_heads(1000).await.unwrap() })
                        .await
                        .unwrap();
                    if heads.is_empty() {
                        return;
                    }
                    for h in heads {
                        sent.lock().unwrap().push(h.idempotency_key.clone());
                        store.mark_sent(h.id, 201, None, false).await.unwrap();
                    }
                }
            })
        };
        let ta = sender(a.clone(), sent.clone());
        let tb = sender(b.clone(), sent.clone());
        ta.await.unwrap();
        tb.await.unwrap();
        let sent = sent.lock().unwrap().clone();
        let mut unique = sent.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            sent.len(),
            "an action was sent twice: {sent:?}"
        );
        assert_eq!(sent.len(), CONVERSATIONS * PER);
        for c in 0..CONVERSATIONS {
            let order: Vec<&String> = sent
                .iter()
                .filter(|k| k.starts_with(&format!("c{c}/")))
                .collect();
            let expected: Vec<String> = (0..PER).map(|i| format!("c{c}/{i}")).collect();
            assert_eq!(order, expected.iter().collect::<Vec<_>>());
        }
    }

    /// The sender decides what is due by its own clock, after the read: a
    /// head it got but another replica could also get would be sent twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_head_not_yet_due_is_held_by_the_replica_that_read_it() {
        let Some((a, b, _db)) = two_replicas(Options::default()).await else {
            return;
        };
        let e = insert(&a, "m1", "c").await;
        a.complete_event(
            e.seq,
            "c".into(),
            serde_json::json!([]),
            vec![action("k")],
            vec![],
            digibot_store::ConversationUpdate::default(),
        )
        .await
        .unwrap();
        let id = a.outbox_heads(10).await.unwrap()[0].id;
        a.mark_retry(id, now_ms() + 100, Some(503), "busy".into())
            .await
            .unwrap();
        let ha = a.outbox_heads(10).await.unwrap();
        assert_eq!(ha.len(), 1);
        assert!(ha[0].next_attempt_at > now_ms() - 1_000);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Due now, and still A's alone.
        assert!(b.outbox_heads(10).await.unwrap().is_empty());
        assert_eq!(a.outbox_heads(10).await.unwrap()[0].id, id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_senders_claim_expires_and_a_retry_is_due_for_anyone() {
        let options = Options {
            claim: Duration::from_millis(300),
            ..Options::default()
        };
        let Some((url, _db)) = testdb::create() else {
            return;
        };
        let a = open(&url, options.clone()).await.unwrap();
        let b = open(&url, options).await.unwrap();
        let e = insert(&a, "m1", "c").await;
        a.complete_event(
            e.seq,
            "c".into(),
            serde_json::json!([]),
            vec![action("k")],
            vec![],
            digibot_store::ConversationUpdate::default(),
        )
        .await
        .unwrap();
        let ha = a.outbox_heads(10).await.unwrap();
        assert_eq!(ha.len(), 1);
        assert!(b.outbox_heads(10).await.unwrap().is_empty());
        // A dies mid-send: B gets the action once the claim runs out.
        a.close();
        let hb = eventually("B claims the abandoned head", async || {
            let h = b.outbox_heads(10).await.unwrap();
            (!h.is_empty()).then_some(h)
        })
        .await;
        assert_eq!(hb[0].id, ha[0].id);
        // A retry releases the claim: due again, anyone may send it.
        b.mark_retry(hb[0].id, now_ms(), Some(503), "busy".into())
            .await
            .unwrap();
        let c = open(&url, Options::default()).await.unwrap();
        let hc = c.outbox_heads(10).await.unwrap();
        assert_eq!(hc.len(), 1);
        assert_eq!(hc[0].attempts, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_starting_together_migrate_once() {
        let Some((url, _db)) = testdb::create() else {
            return;
        };
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { Postgres::open(&url, Options::default()).await })
            })
            .collect();
        let mut stores: Vec<Postgres> = Vec::new();
        for open in opens {
            stores.push(open.await.unwrap().unwrap());
        }
        let pg = &stores[0];
        let mut c = pg.conn().await.unwrap();
        let rows = c
            .query(
                "SELECT version FROM digibot_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap();
        let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        let expected: Vec<i32> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, expected);
    }

    /// Twelve uploads of one plugin: the served one, the ten before it as
    /// rollback targets, and the bytes of the oldest deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugin_history_keeps_the_last_ten_versions() {
        let Some(db) = fixture() else {
            return;
        };
        let store = db.open().await;
        let records = store.plugin_records().expect("PostgreSQL records plugins");
        let hashes: Vec<String> = (0..12).map(|i| format!("h{i:02}")).collect();
        for (i, hash) in hashes.iter().enumerate() {
            records.put("echo", hash, &[i as u8]).await.unwrap();
        }
        let listed = records.list().await.unwrap();
        let echo = &listed["echo"];
        assert_eq!(echo.hash.as_deref(), Some("h11"));
        assert_eq!(echo.previous, hashes[1..11]);
        assert_eq!(records.bytes("echo", "h00").await.unwrap(), None);
        assert_eq!(records.bytes("echo", "h01").await.unwrap(), Some(vec![1]));
        assert_eq!(records.bytes("echo", "h11").await.unwrap(), Some(vec![11]));
        // A rollback still walks back through what is kept.
        assert_eq!(records.rollback("echo").await.unwrap(), Some(vec![10]));
    }
}

/// How the store reaches the database: TLS as `sslmode` asks, and a
/// timeout, never a hang, when the database is slow or silent.
#[cfg(test)]
mod transport_tests {
    use super::*;
    use std::time::Instant;

    /// The test server's URL as given (the cluster of `scripts/pg-cluster`
    /// asks for `verify-full` against its own CA).
    fn server_url() -> Option<String> {
        testdb::server()?;
        std::env::var("DIGIBOT_TEST_DATABASE_URL").ok()
    }

    /// The test cluster's CA (`sslrootcert=`); `None` (loudly, or failing
    /// under CI) when the test server has no TLS of ours.
    fn cluster_ca(url: &str) -> Option<String> {
        let ca = url
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("sslrootcert=")))
            .map(str::to_string);
        if ca.is_none() {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "the test server's URL has no sslrootcert: start it with scripts/pg-cluster"
                );
            }
            eprintln!("SKIPPED: TLS test (the test server's URL has no sslrootcert=)");
        }
        ca
    }

    /// `url` with its query replaced by `query`.
    fn with_query(url: &str, query: &str) -> String {
        let base = url.split_once('?').map_or(url, |(b, _)| b);
        format!("{base}?{query}")
    }

    /// Opens the store over `url` (on a fresh database).
    async fn open_on(url: &str, db: &testdb::DropDb) -> Result<Postgres, StoreError> {
        let url = DatabaseUrl::parse(url)?.with_dbname(db.name());
        Ok(Postgres::open(&url, Options::default()).await?)
    }

    async fn encrypted(pg: &Postgres) -> bool {
        let mut c = pg.conn().await.unwrap();
        c.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verify_full_against_the_clusters_ca_is_encrypted() {
        let Some(url) = server_url() else { return };
        let Some(_) = cluster_ca(&url) else { return };
        let (_, db) = testdb::create().unwrap();
        assert!(url.contains("sslmode=verify-full"), "{url}");
        let pg = open_on(&url, &db).await.unwrap();
        assert!(encrypted(&pg).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn require_encrypts_without_roots_and_disable_does_not() {
        let Some(url) = server_url() else { return };
        let Some(_) = cluster_ca(&url) else { return };
        let (_, db) = testdb::create().unwrap();
        let required = open_on(&with_query(&url, "sslmode=require"), &db)
            .await
            .unwrap();
        assert!(encrypted(&required).await);
        let disabled = open_on(&with_query(&url, "sslmode=disable"), &db)
            .await
            .unwrap();
        assert!(!encrypted(&disabled).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verify_full_refuses_a_host_the_certificate_does_not_name_and_verify_ca_takes_it() {
        let Some(url) = server_url() else { return };
        let Some(ca) = cluster_ca(&url) else { return };
        let (_, db) = testdb::create().unwrap();
        // The right server (hostaddr), under a name its certificate lacks.
        let port = DatabaseUrl::parse(&url)
            .unwrap()
            .session(Duration::from_secs(1))
            .get_ports()[0];
        let renamed =
            format!("postgres://postgres@db.invalid:{port}/digibot_test?hostaddr=127.0.0.1");
        let e = open_on(
            &format!("{renamed}&sslmode=verify-full&sslrootcert={ca}"),
            &db,
        )
        .await
        .err()
        .expect("connected to a server whose certificate names another host");
        assert!(e.to_string().contains("certificate"), "{e}");
        let pg = open_on(
            &format!("{renamed}&sslmode=verify-ca&sslrootcert={ca}"),
            &db,
        )
        .await
        .unwrap();
        assert!(encrypted(&pg).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verify_full_against_the_system_roots_refuses_a_private_ca() {
        let Some(url) = server_url() else { return };
        let Some(_) = cluster_ca(&url) else { return };
        let (_, db) = testdb::create().unwrap();
        let e = open_on(
            &with_query(&url, "sslmode=verify-full&sslrootcert=system"),
            &db,
        )
        .await
        .err()
        .expect("a certificate from the cluster's own CA passed as a public one");
        assert!(e.to_string().contains("certificate"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_statement_past_the_statement_timeout_is_a_timeout() {
        let Some((url, _db)) = testdb::create() else {
            return;
        };
        let pg = Postgres::open(
            &url,
            Options {
                statement_timeout: Duration::from_millis(300),
                pool_size: 1,
                ..Options::default()
            },
        )
        .await
        .unwrap();
        let mut c = pg.conn().await.unwrap();
        let started = Instant::now();
        let e = StoreError::from(c.query("SELECT pg_sleep(5)", &[]).await.unwrap_err());
        assert!(matches!(e, StoreError::Timeout(_)), "{e:?}");
        // The server cancelled it: well before the client's own deadline.
        assert!(
            started.elapsed() < Duration::from_millis(1200),
            "{:?}",
            started.elapsed()
        );
        // ... and the connection is still good.
        c.query("SELECT 1", &[]).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acquiring_waits_at_most_the_acquire_timeout() {
        let Some((url, _db)) = testdb::create() else {
            return;
        };
        let pg = Postgres::open(
            &url,
            Options {
                acquire_timeout: Duration::from_millis(300),
                pool_size: 1,
                ..Options::default()
            },
        )
        .await
        .unwrap();
        let held = pg.conn().await.unwrap();
        let started = Instant::now();
        let e = StoreError::from(pg.ping().await.unwrap_err());
        assert!(matches!(e, StoreError::Timeout(_)), "{e:?}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_millis(1500),
            "{waited:?}"
        );
        drop(held);
        pg.ping().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_accepts_and_never_answers_is_a_timeout() {
        // Not a PostgreSQL at all: a socket that takes connections and
        // says nothing (TLS handshake and startup both wait forever).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        for mode in ["require", "disable"] {
            let url = DatabaseUrl::parse(&format!(
                "postgres://postgres@127.0.0.1:{port}/db?connect_timeout=1&sslmode={mode}"
            ))
            .unwrap();
            let started = Instant::now();
            let e = open(&url, Options::default()).await.err().unwrap();
            assert!(matches!(e, StoreError::Timeout(_)), "{mode}: {e:?}");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{mode}: {:?}",
                started.elapsed()
            );
        }
    }
}
