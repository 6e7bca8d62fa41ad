//! Sender allow-list: which peer addresses may talk to a feed (`allow = ["10.1.0.0/16", ...]`).
//!
//! Checked right after `accept`, before any byte is read. A peer outside the list still gets an
//! answer to its first frame (`AR`, "sender not allowed", with its MSA-2) so the integration team
//! sees why, then the connection is closed; nothing it sends is stored. An empty list allows
//! everyone (loopback-only binds and firewalls are the usual first line).

use std::fmt;
use std::net::IpAddr;

/// One CIDR block (`10.0.0.0/8`, `2001:db8::/32`) or a single address (`192.168.1.20`).
/// IPv4-mapped IPv6 peers (`::ffff:10.1.2.3`, seen on dual-stack sockets) match IPv4 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A malformed allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not an IP address or CIDR block (e.g. 10.1.0.0/16): {reason}")]
pub struct CidrError {
    entry: String,
    reason: &'static str,
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| CidrError {
            entry: s.to_owned(),
            reason,
        };
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err("bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().map_err(|_| err("bad prefix length"))?,
        };
        if prefix > max {
            return Err(err("prefix length too long for the address family"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` lies in this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let bits = usize::from(bits);
    let whole = bits / 8;
    let rest = bits % 8;
    if a.get(..whole) != b.get(..whole) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(whole), b.get(whole)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

/// Whether `ip` may connect under `allow` (empty: everyone).
pub fn allowed(allow: &[Cidr], ip: IpAddr) -> bool {
    allow.is_empty() || allow.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().expect(s)
    }

    #[test]
    fn blocks_and_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().expect(s);
        assert!(c("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("192.168.1.20").contains(ip("192.168.1.20")));
        assert!(!c("192.168.1.20").contains(ip("192.168.1.21")));
        assert!(c("172.16.0.0/12").contains(ip("172.31.255.255")));
        assert!(!c("172.16.0.0/12").contains(ip("172.32.0.0")));
        assert!(c("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(c("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!c("2001:db8::/32").contains(ip("2001:db9::5")));
        assert!(c("127.0.0.1/32").contains(ip("::ffff:127.0.0.1")));
        assert!(!c("::/0").contains(ip("10.0.0.1")), "families do not mix");
        assert!(allowed(&[], ip("1.2.3.4")));
        assert!(!allowed(&[c("10.0.0.0/8")], ip("1.2.3.4")));
    }

    #[test]
    fn bad_entries_are_errors() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "example.org",
            "::1/129",
            "10.0.0.0/x",
        ] {
            let e = bad.parse::<Cidr>().expect_err(bad);
            assert!(e.to_string().contains("CIDR"), "{e}");
        }
        assert_eq!(c("10.1.0.0/16").to_string(), "10.1.0.0/16");
    }
}
