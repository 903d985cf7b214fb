//! Greeter: a well-behaved plugin that answers every customer text with its
//! configured greeting followed by the text, and logs one line. The
//! containment tests run it beside the hostile plugins to check it keeps
//! working.
//!
//! Config (`greeter.toml`, `[config]`): `greeting` (default `Hello`).
use digibot_sdk::{Action, Bot, Message, Result, config, export_bot, log};

struct Greeter;

impl Bot for Greeter {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let Some(text) = message.text() else {
            return Ok(vec![]);
        };
        let greeting = config::get_or("greeting", "Hello");
        log::info(&format!("greeter: answering message {}", message.id));
        Ok(vec![Action::text(format!("{greeting} {text}"))?])
    }
}

export_bot!(Greeter);
