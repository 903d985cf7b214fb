//! Test plugin: echo as a plugin built against `digishare:bot@0.1.0` is,
//! frozen there. It answers every customer text with `v0.1: ` and the same
//! text, so a test can tell its answers from the current echo's. The host
//! must keep loading and running it unchanged (docs/wit-versioning.md,
//! rule 4).

wit_bindgen::generate!({
    world: "bot",
    path: "../../wit/since_v0.1.0",
});

use digishare::bot::types::{Content, TextReply};

struct EchoV01;

impl Guest for EchoV01 {
    fn on_new_conversation(_event: NewConversationEvent) -> Result<Vec<Action>, String> {
        Ok(Vec::new())
    }

    fn on_message(event: MessageEvent) -> Result<Vec<Action>, String> {
        Ok(match event.message.content {
            Content::Text(text) => vec![Action::Text(TextReply {
                body: format!("v0.1: {text}"),
                reply_to: None,
            })],
            _ => Vec::new(),
        })
    }
}

export!(EchoV01);
