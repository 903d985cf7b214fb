//! Deliveries recorded together: the sender's `mark_sent` calls that
//! arrive while one such statement is in flight share the next one, so
//! under load a webhook's delivery costs a fraction of a statement (a
//! group commit, as SQLite's writer does; PostgreSQL shares the WAL flush
//! but not the round trip). Idle, a delivery goes out alone at once: no
//! timer, no added wait.
//!
//! A delivered hand-off is not batched: it changes who holds the
//! conversation in the same transaction (see `Postgres::mark_sent`).

use crate::pool::Pool;
use digibot_store::{StoreError, now_ms};
use tokio::sync::{mpsc, oneshot};

/// At most this many deliveries in one statement.
const MAX_BATCH: usize = 256;

/// One delivery: the action, Digishare's status and message id.
pub(crate) struct Delivery {
    pub id: i64,
    pub status: u16,
    pub message_id: Option<String>,
}

type Reply = oneshot::Sender<Result<(), StoreError>>;

/// Where `mark_sent` hands its delivery; the task behind it records them.
pub(crate) struct Deliveries {
    tx: mpsc::UnboundedSender<(Delivery, Reply)>,
}

impl Deliveries {
    /// The recording task (the caller keeps it, to stop it with the store).
    pub(crate) fn start(pool: Pool) -> (Deliveries, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Deliveries { tx }, tokio::spawn(run(pool, rx)))
    }

    /// Records `delivery`, committed when this returns.
    pub(crate) async fn record(&self, delivery: Delivery) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((delivery, reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.unwrap_or(Err(StoreError::Closed))
    }
}

async fn run(pool: Pool, mut rx: mpsc::UnboundedReceiver<(Delivery, Reply)>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let result = statement(&pool, &batch).await;
        for (_, reply) in batch.drain(..) {
            let _ = reply.send(result.as_ref().map(|_| ()).map_err(copy));
        }
    }
}

/// The same error for each caller of one batch.
fn copy(e: &StoreError) -> StoreError {
    match e {
        StoreError::Timeout(m) => StoreError::Timeout(m.clone()),
        StoreError::Closed => StoreError::Closed,
        other => StoreError::Database(other.to_string()),
    }
}

/// Every delivery of `batch` in one statement: each action sent, with its
/// message id remembered (to recognise the message when it comes back).
async fn statement(pool: &Pool, batch: &[(Delivery, Reply)]) -> Result<(), StoreError> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut statuses = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    for (d, _) in batch {
        ids.push(d.id);
        statuses.push(i64::from(d.status));
        messages.push(d.message_id.as_deref());
    }
    let mut c = pool.get().await?;
    c.query_one(
        "WITH sent AS (
            UPDATE outbox o SET status = 'sent', attempts = o.attempts + 1, last_status = d.status,
                   last_error = NULL, done_at = $1, claimed_by = NULL, claim_expires = NULL
            FROM unnest($2::bigint[], $3::bigint[], $4::text[]) AS d(id, status, message_id)
            WHERE o.id = d.id
            RETURNING o.id, o.conversation_id, d.message_id
         ), ids AS (
            INSERT INTO sent_messages (conversation_id, message_id, action_id, sent_at)
            SELECT conversation_id, message_id, id, $1 FROM sent WHERE message_id IS NOT NULL
            ON CONFLICT (conversation_id, message_id) DO NOTHING
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM sent), (SELECT count(*) FROM ids)",
        &[&now_ms(), &ids, &statuses, &messages],
    )
    .await?;
    Ok(())
}
