//! Hot reload: watches the plugins folder and reloads a plugin whose
//! `NAME.wasm` or `NAME.toml` appeared, changed or disappeared.
//!
//! Changes are debounced until the files stop changing, and a file still
//! being written either fails validation (the old version keeps serving) or
//! is picked up complete by the next event, so nothing half-written serves.

use crate::registry::Registry;
use notify::{RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Quiet time before a changed plugin is reloaded.
const SETTLE: Duration = Duration::from_millis(100);

/// Keeps the watcher alive; dropping it stops watching.
pub struct WatchHandle {
    _watcher: notify::RecommendedWatcher,
}

/// The plugin a changed path belongs to: `NAME.wasm` or `NAME.toml`.
/// Temporary files (`NAME.wasm.tmp`, `.NAME.wasm` of editors and copy
/// tools) are not plugins: only the final rename counts.
fn plugin_name(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_str()?;
    if ext != "wasm" && ext != "toml" {
        return None;
    }
    let name = path.file_stem()?.to_str()?;
    (!name.starts_with('.')).then(|| name.to_string())
}

fn size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// Watches `dir` and reloads through `registry` on a tokio task; call from
/// inside the runtime that serves events (the reloads compile on its
/// blocking pool). Events from `notify`'s own thread cross a channel.
pub fn watch(dir: &Path, registry: Arc<Registry>) -> notify::Result<WatchHandle> {
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            for path in event.paths {
                let _ = tx.send(path);
            }
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    let dir = dir.to_path_buf();
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| notify::Error::generic(&format!("the folder watch needs a runtime: {e}")))?;
    runtime.spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut names = BTreeSet::new();
            names.extend(plugin_name(&first));
            // Debounce: wait until no change arrives for SETTLE.
            while let Ok(Some(path)) = tokio::time::timeout(SETTLE, rx.recv()).await {
                names.extend(plugin_name(&path));
            }
            for name in names {
                let wasm = dir.join(format!("{name}.wasm"));
                // Still growing? Wait for it to be stable.
                let mut last = size(&wasm);
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let now = size(&wasm);
                    if now == last {
                        break;
                    }
                    last = now;
                }
                match registry.reload(&name).await {
                    Ok(true) => tracing::info!(plugin = %name, "plugin reloaded from the folder"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(
                            "hot reload refused, the previous version keeps serving: {e}"
                        )
                    }
                }
            }
        }
    });
    Ok(WatchHandle { _watcher: watcher })
}
