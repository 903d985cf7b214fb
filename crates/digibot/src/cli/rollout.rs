//! `digibot rollout shadow|canary|promote|abort|status NAME`: a running
//! server's rollouts, through its admin API (`/admin/plugins/NAME/...`,
//! with `DIGIBOT_ADMIN_TOKEN`), so every replica sharing its database sees
//! the change. Prints the API's JSON answer.

use crate::config::Settings;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The server's base URL (default: `http://` and its listen address).
    #[arg(long, global = true)]
    pub url: Option<String>,
    #[command(subcommand)]
    pub command: RolloutCommand,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Run FILE beside NAME's serving version on every live event; its
    /// actions are compared and recorded, never sent.
    Shadow { name: String, file: PathBuf },
    /// Serve PERCENT% of conversations with FILE (rolled back on its own
    /// when it fails more than the serving version).
    Canary {
        name: String,
        file: PathBuf,
        #[arg(long)]
        percent: u8,
    },
    /// Make the candidate NAME's serving version.
    Promote {
        name: String,
        /// Refuse unless at least N shadowed events compared the same.
        #[arg(long)]
        require_same: Option<u64>,
        /// Promote even though some events differed or failed.
        #[arg(long)]
        accept_differences: bool,
        /// Replay this many recent production turns against the candidate
        /// first (default 20, 0 for none); a difference refuses.
        #[arg(long)]
        replay: Option<usize>,
    },
    /// Stop the candidate; the serving version stays.
    Abort { name: String },
    /// The rollout report: totals and the newest comparisons.
    Status {
        name: String,
        #[arg(long)]
        limit: Option<usize>,
    },
}

pub fn run(args: RolloutArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    crate::cli::block_on(run_async(args, settings))?
}

/// A running server's base URL: `url`, or `http://` + `DIGIBOT_LISTEN`
/// (its unspecified address as localhost).
pub(crate) fn base_url(url: Option<&str>, settings: &Settings) -> String {
    if let Some(url) = url {
        return url.trim_end_matches('/').to_string();
    }
    let mut addr = settings.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

async fn run_async(args: RolloutArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let token = settings
        .admin_token
        .as_ref()
        .context("DIGIBOT_ADMIN_TOKEN is not set: the admin API needs it")?;
    let base = base_url(args.url.as_deref(), settings);
    let client = reqwest::Client::new();
    let plugin = |name: &str, tail: &str| format!("{base}/admin/plugins/{name}{tail}");
    let request = match &args.command {
        RolloutCommand::Shadow { name, file } | RolloutCommand::Canary { name, file, .. } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let query = match &args.command {
                RolloutCommand::Canary { percent, .. } => format!("?mode=canary&percent={percent}"),
                _ => "?mode=shadow".to_string(),
            };
            client.put(plugin(name, &query)).body(bytes)
        }
        RolloutCommand::Promote {
            name,
            require_same,
            accept_differences,
            replay,
        } => {
            let mut query = format!("?accept_differences={accept_differences}");
            if let Some(n) = require_same {
                query.push_str(&format!("&require_same={n}"));
            }
            if let Some(n) = replay {
                query.push_str(&format!("&replay={n}"));
            }
            client.post(plugin(name, &format!("/promote{query}")))
        }
        RolloutCommand::Abort { name } => client.post(plugin(name, "/abort")),
        RolloutCommand::Status { name, limit } => {
            let query = limit.map(|l| format!("?limit={l}")).unwrap_or_default();
            client.get(plugin(name, &format!("/rollout{query}")))
        }
    };
    let answer = request
        .bearer_auth(token.expose())
        .send()
        .await
        .with_context(|| format!("cannot reach the admin API at {base}"))?;
    let status = answer.status();
    let body = answer.text().await.unwrap_or_default();
    let shown = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(body);
    if !status.is_success() {
        eprintln!("{shown}");
        bail!("the admin API answered {status}");
    }
    println!("{shown}");
    Ok(ExitCode::SUCCESS)
}
