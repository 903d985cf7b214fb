//! Plugins' outbound HTTP, sent: the [`OutboundHttp`] the runtime calls for
//! every request a plugin makes. It judges the request in order, each
//! refusal a [`Refusal`] the plugin receives and the event records:
//!
//! 1. **the grant**: a well-formed `http(s)` URL inside the plugin's
//!    `[grants] http`, and every `{{secret:NAME}}` in a header value a
//!    secret it is granted and the operator configured;
//! 2. (a call this turn already made in an earlier run is answered from
//!    the journal, without calling again;)
//! 3. **the SSRF rules**: the addresses the target resolves to (or is
//!    pinned to by `DIGIBOT_RESOLVE`) must all be ordinary public ones
//!    unless the URL is an address the grant names literally (a name never
//!    borrows that exception); the connection goes to
//!    exactly the addresses checked;
//! 4. **the caps**: calls per turn, request bytes, then while sending the
//!    response bytes and the per-call timeout (redirects included).
//!
//! Redirects are followed by hand (the client never follows one), each hop
//! judged again by 1 and 3; a hop to another origin drops the headers that
//! carried secrets or credentials. Secrets are substituted into the request
//! only here, at send time, and their values scrubbed from the response
//! (headers and body) before the plugin or the journal sees it. Every call
//! carries `Idempotency-Key: {event}/{plugin}/{call}`, and its outcome is
//! journaled before the plugin sees it ([`journal`]).

pub mod journal;
pub mod resolve;
pub mod secrets;

use crate::metrics as m;
use bytes::Bytes;
use digibot_domain::outbound::secret::{self, SubstituteError};
use digibot_domain::outbound::{
    HttpPolicy, Refusal, ResolveOverrides, Scheme, SecretName, Target, idempotency_key,
};
use digibot_runtime::{OutboundHttp, OutboundRequest, OutboundResponse, Sent};
use digibot_store::Store;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use resolve::{Pins, Resolver};
use secrets::Secrets;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a name lookup may take, within the call's own timeout.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// Request headers whose value is a credential: redacted in the journal
/// (unless written as a placeholder) and dropped on a cross-origin
/// redirect.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-access-token",
];

/// Response headers not passed to the plugin: hop-by-hop, or describing a
/// body that is handed over whole (the length is set again).
const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "trailer",
];

/// The operator's side of outbound HTTP.
#[derive(Debug, Clone, Default)]
pub struct OutboundConfig {
    /// `DIGIBOT_RESOLVE` pins.
    pub resolve: ResolveOverrides,
    pub secrets: Secrets,
}

/// The pipeline's [`OutboundHttp`]: one per process, shared by every turn.
pub struct Outbound {
    resolver: Resolver,
    secrets: Secrets,
    /// The journal's store (`None`: calls are not journaled, as in tests).
    store: Option<Store>,
    /// One client per plugin: its own connections and checked addresses.
    clients: Mutex<HashMap<Arc<str>, PluginClient>>,
}

#[derive(Clone)]
struct PluginClient {
    client: reqwest::Client,
    pins: Arc<Pins>,
}

impl Outbound {
    pub fn new(config: OutboundConfig, store: Option<Store>) -> Outbound {
        Outbound {
            resolver: Resolver::new(config.resolve),
            secrets: config.secrets,
            store,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, plugin: &Arc<str>) -> Result<PluginClient, Refusal> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(plugin) {
            return Ok(c.clone());
        }
        let pins = Arc::new(Pins::default());
        let client = reqwest::Client::builder()
            // A proxy would connect to addresses digibot never checked.
            .no_proxy()
            // Redirects are followed by hand, each hop checked.
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(pins.clone())
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("digibot/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Refusal::Protocol(format!("cannot set up an HTTP client: {e}")))?;
        let c = PluginClient { client, pins };
        clients.insert(plugin.clone(), c.clone());
        Ok(c)
    }

    /// The granted, configured secrets of `policy`, with their values.
    fn granted_secrets(&self, policy: &HttpPolicy) -> Vec<(SecretName, String)> {
        policy
            .secrets
            .iter()
            .filter_map(|n| self.secrets.get(n).map(|v| (n.clone(), v.to_string())))
            .collect()
    }

    /// Judges and sends one request; `bool`: answered from the journal.
    async fn handle(&self, request: &OutboundRequest) -> (Result<OutboundResponse, Refusal>, bool) {
        let policy = &request.policy;
        // 1. The grant.
        let target = match judge_target(request) {
            Ok(t) => t,
            Err(r) => return (Err(r), false),
        };
        if policy.grant_for(&target).is_none() {
            return (
                Err(Refusal::NotGranted {
                    url: target.to_string(),
                }),
                false,
            );
        }
        let headers = match self.substitute(request, policy) {
            Ok(h) => h,
            Err(r) => return (Err(r), false),
        };
        let key = idempotency_key(&request.event_id, &request.plugin, request.call);
        let asked = journal::asked(request, &target);
        // 2. A call an earlier run of this turn already made.
        if let Some(store) = &self.store
            && let Some(recorded) = journal::recorded(store, request, &asked).await
        {
            return (recorded, true);
        }
        // 3. The SSRF rules.
        let limit = request
            .timeout
            .map_or(policy.limits.timeout, |t| t.min(policy.limits.timeout));
        let addrs = match self
            .resolver
            .addresses(&target, policy, DNS_TIMEOUT.min(limit))
            .await
        {
            Ok(a) => a,
            Err(r) => return (Err(r), false),
        };
        // 4. The caps.
        if request.call >= policy.limits.calls {
            return (
                Err(Refusal::TooManyCalls {
                    max: policy.limits.calls,
                }),
                false,
            );
        }
        let body = match &request.body {
            Ok(b) => b.clone(),
            Err(r) => return (Err(r.clone()), false),
        };
        let client = match self.client(&request.plugin) {
            Ok(c) => c,
            Err(r) => return (Err(r), false),
        };
        let started = Instant::now();
        let mut hops = 0;
        let exchange = Exchange {
            outbound: self,
            client: &client,
            policy,
            secrets: self.granted_secrets(policy),
            key: &key,
        };
        let result = match tokio::time::timeout(
            limit,
            exchange.run(request, target, addrs, headers, body, &mut hops),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(Refusal::Timeout { after: limit }),
        };
        // Nothing reached the remote side: a re-run may call again.
        let unsent = hops == 0
            && matches!(
                result,
                Err(Refusal::Connect(_) | Refusal::Tls(_) | Refusal::Dns { .. })
            );
        if let Some(store) = &self.store
            && !unsent
        {
            journal::record(store, request, asked, &result, started.elapsed()).await;
        }
        (result, false)
    }

    /// The plugin's headers for the wire: placeholders substituted (each a
    /// granted, configured secret), marked sensitive.
    fn substitute(
        &self,
        request: &OutboundRequest,
        policy: &HttpPolicy,
    ) -> Result<Vec<(String, Vec<u8>, bool)>, Refusal> {
        let mut out = Vec::with_capacity(request.headers.len());
        for (name, value) in &request.headers {
            if matches!(name.as_str(), "content-length" | "idempotency-key") {
                continue;
            }
            let names = secret::placeholders(value).map_err(|_| Refusal::BadPlaceholder)?;
            if names.is_empty() {
                out.push((name.clone(), value.clone(), false));
                continue;
            }
            let value = secret::substitute(value, |n| {
                if !policy.secrets.contains(n) {
                    return Err(Refusal::SecretNotGranted {
                        name: n.to_string(),
                    });
                }
                self.secrets
                    .get(n)
                    .map(str::to_string)
                    .ok_or_else(|| Refusal::SecretMissing {
                        name: n.to_string(),
                    })
            })
            .map_err(|e| match e {
                SubstituteError::Malformed => Refusal::BadPlaceholder,
                SubstituteError::Lookup(r) => r,
            })?;
            out.push((name.clone(), value, true));
        }
        Ok(out)
    }
}

/// The request's URL, parsed strictly.
fn judge_target(request: &OutboundRequest) -> Result<Target, Refusal> {
    let invalid = |e: &dyn std::fmt::Display| Refusal::InvalidUrl(e.to_string());
    let scheme = Scheme::parse(&request.scheme).map_err(|e| invalid(&e))?;
    Target::from_parts(scheme, &request.authority, &request.path_and_query).map_err(|e| invalid(&e))
}

/// One call on the wire, redirects included.
struct Exchange<'a> {
    outbound: &'a Outbound,
    client: &'a PluginClient,
    policy: &'a HttpPolicy,
    secrets: Vec<(SecretName, String)>,
    key: &'a str,
}

impl Exchange<'_> {
    /// Sends, follows redirects inside the grant, reads the response within
    /// its cap. `hops` counts the responses received.
    async fn run(
        &self,
        request: &OutboundRequest,
        mut target: Target,
        mut addrs: Vec<SocketAddr>,
        headers: Vec<(String, Vec<u8>, bool)>,
        body: Bytes,
        hops: &mut u32,
    ) -> Result<OutboundResponse, Refusal> {
        let mut method = reqwest::Method::from_bytes(request.method.as_bytes())
            .map_err(|e| Refusal::Protocol(format!("method {:?}: {e}", request.method)))?;
        let mut headers = header_map(&headers, self.key)?;
        let mut body = Some(body);
        loop {
            let url = wire_url(&target)?;
            if let Some(name) = target.host.name() {
                self.client.pins.pin(name, addrs.clone());
            }
            let mut send = self.client.client.request(method.clone(), url.clone());
            send = send.headers(headers.clone());
            if let Some(b) = &body {
                send = send.body(b.clone());
            }
            let response = send.send().await.map_err(refusal_of)?;
            *hops += 1;
            let status = response.status().as_u16();
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
            let (true, Some(location)) = (matches!(status, 301 | 302 | 303 | 307 | 308), location)
            else {
                return self.read(response).await;
            };
            if *hops > self.policy.limits.redirects {
                return Err(Refusal::TooManyRedirects {
                    max: self.policy.limits.redirects,
                });
            }
            let next = url
                .join(&location)
                .map_err(|e| Refusal::BadRedirect(format!("{location:?}: {e}")))?;
            let next = Target::parse(next.as_str())
                .map_err(|e| Refusal::BadRedirect(format!("{location:?}: {e}")))?;
            if self.policy.grant_for(&next).is_none() {
                return Err(Refusal::RedirectNotGranted {
                    location: next.to_string(),
                });
            }
            addrs = self
                .outbound
                .resolver
                .addresses(&next, self.policy, DNS_TIMEOUT)
                .await?;
            if !next.same_origin(&target) {
                // Credentials were meant for the first origin only.
                let mut kept = HeaderMap::with_capacity(headers.len());
                for (name, value) in &headers {
                    if !value.is_sensitive() && !CREDENTIAL_HEADERS.contains(&name.as_str()) {
                        kept.append(name.clone(), value.clone());
                    }
                }
                headers = kept;
            }
            // As browsers do: 303 (and 301/302 after a POST) become a GET.
            if (status == 303 && method != reqwest::Method::HEAD)
                || (matches!(status, 301 | 302) && method == reqwest::Method::POST)
            {
                method = reqwest::Method::GET;
                body = None;
                headers.remove(reqwest::header::CONTENT_TYPE);
            }
            target = next;
        }
    }

    /// The response, whole, within the cap, secrets scrubbed.
    async fn read(&self, mut response: reqwest::Response) -> Result<OutboundResponse, Refusal> {
        let max = self.policy.limits.response_bytes;
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(Refusal::ResponseTooLarge { max });
        }
        let status = response.status().as_u16();
        let headers: Vec<(String, Vec<u8>)> = response
            .headers()
            .iter()
            .filter(|(name, _)| !DROPPED_RESPONSE_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| {
                let value = secret::scrub(value.as_bytes(), &self.secrets).into_owned();
                (name.as_str().to_string(), value)
            })
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(refusal_of)? {
            if body.len() + chunk.len() > max {
                return Err(Refusal::ResponseTooLarge { max });
            }
            body.extend_from_slice(&chunk);
        }
        let body = Bytes::from(secret::scrub(&body, &self.secrets).into_owned());
        let mut headers = headers;
        headers.push(("content-length".into(), body.len().to_string().into_bytes()));
        Ok(OutboundResponse {
            status,
            headers,
            body,
        })
    }
}

/// The URL reqwest sends to, which must say exactly what was judged.
fn wire_url(target: &Target) -> Result<reqwest::Url, Refusal> {
    let text = target.to_string();
    let url =
        reqwest::Url::parse(&text).map_err(|e| Refusal::InvalidUrl(format!("{text}: {e}")))?;
    let same = url.host_str() == Some(target.host.to_string().as_str())
        && url.port_or_known_default() == Some(target.port)
        && url.path() == target.path
        && url.query() == target.query.as_deref();
    if !same {
        return Err(Refusal::InvalidUrl(format!(
            "{text} is not in canonical form (percent-encode characters such as `{{`, `\"` or `<`)"
        )));
    }
    Ok(url)
}

fn header_map(headers: &[(String, Vec<u8>, bool)], key: &str) -> Result<HeaderMap, Refusal> {
    let mut map = HeaderMap::with_capacity(headers.len() + 1);
    for (name, value, sensitive) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| Refusal::Protocol(format!("header name {name:?}: {e}")))?;
        let mut value = HeaderValue::from_bytes(value)
            .map_err(|e| Refusal::Protocol(format!("header {name}: {e}")))?;
        value.set_sensitive(*sensitive);
        map.append(name, value);
    }
    let key = HeaderValue::from_str(key)
        .map_err(|e| Refusal::Protocol(format!("Idempotency-Key: {e}")))?;
    map.insert(HeaderName::from_static("idempotency-key"), key);
    Ok(map)
}

/// What a client error means for the plugin.
fn refusal_of(e: reqwest::Error) -> Refusal {
    let mut chain = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if chain.last() != Some(&text) {
            chain.push(text);
        }
        source = s.source();
    }
    let text = chain.join(": ");
    let lower = text.to_ascii_lowercase();
    if e.is_connect() || e.is_timeout() {
        if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
            Refusal::Tls(text)
        } else {
            Refusal::Connect(text)
        }
    } else {
        Refusal::Protocol(text)
    }
}

#[async_trait::async_trait]
impl OutboundHttp for Outbound {
    async fn send(&self, request: OutboundRequest) -> Sent {
        let started = Instant::now();
        let (result, replayed) = self.handle(&request).await;
        let elapsed = started.elapsed();
        let label = match &result {
            Ok(r) => status_class(r.status),
            Err(refusal) => refusal.kind(),
        };
        metrics::counter!(m::HTTP_CALLS, "plugin" => request.plugin.to_string(), "result" => label)
            .increment(1);
        if replayed {
            metrics::counter!(m::HTTP_REPLAYED, "plugin" => request.plugin.to_string())
                .increment(1);
        } else {
            metrics::histogram!(m::HTTP_CALL_SECONDS, "plugin" => request.plugin.to_string())
                .record(elapsed);
        }
        match &result {
            Ok(r) => tracing::info!(
                plugin = %request.plugin, call = request.call, method = %request.method,
                url = %request.url(), status = r.status, bytes = r.body.len(),
                elapsed_ms = elapsed.as_millis() as u64, replayed, "plugin http call"
            ),
            Err(refusal) => tracing::warn!(
                plugin = %request.plugin, call = request.call, method = %request.method,
                url = %request.url(), refused = refusal.kind(), reason = %refusal,
                elapsed_ms = elapsed.as_millis() as u64, replayed, "plugin http call refused"
            ),
        }
        Sent { result, replayed }
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Answers a re-run turn's requests from its event's journal, never from the
/// network (`digibot replay --event`): a request the journal holds (same
/// plugin, call number, method, URL and body) gets the recorded answer; any
/// other is refused. The grant is still judged, so a version that lost a
/// grant does not get answers it could not ask for.
pub struct FromJournal {
    entries: Vec<digibot_store::JournalEntry>,
}

impl FromJournal {
    pub fn new(entries: Vec<digibot_store::JournalEntry>) -> FromJournal {
        FromJournal { entries }
    }
}

#[async_trait::async_trait]
impl OutboundHttp for FromJournal {
    async fn send(&self, request: OutboundRequest) -> Sent {
        let refused = |result| Sent {
            result: Err(result),
            replayed: false,
        };
        let target = match judge_target(&request) {
            Ok(t) => t,
            Err(r) => return refused(r),
        };
        if request.policy.grant_for(&target).is_none() {
            return refused(Refusal::NotGranted {
                url: target.to_string(),
            });
        }
        let asked = journal::asked(&request, &target);
        match journal::answer_from(&self.entries, &request, &asked) {
            Some(result) => Sent {
                result,
                replayed: true,
            },
            None => refused(Refusal::Offline(format!(
                "in a replay: {} {} is not in the event's journal",
                asked.method, asked.url
            ))),
        }
    }
}
