//! Which IP addresses a plugin's request may not reach unless its grant
//! names the address literally: everything that is not ordinary global
//! unicast (IANA's special-purpose registries), with the IPv4 address
//! inside IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6 addresses
//! judged as IPv4, and the cloud metadata endpoints called out by name.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is off limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prohibited {
    /// 169.254.169.254, fd00:ec2::254 (and what embeds them).
    CloudMetadata,
    Loopback,
    /// RFC 1918, unique local (fc00::/7).
    Private,
    LinkLocal,
    Multicast,
    /// 0.0.0.0/8, `::`.
    Unspecified,
    /// 100.64.0.0/10, carrier-grade NAT.
    SharedCgnat,
    Broadcast,
    /// Documentation, benchmarking, protocol assignments, reserved and
    /// deprecated ranges: nothing a plugin has a reason to call.
    Reserved,
}

impl Prohibited {
    /// A short stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            Prohibited::CloudMetadata => "cloud metadata",
            Prohibited::Loopback => "loopback",
            Prohibited::Private => "private",
            Prohibited::LinkLocal => "link-local",
            Prohibited::Multicast => "multicast",
            Prohibited::Unspecified => "unspecified",
            Prohibited::SharedCgnat => "shared (CGNAT)",
            Prohibited::Broadcast => "broadcast",
            Prohibited::Reserved => "reserved",
        }
    }
}

impl fmt::Display for Prohibited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// `None` for an ordinary public address, else why it is prohibited.
pub fn classify(ip: IpAddr) -> Option<Prohibited> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn classify_v4(ip: Ipv4Addr) -> Option<Prohibited> {
    use Prohibited::*;
    let table: &[([u8; 4], u32, Prohibited)] = &[
        (METADATA_V4.octets(), 32, CloudMetadata),
        ([0, 0, 0, 0], 8, Unspecified),
        ([127, 0, 0, 0], 8, Loopback),
        ([10, 0, 0, 0], 8, Private),
        ([172, 16, 0, 0], 12, Private),
        ([192, 168, 0, 0], 16, Private),
        ([169, 254, 0, 0], 16, LinkLocal),
        ([100, 64, 0, 0], 10, SharedCgnat),
        ([224, 0, 0, 0], 4, Multicast),
        ([255, 255, 255, 255], 32, Broadcast),
        ([240, 0, 0, 0], 4, Reserved),
        ([192, 0, 0, 0], 24, Reserved),
        ([192, 0, 2, 0], 24, Reserved),
        ([192, 88, 99, 0], 24, Reserved),
        ([198, 18, 0, 0], 15, Reserved),
        ([198, 51, 100, 0], 24, Reserved),
        ([203, 0, 113, 0], 24, Reserved),
    ];
    table
        .iter()
        .find(|(net, bits, _)| in_v4(ip, *net, *bits))
        .map(|(_, _, why)| *why)
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Prohibited> {
    use Prohibited::*;
    if ip == METADATA_V6 {
        return Some(CloudMetadata);
    }
    if ip.is_unspecified() {
        return Some(Unspecified);
    }
    if ip.is_loopback() {
        return Some(Loopback);
    }
    // Addresses that carry an IPv4 address are judged by it.
    let seg = ip.segments();
    let low32 = Ipv4Addr::from((u32::from(seg[6]) << 16) | u32::from(seg[7]));
    let v6 = |s: [u16; 8]| Ipv6Addr::from(s);
    let embedded = if in_v6(ip, v6([0, 0, 0, 0, 0, 0xffff, 0, 0]), 96) // mapped
        || in_v6(ip, v6([0; 8]), 96) // compatible (deprecated)
        || in_v6(ip, v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]), 96) // NAT64
        || in_v6(ip, v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]), 48)
    {
        Some(low32)
    } else if in_v6(ip, v6([0x2002, 0, 0, 0, 0, 0, 0, 0]), 16) {
        // 6to4: the IPv4 address follows the prefix.
        Some(Ipv4Addr::from(
            (u32::from(seg[1]) << 16) | u32::from(seg[2]),
        ))
    } else {
        None
    };
    if let Some(v4) = embedded {
        // A NAT64 or 6to4 address of a public IPv4 host is a public route.
        return classify_v4(v4);
    }
    let table: &[(Ipv6Addr, u32, Prohibited)] = &[
        (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, Private),
        (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, LinkLocal),
        (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]), 10, Private),
        (v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, Multicast),
        (v6([0x0100, 0, 0, 0, 0, 0, 0, 0]), 64, Reserved),
        (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 23, Reserved),
        (v6([0x2001, 0x0db8, 0, 0, 0, 0, 0, 0]), 32, Reserved),
        (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]), 20, Reserved),
        (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]), 16, Reserved),
    ];
    if let Some((_, _, why)) = table.iter().find(|(net, bits, _)| in_v6(ip, *net, *bits)) {
        return Some(*why);
    }
    // Only 2000::/3 is allocated global unicast.
    if !in_v6(ip, v6([0x2000, 0, 0, 0, 0, 0, 0, 0]), 3) {
        return Some(Reserved);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> Option<Prohibited> {
        classify(s.parse().unwrap())
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4007:80e::200e",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert_eq!(class(ip), None, "{ip}");
        }
    }

    #[test]
    fn special_addresses_are_prohibited_by_kind() {
        use Prohibited::*;
        for (ip, want) in [
            ("169.254.169.254", CloudMetadata),
            ("fd00:ec2::254", CloudMetadata),
            ("::ffff:169.254.169.254", CloudMetadata),
            ("127.0.0.1", Loopback),
            ("127.255.1.2", Loopback),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("::127.0.0.1", Loopback),
            ("64:ff9b::7f00:1", Loopback),
            ("2002:7f00:0001::1", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("::ffff:10.0.0.1", Private),
            ("2002:c0a8:0101::", Private),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fec0::1", Private),
            ("169.254.1.1", LinkLocal),
            ("fe80::1", LinkLocal),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::1", Multicast),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("::", Unspecified),
            ("100.64.0.1", SharedCgnat),
            ("100.127.255.254", SharedCgnat),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("192.0.2.1", Reserved),
            ("198.18.0.1", Reserved),
            ("203.0.113.9", Reserved),
            ("2001:db8::1", Reserved),
            ("2001::1", Reserved),
            ("100::1", Reserved),
            ("4000::1", Reserved),
        ] {
            assert_eq!(class(ip), Some(want), "{ip}");
        }
    }
}
