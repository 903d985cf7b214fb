//! The outbox's planner statistics, kept current by the replica that fills
//! it.
//!
//! The sender's claim (`Postgres::outbox_heads`) costs the heads it returns
//! only on one plan: walk `outbox_due` in due order, probe `outbox_pending`
//! for an older action of the same conversation, stop at the limit.
//! PostgreSQL picks that plan from statistics, and autovacuum refreshes them
//! at most once a minute, while a burst grows the backlog from nothing to
//! thousands in seconds. On statistics taken when the outbox was empty the
//! planner sorts every pending row, or probes with the wrong index: 24 ms
//! for 64 heads at 4,000 pending, 73 ms in the worst case measured. So each
//! replica analyzes the outbox itself once it has queued as many actions as
//! were pending at its last analysis (at least [`MIN_QUEUED`]): in the
//! background, one at a time, never on a caller's path.

use crate::pool::Pool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Actions queued before the first analysis, and the least between two.
pub(crate) const MIN_QUEUED: u64 = 500;

/// Counts the actions this replica queued since its last `ANALYZE outbox`.
pub(crate) struct OutboxStats {
    pool: Pool,
    queued: AtomicU64,
    /// Queued actions that call for the next analysis.
    threshold: AtomicU64,
    running: AtomicBool,
}

impl OutboxStats {
    pub(crate) fn new(pool: Pool) -> Arc<OutboxStats> {
        Arc::new(OutboxStats {
            pool,
            queued: AtomicU64::new(0),
            threshold: AtomicU64::new(MIN_QUEUED),
            running: AtomicBool::new(false),
        })
    }

    /// Notes `n` actions committed to the outbox; starts an analysis when
    /// enough have been since the last.
    pub(crate) fn queued(self: &Arc<Self>, n: usize) {
        if n == 0 {
            return;
        }
        let total = self.queued.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total < self.threshold.load(Ordering::Relaxed)
            || self.running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let stats = self.clone();
        tokio::spawn(async move {
            match stats.analyze().await {
                Ok(pending) => stats
                    .threshold
                    .store(pending.max(MIN_QUEUED), Ordering::Relaxed),
                Err(e) => {
                    // Not the owner (or the store is closing): the claim
                    // still works, on autovacuum's statistics.
                    tracing::warn!(error = %e, "ANALYZE outbox failed; not trying again");
                    stats.threshold.store(u64::MAX, Ordering::Relaxed);
                }
            }
            // What was queued during the analysis counts towards the next.
            stats.queued.fetch_sub(total, Ordering::Relaxed);
            stats.running.store(false, Ordering::Release);
        });
    }

    /// Analyzes the outbox; returns how many actions are pending, as the
    /// analysis estimated them (the pending index's row count: no count of
    /// a backlog of its own).
    async fn analyze(&self) -> Result<u64, crate::Error> {
        let mut c = self.pool.get().await?;
        c.execute("ANALYZE outbox", &[]).await?;
        let pending: f32 = c
            .query_one(
                "SELECT reltuples FROM pg_class WHERE oid = 'outbox_due'::regclass",
                &[],
            )
            .await?
            .try_get(0)?;
        Ok(pending.max(0.0) as u64)
    }
}
