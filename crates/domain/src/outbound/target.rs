//! Where an outgoing request goes, parsed once and strictly: a scheme, a
//! host (a DNS name or a canonical IP literal), a port and a path. Anything
//! two parsers could read differently is refused rather than normalised:
//! userinfo, IP literals in other spellings (`127.1`, `0x7f.0.0.1`,
//! `2130706433`, zone ids), dot segments (also `..;`), percent-encoded dots,
//! slashes, backslashes, `%25` and NUL, raw backslashes, control bytes and
//! a trailing dot on the name. What is left means one thing to every HTTP
//! stack, so the grant check and the connection see the same target.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `http` or `https`: the only schemes a plugin may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// The scheme's name, lowercase.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// 80 or 443.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    /// Parses a scheme, case-insensitively.
    pub fn parse(s: &str) -> Result<Scheme, TargetError> {
        if s.eq_ignore_ascii_case("http") {
            Ok(Scheme::Http)
        } else if s.eq_ignore_ascii_case("https") {
            Ok(Scheme::Https)
        } else {
            Err(TargetError::Scheme(s.to_string()))
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host: a lowercase DNS name (no trailing dot) or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl Host {
    /// Parses the host part of an authority (`[v6]` in brackets).
    pub fn parse(s: &str) -> Result<Host, TargetError> {
        if s.is_empty() {
            return Err(TargetError::Host {
                host: String::new(),
                why: "is empty",
            });
        }
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or_else(|| TargetError::Host {
                host: s.to_string(),
                why: "has an unclosed `[`",
            })?;
            if inner.contains('%') {
                return Err(TargetError::Host {
                    host: s.to_string(),
                    why: "carries an IPv6 zone id",
                });
            }
            return inner
                .parse::<Ipv6Addr>()
                .map(|ip| Host::Ip(IpAddr::V6(ip)))
                .map_err(|_| TargetError::Host {
                    host: s.to_string(),
                    why: "is not an IPv6 address",
                });
        }
        if !s.is_ascii() {
            return Err(TargetError::Host {
                host: s.to_string(),
                why: "is not ASCII: write the name in punycode (xn--...)",
            });
        }
        let lower = s.to_ascii_lowercase();
        if lower.ends_with('.') {
            return Err(TargetError::Host {
                host: s.to_string(),
                why: "ends with a dot",
            });
        }
        // WHATWG reads a name whose last label is numeric (or 0x...) as an
        // IPv4 address in some spelling: accept only the canonical one.
        let last = lower.rsplit('.').next().unwrap_or("");
        let numeric = !last.is_empty()
            && (last.bytes().all(|b| b.is_ascii_digit())
                || (last.starts_with("0x") && last[2..].bytes().all(|b| b.is_ascii_hexdigit())));
        if numeric {
            return canonical_ipv4(&lower)
                .map(|ip| Host::Ip(IpAddr::V4(ip)))
                .ok_or_else(|| TargetError::Host {
                    host: s.to_string(),
                    why: "is an IP address in a non-canonical spelling (write a.b.c.d)",
                });
        }
        check_name(&lower).map_err(|why| TargetError::Host {
            host: s.to_string(),
            why,
        })?;
        Ok(Host::Name(lower))
    }

    /// The name, if this is one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Host::Name(n) => Some(n),
            Host::Ip(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// `a.b.c.d` with four decimal octets and no leading zeros, else `None`.
fn canonical_ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty()
            || part.len() > 3
            || !part.bytes().all(|b| b.is_ascii_digit())
            || (part.len() > 1 && part.starts_with('0'))
        {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// A DNS name of letters, digits, `-` and `_`, labels of 1 to 63 bytes not
/// starting or ending with `-`, 253 bytes at most (lowercase already).
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.len() > 253 {
        return Err("is longer than 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("has an empty label");
        }
        if label.len() > 63 {
            return Err("has a label longer than 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err("has a character other than letters, digits, `-` and `_`");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("has a label starting or ending with `-`");
        }
    }
    Ok(())
}

/// Why a URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("scheme {0:?} is not http or https")]
    Scheme(String),
    #[error("{0:?} is not an absolute http(s) URL")]
    NotAbsolute(String),
    #[error("URLs with a user name or password (`user@host`) are refused")]
    Userinfo,
    #[error("host {host:?} {why}")]
    Host { host: String, why: &'static str },
    #[error("port {0:?} is not a number from 1 to 65535")]
    Port(String),
    #[error("path {path:?} {why}")]
    Path { path: String, why: &'static str },
    #[error("URLs with a fragment (`#...`) are refused")]
    Fragment,
}

/// A parsed request target. `Display` gives the canonical URL (the port
/// only when it is not the scheme's default).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub scheme: Scheme,
    pub host: Host,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
    /// Without the `?`.
    pub query: Option<String>,
}

impl Target {
    /// Parses an absolute URL: `scheme://host[:port][/path][?query]`.
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| TargetError::NotAbsolute(url.to_string()))?;
        let scheme = Scheme::parse(scheme)?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path_and_query) = rest.split_at(end);
        Target::from_parts(scheme, authority, path_and_query)
    }

    /// Builds a target from a request's parts, as `wasi:http` hands them
    /// over: the authority (`host[:port]`) and the path with its query.
    pub fn from_parts(
        scheme: Scheme,
        authority: &str,
        path_and_query: &str,
    ) -> Result<Target, TargetError> {
        if authority.contains('@') {
            return Err(TargetError::Userinfo);
        }
        let (host, port) = split_port(authority)?;
        let host = Host::parse(host)?;
        let port = match port {
            None => scheme.default_port(),
            Some(p) => parse_port(p)?,
        };
        if path_and_query.contains('#') {
            return Err(TargetError::Fragment);
        }
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let path = if path.is_empty() { "/" } else { path };
        check_path(path)?;
        if let Some(q) = query
            && q.bytes().any(|b| b <= b' ' || b == 0x7f || b >= 0x80)
        {
            return Err(TargetError::Path {
                path: path_and_query.to_string(),
                why: "has a space, control byte or non-ASCII byte in its query",
            });
        }
        Ok(Target {
            scheme,
            host,
            port,
            path: path.to_string(),
            query: query.map(str::to_string),
        })
    }

    /// `scheme://host[:port]`: who a response comes from.
    pub fn origin(&self) -> String {
        if self.port == self.scheme.default_port() {
            format!("{}://{}", self.scheme, self.host)
        } else {
            format!("{}://{}:{}", self.scheme, self.host, self.port)
        }
    }

    /// Whether `other` has the same scheme, host and port.
    pub fn same_origin(&self, other: &Target) -> bool {
        self.scheme == other.scheme && self.host == other.host && self.port == other.port
    }

    /// The path with its query (`/a?b`).
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.origin(), self.path_and_query())
    }
}

/// `host` and the optional port text of an authority.
fn split_port(authority: &str) -> Result<(&str, Option<&str>), TargetError> {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(i) if i + 1 == authority.len() => Ok((authority, None)),
            Some(i) if authority.as_bytes()[i + 1] == b':' => {
                Ok((&authority[..=i], Some(&authority[i + 2..])))
            }
            _ => Err(TargetError::Host {
                host: authority.to_string(),
                why: "is not a bracketed IPv6 address",
            }),
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

fn parse_port(p: &str) -> Result<u16, TargetError> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::Port(p.to_string()));
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(TargetError::Port(p.to_string())),
        Ok(port) => Ok(port),
    }
}

/// Refuses what servers and proxies disagree about in a path.
fn check_path(path: &str) -> Result<(), TargetError> {
    let refuse = |why| {
        Err(TargetError::Path {
            path: path.to_string(),
            why,
        })
    };
    if !path.starts_with('/') {
        return refuse("does not start with `/`");
    }
    if path.bytes().any(|b| b <= b' ' || b == 0x7f || b >= 0x80) {
        return refuse("has a space, control byte or non-ASCII byte");
    }
    if path.contains('\\') {
        return refuse("has a backslash");
    }
    let lower = path.to_ascii_lowercase();
    for encoded in ["%2e", "%2f", "%5c", "%25", "%00"] {
        if lower.contains(encoded) {
            return refuse("percent-encodes a dot, slash, backslash, `%` or NUL");
        }
    }
    // `..;` is `..` to some servers (Tomcat): compare the segment before
    // its first `;`.
    if path
        .split('/')
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .any(|segment| segment == "." || segment == "..")
    {
        return refuse("has a `.` or `..` segment");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> Target {
        Target::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn refused(url: &str) -> TargetError {
        match Target::parse(url) {
            Ok(t) => panic!("{url} parsed as {t}"),
            Err(e) => e,
        }
    }

    #[test]
    fn plain_urls_parse_and_print_canonically() {
        let t = ok("HTTPS://API.Shop.Example/orders/42?x=1");
        assert_eq!(t.scheme, Scheme::Https);
        assert_eq!(t.host, Host::Name("api.shop.example".into()));
        assert_eq!(t.port, 443);
        assert_eq!(t.path, "/orders/42");
        assert_eq!(t.query.as_deref(), Some("x=1"));
        assert_eq!(t.to_string(), "https://api.shop.example/orders/42?x=1");
        assert_eq!(ok("http://a.example").path, "/");
        assert_eq!(ok("http://a.example:80/").to_string(), "http://a.example/");
        assert_eq!(
            ok("http://127.0.0.1:8080/x").to_string(),
            "http://127.0.0.1:8080/x"
        );
        assert_eq!(
            ok("http://[::1]:81/").host,
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(ok("http://[::1]:81/").to_string(), "http://[::1]:81/");
        assert_eq!(ok("http://[::1]/").port, 80);
        assert_eq!(ok("http://a.example?q").path_and_query(), "/?q");
        // Percent-encoding of other bytes is fine.
        assert_eq!(ok("http://a.example/a%20b").path, "/a%20b");
    }

    #[test]
    fn userinfo_and_other_schemes_are_refused() {
        assert_eq!(refused("http://user:pw@a.example/"), TargetError::Userinfo);
        assert_eq!(
            refused("http://a.example@127.0.0.1/"),
            TargetError::Userinfo
        );
        assert!(matches!(
            refused("ftp://a.example/"),
            TargetError::Scheme(_)
        ));
        assert!(matches!(
            refused("file:///etc/passwd"),
            TargetError::Scheme(_)
        ));
        assert!(matches!(
            refused("a.example/x"),
            TargetError::NotAbsolute(_)
        ));
        assert_eq!(refused("http://a.example/#frag"), TargetError::Fragment);
    }

    #[test]
    fn ip_literals_only_in_their_canonical_spelling() {
        for url in [
            "http://127.1/",
            "http://0x7f.0.0.1/",
            "http://0x7f000001/",
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://127.000.000.001/",
            "http://127.0.0.1.1/",
            "http://256.0.0.1/",
            "http://a.b.0x10/",
            "http://example.123/",
        ] {
            assert!(
                matches!(refused(url), TargetError::Host { .. }),
                "{url} must be refused"
            );
        }
        assert!(matches!(
            refused("http://[fe80::1%25eth0]/"),
            TargetError::Host { .. }
        ));
        assert!(matches!(refused("http://[::1/"), TargetError::Host { .. }));
        assert!(matches!(
            refused("http://[::1]x/"),
            TargetError::Host { .. }
        ));
        assert!(matches!(
            refused("http://[1.2.3.4]/"),
            TargetError::Host { .. }
        ));
        assert_eq!(
            ok("http://[::ffff:127.0.0.1]/").host,
            Host::Ip("::ffff:127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            ok("http://10.0.0.5/").host,
            Host::Ip("10.0.0.5".parse().unwrap())
        );
        assert_eq!(
            ok("http://0.0.0.0/").host,
            Host::Ip("0.0.0.0".parse().unwrap())
        );
    }

    #[test]
    fn odd_names_are_refused() {
        for url in [
            "http://a.example./",
            "http://ex\u{e4}mple.com/",
            "http://a..example/",
            "http://-a.example/",
            "http://a b.example/",
            "http:///x",
            "http://a.example:0/",
            "http://a.example:65536/",
            "http://a.example:+80/",
            "http://a.example:/",
        ] {
            assert!(Target::parse(url).is_err(), "{url} must be refused");
        }
        assert_eq!(
            ok("http://xn--exmple-cua.com/").host.name(),
            Some("xn--exmple-cua.com")
        );
        assert_eq!(
            ok("http://_dmarc.a.example/").host.name(),
            Some("_dmarc.a.example")
        );
    }

    #[test]
    fn path_tricks_are_refused() {
        for url in [
            "http://a.example/v2/../admin",
            "http://a.example/v2/./x",
            "http://a.example/v2/..",
            "http://a.example/v2/..;/admin",
            "http://a.example/v2/%2e%2e/admin",
            "http://a.example/v2/%2E./admin",
            "http://a.example/v2%2fadmin",
            "http://a.example/v2%5Cadmin",
            "http://a.example/v2/%252e%252e/admin",
            "http://a.example/v2%00",
            "http://a.example/v2\\..\\admin",
            "http://a.example/v2/\u{7f}",
            "http://a.example/a b",
            "http://a.example/x?a b",
        ] {
            assert!(
                matches!(refused(url), TargetError::Path { .. }),
                "{url} must be refused as a path"
            );
        }
        // Dots inside a segment are not dot segments.
        assert_eq!(
            ok("http://a.example/v2/...x/.well-known").path,
            "/v2/...x/.well-known"
        );
        // A query may hold encoded slashes: it is not matched by grants.
        assert_eq!(
            ok("http://a.example/x?u=%2F..%2F").query.as_deref(),
            Some("u=%2F..%2F")
        );
    }

    #[test]
    fn origins() {
        let a = ok("https://a.example/x");
        assert_eq!(a.origin(), "https://a.example");
        assert!(a.same_origin(&ok("https://a.example:443/y")));
        assert!(!a.same_origin(&ok("http://a.example/x")));
        assert!(!a.same_origin(&ok("https://b.example/x")));
        assert!(!a.same_origin(&ok("https://a.example:8443/x")));
    }
}
