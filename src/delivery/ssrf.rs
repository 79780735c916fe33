//! Which addresses a delivery may connect to: the address half of the SSRF guard.
//!
//! Webhook URLs are chosen by tenants, so without a guard the operator would make requests into
//! its own network for them: the cluster's services, the node, the cloud metadata service that
//! hands out credentials. The dispatcher resolves the target host once, checks every address
//! with [`check_all`], then connects to a checked address (never resolving again, which would
//! let DNS rebinding swap in another address after the check).
//!
//! IPv6 forms that embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible
//! `::a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4
//! `2002:aabb:ccdd::`) are judged as the IPv4 address they reach, so `::ffff:127.0.0.1` is
//! loopback.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Which address classes the operator allows as delivery targets.
///
/// The default refuses every non-public address. Tests and single-cluster setups allow private
/// targets explicitly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Allow loopback, private, link-local, CGNAT, unique-local, documentation, benchmarking and
    /// reserved addresses.
    pub allow_private: bool,
    /// Also allow cloud metadata addresses. Every metadata address is also private (link-local,
    /// CGNAT or unique-local), so this only has an effect together with `allow_private`: the
    /// credentials a metadata service hands out are worth a second, explicit switch.
    pub allow_metadata: bool,
}

/// A class of non-public addresses, named in refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// `0.0.0.0`, `::`: "any address"; connecting to it reaches the local host.
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`, deprecated site-local `fec0::/10`,
    /// local-use NAT64 `64:ff9b:1::/48`.
    Private,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `100.64.0.0/10`, carrier-grade NAT shared address space.
    Cgnat,
    /// `fc00::/7`.
    UniqueLocal,
    /// Cloud metadata services: `169.254.169.254` (AWS, GCP, Azure, ...), `169.254.170.2` (ECS
    /// task credentials), `169.254.170.23` and `fd00:ec2::23` (EKS Pod Identity),
    /// `fd00:ec2::254` (AWS IPv6), `fd20:ce::254` (GCP IPv6), `100.100.100.200` (Alibaba).
    Metadata,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `192.0.2.0/24`, `198.51.100.0/24`, `203.0.113.0/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// `198.18.0.0/15`, `2001:2::/48`.
    Benchmarking,
    /// `0.0.0.0/8`, `192.0.0.0/24`, `240.0.0.0/4`, discard-only `100::/64`.
    Reserved,
    /// Tunnel relays: Teredo `2001::/32` and the deprecated 6to4 relay anycast `192.88.99.0/24`.
    /// What they reach cannot be judged from the address.
    Tunnel,
}

impl AddressClass {
    /// Whether `policy` allows this class.
    ///
    /// Unspecified, multicast and broadcast addresses are refused even with `allow_private`:
    /// none is a unicast destination a webhook could legitimately live at, and "any address"
    /// is a well-known way to reach the local host past naive filters.
    fn allowed_by(self, policy: TargetPolicy) -> bool {
        match self {
            AddressClass::Unspecified | AddressClass::Multicast | AddressClass::Broadcast | AddressClass::Tunnel => {
                false
            }
            AddressClass::Metadata => policy.allow_private && policy.allow_metadata,
            AddressClass::Loopback
            | AddressClass::Private
            | AddressClass::LinkLocal
            | AddressClass::Cgnat
            | AddressClass::UniqueLocal
            | AddressClass::Documentation
            | AddressClass::Benchmarking
            | AddressClass::Reserved => policy.allow_private,
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressClass::Unspecified => "unspecified address",
            AddressClass::Loopback => "loopback address",
            AddressClass::Private => "private address",
            AddressClass::LinkLocal => "link-local address",
            AddressClass::Cgnat => "carrier-grade NAT address",
            AddressClass::UniqueLocal => "unique-local address",
            AddressClass::Metadata => "cloud metadata address",
            AddressClass::Multicast => "multicast address",
            AddressClass::Broadcast => "broadcast address",
            AddressClass::Documentation => "documentation address",
            AddressClass::Benchmarking => "benchmarking address",
            AddressClass::Reserved => "reserved address",
            AddressClass::Tunnel => "tunnel relay address",
        })
    }
}

/// The class of a non-public address, or `None` for a public one. An IPv6 address embedding an
/// IPv4 address gets the class of the IPv4 address (see the module docs).
pub fn address_class(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => ipv4_class(v4),
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some(v4) => ipv4_class(v4),
            None => ipv6_class(v6),
        },
    }
}

/// Checks one resolved address against `policy`; the error names the class only, e.g.
/// "loopback address is not an allowed webhook target". Never the address: the error ends up in
/// `last_error`, and a tenant must not map the cluster's internal DNS through it.
pub fn check_address(ip: IpAddr, policy: TargetPolicy) -> Result<(), String> {
    match address_class(ip) {
        Some(class) if !class.allowed_by(policy) => Err(format!("{class} is not an allowed webhook target")),
        _ => Ok(()),
    }
}

/// Checks every address a target host resolved to: all must pass, since the connection could go
/// to any of them (a host resolving to one public and one private address is refused). No
/// address at all is an error too, so a caller cannot mistake "nothing checked" for "allowed".
pub fn check_all(addrs: &[IpAddr], policy: TargetPolicy) -> Result<(), String> {
    if addrs.is_empty() {
        return Err("the webhook target resolved to no address".into());
    }
    addrs.iter().try_for_each(|ip| check_address(*ip, policy))
}

fn ipv4_class(ip: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, c, _] = ip.octets();
    // Most specific first: the metadata addresses sit inside link-local and CGNAT, broadcast
    // and unspecified inside reserved ranges.
    let class = if METADATA_V4.contains(&ip) {
        AddressClass::Metadata
    } else if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if ip.is_broadcast() {
        AddressClass::Broadcast
    } else if a == 127 {
        AddressClass::Loopback
    } else if a == 10 || (a == 172 && (16..32).contains(&b)) || (a == 192 && b == 168) {
        AddressClass::Private
    } else if a == 169 && b == 254 {
        AddressClass::LinkLocal
    } else if a == 100 && (64..128).contains(&b) {
        AddressClass::Cgnat
    } else if (224..240).contains(&a) {
        AddressClass::Multicast
    } else if matches!((a, b, c), (192, 0, 2) | (198, 51, 100) | (203, 0, 113)) {
        AddressClass::Documentation
    } else if a == 198 && (b == 18 || b == 19) {
        AddressClass::Benchmarking
    } else if (a, b, c) == (192, 88, 99) {
        AddressClass::Tunnel
    } else if a == 0 || a >= 240 || (a, b, c) == (192, 0, 0) {
        AddressClass::Reserved
    } else {
        return None;
    };
    Some(class)
}

const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(169, 254, 170, 23),
    Ipv4Addr::new(100, 100, 100, 200),
];

const METADATA_V6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23),
    Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254),
];

fn ipv6_class(ip: Ipv6Addr) -> Option<AddressClass> {
    let s = ip.segments();
    let class = if METADATA_V6.contains(&ip) {
        AddressClass::Metadata
    } else if ip.is_unspecified() {
        AddressClass::Unspecified
    } else if ip.is_loopback() {
        AddressClass::Loopback
    } else if s[0] & 0xff00 == 0xff00 {
        AddressClass::Multicast
    } else if s[0] & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if s[0] & 0xfe00 == 0xfc00 {
        AddressClass::UniqueLocal
    } else if s[0] & 0xffc0 == 0xfec0 || (s[0], s[1], s[2]) == (0x64, 0xff9b, 1) {
        AddressClass::Private
    } else if (s[0], s[1]) == (0x2001, 0xdb8) || s[0] & 0xfff0 == 0x3ff0 {
        AddressClass::Documentation
    } else if (s[0], s[1], s[2]) == (0x2001, 2, 0) {
        AddressClass::Benchmarking
    } else if (s[0], s[1]) == (0x2001, 0) {
        AddressClass::Tunnel
    } else if s[0..4] == [0x100, 0, 0, 0] {
        AddressClass::Reserved
    } else {
        return None;
    };
    Some(class)
}

/// The IPv4 address an IPv6 address reaches, for the forms that embed one.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let low32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        // IPv4-mapped ::ffff:a.b.c.d
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(low32),
        // IPv4-translated ::ffff:0:a.b.c.d (SIIT)
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low32),
        // IPv4-compatible ::a.b.c.d (deprecated); :: and ::1 are IPv6's own unspecified and
        // loopback addresses.
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_unspecified() && !ip.is_loopback() => Some(low32),
        // NAT64 well-known prefix 64:ff9b::/96: a translator forwards to the IPv4 address.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low32),
        // 6to4 2002:aabb:ccdd::/48 tunnels to a.b.c.d.
        [0x2002, _, _, _, _, _, _, _] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: TargetPolicy = TargetPolicy {
        allow_private: false,
        allow_metadata: false,
    };
    const PRIVATE: TargetPolicy = TargetPolicy {
        allow_private: true,
        allow_metadata: false,
    };
    const EVERYTHING: TargetPolicy = TargetPolicy {
        allow_private: true,
        allow_metadata: true,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The IPv4-mapped IPv6 form of an IPv4 address.
    fn mapped(v4: &str) -> IpAddr {
        IpAddr::V6(v4.parse::<Ipv4Addr>().unwrap().to_ipv6_mapped())
    }

    fn refusal(addr: IpAddr, policy: TargetPolicy) -> String {
        check_address(addr, policy).expect_err(&addr.to_string())
    }

    /// (address, class, lifted by allow_private)
    const V4_CASES: &[(&str, AddressClass, bool)] = &[
        ("0.0.0.0", AddressClass::Unspecified, false),
        ("127.0.0.1", AddressClass::Loopback, true),
        ("127.255.255.254", AddressClass::Loopback, true),
        ("10.0.0.1", AddressClass::Private, true),
        ("10.255.255.255", AddressClass::Private, true),
        ("172.16.0.1", AddressClass::Private, true),
        ("172.31.255.255", AddressClass::Private, true),
        ("192.168.1.1", AddressClass::Private, true),
        ("169.254.0.1", AddressClass::LinkLocal, true),
        ("169.254.169.253", AddressClass::LinkLocal, true),
        ("100.64.0.1", AddressClass::Cgnat, true),
        ("100.127.255.255", AddressClass::Cgnat, true),
        ("169.254.169.254", AddressClass::Metadata, false),
        ("169.254.170.2", AddressClass::Metadata, false),
        ("169.254.170.23", AddressClass::Metadata, false),
        ("100.100.100.200", AddressClass::Metadata, false),
        ("224.0.0.1", AddressClass::Multicast, false),
        ("239.255.255.250", AddressClass::Multicast, false),
        ("255.255.255.255", AddressClass::Broadcast, false),
        ("192.0.2.1", AddressClass::Documentation, true),
        ("198.51.100.7", AddressClass::Documentation, true),
        ("203.0.113.255", AddressClass::Documentation, true),
        ("198.18.0.1", AddressClass::Benchmarking, true),
        ("198.19.255.255", AddressClass::Benchmarking, true),
        ("240.0.0.1", AddressClass::Reserved, true),
        ("255.255.255.254", AddressClass::Reserved, true),
        ("0.1.2.3", AddressClass::Reserved, true),
        ("192.0.0.8", AddressClass::Reserved, true),
        ("192.88.99.1", AddressClass::Tunnel, false),
    ];

    const V6_CASES: &[(&str, AddressClass, bool)] = &[
        ("::", AddressClass::Unspecified, false),
        ("::1", AddressClass::Loopback, true),
        ("fe80::1", AddressClass::LinkLocal, true),
        ("febf:ffff::1", AddressClass::LinkLocal, true),
        ("fc00::1", AddressClass::UniqueLocal, true),
        ("fd12:3456::1", AddressClass::UniqueLocal, true),
        ("fec0::1", AddressClass::Private, true),
        ("64:ff9b:1::1", AddressClass::Private, true),
        ("fd00:ec2::254", AddressClass::Metadata, false),
        ("fd00:ec2::23", AddressClass::Metadata, false),
        ("fd20:ce::254", AddressClass::Metadata, false),
        ("ff02::1", AddressClass::Multicast, false),
        ("ff0e::101", AddressClass::Multicast, false),
        ("2001:db8::1", AddressClass::Documentation, true),
        ("2001:db8:ffff::1", AddressClass::Documentation, true),
        ("3fff::1", AddressClass::Documentation, true),
        ("2001:2::1", AddressClass::Benchmarking, true),
        ("100::1", AddressClass::Reserved, true),
        ("2001::1", AddressClass::Tunnel, false),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", AddressClass::Tunnel, false),
    ];

    fn assert_case(addr: IpAddr, class: AddressClass, lifted: bool, shown: &str) {
        assert_eq!(address_class(addr), Some(class), "{addr}");
        let message = refusal(addr, STRICT);
        assert_eq!(message, format!("{class} is not an allowed webhook target"));
        assert!(
            !message.contains(shown) && !message.contains(&addr.to_string()),
            "{message}"
        );
        assert_eq!(
            check_address(addr, PRIVATE).is_ok(),
            lifted,
            "{addr} with allow_private"
        );
        let with_metadata = lifted || class == AddressClass::Metadata;
        assert_eq!(
            check_address(addr, EVERYTHING).is_ok(),
            with_metadata,
            "{addr} with allow_metadata"
        );
    }

    #[test]
    fn ipv4_classes() {
        for &(addr, class, lifted) in V4_CASES {
            assert_case(ip(addr), class, lifted, addr);
        }
    }

    #[test]
    fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
        for &(addr, class, lifted) in V4_CASES {
            assert_case(mapped(addr), class, lifted, addr);
        }
        assert_eq!(
            refusal(ip("::ffff:127.0.0.1"), STRICT),
            "loopback address is not an allowed webhook target"
        );
    }

    #[test]
    fn other_ipv4_embeddings_are_judged_as_ipv4() {
        for (addr, class) in [
            ("::127.0.0.1", AddressClass::Loopback),
            ("::10.0.0.1", AddressClass::Private),
            ("::ffff:0:169.254.169.254", AddressClass::Metadata),
            ("64:ff9b::127.0.0.1", AddressClass::Loopback),
            ("64:ff9b::a9fe:a9fe", AddressClass::Metadata),
            ("64:ff9b::192.168.0.1", AddressClass::Private),
            ("2002:7f00:1::", AddressClass::Loopback),
            ("2002:a00:1::1", AddressClass::Private),
            ("::0.0.0.2", AddressClass::Reserved),
        ] {
            assert_eq!(address_class(ip(addr)), Some(class), "{addr}");
            assert_eq!(
                refusal(ip(addr), STRICT),
                format!("{class} is not an allowed webhook target")
            );
        }
        // The same embeddings of public addresses pass.
        for addr in [
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
            "::ffff:0:1.1.1.1",
            "2002:808:808::1",
            "::8.8.8.8",
        ] {
            assert_eq!(check_address(ip(addr), STRICT), Ok(()), "{addr}");
        }
    }

    #[test]
    fn ipv6_classes() {
        for &(addr, class, lifted) in V6_CASES {
            assert_case(ip(addr), class, lifted, addr);
        }
    }

    #[test]
    fn public_addresses_pass() {
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.255.255",
            "192.0.3.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.255",
            "64:ff9c::1",
            "2001:db9::1",
        ] {
            assert_eq!(address_class(ip(addr)), None, "{addr}");
            assert_eq!(check_address(ip(addr), STRICT), Ok(()), "{addr}");
        }
    }

    #[test]
    fn metadata_needs_both_flags() {
        let metadata = ip("169.254.169.254");
        let metadata_only = TargetPolicy {
            allow_private: false,
            allow_metadata: true,
        };
        assert_eq!(
            refusal(metadata, PRIVATE),
            "cloud metadata address is not an allowed webhook target"
        );
        assert!(check_address(metadata, metadata_only).is_err());
        assert_eq!(check_address(metadata, EVERYTHING), Ok(()));
        assert_eq!(check_address(ip("fd00:ec2::254"), EVERYTHING), Ok(()));
        assert!(check_address(ip("fd00:ec2::254"), PRIVATE).is_err());
    }

    #[test]
    fn default_policy_is_strict() {
        assert_eq!(TargetPolicy::default(), STRICT);
        assert_eq!(
            refusal(ip("127.0.0.1"), TargetPolicy::default()),
            "loopback address is not an allowed webhook target"
        );
    }

    #[test]
    fn check_all_needs_every_address_to_pass() {
        let public = [ip("8.8.8.8"), ip("2606:4700:4700::1111")];
        assert_eq!(check_all(&public, STRICT), Ok(()));
        let mixed = [ip("8.8.8.8"), ip("10.0.0.5")];
        assert_eq!(
            check_all(&mixed, STRICT),
            Err("private address is not an allowed webhook target".into())
        );
        let mixed_v6 = [ip("2606:4700:4700::1111"), ip("::1")];
        assert!(
            check_all(&mixed_v6, STRICT)
                .unwrap_err()
                .starts_with("loopback address is not")
        );
        assert_eq!(check_all(&mixed, PRIVATE), Ok(()));
        assert!(check_all(&[ip("127.0.0.1"), ip("169.254.169.254")], PRIVATE).is_err());
        assert!(check_all(&[], STRICT).unwrap_err().contains("no address"));
        assert!(check_all(&[], EVERYTHING).is_err());
    }
}
