//! The set of loaded plugins, swappable while events are being served.
//!
//! The set is an immutable [`Snapshot`] behind an atomic pointer: a swap
//! compiles and validates the new version first, then publishes a new
//! snapshot. Invocations already running hold the old `Arc<Plugin>` and
//! finish on it; events dispatched after the swap see the new one. Nothing
//! waits and nothing fails because of a swap.
//!
//! Installed versions are written to the plugins folder (so a restart
//! loads them) and kept under `DATA_DIR/plugin-history/NAME/` for rollback:
//! the [`HISTORY_KEPT`] most recent ones before the current, older ones
//! are deleted. A version that fails to load is remembered (with its
//! manifest) and refused again without compiling, so a bad version the
//! cluster records is compiled once per replica, not at every sync.
//! Changes to the set (upload, folder reload, remove, rollback) are
//! serialised, and a reload reads the folder inside that critical section,
//! so the folder and the served set cannot drift apart.
//!
//! The changes are async: compiling runs on tokio's blocking pool, the
//! shared record is awaited, and the critical section is an async lock, so
//! no change holds a worker thread or drives one runtime from inside
//! another.
//!
//! Each served version has a [`Health`]: the circuit breaker that
//! quarantines a plugin after repeated failures. Called by `dispatch`
//! (every event), `admin` (the plugin API) and `watch` (the folder).
//!
//! Replicas sharing a database ([`SharedPlugins`], see `cluster`): every
//! upload, rollback and removal is recorded there (bytes, hash, rollback
//! history) before it is published here, and [`Registry::sync`] applies
//! what other replicas recorded, through the same compile-validate-publish
//! path. The plugins folder is then an input only: at start it seeds the
//! plugins the database does not know yet, and a file dropped in it is
//! uploaded to the whole cluster; `NAME.toml` stays each replica's own.

use crate::{LoadError, Manifest, Plugin, Runtime};
use arc_swap::ArcSwap;
use digibot_domain::time::now_ms;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
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
    #[error("plugin {name}: the shared plugin store failed: {message}")]
    Shared { name: String, message: String },
    /// Compiling panicked (a wasmtime bug, not a bad plugin): nothing changed.
    #[error("plugin {0}: compiling it panicked; the previous version keeps serving")]
    CompilerPanicked(String),
}

/// A plugin as the cluster records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPlugin {
    /// The version every replica serves; `None` once removed (the name
    /// stays known, so a replica's stale folder cannot bring it back).
    pub hash: Option<String>,
    /// Versions a rollback goes back to, oldest first.
    pub previous: Vec<String>,
}

/// One replica's breaker for one plugin, as the cluster sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaHealth {
    pub replica: String,
    pub version: String,
    #[serde(flatten)]
    pub health: HealthReport,
    /// When that replica last reported (ms since the epoch).
    pub reported_at: i64,
}

/// What other replicas recorded, as of the last [`Registry::set_cluster_view`].
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub plugins: BTreeMap<String, SharedPlugin>,
    /// Per plugin name, every live replica's breaker.
    pub health: BTreeMap<String, Vec<ReplicaHealth>>,
}

/// Where replicas sharing a database keep their plugins (the store's
/// record, seen through `digibot_pipeline::cluster`; the runtime knows no
/// SQL). Errors are the back end's message.
#[async_trait::async_trait]
pub trait SharedPlugins: Send + Sync {
    /// Records `bytes` as the version of `name` every replica serves; the
    /// version it replaces becomes the latest rollback target.
    async fn put(&self, name: &str, hash: &str, bytes: &[u8]) -> Result<(), String>;
    /// Takes `name` out of service everywhere; false when it was not served.
    async fn remove(&self, name: &str) -> Result<bool, String>;
    /// Makes the latest rollback target current (dropping it and the
    /// version rolled back from from the targets) and returns its bytes;
    /// `None` when there is no target.
    async fn rollback(&self, name: &str) -> Result<Option<Vec<u8>>, String>;
    /// Every plugin name the cluster knows.
    async fn list(&self) -> Result<BTreeMap<String, SharedPlugin>, String>;
    /// The bytes of one recorded version.
    async fn bytes(&self, name: &str, hash: &str) -> Result<Option<Vec<u8>>, String>;
}

/// Consecutive-failure circuit breaker of one plugin version.
///
/// Closed, every event runs the plugin. After `threshold` consecutive
/// failures it opens: events skip the plugin until the cool-down ends. Then
/// it is half-open: one event runs the plugin as a trial while the others
/// keep skipping it; a success closes the breaker, a failure opens it for
/// another cool-down. One trial at a time, because a plugin that times out
/// would otherwise hold every plugin thread for a whole deadline, once per
/// event that arrives during the trial.
#[derive(Debug, Default)]
pub struct Health {
    consecutive: AtomicU32,
    quarantined_until: AtomicI64,
    /// Set when the breaker opens, cleared by a success.
    tripped: AtomicBool,
    /// When the half-open trial started (ms); 0 when none is in flight.
    trial_since: AtomicI64,
    pub invocations: AtomicU64,
    pub failures: AtomicU64,
    pub skipped: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

/// A trial older than this is presumed lost (its event never reported
/// back) and another one may start.
const TRIAL_STALE_MS: i64 = 60_000;

/// What the breaker says about the next event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Run,
    /// Quarantined until this time (ms); in the past while a half-open
    /// trial is in flight.
    Skip(i64),
}

impl Health {
    /// Whether the next event runs the plugin. Every `Run` must be
    /// followed by [`Health::success`] or [`Health::failure`].
    pub fn gate(&self, now: i64) -> Gate {
        let until = self.quarantined_until.load(Ordering::SeqCst);
        if now >= until {
            if !self.tripped.load(Ordering::SeqCst) {
                return Gate::Run;
            }
            let since = self.trial_since.load(Ordering::SeqCst);
            let free = since == 0 || now - since > TRIAL_STALE_MS;
            if free
                && self
                    .trial_since
                    .compare_exchange(since, now.max(1), Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                return Gate::Run;
            }
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        Gate::Skip(until)
    }

    pub fn success(&self) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::SeqCst);
        self.tripped.store(false, Ordering::SeqCst);
        self.trial_since.store(0, Ordering::SeqCst);
    }

    /// Records a failure; returns true when it opens the breaker.
    pub fn failure(&self, reason: &str, threshold: u32, cooldown: Duration) -> bool {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(reason.to_string());
        }
        // After a cool-down the count is still at or over the threshold, so
        // a failed trial quarantines again at once.
        let n = self.consecutive.fetch_add(1, Ordering::SeqCst) + 1;
        let opens = threshold > 0 && n >= threshold;
        if opens {
            self.quarantined_until
                .store(now_ms() + cooldown.as_millis() as i64, Ordering::SeqCst);
            self.tripped.store(true, Ordering::SeqCst);
        }
        // Only after the new quarantine is set, so no second trial slips in.
        self.trial_since.store(0, Ordering::SeqCst);
        opens
    }

    fn report(&self, now: i64) -> HealthReport {
        let until = self.quarantined_until.load(Ordering::SeqCst);
        let state = if now < until {
            "quarantined"
        } else if self.tripped.load(Ordering::SeqCst) {
            "half-open"
        } else {
            "active"
        };
        HealthReport {
            state: state.to_string(),
            quarantined_until: (now < until).then_some(until),
            consecutive_failures: self.consecutive.load(Ordering::SeqCst),
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
    /// Loaded from the on-disk compile cache rather than compiled.
    pub cached: bool,
    /// Time to compile (or load from the cache) and validate, in ms.
    pub compile_ms: u64,
    pub limits: crate::Limits,
    #[serde(flatten)]
    pub health: HealthReport,
    /// Versions `rollback` can go back to (this process's history; with a
    /// shared database, the cluster's).
    pub previous_versions: usize,
    /// With a shared database: every live replica's breaker for this
    /// plugin (this one's included), as last reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<ReplicaHealth>>,
}

/// The breaker's view of a plugin, on `/admin/plugins` (and, read back,
/// another replica's, from the shared database).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HealthReport {
    /// `active`, `quarantined` (events skip it) or `half-open` (cool-down
    /// over: the next event runs it as a trial).
    pub state: String,
    pub quarantined_until: Option<i64>,
    pub consecutive_failures: u32,
    pub invocations: u64,
    pub failures: u64,
    pub skipped: u64,
    pub last_failure: Option<String>,
}

/// Versions kept for rollback per plugin, besides the current one (here
/// and in the cluster's record).
pub const HISTORY_KEPT: usize = 10;

/// The last version of a plugin that failed to load, and why.
struct Refusal {
    hash: String,
    manifest: Manifest,
    error: LoadError,
}

/// Loaded plugins, their folder and their history.
pub struct Registry {
    runtime: Arc<Runtime>,
    current: ArcSwap<Snapshot>,
    dir: Option<PathBuf>,
    history_dir: PathBuf,
    /// Per plugin: hashes installed before the current one, oldest first.
    history: Mutex<BTreeMap<String, Vec<String>>>,
    /// Serialises installs so two swaps of one plugin cannot interleave;
    /// held across the compile and the shared record's round trips.
    install_lock: tokio::sync::Mutex<()>,
    /// The plugins folder has been loaded once (readiness).
    loaded: AtomicBool,
    /// The cluster's record of plugins, when replicas share a database.
    shared: Option<Arc<dyn SharedPlugins>>,
    /// The cluster as last read, for reports (which must not block).
    cluster: Mutex<Option<ClusterView>>,
    /// Per plugin, the last version refused (with the manifest it was
    /// tried with): tried again only when either changes.
    refused: Mutex<BTreeMap<String, Refusal>>,
    /// Earlier versions serving the conversations pinned to them, by
    /// (name, hash).
    pinned: Mutex<BTreeMap<(String, String), Entry>>,
}

/// The most earlier versions kept loaded for pinned conversations; past
/// it they are compiled again (from the cache) when next needed.
const PINNED_LOADED: usize = 32;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses a name that is not a plain file stem before it is joined to a
/// folder path (an admin URL could otherwise hold `../`).
fn check_name(name: &str) -> Result<(), RegistryError> {
    if crate::is_plain_name(name) {
        Ok(())
    } else {
        Err(RegistryError::Load {
            name: name.to_string(),
            source: LoadError::BadName(name.to_string()),
        })
    }
}

/// Creates `dir` and its missing parents, readable by this user only.
fn private_dirs(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
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
            history: Mutex::new(read_history(&data_dir.join("plugin-history"))),
            history_dir: data_dir.join("plugin-history"),
            install_lock: tokio::sync::Mutex::new(()),
            loaded: AtomicBool::new(false),
            shared: None,
            cluster: Mutex::new(None),
            refused: Mutex::new(BTreeMap::new()),
            pinned: Mutex::new(BTreeMap::new()),
        }
    }

    /// Version `hash` of `name`, for a conversation pinned to it: the
    /// serving one, one loaded before, or its kept bytes (the history here,
    /// or the cluster's record) compiled now with today's `NAME.toml`.
    /// `None` when it is not known any more (or no longer loads).
    pub async fn version(&self, name: &str, hash: &str) -> Option<Entry> {
        if let Some(entry) = self.snapshot().get(name)
            && entry.plugin.hash == hash
        {
            return Some(entry.clone());
        }
        let key = (name.to_string(), hash.to_string());
        if let Some(entry) = self
            .pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Some(entry.clone());
        }
        check_name(name).ok()?;
        if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let bytes = match &self.shared {
            Some(shared) => shared.bytes(name, hash).await.ok().flatten(),
            None => {
                let path = self.history_dir.join(name).join(format!("{hash}.wasm"));
                tokio::fs::read(&path).await.ok()
            }
        }?;
        let manifest = self.read_manifest(name).ok()?;
        let runtime = self.runtime.clone();
        let owned = name.to_string();
        let plugin = tokio::task::spawn_blocking(move || runtime.load(&owned, &bytes, manifest))
            .await
            .ok()?
            .map_err(|e| {
                tracing::warn!(plugin = name, version = %&hash[..hash.len().min(12)], error = %e,
                    "a pinned version no longer loads; its conversations get the serving one");
            })
            .ok()?;
        let entry = Entry {
            plugin: Arc::new(plugin),
            health: Arc::new(Health::default()),
        };
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if pinned.len() >= PINNED_LOADED {
            pinned.clear();
        }
        pinned.insert(key, entry.clone());
        Some(entry)
    }

    /// Why `hash` of `name` failed to load with `manifest` before, if it did.
    fn refused_before(&self, name: &str, hash: &str, manifest: &Manifest) -> Option<LoadError> {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused
            .get(name)
            .filter(|r| r.hash == hash && r.manifest == *manifest)
            .map(|r| r.error.clone())
    }

    /// Records plugin changes in `shared` and serves what it holds (see
    /// the module doc); before [`Registry::load_dir`].
    pub fn with_shared(mut self, shared: Arc<dyn SharedPlugins>) -> Registry {
        self.shared = Some(shared);
        self
    }

    /// Whether plugins are shared with other replicas.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Replaces the cluster view that [`Registry::report`] merges in.
    pub fn set_cluster_view(&self, view: ClusterView) {
        if let Ok(mut cluster) = self.cluster.lock() {
            *cluster = Some(view);
        }
    }

    fn shared_error(name: &str) -> impl FnOnce(String) -> RegistryError + '_ {
        move |message| RegistryError::Shared {
            name: name.to_string(),
            message,
        }
    }

    /// Serves what the cluster recorded: installs every version that
    /// differs from the one served here (compiled and validated like an
    /// upload) and takes out the removed ones. Returns the names changed
    /// and the errors (a version that does not load keeps the old one).
    /// Without a shared store, nothing.
    pub async fn sync(&self) -> (Vec<String>, Vec<RegistryError>) {
        let Some(shared) = self.shared.clone() else {
            return (Vec::new(), Vec::new());
        };
        let listed = match shared.list().await {
            Ok(listed) => listed,
            Err(e) => return (Vec::new(), vec![Self::shared_error("*")(e)]),
        };
        let mut changed = Vec::new();
        let mut errors = Vec::new();
        for (name, recorded) in listed {
            if check_name(&name).is_err() {
                continue;
            }
            let serving = self.snapshot().get(&name).map(|e| e.plugin.hash.clone());
            if serving == recorded.hash {
                continue;
            }
            // Refused already (and reported then): not fetched, not
            // compiled, not reported again until it or NAME.toml changes.
            if let Some(hash) = &recorded.hash
                && let Ok(manifest) = self.read_manifest(&name)
                && self.refused_before(&name, hash, &manifest).is_some()
            {
                continue;
            }
            let _guard = self.lock().await;
            let result = match &recorded.hash {
                None => Ok(self.unpublish(&name)),
                Some(hash) => match shared.bytes(&name, hash).await {
                    Ok(Some(bytes)) => match self.read_manifest(&name) {
                        Ok(m) => self.install_locked(&name, bytes, m, false, false).await,
                        Err(e) => Err(e),
                    },
                    Ok(None) => Err(Self::shared_error(&name)(format!(
                        "version {hash} is recorded without its bytes"
                    ))),
                    Err(e) => Err(Self::shared_error(&name)(e)),
                },
            };
            match result {
                Ok(true) => changed.push(name),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        (changed, errors)
    }

    /// Whether [`Registry::load_dir`] has run (plugins that failed to load
    /// were reported; they do not make it false).
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
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
        check_name(name)?;
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
    pub async fn load_dir(&self) -> Vec<RegistryError> {
        let errors = self.load_dir_inner().await;
        self.loaded.store(true, Ordering::Release);
        errors
    }

    async fn load_dir_inner(&self) -> Vec<RegistryError> {
        // With a shared store, what the cluster recorded wins over this
        // replica's folder, which only seeds the names it does not know.
        let (_, mut errors) = self.sync().await;
        let known: Vec<String> = match &self.shared {
            Some(shared) if errors.is_empty() => match shared.list().await {
                Ok(listed) => listed.into_keys().collect(),
                Err(e) => {
                    errors.push(Self::shared_error("*")(e));
                    Vec::new()
                }
            },
            _ => Vec::new(),
        };
        let Some(dir) = self.dir.clone() else {
            return errors;
        };
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
            Err(e) => {
                errors.push(io(&dir)(e));
                return errors;
            }
        };
        names.sort();
        names.retain(|n| !known.contains(n));
        for name in names {
            if let Err(e) = self.reload(&name).await {
                errors.push(e);
            }
        }
        errors
    }

    /// Serialises every change to the set (install, reload, remove,
    /// rollback): a change reads the folder and publishes under this lock,
    /// so a reload triggered by an older write can never publish bytes an
    /// upload has replaced since.
    async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.install_lock.lock().await
    }

    /// (Re)loads `NAME` from the folder: its `.wasm` and `.toml`. A missing
    /// `.wasm` removes the plugin. Unchanged bytes and manifest: no-op.
    /// Returns whether the set changed.
    pub async fn reload(&self, name: &str) -> Result<bool, RegistryError> {
        check_name(name)?;
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let _guard = self.lock().await;
        let path = dir.join(format!("{name}.wasm"));
        match std::fs::read(&path) {
            Ok(bytes) => {
                let manifest = self.read_manifest(name)?;
                self.install_locked(name, bytes, manifest, false, true)
                    .await
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A file taken out of the folder stops it everywhere.
                let removed = self.unpublish(name);
                if removed && let Some(shared) = &self.shared {
                    shared
                        .remove(name)
                        .await
                        .map_err(Self::shared_error(name))?;
                }
                Ok(removed)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Validates and installs a new version of `name` (upload), and writes
    /// it to the plugins folder so a restart serves it too. The old version
    /// keeps serving if the new one is refused.
    pub async fn install(&self, name: &str, bytes: &[u8]) -> Result<Arc<Plugin>, RegistryError> {
        check_name(name)?;
        let _guard = self.lock().await;
        let manifest = self.read_manifest(name)?;
        self.install_locked(name, bytes.to_vec(), manifest, true, true)
            .await?;
        self.current(name)
    }

    fn current(&self, name: &str) -> Result<Arc<Plugin>, RegistryError> {
        self.snapshot()
            .get(name)
            .map(|e| e.plugin.clone())
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))
    }

    /// Compiles, validates and publishes; the caller holds [`Registry::lock`].
    /// `record`: a change made here (not one read from the cluster), so
    /// recorded in the shared store, when there is one, before it serves;
    /// a shared store also keeps the folder as it is (an input only).
    async fn install_locked(
        &self,
        name: &str,
        bytes: Vec<u8>,
        manifest: Manifest,
        write_to_dir: bool,
        record: bool,
    ) -> Result<bool, RegistryError> {
        let current = self.snapshot();
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        if let Some(existing) = current.get(name)
            && existing.plugin.hash == hash
            && existing.plugin.manifest == manifest
        {
            return Ok(false);
        }
        if let Some(source) = self.refused_before(name, &hash, &manifest) {
            return Err(RegistryError::Load {
                name: name.to_string(),
                source,
            });
        }
        // Compiling takes milliseconds to seconds of CPU: on the blocking
        // pool, so the async workers keep serving events meanwhile.
        let (compiled, bytes) = {
            let runtime = self.runtime.clone();
            let (owned, manifest) = (name.to_string(), manifest.clone());
            tokio::task::spawn_blocking(move || {
                let compiled = runtime.load(&owned, &bytes, manifest);
                (compiled, bytes)
            })
            .await
            .map_err(|_| RegistryError::CompilerPanicked(name.to_string()))?
        };
        let bytes = &bytes[..];
        let plugin = match compiled {
            Ok(plugin) => plugin,
            Err(source) => {
                // The caller reports the error; this says it is remembered.
                tracing::debug!(plugin = name, version = %&hash[..12],
                    "plugin version refused; it is not tried again until it or its NAME.toml changes");
                self.refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        name.to_string(),
                        Refusal {
                            hash,
                            manifest,
                            error: source.clone(),
                        },
                    );
                return Err(RegistryError::Load {
                    name: name.to_string(),
                    source,
                });
            }
        };
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(shared) = &self.shared {
            if record {
                shared
                    .put(name, &plugin.hash, bytes)
                    .await
                    .map_err(Self::shared_error(name))?;
            }
            tracing::info!(plugin = name, version = %&plugin.hash[..12], cached = plugin.cached,
                compile_ms = plugin.compile_time.as_millis() as u64, shared = true, "plugin loaded");
            self.publish(Entry {
                plugin: Arc::new(plugin),
                health: Arc::new(Health::default()),
            });
            return Ok(true);
        }
        // Keep the bytes for rollback and restarts before publishing.
        let history = self.history_dir.join(name);
        private_dirs(&history).map_err(io(&history))?;
        let kept = history.join(format!("{}.wasm", plugin.hash));
        if !kept.exists() {
            write_atomic(&kept, bytes)?;
        }
        if write_to_dir && let Some(dir) = &self.dir {
            write_atomic(&dir.join(format!("{name}.wasm")), bytes)?;
        }
        let previous = current.get(name).map(|e| e.plugin.hash.clone());
        let mut forgotten = Vec::new();
        if let Ok(mut h) = self.history.lock() {
            let versions = h.entry(name.to_string()).or_default();
            // The serving version is never its own rollback target.
            versions.retain(|v| *v != plugin.hash);
            if let Some(prev) = previous.filter(|p| *p != plugin.hash) {
                versions.retain(|v| *v != prev);
                versions.push(prev);
            }
            let over = versions.len().saturating_sub(HISTORY_KEPT);
            forgotten.extend(versions.drain(..over));
        }
        for old in forgotten {
            let path = history.join(format!("{old}.wasm"));
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete an old plugin version");
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

    /// Takes `name` out of the snapshot; returns whether it was there.
    fn unpublish(&self, name: &str) -> bool {
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
        removed
    }

    /// Removes `name` from service and its `.wasm` from the plugins folder
    /// (also when that file was refused at load and so never served).
    /// `NAME.toml` stays: it is the operator's configuration.
    pub async fn remove(&self, name: &str) -> Result<(), RegistryError> {
        check_name(name)?;
        let _guard = self.lock().await;
        let mut found = false;
        if let Some(shared) = &self.shared {
            found = shared
                .remove(name)
                .await
                .map_err(Self::shared_error(name))?;
        }
        found |= self.unpublish(name);
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{name}.wasm"));
            match std::fs::remove_file(&path) {
                Ok(()) => found = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        if !found {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// Reinstalls the version `name` had before the current one. The
    /// version rolled back from is not kept as a rollback target, so
    /// repeated rollbacks walk further back.
    pub async fn rollback(&self, name: &str) -> Result<Arc<Plugin>, RegistryError> {
        check_name(name)?;
        let _guard = self.lock().await;
        if let Some(shared) = &self.shared {
            let bytes = shared
                .rollback(name)
                .await
                .map_err(Self::shared_error(name))?
                .ok_or_else(|| RegistryError::NoPrevious(name.to_string()))?;
            let manifest = self.read_manifest(name)?;
            self.install_locked(name, bytes, manifest, false, false)
                .await?;
            return self.current(name);
        }
        let previous = self
            .history
            .lock()
            .ok()
            .and_then(|h| h.get(name).and_then(|v| v.last().cloned()))
            .ok_or_else(|| RegistryError::NoPrevious(name.to_string()))?;
        let path = self.history_dir.join(name).join(format!("{previous}.wasm"));
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let rolled_back_from = self.snapshot().get(name).map(|e| e.plugin.hash.clone());
        let manifest = self.read_manifest(name)?;
        self.install_locked(name, bytes, manifest, true, true)
            .await?;
        // Only now that it serves does the target leave the history.
        if let Ok(mut h) = self.history.lock()
            && let Some(v) = h.get_mut(name)
        {
            v.retain(|x| *x != previous && Some(x) != rolled_back_from.as_ref());
        }
        self.current(name)
    }

    /// Admin view of every plugin.
    pub fn report(&self) -> Vec<PluginReport> {
        let now = now_ms();
        let mut history = self.history.lock().map(|h| h.clone()).unwrap_or_default();
        let cluster = self.cluster.lock().ok().and_then(|c| c.clone());
        if let Some(view) = &cluster {
            history = view
                .plugins
                .iter()
                .map(|(name, p)| (name.clone(), p.previous.clone()))
                .collect();
        }
        self.snapshot()
            .plugins
            .iter()
            .map(|e| PluginReport {
                name: e.plugin.name.clone(),
                version: e.plugin.hash.clone(),
                wit_version: e.plugin.wit_version,
                enabled: e.plugin.manifest.enabled,
                size: e.plugin.size,
                cached: e.plugin.cached,
                compile_ms: e.plugin.compile_time.as_millis() as u64,
                limits: e.plugin.limits.clone(),
                health: e.health.report(now),
                previous_versions: history.get(&e.plugin.name).map_or(0, Vec::len),
                replicas: cluster
                    .as_ref()
                    .map(|view| view.health.get(&e.plugin.name).cloned().unwrap_or_default()),
            })
            .collect()
    }
}

/// Versions kept on disk from earlier runs, oldest first per plugin, so a
/// rollback still works after a restart.
fn read_history(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let mut history = BTreeMap::new();
    let Ok(plugins) = std::fs::read_dir(dir) else {
        return history;
    };
    for plugin in plugins.filter_map(Result::ok) {
        let Some(name) = plugin.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(files) = std::fs::read_dir(plugin.path()) else {
            continue;
        };
        let mut versions: Vec<(std::time::SystemTime, String)> = files
            .filter_map(Result::ok)
            .filter_map(|f| {
                let path = f.path();
                if path.extension()? != "wasm" {
                    return None;
                }
                let hash = path.file_stem()?.to_str()?.to_string();
                Some((f.metadata().ok()?.modified().ok()?, hash))
            })
            .collect();
        versions.sort();
        history.insert(name, versions.into_iter().map(|(_, h)| h).collect());
    }
    history
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(10);

    #[test]
    fn the_breaker_opens_after_the_threshold_and_skips() {
        let h = Health::default();
        let now = now_ms();
        assert_eq!(h.gate(now), Gate::Run);
        assert!(!h.failure("trap", 3, COOLDOWN));
        assert!(!h.failure("trap", 3, COOLDOWN));
        assert_eq!(h.gate(now), Gate::Run, "still closed below the threshold");
        assert!(h.failure("trap", 3, COOLDOWN));
        assert!(matches!(h.gate(now_ms()), Gate::Skip(_)));
        let report = h.report(now_ms());
        assert_eq!(report.state, "quarantined");
        assert_eq!(report.consecutive_failures, 3);
        assert_eq!(report.skipped, 1);
    }

    #[test]
    fn a_success_resets_the_count() {
        let h = Health::default();
        h.failure("trap", 2, COOLDOWN);
        h.success();
        assert!(!h.failure("trap", 2, COOLDOWN));
        assert_eq!(h.gate(now_ms()), Gate::Run);
    }

    #[test]
    fn half_open_lets_one_trial_through_at_a_time() {
        let h = Health::default();
        h.failure("timeout", 1, COOLDOWN);
        let later = now_ms() + COOLDOWN.as_millis() as i64 + 1;
        assert_eq!(h.report(later).state, "half-open");
        assert_eq!(h.gate(later), Gate::Run, "the trial");
        assert!(
            matches!(h.gate(later), Gate::Skip(_)),
            "others skip while the trial runs"
        );
        // The trial fails: quarantined again for a full cool-down.
        assert!(h.failure("timeout", 1, COOLDOWN));
        assert!(matches!(h.gate(now_ms()), Gate::Skip(_)));

        let later = now_ms() + COOLDOWN.as_millis() as i64 + 1;
        assert_eq!(h.gate(later), Gate::Run);
        h.success();
        assert_eq!(h.report(later).state, "active");
        assert_eq!(h.gate(later), Gate::Run);
        assert_eq!(h.gate(later), Gate::Run, "closed: no more trials");
    }

    #[test]
    fn a_lost_trial_does_not_block_the_plugin_forever() {
        let h = Health::default();
        h.failure("timeout", 1, COOLDOWN);
        let later = now_ms() + COOLDOWN.as_millis() as i64 + 1;
        assert_eq!(h.gate(later), Gate::Run);
        assert!(matches!(h.gate(later + 1), Gate::Skip(_)));
        assert_eq!(h.gate(later + TRIAL_STALE_MS + 1), Gate::Run);
    }

    #[test]
    fn names_that_are_not_plain_stems_are_refused() {
        for bad in ["", "../x", "a/b", "a.b", ".hidden", "x y"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["echo", "echo-v2", "bad_loop", "P1"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }
}
