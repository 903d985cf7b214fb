//! Test plugin: answers each event with the conversation state it received,
//! so tests can check that digibot tells plugins exactly the state it
//! holds. A new conversation gets `state: STATE`; a customer text gets
//! `STATE: TEXT` (with `debounce_ms`, the burst's texts joined by ` | `);
//! a hand-back gets `resumed (CAUSE) after N messages, MS ms`.
use digibot_sdk::{Action, Bot, Conversation, Message, ReleaseCause, Result, Resume, export_bot};

struct StateEcho;

impl Bot for StateEcho {
    fn on_new_conversation(conversation: &Conversation) -> Result<Vec<Action>> {
        Ok(vec![Action::text(format!(
            "state: {}",
            conversation.state.as_str()
        ))?])
    }

    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let texts: Vec<&str> = message.all().map(|m| m.text().unwrap_or("")).collect();
        Ok(vec![Action::text(format!(
            "{}: {}",
            message.state.as_str(),
            texts.join(" | ")
        ))?])
    }

    fn on_resume(resume: &Resume) -> Result<Vec<Action>> {
        let cause = match resume.cause {
            ReleaseCause::Command => "command",
            ReleaseCause::Operator => "operator",
            ReleaseCause::Idle => "idle",
        };
        Ok(vec![Action::text(format!(
            "resumed ({cause}) after {} messages, {} ms",
            resume.messages, resume.human_ms
        ))?])
    }
}

export_bot!(StateEcho);
