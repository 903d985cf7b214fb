//! Write a digibot plugin: implement [`Bot`], register it with
//! [`export_bot!`], answer with [`Action`]s.
//!
//! ```ignore
//! use digibot_sdk::{export_bot, Action, Bot, Message, Result};
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
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release` (or
//! `digibot build`), and drop the `.wasm` into digibot's plugins folder.
//!
//! A plugin is instantiated fresh for every event: keep state that must
//! outlive one event in [`kv`], scoped to the conversation. Replies always go
//! to the conversation of the event being handled; a plugin cannot name
//! another one.

mod event;

pub use digibot_protocol::{
    Action, Button, Buttons, ButtonsBuilder, FileReply, LimitError, ListBuilder, ListMenu,
    ListRow, ListSection, Location, limits,
};
pub use event::{
    Choice, Contact, Content, Conversation, Media, MediaKind, Message, Phone, Sender, SenderKind,
    UnknownContent,
};

/// What a handler returns: the replies, or why the event could not be
/// handled (digibot logs it and records it with the event).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A handler's failure, with a message for the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

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
}

/// Registers a [`Bot`] as the plugin's entry points. Use it once per crate.
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
                    &event.conversation,
                ))
            }

            fn on_message(
                event: $crate::__private::WitMessageEvent,
            ) -> ::core::result::Result<
                $crate::__private::Vec<$crate::__private::WitAction>,
                $crate::__private::String,
            > {
                $crate::__private::run(<$bot as $crate::Bot>::on_message(&event.message))
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
        NewConversationEvent as WitNewConversation,
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
pub mod bindings {
    wit_bindgen::generate!({
        world: "bot",
        path: "../wit/since_v0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_bot_world",
        default_bindings_module: "digibot_sdk::bindings",
    });
}

/// Log lines, tagged by digibot with the plugin and conversation.
///
/// Output per event is capped by the host; past the cap lines are dropped.
pub mod log {
    use crate::bindings::digishare::bot::log::{Level, log};

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

/// State kept between events of one conversation, private to this plugin.
pub mod kv {
    /// The value stored under `key` in this conversation, if any.
    pub fn get(key: &str) -> Option<String> {
        crate::bindings::digishare::bot::kv::get(key)
    }

    /// Stores `value` under `key` for this conversation. Fails when the key
    /// or value is over digibot's size limits.
    pub fn set(key: &str, value: &str) -> crate::Result<()> {
        crate::bindings::digishare::bot::kv::set(key, value).map_err(crate::Error)
    }

    /// Forgets `key` in this conversation.
    pub fn delete(key: &str) {
        crate::bindings::digishare::bot::kv::delete(key)
    }
}
