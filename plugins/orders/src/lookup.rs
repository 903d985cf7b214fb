//! The order lookup itself, shared with the concierge's « Suivre un colis »
//! (which includes this file): find the order number in a message, ask the
//! order API, word the answer.
use digibot_sdk::{http, log};

/// The first word of `text` that looks like an order number: 3 to 20
/// letters, digits and `-`, with at least one digit (a leading `#` or `n°`
/// is ignored).
pub fn order_number(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || matches!(c, ',' | '.' | ':' | ';' | '!' | '?'))
        .map(|w| {
            w.trim_start_matches('#')
                .trim_start_matches("n°")
                .trim_start_matches("N°")
        })
        .find(|w| {
            (3..=20).contains(&w.len())
                && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && w.bytes().any(|b| b.is_ascii_digit())
        })
        .map(str::to_string)
}

/// The customer's answer for order `number`, from `{api}/orders/{number}`.
pub fn status_reply(api: &str, number: &str) -> String {
    let url = format!("{}/orders/{number}", api.trim_end_matches('/'));
    let response = http::get(url)
        .bearer_secret("ORDERS_TOKEN")
        .header("accept", "application/json")
        .send();
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            log::warn(&format!("order lookup failed: {e}"));
            return unavailable();
        }
    };
    match response.status() {
        200 => match response.json() {
            Ok(order) => match order["status"].as_str() {
                Some(status) => format!("Votre commande {number} est {}.", label(status)),
                None => {
                    log::warn("order API answered without a status");
                    unavailable()
                }
            },
            Err(e) => {
                log::warn(&format!("order API: {e}"));
                unavailable()
            }
        },
        404 => format!("Je ne trouve pas la commande {number}. Vérifiez le numéro ?"),
        status => {
            log::warn(&format!("order API answered HTTP {status}"));
            unavailable()
        }
    }
}

fn unavailable() -> String {
    "Le suivi des commandes est indisponible pour le moment, réessayez plus tard.".to_string()
}

/// The status in the customer's words.
fn label(status: &str) -> String {
    match status {
        "processing" => "en préparation".into(),
        "shipped" | "in_transit" => "en route".into(),
        "out_for_delivery" => "en cours de livraison".into(),
        "delivered" => "livrée".into(),
        "cancelled" => "annulée".into(),
        other => format!("« {other} »"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_numbers_are_found_in_what_customers_type() {
        assert_eq!(order_number("12345").as_deref(), Some("12345"));
        assert_eq!(
            order_number("ma commande #A-7781 svp").as_deref(),
            Some("A-7781")
        );
        assert_eq!(
            order_number("commande n°4410, merci !").as_deref(),
            Some("4410")
        );
        assert_eq!(order_number("bonjour"), None);
        assert_eq!(order_number("12"), None);
        assert_eq!(order_number("../../admin 1"), None);
    }

    #[test]
    fn statuses_are_worded() {
        assert_eq!(label("shipped"), "en route");
        assert_eq!(label("weird"), "« weird »");
    }
}
