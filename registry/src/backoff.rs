//! Jittered, capped exponential backoff, reset only after a healthy period so a flapping
//! dependency cannot drive a tight retry loop.

use std::time::{Duration, Instant};

/// Exponential backoff with "equal jitter": each delay is uniformly drawn from
/// `[d/2, d]` where `d` doubles from `min` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    healthy_after: Duration,
    healthy_since: Option<Instant>,
}

impl Backoff {
    /// A backoff from `min` to `max`; it resets once the caller reports a healthy period
    /// of at least `healthy_after` (see [`Backoff::success`]).
    pub fn new(min: Duration, max: Duration, healthy_after: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
            healthy_after,
            healthy_since: None,
        }
    }

    /// The delay before the next attempt. Ends any healthy period: if it lasted at least
    /// `healthy_after`, the sequence starts again from `min`.
    pub fn next_delay(&mut self) -> Duration {
        if let Some(since) = self.healthy_since.take() {
            if since.elapsed() >= self.healthy_after {
                self.current = self.min;
            }
        }
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        let jitter_ns = fastrand::u64(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_ns)
    }

    /// Reports that the guarded operation is working (from now on).
    pub fn success(&mut self) {
        if self.healthy_since.is_none() {
            self.healthy_since = Some(Instant::now());
        }
    }

    /// Starts the sequence again from `min` at once.
    pub fn reset(&mut self) {
        self.current = self.min;
        self.healthy_since = None;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_with_jitter() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(5),
        );
        let mut nominal = Duration::from_millis(100);
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= nominal / 2 && d <= nominal,
                "{d:?} not in [{:?}, {nominal:?}]",
                nominal / 2
            );
            nominal = (nominal * 2).min(Duration::from_secs(1));
        }
    }

    #[test]
    fn short_success_does_not_reset() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        for _ in 0..5 {
            b.next_delay();
        }
        b.success();
        // the healthy period was far shorter than 60 s: the next delay keeps growing
        assert!(b.next_delay() >= Duration::from_millis(1600));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
