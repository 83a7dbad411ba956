//! What the systemd watchdog ping vouches for: that each of presence's loops (the Docker event
//! reader, the reconciler, the etcd writer) still comes round.
//!
//! Every loop records a beat each time round and wakes at least every [`BEAT`] when idle;
//! every wait inside a loop is bounded (Docker calls by [`crate::docker::DOCKER_TIMEOUT`], a
//! full list by [`crate::reconcile::FULL_LIST_TIMEOUT`], etcd calls by the writer's operation
//! timeout). So a loop that has not come round for [`STALL`] is stuck — a bug, a deadlock —
//! and the ping is withheld: systemd restarts presence after `WatchdogSec`.
//!
//! A wedged Docker engine or etcd is not a stuck loop: their calls time out, the loops retry,
//! `/healthz` reports the dependency, and the entries stay on the lease. Restarting presence
//! would not mend either, and a restart while Docker is wedged could not list the containers
//! again: the host's entries would expire with the lease, taking live containers out of every
//! proxy (see docs/PRESENCE.md, "Watchdog").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest an idle loop waits before it comes round anyway.
pub const BEAT: Duration = Duration::from_secs(5);

/// A loop that has not come round for this long is stuck.
pub const STALL: Duration = Duration::from_secs(30);

/// presence's loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    Reader = 0,
    Reconciler = 1,
    Writer = 2,
}

impl Loop {
    const ALL: [Loop; 3] = [Loop::Reader, Loop::Reconciler, Loop::Writer];

    /// The loop's name in `PRESENCE_FAILPOINT_STALL`.
    fn key(self) -> &'static str {
        match self {
            Loop::Reader => "reader",
            Loop::Reconciler => "reconciler",
            Loop::Writer => "writer",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Loop::Reader => "Docker event reader",
            Loop::Reconciler => "reconciler",
            Loop::Writer => "etcd writer",
        }
    }
}

/// The last beat of each loop (milliseconds since `origin`; 0: not started yet).
#[derive(Debug)]
pub struct Liveness {
    origin: Instant,
    beats: [AtomicU64; 3],
    /// Whether a stall has been logged (once per stall).
    reported: AtomicBool,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            origin: Instant::now(),
            beats: Default::default(),
            reported: AtomicBool::new(false),
        }
    }
}

impl Liveness {
    /// `l` came round now.
    pub fn beat(&self, l: Loop) {
        let ms = (self.origin.elapsed().as_millis() as u64).max(1);
        self.beats[l as usize].store(ms, Ordering::Relaxed);
    }

    /// The started loops that have not come round within `bound` at `now`, with how long ago
    /// they last did.
    pub fn stalled_at(&self, now: Instant, bound: Duration) -> Vec<(Loop, Duration)> {
        let now_ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        Loop::ALL
            .into_iter()
            .filter_map(|l| {
                let last = self.beats[l as usize].load(Ordering::Relaxed);
                let ago = Duration::from_millis(now_ms.saturating_sub(last));
                (last > 0 && ago > bound).then_some((l, ago))
            })
            .collect()
    }

    /// The watchdog predicate: true while no started loop is stuck. Logs a stall once, naming
    /// the loop, so that the journal says why systemd restarted presence.
    pub fn alive(&self) -> bool {
        let stalled = self.stalled_at(Instant::now(), STALL);
        if stalled.is_empty() {
            self.reported.store(false, Ordering::Relaxed);
            return true;
        }
        if !self.reported.swap(true, Ordering::Relaxed) {
            for (l, ago) in &stalled {
                tracing::error!(
                    "the {} has not come round for {:.0?} (limit {:?}): withholding the watchdog ping, systemd will restart presence",
                    l.name(),
                    ago,
                    STALL
                );
            }
        }
        false
    }
}

/// Test-only fault injection: `PRESENCE_FAILPOINT_STALL=<loop>:<file>` (loop `reader`,
/// `reconciler` or `writer`) makes that loop stop coming round once `<file>` exists — an
/// await that never completes, as a missing timeout or a deadlock would be — so the end-to-end
/// test can prove the watchdog ping stops. Unset, it costs one `Option` check per round.
#[derive(Debug, Clone, Default)]
pub struct Failpoint {
    stall: Option<(String, std::path::PathBuf)>,
}

impl Failpoint {
    pub fn from_env() -> Failpoint {
        let stall = std::env::var("PRESENCE_FAILPOINT_STALL")
            .ok()
            .and_then(|v| {
                let (l, f) = v.split_once(':')?;
                Some((l.to_owned(), f.into()))
            });
        Failpoint { stall }
    }

    /// Never returns once the failpoint for `l` is armed and its file exists.
    pub async fn check(&self, l: Loop) {
        if let Some((name, file)) = &self.stall {
            if name == l.key() && file.exists() {
                tracing::warn!(
                    "failpoint: the {} stops here (PRESENCE_FAILPOINT_STALL)",
                    l.name()
                );
                std::future::pending::<()>().await;
            }
        }
    }
}

/// What each loop carries: the shared beats and the failpoint.
#[derive(Debug, Clone, Default)]
pub struct Pulse {
    pub liveness: std::sync::Arc<Liveness>,
    failpoint: Failpoint,
}

impl Pulse {
    pub fn from_env() -> Pulse {
        Pulse {
            liveness: Default::default(),
            failpoint: Failpoint::from_env(),
        }
    }

    /// `l` comes round: records the beat (and stops here if the test failpoint says so).
    pub async fn round(&self, l: Loop) {
        self.liveness.beat(l);
        self.failpoint.check(l).await;
    }

    /// `l` is alive inside a long piece of work (between two bounded calls).
    pub fn beat(&self, l: Loop) {
        self.liveness.beat(l);
    }
}

/// An interval of [`BEAT`] that skips missed ticks: a loop's wake-up when idle.
pub fn beat_interval() -> tokio::time::Interval {
    let mut i = tokio::time::interval(BEAT);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_counts_only_once_started_and_is_stuck_only_past_the_bound() {
        let l = Liveness::default();
        let t0 = l.origin;
        // Nothing started: nothing stuck, however late.
        assert!(l
            .stalled_at(t0 + Duration::from_secs(100), STALL)
            .is_empty());
        l.beat(Loop::Reader);
        l.beat(Loop::Writer);
        let soon = Instant::now() + Duration::from_secs(29);
        assert!(l.stalled_at(soon, STALL).is_empty());
        let late = Instant::now() + Duration::from_secs(31);
        let stuck: Vec<Loop> = l.stalled_at(late, STALL).into_iter().map(|s| s.0).collect();
        assert_eq!(stuck, vec![Loop::Reader, Loop::Writer]);
        // Beating again clears it.
        l.beat(Loop::Reader);
        l.beat(Loop::Writer);
        assert!(l.stalled_at(Instant::now(), STALL).is_empty());
    }
}
