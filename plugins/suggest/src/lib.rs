//! Suggest: an assist plugin. For every customer text it writes an internal
//! note suggesting an answer to the agents; the customer never sees it.
//! With `assist = true` in `suggest.toml` it keeps running while a human
//! agent is in charge of the conversation (when digibot only lets it write
//! notes). The lifecycle end-to-end tests run it beside echo.
use digibot_sdk::{Action, Bot, Message, Result, export_bot};

struct Suggest;

impl Bot for Suggest {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let Some(text) = message.text() else {
            return Ok(vec![]);
        };
        let suggestion = if text.to_lowercase().contains("commande") {
            "Proposez le suivi de commande (menu « Mes commandes »)."
        } else {
            "Remerciez le client et demandez son numéro de commande."
        };
        // Quote at most 200 characters: a note has Digishare's text limit.
        let quoted: String = text.chars().take(200).collect();
        Ok(vec![Action::note(format!(
            "Suggestion pour « {quoted} » : {suggestion}"
        ))?])
    }
}

export_bot!(Suggest);
