//! Test plugin: a hostile one. The customer's message is one or more URLs
//! (separated by spaces; other words are ignored); the plugin GETs each in
//! turn through `wasi:http` and answers one line per URL: `status NNN`, or
//! `refused: KIND: REASON` when digibot refused or failed the request
//! (outside the grant, a prohibited address, a redirect leaving the grant,
//! a response over the cap or one that never ends, one call too many...).
//! Each request carries a secret placeholder: where digibot refuses it,
//! the secret must not leave.
use digibot_sdk::{Action, Bot, Message, Result, export_bot, http};

struct HostileFetch;

impl Bot for HostileFetch {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let Some(text) = message.text() else {
            return Ok(vec![]);
        };
        let lines: Vec<String> = text
            .split_whitespace()
            // Other words are not its business: a message without a URL
            // gets no answer from it (echo beside it answers alone).
            .filter(|word| word.starts_with("http://") || word.starts_with("https://"))
            .map(|url| {
                match http::get(url)
                    .header("authorization", "Bearer {{secret:ORDERS_TOKEN}}")
                    .send()
                {
                    Ok(response) => format!("status {}", response.status()),
                    Err(e) => format!("refused: {e}"),
                }
            })
            .collect();
        if lines.is_empty() {
            return Ok(vec![]);
        }
        Ok(vec![Action::text(lines.join("\n"))?])
    }
}

export_bot!(HostileFetch);
