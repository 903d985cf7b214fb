//! The plugin runtime: the one crate that touches Wasm (Cargo says so:
//! nothing else depends on wasmtime). It knows no HTTP server and no SQL;
//! what a plugin may reach beyond its own memory (KV reads, config, log)
//! comes in through traits the pipeline implements, such as [`KvRead`].
//!
//! One [`wasmtime::Engine`] per process (epoch interruption, pooling
//! allocator where the machine allows it); a [`Plugin`] is a validated,
//! compiled component with its `InstancePre`; every invocation (a turn)
//! gets a fresh `Store` and instance, with the plugin's limits, and returns
//! typed [`Action`]s or a [`Failure`] that says why.
//!
//! Turns are async ([`Runtime::invoke`]): guest code runs on wasmtime's
//! fibers inside the turn's future, yields to the executor at every epoch
//! tick, and a host call that waits (a KV read, a granted sleep) suspends
//! the future without holding a thread. Each turn has a compute budget and
//! a wall-clock deadline (see `budget`); time is virtual for plugins
//! without the clock grant (see `clock`).

// First: the version modules expand its macro.
#[macro_use]
mod edge;
mod budget;
mod clock;
pub mod manifest;
pub mod outbound;
pub mod registry;
mod state;
mod stdio;
pub mod v0_1_0;
pub mod v0_2_0;
pub mod v0_3_0;
pub mod watch;

pub use budget::Budget;
use digibot_domain::event;
use digibot_domain::outbound::{HttpLimits, HttpPolicy};
use digibot_protocol::Action;
pub use manifest::{Capped, EventFilter, Fallback, FallbackAction, Grants, Limits, Manifest};
pub use outbound::{
    CallSummary, NoHttp, OutboundHttp, OutboundRequest, OutboundResponse, RefusalView, Sent,
};
use sha2::{Digest, Sha256};
use state::HostState;
pub use state::{HostLimit, KvRead, LogLevel, LogLine, MemoryKv};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline,
};

pub use digibot_domain::kv::{KvQuota, KvQuotas, KvScope, KvSize, KvUsage, KvWrite, Scope};

/// How often the epoch ticks: a computing turn yields to the executor (and
/// has its budgets checked) this often.
const EPOCH_TICK: Duration = Duration::from_millis(2);

/// The `digishare:bot` versions this host loads.
pub const SUPPORTED_WIT: &[&str] = &[v0_1_0::VERSION, v0_2_0::VERSION, v0_3_0::VERSION];

/// Interfaces a plugin may import besides `digishare:bot`: WASI p2, linked
/// with no capability granted (no preopens, env, args or sockets), because
/// language runtimes import them even when they never use them; and
/// `wasi:http`, whose every request goes through the plugin's grant (see
/// [`outbound`]).
const ALLOWED_WASI: &[&str] = &[
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:http/",
    "wasi:io/",
    "wasi:random/",
    "wasi:sockets/",
];

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Use the pooling allocator (falls back to on-demand if the machine
    /// refuses the reservation).
    pub pooling: bool,
    /// Instances the pool holds at once.
    pub pool_instances: u32,
    /// Ceiling for any plugin's memory limit.
    pub max_memory_bytes: usize,
    /// Meter fuel (slower code; per-plugin `limits.fuel` then applies).
    pub fuel: bool,
    /// Compile with Cranelift's best register allocator: faster code,
    /// ~30% slower compiles. Off by default: bot plugins are small glue
    /// whose compile time (hot swaps, first loads) matters more than peak
    /// speed; turn it on for compute-heavy guests such as interpreters.
    pub optimized_code: bool,
    /// Where compiled components are cached (none: always compile).
    pub cache_dir: Option<PathBuf>,
    /// Limits for plugins whose manifest does not override them (`wall`:
    /// for plugins without a network grant).
    pub defaults: Limits,
    /// Default wall-clock deadline of a turn for plugins granted the
    /// network: their turns wait on remote hosts.
    pub network_wall: Duration,
    /// Ceiling for any plugin's compute budget.
    pub max_compute: Duration,
    /// Ceiling for any plugin's wall-clock deadline.
    pub max_wall: Duration,
    /// The most any plugin's outbound HTTP caps may be.
    pub http_ceilings: HttpLimits,
    /// Instances kept ready per plugin (0: instantiate on the event path).
    pub warm_instances: usize,
    /// Bytes at the start of each pooled linear memory that are zeroed
    /// rather than returned to the kernel when a slot is reused: the next
    /// instance then takes no page faults there.
    pub keep_resident: usize,
    /// How much KV each plugin may hold, per conversation and in all.
    pub kv_quotas: KvQuotas,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            pooling: true,
            pool_instances: 64,
            max_memory_bytes: 256 << 20,
            fuel: false,
            optimized_code: false,
            cache_dir: None,
            defaults: Limits::default(),
            network_wall: Duration::from_secs(10),
            max_compute: Duration::from_secs(10),
            max_wall: Duration::from_secs(60),
            http_ceilings: HttpLimits::ceilings(),
            warm_instances: 4,
            // A Rust guest's stack is its first MiB and its data follows:
            // 18 wasm pages cover what a first call touches (BENCHMARKS.md).
            keep_resident: 18 << 16,
            kv_quotas: KvQuotas::default(),
        }
    }
}

impl RuntimeConfig {
    /// The limits of a plugin with `manifest`: the defaults (the wall-clock
    /// default depends on its grants), its `[limits]`, then the host's
    /// ceilings; with what a ceiling cut.
    pub fn limits(&self, manifest: &Manifest) -> (Limits, Vec<Capped>) {
        let mut defaults = self.defaults.clone();
        if manifest.grants.network() {
            defaults.wall = self.network_wall;
        }
        let (limits, capped) = defaults.with_ceilings(&manifest.limits, self.max_memory_bytes);
        let limits = Limits {
            compute: limits.compute.min(self.max_compute),
            wall: limits.wall.min(self.max_wall),
            http: limits.http.min(&self.http_ceilings),
            ..limits
        };
        (limits, capped)
    }
}

/// Why a component cannot be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error(
        "not a WebAssembly component (a core module or another file); build with --target wasm32-wasip2"
    )]
    NotAComponent,
    #[error("does not compile: {0}")]
    Compile(String),
    #[error(
        "does not target digishare:bot (no digishare:bot import); is it built with digibot-sdk?"
    )]
    NotABot,
    #[error("targets digishare:bot@{found}, this host supports {}", SUPPORTED_WIT.join(", "))]
    UnsupportedVersion { found: String },
    #[error("imports what digibot does not provide: {}", .0.join(", "))]
    RefusedImports(Vec<String>),
    #[error("does not link: {0}")]
    Link(String),
    #[error("does not export the bot world: {0}")]
    Exports(String),
    #[error("invalid plugin name {0:?}: use letters, digits, '-' and '_'")]
    BadName(String),
    #[error("has {found} {what}; a plugin may have at most {max}")]
    TooLarge {
        /// `core instances`, `linear memories` or `tables`.
        what: &'static str,
        found: usize,
        max: usize,
    },
}

impl LoadError {
    /// A compile error that is the pooling allocator refusing a component
    /// over a per-component cap, as the [`LoadError::TooLarge`] it is.
    fn from_compile(error: &wasmtime::Error) -> LoadError {
        let text = format!("{error:#}");
        // wasmtime 48: "The component transitively contains N core module
        // instances|Wasm linear memories|tables, which exceeds the
        // configured maximum of M in the pooling allocator".
        let parsed = text
            .split_once("transitively contains ")
            .and_then(|(_, rest)| {
                let (found, rest) = rest.split_once(' ')?;
                let (what, rest) = rest.split_once(", which exceeds the configured maximum of ")?;
                let max = rest.split(' ').next()?;
                let what = match what {
                    "core module instances" => "core instances",
                    "Wasm linear memories" => "linear memories",
                    "tables" => "tables",
                    _ => return None,
                };
                Some(LoadError::TooLarge {
                    what,
                    found: found.parse().ok()?,
                    max: max.parse().ok()?,
                })
            });
        parsed.unwrap_or(LoadError::Compile(text))
    }
}

/// Why an invocation produced no actions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Out of one of its turn's budgets.
    #[error("timeout: {0}")]
    Timeout(Budget),
    #[error("memory")]
    Memory,
    #[error("fuel")]
    Fuel,
    #[error("trap: {0}")]
    Trap(String),
    #[error("error: {0}")]
    Error(String),
    /// A host call with an argument past its bound (see [`HostLimit`]).
    #[error("limit: {0}")]
    Limit(String),
    /// The handler returned, as its error, a refusal the host had given it
    /// during the turn (`quota: ...`, `limit: ...`): recorded as the
    /// host's reason, not as the plugin's own error.
    #[error("{0}")]
    Refused(String),
    #[error("too many actions ({count}, limit {max})")]
    TooManyActions { count: usize, max: usize },
    #[error("actions too large ({bytes} bytes, limit {max})")]
    ActionsTooLarge { bytes: usize, max: usize },
}

impl Failure {
    /// The failure's kind without its details: a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Timeout(_) => "timeout",
            Failure::Memory => "memory",
            Failure::Fuel => "fuel",
            Failure::Trap(_) => "trap",
            Failure::Error(_) => "error",
            Failure::Limit(_) => "limit",
            Failure::Refused(r) if r.starts_with("quota:") => "quota",
            Failure::Refused(_) => "limit",
            Failure::TooManyActions { .. } => "too_many_actions",
            Failure::ActionsTooLarge { .. } => "actions_too_large",
        }
    }
}

/// What one invocation did.
#[derive(Debug)]
pub struct Invocation {
    pub outcome: Result<Vec<Action>, Failure>,
    /// Its outbound HTTP requests, refused ones included.
    pub calls: Vec<CallSummary>,
    /// KV writes to commit with the event; empty when the call failed.
    pub kv_writes: Vec<KvWrite>,
    /// Timer schedules and cancels to commit with the event; empty when
    /// the call failed.
    pub timer_ops: Vec<digibot_domain::timer::TimerOp>,
    pub logs: Vec<LogLine>,
    /// What the host refused the plugin (`kv.set` over a bound or a
    /// quota), as the plugin was told; the turn went on.
    pub refused: Vec<String>,
    /// stdout and stderr, as far as the log cap allowed.
    pub output: String,
    pub logs_dropped: usize,
    pub elapsed: Duration,
}

/// A loaded, validated plugin version. Immutable: a new version is a new
/// `Plugin`, so invocations in flight keep the one they started with.
pub struct Plugin {
    pub name: String,
    /// SHA-256 of the component bytes, hex.
    pub hash: String,
    pub wit_version: &'static str,
    pub manifest: Manifest,
    pub limits: Limits,
    /// What it may do over HTTP (its grants, secrets and caps).
    pub http: Arc<HttpPolicy>,
    pub imports: Vec<String>,
    pub size: usize,
    pub compile_time: Duration,
    /// Loaded from the compile cache.
    pub cached: bool,
    warm: Arc<WarmPool>,
}

/// Instances of one plugin version made ahead of time, each used for
/// exactly one event: the event still gets a fresh, isolated instance, but
/// instantiation happens off its path, on the runtime's janitor thread
/// (which drives `instantiate_async` on a small tokio runtime of its own).
struct WarmPool {
    pre: Pre,
    name: Arc<str>,
    config: Arc<BTreeMap<String, String>>,
    limits: Limits,
    grants: Grants,
    http: Arc<HttpPolicy>,
    ready: Mutex<Vec<Ready>>,
    target: usize,
    fuel: bool,
    /// A refill is queued; more requests would only repeat it.
    refill_queued: AtomicBool,
}

/// An instantiated, never-called plugin instance.
struct Ready {
    store: Store<HostState>,
    bot: Instance,
}

/// A plugin's pre-instantiated bindings, in the `digishare:bot` version it
/// was built against. With [`Instance`], the host's only switch on the
/// version: everything else sees [`event`] and [`Action`].
enum Pre {
    V0_1_0(v0_1_0::Pre<HostState>),
    V0_2_0(v0_2_0::Pre<HostState>),
    V0_3_0(v0_3_0::TimedPre),
}

/// An instance of a plugin, in its version's bindings.
enum Instance {
    V0_1_0(v0_1_0::Bot),
    V0_2_0(v0_2_0::Bot),
    V0_3_0(v0_3_0::TimedBot),
}

impl Pre {
    /// The bindings for `version`, one of [`SUPPORTED_WIT`].
    fn new(
        version: &str,
        pre: wasmtime::component::InstancePre<HostState>,
    ) -> Result<Pre, LoadError> {
        let exports = |e: wasmtime::Error| LoadError::Exports(format!("{e:#}"));
        match version {
            v0_1_0::VERSION => Ok(Pre::V0_1_0(v0_1_0::Pre::new(pre).map_err(exports)?)),
            v0_2_0::VERSION => Ok(Pre::V0_2_0(v0_2_0::Pre::new(pre).map_err(exports)?)),
            v0_3_0::VERSION => Ok(Pre::V0_3_0(v0_3_0::TimedPre::new(pre).map_err(exports)?)),
            found => Err(LoadError::UnsupportedVersion {
                found: found.to_string(),
            }),
        }
    }

    async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Instance> {
        Ok(match self {
            Pre::V0_1_0(pre) => Instance::V0_1_0(v0_1_0::instantiate(pre, store).await?),
            Pre::V0_2_0(pre) => Instance::V0_2_0(v0_2_0::instantiate(pre, store).await?),
            Pre::V0_3_0(pre) => Instance::V0_3_0(pre.instantiate(store).await?),
        })
    }

    /// Whether the plugin exports `on-timer` (0.3.0's `bot-with-timers`).
    fn takes_timers(&self) -> bool {
        match self {
            Pre::V0_1_0(_) | Pre::V0_2_0(_) => false,
            Pre::V0_3_0(pre) => pre.takes_timers(),
        }
    }

    /// Whether the plugin exports `on-resume` (0.3.0's `bot-with-timers`).
    fn takes_resume(&self) -> bool {
        match self {
            Pre::V0_1_0(_) | Pre::V0_2_0(_) => false,
            Pre::V0_3_0(pre) => pre.takes_resume(),
        }
    }
}

impl Instance {
    /// Calls the export for `call`. The outer error is a trap; the inner
    /// one the plugin's own `err`.
    async fn call(
        &self,
        store: &mut Store<HostState>,
        call: &Call<'_>,
    ) -> wasmtime::Result<Result<Vec<Action>, String>> {
        match self {
            Instance::V0_1_0(bot) => v0_1_0::call(bot, store, call).await,
            Instance::V0_2_0(bot) => v0_2_0::call(bot, store, call).await,
            Instance::V0_3_0(bot) => bot.call(store, call).await,
        }
    }
}

/// Background work kept off the event path.
enum Chore {
    /// Bring a plugin's warm pool up to its target.
    Refill(Arc<WarmPool>),
    /// Drop a used store (resetting a pool slot costs microseconds).
    Drop(Box<Store<HostState>>),
}

impl Plugin {
    /// Whether the plugin exports `on-timer` and so can be told its timers
    /// came due (0.3.0's `bot-with-timers` world: the SDK's).
    pub fn takes_timers(&self) -> bool {
        self.warm.pre.takes_timers()
    }

    /// Whether the plugin exports `on-resume`: only those are told a human
    /// handed a conversation back.
    pub fn takes_resume(&self) -> bool {
        self.warm.pre.takes_resume()
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .field("wit_version", &self.wit_version)
            .finish_non_exhaustive()
    }
}

/// What to call on a plugin, with the event it comes from and the state of
/// its conversation when the event is handled.
pub enum Call<'a> {
    NewConversation {
        event_id: &'a str,
        conversation: &'a event::Conversation,
        state: event::ConversationState,
    },
    Message {
        event_id: &'a str,
        message: &'a event::Message,
        /// The customer's earlier messages of a debounced burst, oldest
        /// first (empty unless the plugin has `debounce_ms`).
        burst: &'a [event::Message],
        state: event::ConversationState,
    },
    /// A timer the plugin scheduled came due: only that plugin is called.
    Timer {
        event_id: &'a str,
        timer: &'a digibot_domain::timer::TimerFired,
        state: event::ConversationState,
    },
    /// A human handed the conversation back: plugins exporting
    /// `on-resume` are called.
    Resume {
        event_id: &'a str,
        resumed: &'a digibot_domain::resume::Resumed,
        state: event::ConversationState,
    },
}

impl<'a> Call<'a> {
    /// The call for `event`, if plugins handle it, in a conversation that
    /// is in `state`.
    pub fn for_event(event: &event::Event, state: event::ConversationState) -> Option<Call<'_>> {
        if !event.invokes_plugins() {
            return None;
        }
        match &event.kind {
            event::EventKind::NewConversation(conversation) => Some(Call::NewConversation {
                event_id: &event.key,
                conversation,
                state,
            }),
            event::EventKind::Message(message) => Some(Call::Message {
                event_id: &event.key,
                message,
                burst: &[],
                state,
            }),
            event::EventKind::Timer(timer) => Some(Call::Timer {
                event_id: &event.key,
                timer,
                state,
            }),
            event::EventKind::Resumed(resumed) => Some(Call::Resume {
                event_id: &event.key,
                resumed,
                state,
            }),
            _ => None,
        }
    }

    /// This message call with the earlier messages of its debounced burst
    /// (oldest first); any other call unchanged.
    pub fn with_burst(self, earlier: &'a [event::Message]) -> Call<'a> {
        match self {
            Call::Message {
                event_id,
                message,
                state,
                ..
            } => Call::Message {
                event_id,
                message,
                burst: earlier,
                state,
            },
            other => other,
        }
    }

    /// The dedup key of the event the call comes from.
    pub fn event_id(&self) -> &str {
        match self {
            Call::NewConversation { event_id, .. }
            | Call::Message { event_id, .. }
            | Call::Timer { event_id, .. }
            | Call::Resume { event_id, .. } => event_id,
        }
    }

    /// The conversation's state the plugin is told about.
    pub fn state(&self) -> event::ConversationState {
        match self {
            Call::NewConversation { state, .. }
            | Call::Message { state, .. }
            | Call::Timer { state, .. }
            | Call::Resume { state, .. } => *state,
        }
    }

    pub fn filter(&self) -> EventFilter {
        match self {
            Call::NewConversation { .. } => EventFilter::NewConversation,
            Call::Message { .. } => EventFilter::Message,
            Call::Timer { .. } => EventFilter::Timer,
            Call::Resume { .. } => EventFilter::Resume,
        }
    }

    /// The customer's id, when the event says it (see
    /// [`event::Event::customer_id`]).
    pub fn customer_id(&self) -> Option<&str> {
        let id = match self {
            Call::NewConversation { conversation, .. } => Some(conversation.customer_id.as_str()),
            Call::Message { message, .. } if message.sender.kind == event::SenderKind::Customer => {
                message.sender.model_id.as_deref()
            }
            _ => None,
        };
        id.filter(|id| !id.is_empty())
    }

    pub fn conversation_id(&self) -> &str {
        match self {
            Call::NewConversation { conversation, .. } => &conversation.id,
            Call::Message { message, .. } => &message.conversation_id,
            Call::Timer { timer, .. } => &timer.conversation_id,
            Call::Resume { resumed, .. } => &resumed.conversation_id,
        }
    }
}

/// The engine and linker, shared by every plugin.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    compat: String,
    pooling: bool,
    ticker_stop: Arc<AtomicBool>,
    janitor: Arc<Janitor>,
    janitor_thread: std::thread::Thread,
    janitor_handle: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Warm instances across all plugins, capped so that warm pools never
    /// take the pool slots invocations need.
    warm_total: Arc<AtomicUsize>,
    /// Used stores queued for the janitor to drop. Each holds a pool slot,
    /// so past `drop_cap` the caller drops its store itself (backpressure).
    pending_drops: Arc<AtomicUsize>,
    drop_cap: usize,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        self.janitor.stop.store(true, Ordering::Release);
        self.janitor_thread.unpark();
        // Wait for it: no plugin code may run while the process exits.
        if let Some(handle) = self.janitor_handle.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
    }
}

/// How long the janitor naps when it has nothing to do. Chores are queued
/// without waking it (a wake-up is a syscall on the event path); it picks
/// them up within this delay, or at once when woken because a warm pool
/// ran dry.
const JANITOR_NAP: Duration = Duration::from_millis(1);

/// The janitor's queue of chores.
#[derive(Default)]
struct Janitor {
    queue: Mutex<Vec<Chore>>,
    stop: AtomicBool,
}

fn engine_config(config: &RuntimeConfig, pooling: bool) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true);
    c.consume_fuel(config.fuel);
    if !config.optimized_code {
        c.cranelift_regalloc_algorithm(wasmtime::RegallocAlgorithm::SinglePass);
    }
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        let n = config.pool_instances;
        let caps = &config.defaults;
        let cap = |c: usize| u32::try_from(c).unwrap_or(u32::MAX);
        pool.total_component_instances(n)
            // A component over these is refused when it is compiled.
            .max_core_instances_per_component(cap(caps.core_instances))
            .max_memories_per_component(cap(caps.memories))
            .max_tables_per_component(cap(caps.tables))
            // Every component instance slot has room for a whole
            // component at those caps: one plugin's instances cannot take
            // the memories, tables or core instances another plugin needs
            // (component instances are the pool's only scarce unit).
            .total_core_instances(n.saturating_mul(cap(caps.core_instances)))
            .total_memories(n.saturating_mul(cap(caps.memories)))
            .total_tables(n.saturating_mul(cap(caps.tables)))
            // An async call runs on a fiber stack from the pool: one per
            // turn (or instantiation) in flight.
            .total_stacks(n)
            .max_memory_size(config.max_memory_bytes)
            // Keeping the first pages resident avoids a page fault storm
            // in every fresh instance; measured in BENCHMARKS.md.
            .linear_memory_keep_resident(config.keep_resident)
            .table_keep_resident(16 << 10)
            // Reset only the pages a turn made resident (Linux 6.7+'s
            // PAGEMAP_SCAN; elsewhere the plain reset): a turn touches a
            // few of the kept pages, and zeroing all of them was the
            // janitor's biggest cost under load (BENCHMARKS.md, issue 20).
            .pagemap_scan(wasmtime::Enabled::Auto);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    c
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Runtime, wasmtime::Error> {
        let (engine, pooling) = match config.pooling {
            true => match Engine::new(&engine_config(&config, true)) {
                Ok(engine) => (engine, true),
                Err(e) => {
                    tracing::warn!(error = %e, "pooling allocator unavailable, using on-demand instances");
                    (Engine::new(&engine_config(&config, false))?, false)
                }
            },
            false => (Engine::new(&engine_config(&config, false))?, false),
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        clock::shadow_monotonic_clock(&mut linker)?;
        // Each version's imports carry its version in their names
        // (`digishare:bot/kv@0.1.0`, `@0.2.0`): they coexist in one linker.
        v0_1_0::add_to_linker(&mut linker)?;
        v0_2_0::add_to_linker(&mut linker)?;
        v0_3_0::add_to_linker(&mut linker)?;
        v0_3_0::add_scoped_kv_to_linker(&mut linker)?;
        v0_3_0::add_outbound_to_linker(&mut linker)?;
        v0_3_0::add_timers_to_linker(&mut linker)?;
        v0_3_0::add_conversation_to_linker(&mut linker)?;
        // Outbound HTTP: every request reaches `outbound::HttpTurn`.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!("{:016x}", hasher.finish());

        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("digibot-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?;
        }
        // The instance pool's budget: a quarter for warm instances, a
        // quarter for stores waiting to be dropped, half for invocations
        // (the server runs at most that many at once).
        let janitor = Arc::new(Janitor::default());
        let warm_total = Arc::new(AtomicUsize::new(0));
        let pending_drops = Arc::new(AtomicUsize::new(0));
        let quarter = (config.pool_instances as usize / 4).max(1);
        // Instantiation is async (the linker's host functions are): the
        // janitor drives it on a current-thread runtime of its own, so warm
        // instances never take a worker of the caller's runtime.
        let janitor_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let janitor_handle = {
            let engine = engine.clone();
            let janitor = janitor.clone();
            let warm_total = warm_total.clone();
            let pending_drops = pending_drops.clone();
            std::thread::Builder::new()
                .name("digibot-janitor".into())
                .spawn(move || {
                    janitor_loop(
                        &janitor_runtime,
                        &engine,
                        &janitor,
                        &warm_total,
                        &pending_drops,
                        quarter,
                    )
                })?
        };
        let janitor_thread = janitor_handle.thread().clone();
        Ok(Runtime {
            engine,
            linker,
            config,
            compat,
            pooling,
            ticker_stop,
            janitor,
            janitor_thread,
            janitor_handle: Mutex::new(Some(janitor_handle)),
            warm_total,
            pending_drops,
            drop_cap: quarter,
        })
    }

    /// Whether the pooling allocator is in use.
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// Host-wide default limits.
    pub fn default_limits(&self) -> &Limits {
        &self.config.defaults
    }

    fn compile(&self, hash: &str, bytes: &[u8]) -> Result<(Component, bool), LoadError> {
        let cached_path = self
            .config
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{hash}-{}.cwasm", self.compat)));
        if let Some(path) = cached_path.as_ref().filter(|p| p.exists()) {
            // Read, not mmap: a cache file changed in place under a mapping
            // would crash the process (SIGBUS) at the next instantiation.
            let loaded = private_file(path)
                .and_then(|()| std::fs::read(path))
                .map_err(wasmtime::Error::from)
                .and_then(|bytes| {
                    // SAFETY: deserializing runs the file's native code
                    // later, so the file must be one digibot wrote. It is:
                    // only this user can write it (`private_file` refuses a
                    // file or folder others could write; `write_cache`
                    // creates the folder 0700 and the file 0600, under a
                    // data folder `serve` creates 0700), its name carries
                    // the engine's compatibility hash, and wasmtime still
                    // checks its header and version.
                    #[allow(unsafe_code)]
                    unsafe {
                        Component::deserialize(&self.engine, &bytes)
                    }
                });
            match loaded {
                Ok(component) => return Ok((component, true)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "dropping a bad cache entry");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let component =
            Component::new(&self.engine, bytes).map_err(|e| LoadError::from_compile(&e))?;
        if let Some(path) = cached_path
            && let Err(e) = write_cache(&path, &component)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache a compiled plugin");
        }
        Ok((component, false))
    }

    /// Refuses a component with more memories or tables than a plugin may
    /// have. The pooling allocator already refused it when compiling (and
    /// counts core instances too); this is for the on-demand allocator,
    /// whose store limiter counts core instances at instantiation.
    fn check_size(&self, component: &Component) -> Result<(), LoadError> {
        let caps = &self.config.defaults;
        let Some(needs) = component.resources_required() else {
            return Ok(());
        };
        for (what, found, max) in [
            (
                "linear memories",
                needs.num_memories as usize,
                caps.memories,
            ),
            ("tables", needs.num_tables as usize, caps.tables),
        ] {
            if found > max {
                return Err(LoadError::TooLarge { what, found, max });
            }
        }
        Ok(())
    }

    /// Validates and compiles a plugin: a component, for a supported
    /// `digishare:bot` version, importing only what the host provides.
    pub fn load(&self, name: &str, bytes: &[u8], manifest: Manifest) -> Result<Plugin, LoadError> {
        if !is_plain_name(name) {
            return Err(LoadError::BadName(name.to_string()));
        }
        // A component's preamble: magic, then version 0x0d and layer 1.
        if bytes.len() < 8 || &bytes[0..4] != b"\0asm" || bytes[6..8] != [1, 0] {
            return Err(LoadError::NotAComponent);
        }
        let hash = hex::encode(Sha256::digest(bytes));
        let started = Instant::now();
        let (component, cached) = self.compile(&hash, bytes)?;
        let compile_time = started.elapsed();
        self.check_size(&component)?;

        let imports: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let wit_version = wit_version(&imports)?;
        let refused: Vec<String> = imports
            .iter()
            .filter(|i| {
                !i.starts_with("digishare:bot/") && !ALLOWED_WASI.iter().any(|p| i.starts_with(p))
            })
            .cloned()
            .collect();
        if !refused.is_empty() {
            return Err(LoadError::RefusedImports(refused));
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Link(format!("{e:#}")))?;
        let pre = Pre::new(wit_version, pre)?;
        let (limits, capped) = self.config.limits(&manifest);
        for c in capped {
            tracing::warn!(
                plugin = name,
                limit = c.limit,
                asked = c.asked,
                ceiling = c.ceiling,
                "plugin {name}: {name}.toml {c}"
            );
        }
        let http = Arc::new(HttpPolicy {
            grants: manifest.grants.http.clone(),
            secrets: manifest.grants.secrets.iter().cloned().collect(),
            limits: limits.http.clone(),
        });
        let warm = Arc::new(WarmPool {
            pre,
            name: Arc::from(name),
            config: Arc::new(manifest.config.clone()),
            limits: limits.clone(),
            grants: manifest.grants.clone(),
            http: http.clone(),
            ready: Mutex::new(Vec::new()),
            target: if manifest.enabled {
                self.config.warm_instances
            } else {
                0
            },
            fuel: self.config.fuel,
            refill_queued: AtomicBool::new(false),
        });
        self.refill(&warm, true);
        Ok(Plugin {
            name: name.to_string(),
            hash,
            wit_version,
            manifest,
            limits,
            http,
            imports,
            size: bytes.len(),
            compile_time,
            cached,
            warm,
        })
    }

    /// Loads `path` (a `.wasm`) with its manifest.
    pub fn load_file(&self, path: &Path, manifest: Manifest) -> Result<Plugin, LoadFileError> {
        let bytes = std::fs::read(path).map_err(|source| LoadFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.load(&plugin_name(path), &bytes, manifest)
            .map_err(|source| LoadFileError::Load {
                path: path.to_path_buf(),
                source,
            })
    }

    /// Queues a chore; `urgent` also wakes the janitor.
    fn chore(&self, chore: Chore, urgent: bool) {
        if let Ok(mut queue) = self.janitor.queue.lock() {
            queue.push(chore);
        }
        if urgent {
            self.janitor_thread.unpark();
        }
    }

    fn refill(&self, pool: &Arc<WarmPool>, urgent: bool) {
        if pool.target > 0 && !pool.refill_queued.swap(true, Ordering::AcqRel) {
            self.chore(Chore::Refill(pool.clone()), urgent);
        }
    }

    fn discard(&self, store: Store<HostState>) {
        let queued = self.pending_drops.fetch_add(1, Ordering::AcqRel);
        if queued < self.drop_cap {
            self.chore(Chore::Drop(Box::new(store)), queued >= self.drop_cap / 2);
        } else {
            self.pending_drops.fetch_sub(1, Ordering::AcqRel);
            drop(store);
        }
    }

    /// Warm instances currently held across all plugins.
    pub fn warm_instances(&self) -> usize {
        self.warm_total.load(Ordering::Relaxed)
    }

    /// A never-called warm instance of `plugin`, if one is ready; asks the
    /// janitor for more when the pool runs low (or dry).
    fn take_warm(&self, plugin: &Plugin) -> Option<Ready> {
        let warm = plugin
            .warm
            .ready
            .lock()
            .ok()
            .and_then(|mut ready| ready.pop());
        match warm {
            Some(ready) => {
                self.warm_total.fetch_sub(1, Ordering::Relaxed);
                let left = plugin.warm.ready.lock().map_or(0, |r| r.len());
                self.refill(&plugin.warm, left <= plugin.warm.target / 2);
                Some(ready)
            }
            None => {
                self.refill(&plugin.warm, true);
                None
            }
        }
    }

    /// Runs `call` on a fresh instance of `plugin`: a turn, within the
    /// plugin's compute and wall budgets (instantiation included when no
    /// warm instance is ready). Never panics on anything the plugin does;
    /// every failure comes back as a [`Failure`]. Its HTTP requests are
    /// refused ([`NoHttp`]): see [`invoke_with_http`](Self::invoke_with_http).
    ///
    /// Call it inside a tokio runtime with timers enabled. A turn that
    /// waits on a host call holds no thread while it waits.
    pub async fn invoke(
        &self,
        plugin: &Plugin,
        call: &Call<'_>,
        kv: Arc<dyn KvRead>,
    ) -> Invocation {
        let offline = Arc::new(NoHttp("on this host (it runs plugins without a network)"));
        self.invoke_with_http(plugin, call, kv, offline).await
    }

    /// [`invoke`](Self::invoke), its HTTP requests sent through `http`: a
    /// turn waiting on one holds no thread.
    pub async fn invoke_with_http(
        &self,
        plugin: &Plugin,
        call: &Call<'_>,
        kv: Arc<dyn KvRead>,
        http: Arc<dyn OutboundHttp>,
    ) -> Invocation {
        let started = Instant::now();
        let (mut store, warm) = match self.take_warm(plugin) {
            Some(Ready { store, bot }) => (store, Some(bot)),
            None => (plugin.warm.new_store(&self.engine), None),
        };
        store.data_mut().bind(
            call.event_id(),
            call.conversation_id(),
            call.customer_id(),
            kv,
            self.config.kv_quotas,
            http,
        );
        let armed = plugin.warm.arm(&mut store);
        let meter = store.data().meter.clone();
        let pre = &plugin.warm.pre;
        let result = budget::within(&meter, &plugin.limits, async {
            armed?;
            let bot = match warm {
                Some(bot) => bot,
                None => pre.instantiate(&mut store).await.map_err(Instantiation)?,
            };
            bot.call(&mut store, call).await
        })
        .await;
        let elapsed = started.elapsed();
        let (output, cut) = store.data().stdio.contents();
        let outcome = match result {
            Ok(Ok(Ok(actions))) => check_actions(actions, &plugin.limits),
            Ok(Ok(Err(message))) if store.data().refused.contains(&message) => {
                Err(Failure::Refused(message))
            }
            Ok(Ok(Err(message))) => Err(Failure::Error(message)),
            Ok(Err(trap)) => Err(classify(&trap, store.data(), &output, &plugin.limits)),
            Err(budget) => Err(Failure::Timeout(budget)),
        };
        let state = store.data_mut();
        let kv_writes = std::mem::take(&mut state.kv_writes);
        let timer_ops = std::mem::take(&mut state.timer_ops);
        let logs = std::mem::take(&mut state.logs);
        let refused = std::mem::take(&mut state.refused);
        let logs_dropped = state.logs_dropped + cut;
        let calls = state
            .http_turn
            .log
            .lock()
            .map(|mut log| std::mem::take(&mut log.calls))
            .unwrap_or_default();
        // Requests finish in any order: the record lists them as made.
        let mut calls = calls;
        calls.sort_by_key(|c| c.call);
        // Finished or cut short, the instance is never entered again.
        self.discard(store);
        Invocation {
            calls,
            kv_writes: if outcome.is_ok() {
                kv_writes
            } else {
                Vec::new()
            },
            timer_ops: if outcome.is_ok() {
                timer_ops
            } else {
                Vec::new()
            },
            logs,
            refused,
            logs_dropped,
            output,
            outcome,
            elapsed,
        }
    }
}

/// An instantiation that failed on the event path (no warm instance was
/// ready): reported as such, not as the plugin's own trap.
#[derive(Debug)]
struct Instantiation(wasmtime::Error);

impl std::fmt::Display for Instantiation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "instantiation failed: {:#}", self.0)
    }
}

impl std::error::Error for Instantiation {}

impl WarmPool {
    /// A store for one instance of this plugin, not yet bound to an event.
    fn new_store(&self, engine: &Engine) -> Store<HostState> {
        let state = HostState::new(
            self.name.clone(),
            self.config.clone(),
            &self.limits,
            &self.grants,
            self.http.clone(),
        );
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limiter);
        // Every tick of guest code: yield to the executor (other turns and
        // the budget check run), then carry on for one more tick.
        store.epoch_deadline_callback(|store| {
            store.data().meter.mark_yield();
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        store
    }

    /// Sets the store up for the next stretch of guest code (an
    /// instantiation, or the call): the first yield one tick away, fuel.
    fn arm(&self, store: &mut Store<HostState>) -> wasmtime::Result<()> {
        store.set_epoch_deadline(1);
        if self.fuel {
            store.set_fuel(self.limits.fuel.unwrap_or(u64::MAX))?;
        }
        Ok(())
    }

    /// A warm instance, made on the janitor's thread: instantiation runs
    /// the guest's start-up code, within the plugin's budgets too.
    fn instantiate_on(&self, runtime: &tokio::runtime::Runtime, engine: &Engine) -> Option<Ready> {
        let mut store = self.new_store(engine);
        self.arm(&mut store).ok()?;
        let meter = store.data().meter.clone();
        let bot = runtime
            .block_on(budget::within(
                &meter,
                &self.limits,
                self.pre.instantiate(&mut store),
            ))
            .ok()?
            .ok()?;
        Some(Ready { store, bot })
    }
}

fn janitor_loop(
    runtime: &tokio::runtime::Runtime,
    engine: &Engine,
    janitor: &Janitor,
    warm_total: &AtomicUsize,
    pending_drops: &AtomicUsize,
    warm_cap: usize,
) {
    loop {
        let chores = janitor
            .queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        if chores.is_empty() {
            if janitor.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::park_timeout(JANITOR_NAP);
            continue;
        }
        // Drops first: they free the pool slots refills need. Once the
        // runtime is stopping, refills are skipped.
        let (drops, mut refills): (Vec<Chore>, Vec<Chore>) = chores
            .into_iter()
            .partition(|c| matches!(c, Chore::Drop(_)));
        if janitor.stop.load(Ordering::Acquire) {
            refills.clear();
        }
        for chore in drops.into_iter().chain(refills) {
            match chore {
                Chore::Drop(store) => {
                    drop(store);
                    pending_drops.fetch_sub(1, Ordering::AcqRel);
                }
                Chore::Refill(pool) => {
                    pool.refill_queued.store(false, Ordering::Release);
                    loop {
                        let have = pool.ready.lock().map(|r| r.len()).unwrap_or(usize::MAX);
                        if have >= pool.target || warm_total.load(Ordering::Relaxed) >= warm_cap {
                            break;
                        }
                        match pool.instantiate_on(runtime, engine) {
                            Some(ready) => {
                                warm_total.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut r) = pool.ready.lock() {
                                    r.push(ready);
                                }
                            }
                            // The event path will instantiate (and report) itself.
                            None => break,
                        }
                    }
                }
            }
        }
    }
}

/// Whether `name` is a plain plugin name (ASCII letters, digits, `-`,
/// `_`; not empty), safe to join to a folder path or put in a URL.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A plugin's name: its file name without `.wasm`.
pub fn plugin_name(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string()
}

/// Why [`Runtime::load_file`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Load { path: PathBuf, source: LoadError },
}

/// Writes a compiled component to the cache: the folder 0700, the file
/// 0600, so that only this user can ever have written what
/// [`Runtime::compile`] deserializes.
fn write_cache(path: &Path, component: &Component) -> std::io::Result<()> {
    let bytes = component
        .serialize()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if let Some(dir) = path.parent() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir)?;
        // A cache folder from before (created with the umask): ours, so
        // tightened rather than left for `private_file` to refuse.
        #[cfg(unix)]
        {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let meta = std::fs::metadata(dir)?;
            if meta.uid() == rustix::process::geteuid().as_raw() && meta.mode() & 0o077 != 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
    }
    // Write then rename, so a reader never sees half a file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(&tmp)?, &bytes)?;
    std::fs::rename(tmp, path)
}

/// Fails unless `path` and its folder belong to this user and nobody
/// else can write them (the cache's files are loaded as native code: see
/// [`Runtime::compile`]).
fn private_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let me = rustix::process::geteuid().as_raw();
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [path, dir] {
            let meta = std::fs::metadata(p)?;
            if meta.uid() != me || meta.mode() & 0o022 != 0 {
                return Err(std::io::Error::other(format!(
                    "{} belongs to another user or others can write it (mode {:o}): not loading native code from it",
                    p.display(),
                    meta.mode() & 0o777
                )));
            }
        }
    }
    Ok(())
}

/// The `digishare:bot` version a component was built against, read from
/// its imports (the `types` interface is always imported, if only for its
/// types).
fn wit_version(imports: &[String]) -> Result<&'static str, LoadError> {
    let found = imports
        .iter()
        .find_map(|i| i.strip_prefix("digishare:bot/"))
        .ok_or(LoadError::NotABot)?;
    let version = found.split_once('@').map(|(_, v)| v).unwrap_or("");
    SUPPORTED_WIT
        .iter()
        .find(|v| **v == version)
        .copied()
        .ok_or_else(|| LoadError::UnsupportedVersion {
            found: version.to_string(),
        })
}

fn check_actions(actions: Vec<Action>, limits: &Limits) -> Result<Vec<Action>, Failure> {
    if actions.len() > limits.max_actions {
        return Err(Failure::TooManyActions {
            count: actions.len(),
            max: limits.max_actions,
        });
    }
    let bytes: usize = actions.iter().map(Action::payload_len).sum();
    if bytes > limits.max_action_bytes {
        return Err(Failure::ActionsTooLarge {
            bytes,
            max: limits.max_action_bytes,
        });
    }
    Ok(actions)
}

fn classify(error: &wasmtime::Error, state: &HostState, output: &str, limits: &Limits) -> Failure {
    if let Some(failed) = error.downcast_ref::<Instantiation>() {
        return Failure::Trap(failed.to_string());
    }
    match error.downcast_ref::<Trap>() {
        // Budgets stop turns from outside; an interrupt can only be the
        // engine's own epoch check.
        Some(Trap::Interrupt) => return Failure::Timeout(Budget::Compute(limits.compute)),
        Some(Trap::OutOfFuel) => return Failure::Fuel,
        _ => {}
    }
    if let Some(limit) = error.downcast_ref::<state::HostLimit>() {
        return Failure::Limit(limit.0.clone());
    }
    if state.limiter.memory_refused {
        return Failure::Memory;
    }
    let mut reason = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{}", error.root_cause()),
    };
    // A Rust guest prints "thread '..' panicked at FILE:LINE:COL:" and then
    // its message to stderr before trapping.
    let mut lines = output.lines();
    if let Some(at) = lines.find(|l| l.contains("panicked at")) {
        let location = at
            .split("panicked at ")
            .nth(1)
            .unwrap_or(at)
            .trim_end_matches(':');
        let message = lines.next().unwrap_or("").trim();
        reason = format!("{reason} (panicked at {location}: {message})");
    }
    // A Python guest prints a traceback whose last line names the exception
    // (componentize-py then panics in its own runtime, which says nothing).
    if let Some((_, traceback)) = output.split_once("Traceback (most recent call last)") {
        let before_panic = traceback.split("thread '").next().unwrap_or(traceback);
        if let Some(exception) = before_panic.lines().map(str::trim).rfind(|l| !l.is_empty()) {
            reason = format!("{reason} ({exception})");
        }
    }
    Failure::Trap(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_grant_gives_the_network_wall_clock_default() {
        let config = RuntimeConfig::default();
        let plain = config.limits(&Manifest::parse("").unwrap()).0;
        assert_eq!(plain.wall, Duration::from_millis(100));
        let granted = Manifest::parse("[grants]\nhttp = [\"https://api.shop.example\"]").unwrap();
        let limits = config.limits(&granted).0;
        assert_eq!(limits.wall, config.network_wall);
        // The compute budget does not grow with it.
        assert_eq!(limits.compute, plain.compute);
        // `[limits]` still decides, within the ceilings.
        let m = Manifest::parse(
            "[grants]\nhttp = [\"https://a.example\"]\n[limits]\nwall_ms = 999999\nhttp_calls = 100000\n",
        )
        .unwrap();
        let limits = config.limits(&m).0;
        assert_eq!(limits.wall, config.max_wall);
        assert_eq!(limits.http.calls, config.http_ceilings.calls);
    }
}
