//! Pinned versions on SQLite: which version of a `pin = "conversation"`
//! plugin each conversation started on (see `Backend::pin_version`).

use super::{Db, reading};
use digibot_store::{StoreError, now_ms};
use rusqlite::{OptionalExtension, params};
use std::sync::Arc;

pub(crate) const MIGRATION: &str = r#"
-- The version of a `pin = "conversation"` plugin a conversation started
-- on: it keeps it until archived.
CREATE TABLE pins (
    conversation_id TEXT NOT NULL,
    plugin TEXT NOT NULL,
    version TEXT NOT NULL,
    pinned_at INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, plugin)
) WITHOUT ROWID;
"#;

const SELECT: &str = "SELECT version FROM pins WHERE conversation_id = ?1 AND plugin = ?2";

/// The pinned version, read first (a pinned conversation's every event);
/// pinned to `version` through the writer only the first time.
pub(crate) async fn pin_version(
    db: &Arc<Db>,
    plugin: &str,
    conversation_id: &str,
    version: &str,
) -> Result<String, StoreError> {
    let (p, c) = (plugin.to_string(), conversation_id.to_string());
    let found = reading(db, move |db| {
        db.read(|conn| {
            Ok(conn
                .prepare_cached(SELECT)?
                .query_row(params![c, p], |r| r.get::<_, String>(0))
                .optional()?)
        })
    })
    .await?;
    if let Some(v) = found {
        return Ok(v);
    }
    let (p, c, v) = (
        plugin.to_string(),
        conversation_id.to_string(),
        version.to_string(),
    );
    Ok(db
        .write(move |conn| {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO pins (conversation_id, plugin, version, pinned_at)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![c, p, v, now_ms()])?;
            Ok(conn
                .prepare_cached(SELECT)?
                .query_row(params![c, p], |r| r.get::<_, String>(0))?)
        })
        .await?)
}

pub(crate) async fn unpin(db: &Arc<Db>, conversation_id: &str) -> Result<usize, StoreError> {
    let c = conversation_id.to_string();
    Ok(db
        .write(move |conn| {
            Ok(conn
                .prepare_cached("DELETE FROM pins WHERE conversation_id = ?1")?
                .execute([c])?)
        })
        .await?)
}

pub(crate) async fn pins(
    db: &Arc<Db>,
    conversation_id: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    let c = conversation_id.to_string();
    reading(db, move |db| {
        db.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT plugin, version FROM pins WHERE conversation_id = ?1 ORDER BY plugin",
            )?;
            let rows = stmt.query_map([c], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    })
    .await
}
