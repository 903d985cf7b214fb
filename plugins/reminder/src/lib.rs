//! Example plugin: a follow-up after silence. Every customer text is
//! acknowledged and schedules a follow-up `after_ms` later (`[config]`,
//! default 10 minutes), cancelled by the customer's next message (which
//! schedules a new one). When it comes due the bot asks whether the customer
//! still needs help, or, outside WhatsApp's 24-hour window, leaves the
//! agents a note instead.

use digibot_sdk::{Action, Bot, Message, Result, Timer, config, export_bot, timers};

struct Reminder;

impl Bot for Reminder {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let Some(text) = message.text() else {
            return Ok(vec![]);
        };
        let after_ms = config::get("after_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(600_000);
        timers::follow_up("follow-up", after_ms, text)?;
        Ok(vec![Action::text(format!("Noted: {text}"))?])
    }

    fn on_timer(timer: &Timer) -> Result<Vec<Action>> {
        if timer.outside_window {
            return Ok(vec![Action::note(format!(
                "The customer went quiet after {:?}; outside WhatsApp's 24-hour window, so no follow-up was sent.",
                timer.payload
            ))?]);
        }
        Ok(vec![Action::text(format!(
            "Still there? You wrote {:?}; can we help with anything else?",
            timer.payload
        ))?])
    }
}

export_bot!(Reminder);
