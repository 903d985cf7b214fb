//! `digibot replay FILE.json... --plugin FILE.wasm [--plugin …] [--config KEY=VALUE]`:
//! runs plugins on recorded webhook payloads, in order, and prints as JSON
//! what each plugin did: its outcome, its actions and the exact Messages
//! API requests they become. Exits non-zero when a plugin fails or returns
//! an action digibot refuses.
//!
//! `digibot replay --event KEY [--plugin FILE.wasm …]`: runs a production
//! turn again, from the store: the event as it was received, each plugin's
//! outbound calls answered from the event's journal (any other request is
//! refused: a replay reaches nothing outside), beside the requests the turn
//! queued then; `same` says whether they are identical. Without `--plugin`,
//! the plugins folder's current versions. KV is read as it is now.
//!
//! Also home of [`Session`], the serverless stand-in for the dispatcher that
//! `chat` shares: plugins loaded from files with their `NAME.toml`, events
//! run through [`dispatch::run_entries`] (the server's own routing, filters
//! and request building), KV kept in memory across events, and who is in
//! charge of each conversation: a hand-off (taken as delivered: these tools
//! send nothing) or an agent's message puts a human in charge, the agent's
//! release note or archiving ends it, as in the server. The session also
//! keeps each conversation's pending timers (schedules and cancels applied
//! as the store applies them: a customer message drops those cancelled by
//! one, archiving drops all) and its history (what `conversation.history`
//! answers), so `digibot test` can fire a timer a turn scheduled.

use super::check::{runtime, sibling_manifest};
use crate::config::Settings;
use anyhow::{Context, bail};
use clap::Args;
use digibot_domain::event::{ConversationState, Event, EventKind, SenderKind};
use digibot_domain::history::{self, HistoryEntry};
use digibot_domain::kv::KvScope;
use digibot_domain::time::now_ms;
use digibot_domain::timer::{TimerFired, TimerOp, TimerRecord};
use digibot_pipeline::dispatch::{self, Breaker, Handled};
use digibot_protocol::Action;
use digibot_runtime::registry::{Entry, Health};
use digibot_runtime::{KvRead, KvUsage, Manifest, MemoryKv, OutboundHttp, Runtime};
use serde::Serialize;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Webhook payloads (as Digishare posts them), run in this order.
    #[arg(
        value_name = "FILE.json",
        required_unless_present = "event",
        conflicts_with = "event"
    )]
    pub files: Vec<PathBuf>,
    /// A stored event's key (as `/admin/events` shows it): its turn again,
    /// from the store and its journal, beside what it did then.
    #[arg(long, value_name = "KEY")]
    pub event: Option<String>,
    #[command(flatten)]
    pub plugins: PluginArgs,
}

/// The plugins to run, shared by `replay` and `chat`.
#[derive(Debug, Args)]
pub struct PluginArgs {
    /// A plugin component; repeat for several (they run in name order, as
    /// in the server). A `NAME.toml` beside it is read as the server would.
    /// (At least one, except for `replay --event`: the plugins folder's.)
    #[arg(long = "plugin", value_name = "FILE.wasm")]
    pub plugins: Vec<PathBuf>,
    /// A configuration value for every plugin, over its `NAME.toml`.
    /// (`--config` is taken: it names digibot's own settings file.)
    #[arg(long = "config", visible_alias = "set", value_name = "KEY=VALUE", value_parser = key_value)]
    pub set: Vec<(String, String)>,
}

pub(super) fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// What one event did in a [`Session`].
pub struct Turn {
    /// The event key was seen before: the server acknowledges a redelivery
    /// and runs nothing.
    pub duplicate: bool,
    pub handled: Handled,
    /// Pending timers (plugin, name) this event ended without firing:
    /// cancelled by a plugin, by the customer's message, or by archiving.
    pub timers_ended: Vec<(String, String)>,
}

/// What a session keeps in memory instead of a store: KV, pending timers
/// and each conversation's history, read by the turns as the store is.
#[derive(Default)]
pub struct SessionState {
    kv: MemoryKv,
    timers: Mutex<Vec<TimerRecord>>,
    /// Per conversation, oldest first, as `conversation.history` reads it.
    history: Mutex<HashMap<String, Vec<HistoryEntry>>>,
}

impl SessionState {
    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<TimerRecord>> {
        self.timers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, conversation: &str, entry: HistoryEntry) {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(conversation.to_string())
            .or_default()
            .push(entry);
    }

    /// Applies a turn's timer changes for `conversation` as the store's
    /// commit does; returns the names of the pending timers that ended
    /// without firing (cancelled by the plugin, by the customer's message,
    /// or by archiving).
    fn apply_timers(
        &self,
        conversation: &str,
        customer_wrote: bool,
        archived: bool,
        changes: &[digibot_store::TimerChanges],
        now: i64,
    ) -> Vec<(String, String)> {
        let mut pending = self.pending();
        let mut ended = Vec::new();
        let mut drop_where = |pending: &mut Vec<TimerRecord>, f: &dyn Fn(&TimerRecord) -> bool| {
            pending.retain(|t| {
                let drop = t.conversation_id == conversation && f(t);
                if drop {
                    ended.push((t.plugin.clone(), t.name.clone()));
                }
                !drop
            })
        };
        if archived {
            drop_where(&mut pending, &|_| true);
            return ended;
        }
        if customer_wrote {
            drop_where(&mut pending, &|t| t.cancel_on_customer_message);
        }
        for change in changes.iter().filter(|c| c.conversation_id == conversation) {
            for op in &change.ops {
                match op {
                    TimerOp::Schedule {
                        id,
                        name,
                        due_at,
                        payload,
                        cancel_on_customer_message,
                    } => {
                        pending.retain(|t| {
                            !(t.conversation_id == conversation
                                && t.plugin == change.plugin
                                && t.name == *name)
                        });
                        pending.push(TimerRecord {
                            id: id.clone(),
                            plugin: change.plugin.clone(),
                            conversation_id: conversation.to_string(),
                            name: name.clone(),
                            payload: payload.clone(),
                            scheduled_at: now,
                            due_at: *due_at,
                            cancel_on_customer_message: *cancel_on_customer_message,
                        });
                    }
                    TimerOp::Cancel { name } => drop_where(&mut pending, &|t| {
                        t.plugin == change.plugin && t.name == *name
                    }),
                }
            }
        }
        ended
    }
}

#[async_trait::async_trait]
impl KvRead for SessionState {
    async fn get(
        &self,
        plugin: &str,
        conversation_id: &str,
        scope: &KvScope,
        key: &str,
    ) -> Option<String> {
        self.kv.get(plugin, conversation_id, scope, key).await
    }

    async fn usage(&self, plugin: &str, conversation_id: &str, scope: &KvScope) -> KvUsage {
        self.kv.usage(plugin, conversation_id, scope).await
    }

    async fn customer_of(&self, conversation_id: &str) -> Option<String> {
        self.kv.customer_of(conversation_id).await
    }

    async fn timer_names(&self, plugin: &str, conversation_id: &str) -> Vec<String> {
        self.pending()
            .iter()
            .filter(|t| t.plugin == plugin && t.conversation_id == conversation_id)
            .map(|t| t.name.clone())
            .collect()
    }

    async fn history(&self, conversation_id: &str, limit: usize) -> Vec<HistoryEntry> {
        let entries = self
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(conversation_id)
            .cloned()
            .unwrap_or_default();
        history::last(entries, limit)
    }
}

/// Plugins and in-memory state, run event by event like the server.
pub struct Session {
    runtime: Runtime,
    /// Drives the turns (which are async) one at a time: these tools have
    /// one event in flight.
    executor: tokio::runtime::Runtime,
    entries: Vec<Entry>,
    kv: Arc<SessionState>,
    seen: HashSet<String>,
    states: HashMap<String, ConversationState>,
    release_command: String,
    /// Answers the plugins' outbound requests (`digibot test`'s stubs);
    /// none: every request is refused, as a replay must not call out.
    http: Option<Arc<dyn OutboundHttp>>,
}

impl Session {
    /// Loads the plugins with the runtime `serve` would build from
    /// `settings`.
    pub fn open(settings: &Settings, args: &PluginArgs) -> anyhow::Result<Session> {
        Session::open_in(runtime(settings)?, settings, args, None)
    }

    /// [`Session::open`] with a runtime of the caller's (`digibot test`
    /// caches compiled components across runs), and a manifest that
    /// replaces the plugins' `NAME.toml` when given.
    pub fn open_in(
        runtime: Runtime,
        settings: &Settings,
        args: &PluginArgs,
        manifest: Option<Manifest>,
    ) -> anyhow::Result<Session> {
        if args.plugins.is_empty() {
            bail!("give at least one plugin: --plugin FILE.wasm");
        }
        let mut entries: Vec<Entry> = Vec::new();
        for path in &args.plugins {
            let mut manifest = match &manifest {
                Some(m) => m.clone(),
                None => sibling_manifest(path)?.map(|(_, m)| m).unwrap_or_default(),
            };
            manifest.config.extend(args.set.iter().cloned());
            let plugin = runtime.load_file(path, manifest)?;
            if entries.iter().any(|e| e.plugin.name == plugin.name) {
                bail!("two plugins are named {}", plugin.name);
            }
            entries.push(Entry {
                plugin: Arc::new(plugin),
                health: Arc::new(Health::default()),
            });
        }
        entries.sort_by(|a, b| a.plugin.name.cmp(&b.plugin.name));
        let executor = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the plugin turns' runtime")?;
        Ok(Session {
            runtime,
            executor,
            entries,
            kv: Arc::new(SessionState::default()),
            seen: HashSet::new(),
            states: HashMap::new(),
            release_command: settings.release_command.trim().to_string(),
            http: None,
        })
    }

    /// Forgets every conversation (KV, events seen, who is in charge): the
    /// next test starts from nothing, with the plugins still loaded.
    pub fn reset(&mut self) {
        self.kv = Arc::new(SessionState::default());
        self.seen.clear();
        self.states.clear();
        self.http = None;
    }

    /// Answers the plugins' outbound HTTP requests with `http` from now on.
    pub fn set_http(&mut self, http: Arc<dyn OutboundHttp>) {
        self.http = Some(http);
    }

    /// What `plugin` stored under `key` in `conversation`.
    pub fn kv(&self, plugin: &str, conversation: &str, key: &str) -> Option<String> {
        self.kv.kv.value(plugin, conversation, key)
    }

    /// The pending timers of `conversation`, in the order they were
    /// scheduled.
    pub fn timers(&self, conversation: &str) -> Vec<TimerRecord> {
        self.kv
            .pending()
            .iter()
            .filter(|t| t.conversation_id == conversation)
            .cloned()
            .collect()
    }

    /// The event `plugin`'s pending timer `name` in `conversation` becomes
    /// when it comes due; it is no longer pending. `None`: no such timer.
    pub fn fire(
        &mut self,
        plugin: &str,
        conversation: &str,
        name: &str,
        outside_window: bool,
    ) -> Option<Event> {
        let mut pending = self.kv.pending();
        let i = pending.iter().position(|t| {
            t.plugin == plugin && t.conversation_id == conversation && t.name == name
        })?;
        let t = pending.remove(i);
        Some(
            TimerFired {
                id: t.id,
                plugin: t.plugin,
                conversation_id: t.conversation_id,
                name: t.name,
                payload: t.payload,
                scheduled_at: t.scheduled_at,
                due_at: t.due_at,
                outside_window,
            }
            .into_event(),
        )
    }

    /// The plugins' names, in the order they run.
    pub fn names(&self) -> Vec<&str> {
        self.entries
            .iter()
            .map(|e| e.plugin.name.as_str())
            .collect()
    }

    /// Who is in charge of `conversation`.
    pub fn state(&self, conversation: &str) -> ConversationState {
        self.states.get(conversation).copied().unwrap_or_default()
    }

    /// Hands `conversation` back to the bot (as the agent's release note
    /// would); returns whether a human had it.
    pub fn release(&mut self, conversation: &str) -> bool {
        self.state(conversation) == ConversationState::Human
            && self
                .states
                .insert(conversation.to_string(), ConversationState::Bot)
                .is_some()
    }

    /// Runs every plugin on `event` (in its conversation's state) and keeps
    /// their KV writes.
    pub fn run(&mut self, event: &Event) -> Turn {
        if !self.seen.insert(event.key.clone()) {
            return Turn {
                duplicate: true,
                handled: Handled::default(),
                timers_ended: Vec::new(),
            };
        }
        let conversation = event.conversation_id().unwrap_or_default().to_string();
        if let Some(customer) = event.customer_id() {
            // Timers do not name their customer: the customer scope finds it here.
            self.kv.kv.remember_customer(&conversation, customer);
        }
        let mut state = self.state(&conversation);
        match &event.kind {
            EventKind::Message(m) if m.sender.kind == SenderKind::Agent => {
                let release = m.is_internal_note()
                    && m.text()
                        .is_some_and(|t| t.trim().eq_ignore_ascii_case(&self.release_command));
                if !m.sent_through_api() {
                    self.kv
                        .remember(&conversation, HistoryEntry::from_message(m, now_ms()));
                }
                if release {
                    self.release(&conversation);
                } else if !m.sent_through_api() {
                    self.states.insert(conversation, ConversationState::Human);
                }
                return Turn {
                    duplicate: false,
                    handled: Handled::default(),
                    timers_ended: Vec::new(),
                };
            }
            EventKind::ConversationArchived { .. } => {
                let timers_ended = self
                    .kv
                    .apply_timers(&conversation, false, true, &[], now_ms());
                self.states.insert(conversation, ConversationState::Closed);
                return Turn {
                    duplicate: false,
                    handled: Handled::default(),
                    timers_ended,
                };
            }
            EventKind::Message(m) => {
                // Before the turn: the message handled is history's last.
                self.kv
                    .remember(&conversation, HistoryEntry::from_message(m, now_ms()));
            }
            _ => {}
        }
        if state == ConversationState::Closed {
            state = ConversationState::Bot;
            self.states.insert(conversation.clone(), state);
        }
        // No breaker: a tool shows every failure instead of quarantining.
        let breaker = Breaker {
            failures: 0,
            cooldown: Duration::ZERO,
        };
        let _span = dispatch::event_span(event).entered();
        let handled = match &self.http {
            None => self.executor.block_on(dispatch::run_entries(
                &self.runtime,
                &self.entries,
                event,
                state,
                self.kv.clone(),
                breaker,
            )),
            Some(http) => self.executor.block_on(dispatch::run_entries_with_http(
                &self.runtime,
                &self.entries,
                event,
                state,
                self.kv.clone(),
                http.clone(),
                breaker,
            )),
        };
        if state == ConversationState::Bot
            && handled
                .actions
                .iter()
                .any(|a| digibot_domain::actions::is_hand_off(&a.method, &a.path))
        {
            self.states
                .insert(conversation.clone(), ConversationState::Human);
        }
        for changes in &handled.kv {
            self.kv
                .kv
                .apply(&changes.plugin, &changes.conversation_id, &changes.writes);
        }
        let now = now_ms();
        for action in &handled.actions {
            if let Some(entry) = HistoryEntry::from_request(&action.body, now) {
                self.kv.remember(&conversation, entry);
            }
        }
        let customer_wrote = matches!(event.kind, EventKind::Message(_));
        let timers_ended =
            self.kv
                .apply_timers(&conversation, customer_wrote, false, &handled.timers, now);
        Turn {
            duplicate: false,
            handled,
            timers_ended,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Request {
    method: String,
    path: String,
    body: Value,
}

#[derive(Debug, Serialize)]
struct PluginReport {
    plugin: String,
    /// `ok`, `failed`, `filtered` (its `NAME.toml` does not want the event)
    /// or `skipped` (reason `human`: a human agent is in charge).
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    actions: Vec<Action>,
    requests: Vec<Request>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rejected: Vec<String>,
}

#[derive(Debug, Serialize)]
struct EventReport {
    file: String,
    /// The event's dedup key.
    event: String,
    #[serde(rename = "type")]
    kind: String,
    conversation_id: Option<String>,
    /// Whether plugins ran: not for agent or system messages, events other
    /// than new conversations and messages, or a repeated event key.
    dispatched: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
    plugins: Vec<PluginReport>,
}

fn report(file: String, event: &Event, turn: Turn) -> EventReport {
    let Turn {
        duplicate, handled, ..
    } = turn;
    let plugins = handled
        .outcomes
        .into_iter()
        .map(|o| PluginReport {
            requests: handled
                .actions
                .iter()
                .filter(|a| a.plugin == o.plugin)
                .map(|a| Request {
                    method: a.method.clone(),
                    path: a.path.clone(),
                    body: a.body.clone(),
                })
                .collect(),
            plugin: o.plugin,
            outcome: o.outcome,
            reason: o.reason,
            actions: o.returned,
            rejected: o.rejected,
        })
        .collect();
    EventReport {
        file,
        event: event.key.clone(),
        kind: event.name.clone(),
        conversation_id: event.conversation_id().map(str::to_string),
        dispatched: !duplicate && event.invokes_plugins(),
        duplicate,
        plugins,
    }
}

pub fn run(args: ReplayArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    if let Some(key) = &args.event {
        return stored::run(key, args.plugins, settings);
    }
    // Every file is read and parsed before anything runs: a typo in the
    // last file should not cost a run.
    let mut events = Vec::new();
    for file in &args.files {
        let body =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let event = Event::parse(&body)
            .with_context(|| format!("{} is not a Digishare webhook", file.display()))?;
        events.push((file.display().to_string(), event));
    }
    let mut session = Session::open(settings, &args.plugins)?;
    let mut reports = Vec::new();
    let mut problems = 0;
    for (file, event) in events {
        let turn = session.run(&event);
        let report = report(file, &event, turn);
        for p in &report.plugins {
            if let Some(reason) = p.reason.as_deref().filter(|_| p.outcome == "failed") {
                eprintln!(
                    "replay: {}: plugin {} failed: {reason}",
                    report.file, p.plugin
                );
                problems += 1;
            }
            for rejected in &p.rejected {
                eprintln!("replay: {}: {rejected}", report.file);
                problems += 1;
            }
        }
        reports.push(report);
    }
    println!("{}", serde_json::to_string_pretty(&reports)?);
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `replay --event`: a stored turn again, from its journal.
mod stored {
    use super::{PluginArgs, Request, Session};
    use crate::config::Settings;
    use anyhow::{Context, bail};
    use digibot_domain::event::ConversationState;
    use digibot_pipeline::dispatch::{self, Breaker};
    use digibot_pipeline::outbound::FromJournal;
    use serde::Serialize;
    use std::process::ExitCode;
    use std::sync::Arc;
    use std::time::Duration;

    #[derive(Debug, Serialize)]
    struct PluginReplay {
        plugin: String,
        /// The outcome of this run (`ok`, `failed`, `filtered`, `skipped`),
        /// or `not loaded` for a plugin that queued requests then but is
        /// not among those given now.
        outcome: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// What the stored turn queued for the Messages API.
        recorded: Vec<Request>,
        /// What this run would queue.
        replayed: Vec<Request>,
        same: bool,
        /// Outbound calls answered from the journal / refused.
        calls_answered: usize,
        calls_refused: usize,
    }

    #[derive(Debug, Serialize)]
    struct EventReplay {
        event: String,
        conversation_id: Option<String>,
        /// Every plugin's requests identical to the stored turn's.
        same: bool,
        plugins: Vec<PluginReplay>,
    }

    pub fn run(
        key: &str,
        mut plugins: PluginArgs,
        settings: &Settings,
    ) -> anyhow::Result<ExitCode> {
        let (stored, journal, recorded) = crate::cli::block_on(read(key, settings))??;
        if plugins.plugins.is_empty() {
            plugins.plugins = folder_plugins(settings)?;
        }
        let session = Session::open(settings, &plugins)?;
        // No breaker: a tool shows every failure instead of quarantining.
        let breaker = Breaker {
            failures: 0,
            cooldown: Duration::ZERO,
        };
        let event = &stored.event;
        let handled = session.executor.block_on(dispatch::run_entries_with_http(
            &session.runtime,
            &session.entries,
            event,
            ConversationState::Bot,
            session.kv.clone(),
            Arc::new(FromJournal::new(journal)),
            breaker,
        ));
        let requests = |plugin: &str, from: &[(String, Request)]| -> Vec<Request> {
            from.iter()
                .filter(|(p, _)| p == plugin)
                .map(|(_, r)| r.clone())
                .collect()
        };
        let replayed: Vec<(String, Request)> = handled
            .actions
            .iter()
            .map(|a| {
                (
                    a.plugin.clone(),
                    Request {
                        method: a.method.clone(),
                        path: a.path.clone(),
                        body: a.body.clone(),
                    },
                )
            })
            .collect();
        let mut reports: Vec<PluginReplay> = handled
            .outcomes
            .iter()
            .map(|o| {
                let (recorded, replayed) = (
                    requests(&o.plugin, &recorded),
                    requests(&o.plugin, &replayed),
                );
                PluginReplay {
                    plugin: o.plugin.clone(),
                    outcome: o.outcome,
                    reason: o.reason.clone(),
                    same: recorded == replayed,
                    recorded,
                    replayed,
                    calls_answered: o.calls.iter().filter(|c| c.replayed).count(),
                    calls_refused: o.calls.iter().filter(|c| !c.replayed).count(),
                }
            })
            .collect();
        for (plugin, _) in &recorded {
            if !reports.iter().any(|r| r.plugin == *plugin) {
                reports.push(PluginReplay {
                    plugin: plugin.clone(),
                    outcome: "not loaded",
                    reason: None,
                    recorded: requests(plugin, &recorded),
                    replayed: Vec::new(),
                    same: false,
                    calls_answered: 0,
                    calls_refused: 0,
                });
            }
        }
        let failed = reports.iter().any(|r| r.outcome == "failed");
        let report = EventReplay {
            event: event.key.clone(),
            conversation_id: event.conversation_id().map(str::to_string),
            same: reports.iter().all(|r| r.same),
            plugins: reports,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }

    type Read = (
        digibot_store::StoredEvent,
        Vec<digibot_store::JournalEntry>,
        Vec<(String, Request)>,
    );

    /// The event, its journal and the requests its turn queued.
    async fn read(key: &str, settings: &Settings) -> anyhow::Result<Read> {
        let store = crate::config::open_store(settings).await?;
        let Some(stored) = store.event(key).await? else {
            bail!("no event {key} in the store (see /admin/events for the keys)");
        };
        let journal = store.journal(key, None).await?;
        let recorded = match stored.event.conversation_id() {
            Some(c) => store
                .conversation(c)
                .await?
                .actions
                .into_iter()
                .filter(|a| a.event_seq == stored.seq)
                .map(|a| {
                    (
                        a.plugin,
                        Request {
                            method: a.method,
                            path: a.path,
                            body: a.body,
                        },
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        store.close();
        Ok((stored, journal, recorded))
    }

    /// Every `NAME.wasm` of the plugins folder, sorted.
    fn folder_plugins(settings: &Settings) -> anyhow::Result<Vec<std::path::PathBuf>> {
        let dir = settings
            .plugins_dir
            .as_ref()
            .context("no --plugin given and no plugins folder set (DIGIBOT_PLUGINS_DIR)")?;
        let mut found: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        found.sort();
        if found.is_empty() {
            bail!("no plugin in {}", dir.display());
        }
        Ok(found)
    }
}
