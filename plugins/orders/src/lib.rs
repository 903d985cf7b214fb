//! Orders: the customer types an order number, the plugin asks the shop's
//! order API for it and answers its status.
//!
//! `orders.toml`:
//!
//! ```toml
//! [config]
//! orders_api = "https://api.shop.example"
//!
//! [grants]
//! http = ["https://api.shop.example/orders/"]
//! secrets = ["ORDERS_TOKEN"]
//! ```
//!
//! The request is `GET {orders_api}/orders/{number}` with
//! `Authorization: Bearer {{secret:ORDERS_TOKEN}}`: the operator supplies
//! the token (`DIGIBOT_SECRET_ORDERS_TOKEN`), digibot puts it in at send
//! time, and the plugin never sees it. Messages without an order number get
//! no answer from this plugin, so it can sit beside others.
use digibot_sdk::{Action, Bot, Message, Result, config, export_bot, log};

mod lookup;

struct Orders;

impl Bot for Orders {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let Some(number) = message.text().and_then(lookup::order_number) else {
            return Ok(vec![]);
        };
        let Some(api) = config::get("orders_api") else {
            log::error("orders_api is not configured");
            return Ok(vec![]);
        };
        Ok(vec![Action::text(lookup::status_reply(&api, &number))?])
    }
}

export_bot!(Orders);
