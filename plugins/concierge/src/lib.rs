//! Concierge: a demo shop assistant for Digishare LiveChat that uses every
//! kind of reply digibot can send: text (quoting the customer), reply
//! buttons, a list menu, a location pin, a location request, a file, an
//! internal note and a hand-off to a human agent. The end-to-end tests drive
//! it through a whole conversation.
//!
//! Config (`concierge.toml`, `[config]`), all optional:
//! - `agent_id`: the Digishare user to hand the conversation to
//!   (default `usr_17`);
//! - `invoice_url`: the file sent as the invoice
//!   (default `https://example.com/facture.pdf`);
//! - `orders_api`: the shop's order API. With it, « Suivre un colis » asks
//!   for the order number and looks it up there, as the `orders` plugin
//!   does (its lookup is this plugin's too: `GET {orders_api}/orders/N`
//!   with `Authorization: Bearer {{secret:ORDERS_TOKEN}}`; grant the URL
//!   and the secret in `[grants]`). Without it, a canned answer.
//!
//! State (per conversation): `topic` (`orders`/`stores`) and `choice` (the
//! last list row picked; `track` while waiting for an order number). Once the hand-off is delivered a human is in
//! charge and digibot stops calling the plugin for that conversation until
//! it is released (e.g. the agent's `/bot` note): no flag of its own needed.
//! On the hand-back (`on_resume`) it offers its menu again.
use digibot_sdk::{
    Action, Bot, Conversation, FileBuilder, Message, Result, Resume, config, export_bot, kv,
};

#[path = "../../orders/src/lookup.rs"]
mod lookup;

const HELP: &str = "Tapez « menu » pour les options ou « agent » pour parler à un conseiller.";

struct Concierge;

impl Bot for Concierge {
    fn on_new_conversation(conversation: &Conversation) -> Result<Vec<Action>> {
        let greeting = match &conversation.customer_name {
            Some(name) => format!("Bonjour {name} ! Comment puis-je vous aider ?"),
            None => "Bonjour ! Comment puis-je vous aider ?".to_string(),
        };
        Ok(vec![welcome(greeting)?])
    }

    /// Back from the agent: pick up where the customer was, the orders
    /// menu if that was the topic, else the welcome buttons. Outside
    /// WhatsApp's window a message would be refused: a note for the agents.
    fn on_resume(resume: &Resume) -> Result<Vec<Action>> {
        if resume.outside_window {
            return Ok(vec![Action::note(
                "Conversation rendue au bot, mais le client n'a pas écrit depuis 24 h : aucun message envoyé.",
            )?]);
        }
        kv::delete("choice");
        let back = "Me revoilà ! Puis-je vous aider pour autre chose ?";
        match kv::get("topic").as_deref() {
            Some("orders") => {
                let mut replies = vec![Action::text(back)?];
                replies.extend(orders_menu()?);
                Ok(replies)
            }
            _ => Ok(vec![welcome(back)?]),
        }
    }

    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let typed = message.text().map(|text| text.trim().to_lowercase());
        match (message.choice_id(), typed.as_deref()) {
            (Some("agent"), _) | (_, Some("agent" | "conseiller")) => hand_off(),
            (Some("orders"), _) | (_, Some("menu")) => remember("topic", "orders", orders_menu()?),
            (Some("stores"), _) => remember(
                "topic",
                "stores",
                vec![Action::location_request(
                    "Partagez votre position pour trouver le magasin le plus proche.",
                )?],
            ),
            (Some("track"), _) if config::get("orders_api").is_some() => remember(
                "choice",
                "track",
                vec![Action::text(
                    "Quel est votre numéro de commande ? Tapez-le ici (par exemple 12345).",
                )?],
            ),
            (Some("track"), _) => remember(
                "choice",
                "track",
                vec![Action::text(
                    "Votre colis est en route. Tapez « agent » pour parler à un conseiller.",
                )?],
            ),
            (Some("return"), _) => remember(
                "choice",
                "return",
                vec![Action::text(
                    "Pour un retour, répondez avec votre numéro de commande.",
                )?],
            ),
            (Some("invoice"), _) => remember("choice", "invoice", invoice()?),
            (None, Some(_)) if awaiting_order_number() => track(message),
            (None, Some(_)) => help(message),
            _ if message.location().is_some() => Ok(vec![
                Action::place(
                    33.5731,
                    -7.5898,
                    "Digishare Store Maarif",
                    "Bd Al Massira, Casablanca",
                )?,
                Action::text("Voici le magasin le plus proche.")?,
            ]),
            // Media, stickers, contacts, unknown choices…: nothing to say.
            _ => Ok(vec![]),
        }
    }
}

/// The three buttons every conversation starts with.
fn welcome(body: impl Into<String>) -> Result<Action> {
    Ok(Action::buttons(body)
        .header("Bienvenue")
        .button("orders", "Mes commandes")
        .button("stores", "Nos magasins")
        .button("agent", "Parler à un agent")
        .build()?)
}

/// Stores `value` under `key` once the replies are built, then returns them.
fn remember(key: &str, value: &str, replies: Vec<Action>) -> Result<Vec<Action>> {
    kv::set(key, value)?;
    Ok(replies)
}

/// Tells the agents why (in a note), attaches one, tells the customer.
fn hand_off() -> Result<Vec<Action>> {
    let topic = kv::get("topic").unwrap_or_else(|| "aucun".to_string());
    Ok(vec![
        Action::note(format!("Le client demande un conseiller. Sujet : {topic}."))?,
        Action::hand_off(config::get_or("agent_id", "usr_17"), true)?,
        Action::text("Je vous passe un conseiller, un instant.")?,
    ])
}

fn orders_menu() -> Result<Vec<Action>> {
    let menu = Action::list("Que voulez-vous faire ?", "Options")
        .header("Commandes")
        .section("Commandes")
        .row("track", "Suivre un colis")
        .row("return", "Retourner un article")
        .row("invoice", "Recevoir ma facture")
        .build()?;
    Ok(vec![menu])
}

fn invoice() -> Result<Vec<Action>> {
    let url = config::get_or("invoice_url", "https://example.com/facture.pdf");
    Ok(vec![
        FileBuilder::new(url).file_name("facture.pdf").build()?,
        Action::text("Voici votre facture.")?,
    ])
}

/// Whether the customer was asked for an order number (and the lookup is
/// configured).
fn awaiting_order_number() -> bool {
    config::get("orders_api").is_some() && kv::get("choice").as_deref() == Some("track")
}

/// The order number the customer typed, looked up.
fn track(message: &Message) -> Result<Vec<Action>> {
    let api = config::get("orders_api").unwrap_or_default();
    let Some(number) = message.text().and_then(lookup::order_number) else {
        kv::delete("choice");
        return Ok(vec![Action::text(format!(
            "Je n'ai pas trouvé de numéro de commande dans votre message. {HELP}"
        ))?]);
    };
    kv::delete("choice");
    Ok(vec![Action::text(lookup::status_reply(&api, &number))?])
}

/// Any other text: point at the menu, quoting the customer's message.
fn help(message: &Message) -> Result<Vec<Action>> {
    // Quote the message when its id is one digibot accepts in `reply_to`.
    let reply = Action::text_reply_to(HELP, message.id.as_str()).or_else(|_| Action::text(HELP))?;
    Ok(vec![reply])
}

export_bot!(Concierge);
