//! The `digibot` subcommands. `serve` runs the server; the others are tools
//! for operators (dead letters, conversations) and plugin authors.

mod build;
mod chat;
mod check;
mod conversations;
mod dead_letters;
mod new;
mod record;
mod replay;
mod rollout;
mod test;

use crate::config::{Flags, Settings};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Sandboxed WebAssembly bots for Digishare LiveChat.
#[derive(Debug, Parser)]
#[command(name = "digibot", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The settings file of the commands that use digibot's settings.
#[derive(Debug, clap::Args)]
pub struct SettingsFile {
    /// Settings file (TOML); the DIGIBOT_* environment variables (and
    /// `serve`'s flags) override it.
    #[arg(long = "config", value_name = "PATH")]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the webhook server (dry-run when no API token is set).
    ///
    /// Every setting below is also a DIGIBOT_* environment variable and a
    /// key of the --config file (`retry.base_ms` is `base_ms` in its
    /// `[retry]` table): built-in defaults, then the file, then the
    /// environment, then these flags, each overriding the one before. An
    /// empty value unsets a setting.
    Serve {
        /// Allow listening on a non-loopback address without webhook auth.
        #[arg(long)]
        insecure: bool,
        #[command(flatten)]
        settings: SettingsFile,
        #[command(flatten)]
        flags: Flags,
    },
    /// Inspect and fix actions Digishare refused or that ran out of retries.
    DeadLetters {
        #[command(flatten)]
        settings: SettingsFile,
        #[command(subcommand)]
        command: dead_letters::DeadLetters,
    },
    /// See who is in charge of conversations; hand one back to the bot.
    Conversations {
        #[command(flatten)]
        settings: SettingsFile,
        #[command(subcommand)]
        command: conversations::Conversations,
    },
    /// Create a plugin crate: an echo bot with a test and a README.
    New(new::NewArgs),
    /// Build a plugin crate to a component (wasm32-wasip2) and print its path.
    Build(build::BuildArgs),
    /// Say whether a component will load here: world, imports, size, compile time.
    Check(check::CheckArgs),
    /// Run plugins on recorded webhooks and print their actions and requests as JSON.
    Replay(replay::ReplayArgs),
    /// Talk to a bot in the terminal, as the customer.
    Chat(chat::ChatArgs),
    /// Run conversation tests (TOML files of turns and expected answers)
    /// against a plugin component, in any language.
    Test(test::TestArgs),
    /// Shadow, canary, promote or abort a new plugin version on a running
    /// server (through its admin API).
    Rollout {
        #[command(flatten)]
        settings: SettingsFile,
        #[command(flatten)]
        args: rollout::RolloutArgs,
    },
}

/// Log line formats, chosen by `DIGIBOT_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Readable lines, coloured only on a terminal (the default).
    Text,
    /// One JSON object per line, with the fields of the current span and
    /// of every span it is in (`span`, `spans`).
    Json,
}

impl LogFormat {
    /// `DIGIBOT_LOG_FORMAT`: unset or empty means text.
    pub fn from_env() -> Result<LogFormat, String> {
        match std::env::var("DIGIBOT_LOG_FORMAT")
            .as_deref()
            .map(str::trim)
        {
            Err(_) | Ok("") | Ok("text") => Ok(LogFormat::Text),
            Ok("json") => Ok(LogFormat::Json),
            Ok(other) => Err(format!(
                "DIGIBOT_LOG_FORMAT must be `text` or `json`, not {other:?}"
            )),
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), in the format
/// `DIGIBOT_LOG_FORMAT` asks for.
pub fn init_tracing() -> Result<(), String> {
    let format = LogFormat::from_env()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,wasmtime=warn,cranelift=warn")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    Ok(())
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // The authoring tools take `--config KEY=VALUE` for the plugin; their
    // digibot settings come from DIGIBOT_* alone.
    let env_settings = || Settings::load(None);
    match cli.command {
        Command::Serve {
            insecure,
            settings,
            flags,
        } => {
            let settings = Settings::load_with_flags(settings.path.as_deref(), &flags)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(crate::serve::serve(settings, insecure))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters { settings, command } => {
            dead_letters::run(command, &Settings::load(settings.path.as_deref())?)
        }
        Command::Conversations { settings, command } => {
            conversations::run(command, &Settings::load(settings.path.as_deref())?)
        }
        Command::New(args) => new::run(args),
        Command::Build(args) => build::run(args),
        Command::Check(args) => check::run(args, &env_settings()?),
        Command::Replay(args) => replay::run(args, &env_settings()?),
        Command::Chat(args) => chat::run(args, &env_settings()?),
        Command::Test(args) => test::run(args, &env_settings()?),
        Command::Rollout { settings, args } => {
            rollout::run(args, &Settings::load(settings.path.as_deref())?)
        }
    }
}

/// Runs one command's async work (the store is async) on a runtime of its
/// own.
pub fn block_on<T>(work: impl Future<Output = T>) -> anyhow::Result<T> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(work))
}
