//! Outbound HTTP by grant, the rules without the I/O: what a plugin's
//! request targets ([`target`]), whether its `[grants] http` allows it
//! ([`grant`]), which addresses are off limits ([`address`]), the
//! operator's name pins ([`resolve`]), secrets by placeholder ([`secret`]),
//! the caps ([`HttpLimits`]) and every way a request is refused
//! ([`Refusal`]). The runtime hands requests over and the pipeline sends
//! them; both judge them by these rules.

pub mod address;
pub mod grant;
pub mod resolve;
pub mod secret;
pub mod target;

pub use address::Prohibited;
pub use grant::{GrantError, HttpGrant};
pub use resolve::ResolveOverrides;
pub use secret::SecretName;
pub use target::{Host, Scheme, Target, TargetError};

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

/// The caps on one plugin's outgoing HTTP, per turn and per call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HttpLimits {
    /// Requests one turn may make (the next one is refused).
    pub calls: u32,
    /// Largest request body.
    pub request_bytes: usize,
    /// Largest response body (a longer one fails the call).
    pub response_bytes: usize,
    /// One call, redirects included, from sending to the last body byte.
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Redirects followed per call.
    pub redirects: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            calls: 10,
            request_bytes: 64 << 10,
            response_bytes: 1 << 20,
            timeout: Duration::from_secs(5),
            redirects: 5,
        }
    }
}

impl HttpLimits {
    /// The most an operator's host lets any plugin ask for.
    pub fn ceilings() -> HttpLimits {
        HttpLimits {
            calls: 100,
            request_bytes: 1 << 20,
            response_bytes: 16 << 20,
            timeout: Duration::from_secs(30),
            redirects: 10,
        }
    }

    /// Each cap at most `ceiling`'s.
    pub fn min(&self, ceiling: &HttpLimits) -> HttpLimits {
        HttpLimits {
            calls: self.calls.min(ceiling.calls),
            request_bytes: self.request_bytes.min(ceiling.request_bytes),
            response_bytes: self.response_bytes.min(ceiling.response_bytes),
            timeout: self.timeout.min(ceiling.timeout),
            redirects: self.redirects.min(ceiling.redirects),
        }
    }
}

mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// What one plugin may do over HTTP: built once when it is loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HttpPolicy {
    pub grants: Vec<HttpGrant>,
    pub secrets: BTreeSet<SecretName>,
    pub limits: HttpLimits,
}

impl HttpPolicy {
    /// The first grant that allows `target`.
    pub fn grant_for(&self, target: &Target) -> Option<&HttpGrant> {
        self.grants.iter().find(|g| g.allows(target))
    }

    /// Whether the grants name `ip` literally: only then may a request
    /// written with that address reach a [`Prohibited`] one.
    pub fn names_literally(&self, ip: IpAddr) -> bool {
        self.grants.iter().any(|g| g.literal_ip() == Some(ip))
    }

    /// Whether the plugin may reach the network at all.
    pub fn any(&self) -> bool {
        !self.grants.is_empty()
    }
}

/// Why an outgoing request was refused or failed. The plugin gets the
/// matching `wasi:http` error code and, through `digishare:bot/outbound`,
/// [`kind`](Self::kind) and this message; the event records both. Stored
/// (in the journal) as `{"kind": ..., "detail": ...}`, the tag being
/// [`kind`](Self::kind).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "detail", rename_all = "kebab-case")]
pub enum Refusal {
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    #[error("{url} is outside this plugin's http grant")]
    NotGranted { url: String },
    #[error("secret {name} is not in this plugin's [grants] secrets")]
    SecretNotGranted { name: String },
    #[error(
        "secret {name} is not configured on this host (DIGIBOT_SECRET_{name} or the secrets file)"
    )]
    SecretMissing { name: String },
    #[error("a header value has a malformed {{{{secret:NAME}}}} placeholder")]
    BadPlaceholder,
    #[error("{}", prohibited_message(host, address, class))]
    AddressProhibited {
        host: String,
        address: IpAddr,
        class: Prohibited,
    },
    #[error("cannot resolve {host}: {why}")]
    Dns { host: String, why: String },
    #[error("more than {max} requests in one turn")]
    TooManyCalls { max: u32 },
    #[error("request body over {max} bytes")]
    RequestTooLarge { max: usize },
    #[error("response body over {max} bytes")]
    ResponseTooLarge { max: usize },
    #[error("no complete response within {} ms", .after.as_millis())]
    Timeout { after: Duration },
    #[error("redirect to {location} leaves this plugin's http grant")]
    RedirectNotGranted { location: String },
    #[error("more than {max} redirects")]
    TooManyRedirects { max: u32 },
    #[error("bad redirect: {0}")]
    BadRedirect(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Protocol(String),
    /// This host runs plugins without a network (a replay, a test).
    #[error("outbound HTTP is off {0}")]
    Offline(String),
}

fn prohibited_message(host: &str, address: &IpAddr, class: &Prohibited) -> String {
    if Host::Ip(*address).to_string() == host || address.to_string() == host {
        format!("{host} is a {class} address, which the grant does not name")
    } else {
        format!("{host} resolves to {address}, a {class} address")
    }
}

impl Refusal {
    /// A stable short name (metrics label, what a plugin can match on).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::InvalidUrl(_) => "invalid-url",
            Refusal::NotGranted { .. } => "not-granted",
            Refusal::SecretNotGranted { .. } => "secret-not-granted",
            Refusal::SecretMissing { .. } => "secret-missing",
            Refusal::BadPlaceholder => "bad-placeholder",
            Refusal::AddressProhibited { .. } => "address-prohibited",
            Refusal::Dns { .. } => "dns",
            Refusal::TooManyCalls { .. } => "too-many-calls",
            Refusal::RequestTooLarge { .. } => "request-too-large",
            Refusal::ResponseTooLarge { .. } => "response-too-large",
            Refusal::Timeout { .. } => "timeout",
            Refusal::RedirectNotGranted { .. } => "redirect-not-granted",
            Refusal::TooManyRedirects { .. } => "too-many-redirects",
            Refusal::BadRedirect(_) => "bad-redirect",
            Refusal::Connect(_) => "connect",
            Refusal::Tls(_) => "tls",
            Refusal::Protocol(_) => "protocol",
            Refusal::Offline(_) => "offline",
        }
    }

    /// Whether the host refused before anything was sent (the policy), as
    /// opposed to a call that went out and failed.
    pub fn before_sending(&self) -> bool {
        matches!(
            self,
            Refusal::InvalidUrl(_)
                | Refusal::NotGranted { .. }
                | Refusal::SecretNotGranted { .. }
                | Refusal::SecretMissing { .. }
                | Refusal::BadPlaceholder
                | Refusal::AddressProhibited { .. }
                | Refusal::Dns { .. }
                | Refusal::TooManyCalls { .. }
                | Refusal::RequestTooLarge { .. }
                | Refusal::Offline(_)
        )
    }
}

/// `Idempotency-Key: {event}/{plugin}/{call}` of a plugin's call number
/// `call` (from 0) while handling `event`. Bytes a header value cannot
/// carry (and `%`) are percent-encoded, so every event key gives a key.
pub fn idempotency_key(event: &str, plugin: &str, call: u32) -> String {
    let mut key = String::with_capacity(event.len() + plugin.len() + 8);
    for b in event.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'%' {
            key.push(b as char);
        } else {
            let _ = write!(key, "%{b:02X}");
        }
    }
    let _ = write!(key, "/{plugin}/{call}");
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys() {
        assert_eq!(
            idempotency_key("live_chat.new_message:msg_1", "orders", 0),
            "live_chat.new_message:msg_1/orders/0"
        );
        assert_eq!(idempotency_key("evt 9%\n", "p", 3), "evt%209%25%0A/p/3");
        assert_eq!(idempotency_key("é", "p", 1), "%C3%A9/p/1");
    }

    #[test]
    fn limits_are_capped_by_the_ceilings() {
        let asked = HttpLimits {
            calls: 1000,
            request_bytes: 1,
            response_bytes: usize::MAX,
            timeout: Duration::from_secs(3600),
            redirects: 0,
        };
        let capped = asked.min(&HttpLimits::ceilings());
        assert_eq!(capped.calls, 100);
        assert_eq!(capped.request_bytes, 1);
        assert_eq!(capped.response_bytes, 16 << 20);
        assert_eq!(capped.timeout, Duration::from_secs(30));
        assert_eq!(capped.redirects, 0);
    }

    #[test]
    fn a_policy_finds_its_grant_and_literals() {
        let policy = HttpPolicy {
            grants: vec![
                HttpGrant::parse("https://api.shop.example").unwrap(),
                HttpGrant::parse("http://127.0.0.1:9000/api/").unwrap(),
            ],
            ..HttpPolicy::default()
        };
        let t = Target::parse("http://127.0.0.1:9000/api/x").unwrap();
        assert_eq!(policy.grant_for(&t), Some(&policy.grants[1]));
        assert!(
            policy
                .grant_for(&Target::parse("http://127.0.0.1:9000/x").unwrap())
                .is_none()
        );
        assert!(policy.names_literally("127.0.0.1".parse().unwrap()));
        assert!(!policy.names_literally("127.0.0.2".parse().unwrap()));
        assert!(policy.any());
        assert!(!HttpPolicy::default().any());
    }

    #[test]
    fn refusals_are_stored_tagged_by_their_kind() {
        let all = [
            Refusal::InvalidUrl("x".into()),
            Refusal::NotGranted { url: "u".into() },
            Refusal::SecretNotGranted { name: "A".into() },
            Refusal::SecretMissing { name: "A".into() },
            Refusal::BadPlaceholder,
            Refusal::AddressProhibited {
                host: "h".into(),
                address: "10.0.0.1".parse().unwrap(),
                class: Prohibited::Private,
            },
            Refusal::Dns {
                host: "h".into(),
                why: "w".into(),
            },
            Refusal::TooManyCalls { max: 1 },
            Refusal::RequestTooLarge { max: 1 },
            Refusal::ResponseTooLarge { max: 1 },
            Refusal::Timeout {
                after: Duration::from_millis(1500),
            },
            Refusal::RedirectNotGranted {
                location: "l".into(),
            },
            Refusal::TooManyRedirects { max: 1 },
            Refusal::BadRedirect("b".into()),
            Refusal::Connect("c".into()),
            Refusal::Tls("t".into()),
            Refusal::Protocol("p".into()),
            Refusal::Offline("o".into()),
        ];
        for r in all {
            let json = serde_json::to_value(&r).unwrap();
            assert_eq!(json["kind"], r.kind(), "{json}");
            assert_eq!(serde_json::from_value::<Refusal>(json).unwrap(), r);
        }
    }

    #[test]
    fn refusals_have_kinds_and_sentences() {
        let r = Refusal::AddressProhibited {
            host: "api.shop.example".into(),
            address: "127.0.0.1".parse().unwrap(),
            class: Prohibited::Loopback,
        };
        assert_eq!(r.kind(), "address-prohibited");
        assert_eq!(
            r.to_string(),
            "api.shop.example resolves to 127.0.0.1, a loopback address"
        );
        assert!(r.before_sending());
        let t = Refusal::Timeout {
            after: Duration::from_millis(500),
        };
        assert_eq!(t.to_string(), "no complete response within 500 ms");
        assert!(!t.before_sending());
        assert_eq!(
            Refusal::BadPlaceholder.to_string(),
            "a header value has a malformed {{secret:NAME}} placeholder"
        );
    }
}
