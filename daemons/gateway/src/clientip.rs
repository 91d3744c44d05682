//! Who the client is, for rate limits: the TCP peer, or — behind reverse proxies we were
//! told to trust — the right-most `X-Forwarded-For` address that is not one of them.
//!
//! Why right-most: each proxy *appends* the address it received the request from, so
//! the entries a trusted proxy wrote are at the right end, and everything to the left of
//! the first untrusted entry was sent by the client and can say anything. Taking the
//! left-most entry (as the gateway once did) let any client pick its own rate-limit
//! bucket with one header.

use std::net::IpAddr;

use ipnet::IpNet;

/// The configured `trusted_proxies`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Parses addresses (`10.0.0.1`, `::1`) and CIDR blocks (`10.0.0.0/8`).
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let nets = list
            .iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{s}` is not an IP address or CIDR block"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies { nets })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client address of a request from `peer` carrying these `X-Forwarded-For`
    /// header values (in order of appearance).
    pub fn client<'a>(&self, peer: IpAddr, forwarded: impl Iterator<Item = &'a str>) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let hops: Vec<&str> = forwarded.flat_map(|v| v.split(',')).collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            // A hop that does not parse was not written by a proxy we trust (they write
            // addresses); the last trusted address is the best we know.
            let Ok(ip) = hop.trim().parse::<IpAddr>().map(canonical) else {
                return client;
            };
            client = ip;
            if !self.contains(ip) {
                return ip;
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`) as IPv4, so one client has one form.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4([0, 0, 0, 0].into()))
    }

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .unwrap_or_default()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_the_header_says() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            t.client(ip("198.51.100.9"), ["1.2.3.4"].into_iter()),
            ip("198.51.100.9")
        );
        assert_eq!(
            TrustedProxies::default().client(ip("198.51.100.9"), ["1.2.3.4"].into_iter()),
            ip("198.51.100.9")
        );
    }

    #[test]
    fn right_most_untrusted_hop_wins_over_a_spoofed_left_most() {
        let t = trusted(&["10.0.0.0/8", "192.0.2.1"]);
        // The client sent "X-Forwarded-For: 6.6.6.6"; two trusted proxies appended.
        let h = ["6.6.6.6, 203.0.113.5, 10.1.1.1"];
        assert_eq!(t.client(ip("192.0.2.1"), h.into_iter()), ip("203.0.113.5"));
        // The same across several header lines.
        let h = ["6.6.6.6", "203.0.113.5", "10.1.1.1"];
        assert_eq!(t.client(ip("10.9.9.9"), h.into_iter()), ip("203.0.113.5"));
    }

    #[test]
    fn garbage_and_all_trusted_chains() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            t.client(ip("10.0.0.1"), ["nonsense, 10.0.0.2"].into_iter()),
            ip("10.0.0.2")
        );
        assert_eq!(
            t.client(ip("10.0.0.1"), ["10.0.0.3, 10.0.0.2"].into_iter()),
            ip("10.0.0.3")
        );
        assert_eq!(t.client(ip("10.0.0.1"), std::iter::empty()), ip("10.0.0.1"));
        assert_eq!(
            t.client(ip("::ffff:10.0.0.1"), ["2001:db8::7"].into_iter()),
            ip("2001:db8::7")
        );
    }

    #[test]
    fn parse_errors_name_the_entry() {
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["proxy.example".into()]).is_err());
        assert!(TrustedProxies::parse(&["::1".into(), "10.0.0.0/8".into()]).is_ok());
    }
}
