//! `[grants] http`: the URLs a plugin may call, as scheme, host, port and
//! path prefix, nothing else. A host is a DNS name, a `*.` wildcard over
//! exactly one more label (as in TLS certificates: `*.crm.example` is
//! `eu.crm.example`, not `crm.example` nor `a.eu.crm.example`), or an IP
//! literal. The port is the scheme's default unless written. A path prefix
//! matches whole segments: `/v2` is `/v2` and `/v2/...`, not `/v2x`.

use super::target::{Host, Scheme, Target, TargetError};
use std::fmt;
use std::net::IpAddr;

/// The host part of a grant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GrantHost {
    /// Exactly this name.
    Name(String),
    /// One label, then this suffix (written `*.suffix`).
    Wildcard(String),
    /// This address, written literally.
    Ip(IpAddr),
}

/// One entry of `[grants] http`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpGrant {
    pub scheme: Scheme,
    pub host: GrantHost,
    pub port: u16,
    /// Starts with `/`; `/` grants every path.
    pub path_prefix: String,
}

/// Why a grant is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("http grant {grant:?}: {source}")]
    Url { grant: String, source: TargetError },
    #[error("http grant {0:?}: a query is not part of a grant")]
    Query(String),
    #[error(
        "http grant {0:?}: `*` may only be the whole first label, over a name of two labels or more (`https://*.crm.example`)"
    )]
    Wildcard(String),
}

impl HttpGrant {
    /// Parses `scheme://host[:port][/path-prefix]`.
    pub fn parse(text: &str) -> Result<HttpGrant, GrantError> {
        let url_error = |source| GrantError::Url {
            grant: text.to_string(),
            source,
        };
        // A wildcard is not a valid host: parse the URL with a stand-in
        // label, then put the wildcard back.
        let (wildcard, parsed) = match text.split_once("://") {
            Some((scheme, rest)) if rest.starts_with("*.") => {
                (true, format!("{scheme}://wildcard{}", &rest[1..]))
            }
            _ => (false, text.to_string()),
        };
        let body = parsed.split_once("://").map_or("", |(_, r)| r);
        let authority = &body[..body.find(['/', '?', '#']).unwrap_or(body.len())];
        if authority.contains('*') || (!wildcard && text.contains('*')) {
            return Err(GrantError::Wildcard(text.to_string()));
        }
        let target = Target::parse(&parsed).map_err(url_error)?;
        if target.query.is_some() {
            return Err(GrantError::Query(text.to_string()));
        }
        let host = match (wildcard, target.host) {
            (false, Host::Name(n)) => GrantHost::Name(n),
            (false, Host::Ip(ip)) => GrantHost::Ip(ip),
            (true, Host::Name(n)) => {
                let suffix = n.strip_prefix("wildcard.").unwrap_or(&n).to_string();
                if !suffix.contains('.') {
                    return Err(GrantError::Wildcard(text.to_string()));
                }
                GrantHost::Wildcard(suffix)
            }
            (true, Host::Ip(_)) => return Err(GrantError::Wildcard(text.to_string())),
        };
        Ok(HttpGrant {
            scheme: target.scheme,
            host,
            port: target.port,
            path_prefix: target.path,
        })
    }

    /// Whether `target` is inside this grant.
    pub fn allows(&self, target: &Target) -> bool {
        self.scheme == target.scheme
            && self.port == target.port
            && self.host_matches(&target.host)
            && self.path_matches(&target.path)
    }

    fn host_matches(&self, host: &Host) -> bool {
        match (&self.host, host) {
            (GrantHost::Name(g), Host::Name(h)) => g == h,
            (GrantHost::Wildcard(suffix), Host::Name(h)) => h
                .strip_suffix(suffix.as_str())
                .and_then(|label| label.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            (GrantHost::Ip(g), Host::Ip(h)) => g == h,
            _ => false,
        }
    }

    fn path_matches(&self, path: &str) -> bool {
        let prefix = self.path_prefix.as_str();
        if prefix.ends_with('/') {
            return path.starts_with(prefix);
        }
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// The address this grant names literally, if it does.
    pub fn literal_ip(&self) -> Option<IpAddr> {
        match self.host {
            GrantHost::Ip(ip) => Some(ip),
            _ => None,
        }
    }
}

impl fmt::Display for HttpGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.host {
            GrantHost::Name(n) => n.clone(),
            GrantHost::Wildcard(s) => format!("*.{s}"),
            GrantHost::Ip(ip) => Host::Ip(*ip).to_string(),
        };
        write!(f, "{}://{host}", self.scheme)?;
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        if self.path_prefix != "/" {
            f.write_str(&self.path_prefix)?;
        }
        Ok(())
    }
}

impl<'de> serde::Deserialize<'de> for HttpGrant {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HttpGrant::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for HttpGrant {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(s: &str) -> HttpGrant {
        HttpGrant::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn allows(g: &str, url: &str) -> bool {
        grant(g).allows(&Target::parse(url).unwrap_or_else(|e| panic!("{url}: {e}")))
    }

    #[test]
    fn the_issues_examples() {
        let g = grant("https://api.shop.example");
        assert_eq!(g.host, GrantHost::Name("api.shop.example".into()));
        assert_eq!((g.port, g.path_prefix.as_str()), (443, "/"));
        assert!(allows(
            "https://api.shop.example",
            "https://api.shop.example/orders/1"
        ));
        assert!(allows(
            "https://api.shop.example",
            "https://API.shop.example:443/"
        ));
        assert!(!allows(
            "https://api.shop.example",
            "http://api.shop.example/"
        ));
        assert!(!allows(
            "https://api.shop.example",
            "https://api.shop.example:8443/"
        ));
        assert!(!allows("https://api.shop.example", "https://evil.example/"));
        assert!(!allows(
            "https://api.shop.example",
            "https://api.shop.example.evil.example/"
        ));
        assert!(!allows(
            "https://api.shop.example",
            "https://x.api.shop.example/"
        ));

        let w = "https://*.crm.example/v2/";
        assert_eq!(grant(w).host, GrantHost::Wildcard("crm.example".into()));
        assert!(allows(w, "https://eu.crm.example/v2/tickets"));
        assert!(allows(w, "https://eu.crm.example/v2/"));
        assert!(!allows(w, "https://eu.crm.example/v2"));
        assert!(!allows(w, "https://eu.crm.example/v3/tickets"));
        assert!(!allows(w, "https://crm.example/v2/tickets"));
        assert!(!allows(w, "https://a.eu.crm.example/v2/tickets"));
        assert!(!allows(w, "https://evilcrm.example/v2/tickets"));
        assert!(!allows(w, "https://eu.crm.example.evil/v2/tickets"));
        assert_eq!(grant(w).to_string(), w);
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        assert!(allows("https://a.example/v2", "https://a.example/v2"));
        assert!(allows("https://a.example/v2", "https://a.example/v2/x"));
        assert!(allows("https://a.example/v2", "https://a.example/v2?q=1"));
        assert!(!allows("https://a.example/v2", "https://a.example/v2x"));
        assert!(!allows("https://a.example/v2", "https://a.example/"));
        // The query never widens a grant.
        assert!(!allows(
            "https://a.example/v2",
            "https://a.example/admin?/v2"
        ));
    }

    #[test]
    fn ports_and_literals() {
        let g = "http://127.0.0.1:8080";
        assert_eq!(grant(g).literal_ip(), Some("127.0.0.1".parse().unwrap()));
        assert!(allows(g, "http://127.0.0.1:8080/orders"));
        assert!(!allows(g, "http://127.0.0.1/orders"));
        assert!(!allows(g, "http://localhost:8080/orders"));
        assert!(!allows(g, "http://[::ffff:127.0.0.1]:8080/orders"));
        assert!(allows("http://[::1]:9/", "http://[::1]:9/x"));
        assert_eq!(
            grant("HTTP://A.Example:80/").to_string(),
            "http://a.example"
        );
        assert_eq!(
            grant("https://a.example:8443/x/").to_string(),
            "https://a.example:8443/x/"
        );
    }

    #[test]
    fn bad_grants_are_refused_with_a_reason() {
        for bad in [
            "*",
            "https://*",
            "https://*.com",
            "https://a.*.example",
            "https://*a.example",
            "https://**.example",
            "https://*.127.0.0.1",
            "https://a.example:*",
            "https://a.example/*",
            "ftp://a.example",
            "a.example",
            "https://user@a.example",
            "https://a.example/x?y",
            "https://a.example/x/../y",
            "https://127.1",
        ] {
            let e = HttpGrant::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e} names {bad}");
        }
    }

    #[test]
    fn deserializes_from_toml_strings() {
        #[derive(serde::Deserialize)]
        struct G {
            http: Vec<HttpGrant>,
        }
        let g: G = toml_like(r#"["https://a.example", "http://127.0.0.1:9/api/"]"#);
        assert_eq!(g.http.len(), 2);
        assert_eq!(g.http[1].path_prefix, "/api/");

        fn toml_like(list: &str) -> G {
            serde_json::from_str(&format!("{{\"http\": {list}}}")).unwrap()
        }
        let e = serde_json::from_str::<G>(r#"{"http": ["https://*"]}"#)
            .err()
            .unwrap();
        assert!(e.to_string().contains("`*` may only be"), "{e}");
    }
}
