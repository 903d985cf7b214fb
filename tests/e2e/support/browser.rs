//! `Browser`: headless Chromium driven through chromedriver with
//! [fantoccini], for the dashboard test; a thin wrapper that adds what the
//! test wants (waits with a deadline, failures that say what the page
//! showed, a cap on every command). Chromedriver runs in a process group of
//! its own, so dropping a `Browser` ends exactly the chromedriver and
//! Chromium it started, even when a test fails half-way.
//!
//! Finding the programs: `CHROMIUM` / `CHROMEDRIVER` if set, else
//! `chromium` (or `chromium-browser`, `google-chrome`) and `chromedriver`
//! on `PATH` (Debian: `apt-get install chromium chromium-driver`).

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use super::digibot::free_port;

/// The most any one WebDriver command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

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

/// `command`, failing (with `what`) if it errs or takes over
/// [`COMMAND_TIMEOUT`].
async fn within<T, E>(
    what: impl std::fmt::Display,
    command: impl Future<Output = Result<T, E>>,
) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
        Ok(result) => result.with_context(|| format!("WebDriver: {what}")),
        Err(_) => bail!("WebDriver: {what}: no answer after {COMMAND_TIMEOUT:?}"),
    }
}

/// A WebDriver session on a headless Chromium of its own.
pub struct Browser {
    client: Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
    log_path: PathBuf,
}

/// Chromedriver, leader of its own process group; dropping it kills the
/// group.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium it started (`--`:
        // a negative pid is a group, not an option).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        // Should kill fail, chromedriver itself still goes.
        let _ = self.0.kill();
        let _ = self.0.wait();
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
        let mut driver = Driver(
            Command::new(driver)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log_path.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", driver.display()))?,
        );
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
                profile.path().join("profile").display()
            ),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object");
        };
        let client = async {
            wait_listening(&mut driver.0, port).await?;
            within(
                "creating the session",
                ClientBuilder::rustls()
                    .context("rustls initialization")?
                    .capabilities(capabilities)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .await
        }
        .await
        .with_context(|| format!("chromedriver log:\n{}", tail(&log_path)))?;
        Ok(Browser {
            client,
            _driver: driver,
            _profile: profile,
            log_path,
        })
    }

    /// chromedriver's log (the end of it), for failures.
    pub fn log(&self) -> String {
        tail(&self.log_path)
    }

    pub async fn goto(&self, url: &str) -> Result<()> {
        within(format!("goto {url}"), self.client.goto(url)).await
    }

    /// Runs `script` (a function body; `arguments` holds `args`, a JSON
    /// array) in the page and returns its result.
    pub async fn execute(&self, script: &str, args: Value) -> Result<Value> {
        let Value::Array(args) = args else {
            bail!("execute: the arguments must be a JSON array, not {args}");
        };
        within("execute", self.client.execute(script, args)).await
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
    pub async fn find_last(&self, css: &str, timeout: Duration) -> Result<Element> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut found = within(
                format!("find {css:?}"),
                self.client.find_all(Locator::Css(css)),
            )
            .await?;
            if let Some(last) = found.pop() {
                return Ok(last);
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
        within(format!("clicking {css:?}"), element.click()).await
    }

    /// Types `text` into the element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str, timeout: Duration) -> Result<()> {
        let element = self.find_last(css, timeout).await?;
        within(format!("typing into {css:?}"), element.send_keys(text)).await
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Result<Vec<u8>> {
        within("screenshot", self.client.screenshot()).await
    }
}

/// Waits until chromedriver accepts connections on `port`; fails if it
/// exits or takes over 30 s.
async fn wait_listening(driver: &mut Child, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = driver.try_wait()? {
            bail!("chromedriver exited ({status})");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("chromedriver not listening after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last 40 lines of the file at `path`.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
