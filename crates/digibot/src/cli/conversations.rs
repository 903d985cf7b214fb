//! `digibot conversations list | show ID | release ID`: who is in charge of
//! each conversation, on the database of the configured data dir. Works
//! while the server runs (SQLite WAL): the dispatcher reads the state at
//! every event, so a release applies from the next customer message.

use crate::config::Settings;
use clap::Subcommand;
use digibot_domain::event::ConversationState;
use digibot_store::{ConversationRecord, Release};
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum Conversations {
    /// List conversations, most recently changed first.
    List {
        /// Only conversations in this state (bot, human, closed).
        #[arg(long, value_parser = parse_state)]
        state: Option<ConversationState>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one conversation's state, since when and why.
    Show {
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hand a conversation in a human's hands back to the bot.
    Release { id: String },
}

fn parse_state(s: &str) -> Result<ConversationState, String> {
    match s {
        "bot" => Ok(ConversationState::Bot),
        "human" => Ok(ConversationState::Human),
        "closed" => Ok(ConversationState::Closed),
        _ => Err("expected bot, human or closed".into()),
    }
}

/// A time in ms as `YYYY-MM-DD HH:MM:SS UTC`, or `-`.
fn time(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "-".into();
    };
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn print_one(c: &ConversationRecord) {
    println!("conversation   {}", c.id);
    println!("state          {}", c.state);
    println!("since          {}", time(Some(c.changed_at)));
    println!("reason         {}", c.reason);
    println!("channel        {}", c.channel.as_deref().unwrap_or("-"));
    println!("customer wrote {}", time(c.last_customer_at));
    println!("agent wrote    {}", time(c.last_agent_at));
}

pub fn run(cmd: Conversations, settings: &Settings) -> anyhow::Result<ExitCode> {
    crate::cli::block_on(run_async(cmd, settings))?
}

async fn run_async(cmd: Conversations, settings: &Settings) -> anyhow::Result<ExitCode> {
    let store = crate::config::open_store(settings).await?;
    let code = match cmd {
        Conversations::List { state, limit, json } => {
            let rows = store.conversation_states(state, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no conversations");
            } else {
                println!(
                    "{:<24}  {:<6}  {:<23}  reason",
                    "conversation", "state", "since"
                );
                for c in &rows {
                    println!(
                        "{:<24}  {:<6}  {:<23}  {}",
                        c.id,
                        c.state.as_str(),
                        time(Some(c.changed_at)),
                        c.reason
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Conversations::Show { id, json } => match store.conversation_state(&id).await? {
            Some(c) if json => {
                // The record's fields, and its pending timers beside them.
                let timers = store.conversation(&id).await?.timers;
                let mut out = serde_json::to_value(&c)?;
                out["timers"] = serde_json::to_value(&timers)?;
                println!("{}", serde_json::to_string_pretty(&out)?);
                ExitCode::SUCCESS
            }
            Some(c) => {
                print_one(&c);
                let timers = store.conversation(&id).await?.timers;
                if timers.is_empty() {
                    println!("timers: none pending");
                }
                for t in timers {
                    println!(
                        "timer {} ({}, plugin {}): due {}{}",
                        t.name,
                        t.id,
                        t.plugin,
                        time(Some(t.due_at)),
                        if t.cancel_on_customer_message {
                            ", cancelled if the customer writes"
                        } else {
                            ""
                        }
                    );
                }
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("no conversation {id}");
                ExitCode::FAILURE
            }
        },
        Conversations::Release { id } => {
            match store
                .release(&id, "released with digibot conversations release".into())
                .await?
            {
                Release::Released => {
                    println!("conversation {id} is back in the bot's hands");
                    ExitCode::SUCCESS
                }
                Release::NotHuman(state) => {
                    eprintln!("conversation {id} is {state}, not in a human's hands");
                    ExitCode::FAILURE
                }
                Release::Unknown => {
                    eprintln!("no conversation {id}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    store.close();
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_in_utc() {
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(Some(1_773_479_575_000)), "2026-03-14 09:12:55 UTC");
        assert_eq!(time(None), "-");
    }
}
