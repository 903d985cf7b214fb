//! `DIGIBOT_RESOLVE`: the operator pins names to addresses, in the style of
//! `curl --resolve`: `name:port:address`, entries separated by commas, IPv6
//! addresses in brackets. As in curl, an entry may list several addresses
//! (`a.example:443:192.0.2.1,192.0.2.2`): a piece that is only an address
//! adds to the entry before it. A pinned name is still checked like a
//! resolved one: pinning a name to 127.0.0.1 does not make it reachable.

use super::target::Host;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The parsed overrides, by (name, port).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolveOverrides(BTreeMap<(String, u16), Vec<IpAddr>>);

/// Why `DIGIBOT_RESOLVE` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DIGIBOT_RESOLVE entry {entry:?}: {why} (expected name:port:address[,address...])")]
pub struct ResolveError {
    pub entry: String,
    pub why: String,
}

impl ResolveOverrides {
    /// Parses the variable's value (empty: no overrides).
    pub fn parse(text: &str) -> Result<ResolveOverrides, ResolveError> {
        let mut map: BTreeMap<(String, u16), Vec<IpAddr>> = BTreeMap::new();
        let mut last: Option<(String, u16)> = None;
        for piece in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let error = |why: &str| ResolveError {
                entry: piece.to_string(),
                why: why.to_string(),
            };
            if let Some(ip) = parse_address(piece) {
                let key = last
                    .clone()
                    .ok_or_else(|| error("an address with no name before it"))?;
                map.entry(key).or_default().push(ip);
                continue;
            }
            let mut parts = piece.splitn(3, ':');
            let (Some(name), Some(port), Some(address)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(error("not name:port:address"));
            };
            let name = match Host::parse(name) {
                Ok(Host::Name(n)) => n,
                Ok(Host::Ip(_)) => return Err(error("the name is an IP address")),
                Err(e) => return Err(error(&e.to_string())),
            };
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| error("the port is not a number from 1 to 65535"))?;
            let ip = parse_address(address).ok_or_else(|| error("not an IP address"))?;
            let key = (name, port);
            map.entry(key.clone()).or_default().push(ip);
            last = Some(key);
        }
        Ok(ResolveOverrides(map))
    }

    /// The pinned addresses for `name` on `port`, if any.
    pub fn lookup(&self, name: &str, port: u16) -> Option<&[IpAddr]> {
        self.0
            .get(&(name.to_ascii_lowercase(), port))
            .map(Vec::as_slice)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of pinned (name, port) pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// `1.2.3.4` or `[::1]` (bare `::1` too, when unambiguous).
fn parse_address(s: &str) -> Option<IpAddr> {
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    s.parse::<IpAddr>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curl_style_entries() {
        let o = ResolveOverrides::parse(
            "api.shop.example:443:127.0.0.1, Meta.example:80:169.254.169.254,v6.example:8080:[::1],multi.example:443:192.0.2.1,192.0.2.2",
        )
        .unwrap();
        assert_eq!(o.len(), 4);
        assert_eq!(
            o.lookup("api.shop.example", 443),
            Some(&["127.0.0.1".parse().unwrap()][..])
        );
        assert_eq!(o.lookup("api.shop.example", 80), None);
        assert_eq!(
            o.lookup("META.example", 80),
            Some(&["169.254.169.254".parse().unwrap()][..])
        );
        assert_eq!(
            o.lookup("v6.example", 8080),
            Some(&["::1".parse().unwrap()][..])
        );
        assert_eq!(o.lookup("multi.example", 443).map(<[IpAddr]>::len), Some(2));
        assert!(ResolveOverrides::parse("").unwrap().is_empty());
    }

    #[test]
    fn bad_entries_say_which() {
        for bad in [
            "api.example:443",
            "api.example:0:1.2.3.4",
            "api.example:x:1.2.3.4",
            "api.example:443:localhost",
            "1.2.3.4:443:1.2.3.4",
            "127.0.0.1",
            "api.example.:443:1.2.3.4",
        ] {
            let e = ResolveOverrides::parse(bad).expect_err(bad);
            assert!(e.to_string().contains("DIGIBOT_RESOLVE entry"), "{e}");
        }
    }
}
