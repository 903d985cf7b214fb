//! Settings: each declared once, below, as a clap argument that names its
//! file key (the argument's id: `retry.base_ms` is `[retry] base_ms`), its
//! `DIGIBOT_*` environment variable, its `serve` flag, its default and its
//! doc (what `digibot serve --help` and docs/operations.md show). Built-in
//! defaults, then the `--config` file, then the environment, then `serve`'s
//! flags, each overriding the one before (see [`layers`]). This module also
//! turns the settings into the other crates' own config types.

mod layers;
mod secret;

pub use layers::{ConfigError, Flags};
pub use secret::{DatabaseUrl, Secret};

use clap::ArgAction;
use digibot_domain::outbound::ResolveOverrides;
use digibot_pipeline::outbound::OutboundConfig;
use digibot_pipeline::outbound::secrets::Secrets;
use digibot_pipeline::sender::{ApiCredentials, RetryPolicy, SenderConfig};
use digibot_runtime::{KvQuota, KvQuotas, Limits, RuntimeConfig};
use digibot_store::{Retention, Store, StoreError};
use digibot_store_sqlite::Durability;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything `digibot serve` needs.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Settings (each also a DIGIBOT_* variable and a --config file key)")]
pub struct Settings {
    /// Address the HTTP server binds.
    #[arg(
        long,
        env = "DIGIBOT_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Digishare API base URL.
    #[arg(
        long,
        env = "DIGIBOT_API_BASE_URL",
        value_name = "URL",
        default_value = "https://api.digishare.ma"
    )]
    pub api_base_url: String,
    /// Messages API bearer token. Without it (and without an OAuth client)
    /// digibot runs in dry-run: it logs each request instead of sending it.
    #[arg(
        long,
        env = "DIGIBOT_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<Secret>,
    /// OAuth client id, with `client_secret` instead of `api_token` (both or
    /// neither).
    #[arg(long, env = "DIGIBOT_CLIENT_ID", value_name = "ID")]
    pub client_id: Option<String>,
    /// OAuth client secret, with `client_id`.
    #[arg(
        long,
        env = "DIGIBOT_CLIENT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub client_secret: Option<Secret>,
    /// Shared secret a webhook carries as `Authorization: Bearer …` or
    /// `X-Digishare-Secret: …`.
    #[arg(
        long,
        env = "DIGIBOT_WEBHOOK_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub webhook_token: Option<Secret>,
    /// `user:password` for HTTP Basic webhook auth (used when no token is
    /// set).
    #[arg(
        long,
        env = "DIGIBOT_WEBHOOK_BASIC",
        value_name = "USER:PASSWORD",
        hide_env_values = true
    )]
    pub webhook_basic: Option<Secret>,
    /// Bearer token of `/admin` (the admin API, the dashboard, `/metrics`);
    /// none: the admin API does not exist.
    #[arg(
        long,
        env = "DIGIBOT_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<Secret>,
    /// Folder of `NAME.wasm` plugins and their `NAME.toml`.
    #[arg(long, env = "DIGIBOT_PLUGINS_DIR", value_name = "DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Reload a plugin when its files change.
    #[arg(long, env = "DIGIBOT_WATCH_PLUGINS", value_name = "BOOL", action = ArgAction::Set, default_value_t = true)]
    pub watch_plugins: bool,
    /// SQLite database, compile cache, plugin history.
    #[arg(
        long,
        env = "DIGIBOT_DATA_DIR",
        value_name = "DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,
    /// `full` (fsync every group commit) or `normal` (safe against a
    /// process crash, not a power loss).
    #[arg(
        long,
        env = "DIGIBOT_DURABILITY",
        value_name = "full|normal",
        default_value = "full"
    )]
    pub durability: Durability,
    /// `postgres://user:password@host:port/db`: share one PostgreSQL
    /// database with other replicas instead of SQLite under `data_dir`
    /// (migrations are applied at start); `?sslmode=verify-full&sslrootcert=PATH`
    /// for TLS (see replicas.md).
    #[arg(
        long,
        env = "DIGIBOT_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<DatabaseUrl>,
    /// PostgreSQL connections each replica opens at most (plus one that
    /// listens for notifications).
    #[arg(
        long,
        env = "DIGIBOT_DATABASE_POOL",
        value_name = "N",
        default_value_t = 16
    )]
    pub database_pool: usize,
    /// PostgreSQL: the longest wait for a free pooled connection; past it
    /// a webhook is answered 503.
    #[arg(
        long,
        env = "DIGIBOT_DATABASE_ACQUIRE_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 2_000
    )]
    pub database_acquire_timeout_ms: u64,
    /// PostgreSQL: the server's `statement_timeout` for every statement;
    /// a statement that runs longer (or a database that stops answering)
    /// fails, and a webhook is answered 503.
    #[arg(
        long,
        env = "DIGIBOT_DATABASE_STATEMENT_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 5_000
    )]
    pub database_statement_timeout_ms: u64,
    /// PostgreSQL: how long a replica's hold on a conversation lasts
    /// without renewal, so how long a dead replica's conversations wait for
    /// another; its claims on outbox actions last this plus
    /// `request_timeout_ms`.
    #[arg(
        long,
        env = "DIGIBOT_LEASE_MS",
        value_name = "MS",
        default_value_t = 30_000
    )]
    pub lease_ms: u64,
    /// Largest webhook body accepted, in bytes.
    #[arg(long, env = "DIGIBOT_WEBHOOK_MAX_BYTES", value_name = "BYTES", default_value_t = 1 << 20)]
    pub webhook_max_bytes: usize,
    /// Conversations handled at once.
    #[arg(
        long,
        env = "DIGIBOT_CONCURRENCY",
        value_name = "N",
        default_value_t = 64
    )]
    pub concurrency: usize,
    /// Outbox requests in flight at once.
    #[arg(
        long,
        env = "DIGIBOT_SEND_CONCURRENCY",
        value_name = "N",
        default_value_t = 32
    )]
    pub send_concurrency: usize,
    /// Timeout of one Messages API request.
    #[arg(
        long,
        env = "DIGIBOT_REQUEST_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub request_timeout_ms: u64,
    #[command(flatten)]
    pub retry: RetrySettings,
    #[command(flatten)]
    pub http: HttpSettings,
    /// Handled events, sent actions and journaled outbound calls are
    /// deleted after this many hours (calls of pending events are kept).
    #[arg(long, env = "DIGIBOT_RETENTION_HOURS", value_name = "HOURS", default_value_t = 24 * 7)]
    pub retention_hours: u64,
    /// Dead letters are deleted this many days after they died (0: kept).
    #[arg(
        long,
        env = "DIGIBOT_DEAD_LETTER_RETENTION_DAYS",
        value_name = "DAYS",
        default_value_t = 30
    )]
    pub dead_letter_retention_days: u64,
    /// A conversation with no event for this many days is forgotten: who
    /// is in charge of it, and every plugin's KV in it (0: kept).
    #[arg(
        long,
        env = "DIGIBOT_CONVERSATION_RETENTION_DAYS",
        value_name = "DAYS",
        default_value_t = 90
    )]
    pub conversation_retention_days: u64,
    #[command(flatten)]
    pub kv: KvSettings,
    /// How long a shutdown waits for in-flight work.
    #[arg(
        long,
        env = "DIGIBOT_SHUTDOWN_GRACE_SECS",
        value_name = "SECS",
        default_value_t = 10
    )]
    pub shutdown_grace_secs: u64,
    #[command(flatten)]
    pub runtime: RuntimeSettings,
    /// An agent's internal note with exactly this text (any case) hands the
    /// conversation back to the bot.
    #[arg(
        long,
        env = "DIGIBOT_RELEASE_COMMAND",
        value_name = "TEXT",
        default_value = "/bot"
    )]
    pub release_command: String,
    /// A conversation in a human's hands goes back to the bot after this
    /// many seconds without an agent message; 0: never.
    #[arg(
        long,
        env = "DIGIBOT_HUMAN_IDLE_RELEASE_SECS",
        value_name = "SECS",
        default_value_t = 0
    )]
    pub human_idle_release_secs: u64,
    /// Plugins' outbound HTTP: names pinned to addresses, `curl --resolve`
    /// style (`name:port:address[,address...][,name:port:address...]`);
    /// a pinned name is still checked against the SSRF rules.
    #[arg(long, env = "DIGIBOT_RESOLVE", value_name = "NAME:PORT:ADDR")]
    pub resolve: Option<String>,
    /// A file of `NAME=value` lines: the secrets plugins may use by
    /// placeholder (`DIGIBOT_SECRET_<NAME>` variables win over it); refused
    /// unless only its owner may read it (mode 0600 or 0400).
    #[arg(long, env = "DIGIBOT_SECRETS_FILE", value_name = "FILE")]
    pub secrets_file: Option<PathBuf>,
}

/// Backoff of the outbox sender (the file's `[retry]` table).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Retries ([retry] in the file)")]
pub struct RetrySettings {
    /// First retry delay (exponential, full jitter).
    #[arg(
        id = "retry.base_ms",
        long = "retry-base-ms",
        env = "DIGIBOT_RETRY_BASE_MS",
        value_name = "MS",
        default_value_t = 500
    )]
    pub base_ms: u64,
    /// Longest retry delay.
    #[arg(
        id = "retry.max_ms",
        long = "retry-max-ms",
        env = "DIGIBOT_RETRY_MAX_MS",
        value_name = "MS",
        default_value_t = 60_000
    )]
    pub max_ms: u64,
    /// Attempts before an action becomes a dead letter.
    #[arg(
        id = "retry.max_attempts",
        long = "retry-max-attempts",
        env = "DIGIBOT_RETRY_MAX_ATTEMPTS",
        value_name = "N",
        default_value_t = 12
    )]
    pub max_attempts: u32,
}

/// KV quotas and the customer scope's retention (the file's `[kv]`
/// table): per plugin and conversation, customer, shared scope, and per
/// plugin in all. A `kv.set` past one is refused with the reason.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "KV quotas ([kv] in the file)")]
pub struct KvSettings {
    /// KV keys a plugin may hold in one conversation.
    #[arg(id = "kv.conversation_keys", long = "kv-conversation-keys", env = "DIGIBOT_KV_CONVERSATION_KEYS", value_name = "N", default_value_t = KvQuotas::default().conversation.keys)]
    pub conversation_keys: i64,
    /// KV bytes (keys plus values, UTF-8) a plugin may hold in one
    /// conversation.
    #[arg(id = "kv.conversation_bytes", long = "kv-conversation-bytes", env = "DIGIBOT_KV_CONVERSATION_BYTES", value_name = "BYTES", default_value_t = KvQuotas::default().conversation.bytes)]
    pub conversation_bytes: i64,
    /// KV keys a plugin may hold for one customer (`customer` scope).
    #[arg(id = "kv.customer_keys", long = "kv-customer-keys", env = "DIGIBOT_KV_CUSTOMER_KEYS", value_name = "N", default_value_t = KvQuotas::default().customer.keys)]
    pub customer_keys: i64,
    /// KV bytes a plugin may hold for one customer.
    #[arg(id = "kv.customer_bytes", long = "kv-customer-bytes", env = "DIGIBOT_KV_CUSTOMER_BYTES", value_name = "BYTES", default_value_t = KvQuotas::default().customer.bytes)]
    pub customer_bytes: i64,
    /// KV keys a plugin may hold in its shared `plugin` scope.
    #[arg(id = "kv.shared_keys", long = "kv-shared-keys", env = "DIGIBOT_KV_SHARED_KEYS", value_name = "N", default_value_t = KvQuotas::default().shared.keys)]
    pub shared_keys: i64,
    /// KV bytes a plugin may hold in its shared `plugin` scope.
    #[arg(id = "kv.shared_bytes", long = "kv-shared-bytes", env = "DIGIBOT_KV_SHARED_BYTES", value_name = "BYTES", default_value_t = KvQuotas::default().shared.bytes)]
    pub shared_bytes: i64,
    /// A plugin's memory of one customer (`customer` scope) not written
    /// for this many days is forgotten (0: kept).
    #[arg(
        id = "kv.customer_retention_days",
        long = "kv-customer-retention-days",
        env = "DIGIBOT_KV_CUSTOMER_RETENTION_DAYS",
        value_name = "DAYS",
        default_value_t = 365
    )]
    pub customer_retention_days: u64,
    /// KV keys a plugin may hold over all of its scopes.
    #[arg(id = "kv.plugin_keys", long = "kv-plugin-keys", env = "DIGIBOT_KV_PLUGIN_KEYS", value_name = "N", default_value_t = KvQuotas::default().plugin.keys)]
    pub plugin_keys: i64,
    /// KV bytes a plugin may hold over all of its scopes.
    #[arg(id = "kv.plugin_bytes", long = "kv-plugin-bytes", env = "DIGIBOT_KV_PLUGIN_BYTES", value_name = "BYTES", default_value_t = KvQuotas::default().plugin.bytes)]
    pub plugin_bytes: i64,
}

impl KvSettings {
    pub fn quotas(&self) -> KvQuotas {
        KvQuotas {
            conversation: KvQuota {
                keys: self.conversation_keys,
                bytes: self.conversation_bytes,
            },
            customer: KvQuota {
                keys: self.customer_keys,
                bytes: self.customer_bytes,
            },
            shared: KvQuota {
                keys: self.shared_keys,
                bytes: self.shared_bytes,
            },
            plugin: KvQuota {
                keys: self.plugin_keys,
                bytes: self.plugin_bytes,
            },
        }
    }
}

/// The HTTP edge's bounds and deadlines (the file's `[http]` table; see
/// `digibot_server::listener`). The defaults are
/// `digibot_server::HttpLimits::default()`'s (a unit test keeps them so).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "HTTP edge ([http] in the file)")]
pub struct HttpSettings {
    /// A connection must deliver a complete request head within this of
    /// opening (or of the first byte of its next request); else it is
    /// closed.
    #[arg(
        id = "http.header_timeout_secs",
        long = "http-header-timeout-secs",
        env = "DIGIBOT_HTTP_HEADER_TIMEOUT_SECS",
        value_name = "SECS",
        default_value_t = 10
    )]
    pub header_timeout_secs: u64,
    /// A whole request body within this of its head (`408` otherwise).
    #[arg(
        id = "http.body_timeout_secs",
        long = "http-body-timeout-secs",
        env = "DIGIBOT_HTTP_BODY_TIMEOUT_SECS",
        value_name = "SECS",
        default_value_t = 30
    )]
    pub body_timeout_secs: u64,
    /// A kept-alive connection with no request, or a client that stops
    /// reading its answer, is closed after this.
    #[arg(
        id = "http.idle_timeout_secs",
        long = "http-idle-timeout-secs",
        env = "DIGIBOT_HTTP_IDLE_TIMEOUT_SECS",
        value_name = "SECS",
        default_value_t = 60
    )]
    pub idle_timeout_secs: u64,
    /// Open connections at once; more are answered `503` and closed
    /// (lowered, with a warning, to fit the open-files limit).
    #[arg(
        id = "http.max_connections",
        long = "http-max-connections",
        env = "DIGIBOT_HTTP_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 4096
    )]
    pub max_connections: usize,
    /// Requests handled at once, `/healthz` and `/readyz` aside; more are
    /// answered `503` with `Retry-After: 1` at once.
    #[arg(
        id = "http.max_in_flight",
        long = "http-max-in-flight",
        env = "DIGIBOT_HTTP_MAX_IN_FLIGHT",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_in_flight: usize,
    /// Host names (comma-separated) the admin API, dashboard and `/metrics`
    /// answer besides IP literals and `localhost`; `*` for any.
    #[arg(
        id = "http.allowed_hosts",
        long = "allowed-hosts",
        env = "DIGIBOT_ALLOWED_HOSTS",
        value_name = "HOST,...",
        default_value = ""
    )]
    pub allowed_hosts: HostNames,
}

/// A comma-separated list of host names, blanks dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNames(pub Vec<String>);

impl std::str::FromStr for HostNames {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(HostNames(
            s.split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect(),
        ))
    }
}

/// How plugins are compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompileMode {
    Fast,
    Optimized,
}

/// Plugin runtime settings (the file's `[runtime]` table); the limits are
/// every plugin's defaults, which its `NAME.toml` may lower.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Plugin runtime ([runtime] in the file)")]
pub struct RuntimeSettings {
    /// Pooling instance allocator (falls back to on-demand if the machine
    /// refuses it).
    #[arg(id = "runtime.pooling", long = "pooling", env = "DIGIBOT_POOLING", value_name = "BOOL", action = ArgAction::Set, default_value_t = true)]
    pub pooling: bool,
    /// Instances the pool holds at once: a quarter may be warm (each
    /// enabled plugin keeps up to four instantiated, never-called instances
    /// ready, each used for one event only), a quarter may wait to be
    /// reset, half serve turns: so this bounds the turns running or
    /// waiting at once (`pool_instances / 2`). Turns hold no thread: to let
    /// thousands wait on slow host calls, raise it and `concurrency` (each
    /// pooled instance reserves address space, not memory).
    #[arg(
        id = "runtime.pool_instances",
        long = "pool-instances",
        env = "DIGIBOT_POOL_INSTANCES",
        value_name = "N",
        default_value_t = 64
    )]
    pub pool_instances: u32,
    /// KiB at the start of each pooled memory zeroed rather than returned
    /// to the kernel between instances: a fresh instance's first call then
    /// takes no page faults on a Rust guest's stack (see BENCHMARKS.md).
    #[arg(id = "runtime.keep_resident_kb", long = "keep-resident-kb", env = "DIGIBOT_KEEP_RESIDENT_KB", value_name = "KIB", default_value_t = RuntimeConfig::default().keep_resident >> 10)]
    pub keep_resident_kb: usize,
    /// `fast`: Cranelift's single-pass register allocator, ~30% quicker
    /// compiles (hot swaps, first loads); `optimized`: quicker code, for
    /// compute-heavy guests such as interpreters.
    #[arg(
        id = "runtime.compile",
        long = "compile",
        env = "DIGIBOT_COMPILE",
        value_name = "fast|optimized",
        value_enum,
        default_value = "fast"
    )]
    pub compile: CompileMode,
    /// Meter fuel, so a plugin's `limits.fuel` applies (slower plugins).
    #[arg(id = "runtime.fuel", long = "fuel", env = "DIGIBOT_FUEL", value_name = "BOOL", action = ArgAction::Set, default_value_t = false)]
    pub fuel: bool,
    /// Default compute budget of a turn: its time not spent waiting on a
    /// host call (none: `timeout_ms`, else 100).
    #[arg(
        id = "runtime.compute_ms",
        long = "plugin-compute-ms",
        env = "DIGIBOT_PLUGIN_COMPUTE_MS",
        value_name = "MS"
    )]
    pub compute_ms: Option<u64>,
    /// Default wall-clock deadline of a turn, host calls included, for
    /// plugins without a network grant (none: `timeout_ms`, else 100).
    #[arg(
        id = "runtime.wall_ms",
        long = "plugin-wall-ms",
        env = "DIGIBOT_PLUGIN_WALL_MS",
        value_name = "MS"
    )]
    pub wall_ms: Option<u64>,
    /// The older spelling of both `compute_ms` and `wall_ms` (each wins
    /// where set).
    #[arg(
        id = "runtime.timeout_ms",
        long = "plugin-timeout-ms",
        env = "DIGIBOT_PLUGIN_TIMEOUT_MS",
        value_name = "MS"
    )]
    pub timeout_ms: Option<u64>,
    /// Default wall-clock deadline of a turn for plugins granted the
    /// network (`[grants] http`): their turns wait on remote hosts.
    #[arg(id = "runtime.network_wall_ms", long = "plugin-network-wall-ms", env = "DIGIBOT_PLUGIN_NETWORK_WALL_MS", value_name = "MS", default_value_t = RuntimeConfig::default().network_wall.as_millis() as u64)]
    pub network_wall_ms: u64,
    /// Ceiling of any plugin's compute budget (`NAME.toml` cannot ask for
    /// more).
    #[arg(id = "runtime.max_compute_ms", long = "plugin-max-compute-ms", env = "DIGIBOT_PLUGIN_MAX_COMPUTE_MS", value_name = "MS", default_value_t = RuntimeConfig::default().max_compute.as_millis() as u64)]
    pub max_compute_ms: u64,
    /// Ceiling of any plugin's wall-clock deadline.
    #[arg(id = "runtime.max_wall_ms", long = "plugin-max-wall-ms", env = "DIGIBOT_PLUGIN_MAX_WALL_MS", value_name = "MS", default_value_t = RuntimeConfig::default().max_wall.as_millis() as u64)]
    pub max_wall_ms: u64,
    /// Default memory cap of a plugin, in MiB (at most 256).
    #[arg(id = "runtime.memory_mb", long = "plugin-memory-mb", env = "DIGIBOT_PLUGIN_MEMORY_MB", value_name = "MIB", default_value_t = (Limits::default().memory_bytes >> 20) as u64)]
    pub memory_mb: u64,
    /// Default replies per invocation.
    #[arg(id = "runtime.max_actions", long = "plugin-max-actions", env = "DIGIBOT_PLUGIN_MAX_ACTIONS", value_name = "N", default_value_t = Limits::default().max_actions)]
    pub max_actions: usize,
    /// Default log and stdout/stderr bytes kept per invocation.
    #[arg(id = "runtime.max_log_bytes", long = "plugin-max-log-bytes", env = "DIGIBOT_PLUGIN_MAX_LOG_BYTES", value_name = "BYTES", default_value_t = Limits::default().max_log_bytes)]
    pub max_log_bytes: usize,
    /// Default `log` calls kept per invocation.
    #[arg(id = "runtime.max_log_lines", long = "plugin-max-log-lines", env = "DIGIBOT_PLUGIN_MAX_LOG_LINES", value_name = "N", default_value_t = Limits::default().max_log_lines)]
    pub max_log_lines: usize,
    /// Core instances one plugin component may have (refused at load
    /// beyond; the instance pool is sized by it).
    #[arg(id = "runtime.max_core_instances", long = "plugin-max-core-instances", env = "DIGIBOT_PLUGIN_MAX_CORE_INSTANCES", value_name = "N", default_value_t = Limits::default().core_instances)]
    pub max_core_instances: usize,
    /// Linear memories one plugin component may have (refused at load
    /// beyond).
    #[arg(id = "runtime.max_memories", long = "plugin-max-memories", env = "DIGIBOT_PLUGIN_MAX_MEMORIES", value_name = "N", default_value_t = Limits::default().memories)]
    pub max_memories: usize,
    /// Tables one plugin component may have (refused at load beyond).
    #[arg(id = "runtime.max_tables", long = "plugin-max-tables", env = "DIGIBOT_PLUGIN_MAX_TABLES", value_name = "N", default_value_t = Limits::default().tables)]
    pub max_tables: usize,
    /// Consecutive failures that quarantine a plugin (0: never).
    #[arg(
        id = "runtime.breaker_failures",
        long = "breaker-failures",
        env = "DIGIBOT_BREAKER_FAILURES",
        value_name = "N",
        default_value_t = 5
    )]
    pub breaker_failures: u32,
    /// How long a quarantined plugin is skipped.
    #[arg(
        id = "runtime.breaker_cooldown_secs",
        long = "breaker-cooldown-secs",
        env = "DIGIBOT_BREAKER_COOLDOWN_SECS",
        value_name = "SECS",
        default_value_t = 30
    )]
    pub breaker_cooldown_secs: u64,
}

impl RuntimeSettings {
    /// Default per-plugin limits from these settings.
    pub fn limits(&self) -> Limits {
        let defaults = Limits::default();
        let ms = |v: Option<u64>, default: Duration| {
            v.or(self.timeout_ms).map_or(default, Duration::from_millis)
        };
        Limits {
            compute: ms(self.compute_ms, defaults.compute),
            wall: ms(self.wall_ms, defaults.wall),
            memory_bytes: (self.memory_mb as usize) << 20,
            max_actions: self.max_actions,
            max_log_bytes: self.max_log_bytes,
            max_log_lines: self.max_log_lines,
            core_instances: self.max_core_instances,
            memories: self.max_memories,
            tables: self.max_tables,
            ..Limits::default()
        }
    }
}

impl Settings {
    /// Defaults, then the file (if given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Settings::load_with(file, |var| std::env::var(var).ok())
    }

    /// [`load`](Self::load), then `serve`'s flags over all of it.
    pub fn load_with_flags(file: Option<&Path>, flags: &Flags) -> Result<Settings, ConfigError> {
        let s = layers::layer(file, &|var| std::env::var(var).ok(), flags)?;
        s.validate()?;
        Ok(s)
    }

    /// [`load`](Self::load) with an explicit environment (for tests).
    pub fn load_with(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let s = layers::layer(file, &env, &Flags::default())?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(basic) = &self.webhook_basic
            && !basic.expose().contains(':')
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
            && !(url.expose().starts_with("postgres://")
                || url.expose().starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid(
                "DIGIBOT_DATABASE_URL must be a postgres:// URL".into(),
            ));
        }
        if self.database_pool == 0
            || self.lease_ms == 0
            || self.database_acquire_timeout_ms == 0
            || self.database_statement_timeout_ms == 0
        {
            return Err(ConfigError::Invalid(
                "database_pool, lease_ms and the database timeouts must be at least 1".into(),
            ));
        }
        if self.release_command.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "release_command must not be empty".into(),
            ));
        }
        let kv = &self.kv;
        if [
            kv.conversation_keys,
            kv.conversation_bytes,
            kv.plugin_keys,
            kv.plugin_bytes,
        ]
        .iter()
        .any(|q| *q < 1)
        {
            return Err(ConfigError::Invalid("kv quotas must be at least 1".into()));
        }
        let r = &self.runtime;
        if r.max_memories == 0 || r.max_core_instances == 0 || r.max_tables == 0 {
            return Err(ConfigError::Invalid(
                "runtime.max_core_instances, max_memories and max_tables must be at least 1".into(),
            ));
        }
        if self.concurrency == 0 || self.send_concurrency == 0 {
            return Err(ConfigError::Invalid(
                "concurrency must be at least 1".into(),
            ));
        }
        self.resolve_overrides()?;
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

    /// `DIGIBOT_RESOLVE`, parsed.
    pub fn resolve_overrides(&self) -> Result<ResolveOverrides, ConfigError> {
        ResolveOverrides::parse(self.resolve.as_deref().unwrap_or(""))
            .map_err(|e| ConfigError::Invalid(format!("DIGIBOT_RESOLVE: {e}")))
    }

    /// Plugins' outbound HTTP as the operator set it up: the name pins and
    /// the secrets (from `vars`, the process environment, and the secrets
    /// file).
    pub fn outbound_config(
        &self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<OutboundConfig, ConfigError> {
        Ok(OutboundConfig {
            resolve: self.resolve_overrides()?,
            secrets: Secrets::load(vars, self.secrets_file.as_deref())
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
        })
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
            network_wall: Duration::from_millis(r.network_wall_ms),
            max_compute: Duration::from_millis(r.max_compute_ms),
            max_wall: Duration::from_millis(r.max_wall_ms),
            kv_quotas: self.kv.quotas(),
            ..RuntimeConfig::default()
        }
    }

    /// What retention removes when it runs at `now` (ms).
    pub fn retention(&self, now: i64) -> Retention {
        let ago = |hours: u64| now.saturating_sub((hours as i64).saturating_mul(3_600_000));
        let days = |d: u64| (d > 0).then(|| ago(d.saturating_mul(24)));
        Retention {
            finished_before: Some(ago(self.retention_hours)),
            dead_before: days(self.dead_letter_retention_days),
            idle_before: days(self.conversation_retention_days),
            expired_before: Some(now),
            customer_idle_before: days(self.kv.customer_retention_days),
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
                (Some(token), _, _) => ApiCredentials::Token(token.expose().to_string()),
                (None, Some(id), Some(secret)) => ApiCredentials::Client {
                    id: id.clone(),
                    secret: secret.expose().to_string(),
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
pub async fn open_store(settings: &Settings) -> Result<Store, StoreError> {
    match &settings.database_url {
        Some(url) => {
            let lease = Duration::from_millis(settings.lease_ms);
            digibot_store_postgres::open(
                &digibot_store_postgres::DatabaseUrl::parse(url.expose())?,
                digibot_store_postgres::Options {
                    pool_size: settings.database_pool,
                    lease,
                    // Longer than one request, so a live sender keeps it.
                    claim: lease + Duration::from_millis(settings.request_timeout_ms),
                    acquire_timeout: Duration::from_millis(settings.database_acquire_timeout_ms),
                    statement_timeout: Duration::from_millis(
                        settings.database_statement_timeout_ms,
                    ),
                    ..digibot_store_postgres::Options::default()
                },
            )
            .await
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
    fn outbound_http_pins_and_secrets() {
        let s = Settings::load_with(
            None,
            env(&[("DIGIBOT_RESOLVE", "api.shop.example:443:127.0.0.1")]),
        )
        .unwrap();
        assert_eq!(s.resolve_overrides().unwrap().len(), 1);
        let out = s
            .outbound_config([(
                "DIGIBOT_SECRET_ORDERS_TOKEN".to_string(),
                "a-long-enough-token".to_string(),
            )])
            .unwrap();
        assert_eq!(out.secrets.len(), 1);
        let err = Settings::load_with(None, env(&[("DIGIBOT_RESOLVE", "nope")])).unwrap_err();
        assert!(err.to_string().contains("DIGIBOT_RESOLVE entry"), "{err}");
    }

    #[test]
    fn the_older_timeout_sets_both_budgets_unless_one_is_given() {
        let s = Settings::load_with(None, env(&[])).unwrap();
        let limits = s.runtime_config().defaults;
        assert_eq!(
            (limits.compute, limits.wall),
            (Duration::from_millis(100), Duration::from_millis(100))
        );
        let s = Settings::load_with(
            None,
            env(&[
                ("DIGIBOT_PLUGIN_TIMEOUT_MS", "300"),
                ("DIGIBOT_PLUGIN_WALL_MS", "2000"),
            ]),
        )
        .unwrap();
        let config = s.runtime_config();
        assert_eq!(config.defaults.compute, Duration::from_millis(300));
        assert_eq!(config.defaults.wall, Duration::from_secs(2));
        assert_eq!(config.network_wall, Duration::from_secs(10));
        assert_eq!(config.max_wall, Duration::from_secs(60));
    }

    #[test]
    fn retention_and_quotas_have_documented_defaults_and_env_overrides() {
        let s = Settings::load_with(None, env(&[])).unwrap();
        let now = 100 * 86_400_000;
        let r = s.retention(now);
        assert_eq!(r.finished_before, Some(now - 7 * 86_400_000));
        assert_eq!(r.dead_before, Some(now - 30 * 86_400_000));
        assert_eq!(r.idle_before, Some(now - 90 * 86_400_000));
        assert_eq!(s.runtime_config().kv_quotas, KvQuotas::default());
        let s = Settings::load_with(
            None,
            env(&[
                ("DIGIBOT_DEAD_LETTER_RETENTION_DAYS", "0"),
                ("DIGIBOT_KV_CONVERSATION_BYTES", "4096"),
                ("DIGIBOT_PLUGIN_MAX_MEMORIES", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.retention(now).dead_before, None);
        let config = s.runtime_config();
        assert_eq!(config.kv_quotas.conversation.bytes, 4096);
        assert_eq!(config.defaults.memories, 2);
        assert!(Settings::load_with(None, env(&[("DIGIBOT_KV_PLUGIN_KEYS", "0")])).is_err());
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
            s.http.allowed_hosts.0,
            ["digibot.example.com", "ops.internal"]
        );
        assert!(Settings::load_with(None, env(&[("DIGIBOT_HTTP_MAX_IN_FLIGHT", "0")])).is_err());
    }

    /// The declared defaults are the server crate's own.
    #[test]
    fn http_defaults_are_the_servers() {
        let s = Settings::load_with(None, env(&[])).unwrap();
        let (ours, theirs) = (s.http_limits(), digibot_server::HttpLimits::default());
        assert_eq!(ours.header_timeout, theirs.header_timeout);
        assert_eq!(ours.body_timeout, theirs.body_timeout);
        assert_eq!(ours.idle_timeout, theirs.idle_timeout);
        assert_eq!(ours.max_connections, theirs.max_connections);
        assert_eq!(ours.max_in_flight, theirs.max_in_flight);
        assert!(s.http.allowed_hosts.0.is_empty());
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

    const TABLE_BEGIN: &str = "<!-- settings table: generated from crates/digibot/src/config.rs \
        (UPDATE_DOCS=1 cargo test -p digibot settings_table rewrites it) -->";
    const TABLE_END: &str = "<!-- end of settings table -->";

    /// The declaration as docs/operations.md's table.
    fn markdown_table() -> String {
        let mut table = String::from(
            "| file key | environment | `serve` flag | default | meaning |\n|---|---|---|---|---|\n",
        );
        for arg in layers::declared().get_arguments() {
            let defaults: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|d| format!("`{}`", d.to_string_lossy()))
                .collect();
            let doc = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|d| d.to_string())
                .unwrap_or_default();
            table.push_str(&format!(
                "| `{}` | `{}` | `--{}` | {} | {} |\n",
                arg.get_id(),
                arg.get_env().unwrap_or_default().to_string_lossy(),
                arg.get_long().unwrap_or_default(),
                if defaults.is_empty() {
                    "none".to_string()
                } else {
                    defaults.join(", ")
                },
                doc.split_whitespace().collect::<Vec<_>>().join(" "),
            ));
        }
        table
    }

    /// docs/operations.md lists exactly the declared settings.
    #[test]
    fn settings_table() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let start = doc.find(TABLE_BEGIN).expect("the table's first marker") + TABLE_BEGIN.len();
        let stop = doc.find(TABLE_END).expect("the table's last marker");
        let table = markdown_table();
        if doc[start..stop].trim() == table.trim() {
            return;
        }
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let updated = format!("{}\n{table}{}", &doc[..start], &doc[stop..]);
            std::fs::write(&path, updated).unwrap();
            return;
        }
        panic!(
            "docs/operations.md's settings table is not the declaration's; \
             UPDATE_DOCS=1 cargo test -p digibot settings_table rewrites it to:\n{table}"
        );
    }

    #[test]
    fn debug_shows_no_secret() {
        let s = Settings::load_with(
            None,
            env(&[
                ("DIGIBOT_API_TOKEN", "api-hunter2"),
                ("DIGIBOT_CLIENT_ID", "client-id-shown"),
                ("DIGIBOT_CLIENT_SECRET", "client-hunter2"),
                ("DIGIBOT_WEBHOOK_TOKEN", "webhook-hunter2"),
                ("DIGIBOT_WEBHOOK_BASIC", "digishare:basic-hunter2"),
                ("DIGIBOT_ADMIN_TOKEN", "admin-hunter2"),
                (
                    "DIGIBOT_DATABASE_URL",
                    "postgres://digibot:db-hunter2@db.internal/digibot",
                ),
            ]),
        )
        .unwrap();
        for debug in [format!("{s:?}"), format!("{s:#?}")] {
            assert!(!debug.contains("hunter2"), "a secret in Debug: {debug}");
            // What is not secret is still there to debug with.
            assert!(debug.contains("client-id-shown"), "{debug}");
            assert!(
                debug.contains("postgres://digibot:***@db.internal/digibot"),
                "{debug}"
            );
        }
        // And each is still there for the part that uses it.
        assert!(matches!(
            s.sender_config().credentials,
            ApiCredentials::Token(t) if t == "api-hunter2"
        ));
        assert_eq!(s.admin_token.unwrap().expose(), "admin-hunter2");
    }
}
