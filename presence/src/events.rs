//! The Docker event reader: a small state machine that subscribes, reads, and on the end of the
//! stream re-subscribes with `since=<last event time>`, dropping replayed duplicates.
//!
//! It never waits on anything but Docker: every event goes into an unbounded channel to the
//! reconciler (Docker drops subscribers that fall behind). After every (re)subscription it sends
//! [`ReaderMsg::Subscribed`], on which the reconciler lists all containers, so whatever happened
//! while the stream was down is reconciled from a full list.
//!
//! Subscribing before listing: the first subscription asks for events since one second before
//! start, and every later one since the last event seen. Docker replays buffered events from that
//! time, so no event between "subscribe" and "list" can be missed even if the daemon registers
//! the subscription only after the listing started.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_registry::backoff::Backoff;
use flotilla_registry::retry::Retry;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::docker::{bounded, DockerError};
use crate::liveness::{beat_interval, Loop, Pulse};

/// A container event as presence needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// Full container id.
    pub id: String,
    /// Docker's action: `start`, `kill`, `health_status: healthy`, …
    pub action: String,
    /// Docker's time of the event, nanoseconds since the epoch.
    pub time_nano: i64,
    /// Actor attributes (labels, `name`, `signal` for `kill`, …).
    pub attributes: HashMap<String, String>,
}

/// What an event means for registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Inspect the container and register what it announces.
    Register,
    /// Deregister at once, without asking Docker. `draining` is true when the container is still
    /// running and about to stop (`kill`, `stop`): it stays deregistered until it starts again.
    Deregister { draining: bool },
    /// A `kill` whose signal does not stop the container (e.g. SIGHUP to reload): nothing to do,
    /// unless the signal is the container's own stop signal.
    KillSignal,
    /// Nothing to do.
    Ignore,
}

impl ContainerEvent {
    /// The metric label for the action (`health_status: healthy` → `health_status_healthy`).
    pub fn action_label(&self) -> String {
        let base: String = self
            .action
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        // exec_create: <cmd> → exec_create (the command is unbounded cardinality).
        if base.starts_with("exec_") {
            return base.split('_').take(2).collect::<Vec<_>>().join("_");
        }
        base.split('_')
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("_")
    }

    /// Classifies the action.
    pub fn effect(&self) -> Effect {
        let action = self.action.as_str();
        match action {
            "start" | "unpause" | "restart" => Effect::Register,
            "stop" => Effect::Deregister { draining: true },
            "kill" => Effect::KillSignal,
            "die" | "pause" | "destroy" | "oom" => Effect::Deregister { draining: false },
            _ => match action.strip_prefix("health_status") {
                Some(rest) => match rest.trim_start_matches(':').trim() {
                    "healthy" => Effect::Register,
                    "unhealthy" => Effect::Deregister { draining: false },
                    // "starting" or an attribute-only form: look at the container.
                    _ => Effect::Register,
                },
                None => Effect::Ignore,
            },
        }
    }

    /// The signal number of a `kill` event, if given (`15`, or `SIGTERM`/`TERM` by newer engines).
    pub fn signal(&self) -> Option<i32> {
        self.attributes.get("signal").and_then(|s| signal_number(s))
    }
}

/// Parses `15`, `SIGTERM` or `TERM` into a signal number (Linux numbering).
pub fn signal_number(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Some(n);
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "TRAP" => 5,
        "ABRT" | "IOT" => 6,
        "BUS" => 7,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "STKFLT" => 16,
        "CHLD" => 17,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "TTIN" => 21,
        "TTOU" => 22,
        "URG" => 23,
        "XCPU" => 24,
        "XFSZ" => 25,
        "VTALRM" => 26,
        "PROF" => 27,
        "WINCH" => 28,
        "IO" | "POLL" => 29,
        "PWR" => 30,
        "SYS" => 31,
        _ => return None,
    })
}

/// Whether a `kill` with `signal` stops a container whose stop signal is `stop_signal`:
/// SIGKILL, SIGTERM, SIGINT, SIGQUIT always count, and so does the container's own stop signal
/// (Apache's SIGWINCH, say). Anything else (SIGHUP, SIGUSR1, …) is taken as a reload and changes
/// nothing. A `kill` without a signal attribute (Podman's: its events never name the signal)
/// changes nothing either: taken as stopping, a reload (`podman kill -s HUP`) would keep the
/// container deregistered until it next starts; a kill that does stop it is followed by `die`.
pub fn kill_stops(signal: Option<i32>, stop_signal: Option<&str>) -> bool {
    let Some(sig) = signal else { return false };
    matches!(sig, 2 | 3 | 9 | 15) || stop_signal.and_then(signal_number) == Some(sig)
}

/// Drops events seen before: after a reconnect with `since=T`, Docker replays the events at and
/// after `T`, some of which were already handled. Live events are never dropped for being
/// older than the newest one (Docker may publish two events slightly out of time order);
/// only exact repeats (time, container, action) are.
#[derive(Debug, Default)]
pub struct Dedup {
    newest: i64,
    seen: HashSet<(i64, String, String)>,
    order: VecDeque<(i64, String, String)>,
}

impl Dedup {
    /// How far back (before the newest event) repeats are remembered. Replays start at the
    /// newest event's time, so anything older than this cannot come back.
    pub const WINDOW_NANOS: i64 = 10_000_000_000;

    /// True if `ev` is new (and remembers it); false for a repeat.
    pub fn admit(&mut self, ev: &ContainerEvent) -> bool {
        let key = (ev.time_nano, ev.id.clone(), ev.action.clone());
        if self.seen.contains(&key) {
            return false;
        }
        self.newest = self.newest.max(ev.time_nano);
        self.seen.insert(key.clone());
        self.order.push_back(key);
        let horizon = self.newest - Self::WINDOW_NANOS;
        while let Some(front) = self.order.front() {
            if front.0 >= horizon && self.order.len() <= 100_000 {
                break;
            }
            let old = self.order.pop_front().expect("front exists");
            self.seen.remove(&old);
        }
        true
    }

    /// The newest event time seen (nanoseconds since the epoch), 0 before any event.
    pub fn newest(&self) -> i64 {
        self.newest
    }
}

/// What the reader tells the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderMsg {
    /// A (re)subscription was made: list all containers now.
    Subscribed { reconnect: bool },
    /// A new container event, with the moment it was read.
    Event(ContainerEvent, Instant),
    /// The stream ended or could not be opened (for /healthz).
    Down(String),
}

/// Opens event streams. The real one is Docker's `/events`; tests use in-memory ones.
pub trait EventSource: Send + 'static {
    type Stream: Stream<Item = Result<ContainerEvent, DockerError>> + Send + Unpin;
    /// Checks that the engine answers (so that a subscription is real before saying so).
    fn ping(&self) -> impl Future<Output = Result<(), DockerError>> + Send;
    /// Subscribes to container events since `since_nano` (ns since the epoch).
    fn subscribe(&self, since_nano: i64) -> Self::Stream;
}

/// Reader state: the explicit state machine of the reconnect loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not subscribed; `reconnect` says whether a stream was open before.
    Connecting { reconnect: bool },
    /// Reading a stream.
    Streaming,
}

/// Wall-clock nanoseconds since the epoch.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Runs the reader until the receiver is gone. `on_reconnect` is called for every re-subscription
/// after the first (metrics).
pub async fn run_reader<S: EventSource>(
    source: S,
    tx: UnboundedSender<ReaderMsg>,
    backoff: Backoff,
    pulse: Pulse,
    on_reconnect: impl Fn() + Send,
) {
    let mut dedup = Dedup::default();
    // The first subscription reaches one second back, so it surely covers the listing that
    // follows it (see the module docs).
    let start_since = now_nanos() - 1_000_000_000;
    let mut state = State::Connecting { reconnect: false };
    let mut stream: Option<S::Stream> = None;
    let mut retry = Retry::new("the Docker engine", backoff);
    let mut beat = beat_interval();
    loop {
        pulse.round(Loop::Reader).await;
        match state {
            State::Connecting { reconnect } => {
                if let Err(e) = bounded("ping", source.ping()).await {
                    let delay = retry.failed(&e);
                    if tx.send(ReaderMsg::Down(e.to_string())).is_err() {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    continue;
                }
                let since = if dedup.newest() > 0 {
                    dedup.newest()
                } else {
                    start_since
                };
                stream = Some(source.subscribe(since));
                if reconnect {
                    on_reconnect();
                    info!(since_nano = since, "Docker event stream re-subscribed");
                } else {
                    debug!(since_nano = since, "Docker event stream subscribed");
                }
                retry.succeeded();
                if tx.send(ReaderMsg::Subscribed { reconnect }).is_err() {
                    return;
                }
                state = State::Streaming;
            }
            State::Streaming => {
                // An idle stream is no sign of trouble: wake every BEAT to say the loop is
                // alive (`next` is cancel-safe).
                let next = match stream.as_mut() {
                    Some(s) => tokio::select! {
                        n = s.next() => n,
                        _ = beat.tick() => continue,
                    },
                    None => None,
                };
                match next {
                    Some(Ok(ev)) => {
                        let received = Instant::now();
                        debug!(id = %ev.id, action = %ev.action, time_nano = ev.time_nano, "event read");
                        if dedup.admit(&ev) {
                            if tx.send(ReaderMsg::Event(ev, received)).is_err() {
                                return;
                            }
                        } else {
                            debug!(id = %ev.id, action = %ev.action, "replayed event dropped");
                        }
                    }
                    end => {
                        let why = match end {
                            Some(Err(e)) => format!("Docker event stream failed: {e}"),
                            _ => "Docker event stream ended".to_owned(),
                        };
                        warn!(reason = %why, "Docker event stream lost; reconnecting");
                        let delay = retry.failed_logged();
                        stream = None;
                        if tx.send(ReaderMsg::Down(why)).is_err() {
                            return;
                        }
                        tokio::time::sleep(delay).await;
                        state = State::Connecting { reconnect: true };
                    }
                }
            }
        }
    }
}

/// Default backoff of the reader: 100 ms doubling to 2 s, reset after 10 s of health.
pub fn reader_backoff() -> Backoff {
    Backoff::new(
        Duration::from_millis(100),
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;

    fn ev(id: &str, action: &str, t: i64) -> ContainerEvent {
        ContainerEvent {
            id: id.into(),
            action: action.into(),
            time_nano: t,
            attributes: HashMap::new(),
        }
    }

    #[test]
    fn effects_of_actions() {
        let e = |a: &str| ev("c", a, 1).effect();
        assert_eq!(e("start"), Effect::Register);
        assert_eq!(e("unpause"), Effect::Register);
        assert_eq!(e("health_status: healthy"), Effect::Register);
        assert_eq!(
            e("health_status: unhealthy"),
            Effect::Deregister { draining: false }
        );
        assert_eq!(e("kill"), Effect::KillSignal);
        assert_eq!(e("stop"), Effect::Deregister { draining: true });
        for a in ["die", "pause", "destroy", "oom"] {
            assert_eq!(e(a), Effect::Deregister { draining: false }, "{a}");
        }
        for a in [
            "create",
            "attach",
            "exec_create: sh -c x",
            "rename",
            "resize",
        ] {
            assert_eq!(e(a), Effect::Ignore, "{a}");
        }
        assert_eq!(
            ev("c", "exec_start: sh -c 'x y'", 1).action_label(),
            "exec_start"
        );
        assert_eq!(
            ev("c", "health_status: healthy", 1).action_label(),
            "health_status_healthy"
        );
    }

    #[test]
    fn which_kills_stop_a_container() {
        assert!(kill_stops(Some(15), None));
        assert!(kill_stops(Some(9), None));
        assert!(
            !kill_stops(None, Some("SIGTERM")),
            "no signal named (Podman): could be a reload; `die` follows a stop"
        );
        assert!(!kill_stops(Some(1), None), "SIGHUP is a reload");
        assert!(!kill_stops(Some(10), Some("SIGTERM")));
        assert!(
            kill_stops(Some(28), Some("SIGWINCH")),
            "Apache's stop signal"
        );
        assert!(kill_stops(Some(28), Some("28")));
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("term"), Some(15));
        assert_eq!(signal_number("bogus"), None);
    }

    #[test]
    fn dedup_drops_exact_repeats_only() {
        let mut d = Dedup::default();
        assert!(d.admit(&ev("a", "start", 100)));
        assert!(d.admit(&ev("a", "kill", 200)));
        assert!(!d.admit(&ev("a", "kill", 200)), "replay of the newest");
        assert!(!d.admit(&ev("a", "start", 100)), "replay of an older one");
        assert!(
            d.admit(&ev("b", "start", 150)),
            "live, slightly out of order"
        );
        assert!(d.admit(&ev("a", "die", 200)), "same time, other action");
        assert_eq!(d.newest(), 200);
        // Far-away history is forgotten.
        assert!(d.admit(&ev("z", "start", 200 + Dedup::WINDOW_NANOS * 2)));
        assert!(d.seen.len() == 1);
    }

    type ScriptItem = Option<Result<ContainerEvent, DockerError>>;

    fn away(detail: &str) -> DockerError {
        DockerError::Unreachable {
            what: "script".into(),
            detail: detail.into(),
        }
    }

    /// An in-memory event source: each subscription pops the next scripted stream and records
    /// the `since` it was asked for. A scripted `Err` at ping simulates an engine that is away.
    #[derive(Clone, Default)]
    struct Script {
        /// Items of each stream; `None` ends the stream, otherwise it stays open and quiet.
        streams: Arc<Mutex<VecDeque<Vec<ScriptItem>>>>,
        pings: Arc<Mutex<VecDeque<Result<(), DockerError>>>>,
        sinces: Arc<Mutex<Vec<i64>>>,
    }

    impl EventSource for Script {
        type Stream = futures::stream::BoxStream<'static, Result<ContainerEvent, DockerError>>;
        fn ping(&self) -> impl Future<Output = Result<(), DockerError>> + Send {
            let r = self.pings.lock().unwrap().pop_front().unwrap_or(Ok(()));
            async move { r }
        }
        fn subscribe(&self, since: i64) -> Self::Stream {
            self.sinces.lock().unwrap().push(since);
            let items = self.streams.lock().unwrap().pop_front().unwrap_or_default();
            let ends = items.iter().any(Option::is_none);
            let items: Vec<_> = items.into_iter().map_while(|i| i).collect();
            if ends {
                futures::stream::iter(items).boxed()
            } else {
                futures::stream::iter(items)
                    .chain(futures::stream::pending())
                    .boxed()
            }
        }
    }

    async fn collect(rx: &mut mpsc::UnboundedReceiver<ReaderMsg>, n: usize) -> Vec<ReaderMsg> {
        let mut out = Vec::new();
        while out.len() < n {
            out.push(rx.recv().await.expect("reader alive"));
        }
        out
    }

    fn events_of(msgs: &[ReaderMsg]) -> Vec<(String, String, i64)> {
        msgs.iter()
            .filter_map(|m| match m {
                ReaderMsg::Event(e, _) => Some((e.id.clone(), e.action.clone(), e.time_nano)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn reconnects_with_since_of_the_last_event_and_drops_replays() {
        let t0 = now_nanos();
        let script = Script::default();
        {
            let mut s = script.streams.lock().unwrap();
            // First stream: two events, then the stream ends (engine restarted, proxy cut…).
            s.push_back(vec![
                Some(Ok(ev("a", "start", t0))),
                Some(Ok(ev("b", "start", t0 + 10))),
                None,
            ]);
            // Second: fails mid-way after replaying b's start and delivering a's kill.
            s.push_back(vec![
                Some(Ok(ev("b", "start", t0 + 10))),
                Some(Ok(ev("a", "kill", t0 + 20))),
                Some(Err(away("connection reset"))),
            ]);
            // Third: replays a's kill, then new events.
            s.push_back(vec![
                Some(Ok(ev("a", "kill", t0 + 20))),
                Some(Ok(ev("a", "die", t0 + 20))),
                Some(Ok(ev("c", "start", t0 + 30))),
            ]);
        }
        // The engine is away for two pings between the second and third subscription.
        {
            let mut p = script.pings.lock().unwrap();
            p.extend([
                Ok(()),
                Ok(()),
                Err(away("no socket")),
                Err(away("no socket")),
            ]);
        }
        let reconnects = Arc::new(Mutex::new(0));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = reconnects.clone();
        let task = tokio::spawn(run_reader(
            script.clone(),
            tx,
            reader_backoff(),
            Pulse::default(),
            move || *r.lock().unwrap() += 1,
        ));
        let msgs = collect(&mut rx, 12).await;
        let kinds: Vec<&str> = msgs
            .iter()
            .map(|m| match m {
                ReaderMsg::Subscribed { reconnect: false } => "sub",
                ReaderMsg::Subscribed { reconnect: true } => "resub",
                ReaderMsg::Event(..) => "ev",
                ReaderMsg::Down(_) => "down",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "sub", "ev", "ev", // a start, b start
                "down", "resub", "ev", // b start replayed and dropped; a kill
                "down", "down", "down", // stream error, then the engine is away twice
                "resub", "ev", "ev", // a kill replayed and dropped; a die, c start
            ]
        );
        // What matters: every event exactly once, in order, and each re-subscription asked for
        // the events since the newest one seen.
        let evs = events_of(&msgs);
        assert_eq!(
            evs,
            vec![
                ("a".into(), "start".into(), t0),
                ("b".into(), "start".into(), t0 + 10),
                ("a".into(), "kill".into(), t0 + 20),
                ("a".into(), "die".into(), t0 + 20),
                ("c".into(), "start".into(), t0 + 30),
            ]
        );
        let sinces = script.sinces.lock().unwrap().clone();
        assert_eq!(sinces.len(), 3);
        assert!(
            sinces[0] <= t0 && sinces[0] >= t0 - 2_000_000_000,
            "first subscription reaches back about a second"
        );
        assert_eq!(sinces[1], t0 + 10);
        assert_eq!(sinces[2], t0 + 20);
        assert_eq!(*reconnects.lock().unwrap(), 2);
        let subs = msgs
            .iter()
            .filter(|m| matches!(m, ReaderMsg::Subscribed { .. }))
            .count();
        assert_eq!(subs, 3, "a full list follows every subscription");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_engine_that_is_away_is_retried_with_backoff_not_abandoned() {
        let script = Script::default();
        script
            .pings
            .lock()
            .unwrap()
            .extend((0..20).map(|_| Err(away("connection refused"))));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let task = tokio::spawn(run_reader(
            script.clone(),
            tx,
            reader_backoff(),
            Pulse::default(),
            || {},
        ));
        let msgs = collect(&mut rx, 21).await;
        assert!(msgs[..20].iter().all(
            |m| matches!(m, ReaderMsg::Down(e) if e == &away("connection refused").to_string())
        ));
        assert_eq!(msgs[20], ReaderMsg::Subscribed { reconnect: false });
        // 20 retries at 100 ms doubling to a 2 s cap (jittered to half at least):
        // never a tight loop, never longer than the cap.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(15), "{waited:?}");
        assert!(waited <= Duration::from_secs(40), "{waited:?}");
        task.abort();
    }
}
