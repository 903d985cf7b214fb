//! Echo, version 2: answers every customer text with `v2: ` and the same
//! text. The hot-swap tests replace `echo` with it while digibot runs.
use digibot_sdk::{Action, Bot, Message, Result, export_bot};

struct EchoV2;

impl Bot for EchoV2 {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        match message.text() {
            Some(text) => Ok(vec![Action::text(format!("v2: {text}"))?]),
            None => Ok(vec![]),
        }
    }
}

export_bot!(EchoV2);
