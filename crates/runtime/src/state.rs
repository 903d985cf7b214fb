//! What a plugin can touch during one invocation: the `Store` data. It is
//! built for exactly one plugin and one conversation (and that
//! conversation's customer), so host functions have no way to reach another
//! plugin's config or state, another conversation's or another customer's.

use super::budget::Meter;
use super::clock::{FrozenWallClock, VirtualClock};
use super::manifest::{Grants, Limits};
use super::outbound::{HttpTurn, OutboundHttp, RefusalView};
use super::stdio::CappedPipe;
use digibot_domain::kv::{self as dkv, KvQuotas, KvScope, KvSize, KvUsage, KvWrite, Scope};
use digibot_domain::outbound::HttpPolicy;
use digibot_domain::timer::{self, TimerOp};
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
/// Distinct keys one invocation may read from the store (each is a store
/// lookup, and its value is kept for the rest of the turn).
pub const KV_READS_MAX: usize = 256;
/// Refusals kept per invocation (the rest are counted, not kept).
const REFUSALS_KEPT: usize = 16;

/// A host call whose argument is past its bound, on a call with no error
/// to return: the host stops the turn with it (reason `limit: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HostLimit(pub String);

/// Where a plugin's KV reads come from: the store in the server, an
/// in-memory map in `replay` and `chat`. Async: a turn waiting on the
/// store holds no thread (and the wait counts against its wall clock, not
/// its compute budget).
#[async_trait::async_trait]
pub trait KvRead: Send + Sync {
    /// `plugin`'s value in `scope` (the conversation scope's conversation
    /// is `conversation_id`), absent once its TTL ran out.
    async fn get(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Option<String>;
    /// What `plugin` holds (in `scope` and in all), as committed: what its
    /// writes are judged against.
    async fn usage(&self, plugin: &str, conversation_id: &str, scope: &KvScope) -> KvUsage;
    /// The customer of `conversation_id`, as an earlier event of it said
    /// (for events that do not carry it, such as timers).
    async fn customer_of(&self, conversation_id: &str) -> Option<String> {
        let _ = conversation_id;
        None
    }
    /// The names of `plugin`'s pending timers in `conversation_id`, as
    /// committed (none where timers are not kept, e.g. `replay`).
    async fn timer_names(&self, plugin: &str, conversation_id: &str) -> Vec<String> {
        let _ = (plugin, conversation_id);
        Vec::new()
    }
    /// The conversation's last messages, oldest first (none where no
    /// store is behind, e.g. `replay`).
    async fn history(
        &self,
        conversation_id: &str,
        limit: usize,
    ) -> Vec<digibot_domain::history::HistoryEntry> {
        let _ = (conversation_id, limit);
        Vec::new()
    }
}

/// `conversation.history` calls one turn may make (each reads the store).
pub const HISTORY_CALLS_MAX: usize = 8;

/// Before an instance is bound to an event it can read no state.
struct NoKv;

#[async_trait::async_trait]
impl KvRead for NoKv {
    async fn get(&self, _: &str, _: &str, _: &KvScope, _: &str) -> Option<String> {
        None
    }
    async fn usage(&self, _: &str, _: &str, _: &KvScope) -> KvUsage {
        KvUsage::default()
    }
}

/// Where an entry of [`MemoryKv`] lives: its scope and whose (the
/// conversation or customer id, `""` for the plugin's shared entries).
type Space = (Scope, String);

fn space(conversation_id: &str, scope: &KvScope) -> Space {
    match scope {
        KvScope::Conversation => (Scope::Conversation, conversation_id.to_string()),
        other => (other.scope(), other.owner().to_string()),
    }
}

/// (plugin, space, key) → (value, expires at).
type Entries = HashMap<(String, Space, String), (String, Option<i64>)>;

/// An in-memory [`KvRead`] that can apply an invocation's writes.
#[derive(Default)]
pub struct MemoryKv {
    entries: std::sync::Mutex<Entries>,
    customers: std::sync::Mutex<HashMap<String, String>>,
}

impl MemoryKv {
    /// Forgets every plugin's state for one conversation.
    pub fn clear_conversation(&self, conversation_id: &str) {
        if let Ok(mut map) = self.entries.lock() {
            map.retain(|(_, (scope, owner), _), _| {
                *scope != Scope::Conversation || owner != conversation_id
            });
        }
    }

    /// Remembers whose conversation `conversation_id` is, for the events
    /// of it that do not say.
    pub fn remember_customer(&self, conversation_id: &str, customer_id: &str) {
        if let Ok(mut map) = self.customers.lock() {
            map.insert(conversation_id.to_string(), customer_id.to_string());
        }
    }

    pub fn apply(&self, plugin: &str, conversation_id: &str, writes: &[KvWrite]) {
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        for w in writes {
            let id = (
                plugin.to_string(),
                space(conversation_id, w.scope()),
                w.key().to_string(),
            );
            match w {
                KvWrite::Set {
                    value, expires_at, ..
                } => {
                    map.insert(id, (value.clone(), *expires_at));
                }
                KvWrite::Delete { .. } => {
                    map.remove(&id);
                }
            }
        }
    }

    /// The value `plugin` keeps under `key` in `conversation_id`.
    pub fn value(&self, plugin: &str, conversation_id: &str, key: &str) -> Option<String> {
        self.value_in(plugin, conversation_id, &KvScope::Conversation, key)
    }

    /// The value `plugin` keeps under `key` in `scope`, unless expired.
    pub fn value_in(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Option<String> {
        let map = self.entries.lock().ok()?;
        let (value, expires_at) = map.get(&(
            plugin.to_string(),
            space(conversation_id, scope),
            key.to_string(),
        ))?;
        match expires_at {
            Some(at) if *at <= digibot_domain::time::now_ms() => None,
            _ => Some(value.clone()),
        }
    }

    /// What `plugin` holds, in `conversation_id` and in all.
    pub fn holdings(&self, plugin: &str, conversation_id: &str) -> KvUsage {
        self.holdings_in(plugin, conversation_id, &KvScope::Conversation)
    }

    /// What `plugin` holds, in `scope` and in all.
    pub fn holdings_in(&self, plugin: &str, conversation_id: &str, scope: &KvScope) -> KvUsage {
        let Ok(map) = self.entries.lock() else {
            return KvUsage::default();
        };
        let wanted = space(conversation_id, scope);
        let mut usage = KvUsage::default();
        for ((p, at, key), (value, _)) in map.iter() {
            if p != plugin {
                continue;
            }
            let size = KvSize {
                keys: 1,
                bytes: dkv::entry_bytes(key, value),
            };
            usage.plugin += size;
            if *at == wanted {
                usage.scope += size;
            }
        }
        usage
    }
}

#[async_trait::async_trait]
impl KvRead for MemoryKv {
    async fn get(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Option<String> {
        self.value_in(plugin, conversation_id, scope, key)
    }
    async fn usage(&self, plugin: &str, conversation_id: &str, scope: &KvScope) -> KvUsage {
        self.holdings_in(plugin, conversation_id, scope)
    }
    async fn customer_of(&self, conversation_id: &str) -> Option<String> {
        self.customers.lock().ok()?.get(conversation_id).cloned()
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
/// refused, so a trap that follows can be reported as `memory`. (With the
/// pooling allocator, a component over the per-component counts is
/// refused at load already; these counts cover the on-demand one.)
pub struct Limiter {
    memory_bytes: usize,
    table_elements: usize,
    core_instances: usize,
    memories: usize,
    tables: usize,
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
        self.core_instances
    }
    fn tables(&self) -> usize {
        self.tables
    }
    fn memories(&self) -> usize {
        self.memories
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
    /// The event's customer, when the event says it.
    event_customer: Option<String>,
    /// The customer scope, once looked up (`None` inside: unknown).
    customer: Option<Option<String>>,
    /// Each (scope, key) as this turn sees it: read once, then its writes.
    kv_view: HashMap<(KvScope, String), Option<String>>,
    /// Store lookups made for `kv.get` this turn.
    kv_reads: usize,
    quotas: KvQuotas,
    /// What the plugin held in each scope it writes, as committed (read at
    /// its first write there).
    kv_usage: HashMap<KvScope, KvUsage>,
    /// How much this turn's writes so far change each scope by.
    kv_delta: HashMap<KvScope, KvSize>,
    /// And all of them.
    kv_delta_total: KvSize,
    pub(super) kv_writes: Vec<KvWrite>,
    event_id: String,
    /// The timer names pending once this turn's ops apply (read from the
    /// store at the turn's first schedule).
    timer_names: Option<Vec<String>>,
    /// Schedules and cancels to commit with the event.
    pub(super) timer_ops: Vec<TimerOp>,
    history_calls: usize,
    /// Refusals the host answered to `kv.set` (the first few).
    pub(super) refused: Vec<String>,
    pub(super) logs: Vec<LogLine>,
    log_bytes: usize,
    log_cap: usize,
    log_lines: usize,
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
                core_instances: limits.core_instances,
                memories: limits.memories,
                tables: limits.tables,
                memory_refused: false,
                table_refused: false,
            },
            stdio,
            plugin,
            conversation_id: String::new(),
            config,
            kv: Arc::new(NoKv),
            event_customer: None,
            customer: None,
            kv_view: HashMap::new(),
            kv_reads: 0,
            quotas: KvQuotas::default(),
            kv_usage: HashMap::new(),
            kv_delta: HashMap::new(),
            kv_delta_total: KvSize::default(),
            kv_writes: Vec::new(),
            event_id: String::new(),
            timer_names: None,
            timer_ops: Vec::new(),
            history_calls: 0,
            refused: Vec::new(),
            logs: Vec::new(),
            log_bytes: 0,
            log_cap: limits.max_log_bytes,
            log_lines: limits.max_log_lines,
            logs_dropped: 0,
            http: WasiHttpCtx::new(),
            http_turn: HttpTurn::new(plugin_name, http),
        }
    }

    /// Binds the instance to the event it will serve: its conversation
    /// and customer (the only ones its KV reads and writes can reach), the
    /// KV source, the quotas its writes are judged against, and where its
    /// HTTP requests go (numbered for that event).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bind(
        &mut self,
        event_id: &str,
        conversation_id: &str,
        customer_id: Option<&str>,
        kv: Arc<dyn KvRead>,
        quotas: KvQuotas,
        http: Arc<dyn OutboundHttp>,
    ) {
        self.conversation_id = conversation_id.to_string();
        self.event_customer = customer_id.filter(|c| !c.is_empty()).map(str::to_string);
        self.event_id = event_id.to_string();
        self.kv = kv;
        self.quotas = quotas;
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

    /// Whether a `log` call of `len` bytes is kept: past the line or byte
    /// cap it is counted as dropped, and the caller never copies it.
    pub(super) fn log_admits(&mut self, len: usize) -> bool {
        if self.logs.len() >= self.log_lines || self.log_bytes.saturating_add(len) > self.log_cap {
            self.logs_dropped += 1;
            return false;
        }
        true
    }

    pub(super) fn log(&mut self, level: LogLevel, message: &str) {
        if !self.log_admits(message.len()) {
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

    /// `kv.get`: the conversation scope.
    pub(super) async fn kv_get(&mut self, key: &str) -> Result<Option<String>, HostLimit> {
        self.kv_get_in(KvScope::Conversation, key).await
    }

    /// Reads see this invocation's own writes first. A read past
    /// [`KV_READS_MAX`] distinct keys stops the turn.
    pub(super) async fn kv_get_in(
        &mut self,
        scope: KvScope,
        key: &str,
    ) -> Result<Option<String>, HostLimit> {
        if let Some(v) = self.kv_view.get(&(scope.clone(), key.to_string())) {
            return Ok(v.clone());
        }
        if self.kv_reads >= KV_READS_MAX {
            return Err(HostLimit(format!(
                "more than {KV_READS_MAX} distinct kv keys read in one event"
            )));
        }
        self.kv_reads += 1;
        Ok(self.stored(scope, key).await)
    }

    /// The scope a plugin named, for this turn: its customer's is the
    /// event's customer, or its conversation's as an earlier event said;
    /// with neither, the call is refused (`unknown: ...`).
    pub(super) async fn resolve(&mut self, scope: Scope) -> Result<KvScope, String> {
        match scope {
            Scope::Conversation => Ok(KvScope::Conversation),
            Scope::Plugin => Ok(KvScope::Plugin),
            Scope::Customer => {
                if self.customer.is_none() {
                    let known = match &self.event_customer {
                        Some(id) => Some(id.clone()),
                        None => self
                            .kv
                            .customer_of(&self.conversation_id)
                            .await
                            .filter(|c| !c.is_empty()),
                    };
                    self.customer = Some(known);
                }
                match self.customer.clone().flatten() {
                    Some(id) => Ok(KvScope::Customer(id)),
                    None => Err(self.refusal(
                        "unknown: this event's customer is not known (neither the event nor its conversation named one), so it has no customer kv".to_string(),
                    )),
                }
            }
        }
    }

    /// The value of `key` as this turn sees it, without counting a read
    /// (a write looks up what it replaces; writes are capped on their own).
    async fn current(&mut self, scope: &KvScope, key: &str) -> Option<String> {
        if let Some(v) = self.kv_view.get(&(scope.clone(), key.to_string())) {
            return v.clone();
        }
        self.stored(scope.clone(), key).await
    }

    async fn stored(&mut self, scope: KvScope, key: &str) -> Option<String> {
        let value = self
            .kv
            .get(&self.plugin, &self.conversation_id, &scope, key)
            .await;
        self.kv_view.insert((scope, key.to_string()), value.clone());
        value
    }

    /// What the plugin holds in `scope` and in all, counting this turn's
    /// writes so far.
    async fn usage(&mut self, scope: &KvScope) -> KvUsage {
        let committed = match self.kv_usage.get(scope) {
            Some(usage) => *usage,
            None => {
                let usage = self
                    .kv
                    .usage(&self.plugin, &self.conversation_id, scope)
                    .await;
                self.kv_usage.insert(scope.clone(), usage);
                usage
            }
        };
        KvUsage {
            scope: committed.scope + self.kv_delta.get(scope).copied().unwrap_or_default(),
            plugin: committed.plugin + self.kv_delta_total,
        }
    }

    /// `kv.get-in`: the scope resolved, then read; every refusal (an
    /// unknown customer, the read cap) is returned to the plugin.
    pub(super) async fn kv_get_scoped(
        &mut self,
        scope: Scope,
        key: &str,
    ) -> Result<Option<String>, String> {
        let scope = self.resolve(scope).await?;
        match self.kv_get_in(scope, key).await {
            Ok(value) => Ok(value),
            Err(limit) => Err(self.refusal(format!("limit: {limit}"))),
        }
    }

    /// `kv.set-in`.
    pub(super) async fn kv_set_scoped(
        &mut self,
        scope: Scope,
        key: String,
        value: String,
        ttl_ms: Option<u64>,
    ) -> Result<(), String> {
        self.kv_set_admits(key.len(), value.len())?;
        let scope = self.resolve(scope).await?;
        self.kv_set_in(scope, key, value, ttl_ms).await
    }

    /// `kv.delete-in`.
    pub(super) async fn kv_delete_scoped(
        &mut self,
        scope: Scope,
        key: String,
    ) -> Result<(), String> {
        let scope = self.resolve(scope).await?;
        match self.kv_delete_in(scope, key).await {
            Ok(()) => Ok(()),
            Err(limit) => Err(self.refusal(format!("limit: {limit}"))),
        }
    }

    /// Records `reason` among the turn's refusals and returns it (for the
    /// version edges' own refusals).
    pub(super) fn refused_with(&mut self, reason: String) -> String {
        self.refusal(reason)
    }

    /// Records `reason` among the turn's refusals and returns it.
    fn refusal(&mut self, reason: String) -> String {
        if self.refused.len() < REFUSALS_KEPT && !self.refused.contains(&reason) {
            self.refused.push(reason.clone());
        }
        reason
    }

    /// A write refused with `reason`, which the plugin receives.
    fn refuse(&mut self, reason: String) -> Result<(), String> {
        Err(self.refusal(reason))
    }

    /// Whether a `timers.schedule` of a name and payload of these sizes can
    /// be taken at all (checked before either is copied out of the plugin).
    pub(super) fn timer_schedule_admits(
        &mut self,
        name_len: usize,
        payload_len: usize,
    ) -> Result<(), String> {
        timer::check_sizes(name_len, payload_len).or_else(|refusal| self.refuse(refusal))
    }

    /// Whether a `kv.set` of a key and value of these sizes can be taken
    /// at all (checked before either is copied out of the plugin).
    pub(super) fn kv_set_admits(&mut self, key_len: usize, value_len: usize) -> Result<(), String> {
        if key_len == 0 {
            return self.refuse("limit: kv key is empty".to_string());
        }
        if key_len > KV_KEY_MAX {
            return self.refuse(format!(
                "limit: kv key is {key_len} bytes, the limit is {KV_KEY_MAX}"
            ));
        }
        if value_len > KV_VALUE_MAX {
            return self.refuse(format!(
                "limit: kv value is {value_len} bytes, the limit is {KV_VALUE_MAX}"
            ));
        }
        if self.kv_writes.len() >= KV_WRITES_MAX {
            return self.refuse(format!(
                "limit: more than {KV_WRITES_MAX} kv writes in one event"
            ));
        }
        Ok(())
    }

    /// Whether a TTL is within its bounds: 1 ms to [`dkv::TTL_MAX_MS`].
    pub(super) fn kv_ttl_admits(&mut self, ttl_ms: Option<u64>) -> Result<(), String> {
        match ttl_ms {
            Some(0) => self.refuse("limit: kv ttl is 0 ms, it must be at least 1".to_string()),
            Some(ttl) if ttl > dkv::TTL_MAX_MS => self.refuse(format!(
                "limit: kv ttl is {ttl} ms, the limit is {} (365 days)",
                dkv::TTL_MAX_MS
            )),
            _ => Ok(()),
        }
    }

    /// `kv.set`: the conversation scope, no TTL.
    pub(super) async fn kv_set(&mut self, key: String, value: String) -> Result<(), String> {
        self.kv_set_in(KvScope::Conversation, key, value, None)
            .await
    }

    /// A set in `scope`, judged against that scope's quota and the
    /// plugin's, with what the turn already wrote; expiring `ttl_ms` from
    /// now when given.
    pub(super) async fn kv_set_in(
        &mut self,
        scope: KvScope,
        key: String,
        value: String,
        ttl_ms: Option<u64>,
    ) -> Result<(), String> {
        self.kv_set_admits(key.len(), value.len())?;
        self.kv_ttl_admits(ttl_ms)?;
        let old = self.current(&scope, &key).await;
        let delta = KvSize {
            keys: i64::from(old.is_none()),
            bytes: dkv::entry_bytes(&key, &value)
                - old.as_deref().map_or(0, |v| dkv::entry_bytes(&key, v)),
        };
        let usage = self.usage(&scope).await;
        let kind = scope.scope();
        if let Err(over) = dkv::judge(
            usage,
            delta,
            self.quotas.of(kind),
            self.quotas.plugin,
            kind.whose(),
        ) {
            return self.refuse(format!("quota: {over}"));
        }
        *self.kv_delta.entry(scope.clone()).or_default() += delta;
        self.kv_delta_total += delta;
        let expires_at = ttl_ms.map(|ttl| {
            digibot_domain::time::now_ms().saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))
        });
        self.kv_view
            .insert((scope.clone(), key.clone()), Some(value.clone()));
        self.kv_writes.push(KvWrite::Set {
            scope,
            key,
            value,
            expires_at,
        });
        Ok(())
    }

    /// `timers.schedule`: checks the bounds, then records the schedule for
    /// the turn's commit. The id is derived from the event, plugin and the
    /// schedule's index, so a turn that runs again schedules the same ids.
    pub(super) async fn timer_schedule(
        &mut self,
        name: String,
        after_ms: u64,
        payload: String,
        cancel_on_customer_message: bool,
        replace: bool,
    ) -> Result<String, String> {
        if let Err(refusal) = timer::check_schedule(&name, after_ms, &payload) {
            return self.refuse(refusal).map(|()| String::new());
        }
        if self.timer_ops.len() >= timer::OPS_MAX {
            return self
                .refuse(format!(
                    "limit: more than {} timer schedules and cancels in one event",
                    timer::OPS_MAX
                ))
                .map(|()| String::new());
        }
        let names = self.pending_timer_names().await;
        let exists = names.contains(&name);
        let pending = names.len();
        if exists && !replace {
            return Err(format!("exists: a timer named {name:?} is pending"));
        }
        if !exists && pending >= timer::PENDING_MAX {
            return self
                .refuse(format!(
                    "quota: {pending} timers pending in this conversation, the limit is {}",
                    timer::PENDING_MAX
                ))
                .map(|()| String::new());
        }
        if !exists {
            names.push(name.clone());
        }
        let id = timer_id(&self.event_id, &self.plugin, self.timer_ops.len());
        let due_at = digibot_domain::time::now_ms()
            .saturating_add(i64::try_from(after_ms).unwrap_or(i64::MAX));
        self.timer_ops.push(TimerOp::Schedule {
            id: id.clone(),
            name,
            due_at,
            payload,
            cancel_on_customer_message,
        });
        Ok(id)
    }

    /// `timers.cancel`. Past the per-turn cap the turn stops: the plugin
    /// would otherwise believe the timer cancelled.
    pub(super) async fn timer_cancel(&mut self, name: String) -> Result<(), HostLimit> {
        if self.timer_ops.len() >= timer::OPS_MAX {
            return Err(HostLimit(format!(
                "more than {} timer schedules and cancels in one event",
                timer::OPS_MAX
            )));
        }
        self.pending_timer_names().await.retain(|n| *n != name);
        self.timer_ops.push(TimerOp::Cancel { name });
        Ok(())
    }

    /// `conversation.history`: the event's conversation only. Past
    /// [`HISTORY_CALLS_MAX`] calls the turn stops.
    pub(super) async fn history(
        &mut self,
        limit: u32,
    ) -> Result<Vec<digibot_domain::history::HistoryEntry>, HostLimit> {
        self.history_calls += 1;
        if self.history_calls > HISTORY_CALLS_MAX {
            return Err(HostLimit(format!(
                "more than {HISTORY_CALLS_MAX} conversation.history calls in one event"
            )));
        }
        let limit = (limit as usize).min(digibot_domain::history::HISTORY_MAX);
        Ok(self.kv.history(&self.conversation_id, limit).await)
    }

    async fn pending_timer_names(&mut self) -> &mut Vec<String> {
        if self.timer_names.is_none() {
            let names = self
                .kv
                .timer_names(&self.plugin, &self.conversation_id)
                .await;
            self.timer_names = Some(names);
        }
        self.timer_names.get_or_insert_with(Vec::new)
    }

    /// `kv.delete`: the conversation scope. A delete past the write cap
    /// stops the turn: the plugin would otherwise believe the key gone.
    pub(super) async fn kv_delete(&mut self, key: String) -> Result<(), HostLimit> {
        self.kv_delete_in(KvScope::Conversation, key).await
    }

    /// A delete in `scope`; past the write cap it is refused.
    pub(super) async fn kv_delete_in(
        &mut self,
        scope: KvScope,
        key: String,
    ) -> Result<(), HostLimit> {
        if self.kv_writes.len() >= KV_WRITES_MAX {
            return Err(HostLimit(format!(
                "more than {KV_WRITES_MAX} kv writes in one event"
            )));
        }
        if let Some(old) = self.current(&scope, &key).await {
            let freed = KvSize {
                keys: -1,
                bytes: -dkv::entry_bytes(&key, &old),
            };
            *self.kv_delta.entry(scope.clone()).or_default() += freed;
            self.kv_delta_total += freed;
        }
        self.kv_view.insert((scope.clone(), key.clone()), None);
        self.kv_writes.push(KvWrite::Delete { scope, key });
        Ok(())
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

/// Refuses a key of `len` bytes handed to `call` past [`KV_KEY_MAX`].
/// A timer's id: stable for (event, plugin, index of the schedule).
fn timer_id(event_id: &str, plugin: &str, index: usize) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{event_id}/{plugin}/{index}").as_bytes());
    digest[..10].iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn check_key(call: &str, len: usize) -> Result<(), HostLimit> {
    if len > KV_KEY_MAX {
        return Err(HostLimit(format!(
            "{call} key is {len} bytes, the limit is {KV_KEY_MAX}"
        )));
    }
    Ok(())
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use digibot_domain::kv::KvQuota;

    fn state(kv: Arc<MemoryKv>, quota: KvQuota) -> HostState {
        state_of(kv, quota, Some("thd_1"))
    }

    /// A turn of plugin `p` in conversation `c`, of customer `customer`;
    /// every scope under `quota`.
    fn state_of(kv: Arc<MemoryKv>, quota: KvQuota, customer: Option<&str>) -> HostState {
        let limits = Limits {
            max_log_lines: 3,
            ..Limits::default()
        };
        let mut s = HostState::new(
            "p".into(),
            Arc::new(BTreeMap::new()),
            &limits,
            &Grants::default(),
            Arc::new(HttpPolicy::default()),
        );
        let roomy = KvQuota {
            keys: 1_000,
            bytes: 1 << 20,
        };
        s.bind(
            "e",
            "c",
            customer,
            kv,
            KvQuotas {
                conversation: quota,
                customer: quota,
                shared: quota,
                plugin: roomy,
            },
            Arc::new(crate::NoHttp("in this test")),
        );
        s
    }

    const SMALL: KvQuota = KvQuota {
        keys: 2,
        bytes: 100,
    };

    #[tokio::test]
    async fn a_turn_is_judged_with_what_it_already_wrote_and_freed() {
        let kv = Arc::new(MemoryKv::default());
        kv.apply("p", "c", &[KvWrite::set("a", "x".repeat(39))]);
        let mut s = state(kv, SMALL);
        assert_eq!(s.kv_set("b".into(), "y".repeat(9)).await, Ok(()));
        let refused = "quota: this conversation's kv would hold 3 keys, the quota is 2";
        assert_eq!(
            s.kv_set("c".into(), "z".into()).await,
            Err(refused.to_string())
        );
        // Deleting frees a key; an overwrite that grows past the bytes is
        // refused, one that shrinks is taken.
        s.kv_delete("a".into()).await.unwrap();
        assert_eq!(s.kv_set("c".into(), "z".repeat(9)).await, Ok(()));
        assert_eq!(
            s.kv_set("b".into(), "y".repeat(95)).await,
            Err("quota: this conversation's kv would hold 106 bytes, the quota is 100".into())
        );
        assert_eq!(s.kv_set("b".into(), "y".into()).await, Ok(()));
        assert_eq!(s.refused.len(), 2);
        assert_eq!(s.kv_writes.len(), 4);
    }

    #[tokio::test]
    async fn bounds_refuse_before_anything_is_kept() {
        let mut s = state(Arc::new(MemoryKv::default()), SMALL);
        assert_eq!(
            s.kv_set_admits(KV_KEY_MAX + 1, 1),
            Err("limit: kv key is 257 bytes, the limit is 256".into())
        );
        assert_eq!(
            s.kv_set_admits(1, KV_VALUE_MAX + 1),
            Err("limit: kv value is 65537 bytes, the limit is 65536".into())
        );
        assert_eq!(s.kv_set_admits(0, 1), Err("limit: kv key is empty".into()));
        assert_eq!(
            check_key("kv.get", KV_KEY_MAX + 1),
            Err(HostLimit(
                "kv.get key is 257 bytes, the limit is 256".into()
            ))
        );
        for i in 0..KV_READS_MAX {
            assert_eq!(s.kv_get(&format!("k{i}")).await, Ok(None));
        }
        // Keys already read cost nothing more; a new one is refused.
        assert_eq!(s.kv_get("k0").await, Ok(None));
        assert_eq!(
            s.kv_get("one-more").await,
            Err(HostLimit(
                "more than 256 distinct kv keys read in one event".into()
            ))
        );
    }

    #[test]
    fn log_lines_past_the_cap_are_counted_not_kept() {
        let mut s = state(Arc::new(MemoryKv::default()), SMALL);
        for _ in 0..10 {
            s.log(LogLevel::Info, "");
        }
        assert_eq!((s.logs.len(), s.logs_dropped), (3, 7));
    }

    #[tokio::test]
    async fn scopes_are_judged_each_against_their_own_quota_and_named_in_the_refusal() {
        let kv = Arc::new(MemoryKv::default());
        let mut s = state(kv.clone(), SMALL);
        let customer = KvScope::Customer("thd_1".into());
        // Two keys in each scope: each has its own quota of two.
        for scope in [KvScope::Conversation, customer.clone(), KvScope::Plugin] {
            for key in ["a", "b"] {
                assert_eq!(
                    s.kv_set_in(scope.clone(), key.into(), "1".into(), None)
                        .await,
                    Ok(())
                );
            }
        }
        assert_eq!(
            s.kv_set_scoped(Scope::Customer, "c".into(), "1".into(), None)
                .await,
            Err("quota: this customer's kv would hold 3 keys, the quota is 2".into())
        );
        assert_eq!(
            s.kv_set_scoped(Scope::Plugin, "c".into(), "1".into(), None)
                .await,
            Err("quota: this plugin's shared kv would hold 3 keys, the quota is 2".into())
        );
        // Reads see the turn's own writes, per scope.
        assert_eq!(
            s.kv_get_scoped(Scope::Customer, "a").await,
            Ok(Some("1".into()))
        );
        assert_eq!(s.kv_get_scoped(Scope::Plugin, "c").await, Ok(None));
        // Committed, another conversation of the same customer reads them;
        // another customer does not.
        kv.apply("p", "c", &s.kv_writes);
        assert_eq!(
            kv.value_in("p", "other", &customer, "a").as_deref(),
            Some("1")
        );
        assert_eq!(
            kv.value_in("p", "other", &KvScope::Plugin, "b").as_deref(),
            Some("1")
        );
        assert_eq!(kv.value_in("q", "c", &customer, "a"), None);
        let mut next = state_of(kv.clone(), SMALL, Some("thd_2"));
        assert_eq!(next.kv_get_scoped(Scope::Customer, "a").await, Ok(None));
        assert_eq!(
            next.kv_get_scoped(Scope::Plugin, "a").await,
            Ok(Some("1".into()))
        );
        // The plugin's shared scope, full, refuses a third key there too.
        assert!(
            next.kv_set_scoped(Scope::Plugin, "z".into(), "1".into(), None)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn an_unknown_customer_is_a_clear_refusal_and_the_conversation_can_name_one() {
        let kv = Arc::new(MemoryKv::default());
        let unknown = "unknown: this event's customer is not known (neither the event nor its conversation named one), so it has no customer kv";
        let mut s = state_of(kv.clone(), SMALL, None);
        assert_eq!(
            s.kv_get_scoped(Scope::Customer, "lang").await,
            Err(unknown.into())
        );
        assert_eq!(
            s.kv_set_scoped(Scope::Customer, "lang".into(), "fr".into(), None)
                .await,
            Err(unknown.into())
        );
        assert_eq!(
            s.kv_delete_scoped(Scope::Customer, "lang".into()).await,
            Err(unknown.into())
        );
        assert_eq!(s.refused, [unknown]);
        assert!(s.kv_writes.is_empty());
        // The other scopes still work; an empty customer id is no id.
        assert_eq!(s.kv_get_scoped(Scope::Plugin, "lang").await, Ok(None));
        let mut empty = state_of(kv.clone(), SMALL, Some(""));
        assert_eq!(
            empty.kv_get_scoped(Scope::Customer, "lang").await,
            Err(unknown.into())
        );
        // A timer's turn (no customer in its event) uses the one its
        // conversation's earlier event named.
        kv.remember_customer("c", "thd_9");
        let mut timer = state_of(kv.clone(), SMALL, None);
        assert_eq!(
            timer
                .kv_set_scoped(Scope::Customer, "lang".into(), "fr".into(), None)
                .await,
            Ok(())
        );
        assert_eq!(
            timer.kv_writes[0].scope(),
            &KvScope::Customer("thd_9".into())
        );
    }

    #[tokio::test]
    async fn hostile_scoped_input_is_refused_before_it_is_kept() {
        let mut s = state(Arc::new(MemoryKv::default()), SMALL);
        let huge_key = "k".repeat(KV_KEY_MAX + 1);
        assert_eq!(
            s.kv_set_scoped(Scope::Customer, huge_key.clone(), "v".into(), None)
                .await,
            Err("limit: kv key is 257 bytes, the limit is 256".into())
        );
        assert_eq!(
            s.kv_set_scoped(
                Scope::Plugin,
                "k".into(),
                "v".repeat(KV_VALUE_MAX + 1),
                None
            )
            .await,
            Err("limit: kv value is 65537 bytes, the limit is 65536".into())
        );
        assert_eq!(
            s.kv_set_scoped(Scope::Plugin, String::new(), "v".into(), None)
                .await,
            Err("limit: kv key is empty".into())
        );
        // TTLs: zero and past a year are refused, u64::MAX included (no
        // overflow); the longest one is taken.
        assert_eq!(
            s.kv_set_scoped(Scope::Plugin, "t".into(), "v".into(), Some(0))
                .await,
            Err("limit: kv ttl is 0 ms, it must be at least 1".into())
        );
        assert_eq!(
            s.kv_set_scoped(Scope::Plugin, "t".into(), "v".into(), Some(u64::MAX))
                .await,
            Err(format!(
                "limit: kv ttl is {} ms, the limit is 31536000000 (365 days)",
                u64::MAX
            ))
        );
        assert_eq!(
            s.kv_set_scoped(Scope::Plugin, "t".into(), "v".into(), Some(dkv::TTL_MAX_MS))
                .await,
            Ok(())
        );
        let KvWrite::Set {
            expires_at: Some(at),
            ..
        } = &s.kv_writes[0]
        else {
            panic!("{:?}", s.kv_writes)
        };
        assert!(*at > digibot_domain::time::now_ms());
        // Reads past the cap are refused (the turn goes on), whatever the
        // scope they spread over.
        for i in 0..KV_READS_MAX {
            let scope = [Scope::Conversation, Scope::Customer, Scope::Plugin][i % 3];
            assert_eq!(s.kv_get_scoped(scope, &format!("r{i}")).await, Ok(None));
        }
        assert_eq!(
            s.kv_get_scoped(Scope::Customer, "one-more").await,
            Err("limit: more than 256 distinct kv keys read in one event".into())
        );
        // Writes past the cap: a set and a delete are refused alike.
        let mut w = state(
            Arc::new(MemoryKv::default()),
            KvQuota {
                keys: 10_000,
                bytes: 1 << 30,
            },
        );
        for i in 0..KV_WRITES_MAX {
            w.kv_delete_scoped(Scope::Plugin, format!("d{i}"))
                .await
                .unwrap();
        }
        assert_eq!(
            w.kv_delete_scoped(Scope::Customer, "x".into()).await,
            Err("limit: more than 256 kv writes in one event".into())
        );
        assert_eq!(
            w.kv_set_scoped(Scope::Customer, "x".into(), "v".into(), None)
                .await,
            Err("limit: more than 256 kv writes in one event".into())
        );
        assert_eq!(w.kv_writes.len(), KV_WRITES_MAX);
    }
}
