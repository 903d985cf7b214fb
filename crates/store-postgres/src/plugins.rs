//! The cluster's record of plugins (bytes, serving version, rollback
//! history) and of every replica's breakers: the SQL behind
//! [`PluginRecords`]. A change is announced with `NOTIFY digibot_plugins`,
//! which every replica's listener forwards to [`PluginRecords::changed`].

use super::{Error, PLUGINS_CHANNEL, Postgres};
use digibot_store::{HealthRow, PluginRecords, RecordedPlugin, StoreError, now_ms};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::{Mutex, broadcast};
use tokio_postgres::types::ToSql;

/// A statement parameter.
type Param<'a> = &'a (dyn ToSql + Sync);

/// Rollback targets kept per plugin (older versions and their bytes are
/// deleted), as the registry keeps on a single node.
const HISTORY_KEPT: i32 = 10;

/// A replica that has not reported for this long is left out of the
/// cluster view (it died or lost the database); its rows are deleted.
const STALE_MS: i64 = 10_000;

/// [`PluginRecords`] on the PostgreSQL back end.
pub(crate) struct PgPlugins {
    pg: Arc<Postgres>,
    notifications: Mutex<broadcast::Receiver<super::Notification>>,
}

impl PgPlugins {
    pub(crate) fn new(pg: Arc<Postgres>) -> PgPlugins {
        let notifications = Mutex::new(pg.notifications());
        PgPlugins { pg, notifications }
    }

    async fn notify(&self, name: &str) -> Result<(), Error> {
        let mut c = self.pg.conn().await?;
        c.execute("SELECT pg_notify($1, $2)", &[&PLUGINS_CHANNEL, &name])
            .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl PluginRecords for PgPlugins {
    fn replica(&self) -> &str {
        self.pg.replica()
    }

    async fn put(&self, name: &str, hash: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let now = now_ms();
        let mut c = self.pg.conn().await?;
        // One statement, so one transaction: the bytes and the new
        // serving version together. The row lock of ON CONFLICT DO
        // UPDATE orders concurrent uploads of one plugin; the version
        // replaced becomes the latest rollback target.
        c.execute(
            "WITH v AS (
                     INSERT INTO plugin_versions (name, hash, bytes, created_at)
                     VALUES ($1, $2, $3, $4) ON CONFLICT (name, hash) DO NOTHING
                 )
                 INSERT INTO plugins AS p (name, hash, previous, updated_at)
                 VALUES ($1, $2, '{}', $4)
                 ON CONFLICT (name) DO UPDATE SET
                     previous = CASE
                         WHEN p.hash IS NULL OR p.hash = EXCLUDED.hash
                             THEN array_remove(p.previous, EXCLUDED.hash)
                         ELSE array_append(
                             array_remove(array_remove(p.previous, EXCLUDED.hash), p.hash),
                             p.hash)
                     END,
                     hash = EXCLUDED.hash,
                     updated_at = EXCLUDED.updated_at",
            &[
                &name as Param,
                &hash as Param,
                &bytes as Param,
                &now as Param,
            ],
        )
        .await?;
        // Then the history's bound: the newest targets, and the bytes of
        // what is neither served nor a target. A concurrent upload's
        // version and its reference commit together, in its statement, so
        // this never deletes a version about to be served.
        c.execute(
            "UPDATE plugins
             SET previous = previous[cardinality(previous) - $2 + 1:]
             WHERE name = $1 AND cardinality(previous) > $2",
            &[&name as Param, &HISTORY_KEPT as Param],
        )
        .await?;
        c.execute(
            "DELETE FROM plugin_versions v USING plugins p
             WHERE v.name = $1 AND p.name = $1
               AND v.hash IS DISTINCT FROM p.hash AND NOT (v.hash = ANY(p.previous))",
            &[&name as Param],
        )
        .await?;
        drop(c);
        Ok(self.notify(name).await?)
    }

    async fn remove(&self, name: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut c = self.pg.conn().await?;
        let n = c
            .execute(
                "UPDATE plugins SET hash = NULL, updated_at = $2
                 WHERE name = $1 AND hash IS NOT NULL",
                &[&name as Param, &now as Param],
            )
            .await?;
        drop(c);
        self.notify(name).await?;
        Ok(n > 0)
    }

    async fn rollback(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let now = now_ms();
        let mut c = self.pg.conn().await?;
        let row = c
            .query_opt(
                "WITH cur AS (
                     SELECT hash, previous, previous[cardinality(previous)] AS target
                     FROM plugins WHERE name = $1 AND cardinality(previous) > 0
                     FOR UPDATE
                 ), moved AS (
                     UPDATE plugins p SET
                         hash = cur.target,
                         previous = array_remove(array_remove(
                             cur.previous[1:cardinality(cur.previous) - 1], cur.hash), cur.target),
                         updated_at = $2
                     FROM cur WHERE p.name = $1
                     RETURNING cur.target
                 )
                 SELECT v.bytes FROM moved JOIN plugin_versions v
                 ON v.name = $1 AND v.hash = moved.target",
                &[&name as Param, &now as Param],
            )
            .await?;
        drop(c);
        let bytes = row.map(|r| r.get::<_, Vec<u8>>(0));
        if bytes.is_some() {
            self.notify(name).await?;
        }
        Ok(bytes)
    }

    async fn list(&self) -> Result<BTreeMap<String, RecordedPlugin>, StoreError> {
        let mut c = self.pg.conn().await?;
        let rows = c
            .query("SELECT name, hash, previous FROM plugins", &[])
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    RecordedPlugin {
                        hash: r.get(1),
                        previous: r.get(2),
                    },
                )
            })
            .collect())
    }

    async fn bytes(&self, name: &str, hash: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut c = self.pg.conn().await?;
        let row = c
            .query_opt(
                "SELECT bytes FROM plugin_versions WHERE name = $1 AND hash = $2",
                &[&name as Param, &hash as Param],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn publish_health(
        &self,
        plugins: Vec<(String, String, String)>,
    ) -> Result<(), StoreError> {
        let names: Vec<&str> = plugins.iter().map(|p| p.0.as_str()).collect();
        let hashes: Vec<&str> = plugins.iter().map(|p| p.1.as_str()).collect();
        let reports: Vec<&str> = plugins.iter().map(|p| p.2.as_str()).collect();
        let now = now_ms();
        let mut c = self.pg.conn().await?;
        c
            .execute(
                "WITH gone AS (
                     DELETE FROM plugin_health
                     WHERE (replica = $1 AND NOT (name = ANY($2))) OR updated_at < $6
                 )
                 INSERT INTO plugin_health (replica, name, hash, report, updated_at)
                 SELECT $1, n, h, r, $5 FROM unnest($2::text[], $3::text[], $4::text[]) AS t(n, h, r)
                 ON CONFLICT (replica, name) DO UPDATE
                 SET hash = EXCLUDED.hash, report = EXCLUDED.report, updated_at = EXCLUDED.updated_at",
                &[&self.pg.replica() as Param, &names as Param, &hashes as Param, &reports as Param, &now as Param, &(now - STALE_MS) as Param],
            )
            .await?;
        Ok(())
    }

    async fn health(&self) -> Result<Vec<HealthRow>, StoreError> {
        let since = now_ms() - STALE_MS;
        let mut c = self.pg.conn().await?;
        let rows = c
            .query(
                "SELECT replica, name, hash, report, updated_at FROM plugin_health
                 WHERE updated_at >= $1 ORDER BY name, replica",
                &[&since as Param],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| HealthRow {
                replica: row.get(0),
                name: row.get(1),
                hash: row.get(2),
                report: row.get(3),
                reported_at: row.get(4),
            })
            .collect())
    }

    async fn changed(&self) -> Option<()> {
        let mut notifications = self.notifications.lock().await;
        loop {
            match notifications.recv().await {
                Ok(n) if n.channel != PLUGINS_CHANNEL => continue,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return Some(()),
                // The store is gone: so is this replica.
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
