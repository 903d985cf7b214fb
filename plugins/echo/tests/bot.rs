//! Echo in digibot's real runtime, through the test harness: customer texts
//! come back unchanged, everything else gets no answer.
use digibot_testing::{Action, Bot, Value, json};
use std::path::Path;

fn bot() -> Bot {
    Bot::build(env!("CARGO_MANIFEST_DIR")).expect("echo builds and loads")
}

/// A payload of tests/fixtures/webhooks.
fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/webhooks")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).expect("fixture exists");
    serde_json::from_str(&text).expect("fixture is JSON")
}

#[test]
fn repeats_customer_text() {
    let mut bot = bot();
    assert_eq!(bot.new_conversation("Salma").unwrap(), vec![]);
    let reply = bot.message("Bonjour, où est ma commande ?").unwrap();
    assert_eq!(
        reply,
        vec![Action::text("Bonjour, où est ma commande ?").unwrap()]
    );
    let requests = bot.requests(&reply).unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        (requests[0].method.as_str(), requests[0].path.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(
        requests[0].body,
        json!({"conversation_id": "conv_1", "type": "text", "send_to_third": true,
               "body": "Bonjour, où est ma commande ?"})
    );
}

#[test]
fn ignores_everything_but_text() {
    let mut bot = bot();
    assert_eq!(bot.button("orders", "Mes commandes").unwrap(), vec![]);
    assert_eq!(bot.list_choice("track", "Suivre un colis").unwrap(), vec![]);
    assert_eq!(bot.location(33.5731, -7.5898).unwrap(), vec![]);
}

#[test]
fn answers_recorded_webhooks_like_the_server() {
    let mut bot = bot();
    let reply = bot.event(fixture("message_text_customer")).unwrap();
    assert_eq!(
        reply,
        vec![Action::text("Bonjour, je voudrais suivre ma commande").unwrap()]
    );
    assert_eq!(
        bot.requests(&reply).unwrap()[0].body["conversation_id"],
        "conv_7Hq2Lm9Xa1"
    );
    // The agent's own message and other events never reach a plugin.
    for name in [
        "message_agent",
        "message_image",
        "other_event_ticket_created",
    ] {
        assert_eq!(bot.event(fixture(name)).unwrap(), vec![], "{name}");
    }
}
