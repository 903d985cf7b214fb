//! The set of loaded plugins, swappable while events are being served.
//!
//! The set is an immutable [`Snapshot`] behind an atomic pointer: a swap
//! compiles and validates the new version first, then publishes a new
//! snapshot. Invocations already running hold the old `Arc<Plugin>` and
//! finish on it; events dispatched after the swap see the new one. Nothing
//! waits and nothing fails because of a swap.
//!
//! Installed versions are written to the plugins folder (so a restart
//! loads them) and kept under `DATA_DIR/plugin-history/NAME/` for rollback.

use crate::runtime::{LoadError, Manifest, Plugin, Runtime};
use crate::store::now_ms;
use arc_swap::ArcSwap;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("plugin {name}: {source}")]
    Load { name: String, source: LoadError },
    #[error("plugin {name}: invalid {name}.toml: {source}")]
    Manifest {
        name: String,
        source: toml::de::Error,
    },
    #[error("no plugin named {0}")]
    NotFound(String),
    #[error("plugin {0} has no previous version to roll back to")]
    NoPrevious(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Consecutive-failure circuit breaker of one plugin version.
#[derive(Debug, Default)]
pub struct Health {
    consecutive: AtomicU32,
    quarantined_until: AtomicI64,
    pub invocations: AtomicU64,
    pub failures: AtomicU64,
    pub skipped: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

/// What the breaker says about the next event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Run,
    /// Quarantined until this time (ms).
    Skip(i64),
}

impl Health {
    pub fn gate(&self, now: i64) -> Gate {
        let until = self.quarantined_until.load(Ordering::Relaxed);
        if now < until {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            Gate::Skip(until)
        } else {
            Gate::Run
        }
    }

    pub fn success(&self) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
    }

    /// Records a failure; returns true when it opens the breaker.
    pub fn failure(&self, reason: &str, threshold: u32, cooldown: Duration) -> bool {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(reason.to_string());
        }
        // After a cool-down the count is still at or over the threshold, so
        // one more failure quarantines again (half-open).
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold > 0 && n >= threshold {
            self.quarantined_until
                .store(now_ms() + cooldown.as_millis() as i64, Ordering::Relaxed);
            return true;
        }
        false
    }

    fn report(&self, now: i64) -> HealthReport {
        let until = self.quarantined_until.load(Ordering::Relaxed);
        HealthReport {
            state: if now < until { "quarantined" } else { "active" },
            quarantined_until: (now < until).then_some(until),
            consecutive_failures: self.consecutive.load(Ordering::Relaxed),
            invocations: self.invocations.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            last_failure: self.last_failure.lock().ok().and_then(|l| l.clone()),
        }
    }
}

/// A plugin in the current snapshot.
#[derive(Debug, Clone)]
pub struct Entry {
    pub plugin: Arc<Plugin>,
    pub health: Arc<Health>,
}

/// The plugins serving events right now, in name order.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub plugins: Vec<Entry>,
}

impl Snapshot {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.plugins.iter().find(|e| e.plugin.name == name)
    }
}

/// Admin view of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginReport {
    pub name: String,
    pub version: String,
    pub wit_version: &'static str,
    pub enabled: bool,
    pub size: usize,
    pub limits: crate::runtime::Limits,
    #[serde(flatten)]
    pub health: HealthReport,
    pub previous_versions: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct HealthReport {
    pub state: &'static str,
    pub quarantined_until: Option<i64>,
    pub consecutive_failures: u32,
    pub invocations: u64,
    pub failures: u64,
    pub skipped: u64,
    pub last_failure: Option<String>,
}

/// Loaded plugins, their folder and their history.
pub struct Registry {
    runtime: Arc<Runtime>,
    current: ArcSwap<Snapshot>,
    dir: Option<PathBuf>,
    history_dir: PathBuf,
    /// Per plugin: hashes installed before the current one, oldest first.
    history: Mutex<BTreeMap<String, Vec<String>>>,
    /// Serialises installs so two swaps of one plugin cannot interleave.
    install_lock: Mutex<()>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` via a temporary file and a rename, so readers
/// (and the folder watcher) never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl Registry {
    pub fn new(runtime: Arc<Runtime>, dir: Option<PathBuf>, data_dir: &Path) -> Registry {
        Registry {
            runtime,
            current: ArcSwap::from_pointee(Snapshot::default()),
            dir,
            history_dir: data_dir.join("plugin-history"),
            history: Mutex::new(BTreeMap::new()),
            install_lock: Mutex::new(()),
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The plugins serving events now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Reads `NAME.toml` beside the plugin, if any.
    pub fn read_manifest(&self, name: &str) -> Result<Manifest, RegistryError> {
        let Some(dir) = &self.dir else {
            return Ok(Manifest::default());
        };
        let path = dir.join(format!("{name}.toml"));
        match std::fs::read_to_string(&path) {
            Ok(text) => Manifest::parse(&text).map_err(|source| RegistryError::Manifest {
                name: name.to_string(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Loads every `NAME.wasm` of the plugins folder. A plugin that fails
    /// to load is reported and skipped; the others serve.
    pub fn load_dir(&self) -> Vec<RegistryError> {
        let Some(dir) = self.dir.clone() else {
            return Vec::new();
        };
        let mut errors = Vec::new();
        let mut names: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let path = e.path();
                    (path.extension()? == "wasm")
                        .then(|| path.file_stem()?.to_str().map(str::to_string))
                        .flatten()
                })
                .collect(),
            Err(e) => return vec![io(&dir)(e)],
        };
        names.sort();
        for name in names {
            if let Err(e) = self.reload(&name) {
                errors.push(e);
            }
        }
        errors
    }

    /// (Re)loads `NAME` from the folder: its `.wasm` and `.toml`. A missing
    /// `.wasm` removes the plugin. Unchanged bytes and manifest: no-op.
    pub fn reload(&self, name: &str) -> Result<bool, RegistryError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let path = dir.join(format!("{name}.wasm"));
        match std::fs::read(&path) {
            Ok(bytes) => {
                let manifest = self.read_manifest(name)?;
                self.install_bytes(name, &bytes, manifest, false)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.unpublish(name),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Validates and installs a new version of `name` (upload). The old
    /// version keeps serving if the new one is refused.
    pub fn install(&self, name: &str, bytes: &[u8]) -> Result<Arc<Plugin>, RegistryError> {
        let manifest = self.read_manifest(name)?;
        self.install_bytes(name, bytes, manifest, true)?;
        self.snapshot()
            .get(name)
            .map(|e| e.plugin.clone())
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))
    }

    fn install_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        manifest: Manifest,
        write_to_dir: bool,
    ) -> Result<bool, RegistryError> {
        let _guard = self.install_lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.snapshot();
        if let Some(existing) = current.get(name) {
            let same_bytes =
                existing.plugin.hash == hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
            if same_bytes && existing.plugin.manifest == manifest {
                return Ok(false);
            }
        }
        let plugin =
            self.runtime
                .load(name, bytes, manifest)
                .map_err(|source| RegistryError::Load {
                    name: name.to_string(),
                    source,
                })?;
        // Keep the bytes for rollback and restarts before publishing.
        let history = self.history_dir.join(name);
        std::fs::create_dir_all(&history).map_err(io(&history))?;
        let kept = history.join(format!("{}.wasm", plugin.hash));
        if !kept.exists() {
            write_atomic(&kept, bytes)?;
        }
        if write_to_dir {
            if let Some(dir) = &self.dir {
                write_atomic(&dir.join(format!("{name}.wasm")), bytes)?;
            }
        }
        let previous = current.get(name).map(|e| e.plugin.hash.clone());
        if let Some(prev) = previous.filter(|p| *p != plugin.hash) {
            if let Ok(mut h) = self.history.lock() {
                let versions = h.entry(name.to_string()).or_default();
                versions.retain(|v| *v != prev);
                versions.push(prev);
            }
        }
        tracing::info!(plugin = name, version = %&plugin.hash[..12], cached = plugin.cached,
            compile_ms = plugin.compile_time.as_millis() as u64, "plugin loaded");
        self.publish(Entry {
            plugin: Arc::new(plugin),
            health: Arc::new(Health::default()),
        });
        Ok(true)
    }

    fn publish(&self, entry: Entry) {
        self.current.rcu(|old| {
            let mut plugins: Vec<Entry> = old
                .plugins
                .iter()
                .filter(|e| e.plugin.name != entry.plugin.name)
                .cloned()
                .collect();
            plugins.push(entry.clone());
            plugins.sort_by(|a, b| a.plugin.name.cmp(&b.plugin.name));
            Snapshot { plugins }
        });
    }

    fn unpublish(&self, name: &str) -> Result<bool, RegistryError> {
        let mut removed = false;
        self.current.rcu(|old| {
            removed = old.get(name).is_some();
            Snapshot {
                plugins: old
                    .plugins
                    .iter()
                    .filter(|e| e.plugin.name != name)
                    .cloned()
                    .collect(),
            }
        });
        if removed {
            tracing::info!(plugin = name, "plugin removed");
        }
        Ok(removed)
    }

    /// Removes `name` from service and from the plugins folder.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let _guard = self.install_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.unpublish(name)? {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{name}.wasm"));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(())
    }

    /// Reinstalls the version `name` had before the current one.
    pub fn rollback(&self, name: &str) -> Result<Arc<Plugin>, RegistryError> {
        let previous = self
            .history
            .lock()
            .ok()
            .and_then(|mut h| h.get_mut(name).and_then(|v| v.pop()))
            .ok_or_else(|| RegistryError::NoPrevious(name.to_string()))?;
        let path = self.history_dir.join(name).join(format!("{previous}.wasm"));
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let current = self.snapshot().get(name).map(|e| e.plugin.hash.clone());
        let plugin = self.install(name, &bytes)?;
        // The version rolled back from is not a rollback target.
        if let (Some(cur), Ok(mut h)) = (current, self.history.lock()) {
            if let Some(v) = h.get_mut(name) {
                v.retain(|x| *x != cur);
            }
        }
        Ok(plugin)
    }

    /// Admin view of every plugin.
    pub fn report(&self) -> Vec<PluginReport> {
        let now = now_ms();
        let history = self.history.lock().map(|h| h.clone()).unwrap_or_default();
        self.snapshot()
            .plugins
            .iter()
            .map(|e| PluginReport {
                name: e.plugin.name.clone(),
                version: e.plugin.hash.clone(),
                wit_version: e.plugin.wit_version,
                enabled: e.plugin.manifest.enabled,
                size: e.plugin.size,
                limits: e.plugin.limits.clone(),
                health: e.health.report(now),
                previous_versions: history.get(&e.plugin.name).map_or(0, Vec::len),
            })
            .collect()
    }
}
