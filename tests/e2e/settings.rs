//! digibot's settings from the outside: `serve --help` documents each one
//! (flag, variable, default, doc) as declared; a file, the environment
//! and flags layer in that order on the real binary; a bad value names
//! where it came from.

use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::support::durable::cli;
use crate::support::*;

/// `digibot serve` with `args`, only the DIGIBOT_* variables in `env`.
fn serve(args: &[&str], env: &[(&str, &str)]) -> Result<std::process::Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_digibot"));
    cmd.arg("serve").args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DIGIBOT_") {
            cmd.env_remove(&key);
        }
    }
    cmd.envs(env.iter().copied()).env("NO_COLOR", "1");
    cmd.output().context("running digibot serve")
}

/// Every variable docs/operations.md's settings table lists is in `serve
/// --help` with its flag and default; secrets' values from the
/// environment are not shown.
#[tokio::test]
async fn serve_help_documents_every_setting() -> Result<()> {
    let out = serve(
        &["--help"],
        &[
            ("DIGIBOT_ADMIN_TOKEN", "hunter2-admin"),
            ("DIGIBOT_DATABASE_URL", "postgres://u:hunter2-db@h/d"),
            ("DIGIBOT_CONCURRENCY", "7"),
        ],
    )?;
    ensure!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout)?;
    for expected in [
        "--listen <ADDR>",
        "Address the HTTP server binds",
        "[env: DIGIBOT_LISTEN=]",
        "[default: 127.0.0.1:8080]",
        "--retry-base-ms <MS>",
        "[env: DIGIBOT_RETRY_BASE_MS=]",
        "--plugin-timeout-ms <MS>",
        "--plugin-network-wall-ms <MS>",
        "[default: 10000]",
        "--config <PATH>",
        // A variable that is set shows its value, unless it is a secret.
        "[env: DIGIBOT_CONCURRENCY=7]",
        "[env: DIGIBOT_ADMIN_TOKEN]",
    ] {
        ensure!(help.contains(expected), "no {expected:?} in:\n{help}");
    }
    ensure!(!help.contains("hunter2"), "a secret in --help:\n{help}");

    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md"),
    )?;
    let documented: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        // The environment column only: a meaning may name other variables.
        .filter_map(|l| l.split('|').nth(2))
        .flat_map(|cell| cell.split('`'))
        .filter(|w| w.starts_with("DIGIBOT_") && *w != "DIGIBOT_LOG_FORMAT")
        .collect();
    ensure!(documented.len() >= 37, "{documented:?}");
    for var in documented {
        ensure!(
            help.contains(&format!("[env: {var}")),
            "{var} is documented but not in --help"
        );
    }
    Ok(())
}

/// Defaults < the `--config` file < DIGIBOT_* < `serve`'s flags, on the
/// real server: the file's body limit applies (no variable sets it); the
/// admin token of the environment beats the file's, and the flag's beats
/// both.
#[tokio::test]
async fn file_then_environment_then_flags() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("digibot.toml");
    std::fs::write(
        &file,
        "admin_token = \"from-file\"\nwebhook_max_bytes = 2000\n[retry]\nbase_ms = 5\n",
    )?;
    let bot = Digibot::builder()
        .arg("--config")
        .arg(&file.to_string_lossy())
        .arg("--admin-token=from-flag")
        .start()
        .await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    for (token, status) in [("from-flag", 200), (ADMIN_TOKEN, 401), ("from-file", 401)] {
        let got = client
            .get(format!("{}/admin/plugins", bot.url()))
            .bearer_auth(token)
            .send()
            .await?
            .status()
            .as_u16();
        ensure!(got == status, "admin token {token}: {got}, not {status}");
    }
    let small = customer_text("conv_settings", "msg_settings_small", "x");
    bot.post_json(&small).await?.expect_status(200)?;
    let big = customer_text("conv_settings", "msg_settings_big", &"x".repeat(3000));
    bot.post_json(&big).await?.expect_status(413)?;
    Ok(())
}

/// A bad value says which variable, key or flag it came from, and
/// digibot does not start; a secret's value is not repeated.
#[tokio::test]
async fn a_bad_value_names_its_source() -> Result<()> {
    let out = serve(&[], &[("DIGIBOT_LISTEN", "nope")])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2)
            && stderr.contains("DIGIBOT_LISTEN=\"nope\": invalid socket address syntax"),
        "{out:?}"
    );

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("digibot.toml");
    std::fs::write(&file, "[runtime]\npooling = \"sometimes\"\n")?;
    let out = serve(&["--config", &file.to_string_lossy()], &[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2)
            && stderr.contains("runtime.pooling = \"sometimes\": expected true or false"),
        "{out:?}"
    );

    std::fs::write(&file, "listne = \"127.0.0.1:1\"\n")?;
    let out = serve(&["--config", &file.to_string_lossy()], &[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && stderr.contains("unknown setting `listne`"),
        "{out:?}"
    );

    let out = serve(&["--concurrency", "lots"], &[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && stderr.contains("--concurrency=\"lots\": "),
        "{out:?}"
    );

    // The operators' commands read the same settings the same way.
    let run = cli(
        dir.path(),
        &["conversations", "--config", &file.to_string_lossy(), "list"],
    )
    .await?;
    ensure!(
        !run.success && run.stderr.contains("unknown setting `listne`"),
        "{run:?}"
    );
    Ok(())
}
