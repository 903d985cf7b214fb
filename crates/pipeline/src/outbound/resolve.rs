//! Where a request may connect: the target's addresses (an IP literal, the
//! operator's `DIGIBOT_RESOLVE` pins, else the system resolver), each
//! checked against the SSRF rules, and the connection made to exactly the
//! addresses checked: each plugin's HTTP client resolves through [`Pins`],
//! which only hands out addresses this module checked, so a DNS answer that
//! changes between the check and the connection (rebinding) is never used.

use digibot_domain::outbound::address::classify;
use digibot_domain::outbound::{Host, HttpPolicy, Refusal, ResolveOverrides, Target};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Names whose checked addresses one client keeps at most; past it the
/// oldest are forgotten (a wildcard grant could make a plugin invent
/// names without end).
const PINS_MAX: usize = 1024;

/// Resolves and checks targets.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    overrides: ResolveOverrides,
}

impl Resolver {
    pub fn new(overrides: ResolveOverrides) -> Resolver {
        Resolver { overrides }
    }

    /// The addresses `target` may be reached at by a plugin with `policy`,
    /// or why none: a prohibited address (loopback, private, link-local,
    /// multicast, metadata, ...) is refused unless the target is that
    /// address, written literally in the grants; a name any of whose
    /// addresses is prohibited is refused.
    pub async fn addresses(
        &self,
        target: &Target,
        policy: &HttpPolicy,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let ips = match &target.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => match self.overrides.lookup(name, target.port) {
                Some(pinned) => pinned.to_vec(),
                None => system_lookup(name, target.port, timeout).await?,
            },
        };
        // Only a target written as an address the grants name literally
        // may be a prohibited one: a *name* never resolves into loopback,
        // a private network or the metadata service, whatever else is
        // granted (a pin or a rebinding DNS answer cannot borrow a literal
        // grant).
        let literal = matches!(target.host, Host::Ip(ip) if policy.names_literally(ip));
        for ip in &ips {
            if let Some(class) = classify(*ip)
                && !literal
            {
                return Err(Refusal::AddressProhibited {
                    host: target.host.to_string(),
                    address: *ip,
                    class,
                });
            }
        }
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, target.port))
            .collect())
    }
}

async fn system_lookup(
    name: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<std::net::IpAddr>, Refusal> {
    let dns = |why: String| Refusal::Dns {
        host: name.to_string(),
        why,
    };
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name, port))).await {
        Err(_) => Err(dns(format!("no answer within {} ms", timeout.as_millis()))),
        Ok(Err(e)) => Err(dns(e.to_string())),
        Ok(Ok(addrs)) => {
            let mut ips: Vec<_> = addrs.map(|a| a.ip()).collect();
            ips.dedup();
            if ips.is_empty() {
                return Err(dns("no address".into()));
            }
            Ok(ips)
        }
    }
}

/// The addresses one client may connect to, by name: set by the caller
/// right before each request, read by the client when it opens a
/// connection.
#[derive(Debug, Default)]
pub struct Pins(Mutex<PinMap>);

#[derive(Debug, Default)]
struct PinMap {
    by_name: HashMap<String, (u64, Vec<SocketAddr>)>,
    clock: u64,
}

impl Pins {
    /// Lets the client connect to `addrs` for `name` (checked ones only).
    pub fn pin(&self, name: &str, addrs: Vec<SocketAddr>) {
        let Ok(mut map) = self.0.lock() else { return };
        map.clock += 1;
        let clock = map.clock;
        map.by_name.insert(name.to_string(), (clock, addrs));
        if map.by_name.len() > PINS_MAX
            && let Some(oldest) = map
                .by_name
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(n, _)| n.clone())
        {
            map.by_name.remove(&oldest);
        }
    }

    fn get(&self, name: &str) -> Option<Vec<SocketAddr>> {
        let map = self.0.lock().ok()?;
        map.by_name.get(name).map(|(_, addrs)| addrs.clone())
    }
}

impl Resolve for Pins {
    fn resolve(&self, name: Name) -> Resolving {
        let found = self.get(name.as_str());
        let name = name.as_str().to_string();
        Box::pin(async move {
            match found {
                Some(addrs) => Ok(Box::new(addrs.into_iter()) as Addrs),
                // Never reached through `Outbound`, which pins first; a
                // connection to an unchecked name is refused.
                None => Err(format!("{name} was not checked before connecting").into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use digibot_domain::outbound::{HttpGrant, Prohibited};

    fn policy(grants: &[&str]) -> HttpPolicy {
        HttpPolicy {
            grants: grants
                .iter()
                .map(|g| HttpGrant::parse(g).unwrap())
                .collect(),
            ..HttpPolicy::default()
        }
    }

    fn target(url: &str) -> Target {
        Target::parse(url).unwrap()
    }

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn pinned_names_are_checked_like_resolved_ones() {
        let r = Resolver::new(
            ResolveOverrides::parse(
                "api.shop.example:443:127.0.0.1,meta.shop.example:443:169.254.169.254,ok.shop.example:443:93.184.216.34",
            )
            .unwrap(),
        );
        let p = policy(&["https://*.shop.example", "http://127.0.0.1:8080"]);
        let e = r
            .addresses(&target("https://api.shop.example/x"), &p, T)
            .await;
        assert_eq!(
            e,
            Err(Refusal::AddressProhibited {
                host: "api.shop.example".into(),
                address: "127.0.0.1".parse().unwrap(),
                class: Prohibited::Loopback
            })
        );
        let e = r
            .addresses(&target("https://meta.shop.example/"), &p, T)
            .await;
        assert!(
            matches!(
                e,
                Err(Refusal::AddressProhibited {
                    class: Prohibited::CloudMetadata,
                    ..
                })
            ),
            "{e:?}"
        );
        // A literal the grant names is reachable, and only that one.
        assert_eq!(
            r.addresses(&target("http://127.0.0.1:8080/"), &p, T).await,
            Ok(vec!["127.0.0.1:8080".parse().unwrap()])
        );
        assert!(
            r.addresses(&target("http://127.0.0.2:8080/"), &p, T)
                .await
                .is_err()
        );
        // A name pinned to an address a grant names literally is still
        // refused: only the literal itself may be reached.
        let r2 = Resolver::new(ResolveOverrides::parse("api.shop.example:8080:127.0.0.1").unwrap());
        assert!(matches!(
            r2.addresses(&target("http://api.shop.example:8080/"), &p, T)
                .await,
            Err(Refusal::AddressProhibited {
                class: Prohibited::Loopback,
                ..
            })
        ));
        assert_eq!(
            r.addresses(&target("https://ok.shop.example/"), &p, T)
                .await,
            Ok(vec!["93.184.216.34:443".parse().unwrap()])
        );
    }

    #[tokio::test]
    async fn localhost_resolves_and_is_refused() {
        let e = Resolver::default()
            .addresses(
                &target("http://localhost:9/"),
                &policy(&["http://localhost:9"]),
                T,
            )
            .await;
        assert!(
            matches!(
                e,
                Err(Refusal::AddressProhibited {
                    class: Prohibited::Loopback,
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn pins_hand_out_only_what_was_pinned() {
        let pins = Pins::default();
        pins.pin("a.example", vec!["93.184.216.34:443".parse().unwrap()]);
        let got: Vec<_> = pins
            .resolve("a.example".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert_eq!(got, ["93.184.216.34:443".parse().unwrap()]);
        assert!(pins.resolve("b.example".parse().unwrap()).await.is_err());
        for i in 0..PINS_MAX + 10 {
            pins.pin(&format!("n{i}.example"), vec![]);
        }
        assert!(pins.0.lock().unwrap().by_name.len() <= PINS_MAX);
    }
}
