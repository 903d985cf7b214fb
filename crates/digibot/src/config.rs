//! Settings: embedded defaults, then `digibot.toml` (`--config`), then
//! `DIGIBOT_*` environment variables, each overriding the one before.

use digibot_pipeline::sender::{ApiCredentials, RetryPolicy, SenderConfig};
use digibot_runtime::{Limits, RuntimeConfig};
use digibot_store::{Store, StoreError};
use digibot_store_sqlite::Durability;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{var}={value:?}: {why}")]
    Env {
        var: &'static str,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Everything `digibot serve` needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// Digishare API base URL.
    pub api_base_url: String,
    /// Messages API bearer token; none (and no OAuth client) means dry-run.
    pub api_token: Option<String>,
    /// OAuth client credentials, an alternative to `api_token`.
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    /// Shared secret a webhook carries as a Bearer token or `X-Digishare-Secret`.
    pub webhook_token: Option<String>,
    /// `user:password` for HTTP Basic webhook auth.
    pub webhook_basic: Option<String>,
    /// Bearer token for `/admin`; none turns the admin API off.
    pub admin_token: Option<String>,
    /// Folder of `NAME.wasm` plugins (and `NAME.toml`).
    pub plugins_dir: Option<PathBuf>,
    /// SQLite database and compile cache.
    pub data_dir: PathBuf,
    /// `postgres://user:password@host:port/db`: share one PostgreSQL
    /// database with other replicas instead of SQLite under `data_dir`.
    pub database_url: Option<String>,
    /// Connections each replica keeps to PostgreSQL at most.
    pub database_pool: usize,
    /// PostgreSQL: how long a replica's hold on a conversation lasts
    /// without renewal, so how long a dead replica's conversations wait.
    pub lease_ms: u64,
    /// Largest webhook body accepted.
    pub webhook_max_bytes: usize,
    /// `full` (fsync every group commit) or `normal`.
    pub durability: Durability,
    /// Conversations handled at once.
    pub concurrency: usize,
    /// Outbox requests in flight at once.
    pub send_concurrency: usize,
    pub retry: RetrySettings,
    pub http: HttpSettings,
    /// Handled events and sent actions are deleted after this many hours.
    pub retention_hours: u64,
    /// How long SIGTERM waits for in-flight work.
    pub shutdown_grace_secs: u64,
    /// Timeout of one Messages API request.
    pub request_timeout_ms: u64,
    pub runtime: RuntimeSettings,
    /// Watch the plugins folder and reload changed plugins.
    pub watch_plugins: bool,
    /// An agent's internal note with exactly this text hands the
    /// conversation back to the bot.
    pub release_command: String,
    /// A conversation in a human's hands returns to the bot after this many
    /// seconds without an agent message; 0 (the default) never.
    pub human_idle_release_secs: u64,
}

/// Backoff of the outbox sender.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    pub base_ms: u64,
    pub max_ms: u64,
    pub max_attempts: u32,
}

/// The HTTP edge's bounds and deadlines (see `digibot_server::listener`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// A complete request head within this of opening (or of the next
    /// request's first byte).
    pub header_timeout_secs: u64,
    /// A whole request body within this of its head.
    pub body_timeout_secs: u64,
    /// An idle keep-alive connection is closed after this.
    pub idle_timeout_secs: u64,
    /// Open connections at once (also bounded by the open-files limit).
    pub max_connections: usize,
    /// Requests handled at once, health probes aside.
    pub max_in_flight: usize,
    /// Host names the admin API and dashboard answer besides IP literals
    /// and `localhost`; `*` for any.
    pub allowed_hosts: Vec<String>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        let limits = digibot_server::HttpLimits::default();
        HttpSettings {
            header_timeout_secs: limits.header_timeout.as_secs(),
            body_timeout_secs: limits.body_timeout.as_secs(),
            idle_timeout_secs: limits.idle_timeout.as_secs(),
            max_connections: limits.max_connections,
            max_in_flight: limits.max_in_flight,
            allowed_hosts: Vec::new(),
        }
    }
}

/// How plugins are compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompileMode {
    Fast,
    Optimized,
}

impl std::str::FromStr for CompileMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(CompileMode::Fast),
            "optimized" => Ok(CompileMode::Optimized),
            _ => Err("expected fast or optimized".into()),
        }
    }
}

/// Plugin runtime settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    pub pooling: bool,
    pub pool_instances: u32,
    /// KiB of each pooled memory kept resident between instances.
    pub keep_resident_kb: usize,
    /// `fast` (single-pass register allocation: quicker compiles, the
    /// default) or `optimized` (quicker code).
    pub compile: CompileMode,
    pub fuel: bool,
    pub timeout_ms: u64,
    pub memory_mb: u64,
    pub max_actions: usize,
    pub max_log_bytes: usize,
    /// Consecutive failures before a plugin is quarantined.
    pub breaker_failures: u32,
    /// How long a quarantined plugin is skipped.
    pub breaker_cooldown_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_base_url: "https://api.digishare.ma".into(),
            api_token: None,
            client_id: None,
            client_secret: None,
            webhook_token: None,
            webhook_basic: None,
            admin_token: None,
            plugins_dir: None,
            data_dir: PathBuf::from("./data"),
            database_url: None,
            database_pool: 16,
            lease_ms: 30_000,
            webhook_max_bytes: 1 << 20,
            durability: Durability::Full,
            concurrency: 64,
            send_concurrency: 32,
            retry: RetrySettings::default(),
            http: HttpSettings::default(),
            retention_hours: 24 * 7,
            shutdown_grace_secs: 10,
            request_timeout_ms: 10_000,
            runtime: RuntimeSettings::default(),
            watch_plugins: true,
            release_command: "/bot".into(),
            human_idle_release_secs: 0,
        }
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            base_ms: 500,
            max_ms: 60_000,
            max_attempts: 12,
        }
    }
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        let limits = Limits::default();
        RuntimeSettings {
            pooling: true,
            pool_instances: 64,
            keep_resident_kb: RuntimeConfig::default().keep_resident >> 10,
            compile: CompileMode::Fast,
            fuel: false,
            timeout_ms: limits.timeout.as_millis() as u64,
            memory_mb: (limits.memory_bytes >> 20) as u64,
            max_actions: limits.max_actions,
            max_log_bytes: limits.max_log_bytes,
            breaker_failures: 5,
            breaker_cooldown_secs: 30,
        }
    }
}

impl RuntimeSettings {
    /// Default per-plugin limits from these settings.
    pub fn limits(&self) -> Limits {
        Limits {
            timeout: Duration::from_millis(self.timeout_ms),
            memory_bytes: (self.memory_mb as usize) << 20,
            max_actions: self.max_actions,
            max_log_bytes: self.max_log_bytes,
            ..Limits::default()
        }
    }
}

fn env_parse<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    slot: &mut T,
) -> Result<(), ConfigError>
where
    T::Err: std::fmt::Display,
{
    if let Some(value) = get(var) {
        *slot = value.parse().map_err(|e: T::Err| ConfigError::Env {
            var,
            value: value.clone(),
            why: e.to_string(),
        })?;
    }
    Ok(())
}

fn env_string(get: &impl Fn(&str) -> Option<String>, var: &str, slot: &mut Option<String>) {
    if let Some(value) = get(var) {
        *slot = Some(value).filter(|v| !v.is_empty());
    }
}

impl Settings {
    /// Defaults, then the file (if given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::load_with(file, |var| std::env::var(var).ok())
    }

    /// [`load`](Self::load) with an explicit environment (for tests).
    pub fn load_with(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let mut s = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_path_buf(),
                    source,
                })?
            }
            None => Settings::default(),
        };
        env_parse(&env, "DIGIBOT_LISTEN", &mut s.listen)?;
        if let Some(v) = env("DIGIBOT_API_BASE_URL") {
            s.api_base_url = v;
        }
        env_string(&env, "DIGIBOT_API_TOKEN", &mut s.api_token);
        env_string(&env, "DIGIBOT_CLIENT_ID", &mut s.client_id);
        env_string(&env, "DIGIBOT_CLIENT_SECRET", &mut s.client_secret);
        env_string(&env, "DIGIBOT_WEBHOOK_TOKEN", &mut s.webhook_token);
        env_string(&env, "DIGIBOT_WEBHOOK_BASIC", &mut s.webhook_basic);
        env_string(&env, "DIGIBOT_ADMIN_TOKEN", &mut s.admin_token);
        if let Some(v) = env("DIGIBOT_PLUGINS_DIR") {
            s.plugins_dir = Some(PathBuf::from(v)).filter(|p| !p.as_os_str().is_empty());
        }
        if let Some(v) = env("DIGIBOT_DATA_DIR") {
            s.data_dir = PathBuf::from(v);
        }
        env_string(&env, "DIGIBOT_DATABASE_URL", &mut s.database_url);
        env_parse(&env, "DIGIBOT_DATABASE_POOL", &mut s.database_pool)?;
        env_parse(&env, "DIGIBOT_LEASE_MS", &mut s.lease_ms)?;
        env_parse(&env, "DIGIBOT_WEBHOOK_MAX_BYTES", &mut s.webhook_max_bytes)?;
        env_parse(&env, "DIGIBOT_DURABILITY", &mut s.durability)?;
        env_parse(&env, "DIGIBOT_CONCURRENCY", &mut s.concurrency)?;
        env_parse(&env, "DIGIBOT_SEND_CONCURRENCY", &mut s.send_concurrency)?;
        env_parse(&env, "DIGIBOT_RETRY_BASE_MS", &mut s.retry.base_ms)?;
        env_parse(&env, "DIGIBOT_RETRY_MAX_MS", &mut s.retry.max_ms)?;
        env_parse(
            &env,
            "DIGIBOT_RETRY_MAX_ATTEMPTS",
            &mut s.retry.max_attempts,
        )?;
        env_parse(
            &env,
            "DIGIBOT_HTTP_HEADER_TIMEOUT_SECS",
            &mut s.http.header_timeout_secs,
        )?;
        env_parse(
            &env,
            "DIGIBOT_HTTP_BODY_TIMEOUT_SECS",
            &mut s.http.body_timeout_secs,
        )?;
        env_parse(
            &env,
            "DIGIBOT_HTTP_IDLE_TIMEOUT_SECS",
            &mut s.http.idle_timeout_secs,
        )?;
        env_parse(
            &env,
            "DIGIBOT_HTTP_MAX_CONNECTIONS",
            &mut s.http.max_connections,
        )?;
        env_parse(
            &env,
            "DIGIBOT_HTTP_MAX_IN_FLIGHT",
            &mut s.http.max_in_flight,
        )?;
        if let Some(v) = env("DIGIBOT_ALLOWED_HOSTS") {
            s.http.allowed_hosts = v
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect();
        }
        env_parse(&env, "DIGIBOT_RETENTION_HOURS", &mut s.retention_hours)?;
        env_parse(
            &env,
            "DIGIBOT_SHUTDOWN_GRACE_SECS",
            &mut s.shutdown_grace_secs,
        )?;
        env_parse(
            &env,
            "DIGIBOT_REQUEST_TIMEOUT_MS",
            &mut s.request_timeout_ms,
        )?;
        env_parse(&env, "DIGIBOT_POOLING", &mut s.runtime.pooling)?;
        env_parse(&env, "DIGIBOT_FUEL", &mut s.runtime.fuel)?;
        env_parse(
            &env,
            "DIGIBOT_KEEP_RESIDENT_KB",
            &mut s.runtime.keep_resident_kb,
        )?;
        env_parse(&env, "DIGIBOT_COMPILE", &mut s.runtime.compile)?;
        env_parse(&env, "DIGIBOT_PLUGIN_TIMEOUT_MS", &mut s.runtime.timeout_ms)?;
        env_parse(&env, "DIGIBOT_PLUGIN_MEMORY_MB", &mut s.runtime.memory_mb)?;
        env_parse(
            &env,
            "DIGIBOT_BREAKER_FAILURES",
            &mut s.runtime.breaker_failures,
        )?;
        env_parse(
            &env,
            "DIGIBOT_BREAKER_COOLDOWN_SECS",
            &mut s.runtime.breaker_cooldown_secs,
        )?;
        env_parse(&env, "DIGIBOT_WATCH_PLUGINS", &mut s.watch_plugins)?;
        if let Some(v) = env("DIGIBOT_RELEASE_COMMAND") {
            s.release_command = v;
        }
        env_parse(
            &env,
            "DIGIBOT_HUMAN_IDLE_RELEASE_SECS",
            &mut s.human_idle_release_secs,
        )?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(basic) = &self.webhook_basic
            && !basic.contains(':')
        {
            return Err(ConfigError::Invalid(
                "webhook_basic must be user:password".into(),
            ));
        }
        if self.client_id.is_some() != self.client_secret.is_some() {
            return Err(ConfigError::Invalid(
                "OAuth needs both DIGIBOT_CLIENT_ID and DIGIBOT_CLIENT_SECRET".into(),
            ));
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid(
                "DIGIBOT_DATABASE_URL must be a postgres:// URL".into(),
            ));
        }
        if self.database_pool == 0 || self.lease_ms == 0 {
            return Err(ConfigError::Invalid(
                "database_pool and lease_ms must be at least 1".into(),
            ));
        }
        if self.release_command.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "release_command must not be empty".into(),
            ));
        }
        if self.concurrency == 0 || self.send_concurrency == 0 {
            return Err(ConfigError::Invalid(
                "concurrency must be at least 1".into(),
            ));
        }
        let h = &self.http;
        if h.header_timeout_secs == 0
            || h.body_timeout_secs == 0
            || h.idle_timeout_secs == 0
            || h.max_connections == 0
            || h.max_in_flight == 0
        {
            return Err(ConfigError::Invalid(
                "http.* timeouts and bounds must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The plugin runtime `serve` builds, compile cache under the data dir.
    pub fn runtime_config(&self) -> RuntimeConfig {
        let r = &self.runtime;
        RuntimeConfig {
            pooling: r.pooling,
            pool_instances: r.pool_instances,
            fuel: r.fuel,
            optimized_code: r.compile == CompileMode::Optimized,
            keep_resident: r.keep_resident_kb << 10,
            cache_dir: Some(self.data_dir.join("cache")),
            defaults: r.limits(),
            ..RuntimeConfig::default()
        }
    }

    /// No way to call Digishare: log requests instead of sending them.
    pub fn dry_run(&self) -> bool {
        self.api_token.is_none() && self.client_id.is_none()
    }

    /// How the outbox sender reaches the Messages API.
    pub fn sender_config(&self) -> SenderConfig {
        SenderConfig {
            api_base_url: self.api_base_url.clone(),
            credentials: match (&self.api_token, &self.client_id, &self.client_secret) {
                (Some(token), _, _) => ApiCredentials::Token(token.clone()),
                (None, Some(id), Some(secret)) => ApiCredentials::Client {
                    id: id.clone(),
                    secret: secret.clone(),
                },
                _ => ApiCredentials::DryRun,
            },
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            concurrency: self.send_concurrency,
            retry: RetryPolicy {
                base_ms: self.retry.base_ms,
                max_ms: self.retry.max_ms,
                max_attempts: self.retry.max_attempts,
            },
        }
    }

    /// The HTTP edge's bounds and deadlines (connections still within the
    /// open-files limit: see `serve`).
    pub fn http_limits(&self) -> digibot_server::HttpLimits {
        let h = &self.http;
        digibot_server::HttpLimits {
            header_timeout: Duration::from_secs(h.header_timeout_secs),
            body_timeout: Duration::from_secs(h.body_timeout_secs),
            idle_timeout: Duration::from_secs(h.idle_timeout_secs),
            max_connections: h.max_connections,
            max_in_flight: h.max_in_flight,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            ..digibot_server::HttpLimits::default()
        }
    }

    /// The lifecycle rules the dispatcher applies.
    pub fn lifecycle_rules(&self) -> digibot_domain::lifecycle::Rules {
        digibot_domain::lifecycle::Rules::new(
            &self.release_command,
            self.human_idle_release_secs,
            Duration::from_millis(self.request_timeout_ms),
        )
    }
}

/// The store the settings ask for: PostgreSQL when `database_url` is set,
/// else SQLite under the data dir.
pub fn open_store(settings: &Settings) -> Result<Store, StoreError> {
    match &settings.database_url {
        Some(url) => {
            let lease = Duration::from_millis(settings.lease_ms);
            digibot_store_postgres::open(
                digibot_store_postgres::parse_url(url)?,
                digibot_store_postgres::Options {
                    pool_size: settings.database_pool,
                    lease,
                    // Longer than one request, so a live sender keeps it.
                    claim: lease + Duration::from_millis(settings.request_timeout_ms),
                    ..digibot_store_postgres::Options::default()
                },
            )
        }
        None => digibot_store_sqlite::open(&settings.data_dir, settings.durability),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_are_dry_run_on_loopback() {
        let s = Settings::load_with(None, env(&[])).unwrap();
        assert!(s.dry_run());
        assert!(s.listen.ip().is_loopback());
        assert_eq!(s.durability, Durability::Full);
        assert_eq!(s.release_command, "/bot");
        assert_eq!(s.human_idle_release_secs, 0);
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digibot.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nconcurrency = 4\n[retry]\nbase_ms = 7\n",
        )
        .unwrap();
        let s = Settings::load_with(
            Some(&path),
            env(&[
                ("DIGIBOT_LISTEN", "127.0.0.1:9100"),
                ("DIGIBOT_API_TOKEN", "t"),
            ]),
        )
        .unwrap();
        assert_eq!(s.listen.port(), 9100);
        assert_eq!(s.concurrency, 4);
        assert_eq!(s.retry.base_ms, 7);
        assert!(!s.dry_run());
    }

    #[test]
    fn http_edge_settings_from_the_environment() {
        let s = Settings::load_with(
            None,
            env(&[
                ("DIGIBOT_HTTP_HEADER_TIMEOUT_SECS", "3"),
                ("DIGIBOT_HTTP_MAX_CONNECTIONS", "100"),
                (
                    "DIGIBOT_ALLOWED_HOSTS",
                    "digibot.example.com, ops.internal ,",
                ),
            ]),
        )
        .unwrap();
        let limits = s.http_limits();
        assert_eq!(limits.header_timeout, Duration::from_secs(3));
        assert_eq!(limits.max_connections, 100);
        assert_eq!(limits.body_timeout, Duration::from_secs(30));
        assert_eq!(
            s.http.allowed_hosts,
            ["digibot.example.com", "ops.internal"]
        );
        assert!(Settings::load_with(None, env(&[("DIGIBOT_HTTP_MAX_IN_FLIGHT", "0")])).is_err());
    }

    #[test]
    fn bad_values_say_which_variable() {
        let err = Settings::load_with(None, env(&[("DIGIBOT_LISTEN", "nope")])).unwrap_err();
        assert!(
            err.to_string().starts_with("DIGIBOT_LISTEN=\"nope\""),
            "{err}"
        );
        assert!(Settings::load_with(None, env(&[("DIGIBOT_CLIENT_ID", "x")])).is_err());
    }
}
