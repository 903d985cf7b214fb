//! Outbound HTTP from a plugin: a small typed helper over
//! `wasi:http/outgoing-handler` (which any other HTTP client built for
//! `wasm32-wasip2` can use as well).
//!
//! digibot sends a request only to the URLs the plugin's `NAME.toml`
//! grants (`[grants] http`), refuses private, loopback and cloud-metadata
//! addresses, caps calls per event, sizes and time, and follows redirects
//! only inside the grant. A secret the operator configured is written as a
//! placeholder in a header value, `{{secret:NAME}}` (granted by `[grants]
//! secrets`): digibot puts the value in at send time, so the plugin never
//! sees it. Every request carries `Idempotency-Key: {event}/{plugin}/{call}`.
//!
//! ```no_run
//! use digibot_sdk::{Action, Result, http};
//!
//! fn order_status(number: &str) -> Result<Vec<Action>> {
//!     let order = http::get(format!("https://api.shop.example/orders/{number}"))
//!         .bearer_secret("ORDERS_TOKEN")
//!         .send()?
//!         .error_for_status()?
//!         .json()?;
//!     let status = order["status"].as_str().unwrap_or("inconnu");
//!     Ok(vec![Action::text(format!("Commande {number} : {status}"))?])
//! }
//! # order_status("1").unwrap();
//! ```
//!
//! A refused or failed request is an [`Error`] saying which rule refused it
//! ([`Error::kind`]: `not-granted`, `address-prohibited`, `timeout`,
//! `response-too-large`, `too-many-calls`, ...), and `?` turns it into the
//! handler's error. These functions call into digibot, so they only work
//! inside a plugin.

use crate::bindings::digishare::bot::outbound;
use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use crate::bindings::wasi::io::streams::StreamError;
use std::fmt;
use std::time::Duration;

/// A `GET` request to `url`.
pub fn get(url: impl Into<String>) -> Request {
    Request::new("GET", url)
}

/// A `POST` request to `url` (add a body with [`Request::json`] or
/// [`Request::body`]).
pub fn post(url: impl Into<String>) -> Request {
    Request::new("POST", url)
}

/// A request being built; [`send`](Request::send) sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
}

impl Request {
    /// A request with any method (`PUT`, `PATCH`, `DELETE`, ...).
    pub fn new(method: &str, url: impl Into<String>) -> Request {
        Request {
            method: method.to_ascii_uppercase(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// Adds a header (a value may hold `{{secret:NAME}}` placeholders).
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Request {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// `Authorization: Bearer {{secret:NAME}}`: the operator's secret
    /// `NAME`, which digibot puts in at send time.
    pub fn bearer_secret(self, name: &str) -> Request {
        self.header("authorization", format!("Bearer {{{{secret:{name}}}}}"))
    }

    /// A JSON body (and its content type).
    pub fn json(self, value: &serde_json::Value) -> Request {
        self.body(value.to_string().into_bytes(), "application/json")
    }

    /// A body with its content type.
    pub fn body(mut self, body: impl Into<Vec<u8>>, content_type: &str) -> Request {
        self.headers.retain(|(n, _)| n != "content-type");
        self.headers
            .push(("content-type".into(), content_type.to_string()));
        self.body = body.into();
        self
    }

    /// Gives up sooner than digibot's per-call limit (it never waits longer).
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and reads the whole response.
    pub fn send(self) -> Result<Response, Error> {
        let (scheme, authority, path) = split_url(&self.url)?;
        let headers = Fields::new();
        for (name, value) in &self.headers {
            headers
                .append(name, value.as_bytes())
                .map_err(|e| Error::new("invalid-header", format!("header {name}: {e:?}")))?;
        }
        let request = OutgoingRequest::new(headers);
        let method = match self.method.as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_string()),
        };
        let invalid = |what: &str| Error::new("invalid-url", format!("{what} of {:?}", self.url));
        request
            .set_method(&method)
            .map_err(|_| invalid("the method"))?;
        request
            .set_scheme(Some(&scheme))
            .map_err(|_| invalid("the scheme"))?;
        request
            .set_authority(Some(authority))
            .map_err(|_| invalid("the host"))?;
        request
            .set_path_with_query(Some(path))
            .map_err(|_| invalid("the path"))?;
        let options = self.timeout.map(|t| {
            let options = RequestOptions::new();
            let ns = t.as_nanos().min(u128::from(u64::MAX)) as u64;
            let _ = options.set_connect_timeout(Some(ns));
            let _ = options.set_first_byte_timeout(Some(ns));
            options
        });
        let body = request
            .body()
            .map_err(|_| Error::new("internal", "the request body was taken twice"))?;
        // Sent first: digibot reads the body while the request is under
        // way (a body written before would wait for it).
        let future = outgoing_handler::handle(request, options).map_err(|e| refused(&e))?;
        write_body(body, &self.body)?;
        let response = loop {
            if let Some(result) = future.get() {
                break result
                    .map_err(|_| Error::new("internal", "the response was taken twice"))?
                    .map_err(|e| refused(&e))?;
            }
            future.subscribe().block();
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .collect::<Vec<(String, Vec<u8>)>>();
        let incoming = response
            .consume()
            .map_err(|_| Error::new("internal", "the response body was taken twice"))?;
        let body = read_body(incoming)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

fn write_body(body: OutgoingBody, bytes: &[u8]) -> Result<(), Error> {
    {
        let stream = body
            .write()
            .map_err(|_| Error::new("internal", "the request body stream was taken twice"))?;
        // `blocking-write-and-flush` takes at most 4096 bytes at a time.
        for chunk in bytes.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| stream_error("writing the request body", e))?;
        }
    }
    OutgoingBody::finish(body, None).map_err(|e| refused(&e))
}

fn read_body(incoming: IncomingBody) -> Result<Vec<u8>, Error> {
    let mut bytes = Vec::new();
    {
        let stream = incoming
            .stream()
            .map_err(|_| Error::new("internal", "the response body stream was taken twice"))?;
        loop {
            match stream.blocking_read(64 << 10) {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(e) => return Err(stream_error("reading the response body", e)),
            }
        }
    }
    let trailers = IncomingBody::finish(incoming);
    loop {
        if let Some(result) = trailers.get() {
            result
                .map_err(|_| Error::new("internal", "the trailers were taken twice"))?
                .map_err(|e| refused(&e))?;
            return Ok(bytes);
        }
        trailers.subscribe().block();
    }
}

fn stream_error(what: &str, e: StreamError) -> Error {
    match e {
        StreamError::Closed => Error::new("protocol", format!("{what}: the stream closed")),
        StreamError::LastOperationFailed(e) => {
            // digibot's refusal, if it refused (e.g. a body over its cap).
            last_refusal().unwrap_or_else(|| {
                Error::new("protocol", format!("{what}: {}", e.to_debug_string()))
            })
        }
    }
}

/// The host's refusal (in words) for `code`, or the code itself.
fn refused(code: &ErrorCode) -> Error {
    last_refusal().unwrap_or_else(|| Error::new("http", format!("{code:?}")))
}

fn last_refusal() -> Option<Error> {
    outbound::last_refusal().map(|r| Error {
        kind: r.kind,
        message: r.message,
        refusal: true,
    })
}

fn split_url(url: &str) -> Result<(Scheme, &str, &str), Error> {
    let invalid = || Error::new("invalid-url", format!("{url:?} is not an http(s) URL"));
    let (scheme, rest) = url.split_once("://").ok_or_else(invalid)?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        _ => return Err(invalid()),
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return Err(invalid());
    }
    Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
}

/// A response, read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Response {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first value of header `name` (any case), if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// The body.
    pub fn bytes(&self) -> &[u8] {
        &self.body
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.body)
            .map_err(|e| Error::new("body", format!("the response is not UTF-8: {e}")))
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, Error> {
        serde_json::from_slice(&self.body).map_err(|e| {
            let start = String::from_utf8_lossy(&self.body[..self.body.len().min(80)]).into_owned();
            Error::new("json", format!("the response is not JSON ({e}): {start:?}"))
        })
    }

    /// This response if its status is 2xx, else an error naming the status.
    pub fn error_for_status(self) -> Result<Response, Error> {
        if self.is_success() {
            Ok(self)
        } else {
            Err(Error::new("status", format!("HTTP {}", self.status)))
        }
    }
}

/// Why a request got no usable response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: String,
    message: String,
    refusal: bool,
}

impl Error {
    fn new(kind: &str, message: impl Into<String>) -> Error {
        Error {
            kind: kind.to_string(),
            message: message.into(),
            refusal: false,
        }
    }

    /// What went wrong: digibot's refusal kind (`not-granted`,
    /// `address-prohibited`, `redirect-not-granted`, `too-many-redirects`,
    /// `too-many-calls`, `request-too-large`, `response-too-large`,
    /// `timeout`, `secret-not-granted`, `secret-missing`, `dns`,
    /// `connect`, ...), or `invalid-url`, `status` (from
    /// [`Response::error_for_status`]), `json`, `body`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The sentence that says it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether digibot refused or failed the request (its grant, address
    /// rules, caps or the network), rather than the response being
    /// unusable.
    pub fn is_refusal(&self) -> bool {
        self.refusal
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for crate::Error {
    fn from(e: Error) -> crate::Error {
        crate::Error(format!("http {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_built_as_written() {
        let r = post("https://api.shop.example/orders")
            .bearer_secret("ORDERS_TOKEN")
            .header("X-Trace", "1")
            .json(&serde_json::json!({"n": 1}))
            .timeout(Duration::from_secs(2));
        assert_eq!(r.method, "POST");
        assert_eq!(
            r.headers,
            [
                (
                    "authorization".to_string(),
                    "Bearer {{secret:ORDERS_TOKEN}}".to_string()
                ),
                ("x-trace".to_string(), "1".to_string()),
                ("content-type".to_string(), "application/json".to_string()),
            ]
        );
        assert_eq!(r.body, br#"{"n":1}"#);
    }

    #[test]
    fn urls_split_into_their_parts() {
        let (s, a, p) = split_url("https://api.shop.example:8443/orders/1?x=2").unwrap();
        assert!(matches!(s, Scheme::Https));
        assert_eq!((a, p), ("api.shop.example:8443", "/orders/1?x=2"));
        assert_eq!(split_url("http://h.example").unwrap().2, "/");
        assert_eq!(split_url("http://h.example?q").unwrap().2, "?q");
        for bad in ["ftp://x", "api.example/x", "http:///x"] {
            let e = split_url(bad).err().unwrap();
            assert_eq!(e.kind(), "invalid-url", "{bad}");
        }
    }

    #[test]
    fn responses_read_as_text_json_and_status() {
        let r = Response {
            status: 404,
            headers: vec![("Content-Type".into(), b"application/json".to_vec())],
            body: br#"{"error":"no such order"}"#.to_vec(),
        };
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json().unwrap()["error"], "no such order");
        let e = r.clone().error_for_status().unwrap_err();
        assert_eq!(e.to_string(), "status: HTTP 404");
        assert!(!e.is_refusal());
        let not_json = Response {
            body: b"<html>".to_vec(),
            ..r
        };
        assert_eq!(not_json.json().unwrap_err().kind(), "json");
        assert_eq!(
            crate::Error::from(Error::new("timeout", "no complete response within 5000 ms")).0,
            "http timeout: no complete response within 5000 ms"
        );
    }
}
