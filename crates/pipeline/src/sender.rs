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
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, watch};
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

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("HTTP client: {0}")]
pub struct ClientError(#[from] reqwest::Error);

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

/// Delivers outbox actions.
pub struct Sender {
    store: Store,
    outbox: Outbox,
    client: reqwest::Client,
    base_url: String,
    auth: Credentials,
    retry: RetryPolicy,
    in_flight: Mutex<InFlight>,
    permits: Arc<Semaphore>,
    /// The number of permits (`send_concurrency`).
    concurrency: usize,
    sends: Sends,
}

impl Sender {
    pub fn new(
        config: &SenderConfig,
        store: Store,
        outbox: Outbox,
    ) -> Result<Arc<Sender>, ClientError> {
        let client = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("digibot/", env!("CARGO_PKG_VERSION")))
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
            in_flight: Mutex::new(InFlight::default()),
            permits: Arc::new(Semaphore::new(config.concurrency)),
            concurrency: config.concurrency,
            sends: outbox.sends.clone(),
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
            let free = self.permits.available_permits();
            let idle = free == self.concurrency;
            let batch = free * 4 >= self.concurrency;
            let lingered = linger_until.is_some_and(|t| Instant::now() >= t);
            let read = free > 0 && (idle || batch || lingered);
            if free > 0 && !read && linger_until.is_none() {
                linger_until = Some(Instant::now() + LINGER);
            }
            let mut next = None;
            if read {
                linger_until = None;
                let limit = {
                    let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
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
                        let mut in_flight =
                            self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                        if in_flight.settled.contains(&action.id)
                            || in_flight.conversations.contains(&action.conversation_id)
                        {
                            continue;
                        }
                        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                            break;
                        };
                        in_flight
                            .conversations
                            .insert(action.conversation_id.clone());
                        self.sends.begin(&action.conversation_id);
                        let this = self.clone();
                        tasks.spawn(async move {
                            let (id, conversation) = (action.id, action.conversation_id.clone());
                            this.deliver(action).await;
                            // After the result (and the message id) is
                            // committed: an agent message waiting on this
                            // send then finds the id.
                            this.sends.end(&conversation);
                            drop(permit);
                            // One lock for both, so the loop never sees the
                            // conversation free but the action not settled.
                            let mut in_flight =
                                this.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                            in_flight.settled.insert(id);
                            in_flight.conversations.remove(&conversation);
                            drop(in_flight);
                            this.outbox.wake();
                        });
                    }
                }
            }
            while tasks.try_join_next().is_some() {}
            // A completion or new work wakes the loop; the timer covers
            // retries coming due, the end of a linger (and is a safety net).
            let mut wait = match next {
                Some(at) => Duration::from_millis((at - now_ms()).clamp(1, 1000) as u64),
                None => Duration::from_secs(1),
            };
            if let Some(until) = linger_until {
                wait = wait.min(until.saturating_duration_since(Instant::now()));
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
                    .map(|d| d.min(Duration::from_secs(3600)))
                    .unwrap_or_else(|| backoff(&self.retry, attempts_after));
                counter!(m::API_RETRIES).increment(1);
                tracing::info!(?status, %error,
                    retry_in_ms = delay.as_millis() as u64, attempt = attempts_after, "send failed, will retry");
                self.store
                    .mark_retry(
                        action.id,
                        now_ms() + delay.as_millis() as i64,
                        status,
                        error,
                    )
                    .await
            }
            Attempt::Retry { status, error, .. } | Attempt::Fatal { status, error } => {
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
            .header("Idempotency-Key", &action.idempotency_key)
            .json(&action.body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
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
        let body = response.text().await.unwrap_or_default();
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
            return Err(if status == 429 || status >= 500 {
                Attempt::Retry {
                    status: Some(status),
                    error,
                    retry_after: None,
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
            expires_in: Option<u64>,
        }
        let grant: Grant = response.json().await.map_err(|e| Attempt::Retry {
            status: Some(status),
            error: format!("oauth: bad token response: {e}"),
            retry_after: None,
        })?;
        // Refresh a little before expiry: a tenth of the lifetime, at most a minute.
        let lifetime = Duration::from_secs(grant.expires_in.unwrap_or(3600));
        let margin = (lifetime / 10).min(Duration::from_secs(60));
        *cached = Some((
            grant.access_token.clone(),
            Instant::now() + lifetime - margin,
        ));
        Ok(grant.access_token)
    }
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
}
