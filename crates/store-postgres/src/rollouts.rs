//! Rollouts on PostgreSQL: the `rollouts` record (one row per plugin, read
//! by every replica) and the `rollout_comparisons` kept with it (see
//! `digibot_store::rollout`). Each change is one statement, so one
//! transaction: two replicas comparing the same event count it once, and
//! only one of two replicas ending a rollout ends it.

use super::{Error, Postgres};
use digibot_store::rollout::COMPARISONS_KEPT;
use digibot_store::{Comparison, RolloutRecord, now_ms};
use tokio_postgres::Row;

pub(crate) const MIGRATION: &str = r#"
-- Rollouts: one row per plugin (its latest), with the candidate's bytes
-- and the totals of its comparisons.
CREATE TABLE rollouts (
    plugin TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    mode TEXT NOT NULL,
    percent SMALLINT NOT NULL,
    candidate TEXT NOT NULL,
    bytes BYTEA NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    started_at BIGINT NOT NULL,
    changed_at BIGINT NOT NULL,
    same BIGINT NOT NULL DEFAULT 0,
    different BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE rollout_comparisons (
    seq BIGSERIAL PRIMARY KEY,
    plugin TEXT NOT NULL,
    rollout TEXT NOT NULL,
    event_key TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    verdict TEXT NOT NULL,
    serving TEXT NOT NULL,
    candidate TEXT NOT NULL,
    reason TEXT,
    at BIGINT NOT NULL,
    UNIQUE (plugin, rollout, event_key)
);
"#;

const COLUMNS: &str = "plugin, id, mode, percent, candidate, state, reason, started_at, changed_at, same, different, failed";

fn record_row(r: &Row) -> Result<RolloutRecord, Error> {
    Ok(RolloutRecord {
        plugin: r.try_get(0)?,
        id: r.try_get(1)?,
        mode: r.try_get(2)?,
        percent: r.try_get::<_, i16>(3)?.clamp(0, 100) as u8,
        candidate: r.try_get(4)?,
        state: r.try_get(5)?,
        reason: r.try_get(6)?,
        started_at: r.try_get(7)?,
        changed_at: r.try_get(8)?,
        same: r.try_get::<_, i64>(9)?.max(0) as u64,
        different: r.try_get::<_, i64>(10)?.max(0) as u64,
        failed: r.try_get::<_, i64>(11)?.max(0) as u64,
    })
}

fn json(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

impl Postgres {
    pub(crate) async fn start_rollout(
        &self,
        r: RolloutRecord,
        bytes: Vec<u8>,
    ) -> Result<(), Error> {
        let mut c = self.conn().await?;
        c.execute(
            "WITH gone AS (DELETE FROM rollout_comparisons WHERE plugin = $1)
             INSERT INTO rollouts
               (plugin, id, mode, percent, candidate, bytes, state, reason, started_at, changed_at, same, different, failed)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, 0, 0)
             ON CONFLICT (plugin) DO UPDATE SET
               id = EXCLUDED.id, mode = EXCLUDED.mode, percent = EXCLUDED.percent,
               candidate = EXCLUDED.candidate, bytes = EXCLUDED.bytes, state = EXCLUDED.state,
               reason = EXCLUDED.reason, started_at = EXCLUDED.started_at,
               changed_at = EXCLUDED.changed_at, same = 0, different = 0, failed = 0",
            &[
                &r.plugin,
                &r.id,
                &r.mode,
                &i16::from(r.percent),
                &r.candidate,
                &bytes,
                &r.state,
                &r.reason,
                &r.started_at,
                &r.changed_at,
            ],
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn end_rollout(
        &self,
        plugin: &str,
        id: &str,
        state: &str,
        reason: Option<String>,
    ) -> Result<bool, Error> {
        let mut c = self.conn().await?;
        let n = c
            .execute(
                "UPDATE rollouts SET state = $3, reason = $4, changed_at = $5
                 WHERE plugin = $1 AND id = $2 AND state = 'active'",
                &[&plugin, &id, &state, &reason, &now_ms()],
            )
            .await?;
        Ok(n > 0)
    }

    pub(crate) async fn rollouts(&self, plugin: Option<&str>) -> Result<Vec<RolloutRecord>, Error> {
        let mut c = self.conn().await?;
        let plugin = plugin.map(str::to_string);
        let rows = c
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM rollouts WHERE ($1::TEXT IS NULL OR plugin = $1) ORDER BY plugin"
                ),
                &[&plugin],
            )
            .await?;
        rows.iter().map(record_row).collect()
    }

    pub(crate) async fn rollout_bytes(
        &self,
        plugin: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>, Error> {
        let mut c = self.conn().await?;
        let row = c
            .query_opt(
                "SELECT bytes FROM rollouts WHERE plugin = $1 AND id = $2",
                &[&plugin, &id],
            )
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    pub(crate) async fn record_comparison(&self, c: Comparison) -> Result<bool, Error> {
        let mut conn = self.conn().await?;
        let (serving, candidate) = (c.serving.to_string(), c.candidate.to_string());
        let row = conn
            .query_one(
                "WITH ins AS (
                   INSERT INTO rollout_comparisons
                     (plugin, rollout, event_key, conversation_id, verdict, serving, candidate, reason, at)
                   SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
                   WHERE EXISTS (SELECT 1 FROM rollouts WHERE plugin = $1 AND id = $2)
                   ON CONFLICT (plugin, rollout, event_key) DO NOTHING
                   RETURNING verdict
                 ), counted AS (
                   UPDATE rollouts SET
                     same = same + (SELECT COUNT(*) FROM ins WHERE verdict = 'same'),
                     different = different + (SELECT COUNT(*) FROM ins WHERE verdict = 'different'),
                     failed = failed + (SELECT COUNT(*) FROM ins WHERE verdict NOT IN ('same', 'different'))
                   WHERE plugin = $1 AND id = $2 AND EXISTS (SELECT 1 FROM ins)
                 )
                 SELECT COUNT(*) FROM ins",
                &[
                    &c.plugin,
                    &c.rollout,
                    &c.event_key,
                    &c.conversation_id,
                    &c.verdict,
                    &serving,
                    &candidate,
                    &c.reason,
                    &c.at,
                ],
            )
            .await?;
        let inserted: i64 = row.try_get(0)?;
        if inserted == 0 {
            return Ok(false);
        }
        conn.execute(
            "DELETE FROM rollout_comparisons WHERE plugin = $1 AND rollout = $2 AND seq <= (
               SELECT seq FROM rollout_comparisons WHERE plugin = $1 AND rollout = $2
               ORDER BY seq DESC LIMIT 1 OFFSET $3)",
            &[&c.plugin, &c.rollout, &COMPARISONS_KEPT],
        )
        .await?;
        Ok(true)
    }

    pub(crate) async fn comparisons(
        &self,
        plugin: &str,
        id: &str,
        limit: usize,
    ) -> Result<Vec<Comparison>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT plugin, rollout, event_key, conversation_id, verdict, serving, candidate, reason, at
                 FROM rollout_comparisons WHERE plugin = $1 AND rollout = $2
                 ORDER BY seq DESC LIMIT $3",
                &[&plugin, &id, &(limit as i64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Comparison {
                    plugin: r.try_get(0)?,
                    rollout: r.try_get(1)?,
                    event_key: r.try_get(2)?,
                    conversation_id: r.try_get(3)?,
                    verdict: r.try_get(4)?,
                    serving: json(r.try_get(5)?),
                    candidate: json(r.try_get(6)?),
                    reason: r.try_get(7)?,
                    at: r.try_get(8)?,
                })
            })
            .collect()
    }
}
