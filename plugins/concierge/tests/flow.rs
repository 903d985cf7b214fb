//! The concierge flow in digibot's real runtime, through the test harness:
//! greeting buttons, the orders menu, the invoice, the hand-off, with the
//! KV state that carries the topic from one message to the next.
use digibot_sdk::FileBuilder;
use digibot_testing::{Action, Bot, json};

fn bot() -> Bot {
    Bot::build(env!("CARGO_MANIFEST_DIR")).expect("concierge builds and loads")
}

fn greeting(name: &str) -> Action {
    Action::buttons(format!("Bonjour {name} ! Comment puis-je vous aider ?"))
        .header("Bienvenue")
        .button("orders", "Mes commandes")
        .button("stores", "Nos magasins")
        .button("agent", "Parler à un agent")
        .build()
        .unwrap()
}

#[test]
fn orders_invoice_then_an_agent() {
    let mut bot = bot().config("agent_id", "usr_99");
    assert_eq!(
        bot.new_conversation("Salma").unwrap(),
        vec![greeting("Salma")]
    );

    let menu = Action::list("Que voulez-vous faire ?", "Options")
        .header("Commandes")
        .section("Commandes")
        .row("track", "Suivre un colis")
        .row("return", "Retourner un article")
        .row("invoice", "Recevoir ma facture")
        .build()
        .unwrap();
    assert_eq!(bot.button("orders", "Mes commandes").unwrap(), vec![menu]);
    assert_eq!(bot.kv("topic").as_deref(), Some("orders"));

    assert_eq!(
        bot.list_choice("invoice", "Recevoir ma facture").unwrap(),
        vec![
            FileBuilder::new("https://example.com/facture.pdf")
                .file_name("facture.pdf")
                .build()
                .unwrap(),
            Action::text("Voici votre facture.").unwrap(),
        ]
    );

    // The topic chosen two messages ago is in the note; the agent comes
    // from the config.
    let hand_off = bot.message("agent").unwrap();
    assert_eq!(
        hand_off,
        vec![
            Action::note("Le client demande un conseiller. Sujet : orders.").unwrap(),
            Action::hand_off("usr_99", true).unwrap(),
            Action::text("Je vous passe un conseiller, un instant.").unwrap(),
        ]
    );
    let requests = bot.requests(&hand_off).unwrap();
    assert_eq!(requests[0].body["send_to_third"], false);
    assert_eq!(
        (requests[1].method.as_str(), requests[1].path.as_str()),
        ("PUT", "/v1/conversations/conv_1/attach/participants")
    );
    assert_eq!(
        requests[1].body,
        json!({"users": ["usr_99"], "bots": [], "handler_id": "usr_99"})
    );

    // Handed off: digibot itself stops calling concierge while the agent is
    // in charge (see tests/e2e/lifecycle.rs); once handed back, free text
    // gets the help again.
    let help = bot.message("merci").unwrap();
    assert!(
        matches!(&help[..], [Action::Text { body, .. }] if body.starts_with("Tapez « menu »")),
        "{help:?}"
    );
}

#[test]
fn stores_ask_for_a_location_and_state_is_per_conversation() {
    let mut bot = bot();
    bot.new_conversation("Youssef").unwrap();
    assert_eq!(
        bot.button("stores", "Nos magasins").unwrap(),
        vec![
            Action::location_request(
                "Partagez votre position pour trouver le magasin le plus proche."
            )
            .unwrap()
        ]
    );
    assert_eq!(
        bot.location(33.57, -7.59).unwrap(),
        vec![
            Action::place(
                33.5731,
                -7.5898,
                "Digishare Store Maarif",
                "Bd Al Massira, Casablanca"
            )
            .unwrap(),
            Action::text("Voici le magasin le plus proche.").unwrap(),
        ]
    );
    let handed = bot.message("agent").unwrap();
    assert_eq!(handed.len(), 3, "note, hand-off, text: {handed:?}");
    assert_eq!(handed[1].kind(), "hand_off");

    // A new conversation starts from nothing: the help text comes back,
    // quoting the customer's message.
    assert_eq!(
        bot.new_conversation("Omar").unwrap(),
        vec![greeting("Omar")]
    );
    assert_eq!(bot.conversation_id(), "conv_2");
    assert_eq!(bot.kv("topic"), None);
    let help = bot.message("bonjour").unwrap();
    assert!(
        matches!(
            &help[..],
            [Action::Text {
                reply_to: Some(_),
                ..
            }]
        ),
        "{help:?}"
    );
}

#[test]
fn after_the_agent_it_offers_the_menu_of_the_topic_again() {
    let mut bot = bot();
    bot.new_conversation("Salma").unwrap();
    // Before any topic: the welcome buttons, with a "back" line.
    let welcome_back = Action::buttons("Me revoilà ! Puis-je vous aider pour autre chose ?")
        .header("Bienvenue")
        .button("orders", "Mes commandes")
        .button("stores", "Nos magasins")
        .button("agent", "Parler à un agent")
        .build()
        .unwrap();
    assert_eq!(bot.hand_back(60_000, 4).unwrap(), vec![welcome_back]);

    bot.button("orders", "Mes commandes").unwrap();
    bot.list_choice("track", "Suivre un colis").unwrap();
    bot.message("agent").unwrap();
    let replies = bot.hand_back(120_000, 7).unwrap();
    assert_eq!(
        replies[0],
        Action::text("Me revoilà ! Puis-je vous aider pour autre chose ?").unwrap()
    );
    assert!(
        matches!(&replies[1], Action::List(l) if l.header.as_deref() == Some("Commandes")),
        "the orders menu again: {replies:?}"
    );
    // The half-finished step is forgotten: a number is not awaited.
    assert_eq!(bot.kv("choice"), None);
}
