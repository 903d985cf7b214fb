//! Pinned versions on PostgreSQL: which version of a `pin = "conversation"`
//! plugin each conversation started on, shared by the replicas (see
//! `Backend::pin_version`).

use super::{Error, Postgres};
use digibot_store::now_ms;

pub(crate) const MIGRATION: &str = r#"
-- The version of a `pin = "conversation"` plugin a conversation started
-- on: it keeps it until archived.
CREATE TABLE pins (
    conversation_id TEXT NOT NULL,
    plugin TEXT NOT NULL,
    version TEXT NOT NULL,
    pinned_at BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, plugin)
);
"#;

impl Postgres {
    /// One statement: pins if there is no pin, answers the pin either way.
    pub(crate) async fn pin_version(
        &self,
        plugin: &str,
        conversation_id: &str,
        version: &str,
    ) -> Result<String, Error> {
        let mut c = self.conn().await?;
        // A pin another replica commits while this statement runs is not
        // in its snapshot: the next statement sees it.
        for _ in 0..3 {
            let row = c
                .query_opt(
                    "WITH ins AS (
                        INSERT INTO pins (conversation_id, plugin, version, pinned_at)
                        VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING version
                     )
                     SELECT version FROM ins
                     UNION ALL SELECT version FROM pins WHERE conversation_id = $1 AND plugin = $2
                     LIMIT 1",
                    &[&conversation_id, &plugin, &version, &now_ms()],
                )
                .await?;
            if let Some(row) = row {
                return Ok(row.try_get(0)?);
            }
        }
        Ok(version.to_string())
    }

    pub(crate) async fn unpin(&self, conversation_id: &str) -> Result<usize, Error> {
        let mut c = self.conn().await?;
        let n = c
            .execute(
                "DELETE FROM pins WHERE conversation_id = $1",
                &[&conversation_id],
            )
            .await?;
        Ok(n as usize)
    }

    pub(crate) async fn pins(&self, conversation_id: &str) -> Result<Vec<(String, String)>, Error> {
        let mut c = self.conn().await?;
        let rows = c
            .query(
                "SELECT plugin, version FROM pins WHERE conversation_id = $1 ORDER BY plugin",
                &[&conversation_id],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }
}
