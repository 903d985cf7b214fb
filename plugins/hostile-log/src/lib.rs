//! Hostile test plugin: attacks the host's log. Text commands:
//! - `empty N`: `N` calls of `log` with an empty message (byte caps alone
//!   let every one through, each a line of the host's log);
//! - `huge`: one 16 MiB message.
//!
//! Then it answers `logged`, so a test knows the turn completed.
use digibot_sdk::{Action, Bot, Message, Result, export_bot, log};

struct HostileLog;

impl Bot for HostileLog {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let text = message.text().unwrap_or_default().trim();
        if let Some(n) = text.strip_prefix("empty ") {
            for _ in 0..n.parse::<u64>().unwrap_or(0) {
                log::info("");
            }
        } else if text == "huge" {
            log::info(&"x".repeat(16 << 20));
        } else {
            return Ok(vec![]);
        }
        Ok(vec![Action::text("logged")?])
    }
}

export_bot!(HostileLog);
