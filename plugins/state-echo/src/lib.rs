//! Test plugin: answers each event with the conversation state it received,
//! so tests can check that digibot tells 0.2.0 plugins exactly the state it
//! holds. A new conversation gets `state: STATE`; a customer text gets
//! `STATE: TEXT`.
use digibot_sdk::{Action, Bot, Conversation, Message, Result, export_bot};

struct StateEcho;

impl Bot for StateEcho {
    fn on_new_conversation(conversation: &Conversation) -> Result<Vec<Action>> {
        Ok(vec![Action::text(format!(
            "state: {}",
            conversation.state.as_str()
        ))?])
    }

    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let text = message.text().unwrap_or("");
        Ok(vec![Action::text(format!(
            "{}: {text}",
            message.state.as_str()
        ))?])
    }
}

export_bot!(StateEcho);
