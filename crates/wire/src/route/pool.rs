//! A route's backend pool settings (SPEC §6.3): its backends, how a
//! connection picks one, and the active health check. Values only: the
//! live state (counters, health) is the server's (`mc_proxy::balance`).
//!
//! The rules between these settings are checked here, once, for the config
//! and the admin API alike ([`PoolSettings::into_pool`]); each side parses
//! its own field formats and words the error its own way.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use super::Backend;

/// At most this many backends per route.
pub const MAX_BACKENDS: usize = 64;
/// Failures in a row that mark a backend down (`health_fall`).
pub const DEFAULT_HEALTH_FALL: u32 = 3;
/// Successes in a row that mark it up again (`health_rise`).
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// The largest `health_fall` / `health_rise`.
pub const MAX_HEALTH_COUNT: u32 = 100;
/// The shortest `health_interval`.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
/// The longest `health_interval`.
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(3600);
/// The longest `health_path`, in bytes.
pub const MAX_HEALTH_PATH_LEN: usize = 1024;

/// A route's backends: never empty, no duplicates, at most
/// [`MAX_BACKENDS`]. Cheap to clone. The first is what a single `backend`
/// field shows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Backends(Arc<[Backend]>);

impl Backends {
    /// A pool of one.
    pub fn one(backend: Backend) -> Self {
        Backends(Arc::new([backend]))
    }

    /// Checks the list: not empty, not too long, no backend twice.
    pub fn new(list: Vec<Backend>) -> Result<Self, PoolError> {
        if list.is_empty() {
            return Err(PoolError::NoBackend);
        }
        if list.len() > MAX_BACKENDS {
            return Err(PoolError::TooManyBackends(list.len()));
        }
        for (i, backend) in list.iter().enumerate() {
            if list[..i].contains(backend) {
                return Err(PoolError::DuplicateBackend(backend.clone()));
            }
        }
        Ok(Backends(list.into()))
    }

    /// The first backend (the one a single `backend` field names).
    pub fn first(&self) -> &Backend {
        &self.0[0]
    }
}

impl Deref for Backends {
    type Target = [Backend];
    fn deref(&self) -> &[Backend] {
        &self.0
    }
}

impl fmt::Display for Backends {
    /// Comma-separated, in order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, backend) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{backend}")?;
        }
        Ok(())
    }
}

crate::labelled_enum! {
    /// How a connection (or, on an L7 route, a request) picks a backend.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub enum Balance {
        /// Each in turn.
        #[default]
        RoundRobin => "round_robin",
        /// The one with the fewest open connections (ties: each in turn).
        LeastConnections => "least_connections",
    }
}

impl Balance {
    /// `"round_robin"` or `"least_connections"`; the empty string is the
    /// default (the admin API's unset field).
    pub fn parse(text: &str) -> Option<Self> {
        if text.is_empty() {
            return Some(Balance::default());
        }
        [Self::RoundRobin, Self::LeastConnections]
            .into_iter()
            .find(|balance| balance.label() == text)
    }
}

/// A route's active health check: a TCP connect, or on an L7 route with a
/// `path` a `GET path` expecting 2xx/3xx, every `interval`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub interval: Duration,
    /// L7 only; `None`: a TCP connect.
    pub path: Option<Box<str>>,
    /// Failures in a row that mark a backend down.
    pub fall: u32,
    /// Successes in a row that mark it up.
    pub rise: u32,
}

crate::labelled_enum! {
    /// A pool setting. Its label is the TOML key and, after `route.`, the
    /// admin API field.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum PoolKey {
        Backend => "backend",
        Backends => "backends",
        Balance => "balance",
        HealthInterval => "health_interval",
        HealthPath => "health_path",
        HealthFall => "health_fall",
        HealthRise => "health_rise",
    }
}

/// Why pool settings are refused. [`PoolError::key`] names the setting at
/// fault; the text says why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("a route needs a backend (backend or backends)")]
    NoBackend,
    #[error("set backend or backends, not both")]
    BackendAndBackends,
    #[error("backend must be empty or equal to backends[0]")]
    BackendNotFirst,
    #[error("{0} backends; at most {MAX_BACKENDS}")]
    TooManyBackends(usize),
    #[error("{0} is listed twice")]
    DuplicateBackend(Backend),
    #[error("health_path is for l7 routes (an l4 route's check is a TCP connect)")]
    PathOnL4,
    #[error("{} needs health_interval", .0.label())]
    NeedsInterval(PoolKey),
    #[error("health_interval must be whole milliseconds from 100ms to 1h")]
    IntervalOutOfRange,
    #[error("{} must be from 1 to {MAX_HEALTH_COUNT}", .0.label())]
    CountOutOfRange(PoolKey),
    #[error("health_path must start with '/' and be at most {MAX_HEALTH_PATH_LEN} bytes of visible ASCII (a path and optional query)")]
    BadPath,
}

impl PoolError {
    /// The setting at fault.
    pub fn key(&self) -> PoolKey {
        match self {
            PoolError::NoBackend | PoolError::BackendAndBackends | PoolError::BackendNotFirst => {
                PoolKey::Backend
            }
            PoolError::TooManyBackends(_) | PoolError::DuplicateBackend(_) => PoolKey::Backends,
            PoolError::PathOnL4 | PoolError::BadPath => PoolKey::HealthPath,
            PoolError::IntervalOutOfRange => PoolKey::HealthInterval,
            PoolError::NeedsInterval(key) | PoolError::CountOutOfRange(key) => *key,
        }
    }
}

/// A route's pool settings as given (each `None` or empty when not set),
/// each already parsed: the one place the rules between them are checked.
#[derive(Clone, Debug, Default)]
pub struct PoolSettings {
    /// `backend`.
    pub backend: Option<Backend>,
    /// `backends` (empty: not set).
    pub backends: Vec<Backend>,
    pub balance: Option<Balance>,
    pub health_interval: Option<Duration>,
    pub health_path: Option<String>,
    pub health_fall: Option<u32>,
    pub health_rise: Option<u32>,
}

/// Checked pool settings, as a [`super::Target`] holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub backends: Backends,
    pub balance: Balance,
    pub health: Option<HealthCheck>,
}

impl PoolSettings {
    /// The checked pool. `backend` and `backends` may both be set only
    /// when `allow_both` (the admin API, where `backend` may repeat
    /// `backends[0]`); `health_path` only on an L7 route.
    pub fn into_pool(self, l7: bool, allow_both: bool) -> Result<Pool, PoolError> {
        let backends = match (self.backend, self.backends.is_empty()) {
            (None, true) => return Err(PoolError::NoBackend),
            (Some(one), true) => Backends::one(one),
            (None, false) => Backends::new(self.backends)?,
            (Some(one), false) => {
                if !allow_both {
                    return Err(PoolError::BackendAndBackends);
                }
                if self.backends[0] != one {
                    return Err(PoolError::BackendNotFirst);
                }
                Backends::new(self.backends)?
            }
        };
        if self.health_path.is_some() && !l7 {
            return Err(PoolError::PathOnL4);
        }
        let Some(interval) = self.health_interval else {
            let keys = [
                (PoolKey::HealthPath, self.health_path.is_some()),
                (PoolKey::HealthFall, self.health_fall.is_some()),
                (PoolKey::HealthRise, self.health_rise.is_some()),
            ];
            if let Some((key, _)) = keys.into_iter().find(|(_, set)| *set) {
                return Err(PoolError::NeedsInterval(key));
            }
            return Ok(Pool {
                backends,
                balance: self.balance.unwrap_or_default(),
                health: None,
            });
        };
        let whole_ms = interval.subsec_nanos() % 1_000_000 == 0;
        if !whole_ms || !(MIN_HEALTH_INTERVAL..=MAX_HEALTH_INTERVAL).contains(&interval) {
            return Err(PoolError::IntervalOutOfRange);
        }
        let count = |value: Option<u32>, default: u32, key: PoolKey| match value {
            None => Ok(default),
            Some(n) if (1..=MAX_HEALTH_COUNT).contains(&n) => Ok(n),
            Some(_) => Err(PoolError::CountOutOfRange(key)),
        };
        let fall = count(self.health_fall, DEFAULT_HEALTH_FALL, PoolKey::HealthFall)?;
        let rise = count(self.health_rise, DEFAULT_HEALTH_RISE, PoolKey::HealthRise)?;
        let path = match self.health_path {
            None => None,
            Some(path) => Some(check_path(path)?),
        };
        Ok(Pool {
            backends,
            balance: self.balance.unwrap_or_default(),
            health: Some(HealthCheck {
                interval,
                path,
                fall,
                rise,
            }),
        })
    }
}

/// A path and optional query, as the request line carries it.
fn check_path(path: String) -> Result<Box<str>, PoolError> {
    let visible = path
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b'#');
    if !path.starts_with('/') || path.len() > MAX_HEALTH_PATH_LEN || !visible {
        return Err(PoolError::BadPath);
    }
    if path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(PoolError::BadPath);
    }
    Ok(path.into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(text: &str) -> Backend {
        Backend::parse(text).unwrap()
    }

    fn settings(backends: &[&str]) -> PoolSettings {
        PoolSettings {
            backends: backends.iter().map(|t| b(t)).collect(),
            ..PoolSettings::default()
        }
    }

    #[test]
    fn one_backend_or_a_list() {
        let one = PoolSettings {
            backend: Some(b("127.0.0.1:1")),
            ..PoolSettings::default()
        };
        let pool = one.into_pool(false, false).unwrap();
        assert_eq!(pool.backends.len(), 1);
        assert_eq!(pool.balance, Balance::RoundRobin);
        assert_eq!(pool.health, None);

        let list = settings(&["127.0.0.1:1", "127.0.0.1:2"]);
        let pool = list.into_pool(false, false).unwrap();
        assert_eq!(pool.backends.to_string(), "127.0.0.1:1,127.0.0.1:2");
        assert_eq!(pool.backends.first(), &b("127.0.0.1:1"));
    }

    #[test]
    fn backend_and_backends_follow_the_rules() {
        let both = |backend: &str| PoolSettings {
            backend: Some(b(backend)),
            ..settings(&["127.0.0.1:1", "127.0.0.1:2"])
        };
        assert_eq!(
            both("127.0.0.1:1").into_pool(false, false).unwrap_err(),
            PoolError::BackendAndBackends
        );
        assert!(both("127.0.0.1:1").into_pool(false, true).is_ok());
        let err = both("127.0.0.1:2").into_pool(false, true).unwrap_err();
        assert_eq!(err, PoolError::BackendNotFirst);
        assert_eq!(err.key(), PoolKey::Backend);
        assert_eq!(
            PoolSettings::default().into_pool(false, true).unwrap_err(),
            PoolError::NoBackend
        );
        let err = settings(&["127.0.0.1:1", "127.0.0.1:1"])
            .into_pool(false, false)
            .unwrap_err();
        assert_eq!(err, PoolError::DuplicateBackend(b("127.0.0.1:1")));
        assert_eq!(err.key(), PoolKey::Backends);
        let many: Vec<String> = (1..=65).map(|p| format!("127.0.0.1:{p}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let err = settings(&many).into_pool(false, false).unwrap_err();
        assert_eq!(err, PoolError::TooManyBackends(65));
    }

    #[test]
    fn health_settings_follow_the_rules() {
        let with = |f: &dyn Fn(&mut PoolSettings)| {
            let mut s = settings(&["127.0.0.1:1"]);
            f(&mut s);
            s
        };
        let pool = with(&|s| s.health_interval = Some(Duration::from_secs(5)))
            .into_pool(false, false)
            .unwrap();
        assert_eq!(
            pool.health,
            Some(HealthCheck {
                interval: Duration::from_secs(5),
                path: None,
                fall: 3,
                rise: 2
            })
        );
        let err = with(&|s| s.health_fall = Some(2))
            .into_pool(false, false)
            .unwrap_err();
        assert_eq!(err, PoolError::NeedsInterval(PoolKey::HealthFall));
        assert_eq!(err.key(), PoolKey::HealthFall);
        let err = with(&|s| {
            s.health_interval = Some(Duration::from_secs(1));
            s.health_rise = Some(0);
        })
        .into_pool(false, false)
        .unwrap_err();
        assert_eq!(err.key(), PoolKey::HealthRise);
        let err = with(&|s| s.health_interval = Some(Duration::from_millis(10)))
            .into_pool(false, false)
            .unwrap_err();
        assert_eq!(err, PoolError::IntervalOutOfRange);
        let err = with(&|s| s.health_interval = Some(Duration::from_micros(100_500)))
            .into_pool(false, false)
            .unwrap_err();
        assert_eq!(
            err,
            PoolError::IntervalOutOfRange,
            "the store keeps whole ms"
        );
        let path = |p: &'static str| {
            with(&|s| {
                s.health_interval = Some(Duration::from_secs(1));
                s.health_path = Some(p.into());
            })
        };
        assert_eq!(
            path("/healthz").into_pool(false, false).unwrap_err(),
            PoolError::PathOnL4
        );
        let pool = path("/healthz?full=1").into_pool(true, false).unwrap();
        assert_eq!(
            pool.health.unwrap().path.as_deref(),
            Some("/healthz?full=1")
        );
        for bad in ["healthz", "/a b", "/a\r\nX: y", "/#frag", "/é"] {
            let err = path(bad).into_pool(true, false).unwrap_err();
            assert_eq!(err, PoolError::BadPath, "{bad:?}");
        }
    }

    #[test]
    fn balance_labels_parse() {
        assert_eq!(Balance::parse(""), Some(Balance::RoundRobin));
        assert_eq!(
            Balance::parse("least_connections"),
            Some(Balance::LeastConnections)
        );
        assert_eq!(Balance::parse("random"), None);
    }
}
