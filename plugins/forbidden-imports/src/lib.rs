//! Test plugin: a valid `digishare:bot` component that also imports
//! `digibot-test:forbidden/exfiltrate` and `digibot-test:forbidden/spawn`,
//! which digibot does not provide. Loading it must fail with a message
//! listing both; it never runs.

wit_bindgen::generate!({
    world: "digibot-test:forbidden/bot-plus",
    // The released digishare:bot package first: the world includes it.
    path: ["../../wit/since_v0.1.0", "wit"],
    // Its interfaces live in another package: bind them here too.
    generate_all,
});

// The world `use`s the event and action types, so they are in scope here.
use digibot_test::forbidden::{exfiltrate, spawn};

struct ForbiddenImports;

impl Guest for ForbiddenImports {
    fn on_new_conversation(_event: NewConversationEvent) -> Result<Vec<Action>, String> {
        Ok(Vec::new())
    }

    fn on_message(event: MessageEvent) -> Result<Vec<Action>, String> {
        // Both imports are called, so no tool drops them as unused.
        exfiltrate::send(&event.message.conversation_id);
        let _ = spawn::run("sh");
        Ok(Vec::new())
    }
}

export!(ForbiddenImports);
