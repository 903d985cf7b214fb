//! `digibot dead-letters list | retry ID|--all | drop ID`, on the configured
//! database (SQLite under the data dir, or `DIGIBOT_DATABASE_URL`). Works
//! while the server runs: a retried letter is picked up by a running sender
//! (any replica's) within a second.

use crate::config::Settings;
use clap::Subcommand;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// List dead letters with their last status and error.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the outbox.
    Retry {
        /// The dead letter to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Retry every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete a dead letter for good.
    Drop { id: i64 },
}

pub fn run(cmd: DeadLetters, settings: &Settings) -> anyhow::Result<ExitCode> {
    crate::cli::block_on(run_async(cmd, settings))?
}

async fn run_async(cmd: DeadLetters, settings: &Settings) -> anyhow::Result<ExitCode> {
    let store = crate::config::open_store(settings).await?;
    let code = match cmd {
        DeadLetters::List { json } => {
            let letters = store.dead_letters().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else if letters.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:>6}  {:<20}  {:<12}  {:>6}  {:>8}  error",
                    "id", "conversation", "plugin", "status", "attempts"
                );
                for l in &letters {
                    let error: String = l
                        .last_error
                        .as_deref()
                        .unwrap_or("")
                        .chars()
                        .take(80)
                        .collect();
                    println!(
                        "{:>6}  {:<20}  {:<12}  {:>6}  {:>8}  {} {} {}",
                        l.id,
                        l.conversation_id,
                        l.plugin,
                        l.last_status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "-".into()),
                        l.attempts,
                        l.method,
                        l.path,
                        error
                    );
                }
            }
            ExitCode::SUCCESS
        }
        DeadLetters::Retry { id, all } => {
            let n = store.retry_dead(if all { None } else { id }).await?;
            println!("{n} dead letter(s) back in the outbox");
            if n == 0 && !all {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        DeadLetters::Drop { id } => {
            if store.drop_dead(id).await? {
                println!("dropped dead letter {id}");
                ExitCode::SUCCESS
            } else {
                eprintln!("no dead letter {id}");
                ExitCode::FAILURE
            }
        }
    };
    store.close();
    Ok(code)
}
