//! Where events may be sent, and which targets may see secrets.
//!
//! A producer chooses `meta.url`. `TARGET_ALLOWLIST` bounds which hosts that may name
//! (besides the default target's host); `TARGET_DENYLIST` (link-local and the cloud
//! metadata addresses by default) is never delivered to, checked on IP literals here and
//! on every resolved address by [`DenyingResolver`], so a name that resolves to a denied
//! address is refused too. `TARGET_HEADERS` and webhook signatures go only to trusted
//! hosts: the default target's and the allowlisted ones, never to any host a producer
//! names.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::{Error, Result};

/// An IP network.
#[derive(Debug, Clone, PartialEq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self { net: ip, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv6 address that carries an IPv4 one (mapped, compatible, NAT64) is checked
        // as both.
        if let IpAddr::V6(v6) = ip {
            if let Some(v4) = embedded_ipv4(v6) {
                if self.contains_exact(IpAddr::V4(v4)) {
                    return true;
                }
            }
        }
        self.contains_exact(ip)
    }

    fn contains_exact(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`) IPv6 address.
fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., a, b, c, d] = v6.octets();
        return Some(std::net::Ipv4Addr::new(a, b, c, d));
    }
    // `to_ipv4` takes mapped and compatible forms; `::` and `::1` are not IPv4.
    v6.to_ipv4().filter(|_| !v6.is_loopback() && !v6.is_unspecified())
}

#[derive(Debug, Clone, PartialEq)]
enum Allow {
    Host(String),
    /// `*.example.com`: any subdomain.
    Suffix(String),
    Net(Cidr),
}

/// Why an event's target is refused (its dead-letter reason).
pub const NOT_ALLOWED: &str = "target_not_allowed";
pub const DENIED: &str = "target_denied";

#[derive(Debug, Clone)]
pub struct TargetPolicy {
    any: bool,
    allow: Vec<Allow>,
    deny: Arc<Vec<Cidr>>,
    /// The default target's scheme, host and port: trusted with secrets.
    default_host: Option<String>,
    default_name: Option<String>,
}

impl TargetPolicy {
    pub fn parse(allowlist: &str, denylist: &str, default_uri: &str) -> Result<Self> {
        let mut any = false;
        let mut allow = Vec::new();
        for item in allowlist.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let item = item.to_ascii_lowercase();
            if item == "*" {
                any = true;
            } else if let Some(c) = Cidr::parse(&item) {
                allow.push(Allow::Net(c));
            } else if let Some(suffix) = item.strip_prefix("*.") {
                allow.push(Allow::Suffix(format!(".{suffix}")));
            } else if item.contains('/') || item.contains(':') || item.contains('*') {
                return Err(Error::Config {
                    var: "TARGET_ALLOWLIST",
                    msg: format!("{item:?} is neither a host name, *.domain, an IP address nor a CIDR"),
                });
            } else {
                allow.push(Allow::Host(item));
            }
        }
        let mut deny = Vec::new();
        for item in denylist.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            deny.push(Cidr::parse(item).ok_or_else(|| Error::Config {
                var: "TARGET_DENYLIST",
                msg: format!("{item:?} is not an IP address or CIDR"),
            })?);
        }
        let default = reqwest::Url::parse(&default_uri.replace("[EVENT_TYPE]", "x")).ok();
        let default_host = default.as_ref().map(crate::delivery::host_key);
        let default_name = default.as_ref().and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        let policy = Self { any, allow, deny: Arc::new(deny), default_host, default_name };
        if let Some(u) = &default {
            if policy.check(u) == Err(DENIED) {
                return Err(Error::Config {
                    var: "TARGET_DENYLIST",
                    msg: format!("DEFAULT_WORKER_URI's address {} is denied", u.host_str().unwrap_or("")),
                });
            }
        }
        Ok(policy)
    }

    pub fn is_denied(&self, ip: IpAddr) -> bool {
        self.deny.iter().any(|c| c.contains(ip))
    }

    fn allowlisted(&self, host: &str) -> bool {
        let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        self.allow.iter().any(|a| match a {
            Allow::Host(h) => h == host,
            Allow::Suffix(s) => host.ends_with(s.as_str()),
            Allow::Net(c) => ip.is_some_and(|ip| c.contains(ip)),
        })
    }

    /// May an event go to `url`, and may that host see secrets? `Err` is the dead-letter reason.
    pub fn check(&self, url: &reqwest::Url) -> std::result::Result<bool, &'static str> {
        let host = url.host_str().unwrap_or("").to_ascii_lowercase();
        let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        if literal.is_some_and(|ip| self.is_denied(ip)) {
            return Err(DENIED);
        }
        // Secrets go to the default target itself (same scheme, host and port: not in
        // clear text to an http:// twin, nor to another port of that host).
        let is_default = self.default_host.as_deref() == Some(crate::delivery::host_key(url).as_str());
        let default_name = self.default_name.as_deref() == Some(host.as_str());
        let listed = self.allowlisted(&host);
        if !(default_name || listed || self.any) {
            return Err(NOT_ALLOWED);
        }
        Ok(is_default || listed)
    }

    /// The resolver that keeps denied addresses out of every connection.
    pub fn resolver(&self) -> Arc<DenyingResolver> {
        Arc::new(DenyingResolver { deny: self.deny.clone() })
    }
}

/// A name resolved only to denied addresses.
#[derive(Debug)]
pub struct DeniedAddress(pub String);

impl std::fmt::Display for DeniedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} resolves only to denied addresses (TARGET_DENYLIST)", self.0)
    }
}

impl std::error::Error for DeniedAddress {}

/// The system resolver, with denied addresses removed from every answer.
pub struct DenyingResolver {
    deny: Arc<Vec<Cidr>>,
}

impl reqwest::dns::Resolve for DenyingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let deny = self.deny.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                addrs.iter().copied().filter(|a| !deny.iter().any(|c| c.contains(a.ip()))).collect();
            if allowed.is_empty() && !addrs.is_empty() {
                return Err(Box::new(DeniedAddress(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether an error (or any error it came from) is a denied address.
pub fn is_denied_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<DeniedAddress>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY: &str = "169.254.0.0/16,fe80::/10,100.100.100.200/32,fd00:ec2::254/128";

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn networks() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()) && !c.contains("10.2.0.1".parse().unwrap()));
        assert!(Cidr::parse("169.254.169.254").unwrap().contains("::ffff:169.254.169.254".parse().unwrap()));
        assert!(Cidr::parse("fe80::/10").unwrap().contains("fe80::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none() && Cidr::parse("x").is_none());
    }

    #[test]
    fn metadata_addresses_are_denied_and_secrets_stay_with_trusted_hosts() {
        let open = TargetPolicy::parse("*", DENY, "http://receiver:8080/[EVENT_TYPE]").unwrap();
        assert_eq!(open.check(&url("http://169.254.169.254/latest/meta-data")), Err(DENIED));
        assert_eq!(open.check(&url("http://[fd00:ec2::254]/")), Err(DENIED));
        assert_eq!(open.check(&url("http://receiver:8080/x")), Ok(true), "the default host sees secrets");
        assert_eq!(open.check(&url("http://receiver:9999/x")), Ok(false), "not another port of it");
        assert_eq!(open.check(&url("https://receiver:8080/x")), Ok(false), "nor another scheme");
        assert_eq!(open.check(&url("http://[::ffff:169.254.169.254]/")), Err(DENIED));
        assert_eq!(open.check(&url("http://[64:ff9b::a9fe:a9fe]/")), Err(DENIED), "NAT64 form of 169.254.169.254");
        assert!(TargetPolicy::parse("*", DENY, "http://169.254.1.1/x").is_err(), "a denied default target");
        assert_eq!(open.check(&url("http://elsewhere/x")), Ok(false), "any host allowed, without secrets");

        let closed =
            TargetPolicy::parse("hooks.example.com, *.partner.io, 10.0.0.0/8", DENY, "http://receiver/x").unwrap();
        assert_eq!(closed.check(&url("http://elsewhere/x")), Err(NOT_ALLOWED));
        assert_eq!(closed.check(&url("https://hooks.example.com/a")), Ok(true));
        assert_eq!(closed.check(&url("https://a.partner.io/a")), Ok(true));
        assert_eq!(closed.check(&url("https://partner.io.evil.com/a")), Err(NOT_ALLOWED));
        assert_eq!(closed.check(&url("http://10.2.3.4:9/a")), Ok(true));
        assert_eq!(closed.check(&url("http://receiver/y")), Ok(true));
        assert!(TargetPolicy::parse("http://x/", DENY, "http://r/").is_err());
        assert!(TargetPolicy::parse("*", "not-an-ip", "http://r/").is_err());
    }

    #[tokio::test]
    async fn names_resolving_to_denied_addresses_are_refused() {
        use reqwest::dns::Resolve;
        let deny = TargetPolicy::parse("*", "127.0.0.0/8,::1/128", "http://r/").unwrap().resolver();
        let err = match deny.resolve("localhost".parse().unwrap()).await {
            Err(e) => e,
            Ok(a) => panic!("localhost resolved to {:?}", a.collect::<Vec<_>>()),
        };
        assert!(is_denied_error(err.as_ref()), "{err}");
        let open = TargetPolicy::parse("*", DENY, "http://r/").unwrap().resolver();
        assert!(open.resolve("localhost".parse().unwrap()).await.is_ok());
    }
}
