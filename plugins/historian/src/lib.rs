//! Test plugin: answers every customer text with the conversation's last
//! five messages, oldest first, as `conversation.history` returns them
//! (`author/kind: text`, joined with ` | `).

use digibot_sdk::conversation::{self, Author};
use digibot_sdk::{Action, Bot, Message, Result, export_bot};

struct Historian;

impl Bot for Historian {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        if message.text().is_none() {
            return Ok(vec![]);
        }
        let lines: Vec<String> = conversation::history(5)
            .into_iter()
            .map(|m| {
                let author = match m.author {
                    Author::Customer => "customer",
                    Author::Agent => "agent",
                    Author::Bot => "bot",
                    Author::System => "system",
                };
                format!("{author}/{}: {}", m.kind, m.text.unwrap_or_default())
            })
            .collect();
        Ok(vec![Action::text(lines.join(" | "))?])
    }
}

export_bot!(Historian);
