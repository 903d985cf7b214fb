//! What the registry and the compile cache keep, and how they keep it,
//! against real components (run `cargo build-plugins` first): a version
//! that fails to load is remembered and not compiled again until it or
//! its manifest changes; a plugin's history holds its last ten versions;
//! the compile cache is private to this user and a cache file others
//! could have written is never loaded.

use digibot_runtime::registry::{
    HISTORY_KEPT, Registry, RegistryError, SharedPlugin, SharedPlugins,
};
use digibot_runtime::{LoadError, Runtime, RuntimeConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn wasm(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo build-plugins` first", path.display()))
}

/// `bytes` with a custom section appended: the same component, another
/// hash (another version).
fn variant(bytes: &[u8], n: usize) -> Vec<u8> {
    let name = b"digibot-test";
    let payload = n.to_string();
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(payload.as_bytes());
    out
}

fn hash(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

fn runtime(root: &Path) -> Arc<Runtime> {
    Arc::new(
        Runtime::new(RuntimeConfig {
            pooling: false,
            warm_instances: 0,
            cache_dir: Some(root.join("cache")),
            ..RuntimeConfig::default()
        })
        .unwrap(),
    )
}

/// A cluster record held in memory, counting the bytes fetched: what
/// `digibot_pipeline::cluster` gives the registry over PostgreSQL.
#[derive(Default)]
struct Record {
    plugins: Mutex<BTreeMap<String, (String, Vec<u8>)>>,
    fetched: Mutex<usize>,
}

#[async_trait::async_trait]
impl SharedPlugins for Record {
    async fn put(&self, name: &str, hash: &str, bytes: &[u8]) -> Result<(), String> {
        self.plugins
            .lock()
            .unwrap()
            .insert(name.into(), (hash.into(), bytes.to_vec()));
        Ok(())
    }
    async fn remove(&self, name: &str) -> Result<bool, String> {
        Ok(self.plugins.lock().unwrap().remove(name).is_some())
    }
    async fn rollback(&self, _name: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
    async fn list(&self) -> Result<BTreeMap<String, SharedPlugin>, String> {
        Ok(self
            .plugins
            .lock()
            .unwrap()
            .iter()
            .map(|(name, (hash, _))| {
                (
                    name.clone(),
                    SharedPlugin {
                        hash: Some(hash.clone()),
                        previous: Vec::new(),
                    },
                )
            })
            .collect())
    }
    async fn bytes(&self, name: &str, hash: &str) -> Result<Option<Vec<u8>>, String> {
        *self.fetched.lock().unwrap() += 1;
        Ok(self
            .plugins
            .lock()
            .unwrap()
            .get(name)
            .filter(|(h, _)| h == hash)
            .map(|(_, b)| b.clone()))
    }
}

/// Another replica recorded a version that does not compile: this one
/// tries it once, reports why, and at the next syncs (every second in
/// `cluster::run`) neither fetches, compiles nor reports it again, until
/// its `NAME.toml` changes or a new version is recorded.
#[tokio::test]
async fn a_refused_version_is_not_compiled_again_at_every_sync() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let record = Arc::new(Record::default());
    let registry = Registry::new(
        runtime(root.path()),
        Some(plugins.clone()),
        &root.path().join("data"),
    )
    .with_shared(record.clone());
    // A component preamble, then nothing wasmtime can compile.
    let broken = b"\0asm\x0d\x00\x01\x00this is not a component body".to_vec();
    record.put("bad", &hash(&broken), &broken).await.unwrap();

    let (changed, errors) = registry.sync().await;
    assert!(changed.is_empty());
    assert!(
        matches!(
            errors.as_slice(),
            [RegistryError::Load {
                source: LoadError::Compile(_),
                ..
            }]
        ),
        "{errors:?}"
    );
    assert_eq!(*record.fetched.lock().unwrap(), 1);
    for _ in 0..5 {
        let (changed, errors) = registry.sync().await;
        assert!(changed.is_empty() && errors.is_empty(), "{errors:?}");
    }
    assert_eq!(*record.fetched.lock().unwrap(), 1, "fetched again");

    // A changed manifest is another try (it may be what made it fail).
    std::fs::write(plugins.join("bad.toml"), "[limits]\ntimeout_ms = 50\n").unwrap();
    assert_eq!(registry.sync().await.1.len(), 1);
    assert_eq!(*record.fetched.lock().unwrap(), 2);
    assert!(registry.sync().await.1.is_empty());

    // So is a new version, and one that loads is served.
    let echo = wasm("echo");
    record.put("bad", &hash(&echo), &echo).await.unwrap();
    let (changed, errors) = registry.sync().await;
    assert_eq!(changed, ["bad"], "{errors:?}");
    assert!(registry.snapshot().get("bad").is_some());
}

/// Twelve uploads of one plugin: the current version and the ten before
/// it stay (rollback targets, on disk under `plugin-history/`), the
/// oldest are deleted.
#[tokio::test]
async fn a_plugins_history_keeps_its_last_ten_versions() {
    let root = tempfile::tempdir().unwrap();
    let plugins = root.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let registry = Registry::new(
        runtime(root.path()),
        Some(plugins),
        &root.path().join("data"),
    );
    let echo = wasm("echo");
    let versions: Vec<Vec<u8>> = (0..12).map(|n| variant(&echo, n)).collect();
    for v in &versions {
        registry.install("echo", v).await.unwrap();
    }
    let report = registry.report();
    assert_eq!(report[0].version, hash(&versions[11]));
    assert_eq!(report[0].previous_versions, HISTORY_KEPT);
    let history = root.path().join("data/plugin-history/echo");
    let mut kept: Vec<String> = std::fs::read_dir(&history)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    let mut expected: Vec<String> = versions[1..]
        .iter()
        .map(|v| format!("{}.wasm", hash(v)))
        .collect();
    expected.sort();
    assert_eq!(kept, expected, "the current version and the ten before it");
    // Rollback walks back through what is kept.
    assert_eq!(
        registry.rollback("echo").await.unwrap().hash,
        hash(&versions[10])
    );
}

/// The compile cache is created for this user only, and a cache file
/// that others can write (it could hold anyone's native code) is not
/// loaded: compiled again, and written back private.
#[cfg(unix)]
#[test]
fn the_compile_cache_is_private_and_a_writable_entry_is_not_loaded() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let echo = wasm("echo");
    let first = runtime(root.path())
        .load("echo", &echo, Default::default())
        .unwrap();
    assert!(!first.cached);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&cache), 0o700);
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(mode(&entry), 0o600);
    assert!(
        runtime(root.path())
            .load("echo", &echo, Default::default())
            .unwrap()
            .cached
    );

    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
    let again = runtime(root.path())
        .load("echo", &echo, Default::default())
        .unwrap();
    assert!(!again.cached, "a world-writable cache file was loaded");
    assert_eq!(mode(&entry), 0o600, "written back private");

    // A cache folder others can write is tightened, being ours.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert!(
        !runtime(root.path())
            .load("echo", &echo, Default::default())
            .unwrap()
            .cached
    );
    assert_eq!(mode(&cache), 0o700);
    assert!(
        runtime(root.path())
            .load("echo", &echo, Default::default())
            .unwrap()
            .cached
    );
}
