//! Test plugin: echo as a plugin built against `digishare:bot@0.3.0`'s
//! `bot` world is (the world 0.3.0 shipped before timers: no `on-timer`
//! export). It answers every customer text with `v0.3: ` and the same
//! text. The host must keep loading and running it (docs/wit-versioning.md).

wit_bindgen::generate!({
    world: "bot",
    path: "../../wit/since_v0.3.0",
    generate_all,
});

use digishare::bot::types::{Content, TextReply};

struct EchoV03;

impl Guest for EchoV03 {
    fn on_new_conversation(_event: NewConversationEvent) -> Result<Vec<Action>, String> {
        Ok(Vec::new())
    }

    fn on_message(event: MessageEvent) -> Result<Vec<Action>, String> {
        Ok(match event.message.content {
            Content::Text(text) => vec![Action::Text(TextReply {
                body: format!("v0.3: {text}"),
                reply_to: None,
            })],
            _ => Vec::new(),
        })
    }
}

export!(EchoV03);
