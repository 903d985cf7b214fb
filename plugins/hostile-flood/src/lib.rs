//! Hostile test plugin: answers every message with 10,000 text actions, so
//! the host's cap on actions per event must cut it short.
use digibot_sdk::{Action, Bot, Message, Result, export_bot};

const FLOOD: usize = 10_000;

struct HostileFlood;

impl Bot for HostileFlood {
    fn on_message(_message: &Message) -> Result<Vec<Action>> {
        let mut actions = Vec::with_capacity(FLOOD);
        for i in 0..FLOOD {
            actions.push(Action::text(format!("flood {i}"))?);
        }
        Ok(actions)
    }
}

export_bot!(HostileFlood);
