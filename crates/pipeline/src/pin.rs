//! `pin = "conversation"`: a conversation keeps the version of a plugin
//! its first turn ran on until it is archived; new conversations get the
//! serving version. The pin lives in the store (shared by replicas); the
//! earlier version comes from the registry's history (or the cluster's
//! record), compiled again from the cache when it is not loaded.

use digibot_runtime::registry::{Entry, Registry};
use digibot_store::Store;

/// The entries a turn in `conversation_id` runs: the snapshot's, with
/// each pinning plugin's entry replaced by the version the conversation
/// is pinned to. `None` when no plugin pins (the turn runs the snapshot).
/// A pin that cannot be read, or a version that is gone, serves the
/// serving version (logged): a turn is never lost to a pin.
pub async fn entries(
    store: &Store,
    registry: &Registry,
    conversation_id: &str,
) -> Option<Vec<Entry>> {
    let snapshot = registry.snapshot();
    if conversation_id.is_empty()
        || !snapshot
            .plugins
            .iter()
            .any(|e| e.plugin.manifest.pins_conversations())
    {
        return None;
    }
    let mut entries = snapshot.plugins.clone();
    for entry in &mut entries {
        if !entry.plugin.manifest.pins_conversations() {
            continue;
        }
        let (name, serving) = (entry.plugin.name.clone(), entry.plugin.hash.clone());
        match store.pin_version(&name, conversation_id, &serving).await {
            Ok(pinned) if pinned == serving => {}
            Ok(pinned) => match registry.version(&name, &pinned).await {
                Some(earlier) => *entry = earlier,
                None => tracing::warn!(plugin = %name, conversation = conversation_id,
                    pinned = %&pinned[..pinned.len().min(12)],
                    "the conversation's pinned version is gone; the serving version answers"),
            },
            Err(e) => tracing::warn!(plugin = %name, conversation = conversation_id, error = %e,
                "cannot read the conversation's pin; the serving version answers"),
        }
    }
    Some(entries)
}

/// Whether any serving plugin pins conversations (archiving then drops
/// the conversation's pins).
pub fn any(registry: &Registry) -> bool {
    registry
        .snapshot()
        .plugins
        .iter()
        .any(|e| e.plugin.manifest.pins_conversations())
}
