//! Safe rollouts: a candidate version of a plugin beside the serving one.
//!
//! - **Shadow**: after the serving turn of every live event has committed
//!   (so nothing it sends waits), the candidate runs on the same event in
//!   the same lane. Its actions are compared with the serving version's and
//!   recorded, never sent; its KV reads see the store as committed and its
//!   writes (and timers) stay in memory for the turn, then are dropped; its
//!   outbound calls are answered from the serving version's journal of that
//!   event where they match ([`FromJournal`]) and refused otherwise. The
//!   candidate has a breaker of its own, unused: its failures never touch
//!   the serving version's.
//! - **Canary**: the candidate serves `percent`% of conversations, chosen
//!   by a hash of the conversation id ([`canary_bucket`]; sticky while the
//!   rollout lasts). When its failure rate over the last turns exceeds the
//!   serving version's by [`CanaryRules::margin`], it is rolled back: the
//!   record says why and every conversation goes back to the serving
//!   version.
//! - **Promote / abort**: promotion installs the candidate through the
//!   registry's normal path (history, rollback, the cluster's record);
//!   it can require a number of shadowed events with no difference. First
//!   the last recorded production turns of the serving version are
//!   replayed against the candidate from their journals
//!   ([`Rollouts::replay_recent`]): a difference refuses the promotion
//!   unless it is accepted, and the answer reports them either way.
//!
//! The rollout itself lives in the store (`digibot_store::rollout`), so
//! replicas sharing a database run the same candidate ([`Rollouts::sync`])
//! and report the same comparisons.

use crate::dispatch::{self, Breaker, Burst, Handled};
use crate::outbound::FromJournal;
use digibot_domain::event::{ConversationState, Event};
use digibot_runtime::registry::{Entry, Health, Registry, RegistryError};
use digibot_runtime::{KvRead, OutboundHttp, Plugin};
use digibot_store::{Comparison, RolloutRecord, Store, StoreError, now_ms};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// How often a replica reads the rollouts other replicas started or ended.
pub const SYNC: Duration = Duration::from_millis(500);

/// Rollout failures, each the admin API's answer.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("no plugin named {0} is serving: a rollout needs a serving version")]
    NotServing(String),
    #[error("plugin {0} has no active rollout")]
    NoRollout(String),
    #[error("{0}")]
    BadRequest(String),
    /// A promotion whose evidence falls short.
    #[error("{0}")]
    NotReady(String),
    /// A promotion refused because replayed production turns differ.
    #[error("{message}")]
    ReplayDiffers {
        message: String,
        replay: Box<ReplayReport>,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a candidate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shadow,
    /// Serves this share of conversations (0–100).
    Canary(u8),
}

impl Mode {
    /// From the admin API's `mode` and `percent`.
    pub fn parse(mode: &str, percent: Option<u8>) -> Result<Mode, RolloutError> {
        match (mode, percent) {
            ("shadow", None) => Ok(Mode::Shadow),
            ("shadow", Some(_)) => Err(RolloutError::BadRequest(
                "percent is for mode=canary".into(),
            )),
            ("canary", Some(p)) if p <= 100 => Ok(Mode::Canary(p)),
            ("canary", _) => Err(RolloutError::BadRequest(
                "mode=canary needs percent=P, 0 to 100".into(),
            )),
            (other, _) => Err(RolloutError::BadRequest(format!(
                "unknown mode {other:?} (shadow or canary)"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Shadow => "shadow",
            Mode::Canary(_) => "canary",
        }
    }
}

/// When a canary is rolled back automatically.
#[derive(Debug, Clone, Copy)]
pub struct CanaryRules {
    /// Turns remembered per side (candidate, serving version).
    pub window: usize,
    /// Candidate turns in the window before it is judged.
    pub min_turns: usize,
    /// How far the candidate's failure rate may exceed the serving
    /// version's (0.2: 20 percentage points).
    pub margin: f64,
}

impl Default for CanaryRules {
    fn default() -> CanaryRules {
        CanaryRules {
            window: 50,
            min_turns: 5,
            margin: 0.2,
        }
    }
}

/// The bucket (0–99) of a conversation: the candidate of a canary at P%
/// serves the conversations whose bucket is below P. FNV-1a, so every
/// replica (and every restart) puts a conversation in the same bucket.
pub fn canary_bucket(conversation_id: &str) -> u8 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in conversation_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % 100) as u8
}

/// Recent turn outcomes of one side of a canary (true: failed).
#[derive(Debug, Default)]
struct Window {
    turns: VecDeque<bool>,
}

impl Window {
    fn push(&mut self, failed: bool, size: usize) {
        self.turns.push_back(failed);
        while self.turns.len() > size {
            self.turns.pop_front();
        }
    }

    fn rate(&self) -> f64 {
        if self.turns.is_empty() {
            return 0.0;
        }
        self.turns.iter().filter(|f| **f).count() as f64 / self.turns.len() as f64
    }
}

/// A candidate loaded on this replica.
struct Candidate {
    record: RolloutRecord,
    mode: Mode,
    entry: Entry,
    /// Canary: (candidate, serving version) outcomes.
    windows: Mutex<(Window, Window)>,
}

/// Canary figures of this replica, in the rollout report.
#[derive(Debug, Clone, Serialize)]
pub struct CanaryView {
    pub candidate_turns: usize,
    pub candidate_failure_rate: f64,
    pub serving_turns: usize,
    pub serving_failure_rate: f64,
}

/// Every rollout this replica runs; one per process, shared by the
/// dispatcher (which runs the candidates) and the admin API.
pub struct Rollouts {
    store: Store,
    registry: Arc<Registry>,
    rules: CanaryRules,
    /// By plugin name.
    loaded: Mutex<HashMap<String, Arc<Candidate>>>,
    /// Serialises starts, ends and syncs.
    change: tokio::sync::Mutex<()>,
}

/// What routing an event's turn decided.
pub struct Routed {
    /// The entries the turn runs (candidates in place of canaried ones).
    pub entries: Vec<Entry>,
    /// Canaries this event took part in: (candidate, served by it).
    canaries: Vec<(Arc<Candidate>, bool)>,
}

/// How many recent production turns a promotion replays unless told, and
/// at most.
pub const REPLAY_DEFAULT: usize = 20;
pub const REPLAY_MAX: usize = 200;
/// How many of the newest events a promotion looks through for them.
const REPLAY_SCAN: usize = 5_000;

/// What a promotion asks for.
#[derive(Debug, Clone, Copy)]
pub struct Promotion {
    /// At least this many shadowed events compared the same.
    pub require_same: Option<u64>,
    /// Promote even with differences (shadowed or replayed).
    pub accept_differences: bool,
    /// Replay this many recent production turns first (0: none).
    pub replay: usize,
}

impl Default for Promotion {
    fn default() -> Promotion {
        Promotion {
            require_same: None,
            accept_differences: false,
            replay: REPLAY_DEFAULT,
        }
    }
}

/// Recent production turns replayed against a candidate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub compared: usize,
    pub same: usize,
    pub different: usize,
    pub failed: usize,
    /// The turns that did not give the same requests, newest first.
    pub differences: Vec<Replayed>,
}

/// One replayed turn that differed or failed.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub event_key: String,
    pub conversation_id: String,
    /// `different` or `failed`.
    pub verdict: &'static str,
    /// What the serving version queued then.
    pub recorded: serde_json::Value,
    /// What the candidate queues now.
    pub candidate: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a promotion did.
#[derive(Debug, Clone)]
pub struct Promoted {
    pub record: RolloutRecord,
    pub plugin: Arc<Plugin>,
    pub replay: ReplayReport,
}

/// The outcome `plugin` had in an event's summary (`ok`, `folded`, …).
fn outcome_in<'a>(outcomes: &'a serde_json::Value, plugin: &str) -> Option<&'a str> {
    outcomes
        .as_array()?
        .iter()
        .find(|o| o["plugin"] == plugin)
        .and_then(|o| o["outcome"].as_str())
}

fn requests_of(handled: &Handled, plugin: &str) -> serde_json::Value {
    handled
        .actions
        .iter()
        .filter(|a| a.plugin == plugin)
        .map(|a| serde_json::json!({ "method": a.method, "path": a.path, "body": a.body }))
        .collect()
}

impl Rollouts {
    pub fn new(store: Store, registry: Arc<Registry>) -> Rollouts {
        Rollouts {
            store,
            registry,
            rules: CanaryRules::default(),
            loaded: Mutex::new(HashMap::new()),
            change: tokio::sync::Mutex::new(()),
        }
    }

    /// Replaces the canary rules (before serving).
    pub fn with_rules(mut self, rules: CanaryRules) -> Rollouts {
        self.rules = rules;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Candidate>>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any candidate is loaded here (the dispatcher's fast path).
    pub fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Whether this replica runs rollout `id` of `plugin`.
    pub fn runs(&self, plugin: &str, id: &str) -> bool {
        self.lock().get(plugin).is_some_and(|c| c.record.id == id)
    }

    /// This replica's canary figures for `plugin`.
    pub fn canary_view(&self, plugin: &str) -> Option<CanaryView> {
        let candidate = self.lock().get(plugin).cloned()?;
        let windows = candidate.windows.lock().unwrap_or_else(|e| e.into_inner());
        Some(CanaryView {
            candidate_turns: windows.0.turns.len(),
            candidate_failure_rate: windows.0.rate(),
            serving_turns: windows.1.turns.len(),
            serving_failure_rate: windows.1.rate(),
        })
    }

    async fn compile(&self, name: &str, bytes: Vec<u8>) -> Result<Plugin, RolloutError> {
        let manifest = self.registry.read_manifest(name)?;
        let runtime = self.registry.runtime().clone();
        let owned = name.to_string();
        tokio::task::spawn_blocking(move || runtime.load(&owned, &bytes, manifest))
            .await
            .map_err(|_| RegistryError::CompilerPanicked(name.to_string()))?
            .map_err(|source| {
                RolloutError::Registry(RegistryError::Load {
                    name: name.to_string(),
                    source,
                })
            })
    }

    fn load(&self, record: RolloutRecord, plugin: Plugin) {
        let mode = match record.mode.as_str() {
            "canary" => Mode::Canary(record.percent),
            _ => Mode::Shadow,
        };
        tracing::info!(plugin = %record.plugin, rollout = %record.id, mode = mode.name(),
            percent = record.percent, candidate = %&plugin.hash[..12], "rollout candidate loaded");
        let candidate = Arc::new(Candidate {
            mode,
            entry: Entry {
                plugin: Arc::new(plugin),
                health: Arc::new(Health::default()),
            },
            windows: Mutex::default(),
            record,
        });
        self.lock()
            .insert(candidate.record.plugin.clone(), candidate);
    }

    fn unload(&self, plugin: &str) {
        if self.lock().remove(plugin).is_some() {
            tracing::info!(plugin, "rollout candidate unloaded");
        }
    }

    /// Starts a rollout of `bytes` beside the serving version of `name`
    /// (replacing any rollout of it): compiled and validated first, then
    /// recorded for every replica, then run here.
    pub async fn start(
        &self,
        name: &str,
        bytes: Vec<u8>,
        mode: Mode,
    ) -> Result<RolloutRecord, RolloutError> {
        if self.registry.snapshot().get(name).is_none() {
            return Err(RolloutError::NotServing(name.to_string()));
        }
        let _guard = self.change.lock().await;
        let plugin = self.compile(name, bytes.clone()).await?;
        let now = now_ms();
        let record = RolloutRecord {
            plugin: name.to_string(),
            id: format!("{}-{now}", &plugin.hash[..12]),
            mode: mode.name().to_string(),
            percent: match mode {
                Mode::Canary(p) => p,
                Mode::Shadow => 0,
            },
            candidate: plugin.hash.clone(),
            state: "active".to_string(),
            reason: None,
            started_at: now,
            changed_at: now,
            same: 0,
            different: 0,
            failed: 0,
        };
        self.store.start_rollout(record.clone(), bytes).await?;
        self.load(record.clone(), plugin);
        Ok(record)
    }

    /// The active rollout of `name`, from the store.
    async fn active(&self, name: &str) -> Result<RolloutRecord, RolloutError> {
        match self.store.rollout(name).await? {
            Some(r) if r.state == "active" => Ok(r),
            _ => Err(RolloutError::NoRollout(name.to_string())),
        }
    }

    /// Ends the active rollout of `name` without promoting it.
    pub async fn abort(&self, name: &str) -> Result<RolloutRecord, RolloutError> {
        let _guard = self.change.lock().await;
        let record = self.active(name).await?;
        self.store
            .end_rollout(
                name,
                &record.id,
                "aborted",
                Some("aborted through the admin API".into()),
            )
            .await?;
        self.unload(name);
        Ok(self.store.rollout(name).await?.unwrap_or(record))
    }

    /// Installs the candidate of `name` as its serving version, through
    /// the registry (so history and rollback keep working). With
    /// `require_same`, at least that many shadowed events must have been
    /// compared, none different nor failed, and the last `replay`
    /// production turns replayed against the candidate must give the same
    /// requests; `accept_differences` promotes anyway.
    pub async fn promote(&self, name: &str, ask: Promotion) -> Result<Promoted, RolloutError> {
        let _guard = self.change.lock().await;
        let record = self.active(name).await?;
        if !ask.accept_differences {
            if record.different > 0 || record.failed > 0 {
                return Err(RolloutError::NotReady(format!(
                    "rollout {} of {name}: {} different and {} failed of {} compared; pass accept_differences=true to promote anyway",
                    record.id,
                    record.different,
                    record.failed,
                    record.same + record.different + record.failed
                )));
            }
            if let Some(n) = ask.require_same
                && record.same < n
            {
                return Err(RolloutError::NotReady(format!(
                    "rollout {} of {name}: {} events compared the same, {n} required",
                    record.id, record.same
                )));
            }
        }
        let bytes = self
            .store
            .rollout_bytes(name, &record.id)
            .await?
            .ok_or_else(|| RolloutError::NoRollout(name.to_string()))?;
        let loaded = self
            .lock()
            .get(name)
            .filter(|c| c.record.id == record.id)
            .map(|c| c.entry.clone());
        let entry = match loaded {
            Some(entry) => entry,
            None => Entry {
                plugin: Arc::new(self.compile(name, bytes.clone()).await?),
                health: Arc::new(Health::default()),
            },
        };
        let replay = self
            .replay_recent(name, &entry, ask.replay.min(REPLAY_MAX))
            .await?;
        if !ask.accept_differences && replay.same < replay.compared {
            return Err(RolloutError::ReplayDiffers {
                message: format!(
                    "rollout {} of {name}: of the last {} production turns replayed against the candidate, {} differ and {} failed; pass accept_differences=true to promote anyway",
                    record.id, replay.compared, replay.different, replay.failed
                ),
                replay: Box::new(replay),
            });
        }
        let plugin = self.registry.install(name, &bytes).await?;
        self.store
            .end_rollout(name, &record.id, "promoted", None)
            .await?;
        self.unload(name);
        tracing::info!(plugin = name, rollout = %record.id, version = %&plugin.hash[..12],
            replayed = replay.compared, replayed_same = replay.same, "rollout promoted");
        Ok(Promoted {
            record: self.store.rollout(name).await?.unwrap_or(record),
            plugin,
            replay,
        })
    }

    /// Replays against `candidate` the newest `limit` turns the serving
    /// version of `name` took (`ok` or `failed`) among the last
    /// [`REPLAY_SCAN`] events, each from its stored event and journal (its
    /// outbound calls answered from it, or refused), a debounced turn with
    /// the burst it answered, and compares the requests with those the
    /// turn queued then. KV reads see the store as it is now; nothing is
    /// written or sent.
    pub async fn replay_recent(
        &self,
        name: &str,
        candidate: &Entry,
        limit: usize,
    ) -> Result<ReplayReport, RolloutError> {
        let mut report = ReplayReport::default();
        if limit == 0 {
            return Ok(report);
        }
        // Newest first.
        let recent = self.store.recent_events(REPLAY_SCAN).await?;
        let kv: Arc<dyn KvRead> = Arc::new(dispatch::StoreKv {
            store: self.store.clone(),
        });
        let mut recorded_in: HashMap<String, Vec<digibot_store::OutboxAction>> = HashMap::new();
        let turns = recent
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(outcome_in(&e.plugins, name), Some("ok" | "failed")))
            .take(limit);
        for (at, summary) in turns {
            let Some(stored) = self.store.event(&summary.key).await? else {
                continue;
            };
            let conversation = summary.conversation_id.clone().unwrap_or_default();
            // The burst it answered: the folded messages just before it.
            let mut earlier = Vec::new();
            for older in recent[at + 1..]
                .iter()
                .filter(|e| e.conversation_id == summary.conversation_id)
            {
                if outcome_in(&older.plugins, name) != Some("folded") {
                    break;
                }
                if let Some(folded) = self.store.event(&older.key).await?
                    && let Some(m) = dispatch::from_customer(&folded.event)
                {
                    earlier.push(m.clone());
                }
            }
            earlier.reverse();
            let burst = if earlier.is_empty() {
                Burst::Alone
            } else {
                Burst::Last(earlier.into())
            };
            let journal = self.store.journal(&summary.key, Some(name)).await?;
            let http: Arc<dyn OutboundHttp> = Arc::new(FromJournal::new(journal));
            let theirs = dispatch::run_unrecorded(
                self.registry.runtime(),
                std::slice::from_ref(candidate),
                &stored.event,
                &burst,
                ConversationState::Bot,
                kv.clone(),
                http,
                Breaker {
                    failures: 0,
                    cooldown: Duration::ZERO,
                },
            )
            .await;
            if !recorded_in.contains_key(&conversation) {
                let actions = match summary.conversation_id.as_deref() {
                    Some(c) => self.store.conversation(c).await?.actions,
                    None => Vec::new(),
                };
                recorded_in.insert(conversation.clone(), actions);
            }
            let recorded: serde_json::Value = recorded_in[&conversation]
                .iter()
                .filter(|a| a.event_seq == stored.seq && a.plugin == name)
                .map(|a| serde_json::json!({ "method": a.method, "path": a.path, "body": a.body }))
                .collect();
            let requests = requests_of(&theirs, name);
            let outcome = theirs.outcomes.iter().find(|o| o.plugin == name);
            let (verdict, reason) = match outcome {
                Some(o) if o.outcome == "failed" => ("failed", o.reason.clone()),
                _ if requests == recorded => ("same", None),
                _ => ("different", None),
            };
            report.compared += 1;
            match verdict {
                "same" => {
                    report.same += 1;
                    continue;
                }
                "failed" => report.failed += 1,
                _ => report.different += 1,
            }
            report.differences.push(Replayed {
                event_key: summary.key.clone(),
                conversation_id: conversation,
                verdict,
                recorded,
                candidate: requests,
                reason,
            });
        }
        Ok(report)
    }

    /// Runs here what the store says is active: loads the candidates
    /// started elsewhere and drops the ones ended.
    pub async fn sync(&self) -> Result<(), RolloutError> {
        let _guard = self.change.lock().await;
        let records = self.store.rollouts().await?;
        let loaded: Vec<(String, String)> = self
            .lock()
            .values()
            .map(|c| (c.record.plugin.clone(), c.record.id.clone()))
            .collect();
        for (plugin, id) in &loaded {
            if !records
                .iter()
                .any(|r| r.plugin == *plugin && r.id == *id && r.state == "active")
            {
                self.unload(plugin);
            }
        }
        for record in records.into_iter().filter(|r| r.state == "active") {
            if self.runs(&record.plugin, &record.id)
                || self.registry.snapshot().get(&record.plugin).is_none()
            {
                continue;
            }
            let Some(bytes) = self.store.rollout_bytes(&record.plugin, &record.id).await? else {
                continue;
            };
            match self.compile(&record.plugin, bytes).await {
                Ok(plugin) => self.load(record, plugin),
                Err(e) => {
                    tracing::error!(plugin = %record.plugin, rollout = %record.id, error = %e,
                        "cannot load a rollout candidate another replica started")
                }
            }
        }
        Ok(())
    }

    /// [`Rollouts::sync`] every [`SYNC`] until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %e, "cannot read the rollouts");
            }
            tokio::select! {
                _ = tokio::time::sleep(SYNC) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    /// The entries an event's turn runs: each canaried plugin's candidate
    /// in its place for the conversations in its share.
    pub fn route(&self, entries: &[Entry], conversation_id: &str) -> Routed {
        let mut routed = Routed {
            entries: entries.to_vec(),
            canaries: Vec::new(),
        };
        let loaded = self.lock();
        if loaded.is_empty() {
            return routed;
        }
        let bucket = canary_bucket(conversation_id);
        for entry in &mut routed.entries {
            let Some(candidate) = loaded.get(&entry.plugin.name) else {
                continue;
            };
            let Mode::Canary(percent) = candidate.mode else {
                continue;
            };
            let by_candidate = bucket < percent;
            if by_candidate {
                *entry = candidate.entry.clone();
            }
            routed.canaries.push((candidate.clone(), by_candidate));
        }
        routed
    }

    /// Counts a routed turn's outcomes in its canaries' windows and rolls
    /// back a candidate that fails too often (see [`CanaryRules`]).
    pub async fn judge(&self, routed: &Routed, handled: &Handled) {
        for (candidate, by_candidate) in &routed.canaries {
            let name = &candidate.record.plugin;
            let Some(outcome) = handled.outcomes.iter().find(|o| o.plugin == *name) else {
                continue;
            };
            let failed = match outcome.outcome {
                "ok" => false,
                "failed" => true,
                // Quarantined by its own breaker: a failure too.
                "skipped" if outcome.reason.as_deref() != Some("human") => true,
                _ => continue,
            };
            let verdict = {
                let mut windows = candidate.windows.lock().unwrap_or_else(|e| e.into_inner());
                if *by_candidate {
                    windows.0.push(failed, self.rules.window);
                } else {
                    windows.1.push(failed, self.rules.window);
                }
                let (c, s) = (windows.0.rate(), windows.1.rate());
                (windows.0.turns.len() >= self.rules.min_turns && c - s > self.rules.margin).then(
                    || {
                        format!(
                            "canary failure rate {:.0}% over its last {} turns exceeds the serving version's {:.0}% (over {} turns) by more than {:.0} points",
                            c * 100.0,
                            windows.0.turns.len(),
                            s * 100.0,
                            windows.1.turns.len(),
                            self.rules.margin * 100.0
                        )
                    },
                )
            };
            if let Some(reason) = verdict {
                self.roll_back(candidate, reason).await;
            }
        }
    }

    async fn roll_back(&self, candidate: &Candidate, reason: String) {
        let name = &candidate.record.plugin;
        // Here at once: the next events of its conversations go to the
        // serving version whatever the store says.
        {
            let mut loaded = self.lock();
            if loaded
                .get(name)
                .is_some_and(|c| c.record.id == candidate.record.id)
            {
                loaded.remove(name);
            }
        }
        tracing::warn!(plugin = %name, rollout = %candidate.record.id, %reason, "canary rolled back");
        let mut backoff = Duration::from_millis(50);
        for attempt in 1..=5 {
            match self
                .store
                .end_rollout(
                    name,
                    &candidate.record.id,
                    "rolled_back",
                    Some(reason.clone()),
                )
                .await
            {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "cannot record a canary's rollback yet");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }

    /// Runs every shadow candidate on `event` after its serving turn
    /// (`handled`, committed) and records the comparisons. Candidate turns
    /// take a turn slot like any other; nothing here reaches the outbox,
    /// the KV, the timers or the serving version's breaker.
    #[allow(clippy::too_many_arguments)]
    pub async fn shadow(
        &self,
        event: &Event,
        burst: &Burst,
        state: ConversationState,
        kv: Arc<dyn KvRead>,
        handled: &Handled,
        turn_slots: &Arc<Semaphore>,
    ) {
        let shadows: Vec<Arc<Candidate>> = self
            .lock()
            .values()
            .filter(|c| c.mode == Mode::Shadow)
            .cloned()
            .collect();
        for candidate in shadows {
            let name = candidate.record.plugin.clone();
            // Compared only where the serving version took its turn.
            if !handled
                .outcomes
                .iter()
                .any(|o| o.plugin == name && matches!(o.outcome, "ok" | "failed"))
            {
                continue;
            }
            let Ok(_permit) = turn_slots.clone().acquire_owned().await else {
                return;
            };
            let journal = match self.store.journal(&event.key, Some(&name)).await {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the journal for a shadow turn; its calls are refused");
                    Vec::new()
                }
            };
            let http: Arc<dyn OutboundHttp> = Arc::new(FromJournal::new(journal));
            // A task of its own: a host bug that panics in the candidate's
            // turn loses this comparison, not the lane.
            let (runtime, entry, owned, burst, kv) = (
                self.registry.runtime().clone(),
                candidate.entry.clone(),
                event.clone(),
                burst.clone(),
                kv.clone(),
            );
            let shadowed = tokio::spawn(async move {
                dispatch::run_unrecorded(
                    &runtime,
                    &[entry],
                    &owned,
                    &burst,
                    state,
                    kv,
                    http,
                    Breaker {
                        failures: 0,
                        cooldown: Duration::ZERO,
                    },
                )
                .await
            })
            .await;
            let (verdict, candidate_requests, reason) = match shadowed {
                Err(e) => (
                    "failed",
                    serde_json::json!([]),
                    Some(format!("the shadow turn panicked: {e}")),
                ),
                Ok(theirs) => {
                    let outcome = theirs.outcomes.iter().find(|o| o.plugin == name);
                    let requests = requests_of(&theirs, &name);
                    match outcome {
                        Some(o) if o.outcome == "failed" => ("failed", requests, o.reason.clone()),
                        _ if requests == requests_of(handled, &name) => ("same", requests, None),
                        _ => ("different", requests, None),
                    }
                }
            };
            let comparison = Comparison {
                plugin: name.clone(),
                rollout: candidate.record.id.clone(),
                event_key: event.key.clone(),
                conversation_id: event.conversation_id().unwrap_or_default().to_string(),
                verdict: verdict.to_string(),
                serving: requests_of(handled, &name),
                candidate: candidate_requests,
                reason,
                at: now_ms(),
            };
            if let Err(e) = self.store.record_comparison(comparison).await {
                tracing::warn!(plugin = %name, error = %e, "cannot record a shadow comparison");
            }
        }
    }

    /// The serving turn of `event` with its canaries routed and judged:
    /// the registry's entries as they are when no rollout is running here. `pinned`:
    /// the entries the conversation is pinned to ([`crate::pin`]), instead
    /// of the registry's.
    #[allow(clippy::too_many_arguments)]
    pub async fn run_plugins(
        &self,
        registry: &Registry,
        pinned: Option<Vec<Entry>>,
        event: &Event,
        burst: &Burst,
        state: ConversationState,
        kv: Arc<dyn KvRead>,
        http: Arc<dyn OutboundHttp>,
        breaker: Breaker,
    ) -> Handled {
        let snapshot = registry.snapshot();
        let entries = pinned.as_deref().unwrap_or(&snapshot.plugins);
        // Routed (and judged) only while a rollout runs here.
        let routed = self
            .any()
            .then(|| self.route(entries, event.conversation_id().unwrap_or_default()));
        let handled = dispatch::run_routed(
            registry.runtime(),
            routed.as_ref().map_or(entries, |r| &r.entries),
            event,
            burst,
            state,
            kv,
            http,
            breaker,
        )
        .await;
        if let Some(routed) = &routed {
            self.judge(routed, &handled).await;
        }
        handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(canary_bucket("c-1"), canary_bucket("c-1"));
        let mut counts = [0usize; 2];
        for i in 0..1000 {
            counts[usize::from(canary_bucket(&format!("conv-{i}")) >= 50)] += 1;
        }
        assert!(counts[0] > 400 && counts[1] > 400, "{counts:?}");
    }

    #[test]
    fn modes_parse_from_the_admin_query() {
        assert_eq!(Mode::parse("shadow", None).unwrap(), Mode::Shadow);
        assert_eq!(Mode::parse("canary", Some(50)).unwrap(), Mode::Canary(50));
        assert!(Mode::parse("canary", None).is_err());
        assert!(Mode::parse("canary", Some(101)).is_err());
        assert!(Mode::parse("shadow", Some(5)).is_err());
        assert!(Mode::parse("blue", None).is_err());
    }

    #[test]
    fn a_window_keeps_its_last_turns() {
        let mut w = Window::default();
        for failed in [true, true, false, false] {
            w.push(failed, 2);
        }
        assert_eq!(w.rate(), 0.0);
        w.push(true, 2);
        assert_eq!(w.rate(), 0.5);
    }
}
