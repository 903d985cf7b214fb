//! PostgreSQL for the replica tests: a fresh database per test in the
//! cluster named by `DIGIBOT_TEST_DATABASE_URL` (`scripts/test` starts one
//! with `scripts/pg-cluster`), and a cluster of a test's own for tests that
//! stop the database.
//!
//! Without `DIGIBOT_TEST_DATABASE_URL` a test is skipped, loudly; under CI
//! (`CI` set) it fails instead, so a CI machine without PostgreSQL cannot
//! pass by skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The repository root (for `scripts/pg-cluster`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `Ok(None)` (after saying so on stderr) when a PostgreSQL test should be
/// skipped here; an error under CI.
fn skip(test: &str, why: &str) -> Result<Option<String>> {
    if std::env::var_os("CI").is_some() {
        bail!("{test} needs PostgreSQL and CI has none: {why}");
    }
    eprintln!(
        "\n*** SKIPPED {test}: {why}\n*** run it with: eval \"$(scripts/pg-cluster start)\"\n"
    );
    Ok(None)
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> Result<String> {
    let (url, query) = match url.split_once('?') {
        Some((u, q)) => (u, format!("?{q}")),
        None => (url, String::new()),
    };
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .with_context(|| format!("not a postgres:// URL: {url}"))?;
    let host = rest.split('/').next().unwrap_or(rest);
    Ok(format!("postgres://{host}/{database}{query}"))
}

/// `psql`: on PATH, else the newest under /usr/lib/postgresql.
fn psql() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin/psql"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| PathBuf::from("psql"))
}

/// Runs SQL statements (each its own transaction) against `url`.
pub async fn psql_exec(url: &str, statements: &[&str]) -> Result<String> {
    let mut cmd = Command::new(psql());
    cmd.arg(url).args(["-v", "ON_ERROR_STOP=1", "-qtA"]);
    for s in statements {
        cmd.args(["-c", s]);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .context("running psql")?;
    if !out.status.success() {
        bail!(
            "psql {statements:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// An empty database `name` (dropped first if a run before left it) in
/// the test cluster, as a URL; `None` when the test is skipped.
pub async fn fresh_database(name: &str) -> Result<Option<String>> {
    let Ok(base) = std::env::var("DIGIBOT_TEST_DATABASE_URL") else {
        return skip(name, "DIGIBOT_TEST_DATABASE_URL is not set");
    };
    create_database(&base, name).await.map(Some)
}

async fn create_database(base: &str, name: &str) -> Result<String> {
    psql_exec(
        base,
        &[
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            &format!("CREATE DATABASE {name}"),
        ],
    )
    .await
    .with_context(|| format!("creating database {name} at {base}"))?;
    with_database(base, name)
}

/// A throwaway cluster of one test's own (`scripts/pg-cluster … NAME`),
/// which the test may stop and start; destroyed on drop.
pub struct OwnCluster {
    name: String,
    /// `postgres://…/digibot_test` of this cluster.
    pub url: String,
}

fn pg_cluster(args: &[&str]) -> Result<String> {
    let out = Command::new(repo_root().join("scripts/pg-cluster"))
        .args(args)
        .output()
        .context("running scripts/pg-cluster")?;
    if !out.status.success() {
        bail!(
            "scripts/pg-cluster {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl OwnCluster {
    /// Starts cluster `name`; `None` when the test is skipped (no
    /// PostgreSQL here).
    pub async fn start(name: &str) -> Result<Option<OwnCluster>> {
        if std::env::var_os("DIGIBOT_TEST_DATABASE_URL").is_none() {
            return skip(name, "DIGIBOT_TEST_DATABASE_URL is not set").map(|_| None);
        }
        let owned = name.to_string();
        let started = tokio::task::spawn_blocking(move || pg_cluster(&["start", &owned])).await?;
        let line = match started {
            Ok(line) => line,
            Err(e) => {
                return skip(name, &format!("cannot start a cluster of its own: {e:#}"))
                    .map(|_| None);
            }
        };
        let url = line
            .rsplit('=')
            .next()
            .filter(|u| u.starts_with("postgres://"))
            .with_context(|| format!("scripts/pg-cluster start printed {line:?}"))?
            .to_string();
        Ok(Some(OwnCluster {
            name: name.to_string(),
            url,
        }))
    }

    /// A fresh database `name` in this cluster.
    pub async fn database(&self, name: &str) -> Result<String> {
        create_database(&self.url, name).await
    }

    /// Fast shutdown: connections are cut, nothing is lost.
    pub async fn stop(&self) -> Result<()> {
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || pg_cluster(&["stop", &name])).await??;
        Ok(())
    }

    /// Starts it again, on the same port.
    pub async fn restart(&self) -> Result<()> {
        let name = self.name.clone();
        let line = tokio::task::spawn_blocking(move || pg_cluster(&["start", &name])).await??;
        if !line.ends_with(&self.url) {
            bail!("the cluster came back elsewhere: {line} (was {})", self.url);
        }
        Ok(())
    }
}

impl Drop for OwnCluster {
    /// Destroys the cluster, or (with `DIGIBOT_E2E_KEEP`, like the
    /// driver's folders) stops it and keeps its data for a look.
    fn drop(&mut self) {
        let keep = std::env::var_os("DIGIBOT_E2E_KEEP").is_some();
        let _ = pg_cluster(&[if keep { "stop" } else { "destroy" }, &self.name]);
    }
}
