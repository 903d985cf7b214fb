//! Example plugin: memory beyond one conversation.
//!
//! - A new conversation is counted in the plugin's shared scope
//!   (`kv::plugin()`) and greeted with its number, and with the customer's
//!   language if an earlier conversation of theirs said it
//!   (`kv::customer()`): `Conversation #2. Welcome back, your language is fr.`
//! - `lang XX` remembers `XX` for this customer, in every later
//!   conversation: `Noted: fr.`
//! - `fill` writes keys into the customer's memory until the host refuses
//!   one, and answers with the refusal (`Refused: quota: ...`): a quota
//!   refusal is the plugin's to handle.

use digibot_sdk::{Action, Bot, Conversation, Message, Result, export_bot, kv};

struct Memory;

impl Bot for Memory {
    fn on_new_conversation(_conversation: &Conversation) -> Result<Vec<Action>> {
        let shared = kv::plugin();
        let count = shared
            .get("conversations")?
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        shared.set("conversations", &count.to_string())?;
        let greeting = match kv::customer().get("lang")? {
            Some(lang) => format!("Conversation #{count}. Welcome back, your language is {lang}."),
            None => format!("Conversation #{count}. Hello! Say `lang XX` and I will remember it."),
        };
        Ok(vec![Action::text(greeting)?])
    }

    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let Some(text) = message.text() else {
            return Ok(vec![]);
        };
        if let Some(lang) = text.strip_prefix("lang ") {
            kv::customer().set("lang", lang.trim())?;
            return Ok(vec![Action::text(format!("Noted: {}.", lang.trim()))?]);
        }
        if text == "fill" {
            let memory = kv::customer();
            for i in 0..1000 {
                if let Err(refused) = memory.set(&format!("fill-{i}"), "x") {
                    return Ok(vec![Action::text(format!("Refused: {refused}"))?]);
                }
            }
        }
        Ok(vec![])
    }
}

export_bot!(Memory);
