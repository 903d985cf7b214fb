//! What a plugin can touch during one invocation: the `Store` data. It is
//! built for exactly one plugin and one conversation, so host functions have
//! no way to reach another plugin's config or another conversation's state.

use super::budget::Meter;
use super::clock::{FrozenWallClock, VirtualClock};
use super::manifest::{Grants, Limits};
use super::outbound::{HttpTurn, OutboundHttp, RefusalView};
use super::stdio::CappedPipe;
use digibot_domain::kv::KvWrite;
use digibot_domain::outbound::HttpPolicy;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Longest KV key a plugin may use, in bytes.
pub const KV_KEY_MAX: usize = 256;
/// Largest KV value, in bytes.
pub const KV_VALUE_MAX: usize = 64 << 10;
/// KV writes one invocation may make.
pub const KV_WRITES_MAX: usize = 256;

/// Where a plugin's KV reads come from: the store in the server, an
/// in-memory map in `replay` and `chat`. Async: a turn waiting on the
/// store holds no thread (and the wait counts against its wall clock, not
/// its compute budget).
#[async_trait::async_trait]
pub trait KvRead: Send + Sync {
    async fn get(&self, plugin: &str, conversation_id: &str, key: &str) -> Option<String>;
}

/// Before an instance is bound to an event it can read no state.
struct NoKv;

#[async_trait::async_trait]
impl KvRead for NoKv {
    async fn get(&self, _: &str, _: &str, _: &str) -> Option<String> {
        None
    }
}

/// An in-memory [`KvRead`] that can apply an invocation's writes.
#[derive(Default)]
pub struct MemoryKv(std::sync::Mutex<HashMap<(String, String, String), String>>);

impl MemoryKv {
    /// Forgets every plugin's state for one conversation.
    pub fn clear_conversation(&self, conversation_id: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|(_, conversation, _), _| conversation != conversation_id);
        }
    }

    pub fn apply(&self, plugin: &str, conversation_id: &str, writes: &[KvWrite]) {
        let Ok(mut map) = self.0.lock() else { return };
        for w in writes {
            match w {
                KvWrite::Set { key, value } => {
                    map.insert(
                        (plugin.into(), conversation_id.into(), key.clone()),
                        value.clone(),
                    );
                }
                KvWrite::Delete { key } => {
                    map.remove(&(plugin.into(), conversation_id.into(), key.clone()));
                }
            }
        }
    }

    /// The value `plugin` keeps under `key` in `conversation_id`.
    pub fn value(&self, plugin: &str, conversation_id: &str, key: &str) -> Option<String> {
        let map = self.0.lock().ok()?;
        map.get(&(plugin.into(), conversation_id.into(), key.into()))
            .cloned()
    }
}

#[async_trait::async_trait]
impl KvRead for MemoryKv {
    async fn get(&self, plugin: &str, conversation_id: &str, key: &str) -> Option<String> {
        self.value(plugin, conversation_id, key)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// One line a plugin logged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

/// Enforces the memory, table and instance caps, and remembers which one
/// refused, so a trap that follows can be reported as `memory`.
pub struct Limiter {
    memory_bytes: usize,
    table_elements: usize,
    instances: usize,
    pub memory_refused: bool,
    pub table_refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.memory_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.table_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.instances
    }
    fn tables(&self) -> usize {
        self.instances
    }
    fn memories(&self) -> usize {
        self.instances
    }
}

/// The `Store` data of one invocation.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// `None` when the plugin is granted the real clocks.
    virtual_clock: Option<VirtualClock>,
    /// What the turn's budgets read: see `budget`.
    pub(super) meter: Arc<Meter>,
    pub(super) limiter: Limiter,
    pub(super) stdio: CappedPipe,
    plugin: Arc<str>,
    conversation_id: String,
    config: Arc<BTreeMap<String, String>>,
    kv: Arc<dyn KvRead>,
    kv_view: HashMap<String, Option<String>>,
    pub(super) kv_writes: Vec<KvWrite>,
    pub(super) logs: Vec<LogLine>,
    log_bytes: usize,
    log_cap: usize,
    pub(super) logs_dropped: usize,
    http: WasiHttpCtx,
    pub(super) http_turn: HttpTurn,
}

impl HostState {
    /// State for an instance of `plugin` not yet bound to an event; see
    /// [`bind`](Self::bind).
    pub(super) fn new(
        plugin: Arc<str>,
        config: Arc<BTreeMap<String, String>>,
        limits: &Limits,
        grants: &Grants,
        http: Arc<HttpPolicy>,
    ) -> HostState {
        let stdio = CappedPipe::new(limits.max_log_bytes);
        // No preopens, no environment, no arguments, no network: the
        // builder's defaults, made explicit where a default could change.
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdio.clone())
            .stderr(stdio.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        let virtual_clock = (!grants.clock).then(VirtualClock::default);
        if let Some(clock) = &virtual_clock {
            wasi.wall_clock(FrozenWallClock)
                .monotonic_clock(clock.clone());
        }
        let plugin_name = plugin.clone();
        HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            virtual_clock,
            meter: Arc::new(Meter::default()),
            limiter: Limiter {
                memory_bytes: limits.memory_bytes,
                table_elements: limits.table_elements,
                instances: limits.instances,
                memory_refused: false,
                table_refused: false,
            },
            stdio,
            plugin,
            conversation_id: String::new(),
            config,
            kv: Arc::new(NoKv),
            kv_view: HashMap::new(),
            kv_writes: Vec::new(),
            logs: Vec::new(),
            log_bytes: 0,
            log_cap: limits.max_log_bytes,
            logs_dropped: 0,
            http: WasiHttpCtx::new(),
            http_turn: HttpTurn::new(plugin_name, http),
        }
    }

    /// Binds the instance to the event it will serve: its conversation
    /// (the only one its KV reads and writes can reach), the KV source, and
    /// where its HTTP requests go (numbered for that event).
    pub(super) fn bind(
        &mut self,
        event_id: &str,
        conversation_id: &str,
        kv: Arc<dyn KvRead>,
        http: Arc<dyn OutboundHttp>,
    ) {
        self.conversation_id = conversation_id.to_string();
        self.kv = kv;
        self.http_turn.bind(event_id, http);
    }

    /// Why this turn's latest HTTP request was refused, if one was.
    pub(super) fn http_refusal(&self) -> Option<RefusalView> {
        self.http_turn
            .log
            .lock()
            .ok()
            .and_then(|log| log.last_refusal.clone())
    }

    pub(super) fn log(&mut self, level: LogLevel, message: &str) {
        if self.log_bytes + message.len() > self.log_cap {
            self.logs_dropped += 1;
            return;
        }
        self.log_bytes += message.len();
        self.logs.push(LogLine {
            level,
            message: message.to_string(),
        });
    }

    pub(super) fn config_get(&self, key: &str) -> Option<String> {
        self.config.get(key).cloned()
    }

    /// Reads see this invocation's own writes first.
    pub(super) async fn kv_get(&mut self, key: &str) -> Option<String> {
        if let Some(v) = self.kv_view.get(key) {
            return v.clone();
        }
        let value = self.kv.get(&self.plugin, &self.conversation_id, key).await;
        self.kv_view.insert(key.to_string(), value.clone());
        value
    }

    pub(super) fn kv_set(&mut self, key: String, value: String) -> Result<(), String> {
        if key.is_empty() || key.len() > KV_KEY_MAX {
            return Err(format!("kv key must be 1 to {KV_KEY_MAX} bytes"));
        }
        if value.len() > KV_VALUE_MAX {
            return Err(format!(
                "kv value is {} bytes, the limit is {KV_VALUE_MAX}",
                value.len()
            ));
        }
        if self.kv_writes.len() >= KV_WRITES_MAX {
            return Err(format!("more than {KV_WRITES_MAX} kv writes in one event"));
        }
        self.kv_view.insert(key.clone(), Some(value.clone()));
        self.kv_writes.push(KvWrite::Set { key, value });
        Ok(())
    }

    pub(super) fn kv_delete(&mut self, key: String) {
        if self.kv_writes.len() >= KV_WRITES_MAX {
            return;
        }
        self.kv_view.insert(key.clone(), None);
        self.kv_writes.push(KvWrite::Delete { key });
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_turn,
        }
    }
}

impl HostState {
    /// The turn's virtual monotonic clock; `None` with the clock grant.
    pub(super) fn virtual_clock(&self) -> Option<&VirtualClock> {
        self.virtual_clock.as_ref()
    }

    /// The virtual clock with the resource table, for the clock shadow
    /// (which pushes its ready pollables there). Only called when
    /// [`virtual_clock`](Self::virtual_clock) is some.
    pub(super) fn virtual_clock_and_table(&mut self) -> (&VirtualClock, &mut ResourceTable) {
        let clock = self.virtual_clock.get_or_insert_with(VirtualClock::default);
        (clock, &mut self.table)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}
