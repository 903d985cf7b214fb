//! `Digibot`: the real `digibot serve` binary, run as a child process in a
//! temporary folder (plugins/, data/, digibot.log).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::fake::FakeDigishare;
use super::fixtures::{fixture, plugin_wasm};

/// The webhook bearer token / `X-Digishare-Secret` value used by default.
pub const WEBHOOK_TOKEN: &str = "test-webhook-secret";
/// The admin API bearer used by default.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The Digishare API token [`DigibotBuilder::fake`] configures.
pub const API_TOKEN: &str = "test-api-token";

/// How long to wait for /healthz after spawning.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How webhooks authenticate, and so which header `post_json` adds.
#[derive(Clone, Debug)]
pub enum WebhookAuth {
    None,
    Token(String),
    Basic(String, String),
}

/// A reply from digibot.
#[derive(Clone, Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// The body as JSON (error names the status and body otherwise).
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("reply {} is not JSON: {:?}", self.status, self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Fails unless the status is `status`.
    pub fn expect_status(&self, status: u16) -> Result<&Self> {
        if self.status != status {
            bail!("expected HTTP {status}, got {}: {}", self.status, self.body);
        }
        Ok(self)
    }
}

/// Configures a [`Digibot`]. Defaults: listen on a free 127.0.0.1 port,
/// webhook token [`WEBHOOK_TOKEN`], admin token [`ADMIN_TOKEN`], retries
/// 5 ms / 50 ms / 8 attempts, `RUST_LOG=info`, no API base/token, no plugins.
/// Cloning it gives the same configuration for another replica.
#[derive(Clone)]
pub struct DigibotBuilder {
    env: BTreeMap<String, Option<String>>,
    args: Vec<String>,
    plugins: Vec<(String, Option<String>)>,
    auth: WebhookAuth,
    admin_token: Option<String>,
    listen: Option<String>,
}

impl Default for DigibotBuilder {
    fn default() -> Self {
        DigibotBuilder {
            env: BTreeMap::new(),
            args: Vec::new(),
            plugins: Vec::new(),
            auth: WebhookAuth::Token(WEBHOOK_TOKEN.to_string()),
            admin_token: Some(ADMIN_TOKEN.to_string()),
            listen: None,
        }
        .retry(5, 50, 8)
        .env("RUST_LOG", "info")
    }
}

impl DigibotBuilder {
    /// Points the API at `fake` with token [`API_TOKEN`].
    pub fn fake(self, fake: &FakeDigishare) -> Self {
        self.api_base(&fake.url()).api_token(API_TOKEN)
    }

    pub fn api_base(self, url: &str) -> Self {
        self.env("DIGIBOT_API_BASE_URL", url)
    }

    pub fn api_token(self, token: &str) -> Self {
        self.env("DIGIBOT_API_TOKEN", token)
    }

    /// No DIGIBOT_API_TOKEN: dry-run mode.
    pub fn no_api_token(self) -> Self {
        self.env_remove("DIGIBOT_API_TOKEN")
    }

    /// Plugins get 10 s per turn instead of the 100 ms default: for tests
    /// of delivery and durability under a burst, where a first turn that
    /// passes 100 ms of wall clock on a loaded 2-core machine is
    /// containment working, not the failure under test.
    pub fn long_deadline(self) -> Self {
        self.env("DIGIBOT_PLUGIN_TIMEOUT_MS", "10000")
    }

    /// Copies NAME.wasm into the plugins folder (no NAME.toml).
    pub fn plugin(mut self, name: &str) -> Self {
        self.plugins.push((name.to_string(), None));
        self
    }

    /// Copies NAME.wasm and writes NAME.toml with `toml`.
    pub fn plugin_toml(mut self, name: &str, toml: &str) -> Self {
        self.plugins
            .push((name.to_string(), Some(toml.to_string())));
        self
    }

    pub fn webhook_token(mut self, token: &str) -> Self {
        self.auth = WebhookAuth::Token(token.to_string());
        self
    }

    pub fn webhook_basic(mut self, user: &str, password: &str) -> Self {
        self.auth = WebhookAuth::Basic(user.to_string(), password.to_string());
        self
    }

    pub fn no_webhook_auth(mut self) -> Self {
        self.auth = WebhookAuth::None;
        self
    }

    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_string());
        self
    }

    pub fn no_admin_token(mut self) -> Self {
        self.admin_token = None;
        self
    }

    /// DIGIBOT_RETRY_BASE_MS / _MAX_MS / _MAX_ATTEMPTS.
    pub fn retry(self, base_ms: u64, max_ms: u64, attempts: u32) -> Self {
        self.env("DIGIBOT_RETRY_BASE_MS", &base_ms.to_string())
            .env("DIGIBOT_RETRY_MAX_MS", &max_ms.to_string())
            .env("DIGIBOT_RETRY_MAX_ATTEMPTS", &attempts.to_string())
    }

    /// DIGIBOT_WEBHOOK_MAX_BYTES.
    pub fn max_bytes(self, bytes: usize) -> Self {
        self.env("DIGIBOT_WEBHOOK_MAX_BYTES", &bytes.to_string())
    }

    /// DIGIBOT_LISTEN (default: a free 127.0.0.1 port).
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = Some(addr.to_string());
        self
    }

    pub fn insecure(self) -> Self {
        self.arg("--insecure")
    }

    /// An extra argument after `serve`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_string(), Some(value.to_string()));
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.env.insert(key.to_string(), None);
        self
    }

    /// DIGIBOT_DATABASE_URL: PostgreSQL instead of SQLite under data/.
    pub fn database(self, url: &str) -> Self {
        self.env("DIGIBOT_DATABASE_URL", url)
    }

    /// `n` replicas of this configuration (each with its own port and
    /// folder, so its own plugins folder and compile cache), started at
    /// once; they share a store only through [`DigibotBuilder::database`].
    pub async fn start_replicas(self, n: usize) -> Result<Vec<Digibot>> {
        let mut bots = Vec::with_capacity(n);
        for _ in 0..n {
            bots.push(self.clone().spawn()?);
        }
        for bot in &mut bots {
            bot.wait_healthy(START_TIMEOUT).await?;
        }
        Ok(bots)
    }

    /// Spawns digibot and waits until /healthz answers 200 (fails with the
    /// log if it exits first or takes over 30 s).
    pub async fn start(self) -> Result<Digibot> {
        let mut bot = self.spawn()?;
        bot.wait_healthy(START_TIMEOUT).await?;
        Ok(bot)
    }

    /// Spawns digibot without waiting for it.
    pub fn spawn(self) -> Result<Digibot> {
        let root = tempfile::Builder::new()
            .prefix("digibot-e2e-")
            .tempdir()
            .context("creating the test folder")?;
        let plugins_dir = root.path().join("plugins");
        let data_dir = root.path().join("data");
        std::fs::create_dir_all(&plugins_dir)?;
        std::fs::create_dir_all(&data_dir)?;
        for (name, toml) in &self.plugins {
            let wasm = plugin_wasm(name);
            std::fs::copy(&wasm, plugins_dir.join(format!("{name}.wasm")))
                .with_context(|| format!("copying {}", wasm.display()))?;
            if let Some(toml) = toml {
                std::fs::write(plugins_dir.join(format!("{name}.toml")), toml)?;
            }
        }
        let listen = match self.listen {
            Some(listen) => listen,
            None => format!("127.0.0.1:{}", free_port()?),
        };
        let port = listen
            .rsplit(':')
            .next()
            .context("DIGIBOT_LISTEN without a port")?
            .to_string();
        let base_url = format!("http://127.0.0.1:{port}");

        let mut env = self.env;
        env.insert("DIGIBOT_LISTEN".into(), Some(listen.clone()));
        env.insert(
            "DIGIBOT_PLUGINS_DIR".into(),
            Some(plugins_dir.to_string_lossy().into_owned()),
        );
        env.insert(
            "DIGIBOT_DATA_DIR".into(),
            Some(data_dir.to_string_lossy().into_owned()),
        );
        match &self.auth {
            WebhookAuth::None => {}
            WebhookAuth::Token(t) => {
                env.insert("DIGIBOT_WEBHOOK_TOKEN".into(), Some(t.clone()));
            }
            WebhookAuth::Basic(u, p) => {
                env.insert("DIGIBOT_WEBHOOK_BASIC".into(), Some(format!("{u}:{p}")));
            }
        }
        if let Some(t) = &self.admin_token {
            env.insert("DIGIBOT_ADMIN_TOKEN".into(), Some(t.clone()));
        }
        // Logs go to a file: no colours. The API is on 127.0.0.1: no proxy.
        env.entry("NO_COLOR".into()).or_insert(Some("1".into()));
        env.insert("NO_PROXY".into(), Some("127.0.0.1,localhost".into()));
        env.insert("no_proxy".into(), Some("127.0.0.1,localhost".into()));
        for proxy in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            env.insert(proxy.into(), None);
        }

        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut bot = Digibot {
            log_path: root.path().join("digibot.log"),
            plugins_dir,
            data_dir,
            root,
            listen,
            base_url,
            env,
            args: self.args,
            auth: self.auth,
            admin_token: self.admin_token,
            child: None,
            client,
        };
        bot.spawn_child()?;
        Ok(bot)
    }
}

/// A running (or stopped) digibot. Killed on drop; its log is printed on
/// drop too (libtest shows it only for failing tests).
pub struct Digibot {
    root: tempfile::TempDir,
    pub plugins_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    listen: String,
    base_url: String,
    env: BTreeMap<String, Option<String>>,
    args: Vec<String>,
    auth: WebhookAuth,
    admin_token: Option<String>,
    child: Option<Child>,
    client: reqwest::Client,
}

impl Drop for Digibot {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        let tail = &lines[lines.len().saturating_sub(300)..];
        eprintln!(
            "---- digibot log ({}, last {} lines) ----\n{}\n---- end of digibot log ----",
            self.log_path.display(),
            tail.len(),
            tail.join("\n")
        );
        if std::env::var_os("DIGIBOT_E2E_KEEP").is_some() {
            let path = self.root.path().to_path_buf();
            eprintln!("keeping {}", path.display());
            // Leak the folder on purpose.
            let root = std::mem::replace(
                &mut self.root,
                tempfile::tempdir().expect("a scratch tempdir"),
            );
            let _ = root.keep();
        }
    }
}

impl Digibot {
    pub fn builder() -> DigibotBuilder {
        DigibotBuilder::default()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> &str {
        &self.base_url
    }

    /// DIGIBOT_LISTEN as given.
    pub fn listen_addr(&self) -> &str {
        &self.listen
    }

    /// The test folder (plugins/, data/, digibot.log).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn_child(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening digibot.log")?;
        let err = log.try_clone()?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_digibot"));
        cmd.arg("serve")
            .args(&self.args)
            .current_dir(self.root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        // Nothing from the developer's environment leaks in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DIGIBOT_") {
                cmd.env_remove(&key);
            }
        }
        for (key, value) in &self.env {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        let child = cmd.spawn().context("spawning digibot")?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Polls /healthz until 200; fails with the log if digibot exits.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/healthz", self.base_url);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "digibot exited ({status}) before becoming healthy; log:\n{}",
                    self.logs()
                );
            }
            if let Ok(resp) = self
                .client
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && resp.status().as_u16() == 200
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "digibot not healthy at {url} after {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The header `post_json` adds for the configured webhook auth.
    pub fn auth_header(&self) -> Option<(String, String)> {
        match &self.auth {
            WebhookAuth::None => None,
            WebhookAuth::Token(t) => Some(("Authorization".into(), format!("Bearer {t}"))),
            WebhookAuth::Basic(u, p) => Some(("Authorization".into(), basic_auth(u, p))),
        }
    }

    /// POSTs a fixture to /webhooks/digishare with the configured auth.
    pub async fn post_fixture(&self, name: &str) -> Result<HttpReply> {
        self.post_json(&fixture(name)).await
    }

    /// POSTs JSON to /webhooks/digishare with the configured auth.
    pub async fn post_json(&self, body: &Value) -> Result<HttpReply> {
        let auth = self.auth_header();
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        self.post_raw(serde_json::to_vec(body)?, &headers).await
    }

    /// POSTs `body` to /webhooks/digishare with `Content-Type:
    /// application/json` and exactly `headers` (no auth is added).
    pub async fn post_raw(
        &self,
        body: impl Into<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<HttpReply> {
        let mut req = self
            .client
            .post(format!("{}/webhooks/digishare", self.base_url))
            .header("Content-Type", "application/json")
            .body(body.into());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        reply(req.send().await.context("POST /webhooks/digishare")?).await
    }

    /// POSTs an envelope and fails unless it is accepted; returns the key.
    pub async fn accept(&self, body: &Value) -> Result<String> {
        let reply = self.post_json(body).await?;
        reply.expect_status(200)?;
        let json = reply.json()?;
        if json["status"] != "accepted" {
            bail!("expected status accepted, got {json}");
        }
        Ok(json["event_id"].as_str().unwrap_or_default().to_string())
    }

    /// GET `path` (e.g. `/admin/events?limit=5`) with the admin bearer.
    pub async fn admin_get(&self, path: &str) -> Result<HttpReply> {
        let mut req = self.client.get(format!("{}{path}", self.base_url));
        if let Some(t) = &self.admin_token {
            req = req.bearer_auth(t);
        }
        reply(req.send().await.with_context(|| format!("GET {path}"))?).await
    }

    /// One unlabelled value of `/metrics` (a gauge, a counter, a
    /// histogram's `_sum` or `_count`).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let reply = self.admin_get("/metrics").await?;
        reply.expect_status(200)?;
        reply
            .body
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .with_context(|| format!("no {name} in /metrics"))
    }

    /// GET `path` with no header at all.
    pub async fn get(&self, path: &str) -> Result<HttpReply> {
        let req = self.client.get(format!("{}{path}", self.base_url));
        reply(req.send().await.with_context(|| format!("GET {path}"))?).await
    }

    /// GET /admin/events?limit=N as a JSON array.
    pub async fn events(&self, limit: usize) -> Result<Vec<Value>> {
        let reply = self
            .admin_get(&format!("/admin/events?limit={limit}"))
            .await?;
        reply.expect_status(200)?;
        match reply.json()? {
            Value::Array(events) => Ok(events),
            other => bail!("/admin/events is not an array: {other}"),
        }
    }

    /// Polls /admin/events until the event `key` satisfies `done`.
    pub async fn wait_event(
        &self,
        key: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events(200).await?;
            if let Some(event) = events.iter().find(|e| e["key"] == key)
                && done(event)
            {
                return Ok(event.clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "event {key} not done after {timeout:?}; /admin/events:\n{}",
                    serde_json::to_string_pretty(&events)?
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Polls /admin/events until every event in `keys` is recorded and no
    /// longer `pending` (its plugins have run and its actions are queued;
    /// they may not be sent yet).
    pub async fn wait_handled(&self, keys: &[String], timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events(1000).await?;
            let done: Vec<Value> = keys
                .iter()
                .filter_map(|k| events.iter().find(|e| e["key"] == k.as_str()))
                .filter(|e| !matches!(e["status"].as_str(), None | Some("pending")))
                .cloned()
                .collect();
            if done.len() == keys.len() {
                return Ok(done);
            }
            if Instant::now() >= deadline {
                bail!(
                    "events not all handled after {timeout:?} (want {keys:?}); /admin/events:\n{}",
                    serde_json::to_string_pretty(&events)?
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// GET /admin/outbox: action counts by status (`pending`, `sent`,
    /// `dead`; absent means 0).
    pub async fn outbox(&self) -> Result<Value> {
        let reply = self.admin_get("/admin/outbox").await?;
        reply.expect_status(200)?;
        reply.json()
    }

    /// Waits until the events `keys` are handled and no action is pending
    /// in the outbox: after this, digibot sends nothing more for them.
    pub async fn wait_idle(&self, keys: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.wait_handled(keys, timeout).await?;
        loop {
            let outbox = self.outbox().await?;
            if outbox["pending"].as_i64().unwrap_or(0) == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("outbox still has pending actions after {timeout:?}: {outbox}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM (via `kill -TERM PID`); does not wait.
    pub fn sigterm(&self) -> Result<()> {
        let pid = self.pid().context("digibot was never started")?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed: {status}");
        }
        Ok(())
    }

    /// Waits for the process to exit; fails after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("digibot was never started")?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "digibot still running after {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Starts digibot again with the same folders, port and environment
    /// (SIGKILLs it first if it is still running) and waits for /healthz.
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.kill9()?;
        }
        self.spawn_child()?;
        self.wait_healthy(START_TIMEOUT).await
    }

    /// Everything digibot wrote to stdout and stderr so far (all runs),
    /// with ANSI colour codes stripped.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let mut bytes = Vec::new();
            let _ = std::io::Read::read_to_end(&mut f, &mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        strip_ansi(&text)
    }

    /// Polls the log until a line satisfies `matches`; returns that line.
    pub async fn wait_for_log(
        &self,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().lines().find(|l| matches(l)) {
                return Ok(line.to_string());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no log line with {what} after {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Status, headers and body of a response.
pub async fn reply(resp: reqwest::Response) -> Result<HttpReply> {
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp.text().await?;
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `Basic base64(user:password)`.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
