//! The `Host` allow-list in front of the admin API, the dashboard and
//! `/metrics`: the defence against DNS rebinding, where a web page on
//! `evil.example` has its name re-pointed at digibot's address so that the
//! visitor's browser talks to digibot as if it were the page's own origin
//! (with whatever token the page knows or guesses). The browser still
//! sends `Host: evil.example`, which is refused here.
//!
//! Allowed by default, as in Vite's dev server: IP literals (a rebinding
//! always goes through a name), `localhost` and its subdomains, and a
//! request without `Host` (not a browser). Names an operator reaches
//! digibot by (`digibot.example.com`) are added with `allowed_hosts`; `*`
//! turns the check off (behind a proxy that checks it).

use crate::error_body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::IpAddr;
use std::sync::Arc;

/// The host names accepted besides IP literals and `localhost`.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    names: Arc<[String]>,
    any: bool,
}

impl AllowedHosts {
    /// `names` as configured (case does not matter, a port is ignored);
    /// `*` allows any host.
    pub fn new<S: AsRef<str>>(names: &[S]) -> AllowedHosts {
        let names: Vec<String> = names
            .iter()
            .map(|n| host_name(n.as_ref().trim()).to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        AllowedHosts {
            any: names.iter().any(|n| n == "*"),
            names: names.into(),
        }
    }

    /// Whether a request with this `Host` header may reach the admin API.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            return true;
        };
        if self.any {
            return true;
        }
        let name = host_name(host.trim()).to_ascii_lowercase();
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.names.contains(&name)
    }
}

/// `host[:port]` or `[v6]:port` without its port.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        // A bare IPv6 address has several colons: no port to strip.
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// Refuses a request whose `Host` is not allowed, before anything else
/// (the token is not even looked at): `403`.
pub async fn require_allowed_host(
    State(hosts): State<AllowedHosts>,
    request: Request,
    next: Next,
) -> Response {
    let host = request.headers().get(header::HOST);
    let allowed = match host {
        None => hosts.allows(None),
        Some(value) => value.to_str().is_ok_and(|h| hosts.allows(Some(h))),
    };
    if allowed {
        return next.run(request).await;
    }
    let shown: String = host
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .unwrap_or_default()
        .chars()
        .take(100)
        .collect();
    tracing::warn!(host = %shown, path = %request.uri().path(), "admin request for a host not allowed (DNS rebinding?)");
    (
        StatusCode::FORBIDDEN,
        error_body(format!(
            "host {shown:?} is not allowed here; add it to DIGIBOT_ALLOWED_HOSTS"
        )),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_and_localhost_pass_names_need_listing() {
        let default = AllowedHosts::default();
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "10.1.2.3:80",
            "[::1]:8080",
            "[::1]",
            "::1",
            "localhost",
            "LOCALHOST:8080",
            "app.localhost:3000",
        ] {
            assert!(default.allows(Some(ok)), "{ok}");
        }
        assert!(default.allows(None));
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(!default.allows(Some(bad)), "{bad}");
        }
        let listed = AllowedHosts::new(&["Digibot.Example.com", " ops.internal:8080 "]);
        assert!(listed.allows(Some("digibot.example.com:443")));
        assert!(listed.allows(Some("ops.internal")));
        assert!(!listed.allows(Some("evil.example")));
        assert!(AllowedHosts::new(&["*"]).allows(Some("evil.example")));
    }
}
