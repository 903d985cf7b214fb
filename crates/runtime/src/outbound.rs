//! Outbound HTTP from plugins: `wasi:http/outgoing-handler`
//! (wasmtime-wasi-http), whose every request reaches one hook,
//! [`HttpTurn::send_request`]. The hook numbers the turn's calls, reads the
//! request body (capped), and hands the request to the [`OutboundHttp`] the
//! pipeline provides, which judges and sends it (grant, SSRF rules, caps,
//! secrets, journal). Its answer becomes the guest's response, or the
//! `wasi:http` error code of its [`Refusal`]; the refusal's words are kept
//! for `digishare:bot/outbound.last-refusal` and the event's record. The
//! runtime itself opens no socket.

use bytes::Bytes;
use digibot_domain::outbound::{HttpPolicy, Refusal};
use http_body_util::{BodyExt, Full, Limited};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime_wasi_http::{Error as ErrorCode, RequestOptions, WasiBody, WasiHttpHooks};

/// A request a plugin made, as the runtime hands it over: not yet judged.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    pub plugin: Arc<str>,
    /// The dedup key of the event being handled.
    pub event_id: Arc<str>,
    /// The request's number in this plugin's turn, from 0.
    pub call: u32,
    pub policy: Arc<HttpPolicy>,
    pub method: String,
    /// `http` or `https` (anything else was refused by wasi:http).
    pub scheme: String,
    /// `host[:port]`, as the plugin set it.
    pub authority: String,
    pub path_and_query: String,
    /// As the plugin wrote them: placeholders not substituted.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, or why it could not be read (over the request cap, or
    /// never finished in time).
    pub body: Result<Bytes, Refusal>,
    /// The plugin's own timeout, if it set one: it can only shorten the
    /// host's.
    pub timeout: Option<Duration>,
}

impl OutboundRequest {
    /// The URL as the plugin wrote it.
    pub fn url(&self) -> String {
        format!(
            "{}://{}{}",
            self.scheme, self.authority, self.path_and_query
        )
    }
}

/// A response, buffered whole (within the response cap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

/// What became of one request.
#[derive(Debug, Clone)]
pub struct Sent {
    pub result: Result<OutboundResponse, Refusal>,
    /// Answered from the journal of an earlier run of this turn.
    pub replayed: bool,
}

/// Sends plugins' requests: implemented by the pipeline (over the network,
/// with the journal), and by tools that run plugins offline.
#[async_trait::async_trait]
pub trait OutboundHttp: Send + Sync + 'static {
    async fn send(&self, request: OutboundRequest) -> Sent;
}

/// Refuses every request: for hosts that run plugins without a network.
pub struct NoHttp(
    /// Where, for the refusal: `in digibot replay`.
    pub &'static str,
);

#[async_trait::async_trait]
impl OutboundHttp for NoHttp {
    async fn send(&self, _: OutboundRequest) -> Sent {
        Sent {
            result: Err(Refusal::Offline(self.0.to_string())),
            replayed: false,
        }
    }
}

/// A refusal in the words a plugin and an operator read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RefusalView {
    pub kind: &'static str,
    pub message: String,
}

impl From<&Refusal> for RefusalView {
    fn from(r: &Refusal) -> Self {
        RefusalView {
            kind: r.kind(),
            message: r.to_string(),
        }
    }
}

/// One request of a turn, as the event records it (no headers, no body).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CallSummary {
    pub call: u32,
    pub method: String,
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Response body bytes.
    pub bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<RefusalView>,
    pub elapsed_ms: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// What a turn's requests left behind, shared with their futures.
#[derive(Debug, Default)]
pub(crate) struct TurnLog {
    pub last_refusal: Option<RefusalView>,
    pub calls: Vec<CallSummary>,
}

/// The `wasi:http` hooks of one invocation: its plugin's policy, the event
/// it serves, and where requests go.
pub(crate) struct HttpTurn {
    plugin: Arc<str>,
    policy: Arc<HttpPolicy>,
    event_id: Arc<str>,
    outbound: Arc<dyn OutboundHttp>,
    next_call: u32,
    pub log: Arc<Mutex<TurnLog>>,
}

impl HttpTurn {
    /// Before it is bound to an event, every request is refused.
    pub fn new(plugin: Arc<str>, policy: Arc<HttpPolicy>) -> HttpTurn {
        HttpTurn {
            plugin,
            policy,
            event_id: Arc::from(""),
            outbound: Arc::new(NoHttp("before the plugin is called")),
            next_call: 0,
            log: Arc::default(),
        }
    }

    pub fn bind(&mut self, event_id: &str, outbound: Arc<dyn OutboundHttp>) {
        self.event_id = Arc::from(event_id);
        self.outbound = outbound;
    }
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), ErrorCode>> + Send>,
                ),
                ErrorCode,
            >,
        > + Send,
>;

impl WasiHttpHooks for HttpTurn {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _io: Box<dyn Future<Output = Result<(), ErrorCode>> + Send>,
    ) -> ResponseFuture {
        let call = self.next_call;
        self.next_call = self.next_call.saturating_add(1);
        let (parts, body) = request.into_parts();
        let uri = parts.uri;
        let headers = parts
            .headers
            .iter()
            // wasi:http adds `host` itself: the request's authority says it.
            .filter(|(name, _)| *name != http::header::HOST)
            .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
            .collect();
        let timeout = options.and_then(|o| {
            [
                o.connect_timeout,
                o.first_byte_timeout,
                o.between_bytes_timeout,
            ]
            .into_iter()
            .flatten()
            .min()
        });
        let limits = self.policy.limits.clone();
        let outbound = self.outbound.clone();
        let log = self.log.clone();
        let mut request = OutboundRequest {
            plugin: self.plugin.clone(),
            event_id: self.event_id.clone(),
            call,
            policy: self.policy.clone(),
            method: parts.method.as_str().to_string(),
            scheme: uri.scheme_str().unwrap_or("").to_string(),
            authority: uri
                .authority()
                .map(|a| a.as_str())
                .unwrap_or("")
                .to_string(),
            path_and_query: uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string(),
            headers,
            body: Ok(Bytes::new()),
            timeout,
        };
        Box::new(async move {
            let started = Instant::now();
            request.body = read_body(body, limits.request_bytes, limits.timeout).await;
            let (method, url) = (request.method.clone(), request.url());
            let sent = outbound.send(request).await;
            let mut summary = CallSummary {
                call,
                method,
                url,
                status: None,
                bytes: 0,
                refused: None,
                elapsed_ms: started.elapsed().as_millis() as u64,
                replayed: sent.replayed,
            };
            let result = match sent.result {
                Ok(response) => {
                    summary.status = Some(response.status);
                    summary.bytes = response.body.len();
                    to_wasi(response)
                }
                Err(refusal) => {
                    let view = RefusalView::from(&refusal);
                    summary.refused = Some(view.clone());
                    if let Ok(mut log) = log.lock() {
                        log.last_refusal = Some(view);
                    }
                    Err(error_code(&refusal))
                }
            };
            if let Ok(mut log) = log.lock() {
                log.calls.push(summary);
            }
            result.map(|response| {
                (
                    response,
                    Box::new(async { Ok(()) }) as Box<dyn Future<Output = _> + Send>,
                )
            })
        })
    }
}

/// The request body, whole, within `max` bytes and `timeout`.
async fn read_body(body: WasiBody, max: usize, timeout: Duration) -> Result<Bytes, Refusal> {
    match tokio::time::timeout(timeout, Limited::new(body, max).collect()).await {
        Err(_) => Err(Refusal::Timeout { after: timeout }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(Refusal::RequestTooLarge { max })
        }
        Ok(Err(e)) => Err(Refusal::Protocol(format!("reading the request body: {e}"))),
    }
}

fn to_wasi(response: OutboundResponse) -> Result<http::Response<WasiBody>, ErrorCode> {
    let mut builder = http::Response::builder().status(response.status);
    for (name, value) in &response.headers {
        builder = builder.header(name.as_str(), value.as_slice());
    }
    builder
        .body(
            Full::new(response.body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| ErrorCode::InternalError(Some(format!("response: {e}"))))
}

/// The `wasi:http` error code a plugin sees for `refusal`.
pub fn error_code(refusal: &Refusal) -> ErrorCode {
    match refusal {
        Refusal::InvalidUrl(_) => ErrorCode::HttpRequestUriInvalid,
        Refusal::NotGranted { .. }
        | Refusal::SecretNotGranted { .. }
        | Refusal::SecretMissing { .. }
        | Refusal::BadPlaceholder
        | Refusal::TooManyCalls { .. }
        | Refusal::RedirectNotGranted { .. }
        | Refusal::Offline(_) => ErrorCode::HttpRequestDenied,
        Refusal::AddressProhibited { .. } => ErrorCode::DestinationIpProhibited,
        Refusal::Dns { why, .. } => ErrorCode::DnsError {
            rcode: Some(why.clone()),
            info_code: None,
        },
        Refusal::RequestTooLarge { max } => ErrorCode::HttpRequestBodySize(Some(*max as u64)),
        Refusal::ResponseTooLarge { max } => ErrorCode::HttpResponseBodySize(Some(*max as u64)),
        Refusal::Timeout { .. } => ErrorCode::HttpResponseTimeout,
        Refusal::TooManyRedirects { .. } => ErrorCode::LoopDetected,
        Refusal::BadRedirect(_) | Refusal::Protocol(_) => ErrorCode::HttpProtocolError,
        Refusal::Connect(_) => ErrorCode::ConnectionRefused,
        Refusal::Tls(_) => ErrorCode::TlsProtocolError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_wasi_code() {
        let code = |r: Refusal| format!("{:?}", error_code(&r));
        assert_eq!(
            code(Refusal::NotGranted {
                url: "https://x/".into()
            }),
            "HttpRequestDenied"
        );
        assert_eq!(
            code(Refusal::AddressProhibited {
                host: "a".into(),
                address: "127.0.0.1".parse().unwrap(),
                class: digibot_domain::outbound::Prohibited::Loopback
            }),
            "DestinationIpProhibited"
        );
        assert_eq!(
            code(Refusal::ResponseTooLarge { max: 10 }),
            "HttpResponseBodySize(Some(10))"
        );
        assert_eq!(
            code(Refusal::Timeout {
                after: Duration::from_secs(1)
            }),
            "HttpResponseTimeout"
        );
        assert_eq!(code(Refusal::TooManyRedirects { max: 5 }), "LoopDetected");
        assert_eq!(code(Refusal::TooManyCalls { max: 5 }), "HttpRequestDenied");
    }
}
