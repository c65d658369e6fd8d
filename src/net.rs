//! What every accept loop shares (the proxy's listeners and the admin API's):
//! the back-off after an `accept` that failed for lack of resources.

use std::time::Duration;

/// The next wait after an `accept` that failed for lack of resources
/// (EMFILE, ENFILE, ENOBUFS, ENOMEM): 10 ms, doubling up to 1 s. Shared by the
/// proxy's listeners and the admin API's, so neither ever spins.
pub(crate) fn next_accept_backoff(previous: Duration) -> Duration {
    (previous * 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
}
