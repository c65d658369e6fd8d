//! Firewall rule values: the one place their text forms are validated and
//! normalised, shared by the config, the store and the admin API.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// ISO 3166-1 alpha-2 code, stored upper case (format check only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let bytes = text.as_bytes();
        if bytes.len() != 2 || !bytes.iter().all(u8::is_ascii_alphabetic) {
            return Err(RuleError::Country(text.to_string()));
        }
        Ok(CountryCode([
            bytes[0].to_ascii_uppercase(),
            bytes[1].to_ascii_uppercase(),
        ]))
    }

    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII letters by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

crate::labelled_enum! {
    /// What a rule matches on. Its label is the store's `type` column, the
    /// API's and the CLI's rule type, and the metrics' `rule` label.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum RuleKind {
        Ip => "ip",
        Cidr => "cidr",
        Country => "country",
    }
}

impl RuleKind {
    /// The label (`"ip"`, `"cidr"`, `"country"`).
    pub fn as_str(self) -> &'static str {
        self.label()
    }
}

impl FromStr for RuleKind {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, RuleError> {
        match s {
            "ip" => Ok(RuleKind::Ip),
            "cidr" => Ok(RuleKind::Cidr),
            "country" => Ok(RuleKind::Country),
            other => Err(RuleError::Kind(other.to_string())),
        }
    }
}

/// One blocking rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// A single address; IPv4-mapped IPv6 is stored as IPv4.
    Ip(IpAddr),
    /// A network, host bits cleared (`198.51.100.7/24` → `198.51.100.0/24`).
    Cidr(IpNet),
    Country(CountryCode),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("not an IP address: {0:?}")]
    Ip(String),
    #[error("not a CIDR network (like 198.51.100.0/24): {0:?}")]
    Cidr(String),
    #[error("not a two-letter country code: {0:?}")]
    Country(String),
    #[error("unknown rule type {0:?}")]
    Kind(String),
}

impl Rule {
    pub fn parse(kind: RuleKind, value: &str) -> Result<Rule, RuleError> {
        match kind {
            RuleKind::Ip => value
                .parse::<IpAddr>()
                .map(|ip| Rule::Ip(ip.to_canonical()))
                .map_err(|_| RuleError::Ip(value.to_string())),
            RuleKind::Cidr => value
                .parse::<IpNet>()
                .map(|net| Rule::Cidr(net.trunc()))
                .map_err(|_| RuleError::Cidr(value.to_string())),
            RuleKind::Country => CountryCode::parse(value).map(Rule::Country),
        }
    }

    pub fn kind(&self) -> RuleKind {
        match self {
            Rule::Ip(_) => RuleKind::Ip,
            Rule::Cidr(_) => RuleKind::Cidr,
            Rule::Country(_) => RuleKind::Country,
        }
    }

    /// The normalised text form, as stored and as listed.
    pub fn value(&self) -> String {
        match self {
            Rule::Ip(ip) => ip.to_string(),
            Rule::Cidr(net) => net.to_string(),
            Rule::Country(cc) => cc.to_string(),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind().as_str(), self.value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_normalise() {
        assert_eq!(
            Rule::parse(RuleKind::Ip, "::ffff:192.0.2.7")
                .unwrap()
                .value(),
            "192.0.2.7"
        );
        assert_eq!(
            Rule::parse(RuleKind::Cidr, "198.51.100.7/24")
                .unwrap()
                .value(),
            "198.51.100.0/24"
        );
        assert_eq!(Rule::parse(RuleKind::Country, "kp").unwrap().value(), "KP");
    }

    #[test]
    fn bad_rules_are_rejected() {
        for (kind, bad) in [
            (RuleKind::Ip, ""),
            (RuleKind::Ip, "1.2.3"),
            (RuleKind::Ip, "10.0.0.0/8"),
            (RuleKind::Cidr, "10.0.0.0"),
            (RuleKind::Cidr, "10.0.0.0/33"),
            (RuleKind::Cidr, "::/129"),
            (RuleKind::Country, "K"),
            (RuleKind::Country, "KPX"),
            (RuleKind::Country, "K1"),
            (RuleKind::Country, "ÄÖ"),
        ] {
            assert!(Rule::parse(kind, bad).is_err(), "{kind:?} {bad:?} accepted");
        }
    }
}
