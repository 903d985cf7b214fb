//! A test harness for plugin authors: from a plugin's own `cargo test`,
//! build the crate to a component, run it in digibot's real runtime (the
//! same validation, sandbox and limits as the server), feed it events and
//! assert on the actions it returns, without a server or Digishare.
//!
//! Add `digibot-testing` as a dev-dependency of the plugin crate (it
//! compiles the runtime, not the server), then:
//!
//! ```no_run
//! use digibot_testing::{Action, Bot};
//!
//! // Builds this crate for wasm32-wasip2 (into target/digibot-test) and loads it.
//! let mut bot = Bot::build(env!("CARGO_MANIFEST_DIR"))?.config("language", "en");
//!
//! let greeting = bot.new_conversation("Salma")?;
//! assert_eq!(
//!     greeting,
//!     vec![Action::text("Hello Salma! Write anything and I will say it back.")?]
//! );
//!
//! // The customer types, taps buttons, picks rows, shares a location; KV
//! // state is kept between the calls of one conversation.
//! let reply = bot.message("hi")?;
//! assert_eq!(reply, vec![Action::text("hi")?]);
//! assert_eq!(bot.location(33.57, -7.59)?, vec![]);
//!
//! // The exact Messages API requests the server would send for a reply.
//! let requests = bot.requests(&reply)?;
//! assert_eq!(requests[0].path, "/v1/messages");
//! assert_eq!(requests[0].body["body"], "hi");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Conversation semantics are the server's: [`Bot::event`] takes a real
//! webhook payload, and agent messages or other events invoke nothing.

pub mod build;

use build::{BuildError, Diagnostics, cargo_build};
use digibot_domain::actions::{self, ApiRequest, Rejected};
use digibot_domain::event::{
    Choice, Content, Event, Location, customer_message_event, new_conversation_event,
};
use digibot_runtime::{
    Call, Limits, LoadError, Manifest, MemoryKv, Plugin, Runtime, RuntimeConfig,
};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use digibot_domain::event::ConversationState;
pub use digibot_protocol::{self as protocol, Action};
pub use digibot_runtime::{Failure, LogLine};
pub use serde_json::{Value, json};

/// The compute budget and wall-clock deadline of one invocation in tests.
/// The server's defaults are much shorter; tests check behaviour, and a
/// loaded CI machine must not turn a correct bot into a flaky test.
const TEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a bot could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Load { path: PathBuf, source: LoadError },
    #[error("cannot start the plugin runtime: {0}")]
    Runtime(String),
}

/// Crates already built by this test process: the other tests reuse the
/// component (and wait here instead of all running cargo at once).
static BUILT: Mutex<BTreeMap<PathBuf, PathBuf>> = Mutex::new(BTreeMap::new());

/// One plugin, loaded in the real runtime, talking with a simulated
/// customer. Each [`Bot::new_conversation`] opens a new conversation (with
/// fresh KV state); the other calls continue the current one.
pub struct Bot {
    runtime: Runtime,
    /// Drives the runtime's async turns, so that this API stays plain
    /// function calls for plugin authors.
    executor: tokio::runtime::Runtime,
    name: String,
    path: PathBuf,
    bytes: Vec<u8>,
    manifest: Manifest,
    /// `None` after [`Bot::config`] until the next call reloads it.
    plugin: Option<Plugin>,
    kv: Arc<MemoryKv>,
    conversation: u32,
    /// No event was sent in the current conversation yet.
    fresh: bool,
    customer: String,
    messages: u64,
    last_conversation: String,
    /// Event keys delivered so far.
    seen: HashSet<String>,
    /// Hand-backs so far (each a distinct event).
    hand_backs: i64,
    logs: Vec<LogLine>,
    output: String,
    /// The conversation's state the plugin is told.
    state: ConversationState,
}

impl std::fmt::Debug for Bot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bot")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("conversation", &self.conversation_id())
            .finish_non_exhaustive()
    }
}

/// `<target>/digibot-test` of the running test binary
/// (`<target>/debug/deps/NAME-HASH`): a target dir of its own, because the
/// `cargo test` that runs us holds the lock on the main one.
fn test_target_dir(crate_dir: &Path) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let deps = exe
                .ancestors()
                .find(|a| a.file_name() == Some("deps".as_ref()))?;
            Some(deps.parent()?.parent()?.join("digibot-test"))
        })
        .unwrap_or_else(|| crate_dir.join("target").join("digibot-test"))
}

impl Bot {
    /// Builds the plugin crate in `crate_dir` (pass
    /// `env!("CARGO_MANIFEST_DIR")`) for `wasm32-wasip2` in release mode,
    /// into `target/digibot-test`, and loads it. Built once per test
    /// process; cargo's diagnostics are in the error if the build fails.
    pub fn build(crate_dir: impl AsRef<Path>) -> Result<Bot, HarnessError> {
        let dir = crate_dir.as_ref();
        let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        let wasm = match built.get(&key) {
            Some(wasm) => wasm.clone(),
            None => {
                let out = cargo_build(dir, Some(&test_target_dir(dir)), Diagnostics::Capture)?;
                let wasm = out
                    .main
                    .or_else(|| out.components.into_iter().next())
                    .ok_or(BuildError::NoComponent)?;
                built.insert(key, wasm.clone());
                wasm
            }
        };
        drop(built);
        Bot::load(wasm)
    }

    /// Loads a built component (`NAME.wasm`; the plugin is named `NAME`).
    pub fn load(path: impl AsRef<Path>) -> Result<Bot, HarnessError> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| HarnessError::Read {
            path: path.clone(),
            source,
        })?;
        let name = digibot_runtime::plugin_name(&path);
        let runtime = Runtime::new(RuntimeConfig {
            pooling: false,
            defaults: Limits {
                compute: TEST_TIMEOUT,
                wall: TEST_TIMEOUT,
                ..Limits::default()
            },
            ..RuntimeConfig::default()
        })
        .map_err(|e| HarnessError::Runtime(format!("{e:#}")))?;
        let executor = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HarnessError::Runtime(e.to_string()))?;
        let manifest = Manifest::default();
        let plugin = runtime
            .load(&name, &bytes, manifest.clone())
            .map_err(|source| HarnessError::Load {
                path: path.clone(),
                source,
            })?;
        Ok(Bot {
            runtime,
            executor,
            name,
            path,
            bytes,
            manifest,
            plugin: Some(plugin),
            kv: Arc::new(MemoryKv::default()),
            conversation: 1,
            fresh: true,
            customer: "Customer".to_string(),
            messages: 0,
            last_conversation: "conv_1".to_string(),
            seen: HashSet::new(),
            hand_backs: 0,
            logs: Vec::new(),
            output: String::new(),
            state: ConversationState::Bot,
        })
    }

    /// Sets a configuration value the plugin reads with `config::get` (what
    /// `[config]` in `NAME.toml` does on the server).
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Bot {
        self.manifest.config.insert(key.into(), value.into());
        self.plugin = None;
        self
    }

    /// The plugin's name (its file name without `.wasm`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the state of the current conversation that the plugin is told
    /// with the next events (`Message::state` in the SDK), e.g.
    /// [`ConversationState::Human`] to test what an assist plugin suggests
    /// once an agent is in charge. A new conversation starts as
    /// [`ConversationState::Bot`].
    ///
    /// The harness calls the plugin whatever the state; which plugins the
    /// server calls in each state is the server's business.
    pub fn set_state(&mut self, state: ConversationState) {
        self.state = state;
    }

    /// The id of the current conversation (`conv_1`, `conv_2`, …).
    pub fn conversation_id(&self) -> String {
        format!("conv_{}", self.conversation)
    }

    /// What the plugin stored under `key` in the current conversation.
    pub fn kv(&self, key: &str) -> Option<String> {
        self.kv.value(&self.name, &self.conversation_id(), key)
    }

    /// The lines the plugin logged during the last call.
    pub fn logs(&self) -> &[LogLine] {
        &self.logs
    }

    /// What the plugin printed to stdout and stderr during the last call.
    pub fn output(&self) -> &str {
        &self.output
    }

    /// Opens a new conversation with a customer called `customer_name` and
    /// calls `on-new-conversation`. A bot's first conversation is `conv_1`.
    pub fn new_conversation(&mut self, customer_name: &str) -> Result<Vec<Action>, Failure> {
        if !self.fresh {
            self.conversation += 1;
        }
        self.customer = customer_name.to_string();
        self.state = ConversationState::Bot;
        let event = new_conversation_event(&self.conversation_id(), customer_name);
        self.send(&event)
    }

    /// The customer writes `text`.
    pub fn message(&mut self, text: &str) -> Result<Vec<Action>, Failure> {
        self.customer_sends(Content::Text {
            text: text.to_string(),
        })
    }

    /// The customer taps the reply button `id` titled `title`.
    pub fn button(&mut self, id: &str, title: &str) -> Result<Vec<Action>, Failure> {
        self.customer_sends(Content::ButtonReply(choice(id, title)))
    }

    /// The customer picks the list row `id` titled `title`.
    pub fn list_choice(&mut self, id: &str, title: &str) -> Result<Vec<Action>, Failure> {
        self.customer_sends(Content::ListReply(choice(id, title)))
    }

    /// The customer shares a location.
    pub fn location(&mut self, latitude: f64, longitude: f64) -> Result<Vec<Action>, Failure> {
        self.customer_sends(Content::Location(Location {
            latitude,
            longitude,
            name: None,
            address: None,
        }))
    }

    /// Delivers a webhook payload as Digishare sends it (e.g. a file of
    /// `tests/fixtures/webhooks`), in its own conversation. Events the
    /// server does not hand to plugins (agent messages, archiving, other
    /// events) return no actions, and so does a payload delivered before
    /// (the server ignores redeliveries). A payload that is not a webhook
    /// is an `Err(Failure::Error(..))`.
    pub fn event(&mut self, webhook: Value) -> Result<Vec<Action>, Failure> {
        let event = Event::from_value(webhook)
            .map_err(|e| Failure::Error(format!("not a Digishare webhook: {e}")))?;
        self.send(&event)
    }

    /// A human hands the conversation back after `human_ms` and `messages`
    /// messages (an agent's release command): calls `on-resume`, in the
    /// bot's hands again.
    pub fn hand_back(&mut self, human_ms: u64, messages: u32) -> Result<Vec<Action>, Failure> {
        self.state = ConversationState::Bot;
        self.hand_backs += 1;
        let reason = "release command from the test (message release)".to_string();
        let event = digibot_domain::resume::Resumed {
            conversation_id: self.conversation_id(),
            cause: digibot_domain::resume::Cause::of_reason(&reason),
            reason,
            // Distinct per hand-back, so each is a new event.
            taken_at: self.hand_backs,
            released_at: self.hand_backs + i64::try_from(human_ms).unwrap_or(i64::MAX / 2),
            messages,
            outside_window: false,
        }
        .into_event();
        self.send(&event)
    }

    /// The Messages API requests `actions` become in the conversation of
    /// the last event, exactly as the server would send them; the first
    /// action that breaks a Digishare limit is the error.
    pub fn requests(&self, actions: &[Action]) -> Result<Vec<ApiRequest>, Rejected> {
        actions
            .iter()
            .enumerate()
            .map(|(i, a)| actions::to_request(&self.name, i, &self.last_conversation, a))
            .collect()
    }

    fn customer_sends(&mut self, content: Content) -> Result<Vec<Action>, Failure> {
        self.messages += 1;
        let event = customer_message_event(
            &self.conversation_id(),
            &format!("msg_test_{}", self.messages),
            &self.customer,
            content,
        );
        self.send(&event)
    }

    fn send(&mut self, event: &Event) -> Result<Vec<Action>, Failure> {
        if event.conversation_id() == Some(self.conversation_id().as_str()) {
            self.fresh = false;
        }
        self.logs.clear();
        self.output.clear();
        if !self.seen.insert(event.key.clone()) {
            return Ok(Vec::new());
        }
        let Some(call) = Call::for_event(event, self.state) else {
            return Ok(Vec::new());
        };
        if self.plugin.is_none() {
            let plugin = self
                .runtime
                .load(&self.name, &self.bytes, self.manifest.clone())
                .map_err(|e| Failure::Error(format!("reloading with the new config: {e}")))?;
            self.plugin = Some(plugin);
        }
        let Some(plugin) = &self.plugin else {
            return Ok(Vec::new());
        };
        let conversation = call.conversation_id().to_string();
        let invocation = drive(
            &self.executor,
            self.runtime.invoke(plugin, &call, self.kv.clone()),
        );
        self.kv
            .apply(&self.name, &conversation, &invocation.kv_writes);
        self.last_conversation = conversation;
        self.logs = invocation.logs;
        self.output = invocation.output;
        invocation.outcome
    }
}

/// Runs `turn` to completion on `executor`; from inside another tokio
/// runtime (an author's `#[tokio::test]`), on a thread of its own, since a
/// runtime cannot block inside another.
fn drive<F>(executor: &tokio::runtime::Runtime, turn: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return executor.block_on(turn);
    }
    std::thread::scope(
        |scope| match scope.spawn(|| executor.block_on(turn)).join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        },
    )
}

fn choice(id: &str, title: &str) -> Choice {
    Choice {
        id: id.to_string(),
        title: title.to_string(),
        description: None,
    }
}
