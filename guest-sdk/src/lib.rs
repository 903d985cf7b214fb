//! Write a digibot plugin: implement [`Bot`], register it with
//! [`export_bot!`], answer with [`Action`]s.
//!
//! ```
//! use digibot_sdk::{Action, Bot, Message, Result, export_bot};
//!
//! struct Echo;
//!
//! impl Bot for Echo {
//!     fn on_message(message: &Message) -> Result<Vec<Action>> {
//!         match message.text() {
//!             Some(text) => Ok(vec![Action::text(text)?]),
//!             None => Ok(vec![]),
//!         }
//!     }
//! }
//!
//! export_bot!(Echo);
//! # fn main() {}
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release` (or
//! `digibot build`), and drop the `.wasm` into digibot's plugins folder.
//!
//! A plugin is instantiated fresh for every event: keep state that must
//! outlive one event in [`kv`], scoped to the conversation. Replies always go
//! to the conversation of the event being handled; a plugin cannot name
//! another one.
//!
//! Replies are built with the constructors on [`Action`] (and
//! [`FileBuilder`]), which check Digishare's [`limits`] before the reply
//! leaves the plugin; digibot checks them again on its side.
//!
//! [`log`], [`config`], [`kv`] and [`http`] call into digibot: they only
//! work inside a plugin running in digibot, and panic in a native build
//! (e.g. `cargo test`).
//!
//! # Calling other services
//!
//! [`http`] sends requests to the URLs the plugin's `NAME.toml` grants
//! (`[grants] http = ["https://api.shop.example"]`), with secrets it never
//! sees (`{{secret:NAME}}` in a header value, `[grants] secrets`). See the
//! module for the rules digibot enforces.
//!
//! # Who is in charge
//!
//! Every event says who is in charge of its conversation:
//! [`Message::state`] and [`Conversation::state`], a [`ConversationState`].
//! A conversation is `Bot` until a human agent takes it over (the bot
//! handed it off, or an agent wrote in it); then it is `Human` until it is
//! released back to the bot, and `Closed` once archived. While a human is in
//! charge digibot only calls plugins marked `assist = true` in their
//! `NAME.toml`, and sends only their internal notes: such a plugin can
//! suggest answers to the agent.
//!
//! ```
//! use digibot_sdk::{Action, Bot, ConversationState, Message, Result, export_bot};
//!
//! struct Suggest;
//!
//! impl Bot for Suggest {
//!     fn on_message(message: &Message) -> Result<Vec<Action>> {
//!         let Some(text) = message.text() else {
//!             return Ok(vec![]);
//!         };
//!         let answer = format!("About {text:?}: our shop opens at 9:00.");
//!         match message.state {
//!             ConversationState::Bot => Ok(vec![Action::text(answer)?]),
//!             // An agent is in charge: a note only they see.
//!             ConversationState::Human => Ok(vec![Action::note(format!("Suggested: {answer}"))?]),
//!             ConversationState::Closed => Ok(vec![]),
//!         }
//!     }
//! }
//!
//! export_bot!(Suggest);
//! # fn main() {}
//! ```
//!
//! Plugins built with an SDK from before `digishare:bot@0.2.0` keep working;
//! they are simply not told the state.

#![warn(missing_docs)]

mod event;
mod file;
pub mod http;

/// JSON values, as [`http::Response::json`] returns them.
pub use serde_json;

pub use digibot_protocol::{
    Action, Button, Buttons, ButtonsBuilder, FileReply, LimitError, ListBuilder, ListMenu, ListRow,
    ListSection, Location, limits,
};
pub use event::{
    Choice, Contact, Content, Conversation, ConversationState, Media, MediaKind, Message, Phone,
    ReleaseCause, Resume, Sender, SenderKind, SharedLocation, Timer, UnknownContent,
};
pub use file::FileBuilder;

/// What a handler returns: the replies, or why the event could not be
/// handled (digibot logs it and records it with the event).
///
/// `?` works on the builders' [`LimitError`] and on `String`/`&str` errors:
///
/// ```
/// use digibot_sdk::{Action, Result};
///
/// fn greet(name: &str) -> Result<Vec<Action>> {
///     if name.is_empty() {
///         return Err("no name".into());
///     }
///     Ok(vec![Action::text(format!("Bonjour {name} !"))?])
/// }
///
/// assert_eq!(greet("Amina").unwrap().len(), 1);
/// assert_eq!(greet("").unwrap_err().to_string(), "no name");
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A handler's failure, with a message for the logs.
///
/// ```
/// use digibot_sdk::{Action, Error};
///
/// let err: Error = Action::text("").unwrap_err().into();
/// assert_eq!(err.to_string(), "text must not be empty");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(
    /// The message digibot logs and records with the event.
    pub String,
);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<LimitError> for Error {
    fn from(e: LimitError) -> Self {
        Error(e.to_string())
    }
}

impl From<String> for Error {
    fn from(e: String) -> Self {
        Error(e)
    }
}

impl From<&str> for Error {
    fn from(e: &str) -> Self {
        Error(e.to_string())
    }
}

/// Your bot. Every method has a default that does nothing, so implement
/// only the events you care about.
///
/// The methods take no `self`: a plugin is instantiated fresh for every
/// event, so there is nothing to keep in the value. Use [`kv`] for state.
///
/// ```
/// use digibot_sdk::{Action, Bot, Conversation, ConversationState, Result};
///
/// struct Greeter;
///
/// impl Bot for Greeter {
///     fn on_new_conversation(conversation: &Conversation) -> Result<Vec<Action>> {
///         let name = conversation.customer_name.as_deref().unwrap_or("there");
///         Ok(vec![Action::text(format!("Hello {name}!"))?])
///     }
/// }
///
/// let conversation = Conversation {
///     id: "conv_1".into(),
///     customer_id: "third_1".into(),
///     customer_name: Some("Amina".into()),
///     channel: Some("whatsapp".into()),
///     platform_id: None,
///     created_at: None,
///     state: ConversationState::Bot,
/// };
/// let replies = Greeter::on_new_conversation(&conversation).unwrap();
/// assert_eq!(replies, [Action::text("Hello Amina!").unwrap()]);
/// ```
pub trait Bot {
    /// A customer opened a conversation.
    fn on_new_conversation(conversation: &Conversation) -> Result<Vec<Action>> {
        let _ = conversation;
        Ok(Vec::new())
    }

    /// A customer sent a message (agent and system messages never arrive
    /// here, so a bot cannot answer itself in a loop).
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let _ = message;
        Ok(Vec::new())
    }

    /// A timer this plugin scheduled with [`timers::schedule`] came due.
    fn on_timer(timer: &Timer) -> Result<Vec<Action>> {
        let _ = timer;
        Ok(Vec::new())
    }

    /// A human handed the conversation back to the bot (the release
    /// command, an operator, idle release): pick the flow up again.
    fn on_resume(resume: &Resume) -> Result<Vec<Action>> {
        let _ = resume;
        Ok(Vec::new())
    }
}

/// Registers a [`Bot`] as the plugin's entry points. Use it once per crate,
/// at the top level of a `cdylib` crate built for `wasm32-wasip2`.
///
/// A handler's `Ok` actions are sent in order; an `Err` sends nothing and is
/// logged by digibot. See the [crate] docs for a complete plugin.
#[macro_export]
macro_rules! export_bot {
    ($bot:ty) => {
        #[doc(hidden)]
        struct __DigibotExport;

        impl $crate::__private::Guest for __DigibotExport {
            fn on_new_conversation(
                event: $crate::__private::WitNewConversation,
            ) -> ::core::result::Result<
                $crate::__private::Vec<$crate::__private::WitAction>,
                $crate::__private::String,
            > {
                $crate::__private::run(<$bot as $crate::Bot>::on_new_conversation(
                    &event.into(),
                ))
            }

            fn on_message(
                event: $crate::__private::WitMessageEvent,
            ) -> ::core::result::Result<
                $crate::__private::Vec<$crate::__private::WitAction>,
                $crate::__private::String,
            > {
                $crate::__private::run(<$bot as $crate::Bot>::on_message(&event.into()))
            }

            fn on_timer(
                event: $crate::__private::WitTimerEvent,
            ) -> ::core::result::Result<
                $crate::__private::Vec<$crate::__private::WitAction>,
                $crate::__private::String,
            > {
                $crate::__private::run(<$bot as $crate::Bot>::on_timer(&event.into()))
            }

            fn on_resume(
                event: $crate::__private::WitResumeEvent,
            ) -> ::core::result::Result<
                $crate::__private::Vec<$crate::__private::WitAction>,
                $crate::__private::String,
            > {
                $crate::__private::run(<$bot as $crate::Bot>::on_resume(&event.into()))
            }
        }

        $crate::bindings::__export_bot_world!(__DigibotExport with_types_in $crate::__private::bindings);
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::bindings;
    pub use crate::bindings::Guest;
    pub use crate::bindings::digishare::bot::types::{
        Action as WitAction, MessageEvent as WitMessageEvent,
        NewConversationEvent as WitNewConversation, ResumeEvent as WitResumeEvent,
        TimerEvent as WitTimerEvent,
    };
    pub use std::string::String;
    pub use std::vec::Vec;

    /// Turns a handler's answer into what crosses the component boundary.
    pub fn run(result: crate::Result<Vec<crate::Action>>) -> Result<Vec<WitAction>, String> {
        match result {
            Ok(actions) => Ok(actions.into_iter().map(crate::event::to_wit).collect()),
            Err(e) => Err(e.0),
        }
    }
}

#[doc(hidden)]
// The generated export glue of `on-timer` lowers its record to 14 scalars.
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "bot-with-timers",
        path: "../wit/since_v0.3.0",
        pub_export_macro: true,
        export_macro_name: "__export_bot_world",
        default_bindings_module: "digibot_sdk::bindings",
        // wasi:http and what it uses (wasi:io, wasi:clocks): generated here
        // too, for `http`.
        generate_all,
    });
}

/// Log lines, tagged by digibot with the plugin and conversation.
///
/// Output per event is capped by the host; past the cap lines are dropped.
/// These functions call into digibot, so they only work inside a plugin.
///
/// ```no_run
/// use digibot_sdk::log;
///
/// log::info("customer asked for the menu");
/// log::warn(&format!("unknown choice {:?}", "xyz"));
/// ```
pub mod log {
    use crate::bindings::digishare::bot::log::{Level, log};

    /// Fine-grained tracing, hidden unless digibot runs with `RUST_LOG=trace`.
    pub fn trace(message: &str) {
        log(Level::Trace, message)
    }
    /// Debug detail, hidden unless digibot runs with `RUST_LOG=debug`.
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
    /// Something worth knowing.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    /// Something looks wrong but the bot carries on.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
    /// Something failed.
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
}

/// This plugin's configuration: the `[config]` table of its `NAME.toml`.
/// No other plugin can read it, and digibot's own secrets are never in it.
///
/// These functions call into digibot, so they only work inside a plugin.
///
/// ```no_run
/// use digibot_sdk::config;
///
/// let greeting = config::get_or("greeting", "Hello");
/// if let Some(agent) = config::get("agent_id") {
///     // hand off to `agent`…
/// #   let _ = agent;
/// }
/// # let _ = greeting;
/// ```
pub mod config {
    /// The value of `key`, if configured.
    pub fn get(key: &str) -> Option<String> {
        crate::bindings::digishare::bot::config::get(key)
    }

    /// The value of `key`, or `default` when it is not configured.
    pub fn get_or(key: &str, default: &str) -> String {
        get(key).unwrap_or_else(|| default.to_string())
    }
}

/// State kept in digibot's database, always this plugin's own. Three
/// scopes: [`kv::conversation()`] (what [`kv::get`], [`kv::set`] and
/// [`kv::delete`] use), [`kv::customer()`] (the event's customer, across
/// their conversations) and [`kv::plugin()`] (shared by all of this
/// plugin's conversations).
///
/// ```no_run
/// use digibot_sdk::kv;
/// use std::time::Duration;
/// # fn f() -> digibot_sdk::Result<()> {
/// kv::customer().set("lang", "fr")?;                   // remembered next time
/// let lang = kv::customer().get("lang")?;              // Some("fr")
/// let n: u64 = kv::plugin().get("greeted")?.map_or(0, |n| n.parse().unwrap_or(0));
/// kv::plugin().set("greeted", &(n + 1).to_string())?;  // every conversation's
/// kv::conversation().set_with_ttl("otp", "4821", Duration::from_secs(300))?;
/// # Ok(()) }
/// ```
///
/// Writes take effect when the handler returns `Ok` (committed with the
/// event); an `Err` writes nothing. `customer` and `plugin` entries can
/// be written by two conversations at once: the last committed write of
/// a key wins, so a counter there may miss a concurrent increment.
///
/// ```no_run
/// use digibot_sdk::{Action, Result, kv};
///
/// fn count_visits() -> Result<Vec<Action>> {
///     let visits: u32 = kv::get("visits").and_then(|v| v.parse().ok()).unwrap_or(0) + 1;
///     kv::set("visits", &visits.to_string())?;
///     Ok(vec![Action::text(format!("Visit number {visits}"))?])
/// }
/// # count_visits().unwrap();
/// ```
///
/// These functions call into digibot, so they only work inside a plugin.
pub mod kv {
    use crate::bindings::digishare::bot::kv as wit;
    use std::time::Duration;

    /// The value stored under `key` in this conversation, if any.
    pub fn get(key: &str) -> Option<String> {
        wit::get(key)
    }

    /// Stores `value` under `key` for this conversation. Fails when the key
    /// or value is over digibot's size limits (`limit: ...`) or the write
    /// would take this plugin over its KV quota (`quota: ...`); returning
    /// that error from a handler records it as the event's reason.
    pub fn set(key: &str, value: &str) -> crate::Result<()> {
        wit::set(key, value).map_err(crate::Error)
    }

    /// Forgets `key` in this conversation.
    pub fn delete(key: &str) {
        wit::delete(key)
    }

    /// One of this plugin's KV scopes: see [`conversation()`],
    /// [`customer()`] and [`plugin()`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Scope(wit::Scope);

    /// (this plugin, the event's conversation).
    pub fn conversation() -> Scope {
        Scope(wit::Scope::Conversation)
    }

    /// (this plugin, the event's customer): kept across the customer's
    /// conversations. Its calls fail with `unknown: ...` when digibot does
    /// not know the event's customer.
    pub fn customer() -> Scope {
        Scope(wit::Scope::Customer)
    }

    /// (this plugin): shared by all of its conversations.
    pub fn plugin() -> Scope {
        Scope(wit::Scope::Plugin)
    }

    impl Scope {
        /// The value of `key` here, `None` when absent or expired.
        pub fn get(self, key: &str) -> crate::Result<Option<String>> {
            wit::get_in(self.0, key).map_err(crate::Error)
        }

        /// Stores `value` under `key` here, kept until deleted. Fails like
        /// [`set`](super::set); a quota refusal names the scope (`quota:
        /// this customer's kv would hold ...`).
        pub fn set(self, key: &str, value: &str) -> crate::Result<()> {
            wit::set_in(self.0, key, value, wit::SetOptions { ttl_ms: None }).map_err(crate::Error)
        }

        /// Stores `value` under `key` here for `ttl` (1 ms to 365 days):
        /// then it reads as absent, and retention removes it.
        pub fn set_with_ttl(self, key: &str, value: &str, ttl: Duration) -> crate::Result<()> {
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            wit::set_in(
                self.0,
                key,
                value,
                wit::SetOptions {
                    ttl_ms: Some(ttl_ms),
                },
            )
            .map_err(crate::Error)
        }

        /// Forgets `key` here.
        pub fn delete(self, key: &str) -> crate::Result<()> {
            wit::delete_in(self.0, key).map_err(crate::Error)
        }
    }
}

/// Durable timers: a follow-up after silence, a reminder tomorrow. A timer
/// belongs to this plugin and the event's conversation; it is scheduled
/// only if the handler succeeds (committed with the event), survives
/// restarts, and comes back once, to [`Bot::on_timer`], in order with the
/// conversation's other events. While a human is in charge it waits; when
/// the conversation is archived it is dropped.
///
/// ```no_run
/// use digibot_sdk::{Action, Bot, Message, Result, Timer, timers};
///
/// struct Reminder;
///
/// impl Bot for Reminder {
///     fn on_message(_: &Message) -> Result<Vec<Action>> {
///         // Ask again in an hour, unless the customer writes first.
///         timers::follow_up("nudge", 3_600_000, "")?;
///         Ok(vec![Action::text("Thanks, we are on it.")?])
///     }
///
///     fn on_timer(timer: &Timer) -> Result<Vec<Action>> {
///         if timer.outside_window {
///             return Ok(vec![Action::note("The customer went quiet (outside the 24 h window).")?]);
///         }
///         Ok(vec![Action::text("Anything else we can do?")?])
///     }
/// }
/// # fn main() {}
/// ```
pub mod timers {
    use crate::bindings::digishare::bot::timers as wit;

    /// How a timer behaves.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Options {
        /// Drop it when the customer writes before it is due.
        pub cancel_on_customer_message: bool,
        /// Replace a pending timer of the same name (when false, scheduling
        /// a pending name fails with `exists: ...`).
        pub replace: bool,
    }

    impl Default for Options {
        /// Replaces a timer of the same name; survives customer messages.
        fn default() -> Self {
            Options {
                cancel_on_customer_message: false,
                replace: true,
            }
        }
    }

    /// Schedules `name` to come due `after_ms` from now with `payload`, and
    /// returns its id. Fails past digibot's bounds (`limit: ...`,
    /// `quota: ...`: 16 pending timers per conversation, payloads up to
    /// 4 KiB, delays up to 30 days).
    pub fn schedule_with(
        name: &str,
        after_ms: u64,
        payload: &str,
        options: Options,
    ) -> crate::Result<String> {
        wit::schedule(
            name,
            after_ms,
            payload,
            wit::ScheduleOptions {
                cancel_on_customer_message: options.cancel_on_customer_message,
                replace: options.replace,
            },
        )
        .map_err(crate::Error)
    }

    /// [`schedule_with`] the default [`Options`].
    pub fn schedule(name: &str, after_ms: u64, payload: &str) -> crate::Result<String> {
        schedule_with(name, after_ms, payload, Options::default())
    }

    /// A follow-up: replaces one of the same name, and is cancelled when
    /// the customer writes first.
    pub fn follow_up(name: &str, after_ms: u64, payload: &str) -> crate::Result<String> {
        schedule_with(
            name,
            after_ms,
            payload,
            Options {
                cancel_on_customer_message: true,
                replace: true,
            },
        )
    }

    /// Cancels the pending timer `name`, if any.
    pub fn cancel(name: &str) {
        wit::cancel(name)
    }
}

/// The event's conversation as digibot's database has it: its history,
/// for a plugin that gives a language model its context or picks up where
/// an agent left off.
///
/// ```no_run
/// use digibot_sdk::conversation::{self, Author};
///
/// let context: Vec<String> = conversation::history(20)
///     .into_iter()
///     .filter_map(|m| Some(format!("{:?}: {}", m.author, m.text?)))
///     .collect();
/// # let _ = (context, Author::Bot);
/// ```
pub mod conversation {
    /// Who wrote a history entry.
    pub use crate::bindings::digishare::bot::conversation::Author;
    /// One message of the conversation: who wrote it, its kind, its text
    /// (when it has one) and when digibot received or queued it (ms).
    pub use crate::bindings::digishare::bot::conversation::HistoryEntry;

    /// The conversation's last `limit` messages (at most 50), oldest first:
    /// the customer's, the agents' and the bot's. The message being handled
    /// is the last one; this turn's replies are not in it yet.
    pub fn history(limit: u32) -> Vec<HistoryEntry> {
        crate::bindings::digishare::bot::conversation::history(limit)
    }
}
