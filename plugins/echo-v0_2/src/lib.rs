//! Test plugin: echo as a plugin built against `digishare:bot@0.2.0` is,
//! frozen there. It answers every customer text with `v0.2 (STATE): ` and
//! the same text, so a test can tell its answers from the current echo's
//! and see the conversation state 0.2.0 added. The host must keep loading
//! and running it unchanged (docs/wit-versioning.md, rule 4).

wit_bindgen::generate!({
    world: "bot",
    path: "../../wit/since_v0.2.0",
});

use digishare::bot::types::{Content, ConversationState, TextReply};

struct EchoV02;

impl Guest for EchoV02 {
    fn on_new_conversation(_event: NewConversationEvent) -> Result<Vec<Action>, String> {
        Ok(Vec::new())
    }

    fn on_message(event: MessageEvent) -> Result<Vec<Action>, String> {
        let state = match event.state {
            ConversationState::Bot => "bot",
            ConversationState::Human => "human",
            ConversationState::Closed => "closed",
        };
        Ok(match event.message.content {
            Content::Text(text) => vec![Action::Text(TextReply {
                body: format!("v0.2 ({state}): {text}"),
                reply_to: None,
            })],
            _ => Vec::new(),
        })
    }
}

export!(EchoV02);
