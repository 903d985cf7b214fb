//! Echo: answers every customer text message with the same text.
use digibot_sdk::{Action, Bot, Message, Result, export_bot};

struct Echo;

impl Bot for Echo {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        match message.text() {
            Some(text) => Ok(vec![Action::text(text)?]),
            None => Ok(vec![]),
        }
    }
}

export_bot!(Echo);
