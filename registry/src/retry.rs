//! Retrying a dependency that is away, one way everywhere: jittered capped backoff between
//! attempts ([`Backoff`]), one warning when a run of failures starts, debug lines while it
//! lasts, one info line when it ends. A loop that retries owns a [`Retry`] and reports each
//! attempt's outcome; the helper sleeps and logs.

use std::fmt::Display;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::backoff::Backoff;

/// The retry state of one dependency (`what`, as log lines name it: "etcd", "the Docker
/// engine").
#[derive(Debug)]
pub struct Retry {
    what: &'static str,
    backoff: Backoff,
    failures: u64,
}

impl Retry {
    /// A retry of `what` with `backoff`.
    pub fn new(what: &'static str, backoff: Backoff) -> Retry {
        Retry {
            what,
            backoff,
            failures: 0,
        }
    }

    /// Reports a failed attempt (one warning for the first of a run, debug after) and returns
    /// the delay before the next attempt.
    pub fn failed(&mut self, error: &dyn Display) -> Duration {
        self.failures += 1;
        if self.failures == 1 {
            warn!(%error, "cannot reach {}; retrying", self.what);
        } else {
            debug!(%error, failures = self.failures, "still cannot reach {}", self.what);
        }
        self.backoff.next_delay()
    }

    /// [`Retry::failed`] for a failure the caller has logged itself (a lost stream, said once
    /// at warn with its reason): counted, so the failures that follow log at debug and the end
    /// of the run logs once; returns the delay before the next attempt.
    pub fn failed_logged(&mut self) -> Duration {
        self.failures += 1;
        self.backoff.next_delay()
    }

    /// [`Retry::failed`], then sleeps the delay.
    pub async fn failed_then_wait(&mut self, error: &dyn Display) {
        let delay = self.failed(error);
        tokio::time::sleep(delay).await;
    }

    /// Reports a successful attempt: ends a run of failures (one info line) and starts the
    /// backoff's healthy period.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(failures = self.failures, "{} reachable again", self.what);
            self.failures = 0;
        }
        self.backoff.success();
    }

    /// Failures in the current run (0: the last attempt succeeded, or none was made).
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delays_grow_to_the_cap_and_a_success_ends_the_run() {
        let mut r = Retry::new(
            "thing",
            Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(1),
                Duration::from_secs(5),
            ),
        );
        let delays: Vec<Duration> = (0..8).map(|_| r.failed(&"down")).collect();
        assert_eq!(r.failures(), 8);
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(500), "{delays:?}");
        let t0 = tokio::time::Instant::now();
        r.failed_then_wait(&"down").await;
        assert!(t0.elapsed() >= Duration::from_millis(500));
        r.succeeded();
        assert_eq!(r.failures(), 0);
    }

    #[test]
    fn a_failure_logged_by_the_caller_counts_in_the_run() {
        let mut r = Retry::new(
            "thing",
            Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(1),
                Duration::from_secs(5),
            ),
        );
        let first = r.failed_logged();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        assert_eq!(r.failures(), 1);
        r.failed(&"down");
        assert_eq!(r.failures(), 2);
        r.succeeded();
        assert_eq!(r.failures(), 0);
    }
}
