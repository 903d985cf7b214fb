//! Plugins across replicas sharing PostgreSQL: the cluster's record of
//! plugins (bytes, serving version, rollback history) and of every
//! replica's breakers, and the loop that keeps this replica's registry in
//! step with it.
//!
//! A change made through one replica (upload, rollback, removal, a file
//! dropped in its plugins folder) is committed to `plugins` /
//! `plugin_versions` by [`PgPlugins`] and announced with
//! `NOTIFY digibot_plugins`; every replica's [`run`] loop wakes on it (and
//! once a second regardless, in case a notification was lost while its
//! listener reconnected) and calls [`Registry::sync`], which compiles each
//! new version into that replica's own cache through the registry's usual
//! validate-then-swap path.
//!
//! Breakers stay per replica (a failure is often local to one machine, and
//! sharing them would cost a round trip per event), but each replica
//! publishes its breakers to `plugin_health` every tick, and
//! `/admin/plugins` on any replica lists them all.

use crate::registry::{ClusterView, HealthReport, Registry, ReplicaHealth, SharedPlugin};
use crate::store::postgres::{PLUGINS_CHANNEL, Postgres};
use crate::store::{Store, StoreError, now_ms};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::types::ToSql;

/// A statement parameter.
type Param<'a> = &'a (dyn ToSql + Sync);

/// How often a replica checks the record without a notification, and
/// publishes its breakers.
pub const TICK: Duration = Duration::from_secs(1);

/// A replica that has not reported for this long is left out of the
/// cluster view (it died or lost the database); its rows are deleted.
const STALE_MS: i64 = 10_000;

/// The cluster's plugin record in PostgreSQL. Its methods block: call
/// them from blocking threads (they drive the store's async client).
pub struct PgPlugins {
    store: Store,
    runtime: tokio::runtime::Handle,
}

impl PgPlugins {
    /// On `store`'s PostgreSQL back end (`None` on SQLite), driven from
    /// blocking threads through `runtime`.
    pub fn new(store: &Store, runtime: tokio::runtime::Handle) -> Option<PgPlugins> {
        store.postgres()?;
        Some(PgPlugins {
            store: store.clone(),
            runtime,
        })
    }

    fn pg(&self) -> Result<&Postgres, StoreError> {
        self.store.postgres().ok_or(StoreError::Closed)
    }

    fn block<T>(
        &self,
        f: impl AsyncFnOnce(&Postgres) -> Result<T, StoreError>,
    ) -> Result<T, String> {
        let pg = self.pg().map_err(|e| e.to_string())?;
        self.runtime.block_on(f(pg)).map_err(|e| e.to_string())
    }

    /// This replica, as it signs its breaker reports.
    pub fn replica(&self) -> String {
        self.pg()
            .map(|pg| pg.replica().to_string())
            .unwrap_or_default()
    }

    /// Publishes this replica's breakers (`(name, version, health)`) and
    /// forgets replicas that stopped reporting.
    pub fn publish_health(&self, plugins: &[(String, String, HealthReport)]) -> Result<(), String> {
        let names: Vec<&str> = plugins.iter().map(|p| p.0.as_str()).collect();
        let hashes: Vec<&str> = plugins.iter().map(|p| p.1.as_str()).collect();
        let reports: Vec<String> = plugins
            .iter()
            .map(|p| serde_json::to_string(&p.2).unwrap_or_default())
            .collect();
        let now = now_ms();
        self.block(async |pg| {
            let c = pg.client().await?;
            c.client()
                .execute(
                    "WITH gone AS (
                         DELETE FROM plugin_health
                         WHERE (replica = $1 AND NOT (name = ANY($2))) OR updated_at < $6
                     )
                     INSERT INTO plugin_health (replica, name, hash, report, updated_at)
                     SELECT $1, n, h, r, $5 FROM unnest($2::text[], $3::text[], $4::text[]) AS t(n, h, r)
                     ON CONFLICT (replica, name) DO UPDATE
                     SET hash = EXCLUDED.hash, report = EXCLUDED.report, updated_at = EXCLUDED.updated_at",
                    &[&pg.replica() as Param, &names as Param, &hashes as Param, &reports as Param, &now as Param, &(now - STALE_MS) as Param],
                )
                .await?;
            Ok(())
        })
    }

    /// The record and every live replica's breakers.
    pub fn view(&self) -> Result<ClusterView, String> {
        let plugins = crate::registry::SharedPlugins::list(self)?;
        let since = now_ms() - STALE_MS;
        let rows = self.block(async |pg| {
            let c = pg.client().await?;
            Ok(c.client()
                .query(
                    "SELECT replica, name, hash, report, updated_at FROM plugin_health
                     WHERE updated_at >= $1 ORDER BY name, replica",
                    &[&since as Param],
                )
                .await?)
        })?;
        let mut health: BTreeMap<String, Vec<ReplicaHealth>> = BTreeMap::new();
        for row in rows {
            let report: String = row.get(3);
            let Ok(report) = serde_json::from_str::<HealthReport>(&report) else {
                continue;
            };
            health.entry(row.get(1)).or_default().push(ReplicaHealth {
                replica: row.get(0),
                version: row.get(2),
                health: report,
                reported_at: row.get(4),
            });
        }
        Ok(ClusterView { plugins, health })
    }

    async fn notify(pg: &Postgres, name: &str) -> Result<(), StoreError> {
        let c = pg.client().await?;
        c.client()
            .execute("SELECT pg_notify($1, $2)", &[&PLUGINS_CHANNEL, &name])
            .await?;
        Ok(())
    }
}

impl crate::registry::SharedPlugins for PgPlugins {
    fn put(&self, name: &str, hash: &str, bytes: &[u8]) -> Result<(), String> {
        let now = now_ms();
        self.block(async |pg| {
            let c = pg.client().await?;
            // One statement, so one transaction: the bytes and the new
            // serving version together. The row lock of ON CONFLICT DO
            // UPDATE orders concurrent uploads of one plugin; the version
            // replaced becomes the latest rollback target.
            c.client()
                .execute(
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
            drop(c);
            PgPlugins::notify(pg, name).await
        })
    }

    fn remove(&self, name: &str) -> Result<bool, String> {
        let now = now_ms();
        self.block(async |pg| {
            let c = pg.client().await?;
            let n = c
                .client()
                .execute(
                    "UPDATE plugins SET hash = NULL, updated_at = $2
                     WHERE name = $1 AND hash IS NOT NULL",
                    &[&name as Param, &now as Param],
                )
                .await?;
            drop(c);
            PgPlugins::notify(pg, name).await?;
            Ok(n > 0)
        })
    }

    fn rollback(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        let now = now_ms();
        self.block(async |pg| {
            let c = pg.client().await?;
            let row = c
                .client()
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
                PgPlugins::notify(pg, name).await?;
            }
            Ok(bytes)
        })
    }

    fn list(&self) -> Result<BTreeMap<String, SharedPlugin>, String> {
        let rows = self.block(async |pg| {
            let c = pg.client().await?;
            Ok(c.client()
                .query("SELECT name, hash, previous FROM plugins", &[])
                .await?)
        })?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.get(0),
                    SharedPlugin {
                        hash: r.get(1),
                        previous: r.get(2),
                    },
                )
            })
            .collect())
    }

    fn bytes(&self, name: &str, hash: &str) -> Result<Option<Vec<u8>>, String> {
        self.block(async |pg| {
            let c = pg.client().await?;
            let row = c
                .client()
                .query_opt(
                    "SELECT bytes FROM plugin_versions WHERE name = $1 AND hash = $2",
                    &[&name as Param, &hash as Param],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }
}

/// One round: serve what the cluster recorded, publish this replica's
/// breakers, refresh the view `/admin/plugins` shows. Blocking.
fn round(registry: &Registry, shared: &PgPlugins) {
    let (changed, errors) = registry.sync();
    for name in changed {
        tracing::info!(plugin = %name, "plugin changed by another replica; now serving it");
    }
    for e in errors {
        tracing::warn!(error = %e, "cannot serve the cluster's plugin");
    }
    let local: Vec<(String, String, HealthReport)> = registry
        .report()
        .into_iter()
        .map(|p| (p.name, p.version, p.health))
        .collect();
    if let Err(e) = shared.publish_health(&local) {
        tracing::debug!(error = %e, "cannot publish plugin health");
    }
    match shared.view() {
        Ok(view) => registry.set_cluster_view(view),
        Err(e) => tracing::debug!(error = %e, "cannot read the cluster's plugins"),
    }
}

/// Keeps `registry` in step with the cluster until `stop`: on every
/// `digibot_plugins` notification and every [`TICK`].
pub async fn run(registry: Arc<Registry>, shared: Arc<PgPlugins>, mut stop: watch::Receiver<bool>) {
    let Some(mut notifications) = shared.pg().ok().map(Postgres::notifications) else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            n = notifications.recv() => match n {
                Ok(n) if n.channel != PLUGINS_CHANNEL => continue,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                // The store is gone: so is this replica.
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = stop.changed() => return,
        }
        let (registry, shared) = (registry.clone(), shared.clone());
        if tokio::task::spawn_blocking(move || round(&registry, &shared))
            .await
            .is_err()
        {
            tracing::warn!("plugin sync round panicked");
        }
    }
}
