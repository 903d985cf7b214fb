//! Test plugin: a customer text `tick N STEP` schedules N timers, `t00` to
//! `t{N-1}`, the i-th due (i+1) × STEP ms later, and answers `ticking N`;
//! each timer, when it fires, answers its name. So a test can count that
//! every timer fired once, and in order within its conversation.
use digibot_sdk::{Action, Bot, Message, Result, Timer, export_bot, timers};

struct Ticker;

impl Bot for Ticker {
    fn on_message(message: &Message) -> Result<Vec<Action>> {
        let Some(rest) = message.text().and_then(|t| t.strip_prefix("tick ")) else {
            return Ok(vec![]);
        };
        let mut words = rest.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(n)), Some(Ok(step))) = (words.next(), words.next()) else {
            return Ok(vec![Action::text("usage: tick N STEP")?]);
        };
        for i in 0..n {
            timers::schedule(&format!("t{i:02}"), (i + 1) * step, "")?;
        }
        Ok(vec![Action::text(format!("ticking {n}"))?])
    }

    fn on_timer(timer: &Timer) -> Result<Vec<Action>> {
        Ok(vec![Action::text(timer.name.clone())?])
    }
}

export_bot!(Ticker);
