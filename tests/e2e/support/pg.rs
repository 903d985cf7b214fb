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

/// The URL in `scripts/pg-cluster start`'s `export
/// DIGIBOT_TEST_DATABASE_URL='...'` line.
fn start_url(line: &str) -> Option<String> {
    let url = line
        .trim()
        .strip_prefix("export DIGIBOT_TEST_DATABASE_URL=")?
        .trim_matches('\'');
    url.starts_with("postgres://").then(|| url.to_string())
}

/// A throwaway cluster of one test's own (`scripts/pg-cluster … NAME`),
/// which the test may stop and start; destroyed on drop.
pub struct OwnCluster {
    name: String,
    /// `postgres://…/digibot_test` of this cluster.
    pub url: String,
    /// Started with `DIGIBOT_PG_SSL=0` (no TLS).
    plaintext: bool,
}

fn pg_cluster(args: &[&str]) -> Result<String> {
    pg_cluster_with(args, false)
}

fn pg_cluster_with(args: &[&str], plaintext: bool) -> Result<String> {
    let mut cmd = Command::new(repo_root().join("scripts/pg-cluster"));
    cmd.args(args);
    if plaintext {
        cmd.env("DIGIBOT_PG_SSL", "0");
    }
    let out = cmd.output().context("running scripts/pg-cluster")?;
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
        OwnCluster::start_with(name, false).await
    }

    /// Starts cluster `name` without TLS (a plaintext-only server).
    pub async fn start_plaintext(name: &str) -> Result<Option<OwnCluster>> {
        OwnCluster::start_with(name, true).await
    }

    async fn start_with(name: &str, plaintext: bool) -> Result<Option<OwnCluster>> {
        if std::env::var_os("DIGIBOT_TEST_DATABASE_URL").is_none() {
            return skip(name, "DIGIBOT_TEST_DATABASE_URL is not set").map(|_| None);
        }
        let owned = name.to_string();
        let started =
            tokio::task::spawn_blocking(move || pg_cluster_with(&["start", &owned], plaintext))
                .await?;
        let line = match started {
            Ok(line) => line,
            Err(e) => {
                return skip(name, &format!("cannot start a cluster of its own: {e:#}"))
                    .map(|_| None);
            }
        };
        let url = start_url(&line)
            .with_context(|| format!("scripts/pg-cluster start printed {line:?}"))?;
        Ok(Some(OwnCluster {
            name: name.to_string(),
            url,
            plaintext,
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
        let (name, plaintext) = (self.name.clone(), self.plaintext);
        let line =
            tokio::task::spawn_blocking(move || pg_cluster_with(&["start", &name], plaintext))
                .await??;
        if start_url(&line).as_deref() != Some(self.url.as_str()) {
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

/// `url` with `key=value` in its query (replacing the key if present).
pub fn with_param(url: &str, key: &str, value: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(key))
        .map(str::to_string)
        .collect();
    pairs.push(format!("{key}={value}"));
    format!("{base}?{}", pairs.join("&"))
}

/// `url` without `key` in its query.
pub fn without_param(url: &str, key: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let pairs: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && p.split('=').next() != Some(key))
        .collect();
    if pairs.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", pairs.join("&"))
    }
}

/// The `host:port` of a `postgres://` URL.
pub fn host_port(url: &str) -> Result<String> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .with_context(|| format!("not a URL: {url}"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    Ok(authority
        .rsplit('@')
        .next()
        .unwrap_or(authority)
        .to_string())
}

/// `url` pointing at `host_port` instead.
pub fn with_host_port(url: &str, host_port: &str) -> Result<String> {
    let old = self::host_port(url)?;
    Ok(url.replacen(&format!("@{old}"), &format!("@{host_port}"), 1))
}

/// A TCP proxy in front of PostgreSQL that can be frozen: while frozen it
/// accepts connections and reads what they send but forwards nothing
/// either way, like a database host that stopped answering (a network
/// partition, a stalled VM). Thawed, it forwards what it held and goes on.
pub struct FreezableProxy {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    frozen: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    /// A proxy to `upstream` (`host:port`), thawed.
    pub async fn start(upstream: &str) -> Result<FreezableProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (frozen, watch) = tokio::sync::watch::channel(false);
        let upstream = upstream.to_string();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, watch) = (upstream.clone(), watch.clone());
                connections.spawn(async move {
                    let mut thawed = watch.clone();
                    let _ = thawed.wait_for(|f| !*f).await;
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pipe(client_read, server_write, watch.clone()),
                        pipe(server_read, client_write, watch),
                    );
                });
            }
        });
        Ok(FreezableProxy { addr, frozen, task })
    }

    /// Stops forwarding, in both directions, on every connection.
    pub fn freeze(&self) {
        let _ = self.frozen.send(true);
    }

    /// Forwards again (what was held first).
    pub fn thaw(&self) {
        let _ = self.frozen.send(false);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, holding whatever it read while frozen.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
