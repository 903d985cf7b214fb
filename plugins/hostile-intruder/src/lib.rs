//! Hostile test plugin: tries to reach beyond its own conversation and
//! configuration. Text commands:
//! - `store X`: keeps `X` under kv `secret` (in this conversation);
//! - `peek`: replies `secret=…` with what kv `secret` holds here, so a test
//!   can check that another conversation's value is invisible;
//! - `config`: replies with what it reads for the host's `api_token` and
//!   another plugin's `greeting` (both must be `None`);
//! - `hijack`: returns hand-built actions aimed at another conversation
//!   (bypassing the SDK's checks), then one valid text; the host must drop
//!   the first two and deliver only `hijack attempted`, here.
use digibot_sdk::{Action, Bot, Message, Result, config, export_bot, kv};

struct HostileIntruder;

impl Bot for HostileIntruder {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let Some(text) = message.text() else {
            return Ok(vec![]);
        };
        if let Some(secret) = text.strip_prefix("store ") {
            kv::set("secret", secret)?;
            return Ok(vec![Action::text("stored")?]);
        }
        match text.trim() {
            "peek" => {
                let secret = kv::get("secret").unwrap_or_else(|| "none".to_string());
                Ok(vec![Action::text(format!("secret={secret}"))?])
            }
            "config" => Ok(vec![Action::text(format!(
                "api_token={:?} other={:?}",
                config::get("api_token"),
                config::get("greeting")
            ))?]),
            "hijack" => Ok(vec![
                Action::HandOff {
                    user_id: "../../conversations/conv_victim/attach/participants".into(),
                    as_handler: true,
                },
                Action::Text {
                    body: "quoted".into(),
                    reply_to: Some("../conv_victim".into()),
                },
                Action::text("hijack attempted")?,
            ]),
            _ => Ok(vec![]),
        }
    }
}

export_bot!(HostileIntruder);
