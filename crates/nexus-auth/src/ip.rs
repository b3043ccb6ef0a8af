//! Client addresses reduced to their network, for audit records and rate-limit keys: precise
//! enough to spot an attack from one network, not so precise that the audit log stores personal
//! data it does not need (a /24 or /48 is typically a whole site or customer, not a person).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IPv4 → its /24 (`203.0.113.0/24`); IPv6 → its /48 (`2001:db8:1::/48`). IPv4-mapped IPv6
/// addresses (`::ffff:203.0.113.7`, as dual-stack listeners report IPv4 clients) count as IPv4.
pub fn truncate_ip(addr: IpAddr) -> String {
    match addr.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{}/24", Ipv4Addr::new(a, b, c, 0))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{}/48", Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> String {
        truncate_ip(s.parse().unwrap())
    }

    #[test]
    fn ipv4_to_slash_24() {
        assert_eq!(t("203.0.113.77"), "203.0.113.0/24");
        assert_eq!(t("10.1.2.255"), "10.1.2.0/24");
        assert_eq!(t("0.0.0.0"), "0.0.0.0/24");
        assert_eq!(t("127.0.0.1"), "127.0.0.0/24");
    }

    #[test]
    fn ipv6_to_slash_48() {
        assert_eq!(t("2001:db8:1:2:3:4:5:6"), "2001:db8:1::/48");
        assert_eq!(t("2001:db8:abcd:ffff::1"), "2001:db8:abcd::/48");
        assert_eq!(t("::1"), "::/48");
        assert_eq!(t("fe80::1"), "fe80::/48");
    }

    #[test]
    fn mapped_ipv4_counts_as_ipv4() {
        assert_eq!(t("::ffff:203.0.113.7"), "203.0.113.0/24");
        assert_eq!(t("::ffff:cb00:7107"), "203.0.113.0/24");
        // IPv4-compatible (deprecated) addresses are plain IPv6.
        assert_eq!(t("::203.0.113.7"), "::/48");
    }
}
