//! `digibot test [PLUGIN.wasm] [TESTS...]`: conversation tests any plugin
//! language can run. A test file (TOML, or YAML with the same schema) is
//! one conversation: turns the
//! customer (or Digishare) sends, each with what the plugin must answer:
//! its actions, or the exact Messages API requests they become (matched
//! exactly or partially), its KV state afterwards, or a failure; `[[http]]`
//! stubs answer the plugin's outbound requests by URL. A `timer` turn fires
//! a timer the plugin scheduled earlier in the file, and `scheduled`,
//! `cancelled` and `pending_timers` check its timers. The plugin runs in
//! the server's own dispatch (routing, filters, limits, request building,
//! who is in charge) through replay's [`Session`]; nothing is compiled but
//! the component, and compiled components are cached across runs.
//!
//! Prints one line per file, a diff for each failed expectation, and exits
//! non-zero when a test fails or a test file is invalid. The format is in
//! docs/testing.md.

use super::replay::{PluginArgs, Session, Turn as Ran};
use crate::config::Settings;
use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use digibot_domain::event::{
    Choice, Content, Event, Location, customer_message_event, new_conversation_event,
};
use digibot_domain::outbound::{Refusal, Target};
use digibot_domain::time::now_ms;
use digibot_domain::timer::TimerOp;
use digibot_runtime::{Manifest, OutboundHttp, OutboundRequest, OutboundResponse, Runtime, Sent};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The plugin component, then test files (`.toml`, `.yaml`, `.yml`, or
    /// `.json` named one by one) or
    /// folders of them. Without a `.wasm`: the component `digibot build`
    /// made in the current folder; without tests: those in `tests/`.
    #[arg(value_name = "PLUGIN.wasm [TESTS]")]
    pub paths: Vec<PathBuf>,
    /// A configuration value for the plugin, over its `NAME.toml` (a test
    /// file's `[config]` goes over both).
    #[arg(long = "config", visible_alias = "set", value_name = "KEY=VALUE", value_parser = super::replay::key_value)]
    pub set: Vec<(String, String)>,
    /// Also print each file's turn times (a new instance and the call, as
    /// on the server's event path; the first call of a file included).
    #[arg(long)]
    pub timings: bool,
    /// Write this test file (`.toml`, `.yaml`, `.json`) from the stored
    /// conversation `--conversation`, or the dashboard simulator's
    /// conversation `--simulator`, first, then run it: the plugin's
    /// requests then are the expectations, its journaled outbound calls the
    /// `[[http]]` stubs.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// The stored conversation `--record` writes a test of.
    #[arg(
        long,
        value_name = "ID",
        requires = "record",
        conflicts_with = "simulator"
    )]
    pub conversation: Option<String>,
    /// The simulated conversation of a running server's dashboard that
    /// `--record` writes a test of (through its admin API:
    /// DIGIBOT_ADMIN_TOKEN).
    #[arg(long, value_name = "NAME", requires = "record")]
    pub simulator: Option<String>,
    /// The running server `--simulator` reads (default: `http://` +
    /// DIGIBOT_LISTEN).
    #[arg(long, value_name = "URL", requires = "simulator")]
    pub url: Option<String>,
    /// The store `--record` reads: digibot's data folder (its SQLite
    /// database), instead of DIGIBOT_DATA_DIR; PostgreSQL is read when
    /// DIGIBOT_DATABASE_URL is set, as the server does.
    #[arg(long, value_name = "DIR", requires = "record")]
    pub db: Option<PathBuf>,
}

/// One test file: one conversation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// What the conversation checks (shown on failure).
    #[serde(default)]
    name: Option<String>,
    /// Plugin configuration for this test (`[config]` of `NAME.toml`).
    #[serde(default)]
    config: BTreeMap<String, String>,
    /// The plugin's `NAME.toml` for this test (`[plugin.grants]`,
    /// `[plugin.limits]`...), instead of the one beside the component.
    #[serde(default)]
    plugin: Option<toml::Table>,
    /// Answers to the plugin's outbound HTTP requests.
    #[serde(default)]
    http: Vec<Stub>,
    #[serde(default, rename = "turn")]
    turns: Vec<Turn>,
}

/// A canned response for requests to one URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stub {
    /// The whole URL, query included, as the plugin requests it.
    url: String,
    /// Only this method (any when unset).
    #[serde(default)]
    method: Option<String>,
    #[serde(default = "ok_status")]
    status: u16,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// The body, as text.
    #[serde(default)]
    body: Option<String>,
    /// The body, as JSON (sets `content-type: application/json`).
    #[serde(default)]
    json: Option<Value>,
}

fn ok_status() -> u16 {
    200
}

/// One event, and what the plugin must make of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Turn {
    /// A new conversation with a customer of this name.
    #[serde(default)]
    new_conversation: Option<String>,
    /// The customer writes this text.
    #[serde(default)]
    message: Option<String>,
    /// The customer taps a reply button.
    #[serde(default)]
    button: Option<ChoiceTurn>,
    /// The customer picks a list row.
    #[serde(default)]
    list: Option<ChoiceTurn>,
    /// The customer shares a location.
    #[serde(default)]
    location: Option<LocationTurn>,
    /// A whole webhook payload: a JSON file (relative to the test file),
    /// or the JSON itself (a string starting with `{`, or a table).
    #[serde(default)]
    webhook: Option<Value>,
    /// A timer the plugin scheduled earlier comes due (by name).
    #[serde(default)]
    timer: Option<TimerTurn>,
    /// An event in digibot's stored form (what `--record` writes), as a
    /// table or a JSON string.
    #[serde(default)]
    event: Option<Value>,
    /// `exact` (the default) or `partial`: every field the expectation
    /// names must be there with that value; others are not looked at.
    #[serde(default, rename = "match")]
    mode: Mode,
    /// The actions the plugin returns, as `digibot replay` prints them.
    #[serde(default)]
    actions: Option<Vec<Value>>,
    /// The Messages API requests they become (`method`, `path`, `body`).
    #[serde(default)]
    requests: Option<Vec<Value>>,
    /// The plugin's KV in this conversation after the turn (`""`: absent).
    #[serde(default)]
    kv: BTreeMap<String, String>,
    /// The timers the turn scheduled (`name`, `payload`, `after_ms`,
    /// `cancel_on_customer_message`), in order.
    #[serde(default)]
    scheduled: Option<Vec<Value>>,
    /// The names of the plugin's pending timers the turn ended without
    /// firing: cancelled by the plugin, or by the customer's message.
    #[serde(default)]
    cancelled: Option<Vec<String>>,
    /// The names of the plugin's timers pending in the turn's conversation
    /// after it, in the order they were scheduled.
    #[serde(default)]
    pending_timers: Option<Vec<String>>,
    /// The turn fails, with a reason containing this.
    #[serde(default)]
    fails: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChoiceTurn {
    id: String,
    #[serde(default)]
    title: Option<String>,
}

/// `timer = "follow-up"`, or `timer = { name = "follow-up", outside_window
/// = true, conversation = "conv_2" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TimerTurn {
    Name(String),
    Fired(FiredTimer),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FiredTimer {
    name: String,
    /// Fired as if the customer last wrote over 24 hours ago on WhatsApp.
    #[serde(default)]
    outside_window: bool,
    /// The conversation the timer is in (default: the current one).
    #[serde(default)]
    conversation: Option<String>,
}

impl TimerTurn {
    fn fired(&self) -> FiredTimer {
        match self {
            TimerTurn::Name(name) => FiredTimer {
                name: name.clone(),
                outside_window: false,
                conversation: None,
            },
            TimerTurn::Fired(f) => FiredTimer {
                name: f.name.clone(),
                outside_window: f.outside_window,
                conversation: f.conversation.clone(),
            },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocationTurn {
    latitude: f64,
    longitude: f64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    address: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Exact,
    Partial,
}

/// Answers requests from the test file's stubs, inside the plugin's grant
/// (a stub does not widen it); a request no stub answers is refused, with
/// a message saying what to add.
struct Stubs(Vec<Stub>);

#[async_trait::async_trait]
impl OutboundHttp for Stubs {
    async fn send(&self, request: OutboundRequest) -> Sent {
        let url = request.url();
        let result = match Target::parse(&url) {
            Err(e) => Err(Refusal::InvalidUrl(e.to_string())),
            Ok(target) if request.policy.grant_for(&target).is_none() => {
                Err(Refusal::NotGranted { url: url.clone() })
            }
            Ok(_) => match self.0.iter().find(|s| {
                s.url == url
                    && s.method
                        .as_deref()
                        .is_none_or(|m| m.eq_ignore_ascii_case(&request.method))
            }) {
                Some(stub) => Ok(stub.response()),
                None => Err(Refusal::Offline(format!(
                    "in digibot test: no [[http]] stub answers {} {url}",
                    request.method
                ))),
            },
        };
        Sent {
            result,
            replayed: false,
        }
    }
}

impl Stub {
    fn response(&self) -> OutboundResponse {
        let mut headers: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
            .collect();
        let body = match (&self.json, &self.body) {
            (Some(json), _) => {
                if !headers.iter().any(|(k, _)| k == "content-type") {
                    headers.push(("content-type".into(), b"application/json".to_vec()));
                }
                json.to_string()
            }
            (None, Some(body)) => body.clone(),
            (None, None) => String::new(),
        };
        OutboundResponse {
            status: self.status,
            headers,
            body: Bytes::from(body),
        }
    }
}

/// Where the plugin and the tests are, from the command line.
fn locate(args: &TestArgs) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let mut paths = args.paths.clone();
    let plugin = match paths
        .iter()
        .position(|p| p.extension().is_some_and(|e| e == "wasm"))
    {
        Some(i) => paths.remove(i),
        None => super::build::built_component(Path::new("."))?,
    };
    if paths.is_empty() {
        paths.push(PathBuf::from("tests"));
    }
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(&path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| Format::is_test(p))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("no test file (*.toml, *.yaml) in {}", path.display());
            }
            files.extend(found);
        } else {
            files.push(path);
        }
    }
    Ok((plugin, files))
}

/// Compiled components, kept across runs: a Python or TypeScript plugin
/// takes seconds to compile, and a test run should not pay it every time.
fn cache_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?
        .join("digibot")
        .join("compiled");
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .ok()?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

fn open_session(
    settings: &Settings,
    plugin: &Path,
    set: &[(String, String)],
    manifest: Option<Manifest>,
) -> anyhow::Result<Session> {
    let runtime = Runtime::new(digibot_runtime::RuntimeConfig {
        cache_dir: cache_dir(),
        // Every turn on a new instance, made on the turn's path: what a
        // test measures with --timings is the server's worst case.
        warm_instances: 0,
        ..settings.runtime_config()
    })
    .map_err(|e| anyhow::anyhow!("cannot start the plugin runtime: {e:#}"))?;
    Session::open_in(
        runtime,
        settings,
        &PluginArgs {
            plugins: vec![plugin.to_path_buf()],
            set: set.to_vec(),
        },
        manifest,
    )
}

pub fn run(mut args: TestArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    if let Some(file) = args.record.clone() {
        let mut settings = settings.clone();
        if let Some(dir) = &args.db {
            settings.data_dir = dir.clone();
        }
        // Only the component is named: the recorded file is what runs.
        args.paths
            .retain(|p| p.extension().is_some_and(|e| e == "wasm"));
        let plugin = match args.paths.first() {
            Some(wasm) => wasm.clone(),
            None => super::build::built_component(Path::new("."))?,
        };
        let name = digibot_runtime::plugin_name(&plugin);
        let (recorded, from) = match (&args.conversation, &args.simulator) {
            (Some(conversation), _) => (
                super::record::record(&settings, conversation, &name, &file)?,
                format!("conversation {conversation}"),
            ),
            (None, Some(simulated)) => (
                super::record::record_simulated(
                    &settings,
                    args.url.as_deref(),
                    simulated,
                    &name,
                    &file,
                )?,
                format!("simulated conversation {simulated}"),
            ),
            (None, None) => {
                bail!("--record needs --conversation ID (stored) or --simulator NAME (dashboard)")
            }
        };
        println!(
            "recorded {} ({} turns, {} [[http]] stubs) from {from}",
            file.display(),
            recorded.turns,
            recorded.stubs
        );
        args.paths.push(file);
    }
    let (plugin, files) = locate(&args)?;
    // Every file is read before the plugin is compiled: a typo should not
    // cost a compile.
    let mut tests = Vec::new();
    let mut failed = 0;
    for file in &files {
        match read_test(file) {
            Ok(test) => tests.push((file, test)),
            Err(e) => {
                println!("{} ... INVALID\n  {e:#}", file.display());
                failed += 1;
            }
        }
    }
    let mut base: Option<Session> = None;
    for (file, test) in &tests {
        let mut set = args.set.clone();
        set.extend(test.config.iter().map(|(k, v)| (k.clone(), v.clone())));
        // A file without its own config reuses the one loaded plugin.
        let mut own;
        let session = if test.config.is_empty() && test.plugin.is_none() {
            if base.is_none() {
                base = Some(open_session(settings, &plugin, &args.set, None)?);
            }
            let session = base.as_mut().context("the plugin is loaded")?;
            session.reset();
            session
        } else {
            let manifest = match &test.plugin {
                Some(table) => Some(
                    Manifest::parse(&table.to_string())
                        .with_context(|| format!("{}: invalid [plugin]", file.display()))?,
                ),
                None => None,
            };
            own = open_session(settings, &plugin, &set, manifest)?;
            &mut own
        };
        session.set_http(Arc::new(Stubs(test.http.clone())));
        let (problems, times) = run_test(session, file, test);
        let title = test
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        if problems.is_empty() {
            println!(
                "{}{title} ... ok ({} turns)",
                file.display(),
                test.turns.len()
            );
            if args.timings {
                println!("  {}", timings(times));
            }
        } else {
            failed += 1;
            println!("{}{title} ... FAILED", file.display());
            for problem in problems {
                for line in problem.lines() {
                    println!("  {line}");
                }
            }
        }
    }
    let passed = files.len() - failed;
    println!(
        "{} test file{}: {passed} passed, {failed} failed",
        files.len(),
        if files.len() == 1 { "" } else { "s" }
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A test file's syntax, from its extension: the same schema either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Toml,
    Yaml,
    /// What the dashboard's "Save as test" downloads.
    Json,
}

impl Format {
    fn of(file: &Path) -> Format {
        match file.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Format::Yaml,
            Some("json") => Format::Json,
            _ => Format::Toml,
        }
    }

    /// A file a folder of tests holds. Not `.json`: a folder of tests
    /// often holds JSON fixtures too; a JSON test is named by its path.
    fn is_test(path: &Path) -> bool {
        path.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "toml" | "yaml" | "yml"))
    }
}

fn read_test(file: &Path) -> anyhow::Result<TestFile> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let test: TestFile = match Format::of(file) {
        Format::Toml => toml::from_str(&text).context("not a conversation test")?,
        Format::Yaml => serde_yaml_ng::from_str(&text).context("not a conversation test")?,
        Format::Json => serde_json::from_str(&text).context("not a conversation test")?,
    };
    if test.turns.is_empty() {
        bail!("no [[turn]]");
    }
    if let Some(table) = &test.plugin {
        Manifest::parse(&table.to_string()).context("invalid [plugin]")?;
    }
    for (i, turn) in test.turns.iter().enumerate() {
        let inputs = [
            turn.new_conversation.is_some(),
            turn.message.is_some(),
            turn.button.is_some(),
            turn.list.is_some(),
            turn.location.is_some(),
            turn.webhook.is_some(),
            turn.timer.is_some(),
            turn.event.is_some(),
        ];
        if inputs.iter().filter(|x| **x).count() != 1 {
            bail!(
                "turn {}: give exactly one of new_conversation, message, button, list, location, webhook, timer, event",
                i + 1
            );
        }
    }
    Ok(test)
}

/// The conversation a test file is in, as the harness numbers them.
struct Customer {
    conversation: u32,
    /// An event was sent in the current conversation.
    started: bool,
    name: String,
    messages: u32,
}

impl Customer {
    fn conversation_id(&self) -> String {
        format!("conv_{}", self.conversation)
    }

    fn sends(&mut self, content: Content) -> Event {
        self.messages += 1;
        self.started = true;
        customer_message_event(
            &self.conversation_id(),
            &format!("msg_test_{}", self.messages),
            &self.name,
            content,
        )
    }
}

fn choice(c: &ChoiceTurn) -> Choice {
    Choice {
        id: c.id.clone(),
        title: c.title.clone().unwrap_or_else(|| c.id.clone()),
        description: None,
    }
}

/// Runs the conversation; the problems found, each a readable paragraph.
fn run_test(session: &mut Session, file: &Path, test: &TestFile) -> (Vec<String>, Vec<u64>) {
    let plugin = session.names().first().map(|n| n.to_string());
    let Some(plugin) = plugin else {
        return (vec!["no plugin loaded".into()], Vec::new());
    };
    let mut times = Vec::new();
    let mut customer = Customer {
        conversation: 1,
        started: false,
        name: "Customer".into(),
        messages: 0,
    };
    let mut problems = Vec::new();
    for (i, turn) in test.turns.iter().enumerate() {
        let made = match &turn.timer {
            Some(timer) => fire(session, &plugin, &customer, &timer.fired()),
            None => make_event(file, turn, &mut customer).map(|(what, e)| (what, Some(e))),
        };
        let (what, event) = match made {
            Ok(x) => x,
            Err(e) => {
                problems.push(format!("turn {}: {e:#}", i + 1));
                break;
            }
        };
        let here = format!("turn {} ({what})", i + 1);
        let conversation = match &event {
            Some(event) => event.conversation_id().unwrap_or_default().to_string(),
            // A held timer's.
            None => turn
                .timer
                .as_ref()
                .and_then(|t| t.fired().conversation)
                .unwrap_or_else(|| customer.conversation_id()),
        };
        let before = now_ms();
        let ran = match &event {
            Some(event) => session.run(event),
            // Held: a human is in charge, nothing runs.
            None => Ran {
                duplicate: false,
                handled: Default::default(),
                timers_ended: Vec::new(),
            },
        };
        let after = now_ms();
        let outcome = ran.handled.outcomes.iter().find(|o| o.plugin == plugin);
        if let Some(o) = outcome.filter(|o| matches!(o.outcome, "ok" | "failed")) {
            times.push(o.elapsed_us);
        }
        let failure = outcome
            .filter(|o| o.outcome == "failed")
            .map(|o| o.reason.clone().unwrap_or_default());
        match (&turn.fails, &failure) {
            (Some(want), Some(got)) if got.contains(want.as_str()) => {}
            (Some(want), Some(got)) => problems.push(format!(
                "{here}: failed with {got:?}, which does not contain {want:?}"
            )),
            (Some(want), None) => problems.push(format!(
                "{here}: expected a failure containing {want:?}, but the turn succeeded"
            )),
            (None, Some(got)) => problems.push(format!("{here}: the plugin failed: {got}")),
            (None, None) => {}
        }
        if let Some(o) = outcome {
            for rejected in &o.rejected {
                problems.push(format!("{here}: digibot refused an action: {rejected}"));
            }
        }
        if let Some(want) = &turn.actions {
            let got: Vec<Value> = outcome
                .map(|o| {
                    o.returned
                        .iter()
                        .map(|a| serde_json::to_value(a).unwrap_or(Value::Null))
                        .collect()
                })
                .unwrap_or_default();
            check(&mut problems, &here, "actions", turn.mode, want, &got);
        }
        if let Some(want) = &turn.requests {
            let got: Vec<Value> = ran
                .handled
                .actions
                .iter()
                .filter(|a| a.plugin == plugin)
                .map(|a| serde_json::json!({"method": a.method, "path": a.path, "body": a.body}))
                .collect();
            check(&mut problems, &here, "requests", turn.mode, want, &got);
        }
        if let Some(want) = &turn.scheduled {
            let got = scheduled(&ran, &plugin, &conversation, want, (before, after));
            check(
                &mut problems,
                &here,
                "scheduled timers",
                turn.mode,
                want,
                &got,
            );
        }
        if let Some(want) = &turn.cancelled {
            let got: Vec<Value> = ran
                .timers_ended
                .iter()
                .filter(|(p, _)| *p == plugin)
                .map(|(_, name)| Value::from(name.as_str()))
                .collect();
            let want: Vec<Value> = want.iter().map(|n| Value::from(n.as_str())).collect();
            check(
                &mut problems,
                &here,
                "cancelled timers",
                Mode::Exact,
                &want,
                &got,
            );
        }
        if let Some(want) = &turn.pending_timers {
            let got: Vec<Value> = session
                .timers(&conversation)
                .into_iter()
                .filter(|t| t.plugin == plugin)
                .map(|t| Value::from(t.name))
                .collect();
            let want: Vec<Value> = want.iter().map(|n| Value::from(n.as_str())).collect();
            check(
                &mut problems,
                &here,
                "pending timers",
                Mode::Exact,
                &want,
                &got,
            );
        }
        for (key, want) in &turn.kv {
            let got = session.kv(&plugin, &conversation, key);
            let want = (!want.is_empty()).then_some(want.as_str());
            if got.as_deref() != want {
                problems.push(format!(
                    "{here}: kv {key:?} is {}, expected {}",
                    shown(got.as_deref()),
                    shown(want)
                ));
            }
        }
    }
    (problems, times)
}

/// The event a `timer` turn sends: the plugin's pending timer of that
/// name, with its payload as scheduled; `None` when a human is in charge
/// (the server holds it until the conversation is handed back: it stays
/// pending).
fn fire(
    session: &mut Session,
    plugin: &str,
    customer: &Customer,
    timer: &FiredTimer,
) -> anyhow::Result<(String, Option<Event>)> {
    let conversation = timer
        .conversation
        .clone()
        .unwrap_or_else(|| customer.conversation_id());
    let what = format!("timer {:?}", timer.name);
    if session.state(&conversation) == digibot_domain::event::ConversationState::Human {
        let pending = session
            .timers(&conversation)
            .iter()
            .any(|t| t.plugin == plugin && t.name == timer.name);
        if pending {
            return Ok((format!("{what}, held: a human is in charge"), None));
        }
    }
    match session.fire(plugin, &conversation, &timer.name, timer.outside_window) {
        Some(event) => Ok((what, Some(event))),
        None => {
            let pending: Vec<String> = session
                .timers(&conversation)
                .into_iter()
                .filter(|t| t.plugin == plugin)
                .map(|t| format!("{:?}", t.name))
                .collect();
            bail!(
                "{what}: no timer {:?} pending in {conversation} (pending: {})",
                timer.name,
                if pending.is_empty() {
                    "none".to_string()
                } else {
                    pending.join(", ")
                }
            )
        }
    }
}

/// The timers `plugin` scheduled in the turn, as a test file writes them.
/// The host adds `after_ms` to its clock during the turn, which ran between
/// `before` and `after`: an expected `after_ms` that fits is taken as is.
fn scheduled(
    ran: &Ran,
    plugin: &str,
    conversation: &str,
    want: &[Value],
    (before, after): (i64, i64),
) -> Vec<Value> {
    ran.handled
        .timers
        .iter()
        .filter(|c| c.plugin == plugin && c.conversation_id == conversation)
        .flat_map(|c| &c.ops)
        .filter_map(|op| match op {
            TimerOp::Schedule {
                name,
                due_at,
                payload,
                cancel_on_customer_message,
                ..
            } => Some((name, *due_at, payload, *cancel_on_customer_message)),
            TimerOp::Cancel { .. } => None,
        })
        .enumerate()
        .map(|(i, (name, due_at, payload, cancel))| {
            let (lo, hi) = (due_at - after, due_at - before);
            let wanted = want
                .get(i)
                .and_then(|w| w.get("after_ms"))
                .and_then(Value::as_i64)
                .filter(|w| (lo..=hi).contains(w));
            // Otherwise, for the diff: a whole second when one fits.
            let seconds = hi - hi.rem_euclid(1000);
            let shown = if seconds >= lo { seconds } else { hi };
            serde_json::json!({
                "name": name,
                "payload": payload,
                "after_ms": wanted.unwrap_or(shown),
                "cancel_on_customer_message": cancel,
            })
        })
        .collect()
}

/// `turn times: median 1210 µs, p99 1700 µs, fastest ..., slowest ...`.
fn timings(mut times: Vec<u64>) -> String {
    if times.is_empty() {
        return "turn times: no turn ran the plugin".to_string();
    }
    times.sort_unstable();
    // Nearest rank: the smallest time at least 99% of the turns reach.
    let p99 = times[(times.len() * 99).div_ceil(100).saturating_sub(1)];
    format!(
        "turn times: median {} µs, p99 {p99} µs, fastest {} µs, slowest {} µs ({} turns ran the plugin; a new instance each)",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        times.len()
    )
}

fn shown(v: Option<&str>) -> String {
    v.map_or("absent".to_string(), |v| format!("{v:?}"))
}

fn make_event(
    file: &Path,
    turn: &Turn,
    customer: &mut Customer,
) -> anyhow::Result<(String, Event)> {
    if let Some(name) = &turn.new_conversation {
        if customer.started {
            customer.conversation += 1;
        }
        customer.started = true;
        customer.name = name.clone();
        let event = new_conversation_event(&customer.conversation_id(), name);
        return Ok((format!("new conversation with {name:?}"), event));
    }
    if let Some(text) = &turn.message {
        let event = customer.sends(Content::Text { text: text.clone() });
        return Ok((format!("message {text:?}"), event));
    }
    if let Some(c) = &turn.button {
        let event = customer.sends(Content::ButtonReply(choice(c)));
        return Ok((format!("button {:?}", c.id), event));
    }
    if let Some(c) = &turn.list {
        let event = customer.sends(Content::ListReply(choice(c)));
        return Ok((format!("list choice {:?}", c.id), event));
    }
    if let Some(l) = &turn.location {
        let event = customer.sends(Content::Location(Location {
            latitude: l.latitude,
            longitude: l.longitude,
            name: l.name.clone(),
            address: l.address.clone(),
        }));
        return Ok((format!("location {},{}", l.latitude, l.longitude), event));
    }
    if let Some(event) = &turn.event {
        let event: Event = match event {
            Value::String(s) => serde_json::from_str(s),
            other => serde_json::from_value(other.clone()),
        }
        .context("not an event in digibot's stored form")?;
        return Ok((format!("event {}", event.key), event));
    }
    if let Some(webhook) = &turn.webhook {
        let (what, value) = match webhook {
            Value::String(s) if s.trim_start().starts_with('{') => {
                ("webhook".to_string(), serde_json::from_str(s)?)
            }
            Value::String(path) => {
                let path = file.parent().unwrap_or(Path::new(".")).join(path);
                let text = std::fs::read(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                (
                    format!("webhook {}", path.display()),
                    serde_json::from_slice(&text)
                        .with_context(|| format!("{} is not JSON", path.display()))?,
                )
            }
            other => ("webhook".to_string(), other.clone()),
        };
        let event = Event::from_value(value).context("not a Digishare webhook")?;
        return Ok((what, event));
    }
    bail!("no input")
}

/// Compares `got` with `want` and, when they differ, records a diff.
fn check(
    problems: &mut Vec<String>,
    here: &str,
    what: &str,
    mode: Mode,
    want: &[Value],
    got: &[Value],
) {
    let want = Value::Array(want.to_vec());
    let got = Value::Array(got.to_vec());
    let same = match mode {
        Mode::Exact => want == got,
        Mode::Partial => contains(&got, &want),
    };
    if !same {
        let how = match mode {
            Mode::Exact => "exact match",
            Mode::Partial => "partial match",
        };
        problems.push(format!(
            "{here}: {what} differ ({how}; - expected, + actual)\n{}",
            diff(&pretty(&want), &pretty(&got))
        ));
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// `got` has every field `want` names, with the same value; arrays must
/// have the same length. Numbers compare by value (TOML has `1`, JSON `1.0`).
fn contains(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => w
            .iter()
            .all(|(k, w)| g.get(k).is_some_and(|g| contains(g, w))),
        (Value::Array(g), Value::Array(w)) => {
            g.len() == w.len() && g.iter().zip(w).all(|(g, w)| contains(g, w))
        }
        (Value::Number(g), Value::Number(w)) => g.as_f64() == w.as_f64(),
        _ => got == want,
    }
}

/// A line diff of two texts (longest common subsequence): `  ` common,
/// `- ` only in `want`, `+ ` only in `got`.
fn diff(want: &str, got: &str) -> String {
    let a: Vec<&str> = want.lines().collect();
    let b: Vec<&str> = got.lines().collect();
    // lcs[i][j]: the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out += &format!("  {}\n", a[i]);
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out += &format!("- {}\n", a[i]);
            i += 1;
        } else {
            out += &format!("+ {}\n", b[j]);
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn partial_match_looks_only_at_named_fields() {
        let got = json!([{"kind": "text", "body": "hi", "reply_to": "m1"}]);
        assert!(contains(&got, &json!([{"body": "hi"}])));
        assert!(!contains(&got, &json!([{"body": "ho"}])));
        assert!(!contains(&got, &json!([])));
        assert!(contains(&json!({"n": 1.0}), &json!({"n": 1})));
    }

    #[test]
    fn diff_marks_what_changed() {
        let d = diff("a\nb\nc", "a\nx\nc");
        assert_eq!(d, "  a\n- b\n+ x\n  c\n");
    }

    #[test]
    fn yaml_files_have_the_toml_schema() {
        let dir = std::env::temp_dir().join(format!("digibot-test-yaml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = dir.join("t.yaml");
        std::fs::write(
            &yaml,
            "name: yaml\nconfig: { after_ms: \"1000\" }\nplugin:\n  grants: { http: [\"https://a.example/\"] }\n\
             http:\n  - { url: \"https://a.example/x\", json: { ok: true } }\n\
             turn:\n  - message: hi\n    match: partial\n    actions: [{ kind: text, body: hi }]\n    kv: { n: \"1\" }\n\
             \x20 - timer: follow-up\n    scheduled: []\n",
        )
        .unwrap();
        let test = read_test(&yaml).unwrap();
        assert_eq!(test.name.as_deref(), Some("yaml"));
        assert_eq!(test.config["after_ms"], "1000");
        assert!(test.plugin.is_some());
        assert_eq!(test.http[0].json, Some(serde_json::json!({"ok": true})));
        assert_eq!(test.turns.len(), 2);
        assert_eq!(test.turns[0].mode, Mode::Partial);
        assert!(matches!(&test.turns[1].timer, Some(TimerTurn::Name(n)) if n == "follow-up"));
        // Unknown keys are refused as in TOML.
        std::fs::write(&yaml, "turn:\n  - mesage: hi\n").unwrap();
        let e = format!("{:#}", read_test(&yaml).unwrap_err());
        assert!(e.contains("mesage"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_turn_has_exactly_one_input() {
        let dir = std::env::temp_dir().join(format!("digibot-test-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.toml");
        std::fs::write(
            &file,
            "[[turn]]\nmessage = \"hi\"\nbutton = { id = \"x\" }\n",
        )
        .unwrap();
        let e = read_test(&file).unwrap_err().to_string();
        assert!(e.contains("exactly one of"), "{e}");
        std::fs::write(&file, "[[turn]]\nmesage = \"hi\"\n").unwrap();
        let e = format!("{:#}", read_test(&file).unwrap_err());
        assert!(e.contains("mesage"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
