//! Helpers for the durability tests: posting webhooks from many tasks at
//! once (also across a restart), the `digibot dead-letters` CLI, admin
//! calls other than GET, and an API stand-in that never answers.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::digibot::{ADMIN_TOKEN, Digibot, HttpReply};

/// Posts webhooks to one digibot address, or round-robin to several
/// replicas as a load balancer would, from any task (cheap to clone).
/// Unlike [`Digibot::post_json`] it needs no borrow of the [`Digibot`], so
/// the test can kill and restart the process while posts are in flight.
#[derive(Clone)]
pub struct Poster {
    client: reqwest::Client,
    urls: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    auth: Option<(String, String)>,
}

impl Poster {
    /// For `bot`'s address and webhook auth (both survive a restart).
    pub fn new(bot: &Digibot) -> Result<Poster> {
        Poster::round_robin(&[bot])
    }

    /// Each POST to the next of `bots` in turn (they share webhook auth);
    /// a redelivery after a failed POST so goes to another replica.
    pub fn round_robin(bots: &[&Digibot]) -> Result<Poster> {
        let first = bots.first().context("no digibot to post to")?;
        Ok(Poster {
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()?,
            urls: Arc::new(
                bots.iter()
                    .map(|b| format!("{}/webhooks/digishare", b.url()))
                    .collect(),
            ),
            next: Arc::new(AtomicUsize::new(0)),
            auth: first.auth_header(),
        })
    }

    /// One POST; `Err` when no HTTP answer came back (refused, reset).
    pub async fn post(&self, body: &Value) -> Result<HttpReply> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len();
        self.post_to(i, body).await
    }

    /// One POST to the `i`th digibot of the rotation.
    pub async fn post_to(&self, i: usize, body: &Value) -> Result<HttpReply> {
        let mut req = self.client.post(&self.urls[i]).json(body);
        if let Some((name, value)) = &self.auth {
            req = req.header(name, value);
        }
        let resp = req.send().await.context("POST /webhooks/digishare")?;
        super::digibot::reply(resp).await
    }

    /// Posts until digibot answers 200, the way Digishare redelivers a
    /// webhook that got no 2xx (polling every 25 ms, up to `timeout`).
    /// Returns the `status` field of the answer (`accepted`/`duplicate`).
    pub async fn deliver(&self, body: &Value, timeout: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.post(body).await {
                Ok(reply) if reply.status == 200 => {
                    return Ok(reply.json()?["status"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string());
                }
                Ok(reply) if std::time::Instant::now() >= deadline => {
                    bail!("webhook still answered {}: {}", reply.status, reply.body)
                }
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(e.context(format!("webhook not delivered after {timeout:?}")));
                }
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }
}

/// What one `digibot` CLI run printed.
#[derive(Debug)]
pub struct CliRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// Fails with both outputs unless the command succeeded.
    pub fn ok(self) -> Result<CliRun> {
        if !self.success {
            bail!(
                "digibot CLI failed\nstdout:\n{}\nstderr:\n{}",
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// Runs the real `digibot ARGS...` on `data_dir` (the same database a
/// running server uses), with no other DIGIBOT_* variable.
pub async fn cli(data_dir: &Path, args: &[&str]) -> Result<CliRun> {
    cli_with(data_dir, &[], args).await
}

/// [`cli`] with `env` (DIGIBOT_* variables among them) set too.
pub async fn cli_with(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Result<CliRun> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_digibot"));
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DIGIBOT_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("DIGIBOT_DATA_DIR", data_dir)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await?
        .context("running the digibot CLI")?;
    Ok(CliRun {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `digibot dead-letters list --json`, parsed.
pub async fn cli_dead_letters(data_dir: &Path) -> Result<Vec<Value>> {
    let run = cli(data_dir, &["dead-letters", "list", "--json"])
        .await?
        .ok()?;
    match serde_json::from_str(&run.stdout)
        .with_context(|| format!("`dead-letters list --json` printed {:?}", run.stdout))?
    {
        Value::Array(letters) => Ok(letters),
        other => bail!("`dead-letters list --json` is not an array: {other}"),
    }
}

/// `METHOD path` on digibot's admin API with [`ADMIN_TOKEN`].
pub async fn admin(bot: &Digibot, method: reqwest::Method, path: &str) -> Result<HttpReply> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client
        .request(method.clone(), format!("{}{path}", bot.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .with_context(|| format!("{method} {path}"))?;
    let status = resp.status().as_u16();
    let body = resp.text().await?;
    Ok(HttpReply {
        status,
        headers: Vec::new(),
        body,
    })
}

/// GET /admin/dead-letters as a JSON array.
pub async fn admin_dead_letters(bot: &Digibot) -> Result<Vec<Value>> {
    let reply = bot.admin_get("/admin/dead-letters").await?;
    reply.expect_status(200)?;
    match reply.json()? {
        Value::Array(letters) => Ok(letters),
        other => bail!("/admin/dead-letters is not an array: {other}"),
    }
}

/// GET /admin/outbox: outbox rows by status (`pending`, `sent`, `dead`).
pub async fn outbox_counts(bot: &Digibot) -> Result<Value> {
    let reply = bot.admin_get("/admin/outbox").await?;
    reply.expect_status(200)?;
    reply.json()
}

/// A Messages API that accepts connections and never answers, as a
/// stand-in for a hung Digishare (see the graceful shutdown test); once
/// [`Blackhole::forward_to`] is called, new connections are proxied to a
/// real (fake) API instead.
pub struct Blackhole {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    forward: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Blackhole {
    pub async fn start() -> Result<Blackhole> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let forward = Arc::new(std::sync::Mutex::new(None::<std::net::SocketAddr>));
        let task = tokio::spawn({
            let accepted = accepted.clone();
            let forward = forward.clone();
            async move {
                let mut held = Vec::new();
                while let Ok((mut socket, _)) = listener.accept().await {
                    let target = *forward.lock().unwrap_or_else(|e| e.into_inner());
                    match target {
                        None => {
                            accepted.fetch_add(1, Ordering::SeqCst);
                            // Keep it open, unread: the request hangs.
                            held.push(socket);
                        }
                        Some(target) => {
                            held.clear();
                            tokio::spawn(async move {
                                if let Ok(mut upstream) =
                                    tokio::net::TcpStream::connect(target).await
                                {
                                    let _ =
                                        tokio::io::copy_bidirectional(&mut socket, &mut upstream)
                                            .await;
                                }
                            });
                        }
                    }
                }
            }
        });
        Ok(Blackhole {
            addr,
            accepted,
            forward,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`, for DIGIBOT_API_BASE_URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted and left hanging so far.
    pub fn hanging(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// From now on, new connections go through to `target`.
    pub fn forward_to(&self, target: std::net::SocketAddr) {
        *self.forward.lock().unwrap_or_else(|e| e.into_inner()) = Some(target);
    }
}
