//! Hostile test plugin: panics (a wasm trap) in `on_message`, and returns an
//! error from `on_new_conversation`. The host must record both failures and
//! carry on serving other plugins.
use digibot_sdk::{Action, Bot, Conversation, Message, Result, export_bot};

struct HostileTrap;

impl Bot for HostileTrap {
    fn on_new_conversation(_conversation: &Conversation) -> Result<Vec<Action>> {
        Err("refused to greet".into())
    }

    fn on_message(_message: &Message) -> Result<Vec<Action>> {
        panic!("boom: hostile-trap panicked")
    }
}

export_bot!(HostileTrap);
