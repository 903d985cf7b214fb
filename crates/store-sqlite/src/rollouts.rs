//! Rollouts on SQLite: the `rollouts` record (one row per plugin) and the
//! `rollout_comparisons` kept with it (see `digibot_store::rollout`).

use super::{Db, Error, reading};
use digibot_store::rollout::COMPARISONS_KEPT;
use digibot_store::{Comparison, RolloutRecord, StoreError, now_ms};
use rusqlite::{Connection, OptionalExtension, params};
use std::sync::Arc;

pub(crate) const MIGRATION: &str = r#"
-- Rollouts: one row per plugin (its latest), with the candidate's bytes
-- and the totals of its comparisons.
CREATE TABLE rollouts (
    plugin TEXT PRIMARY KEY,
    id TEXT NOT NULL,
    mode TEXT NOT NULL,
    percent INTEGER NOT NULL,
    candidate TEXT NOT NULL,
    bytes BLOB NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    started_at INTEGER NOT NULL,
    changed_at INTEGER NOT NULL,
    same INTEGER NOT NULL DEFAULT 0,
    different INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE rollout_comparisons (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    plugin TEXT NOT NULL,
    rollout TEXT NOT NULL,
    event_key TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    verdict TEXT NOT NULL,
    serving TEXT NOT NULL,
    candidate TEXT NOT NULL,
    reason TEXT,
    at INTEGER NOT NULL,
    UNIQUE (plugin, rollout, event_key)
);
"#;

const COLUMNS: &str = "plugin, id, mode, percent, candidate, state, reason, started_at, changed_at, same, different, failed";

fn record_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRecord> {
    Ok(RolloutRecord {
        plugin: r.get(0)?,
        id: r.get(1)?,
        mode: r.get(2)?,
        percent: r.get::<_, i64>(3)?.clamp(0, 100) as u8,
        candidate: r.get(4)?,
        state: r.get(5)?,
        reason: r.get(6)?,
        started_at: r.get(7)?,
        changed_at: r.get(8)?,
        same: r.get::<_, i64>(9)?.max(0) as u64,
        different: r.get::<_, i64>(10)?.max(0) as u64,
        failed: r.get::<_, i64>(11)?.max(0) as u64,
    })
}

fn json(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

impl Db {
    pub(crate) async fn start_rollout(
        &self,
        r: RolloutRecord,
        bytes: Vec<u8>,
    ) -> Result<(), Error> {
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM rollout_comparisons WHERE plugin = ?1")?
                .execute([&r.plugin])?;
            conn.prepare_cached(
                "INSERT OR REPLACE INTO rollouts
                   (plugin, id, mode, percent, candidate, bytes, state, reason, started_at, changed_at, same, different, failed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, 0, 0)",
            )?
            .execute(params![
                r.plugin, r.id, r.mode, r.percent, r.candidate, bytes, r.state, r.reason,
                r.started_at, r.changed_at
            ])?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn end_rollout(
        &self,
        plugin: String,
        id: String,
        state: String,
        reason: Option<String>,
    ) -> Result<bool, Error> {
        self.write(move |conn| {
            let n = conn
                .prepare_cached(
                    "UPDATE rollouts SET state = ?3, reason = ?4, changed_at = ?5
                     WHERE plugin = ?1 AND id = ?2 AND state = 'active'",
                )?
                .execute(params![plugin, id, state, reason, now_ms()])?;
            Ok(n > 0)
        })
        .await
    }

    pub(crate) async fn record_comparison(&self, c: Comparison) -> Result<bool, Error> {
        self.write(move |conn| {
            let inserted = conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO rollout_comparisons
                       (plugin, rollout, event_key, conversation_id, verdict, serving, candidate, reason, at)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9
                     WHERE EXISTS (SELECT 1 FROM rollouts WHERE plugin = ?1 AND id = ?2)",
                )?
                .execute(params![
                    c.plugin,
                    c.rollout,
                    c.event_key,
                    c.conversation_id,
                    c.verdict,
                    c.serving.to_string(),
                    c.candidate.to_string(),
                    c.reason,
                    c.at
                ])?;
            if inserted == 0 {
                return Ok(false);
            }
            let column = match c.verdict.as_str() {
                "same" => "same",
                "different" => "different",
                _ => "failed",
            };
            conn.prepare_cached(&format!(
                "UPDATE rollouts SET {column} = {column} + 1 WHERE plugin = ?1 AND id = ?2"
            ))?
            .execute(params![c.plugin, c.rollout])?;
            conn.prepare_cached(
                "DELETE FROM rollout_comparisons WHERE plugin = ?1 AND rollout = ?2 AND seq <= (
                   SELECT seq FROM rollout_comparisons WHERE plugin = ?1 AND rollout = ?2
                   ORDER BY seq DESC LIMIT 1 OFFSET ?3)",
            )?
            .execute(params![c.plugin, c.rollout, COMPARISONS_KEPT])?;
            Ok(true)
        })
        .await
    }
}

fn rollouts(conn: &Connection, plugin: Option<&str>) -> Result<Vec<RolloutRecord>, Error> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM rollouts WHERE (?1 IS NULL OR plugin = ?1) ORDER BY plugin"
    ))?;
    let rows = stmt.query_map(params![plugin], record_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub(crate) async fn rollout(
    db: &Arc<Db>,
    plugin: &str,
) -> Result<Option<RolloutRecord>, StoreError> {
    let plugin = plugin.to_string();
    reading(db, move |db| {
        db.read(|conn| Ok(rollouts(conn, Some(&plugin))?.into_iter().next()))
    })
    .await
}

pub(crate) async fn all(db: &Arc<Db>) -> Result<Vec<RolloutRecord>, StoreError> {
    reading(db, move |db| db.read(|conn| rollouts(conn, None))).await
}

pub(crate) async fn bytes(
    db: &Arc<Db>,
    plugin: &str,
    id: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    let (plugin, id) = (plugin.to_string(), id.to_string());
    reading(db, move |db| {
        db.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT bytes FROM rollouts WHERE plugin = ?1 AND id = ?2")?
                .query_row(params![plugin, id], |r| r.get(0))
                .optional()?)
        })
    })
    .await
}

pub(crate) async fn comparisons(
    db: &Arc<Db>,
    plugin: &str,
    id: &str,
    limit: usize,
) -> Result<Vec<Comparison>, StoreError> {
    let (plugin, id) = (plugin.to_string(), id.to_string());
    reading(db, move |db| {
        db.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT plugin, rollout, event_key, conversation_id, verdict, serving, candidate, reason, at
                 FROM rollout_comparisons WHERE plugin = ?1 AND rollout = ?2
                 ORDER BY seq DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![plugin, id, limit as i64], |r| {
                Ok(Comparison {
                    plugin: r.get(0)?,
                    rollout: r.get(1)?,
                    event_key: r.get(2)?,
                    conversation_id: r.get(3)?,
                    verdict: r.get(4)?,
                    serving: json(r.get(5)?),
                    candidate: json(r.get(6)?),
                    reason: r.get(7)?,
                    at: r.get(8)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    })
    .await
}
