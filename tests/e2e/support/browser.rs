//! `Browser`: headless Chromium driven through chromedriver's W3C WebDriver
//! HTTP API (plain JSON over HTTP with reqwest; no WebDriver crate), for
//! the dashboard test. Chromedriver runs in a process group of its own, so
//! dropping a `Browser` ends exactly the chromedriver and Chromium it
//! started, even when a test fails half-way.
//!
//! Finding the programs: `CHROMIUM` / `CHROMEDRIVER` if set, else
//! `chromium` (or `chromium-browser`, `google-chrome`) and `chromedriver`
//! on `PATH` (Debian: `apt-get install chromium chromium-driver`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};

use super::digibot::free_port;

/// The key of an element reference in WebDriver JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The first of `names` found as a file on `PATH`.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in names {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Chromium and chromedriver, if this machine has both.
pub fn find_chromium() -> Option<(PathBuf, PathBuf)> {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| on_path(&["chromium", "chromium-browser", "google-chrome"]))?;
    let driver = std::env::var_os("CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| on_path(&["chromedriver"]))?;
    Some((chromium, driver))
}

/// A WebDriver session on a headless Chromium of its own.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    client: reqwest::Client,
    _profile: tempfile::TempDir,
    log_path: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium it started (`--`:
        // a negative pid is a group, not an option).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        // Should kill fail, chromedriver itself still goes.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a fresh
    /// profile and a `width`×`height` window.
    pub async fn start(chromium: &Path, driver: &Path, width: u32, height: u32) -> Result<Browser> {
        let profile = tempfile::Builder::new()
            .prefix("digibot-chromium-")
            .tempdir()?;
        let port = free_port()?;
        let log_path = profile.path().join("chromedriver.log");
        let log = std::fs::File::create(&log_path)?;
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log_path.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", driver.display()))?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()?;
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            client,
            _profile: profile,
            log_path,
        };
        browser.wait_ready().await?;
        let args = [
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--hide-scrollbars".into(),
            "--lang=en-US".into(),
            format!("--window-size={width},{height}"),
            format!(
                "--user-data-dir={}",
                browser._profile.path().join("profile").display()
            ),
        ];
        let created = browser
            .send(
                reqwest::Method::POST,
                "/session",
                Some(json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": chromium, "args": args},
                }}})),
            )
            .await
            .context("creating the WebDriver session")?;
        browser.session = created["sessionId"]
            .as_str()
            .with_context(|| format!("no sessionId in {created}"))?
            .to_string();
        Ok(browser)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.driver.try_wait()? {
                bail!("chromedriver exited ({status}): {}", self.log());
            }
            if let Ok(resp) = self
                .client
                .get(format!("{}/status", self.base))
                .send()
                .await
                && let Ok(body) = resp.json::<Value>().await
                && body["value"]["ready"] == true
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("chromedriver not ready after 30 s: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// chromedriver's log (the end of it), for failures.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// One WebDriver command; returns its `value`, or fails with the
    /// WebDriver error.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("WebDriver {method} {path}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("WebDriver {method} {path}: not JSON"))?;
        let value = body["value"].clone();
        if !status.is_success() || value.get("error").is_some_and(|e| !e.is_null()) {
            bail!(
                "WebDriver {method} {path}: {status} {}: {}",
                value["error"],
                value["message"]
            );
        }
        Ok(value)
    }

    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        self.send(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the
    /// page and returns its result.
    pub async fn execute(&self, script: &str, args: Value) -> Result<Value> {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// The visible text of every element matching `css`.
    pub async fn texts(&self, css: &str) -> Result<Vec<String>> {
        let value = self
            .execute(
                "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText);",
                json!([css]),
            )
            .await?;
        Ok(value
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect())
    }

    /// Polls until some element matching `css` has text containing `text`;
    /// fails with what the page showed instead.
    pub async fn wait_text(&self, css: &str, text: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let texts = self.texts(css).await?;
            if let Some(found) = texts.iter().find(|t| t.contains(text)) {
                return Ok(found.clone());
            }
            if Instant::now() > deadline {
                let page = self.texts("body").await.unwrap_or_default().join("\n");
                bail!(
                    "no {css:?} with {text:?} after {timeout:?}; matching elements: {texts:?}\npage text:\n{page}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last element matching `css` (the newest, for chat messages),
    /// waiting for one to exist.
    pub async fn find_last(&self, css: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .command(
                    reqwest::Method::POST,
                    "/elements",
                    Some(json!({"using": "css selector", "value": css})),
                )
                .await?;
            if let Some(last) = found.as_array().and_then(|a| a.last()) {
                return last[ELEMENT]
                    .as_str()
                    .map(str::to_string)
                    .with_context(|| format!("bad element reference {last}"));
            }
            if Instant::now() > deadline {
                bail!("no element {css:?} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the (last) element matching `css`, as a user would.
    pub async fn click(&self, css: &str, timeout: Duration) -> Result<()> {
        let element = self.find_last(css, timeout).await?;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await
        .with_context(|| format!("clicking {css:?}"))?;
        Ok(())
    }

    /// Types `text` into the element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str, timeout: Duration) -> Result<()> {
        let element = self.find_last(css, timeout).await?;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({"text": text})),
        )
        .await
        .with_context(|| format!("typing into {css:?}"))?;
        Ok(())
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        let value = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await?;
        let encoded = value.as_str().context("screenshot is not a string")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(encoded)?)
    }
}
