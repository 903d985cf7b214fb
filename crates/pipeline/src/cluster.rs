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

/// The store's plugin record as the registry's [`SharedPlugins`].
pub struct ClusterPlugins {
    records: Arc<dyn PluginRecords>,
}

/// The record's error as the registry reports it.
fn message(e: StoreError) -> String {
    e.to_string()
}

impl ClusterPlugins {
    pub fn new(records: Arc<dyn PluginRecords>) -> ClusterPlugins {
        ClusterPlugins { records }
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

#[async_trait::async_trait]
impl SharedPlugins for ClusterPlugins {
    async fn put(&self, name: &str, hash: &str, bytes: &[u8]) -> Result<(), String> {
        self.records.put(name, hash, bytes).await.map_err(message)
    }

    async fn remove(&self, name: &str) -> Result<bool, String> {
        self.records.remove(name).await.map_err(message)
    }

    async fn rollback(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        self.records.rollback(name).await.map_err(message)
    }

    async fn list(&self) -> Result<BTreeMap<String, SharedPlugin>, String> {
        let listed = self.records.list().await.map_err(message)?;
        Ok(listed
            .into_iter()
            .map(|(name, p)| (name, shared(p)))
            .collect())
    }

    async fn bytes(&self, name: &str, hash: &str) -> Result<Option<Vec<u8>>, String> {
        self.records.bytes(name, hash).await.map_err(message)
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
        let (changed, errors) = registry.sync().await;
        for name in changed {
            tracing::info!(plugin = %name, "plugin changed by another replica; now serving it");
        }
        for e in errors {
            tracing::warn!(error = %e, "cannot serve the cluster's plugin");
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
