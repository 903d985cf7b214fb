//! `FakeDigishare`: a local stand-in for Digishare's API that records every
//! request digibot makes and answers like the real thing (a created message
//! answers its id), with programmable failures for the retry tests. Like
//! Digishare, it can send the messages digibot creates back to digibot's
//! webhook as agent (`model_type = "user"`) messages: see
//! [`FakeDigishare::echo_to`].

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How long [`FakeDigishare::settle`] watches for unexpected extra requests.
pub const SETTLE: Duration = Duration::from_millis(400);

/// One request the fake received, in arrival order.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Arrival index, from 0.
    pub seq: usize,
    pub method: String,
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// The `Authorization` header, verbatim.
    pub authorization: Option<String>,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The body parsed as JSON; `Value::Null` when empty or not JSON.
    pub body: Value,
    /// The body as text (lossy), to debug non-JSON bodies.
    pub raw_body: String,
    /// The status the fake answered.
    pub status: u16,
    /// The `Retry-After` header the fake answered, if any.
    pub retry_after: Option<String>,
    /// The JSON body the fake answered.
    pub response: Value,
    /// When it arrived, relative to the fake's start.
    pub at: Duration,
    /// When it arrived.
    pub received_at: Instant,
}

/// The wire form (see [`Recorded::wire`]) of the plain text reply `body`
/// to the customer of `conversation`: what an echo sends.
pub fn wire_text(conversation: &str, body: &str) -> Value {
    json!({"method": "POST", "path": "/v1/messages", "body": {
        "conversation_id": conversation, "type": "text", "body": body, "send_to_third": true
    }})
}

impl Recorded {
    /// Answered with a 2xx status.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The part tests compare exactly: method, path and JSON body.
    pub fn wire(&self) -> Value {
        json!({"method": self.method, "path": self.path, "body": self.body})
    }

    /// The conversation this request is about: the body's
    /// `conversation_id`, or the `{id}` of `/v1/conversations/{id}/...`.
    pub fn conversation_id(&self) -> Option<String> {
        if let Some(c) = self.body.get("conversation_id").and_then(Value::as_str) {
            return Some(c.to_string());
        }
        let rest = self.path.strip_prefix("/v1/conversations/")?;
        Some(rest.split('/').next()?.to_string())
    }

    /// One line for error messages.
    pub fn summary(&self) -> String {
        let query = self
            .query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let body = if self.body.is_null() {
            self.raw_body.clone()
        } else {
            self.body.to_string()
        };
        format!(
            "#{} +{}ms {} {}{} -> {} key={:?} auth={:?} body={}",
            self.seq,
            self.at.as_millis(),
            self.method,
            self.path,
            query,
            self.status,
            self.idempotency_key,
            self.authorization,
            body
        )
    }
}

/// A canned answer for one upcoming request (see [`FakeDigishare::script`]).
#[derive(Clone, Debug)]
pub struct Scripted {
    pub status: u16,
    pub retry_after: Option<String>,
    /// More headers to answer with (e.g. `Location`).
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Scripted {
    pub fn status(status: u16) -> Self {
        Scripted {
            status,
            retry_after: None,
            headers: Vec::new(),
            body: json!({"message": format!("scripted {status}")}),
        }
    }

    /// Adds a header to the answer (verbatim).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Adds a `Retry-After` header (seconds or an HTTP date, verbatim).
    pub fn retry_after(mut self, value: impl ToString) -> Self {
        self.retry_after = Some(value.to_string());
        self
    }

    pub fn body(mut self, body: Value) -> Self {
        self.body = body;
        self
    }
}

/// When the fake delivers the echo of a message digibot created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EchoTiming {
    /// Before answering the API call that created it: the echo webhook is
    /// delivered (digibot answered 200), then the answer waits `hold` more.
    BeforeResponse { hold: Duration },
    /// Right after answering the API call.
    AfterResponse,
    /// Kept until [`FakeDigishare::release_echoes`].
    Held,
}

/// How the fake echoes digibot's messages back to digibot's webhook.
#[derive(Clone, Debug)]
pub struct Echo {
    /// digibot's `/webhooks/digishare` URL.
    pub url: String,
    /// The webhook bearer token digibot expects.
    pub token: String,
    /// `sent_using` on the echoes; `None` leaves the field out.
    pub sent_using: Option<String>,
    /// How many times each echo is delivered (redeliveries).
    pub copies: usize,
    pub timing: EchoTiming,
}

/// One echo webhook delivered to digibot.
#[derive(Clone, Debug)]
pub struct EchoDelivery {
    /// The echoed message's id (the one the API call answered).
    pub message_id: String,
    /// digibot's status answer to the webhook.
    pub status: u16,
    /// digibot's answer's `status` field (`accepted` / `duplicate`).
    pub outcome: String,
}

type BodyPredicate = Arc<dyn Fn(&Value) -> bool + Send + Sync>;

struct Reject {
    predicate: BodyPredicate,
    enabled: bool,
}

/// Every k-th failable request fails (the k-th, 2k-th, ...).
struct FailEvery {
    every: u64,
    status: u16,
}

/// A seeded, deterministic fraction of failable requests fail.
struct FailFraction {
    rng: u64,
    fraction: f64,
    status: u16,
}

struct OAuth {
    expires_in: u64,
    client: Option<(String, String)>,
}

struct IssuedToken {
    token: String,
    expires_at: Instant,
    revoked: bool,
}

struct Inner {
    started: Instant,
    requests: Vec<Recorded>,
    messages_sent: u64,
    scripted: VecDeque<Scripted>,
    reject: Option<Reject>,
    fail_every: Option<FailEvery>,
    fail_fraction: Option<FailFraction>,
    /// Requests that went through the programmable failure step.
    failable_seen: u64,
    failures_include_oauth: bool,
    required_token: Option<String>,
    require_issued_token: bool,
    oauth: OAuth,
    tokens: Vec<IssuedToken>,
    echo: Option<Echo>,
    /// Echo webhooks built but not delivered yet ([`EchoTiming::Held`]).
    held_echoes: Vec<Value>,
    echoes: Vec<EchoDelivery>,
}

/// What the fake is about to answer.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn new(status: u16, body: Value) -> Self {
        Answer {
            status,
            retry_after: None,
            headers: Vec::new(),
            body,
        }
    }
}

/// A fake Digishare API on 127.0.0.1, served from the test's tokio runtime.
/// Dropping it stops the server.
pub struct FakeDigishare {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDigishare {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeDigishare {
    /// Binds 127.0.0.1:0 and starts serving.
    pub async fn start() -> Result<FakeDigishare> {
        let inner = Arc::new(Mutex::new(Inner {
            started: Instant::now(),
            requests: Vec::new(),
            messages_sent: 0,
            scripted: VecDeque::new(),
            reject: None,
            fail_every: None,
            fail_fraction: None,
            failable_seen: 0,
            failures_include_oauth: false,
            required_token: None,
            require_issued_token: false,
            oauth: OAuth {
                expires_in: 3600,
                client: None,
            },
            tokens: Vec::new(),
            echo: None,
            held_echoes: Vec::new(),
            echoes: Vec::new(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake Digishare")?;
        let addr = listener.local_addr()?;
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake Digishare stopped: {e}");
            }
        });
        Ok(FakeDigishare {
            addr,
            inner,
            server,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `http://127.0.0.1:PORT`, for DIGIBOT_API_BASE_URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    // ---- Programming ---------------------------------------------------

    /// Answer the next requests with these, one each, before anything else
    /// (token check, rejection, failure rates). Appends to the queue.
    pub fn script(&self, responses: impl IntoIterator<Item = Scripted>) {
        self.lock().scripted.extend(responses);
    }

    /// How many scripted responses are still queued.
    pub fn scripted_left(&self) -> usize {
        self.lock().scripted.len()
    }

    /// Every `every`-th failable request (the k-th, 2k-th, ...) gets
    /// `status`. `None` turns it off.
    pub fn fail_every(&self, every: Option<(u64, u16)>) {
        self.lock().fail_every = every.map(|(every, status)| FailEvery {
            every: every.max(1),
            status,
        });
    }

    /// A deterministic (seeded) `fraction` of failable requests get
    /// `status`. `None` turns it off.
    pub fn fail_fraction(&self, config: Option<(u64, f64, u16)>) {
        self.lock().fail_fraction = config.map(|(seed, fraction, status)| FailFraction {
            // splitmix64 must not start from 0 for the xorshift below.
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            fraction,
            status,
        });
    }

    /// Answer 400 to requests whose JSON body matches `predicate` (enabled
    /// at once; see [`FakeDigishare::set_reject_enabled`]).
    pub fn reject_when(&self, predicate: impl Fn(&Value) -> bool + Send + Sync + 'static) {
        self.lock().reject = Some(Reject {
            predicate: Arc::new(predicate),
            enabled: true,
        });
    }

    /// Turns the [`FakeDigishare::reject_when`] predicate on or off.
    pub fn set_reject_enabled(&self, enabled: bool) {
        if let Some(reject) = self.lock().reject.as_mut() {
            reject.enabled = enabled;
        }
    }

    /// Whether programmable failures (script, fail rates, rejection) also
    /// hit `POST /v1/oauth/token` (default: no).
    pub fn failures_include_oauth(&self, include: bool) {
        self.lock().failures_include_oauth = include;
    }

    /// Require `Authorization: Bearer TOKEN` on every API call (401
    /// otherwise). `None` accepts anything.
    pub fn require_token(&self, token: Option<&str>) {
        self.lock().required_token = token.map(str::to_string);
    }

    /// Require a bearer issued by `POST /v1/oauth/token`, unexpired and
    /// not revoked (401 otherwise).
    pub fn require_issued_token(&self, require: bool) {
        self.lock().require_issued_token = require;
    }

    /// `expires_in` of the tokens issued from now on (default 3600).
    pub fn oauth_expires_in(&self, seconds: u64) {
        self.lock().oauth.expires_in = seconds;
    }

    /// Only these client credentials get a token (401 otherwise). By
    /// default any credentials do.
    pub fn oauth_client(&self, client_id: &str, client_secret: &str) {
        self.lock().oauth.client = Some((client_id.to_string(), client_secret.to_string()));
    }

    /// Makes every token issued so far invalid (a later call gets 401 when
    /// [`FakeDigishare::require_issued_token`] is on).
    pub fn revoke_tokens(&self) {
        for token in &mut self.lock().tokens {
            token.revoked = true;
        }
    }

    /// The access tokens issued so far, in order (`tok-1`, `tok-2`, ...).
    pub fn tokens_issued(&self) -> Vec<String> {
        self.lock().tokens.iter().map(|t| t.token.clone()).collect()
    }

    /// From now on, every message digibot creates (`POST /v1/messages`
    /// answered 2xx) comes back to digibot's webhook as an agent message
    /// with the id the fake answered, as Digishare does. `None` stops it.
    pub fn echo_to(&self, echo: Option<Echo>) {
        self.lock().echo = echo;
    }

    /// Delivers the held echoes ([`EchoTiming::Held`]), newest first when
    /// `reversed` (out of order), each as many times as configured; returns
    /// how many webhooks were delivered.
    pub async fn release_echoes(&self, reversed: bool) -> Result<usize> {
        let (mut held, echo) = {
            let mut inner = self.lock();
            (std::mem::take(&mut inner.held_echoes), inner.echo.clone())
        };
        let echo = echo.context("no echo configured")?;
        if reversed {
            held.reverse();
        }
        let mut n = 0;
        for webhook in held {
            n += deliver_echo(&self.inner, &echo, &webhook).await?;
        }
        Ok(n)
    }

    /// The echo webhooks delivered so far, in order.
    pub fn echoes(&self) -> Vec<EchoDelivery> {
        self.lock().echoes.clone()
    }

    // ---- Inspection ----------------------------------------------------

    /// How many requests arrived so far, without copying them (for
    /// polling while thousands arrive, as the load benchmark does).
    pub fn received(&self) -> usize {
        self.lock().requests.len()
    }

    /// Every request so far, in arrival order (failed ones included).
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// The requests answered 2xx, in arrival order.
    pub fn successful(&self) -> Vec<Recorded> {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.ok())
            .cloned()
            .collect()
    }

    /// Bodies of the successful `POST /v1/messages` for `conversation_id`,
    /// in arrival order.
    pub fn messages_for(&self, conversation_id: &str) -> Vec<Value> {
        self.successful()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path == "/v1/messages")
            .filter(|r| {
                r.body.get("conversation_id").and_then(Value::as_str) == Some(conversation_id)
            })
            .map(|r| r.body)
            .collect()
    }

    /// The successful requests about `conversation_id` (messages and
    /// `/v1/conversations/{id}/...` calls), in arrival order.
    pub fn requests_for(&self, conversation_id: &str) -> Vec<Recorded> {
        self.successful()
            .into_iter()
            .filter(|r| r.conversation_id().as_deref() == Some(conversation_id))
            .collect()
    }

    /// [`Recorded::wire`] of [`FakeDigishare::requests_for`].
    pub fn wire_for(&self, conversation_id: &str) -> Vec<Value> {
        self.requests_for(conversation_id)
            .iter()
            .map(Recorded::wire)
            .collect()
    }

    /// Everything received, one line each, for error messages.
    pub fn dump(&self) -> String {
        let requests = self.requests();
        if requests.is_empty() {
            return "  (no requests)".to_string();
        }
        let mut out = String::new();
        for r in requests {
            let _ = writeln!(out, "  {}", r.summary());
        }
        out
    }

    /// Polls until at least `n` requests were answered 2xx; returns them.
    /// On timeout the error lists everything received.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<Recorded>> {
        self.wait_until(timeout, &format!("{n} successful requests"), |ok| {
            ok.len() >= n
        })
        .await
    }

    /// Polls until at least `n` successful requests concern
    /// `conversation_id`; returns those.
    pub async fn wait_for_conversation(
        &self,
        conversation_id: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Recorded>> {
        let what = format!("{n} successful requests for {conversation_id}");
        let ok = self
            .wait_until(timeout, &what, |ok| {
                ok.iter()
                    .filter(|r| r.conversation_id().as_deref() == Some(conversation_id))
                    .count()
                    >= n
            })
            .await?;
        Ok(ok
            .into_iter()
            .filter(|r| r.conversation_id().as_deref() == Some(conversation_id))
            .collect())
    }

    /// Polls until `done(successful requests)` holds; returns them.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[Recorded]) -> bool,
    ) -> Result<Vec<Recorded>> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.successful();
            if done(&ok) {
                return Ok(ok);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {:?} waiting for {what}; the fake received:\n{}",
                    timeout,
                    self.dump()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `n` successful requests, then watches for [`SETTLE`]: fails
    /// if more than `n` arrive. Returns exactly the `n`.
    pub async fn settle(&self, n: usize, timeout: Duration) -> Result<Vec<Recorded>> {
        self.wait_for(n, timeout).await?;
        self.assert_quiet(n, SETTLE).await
    }

    /// Watches for `period` that the number of successful requests stays
    /// exactly `n` (also right away: fails at once if it is over).
    pub async fn assert_quiet(&self, n: usize, period: Duration) -> Result<Vec<Recorded>> {
        let deadline = Instant::now() + period;
        loop {
            let ok = self.successful();
            if ok.len() != n {
                bail!(
                    "expected exactly {n} successful requests, got {}; the fake received:\n{}",
                    ok.len(),
                    self.dump()
                );
            }
            if Instant::now() >= deadline {
                return Ok(ok);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn header_string(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn next_random(state: &mut u64) -> f64 {
    // splitmix64
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The `live_chat.new_message` Digishare sends for a message created
/// through the API with `request` and answered `message_id`.
fn echo_webhook(echo: &Echo, message_id: &str, request: &Value) -> Value {
    let mut data = json!({
        "conversation_id": request.get("conversation_id").cloned().unwrap_or(Value::Null),
        "system": false,
        "type": request.get("type").cloned().unwrap_or(json!("text")),
        "body": request.get("body").or(request.get("file")).cloned().unwrap_or(Value::Null),
        "send_to_third": request.get("send_to_third").cloned().unwrap_or(json!(true)),
        "sender": {"id": "sndr_usr_api", "model_type": "user", "model_id": "usr_api", "name": "API"}
    });
    if let Some(sent_using) = &echo.sent_using {
        data["sent_using"] = json!(sent_using);
    }
    json!({"event": "live_chat.new_message", "data": {"id": message_id, "data": data}})
}

/// Posts `webhook` to digibot `echo.copies` times; records each answer.
async fn deliver_echo(inner: &Arc<Mutex<Inner>>, echo: &Echo, webhook: &Value) -> Result<usize> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    let message_id = webhook["data"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for _ in 0..echo.copies {
        let reply = client
            .post(&echo.url)
            .bearer_auth(&echo.token)
            .json(webhook)
            .send()
            .await
            .context("delivering an echo to digibot")?;
        let status = reply.status().as_u16();
        let answer: Value = reply.json().await.unwrap_or(Value::Null);
        inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .echoes
            .push(EchoDelivery {
                message_id: message_id.clone(),
                status,
                outcome: answer["status"].as_str().unwrap_or_default().to_string(),
            });
    }
    Ok(echo.copies)
}

/// What the fake answers a request, and the echo it owes digibot for it.
type Handled = (Answer, Option<(Echo, Value)>);

/// Answers and records one request (under the lock, nothing awaited).
fn record(
    shared: &Mutex<Inner>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Handled {
    let mut inner = shared.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let authorization = header_string(headers, "authorization");
    let path = uri.path().to_string();
    let answer = answer(
        &mut inner,
        method,
        &path,
        authorization.as_deref(),
        &parsed,
        now,
    );
    // Digishare sends a created message back as a webhook, sender the API
    // user: the echo of what digibot said.
    let echo = match &inner.echo {
        Some(echo) if path == "/v1/messages" && (200..300).contains(&answer.status) => answer
            .body
            .get("id")
            .and_then(Value::as_str)
            .map(|id| (echo.clone(), echo_webhook(echo, id, &parsed))),
        _ => None,
    };
    if let Some((echo, webhook)) = &echo
        && echo.timing == EchoTiming::Held
    {
        inner.held_echoes.push(webhook.clone());
    }
    let seq = inner.requests.len();
    let at = now.duration_since(inner.started);
    inner.requests.push(Recorded {
        seq,
        method: method.to_string(),
        path,
        query: uri.query().map(str::to_string),
        authorization,
        idempotency_key: header_string(headers, "idempotency-key"),
        content_type: header_string(headers, "content-type"),
        body: parsed,
        raw_body: String::from_utf8_lossy(body).into_owned(),
        status: answer.status,
        retry_after: answer.retry_after.clone(),
        response: answer.body.clone(),
        at,
        received_at: now,
    });
    (answer, echo)
}

async fn handle(
    State(shared): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (answer, echo) = record(&shared, &method, &uri, &headers, &body);
    if let Some((echo, webhook)) = echo {
        match echo.timing {
            EchoTiming::BeforeResponse { hold } => {
                if let Err(e) = deliver_echo(&shared, &echo, &webhook).await {
                    eprintln!("fake Digishare: echo failed: {e:#}");
                }
                tokio::time::sleep(hold).await;
            }
            EchoTiming::AfterResponse => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    // Let the API answer reach digibot first.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Err(e) = deliver_echo(&shared, &echo, &webhook).await {
                        eprintln!("fake Digishare: echo failed: {e:#}");
                    }
                });
            }
            EchoTiming::Held => {}
        }
    }

    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(answer.body)).into_response();
    if let Some(retry_after) = answer.retry_after
        && let Ok(value) = HeaderValue::from_str(&retry_after)
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    for (name, value) in answer.headers {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn answer(
    inner: &mut Inner,
    method: &Method,
    path: &str,
    authorization: Option<&str>,
    body: &Value,
    now: Instant,
) -> Answer {
    let is_oauth = path == "/v1/oauth/token";
    let failable = !is_oauth || inner.failures_include_oauth;

    if failable && let Some(s) = inner.scripted.pop_front() {
        return Answer {
            status: s.status,
            retry_after: s.retry_after,
            headers: s.headers,
            body: s.body,
        };
    }

    if is_oauth && method == Method::POST {
        return oauth_token(inner, body, now);
    }

    let bearer = authorization.and_then(|a| a.strip_prefix("Bearer "));
    if let Some(required) = &inner.required_token
        && bearer != Some(required.as_str())
    {
        return Answer::new(401, json!({"message": "Unauthenticated."}));
    }
    if inner.require_issued_token {
        let valid = inner
            .tokens
            .iter()
            .any(|t| Some(t.token.as_str()) == bearer && !t.revoked && t.expires_at > now);
        if !valid {
            return Answer::new(401, json!({"message": "Unauthenticated."}));
        }
    }

    if failable {
        if let Some(reject) = &inner.reject
            && reject.enabled
            && (reject.predicate)(body)
        {
            return Answer::new(
                400,
                json!({"message": "The given data was invalid.", "errors": {"body": ["rejected by the fake"]}}),
            );
        }
        inner.failable_seen += 1;
        let seen = inner.failable_seen;
        if let Some(f) = &inner.fail_every
            && seen.is_multiple_of(f.every)
        {
            return Answer::new(
                f.status,
                json!({"message": "injected failure (every k-th)"}),
            );
        }
        if let Some(f) = &mut inner.fail_fraction
            && next_random(&mut f.rng) < f.fraction
        {
            return Answer::new(f.status, json!({"message": "injected failure (fraction)"}));
        }
    }

    route(inner, method, path)
}

fn oauth_token(inner: &mut Inner, body: &Value, now: Instant) -> Answer {
    if body.get("grant_type").and_then(Value::as_str) != Some("client_credentials") {
        return Answer::new(400, json!({"error": "unsupported_grant_type"}));
    }
    if let Some((id, secret)) = &inner.oauth.client {
        let given_id = body.get("client_id").and_then(Value::as_str);
        let given_secret = body.get("client_secret").and_then(Value::as_str);
        if given_id != Some(id.as_str()) || given_secret != Some(secret.as_str()) {
            return Answer::new(401, json!({"error": "invalid_client"}));
        }
    }
    let token = format!("tok-{}", inner.tokens.len() + 1);
    let expires_in = inner.oauth.expires_in;
    inner.tokens.push(IssuedToken {
        token: token.clone(),
        // `expires_in` may be u64::MAX (a hostile answer under test).
        expires_at: now
            .checked_add(Duration::from_secs(expires_in))
            .unwrap_or(now + Duration::from_secs(100 * 365 * 86400)),
        revoked: false,
    });
    Answer::new(
        200,
        json!({"token_type": "Bearer", "expires_in": expires_in, "access_token": token}),
    )
}

fn route(inner: &mut Inner, method: &Method, path: &str) -> Answer {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "messages"] => {
            if method != Method::POST {
                return Answer::new(405, json!({"message": "Method not allowed."}));
            }
            inner.messages_sent += 1;
            Answer::new(
                201,
                json!({"id": format!("msg_bot_{}", inner.messages_sent), "status": "sent"}),
            )
        }
        [
            "v1",
            "conversations",
            _,
            "attach" | "detach",
            "participants",
        ] => {
            if method != Method::PUT {
                return Answer::new(405, json!({"message": "Method not allowed."}));
            }
            Answer::new(200, json!({"status": "ok"}))
        }
        ["v1", "conversations", _, "users", _] => {
            if method != Method::POST && method != Method::DELETE {
                return Answer::new(405, json!({"message": "Method not allowed."}));
            }
            Answer::new(200, json!({"status": "ok"}))
        }
        _ => Answer::new(404, json!({"message": "Not found."})),
    }
}
