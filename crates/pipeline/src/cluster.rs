//! Plugins across replicas sharing a database: the store's record of
//! plugins ([`PluginRecords`]: bytes, serving version, rollback history,
//! every replica's breakers) seen by the runtime's registry as its
//! [`SharedPlugins`], and the loop that keeps this replica's registry in
//! step with it.
//!
//! A change made through one replica (upload, rollback, removal, a file
//! dropped in its plugins folder) is committed to the record, which
//! announces it; every replica's [`run`] loop wakes on it (and once a
//! second regardless, in case an announcement was lost while its listener
//! reconnected) and calls [`Registry::sync`], which compiles each new
//! version into that replica's own cache through the registry's usual
//! validate-then-swap path.
//!
//! Breakers stay per replica (a failure is often local to one machine, and
//! sharing them would cost a round trip per event), but each replica
//! publishes its breakers every tick, and `/admin/plugins` on any replica
//! lists them all.

use digibot_runtime::registry::{
    ClusterView, HealthReport, Registry, ReplicaHealth, SharedPlugin, SharedPlugins,
};
use digibot_store::{PluginRecords, StoreError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often a replica checks the record without an announcement, and
/// publishes its breakers.
pub const TICK: Duration = Duration::from_secs(1);

/// The store's plugin record as the registry's [`SharedPlugins`]. The
/// registry compiles on blocking threads and calls these from there; each
/// call drives the async record on `runtime`.
pub struct ClusterPlugins {
    records: Arc<dyn PluginRecords>,
    runtime: tokio::runtime::Handle,
}

impl ClusterPlugins {
    pub fn new(records: Arc<dyn PluginRecords>, runtime: tokio::runtime::Handle) -> ClusterPlugins {
        ClusterPlugins { records, runtime }
    }

    /// Runs one async call of the record from a blocking thread.
    fn block<T>(&self, f: impl Future<Output = Result<T, StoreError>>) -> Result<T, String> {
        self.runtime.block_on(f).map_err(|e| e.to_string())
    }

    /// This replica, as it signs its breaker reports.
    pub fn replica(&self) -> String {
        self.records.replica().to_string()
    }

    /// Publishes this replica's breakers and reads every live replica's.
    async fn exchange_health(
        &self,
        local: Vec<(String, String, HealthReport)>,
    ) -> Result<ClusterView, StoreError> {
        let reports = local
            .into_iter()
            .map(|(name, version, health)| {
                (
                    name,
                    version,
                    serde_json::to_string(&health).unwrap_or_default(),
                )
            })
            .collect();
        if let Err(e) = self.records.publish_health(reports).await {
            tracing::debug!(error = %e, "cannot publish plugin health");
        }
        let plugins = self
            .records
            .list()
            .await?
            .into_iter()
            .map(|(name, p)| (name, shared(p)))
            .collect();
        let mut health: BTreeMap<String, Vec<ReplicaHealth>> = BTreeMap::new();
        for row in self.records.health().await? {
            let Ok(report) = serde_json::from_str::<HealthReport>(&row.report) else {
                continue;
            };
            health.entry(row.name).or_default().push(ReplicaHealth {
                replica: row.replica,
                version: row.hash,
                health: report,
                reported_at: row.reported_at,
            });
        }
        Ok(ClusterView { plugins, health })
    }
}

fn shared(p: digibot_store::RecordedPlugin) -> SharedPlugin {
    SharedPlugin {
        hash: p.hash,
        previous: p.previous,
    }
}

impl SharedPlugins for ClusterPlugins {
    fn put(&self, name: &str, hash: &str, bytes: &[u8]) -> Result<(), String> {
        self.block(self.records.put(name, hash, bytes))
    }

    fn remove(&self, name: &str) -> Result<bool, String> {
        self.block(self.records.remove(name))
    }

    fn rollback(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        self.block(self.records.rollback(name))
    }

    fn list(&self) -> Result<BTreeMap<String, SharedPlugin>, String> {
        self.block(self.records.list())
            .map(|l| l.into_iter().map(|(name, p)| (name, shared(p))).collect())
    }

    fn bytes(&self, name: &str, hash: &str) -> Result<Option<Vec<u8>>, String> {
        self.block(self.records.bytes(name, hash))
    }
}

/// Keeps `registry` in step with the cluster until `stop`: on every
/// announcement and every [`TICK`], serve what the cluster recorded,
/// publish this replica's breakers, refresh the view `/admin/plugins` shows.
pub async fn run(
    registry: Arc<Registry>,
    shared: Arc<ClusterPlugins>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            changed = shared.records.changed() => {
                if changed.is_none() {
                    // The store is gone: so is this replica.
                    return;
                }
            }
            _ = stop.changed() => return,
        }
        // Compiling blocks: off the async workers.
        let syncing = registry.clone();
        match tokio::task::spawn_blocking(move || syncing.sync()).await {
            Ok((changed, errors)) => {
                for name in changed {
                    tracing::info!(plugin = %name, "plugin changed by another replica; now serving it");
                }
                for e in errors {
                    tracing::warn!(error = %e, "cannot serve the cluster's plugin");
                }
            }
            Err(_) => tracing::warn!("plugin sync round panicked"),
        }
        let local = registry
            .report()
            .into_iter()
            .map(|p| (p.name, p.version, p.health))
            .collect();
        match shared.exchange_health(local).await {
            Ok(view) => registry.set_cluster_view(view),
            Err(e) => tracing::debug!(error = %e, "cannot read the cluster's plugins"),
        }
    }
}
