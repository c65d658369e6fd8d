//! Firewall rule values: the one place their text forms are validated and
//! normalised, shared by the config, the store and the admin API.
//!
//! IP, CIDR and country rules are judged on a new connection (L4); a
//! user-agent rule is a regular expression matched against the User-Agent
//! of a request on an L7 route (SPEC §6.2, "L7 policy").

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
        UserAgent => "user_agent",
    }
}

impl RuleKind {
    /// The label (`"ip"`, `"cidr"`, `"country"`, `"user_agent"`).
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
            "user_agent" => Ok(RuleKind::UserAgent),
            other => Err(RuleError::Kind(other.to_string())),
        }
    }
}

/// Longest user-agent pattern accepted, in bytes.
pub const MAX_USER_AGENT_PATTERN: usize = 1024;

/// Most memory one compiled user-agent pattern may take (the `regex`
/// crate's `size_limit`), so a short pattern like `a{1000}{1000}` can't
/// take the server's memory.
pub const USER_AGENT_REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A user-agent rule: the source of a regular expression (the `regex`
/// crate's syntax, a linear-time engine) that compiled within
/// [`USER_AGENT_REGEX_SIZE_LIMIT`]. Its text form is the pattern as given;
/// rules compare by that text.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserAgentPattern(Box<str>);

/// Why a user-agent pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UserAgentError {
    #[error("the pattern is empty (it would match every user agent)")]
    Empty,
    #[error("the pattern is {0} bytes, longer than {MAX_USER_AGENT_PATTERN}")]
    TooLong(usize),
    /// The `regex` crate refused it; its reason, on one line.
    #[error("not a valid regular expression: {0}")]
    Invalid(String),
}

impl UserAgentPattern {
    pub fn parse(text: &str) -> Result<Self, UserAgentError> {
        if text.is_empty() {
            return Err(UserAgentError::Empty);
        }
        if text.len() > MAX_USER_AGENT_PATTERN {
            return Err(UserAgentError::TooLong(text.len()));
        }
        regex::bytes::RegexBuilder::new(text)
            .size_limit(USER_AGENT_REGEX_SIZE_LIMIT)
            .dfa_size_limit(USER_AGENT_REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| UserAgentError::Invalid(regex_reason(&e)))?;
        Ok(UserAgentPattern(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserAgentPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `regex` crate's reason on one line: a syntax error's text is the
/// pattern, a caret and an `error: ...` line; only that last part is kept
/// (the pattern is the caller's to show).
fn regex_reason(error: &regex::Error) -> String {
    match error {
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("error: "))
            .map_or_else(|| text.replace('\n', " "), str::to_string),
        other => other.to_string().replace('\n', " "),
    }
}

/// One blocking rule. Not `Copy`: a user-agent rule holds its pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// A single address; IPv4-mapped IPv6 is stored as IPv4.
    Ip(IpAddr),
    /// A network, host bits cleared (`198.51.100.7/24` → `198.51.100.0/24`).
    Cidr(IpNet),
    Country(CountryCode),
    /// Requests on L7 routes whose User-Agent matches are refused (403);
    /// never part of a connection's decision.
    UserAgent(UserAgentPattern),
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
    #[error(transparent)]
    UserAgent(#[from] UserAgentError),
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
            RuleKind::UserAgent => Ok(Rule::UserAgent(UserAgentPattern::parse(value)?)),
        }
    }

    pub fn kind(&self) -> RuleKind {
        match self {
            Rule::Ip(_) => RuleKind::Ip,
            Rule::Cidr(_) => RuleKind::Cidr,
            Rule::Country(_) => RuleKind::Country,
            Rule::UserAgent(_) => RuleKind::UserAgent,
        }
    }

    /// The normalised text form, as stored and as listed.
    pub fn value(&self) -> String {
        match self {
            Rule::Ip(ip) => ip.to_string(),
            Rule::Cidr(net) => net.to_string(),
            Rule::Country(cc) => cc.to_string(),
            Rule::UserAgent(pattern) => pattern.to_string(),
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
            (RuleKind::UserAgent, ""),
            (RuleKind::UserAgent, "(?i)sqlmap("),
            (RuleKind::UserAgent, "[z-a]"),
            (RuleKind::UserAgent, "a{1000}{1000}"),
        ] {
            assert!(Rule::parse(kind, bad).is_err(), "{kind:?} {bad:?} accepted");
        }
    }

    #[test]
    fn user_agent_rules_keep_their_pattern() {
        let rule = Rule::parse(RuleKind::UserAgent, "(?i)sqlmap").unwrap();
        assert_eq!(rule.kind(), RuleKind::UserAgent);
        assert_eq!(rule.kind().label(), "user_agent");
        assert_eq!(rule.value(), "(?i)sqlmap");
        assert_eq!(rule.to_string(), "user_agent (?i)sqlmap");
        assert_eq!("user_agent".parse::<RuleKind>(), Ok(RuleKind::UserAgent));
        assert_eq!(RuleKind::LABELS, ["ip", "cidr", "country", "user_agent"]);
    }

    #[test]
    fn bad_user_agent_patterns_say_why_on_one_line() {
        let err = UserAgentPattern::parse("(?i)sqlmap(").unwrap_err();
        assert_eq!(err, UserAgentError::Invalid("unclosed group".into()));
        assert_eq!(
            err.to_string(),
            "not a valid regular expression: unclosed group"
        );
        let err = UserAgentPattern::parse("a{1000}{1000}").unwrap_err();
        assert!(matches!(err, UserAgentError::Invalid(_)), "{err:?}");
        assert!(!err.to_string().contains('\n'), "{err}");
        let longest = "a".repeat(MAX_USER_AGENT_PATTERN);
        assert!(UserAgentPattern::parse(&longest).is_ok());
        assert_eq!(
            UserAgentPattern::parse(&format!("{longest}a")),
            Err(UserAgentError::TooLong(MAX_USER_AGENT_PATTERN + 1))
        );
        assert_eq!(UserAgentPattern::parse(""), Err(UserAgentError::Empty));
        assert!(matches!(
            Rule::parse(RuleKind::UserAgent, "("),
            Err(RuleError::UserAgent(UserAgentError::Invalid(_)))
        ));
    }
}
