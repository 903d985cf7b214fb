//! The Messages API requests `plugins/concierge` makes, as they reach the
//! fake (shared by the flows that drive it).

use serde_json::{Value, json};

/// A `POST /v1/messages` request with `body`.
pub fn post_message(body: Value) -> Value {
    json!({"method": "POST", "path": "/v1/messages", "body": body})
}

/// Concierge's three welcome buttons under `text`: its greeting, and what
/// it offers again on a hand-back.
pub fn welcome(conversation: &str, text: &str) -> Value {
    post_message(json!({
        "conversation_id": conversation,
        "type": "interactive",
        "send_to_third": true,
        "body": {
            "type": "button",
            "header": {"type": "text", "text": "Bienvenue"},
            "body": {"text": text},
            "action": {"buttons": [
                {"type": "reply", "reply": {"id": "orders", "title": "Mes commandes"}},
                {"type": "reply", "reply": {"id": "stores", "title": "Nos magasins"}},
                {"type": "reply", "reply": {"id": "agent", "title": "Parler à un agent"}}
            ]}
        }
    }))
}

/// The greeting of a new conversation with a customer called `name`.
pub fn welcome_buttons(conversation: &str, name: &str) -> Value {
    welcome(
        conversation,
        &format!("Bonjour {name} ! Comment puis-je vous aider ?"),
    )
}

/// The orders menu.
pub fn orders_list(conversation: &str) -> Value {
    post_message(json!({
        "conversation_id": conversation,
        "type": "interactive",
        "send_to_third": true,
        "body": {
            "type": "list",
            "header": {"type": "text", "text": "Commandes"},
            "body": {"text": "Que voulez-vous faire ?"},
            "action": {
                "button": "Options",
                "sections": [{
                    "title": "Commandes",
                    "rows": [
                        {"id": "track", "title": "Suivre un colis"},
                        {"id": "return", "title": "Retourner un article"},
                        {"id": "invoice", "title": "Recevoir ma facture"}
                    ]
                }]
            }
        }
    }))
}
