//! Delivering the outbox to Digishare: the one place that makes outgoing
//! HTTP requests.
//!
//! Each conversation's actions go out strictly in order: only the oldest
//! pending action of a conversation is ever in flight. Connection errors,
//! timeouts, 408, 429 and 5xx are retried with exponential backoff and full
//! jitter (or exactly `Retry-After` when Digishare sends one); other 4xx
//! are final. An action that is refused or runs out of attempts becomes a
//! dead letter, with the last status and body, and the conversation moves
//! on: one bad reply must not silence the bot for that customer.
//!
//! Without a token or OAuth client, the sender is in dry-run: it logs each
//! request (method, path, JSON body) once and marks it sent, a message with
//! the id `dry-run-ACTION`.
//!
//! Nothing Digishare answers can make the sender panic or hang: every
//! delay it announces (`Retry-After`, OAuth `expires_in`) is parsed with
//! checked arithmetic and capped, answer bodies are read up to
//! [`MAX_ANSWER_BYTES`], redirects are not followed (a 3xx is final), and
//! the API base URL must be https unless it is on loopback. A `429` pauses
//! every send, not only the conversation that got it: the limit is the
//! account's. Whatever ends an attempt's task (a panic included), an
//! [`InFlightGuard`] frees its conversation.
//!
//! A delivery is recorded with the message id Digishare answered (to
//! recognise the message when it comes back as a webhook); a delivered
//! hand-off puts the conversation in a human's hands in the same
//! transaction. Each request is announced to [`Sends`] while in flight, so
//! an agent message can wait for the id of a send it may be the echo of.

use crate::metrics as m;
use crate::sends::Sends;
use digibot_domain::answer::{self, Verdict};
use digibot_domain::lifecycle;
use digibot_store::{OutboxAction, Store, now_ms};
use metrics::counter;
use rand::Rng;
use reqwest::header::HeaderValue;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tracing::Instrument;

/// What the dispatcher and the sender share: the sender's wake-up when new
/// actions are queued, and the conversations with a send in flight.
#[derive(Clone, Default)]
pub struct Outbox {
    notify: Arc<Notify>,
    sends: Sends,
}

impl Outbox {
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// The sends in flight, by conversation.
    pub fn sends(&self) -> &Sends {
        &self.sends
    }
}

/// How the sender reaches the Messages API.
#[derive(Clone)]
pub struct SenderConfig {
    /// Digishare API base URL.
    pub api_base_url: String,
    pub credentials: ApiCredentials,
    /// Timeout of one Messages API request.
    pub request_timeout: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
}

/// What authenticates the sender's requests.
#[derive(Clone)]
pub enum ApiCredentials {
    /// None: log requests instead of sending them.
    DryRun,
    /// A Messages API bearer token.
    Token(String),
    /// OAuth client credentials.
    Client { id: String, secret: String },
}

impl std::fmt::Debug for ApiCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApiCredentials::DryRun => "DryRun",
            ApiCredentials::Token(_) => "Token(..)",
            ApiCredentials::Client { .. } => "Client { .. }",
        })
    }
}

/// Backoff of the outbox sender.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub base_ms: u64,
    pub max_ms: u64,
    pub max_attempts: u32,
}

/// Why the sender cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the API base URL {url:?} is not a URL: {why}")]
    BadBaseUrl { url: String, why: String },
    #[error(
        "the API base URL {0:?} must use https: plain http would send the API token in the clear (http is allowed only to a loopback address, for tests)"
    )]
    InsecureBaseUrl(String),
}

/// The most of a Messages API or OAuth answer the sender reads: Digishare
/// answers a created message's id, or a short error.
pub const MAX_ANSWER_BYTES: usize = 64 << 10;

/// The longest `Retry-After` honoured for the action that got it.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The longest every send pauses for one 429: if the limit lasts longer,
/// the next attempt meets another 429 and pauses again, whereas a wrong
/// `Retry-After` costs at most this.
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// The longest an OAuth token is trusted, whatever `expires_in` says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Refuses a base URL the token must not travel to: not https, unless
/// on loopback (a local fake in tests).
fn check_base_url(url: &str) -> Result<(), ClientError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ClientError::BadBaseUrl {
        url: url.to_string(),
        why: e.to_string(),
    })?;
    let host = parsed.host_str().unwrap_or("");
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(ClientError::InsecureBaseUrl(url.to_string())),
        other => Err(ClientError::BadBaseUrl {
            url: url.to_string(),
            why: format!("scheme {other:?} is not https"),
        }),
    }
}

/// How requests are authenticated.
enum Credentials {
    DryRun,
    Static(String),
    OAuth {
        client_id: String,
        client_secret: String,
        token: tokio::sync::Mutex<Option<(String, Instant)>>,
    },
}

/// The result of one attempt.
#[derive(Debug)]
enum Attempt {
    Sent {
        status: u16,
        /// The created message's id, when Digishare answered one.
        message_id: Option<String>,
    },
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    Fatal {
        status: Option<u16>,
        error: String,
    },
}

/// What the run loop must not start again.
#[derive(Default)]
struct InFlight {
    /// Conversations with a request in flight (at most one each).
    conversations: HashSet<String>,
    /// Actions whose attempt ended since the current outbox read began:
    /// that read may predate the attempt's commit, so its view of them is
    /// stale (a sent action would look pending and go out twice).
    settled: HashSet<i64>,
}

/// Frees an action's conversation when its attempt's task ends, however
/// it ends (a panic included): the conversation's in-flight mark, its
/// [`Sends`] count and the send permit, then wakes the run loop. Without
/// it, a panic would leave the conversation "in flight" for the life of
/// the process, and nothing would be sent to it again.
pub struct InFlightGuard {
    in_flight: Arc<Mutex<InFlight>>,
    sends: Sends,
    outbox: Outbox,
    action: i64,
    conversation: String,
    permit: Option<OwnedSemaphorePermit>,
}

impl InFlightGuard {
    /// Marks `conversation` in flight for `action`, holding `permit`.
    fn begin(
        in_flight: &Arc<Mutex<InFlight>>,
        outbox: &Outbox,
        action: i64,
        conversation: &str,
        permit: OwnedSemaphorePermit,
    ) -> InFlightGuard {
        lock(in_flight)
            .conversations
            .insert(conversation.to_string());
        outbox.sends.begin(conversation);
        InFlightGuard {
            in_flight: in_flight.clone(),
            sends: outbox.sends.clone(),
            outbox: outbox.clone(),
            action,
            conversation: conversation.to_string(),
            permit: Some(permit),
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // After the result (and the message id) is committed: an agent
        // message waiting on this send then finds the id.
        self.sends.end(&self.conversation);
        drop(self.permit.take());
        // One lock for both, so the loop never sees the conversation free
        // but the action not settled.
        let mut in_flight = lock(&self.in_flight);
        in_flight.settled.insert(self.action);
        in_flight.conversations.remove(&self.conversation);
        drop(in_flight);
        self.outbox.wake();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Delivers outbox actions.
pub struct Sender {
    store: Store,
    outbox: Outbox,
    client: reqwest::Client,
    base_url: String,
    auth: Credentials,
    retry: RetryPolicy,
    in_flight: Arc<Mutex<InFlight>>,
    permits: Arc<Semaphore>,
    /// The number of permits (`send_concurrency`).
    concurrency: usize,
    /// Until when no send starts: Digishare answered 429, and its limit is
    /// the account's, not one conversation's.
    paused_until: Mutex<Option<Instant>>,
}

impl Sender {
    pub fn new(
        config: &SenderConfig,
        store: Store,
        outbox: Outbox,
    ) -> Result<Arc<Sender>, ClientError> {
        check_base_url(&config.api_base_url)?;
        let client = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("digibot/", env!("CARGO_PKG_VERSION")))
            // A redirect would re-send the token (and a 307 the message)
            // wherever it points: a 3xx is an answer, and final.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let auth = match &config.credentials {
            ApiCredentials::Token(token) => Credentials::Static(token.clone()),
            ApiCredentials::Client { id, secret } => Credentials::OAuth {
                client_id: id.clone(),
                client_secret: secret.clone(),
                token: tokio::sync::Mutex::new(None),
            },
            ApiCredentials::DryRun => Credentials::DryRun,
        };
        Ok(Arc::new(Sender {
            store,
            client,
            base_url: config.api_base_url.trim_end_matches('/').to_string(),
            auth,
            retry: config.retry.clone(),
            in_flight: Arc::new(Mutex::new(InFlight::default())),
            permits: Arc::new(Semaphore::new(config.concurrency)),
            concurrency: config.concurrency,
            paused_until: Mutex::new(None),
            outbox,
        }))
    }

    /// Sends due actions until `shutdown` turns true, then waits for the
    /// requests in flight (up to `grace`).
    ///
    /// The outbox is read only when send permits are free, and only as many
    /// heads as could be started (those in flight come back too). When most
    /// requests are still in flight, the loop lingers up to `LINGER` for
    /// more to finish, so that under load one read starts several requests
    /// instead of one read per completed request.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let mut tasks = tokio::task::JoinSet::new();
        let mut linger_until: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let paused = self.paused();
            let free = self.permits.available_permits();
            let idle = free == self.concurrency;
            let batch = free * 4 >= self.concurrency;
            let lingered = linger_until.is_some_and(|t| Instant::now() >= t);
            let read = paused.is_none() && free > 0 && (idle || batch || lingered);
            if free > 0 && !read && linger_until.is_none() {
                linger_until = Some(Instant::now() + LINGER);
            }
            let mut next = None;
            if read {
                linger_until = None;
                let limit = {
                    let mut in_flight = lock(&self.in_flight);
                    // Before the read starts: anything settled from now on
                    // is recorded, and skipped if the read returns it.
                    in_flight.settled.clear();
                    in_flight.conversations.len() + free
                };
                let heads = match self.store.outbox_heads(limit).await {
                    Ok(heads) => heads,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the outbox");
                        Vec::new()
                    }
                };
                let now = now_ms();
                for action in heads {
                    if action.next_attempt_at > now {
                        // Sorted by due time: the rest waits too.
                        next = Some(action.next_attempt_at);
                        break;
                    }
                    {
                        let in_flight = lock(&self.in_flight);
                        if in_flight.settled.contains(&action.id)
                            || in_flight.conversations.contains(&action.conversation_id)
                        {
                            continue;
                        }
                        drop(in_flight);
                        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                            break;
                        };
                        let guard = InFlightGuard::begin(
                            &self.in_flight,
                            &self.outbox,
                            action.id,
                            &action.conversation_id,
                            permit,
                        );
                        let this = self.clone();
                        tasks.spawn(async move {
                            this.deliver(action).await;
                            drop(guard);
                        });
                    }
                }
            }
            while tasks.try_join_next().is_some() {}
            // A completion or new work wakes the loop; the timer covers
            // retries coming due, the end of a linger (and is a safety net).
            let mut wait = match next {
                Some(at) => {
                    Duration::from_millis(at.saturating_sub(now_ms()).clamp(1, 1000) as u64)
                }
                None => Duration::from_secs(1),
            };
            if let Some(until) = linger_until {
                wait = wait.min(until.saturating_duration_since(Instant::now()));
            }
            if let Some(left) = paused {
                wait = wait.min(left.max(Duration::from_millis(1)));
            }
            tokio::select! {
                _ = self.outbox.notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
        let _ =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    }

    /// How long sends still wait for a 429 to pass, if they do.
    fn paused(&self) -> Option<Duration> {
        let mut until = lock(&self.paused_until);
        match *until {
            Some(t) if t > Instant::now() => Some(t - Instant::now()),
            Some(_) => {
                *until = None;
                tracing::info!("rate-limit pause over: sending again");
                None
            }
            None => None,
        }
    }

    /// Digishare rate-limited the account: no send starts for `delay`
    /// (requests already in flight finish).
    fn pause(&self, delay: Duration) {
        let delay = delay.min(MAX_PAUSE);
        let Some(end) = Instant::now().checked_add(delay) else {
            return;
        };
        let mut until = lock(&self.paused_until);
        if until.is_none_or(|t| t < end) {
            *until = Some(end);
            tracing::warn!(
                pause_ms = delay.as_millis() as u64,
                "Digishare answered 429: every send waits"
            );
        }
    }

    /// One attempt at `action` (the caller holds a send permit), and its
    /// result recorded, in a span naming the action and its conversation.
    async fn deliver(&self, action: OutboxAction) {
        let span = tracing::info_span!(
            "send",
            action_id = action.id,
            conversation_id = %action.conversation_id,
            plugin = %action.plugin,
        );
        self.deliver_in(action).instrument(span).await
    }

    async fn deliver_in(&self, action: OutboxAction) {
        let attempt = self.attempt(&action).await;
        let attempts_after = action.attempts as u32 + 1;
        let result = match attempt {
            Attempt::Sent { status, message_id } => {
                tracing::debug!(status, "sent");
                if message_id.is_none() && action.path == "/v1/messages" {
                    tracing::warn!(action = action.id, conversation = %action.conversation_id,
                        "Digishare answered no message id: if this message comes back as a webhook it cannot be told from an agent's");
                }
                let hand_off = digibot_domain::actions::is_hand_off(&action.method, &action.path);
                match self
                    .store
                    .mark_sent(action.id, status, message_id, hand_off)
                    .await
                {
                    Ok(true) => {
                        counter!(m::TAKEOVERS, "cause" => "hand_off").increment(1);
                        tracing::info!(action = action.id, conversation = %action.conversation_id,
                            "hand-off delivered: a human is in charge of the conversation");
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Attempt::Retry {
                status,
                error,
                retry_after,
            } if attempts_after < self.retry.max_attempts => {
                let delay = retry_after
                    .map(|d| d.min(MAX_RETRY_AFTER))
                    .unwrap_or_else(|| backoff(&self.retry, attempts_after));
                if status == Some(429) {
                    self.pause(delay);
                }
                counter!(m::API_RETRIES).increment(1);
                tracing::info!(?status, %error,
                    retry_in_ms = delay.as_millis() as u64, attempt = attempts_after, "send failed, will retry");
                let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                self.store
                    .mark_retry(action.id, now_ms().saturating_add(delay_ms), status, error)
                    .await
            }
            Attempt::Retry {
                status,
                error,
                retry_after,
            } => {
                if status == Some(429) {
                    self.pause(
                        retry_after
                            .map(|d| d.min(MAX_RETRY_AFTER))
                            .unwrap_or_else(|| backoff(&self.retry, attempts_after)),
                    );
                }
                tracing::warn!(?status, %error,
                    attempts = attempts_after, "action is now a dead letter");
                self.store.mark_dead(action.id, status, error).await
            }
            Attempt::Fatal { status, error } => {
                tracing::warn!(?status, %error,
                    attempts = attempts_after, "action is now a dead letter");
                self.store.mark_dead(action.id, status, error).await
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot record a delivery result");
        }
    }

    async fn attempt(&self, action: &OutboxAction) -> Attempt {
        let token = match &self.auth {
            Credentials::DryRun => {
                tracing::info!(
                    "dry-run, not sent: {} {} {}",
                    action.method,
                    action.path,
                    action.body
                );
                // An id of its own for the message that would exist: it
                // says dry-run wherever it shows and matches no webhook.
                return Attempt::Sent {
                    status: 200,
                    message_id: (action.path == "/v1/messages")
                        .then(|| format!("dry-run-{}", action.id)),
                };
            }
            Credentials::Static(token) => token.clone(),
            Credentials::OAuth { .. } => match self.oauth_token(None).await {
                Ok(t) => t,
                Err(e) => return e,
            },
        };
        let first = self.request(action, &token).await;
        if let (
            Attempt::Fatal {
                status: Some(401), ..
            },
            Credentials::OAuth { .. },
        ) = (&first, &self.auth)
        {
            // The token may have been revoked or expired early: refresh once
            // (unless a concurrent 401 already did).
            match self.oauth_token(Some(&token)).await {
                Ok(fresh) => return self.request(action, &fresh).await,
                Err(e) => return e,
            }
        }
        first
    }

    async fn request(&self, action: &OutboxAction, token: &str) -> Attempt {
        let method = match action.method.as_str() {
            "PUT" => reqwest::Method::PUT,
            "DELETE" => reqwest::Method::DELETE,
            _ => reqwest::Method::POST,
        };
        let response = self
            .client
            .request(method, format!("{}{}", self.base_url, action.path))
            .bearer_auth(token)
            .header(
                "Idempotency-Key",
                idempotency_header(&action.idempotency_key),
            )
            .json(&action.body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            // The request could not even be built: sending it again
            // cannot help.
            Err(e) if e.is_builder() => {
                counter!(m::API_REQUESTS, "status" => "error").increment(1);
                return Attempt::Fatal {
                    status: None,
                    error: format!("cannot build the request: {e}"),
                };
            }
            Err(e) => {
                counter!(m::API_REQUESTS, "status" => "error").increment(1);
                return Attempt::Retry {
                    status: None,
                    error: format!("{e}"),
                    retry_after: None,
                };
            }
        };
        let status = response.status().as_u16();
        counter!(m::API_REQUESTS, "status" => response.status().as_str().to_string()).increment(1);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .map(|v| v.as_bytes().to_vec());
        let location = response.headers().get(reqwest::header::LOCATION).map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .chars()
                .take(200)
                .collect::<String>()
        });
        let (body, _) = read_capped(response, MAX_ANSWER_BYTES).await;
        let body = String::from_utf8_lossy(&body).into_owned();
        let body_short: String = body.chars().take(2000).collect();
        let verdict = answer::classify(
            status,
            retry_after.as_deref(),
            &body,
            action.body.get("file").is_some(),
            std::time::SystemTime::now(),
        );
        match verdict {
            Verdict::Sent { message_id } => Attempt::Sent { status, message_id },
            Verdict::FileRefused => Attempt::Fatal {
                status: Some(status),
                error: format!("Digishare could not use the file: {body_short}"),
            },
            Verdict::Retry { retry_after } => Attempt::Retry {
                status: Some(status),
                error: body_short,
                retry_after,
            },
            // Not followed (see `Sender::new`): say where it pointed.
            Verdict::Refused if (300..=399).contains(&status) => Attempt::Fatal {
                status: Some(status),
                error: format!(
                    "Digishare answered a redirect (to {}); redirects are not followed: check the API base URL",
                    location.as_deref().unwrap_or("nowhere")
                ),
            },
            Verdict::WindowClosed => {
                let last_customer = self
                    .store
                    .conversation_state(&action.conversation_id)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|c| c.last_customer_at);
                Attempt::Fatal {
                    status: Some(status),
                    error: lifecycle::window_refusal_error(status, &body_short, last_customer),
                }
            }
            Verdict::Refused => Attempt::Fatal {
                status: Some(status),
                error: body_short,
            },
        }
    }

    /// The cached OAuth token, fetched when missing, near expiry, or when
    /// it is `refused` (Digishare answered 401 to it). Requests refused
    /// together share one refresh: only the first finds the refused token
    /// still cached.
    async fn oauth_token(&self, refused: Option<&str>) -> Result<String, Attempt> {
        let Credentials::OAuth {
            client_id,
            client_secret,
            token,
        } = &self.auth
        else {
            return Err(Attempt::Fatal {
                status: None,
                error: "no OAuth client".into(),
            });
        };
        let mut cached = token.lock().await;
        if let Some((t, expires)) = cached.as_ref()
            && Some(t.as_str()) != refused
            && Instant::now() < *expires
        {
            return Ok(t.clone());
        }
        let response = self
            .client
            .post(format!("{}/v1/oauth/token", self.base_url))
            .json(&serde_json::json!({
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": client_secret,
            }))
            .send()
            .await
            .map_err(|e| Attempt::Retry {
                status: None,
                error: format!("oauth: {e}"),
                retry_after: None,
            })?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let error = format!("oauth token request answered {status}");
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| answer::parse_retry_after(v, std::time::SystemTime::now()));
            return Err(if status == 429 || status >= 500 {
                Attempt::Retry {
                    status: Some(status),
                    error,
                    retry_after,
                }
            } else {
                Attempt::Fatal {
                    status: Some(status),
                    error,
                }
            });
        }
        #[derive(serde::Deserialize)]
        struct Grant {
            access_token: String,
            /// Any JSON: a number (even `u64::MAX`, negative or
            /// fractional), a string, or absent.
            #[serde(default)]
            expires_in: Option<serde_json::Value>,
        }
        let (body, _) = read_capped(response, MAX_ANSWER_BYTES).await;
        let bad = |why: String| Attempt::Retry {
            status: Some(status),
            error: format!("oauth: bad token response: {why}"),
            retry_after: None,
        };
        let grant: Grant = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
        if HeaderValue::from_str(&format!("Bearer {}", grant.access_token)).is_err() {
            return Err(bad("the access token is not a valid header value".into()));
        }
        let lifetime = token_lifetime(grant.expires_in.as_ref());
        // Refresh a little before expiry: a tenth of the lifetime, at most a minute.
        let margin = (lifetime / 10).min(Duration::from_secs(60));
        let now = Instant::now();
        *cached = Some((
            grant.access_token.clone(),
            now.checked_add(lifetime - margin).unwrap_or(now),
        ));
        Ok(grant.access_token)
    }
}

/// How long an OAuth token is used, from its `expires_in`: 3600 s when
/// absent or unreadable, 0 when negative, at most [`MAX_TOKEN_LIFETIME`].
fn token_lifetime(expires_in: Option<&serde_json::Value>) -> Duration {
    let secs = match expires_in {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .unwrap_or(3600.0);
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs)
        .unwrap_or(MAX_TOKEN_LIFETIME)
        .min(MAX_TOKEN_LIFETIME)
}

/// Reads at most `cap` bytes of `response`'s body (and whether there was
/// more); a body that fails midway is what arrived until then.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return (body, true);
        }
        body.extend_from_slice(&chunk);
    }
    (body, false)
}

/// The `Idempotency-Key` header for `key`: the key itself, or, when it
/// cannot be a header value (rows recorded before ids were checked at the
/// webhook), `sha256-HEX` of it: still one stable key per action.
fn idempotency_header(key: &str) -> HeaderValue {
    if key.len() <= 1024
        && let Ok(value) = HeaderValue::from_str(key)
    {
        return value;
    }
    let digest = <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes());
    HeaderValue::from_str(&format!("sha256-{}", hex::encode(digest)))
        .unwrap_or_else(|_| HeaderValue::from_static("sha256-invalid"))
}

/// How long the run loop waits for more requests to finish before reading
/// the outbox for a single free send permit.
const LINGER: Duration = Duration::from_millis(2);

/// Exponential backoff with full jitter: a random delay in
/// `[d/2, d]` where `d = min(max, base · 2^(attempt-1))`.
fn backoff(retry: &RetryPolicy, attempt: u32) -> Duration {
    let exp = retry
        .base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(30));
    let d = exp.min(retry.max_ms).max(1);
    Duration::from_millis(rand::rng().random_range(d / 2..=d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryPolicy {
            base_ms: 100,
            max_ms: 1000,
            max_attempts: 10,
        };
        for _ in 0..50 {
            let first = backoff(&r, 1).as_millis();
            assert!((50..=100).contains(&first), "{first}");
            let third = backoff(&r, 3).as_millis();
            assert!((200..=400).contains(&third), "{third}");
            let late = backoff(&r, 20).as_millis();
            assert!((500..=1000).contains(&late), "{late}");
        }
    }

    /// What the sender does with any `Retry-After` (parsed by
    /// `digibot_domain::answer`): capped at an hour, then added to now.
    #[test]
    fn hostile_retry_after_values_are_capped_without_overflow() {
        let now = std::time::SystemTime::now();
        for value in [
            "1e20",
            "18446744073709551616",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            let delay = answer::parse_retry_after(value, now)
                .unwrap()
                .min(MAX_RETRY_AFTER);
            assert_eq!(delay, MAX_RETRY_AFTER, "{value}");
            let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            assert!(now_ms().saturating_add(ms) > now_ms());
        }
    }

    #[test]
    fn hostile_token_lifetimes_never_panic() {
        use serde_json::json;
        let life = |v: serde_json::Value| token_lifetime(Some(&v));
        assert_eq!(life(json!(u64::MAX)), MAX_TOKEN_LIFETIME);
        assert_eq!(life(json!(1e300)), MAX_TOKEN_LIFETIME);
        assert_eq!(life(json!(0)), Duration::ZERO);
        assert_eq!(life(json!(-5)), Duration::ZERO);
        assert_eq!(life(json!(i64::MIN)), Duration::ZERO);
        assert_eq!(life(json!(90.5)), Duration::from_millis(90_500));
        assert_eq!(life(json!("120")), Duration::from_secs(120));
        assert_eq!(life(json!("soon")), Duration::from_secs(3600));
        assert_eq!(life(json!(null)), Duration::from_secs(3600));
        assert_eq!(token_lifetime(None), Duration::from_secs(3600));
        for lifetime in [MAX_TOKEN_LIFETIME, Duration::ZERO] {
            let margin = (lifetime / 10).min(Duration::from_secs(60));
            assert!(Instant::now().checked_add(lifetime - margin).is_some());
        }
    }

    #[test]
    fn the_idempotency_key_is_always_a_header_value() {
        assert_eq!(idempotency_header("evt_1/echo/0"), "evt_1/echo/0");
        let bad = "evt\r\nX-Injected: 1/echo/0";
        let hashed = idempotency_header(bad);
        assert!(
            hashed.to_str().unwrap().starts_with("sha256-"),
            "{hashed:?}"
        );
        assert_eq!(hashed, idempotency_header(bad), "stable across attempts");
        assert_ne!(hashed, idempotency_header("evt\r\nX-Other: 1/echo/0"));
        assert!(idempotency_header(&"k".repeat(1 << 20)).len() < 100);
    }

    #[test]
    fn only_https_or_loopback_base_urls() {
        for ok in [
            "https://api.digishare.ma",
            "https://10.0.0.5:8443/",
            "http://127.0.0.1:9000",
            "http://localhost:9000",
            "http://[::1]:9000",
        ] {
            assert!(check_base_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://api.digishare.ma",
            "http://10.0.0.5",
            "http://127.0.0.1.nip.io",
        ] {
            assert!(
                matches!(check_base_url(bad), Err(ClientError::InsecureBaseUrl(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            check_base_url("ftp://x"),
            Err(ClientError::BadBaseUrl { .. })
        ));
        assert!(matches!(
            check_base_url("not a url"),
            Err(ClientError::BadBaseUrl { .. })
        ));
        let err = check_base_url("http://api.digishare.ma")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must use https"), "{err}");
    }

    /// Whatever ends a send's task, a panic included, its conversation is
    /// free again and its permit back.
    #[tokio::test]
    async fn a_panicking_send_frees_its_conversation() {
        let in_flight = Arc::new(Mutex::new(InFlight::default()));
        let outbox = Outbox::default();
        let permits = Arc::new(Semaphore::new(1));
        let guard = InFlightGuard::begin(
            &in_flight,
            &outbox,
            7,
            "conv_1",
            permits.clone().try_acquire_owned().unwrap(),
        );
        assert!(outbox.sends().busy("conv_1"));
        assert!(lock(&in_flight).conversations.contains("conv_1"));
        assert_eq!(permits.available_permits(), 0);
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("Digishare answered something unexpected");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert!(!outbox.sends().busy("conv_1"));
        let state = lock(&in_flight);
        assert!(state.conversations.is_empty());
        assert!(state.settled.contains(&7));
        assert_eq!(permits.available_permits(), 1);
    }
}
