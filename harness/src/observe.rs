//! What a fault test measures on a [`crate::hosts::Fleet`]: an [`Observer`] that samples every
//! proxy's configuration file and running HAProxy, a request [`Load`] through the proxies, and
//! container [`Churn`] on the hosts.
//!
//! The test tells the observer the truth as it makes it: [`Marks::live`] when it starts a
//! container (or brings a host back), [`Marks::dead`] *before* it stops one, kills or cuts off a
//! host. From the samples and the marks, [`Observer::finish`] computes the figures:
//!
//! - **stale**: an endpoint marked dead with a bound (TTL + 2 s for a host cut off or killed)
//!   still routed by a proxy (running HAProxy or its configuration file) later than the bound;
//! - **lost**: a live endpoint that a proxy had routed and then stopped routing before it was
//!   marked dead;
//! - **partial / empty**: a configuration file version that is empty, or fails `haproxy -c`
//!   (every distinct version seen is checked), or has no server at all while endpoints are live.
//!
//! The sampler reads each file when its size, mtime or inode changed and asks each HAProxy's
//! runtime API `show servers state`, every ~20 ms; only changes are kept. A version that lived
//! less than one period may be missed; every version it does see is one that really existed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::hosts::{config_servers, routed_servers, Fleet, Web};
use crate::netns::Netns;
use crate::require;

#[derive(Debug, Clone)]
struct Proxy {
    name: String,
    config: PathBuf,
    socket: PathBuf,
}

#[derive(Debug, Clone)]
enum Mark {
    Live {
        at: Instant,
        instances: Vec<String>,
        exempt: Vec<usize>,
    },
    Dead {
        at: Instant,
        instances: Vec<String>,
        bound: Option<Duration>,
        exempt: Vec<usize>,
        why: String,
    },
}

impl Mark {
    fn at(&self) -> Instant {
        match self {
            Mark::Live { at, .. } | Mark::Dead { at, .. } => *at,
        }
    }
}

type Timeline = Vec<(Instant, Arc<BTreeSet<String>>)>;

#[derive(Debug, Default)]
struct State {
    /// Per proxy: every distinct file content seen, with the time it was first read.
    files: Vec<Vec<(Instant, Arc<String>)>>,
    /// Per proxy: servers of the file versions (same times).
    file_servers: Vec<Timeline>,
    /// Per proxy: servers of the running HAProxy, on change.
    routed: Vec<Timeline>,
    marks: Vec<Mark>,
}

#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    proxies: Vec<Proxy>,
    state: Mutex<State>,
}

/// Records marks for an [`Observer`]; cheap to clone and send to other threads.
#[derive(Debug, Clone)]
pub struct Marks(Arc<Shared>);

impl Marks {
    /// `instances` are live from now.
    pub fn live(&self, instances: &[String]) {
        self.live_except(instances, &[]);
    }

    /// `instances` are live from now, but a loss on the proxies of the hosts in `exempt` is
    /// counted apart ([`Figures::lost_exempt`]): a host that was cut off and comes back routes
    /// what the registry says while its own presence re-registers.
    pub fn live_except(&self, instances: &[String], exempt: &[usize]) {
        self.0.state.lock().unwrap().marks.push(Mark::Live {
            at: Instant::now(),
            instances: instances.to_vec(),
            exempt: exempt.to_vec(),
        });
    }

    /// `instances` are dead from now (call it just before the action). Every proxy except
    /// those in `exempt` (indices into the fleet's hosts, e.g. the cut-off host's own proxy,
    /// which cannot know) is timed until it stops routing them ([`Figures::removals`]); with
    /// `bound`, one that takes longer counts as stale.
    pub fn dead(&self, instances: &[String], bound: Option<Duration>, exempt: &[usize], why: &str) {
        self.0.state.lock().unwrap().marks.push(Mark::Dead {
            at: Instant::now(),
            instances: instances.to_vec(),
            bound,
            exempt: exempt.to_vec(),
            why: why.into(),
        });
    }
}

/// Samples every proxy of a fleet until [`Observer::finish`].
#[derive(Debug)]
pub struct Observer {
    shared: Arc<Shared>,
    hosts: Vec<usize>,
    bootstrap: Vec<String>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    /// Starts sampling every host of `fleet` that runs HAProxy.
    pub fn start(fleet: &Fleet) -> Observer {
        let hosts = fleet.proxy_hosts();
        let proxies: Vec<Proxy> = hosts
            .iter()
            .map(|&i| {
                let h = &fleet.hosts[i];
                Proxy {
                    name: h.name.clone(),
                    config: h.config_path().to_owned(),
                    socket: h.stats_socket(),
                }
            })
            .collect();
        let n = proxies.len();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            proxies,
            state: Mutex::new(State {
                files: vec![Vec::new(); n],
                file_servers: vec![Vec::new(); n],
                routed: vec![Vec::new(); n],
                marks: Vec::new(),
            }),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("observer".into())
            .spawn(move || sample_loop(&s))
            .expect("spawn the observer");
        let obs = Observer {
            shared,
            hosts,
            bootstrap: vec![crate::hosts::bootstrap_config()],
            thread: Some(thread),
        };
        // Marks are judged against samples: have one of every proxy before the test acts.
        crate::wait_for(
            "the observer's first sample of every proxy",
            Duration::from_secs(20),
            || {
                let st = obs.shared.state.lock().unwrap();
                (st.files.iter().all(|v| !v.is_empty()) && st.routed.iter().all(|v| !v.is_empty()))
                    .then_some(())
            },
        );
        obs
    }

    /// A handle to record marks with.
    pub fn marks(&self) -> Marks {
        Marks(self.shared.clone())
    }

    /// Stops sampling and computes the figures.
    pub fn finish(mut self) -> Figures {
        self.stop();
        let state = std::mem::take(&mut *self.shared.state.lock().unwrap());
        compute(&self.shared.proxies, &self.hosts, &self.bootstrap, state)
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sample_loop(shared: &Shared) {
    let n = shared.proxies.len();
    let mut stamps: Vec<Option<(u64, i64, i64, u64)>> = vec![None; n];
    while !shared.stop.load(Ordering::SeqCst) {
        for (i, p) in shared.proxies.iter().enumerate() {
            if let Ok(md) = std::fs::metadata(&p.config) {
                let stamp = (md.len(), md.mtime(), md.mtime_nsec(), md.ino());
                if stamps[i] != Some(stamp) {
                    stamps[i] = Some(stamp);
                    if let Ok(text) = std::fs::read_to_string(&p.config) {
                        let at = Instant::now();
                        let mut st = shared.state.lock().unwrap();
                        if st.files[i].last().is_none_or(|(_, t)| **t != text) {
                            let servers = Arc::new(config_servers(&text));
                            st.files[i].push((at, Arc::new(text)));
                            st.file_servers[i].push((at, servers));
                        }
                    }
                }
            }
            if let Some(servers) = routed_servers(&p.socket) {
                let at = Instant::now();
                let mut st = shared.state.lock().unwrap();
                if st.routed[i].last().is_none_or(|(_, s)| **s != servers) {
                    st.routed[i].push((at, Arc::new(servers)));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The figures of one test.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    /// (endpoint, proxy) pairs still routed later than their bound after being marked dead.
    pub stale: usize,
    /// For each (endpoint, proxy) pair marked dead that the proxy routed at that moment: the
    /// mark's reason and how long until the proxy no longer routed it (running HAProxy and
    /// file, whichever was later; until the end of the test if it never did).
    pub removals: Vec<(String, Duration)>,
    /// (endpoint, proxy) pairs where a live, routed endpoint stopped being routed.
    pub lost: usize,
    /// The same on proxies exempted by [`Marks::live_except`] (reported, not a failure).
    pub lost_exempt: usize,
    /// Distinct configuration file versions checked (all proxies).
    pub versions: usize,
    /// Versions that were empty or failed `haproxy -c`.
    pub partial: usize,
    /// Versions without any server while endpoints were live.
    pub empty: usize,
    /// One line per stale, lost, partial or empty incident.
    pub incidents: Vec<String>,
}

impl Figures {
    /// Median and max removal time of the endpoints marked dead for `why`.
    pub fn removal(&self, why: &str) -> Option<(Duration, Duration)> {
        let v: Vec<Duration> = self
            .removals
            .iter()
            .filter(|(w, _)| w == why)
            .map(|(_, d)| *d)
            .collect();
        median_max(&v)
    }

    /// The reasons of the dead marks, each once.
    pub fn removal_reasons(&self) -> BTreeSet<String> {
        self.removals.iter().map(|(w, _)| w.clone()).collect()
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stale beyond bound {}, lost live {} (on exempt proxies {}), partial {} and empty {} of {} config versions",
            self.stale, self.lost, self.lost_exempt, self.partial, self.empty, self.versions
        )?;
        for why in self.removal_reasons() {
            if let Some((med, max)) = self.removal(&why) {
                let n = self.removals.iter().filter(|(w, _)| *w == why).count();
                write!(
                    f,
                    "; {why}: unrouted after median {} ms, max {} ms (n = {n})",
                    med.as_millis(),
                    max.as_millis()
                )?;
            }
        }
        for i in self.incidents.iter().take(20) {
            write!(f, "\n  {i}")?;
        }
        Ok(())
    }
}

/// The servers of `timeline` at time `t` (the last sample at or before it).
fn at(timeline: &Timeline, t: Instant) -> Option<&BTreeSet<String>> {
    let idx = timeline.partition_point(|(s, _)| *s <= t);
    idx.checked_sub(1).map(|i| &*timeline[i].1)
}

fn compute(proxies: &[Proxy], hosts: &[usize], bootstrap: &[String], st: State) -> Figures {
    let mut fig = Figures::default();
    let mut marks = st.marks.clone();
    marks.sort_by_key(Mark::at);
    let end = Instant::now();
    let intervals = live_intervals(&marks, end);
    count_lost(&mut fig, proxies, hosts, &st, &intervals);
    count_stale(&mut fig, proxies, hosts, &st, &marks, end);
    count_versions(&mut fig, proxies, bootstrap, &st, &intervals);
    fig
}

/// A live interval of an instance, with the proxies exempt from the loss count.
type Interval = (Instant, Instant, Vec<usize>);

/// Live intervals per instance, from the marks (sorted); one still open ends at `end`.
fn live_intervals(marks: &[Mark], end: Instant) -> BTreeMap<String, Vec<Interval>> {
    let mut intervals: BTreeMap<String, Vec<Interval>> = BTreeMap::new();
    let mut open: BTreeMap<String, (Instant, Vec<usize>)> = BTreeMap::new();
    for m in marks {
        match m {
            Mark::Live {
                at,
                instances,
                exempt,
            } => {
                for x in instances {
                    open.entry(x.clone()).or_insert((*at, exempt.clone()));
                }
            }
            Mark::Dead { at, instances, .. } => {
                for x in instances {
                    if let Some((from, ex)) = open.remove(x) {
                        intervals
                            .entry(x.clone())
                            .or_default()
                            .push((from, *at, ex));
                    }
                }
            }
        }
    }
    for (x, (from, ex)) in open {
        intervals.entry(x).or_default().push((from, end, ex));
    }
    intervals
}

/// Lost: routed at some sample inside a live interval, then missing at a later one inside it.
fn count_lost(
    fig: &mut Figures,
    proxies: &[Proxy],
    hosts: &[usize],
    st: &State,
    intervals: &BTreeMap<String, Vec<Interval>>,
) {
    for (p, proxy) in proxies.iter().enumerate() {
        for (kind, timeline) in [
            ("running HAProxy", &st.routed[p]),
            ("config file", &st.file_servers[p]),
        ] {
            for (x, ivs) in intervals {
                for (from, to, exempt) in ivs {
                    let (from, to) = (*from, *to);
                    // The states in force during [from, to): the one at `from`, then each
                    // sample inside the interval.
                    let inside = timeline
                        .iter()
                        .filter(|(t, _)| *t > from && *t < to)
                        .map(|(t, s)| (*t, &**s));
                    let states = at(timeline, from)
                        .map(|s| (from, s))
                        .into_iter()
                        .chain(inside);
                    let mut seen = false;
                    for (t, servers) in states {
                        if servers.contains(x) {
                            seen = true;
                        } else if seen {
                            let exempt = exempt.contains(&hosts[p]);
                            if exempt {
                                fig.lost_exempt += 1;
                            } else {
                                fig.lost += 1;
                            }
                            fig.incidents.push(format!(
                                "lost{}: {x} left the {kind} of {} at +{} ms of its live interval",
                                if exempt { " (exempt)" } else { "" },
                                proxy.name,
                                t.duration_since(from).as_millis()
                            ));
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// Stale: a dead mark with a bound; the first sample without it after the mark.
fn count_stale(
    fig: &mut Figures,
    proxies: &[Proxy],
    hosts: &[usize],
    st: &State,
    marks: &[Mark],
    end: Instant,
) {
    for m in marks {
        let Mark::Dead {
            at: dead_at,
            instances,
            bound,
            exempt,
            why,
        } = m
        else {
            continue;
        };
        for (p, proxy) in proxies.iter().enumerate() {
            if exempt.contains(&hosts[p]) {
                continue;
            }
            for x in instances {
                let mut worst = Duration::ZERO;
                let mut never = false;
                let mut routed = false;
                for timeline in [&st.routed[p], &st.file_servers[p]] {
                    if !at(timeline, *dead_at).is_some_and(|s| s.contains(x)) {
                        continue;
                    }
                    routed = true;
                    match timeline
                        .iter()
                        .find(|(t, s)| *t > *dead_at && !s.contains(x))
                    {
                        Some((t, _)) => worst = worst.max(t.duration_since(*dead_at)),
                        None => never = true,
                    }
                }
                if !routed {
                    continue;
                }
                if never {
                    worst = end.duration_since(*dead_at);
                }
                fig.removals.push((why.clone(), worst));
                let Some(bound) = bound else {
                    continue;
                };
                if never || worst > *bound {
                    fig.stale += 1;
                    fig.incidents.push(format!(
                        "stale: {x} ({why}) still routed by {} {} ms after it died (bound {} ms){}",
                        proxy.name,
                        worst.as_millis(),
                        bound.as_millis(),
                        if never { ", until the end" } else { "" }
                    ));
                }
            }
        }
    }
}

/// Partial and empty versions of the config files.
fn count_versions(
    fig: &mut Figures,
    proxies: &[Proxy],
    bootstrap: &[String],
    st: &State,
    intervals: &BTreeMap<String, Vec<Interval>>,
) {
    let live_at = |t: Instant| {
        intervals
            .values()
            .flatten()
            .any(|(a, b, _)| *a <= t && t < *b)
    };
    let mut checked: BTreeMap<String, bool> = BTreeMap::new();
    let tmp = tempfile::tempdir().expect("tempdir for haproxy -c");
    for (p, proxy) in proxies.iter().enumerate() {
        for (t, text) in &st.files[p] {
            if bootstrap.iter().any(|b| b == &**text) {
                continue;
            }
            fig.versions += 1;
            let ok = if text.trim().is_empty() {
                false
            } else if let Some(ok) = checked.get(&**text) {
                *ok
            } else {
                let f = tmp.path().join("check.cfg");
                std::fs::write(&f, &**text).expect("write a version to check");
                let ok = Command::new(require("haproxy", "haproxy"))
                    .arg("-c")
                    .arg("-q")
                    .arg("-f")
                    .arg(&f)
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                checked.insert((**text).clone(), ok);
                ok
            };
            if !ok {
                fig.partial += 1;
                fig.incidents.push(format!(
                    "partial: {} wrote a config that is empty or fails haproxy -c ({} bytes)",
                    proxy.name,
                    text.len()
                ));
            } else if config_servers(text).is_empty() && live_at(*t) {
                fig.empty += 1;
                fig.incidents.push(format!(
                    "empty: {} wrote a config without servers while endpoints were live",
                    proxy.name
                ));
            }
        }
    }
}

/// Requests through some proxies, from the client namespace, until stopped.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<LoadStats>>,
}

/// What one load thread saw.
#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    /// The proxy it sent to.
    pub target: String,
    /// 200 answers.
    pub ok: u64,
    /// Failed requests: when (since the load started) and what.
    pub failed: Vec<(Duration, String)>,
    /// The slowest successful request.
    pub max_latency: Duration,
    /// Answers per body (the container name).
    pub answered_by: BTreeMap<String, u64>,
}

impl Load {
    /// One thread per target, each a loop of `GET /` with `Host: <service>.localhost`,
    /// `Connection: close`, a pause of `pause` between requests, `timeout` per request.
    pub fn start(
        client: &Netns,
        targets: Vec<(String, SocketAddr)>,
        service: &str,
        pause: Duration,
        timeout: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let host = format!("{service}.localhost");
        let threads = targets
            .into_iter()
            .map(|(name, addr)| {
                let stop = stop.clone();
                let host = host.clone();
                client.spawn(move || {
                    let mut s = LoadStats {
                        target: name,
                        ..LoadStats::default()
                    };
                    let start = Instant::now();
                    while !stop.load(Ordering::SeqCst) {
                        let t = Instant::now();
                        match crate::haproxy::http_get_at(addr, &host, "/", timeout) {
                            Ok((200, body)) => {
                                s.ok += 1;
                                s.max_latency = s.max_latency.max(t.elapsed());
                                *s.answered_by.entry(body.trim().to_owned()).or_default() += 1;
                            }
                            other => s
                                .failed
                                .push((t.duration_since(start), format!("{other:?}"))),
                        }
                        std::thread::sleep(pause);
                    }
                    s
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops every thread (each finishes its request in flight) and returns what they saw.
    pub fn stop(mut self) -> Vec<LoadStats> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .drain(..)
            .map(|t| t.join().expect("a load thread panicked"))
            .collect()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sums of several [`LoadStats`].
pub fn load_summary(stats: &[LoadStats]) -> (u64, usize, Duration) {
    (
        stats.iter().map(|s| s.ok).sum(),
        stats.iter().map(|s| s.failed.len()).sum(),
        stats
            .iter()
            .map(|s| s.max_latency)
            .max()
            .unwrap_or_default(),
    )
}

/// Containers started and removed in a loop on some hosts, until stopped; each is marked live
/// when `docker run` returned and dead just before `docker stop`. Removal is graceful (stop,
/// which drains for 2 s, then rm), as a deploy's is: a `docker rm -f` kills the container with
/// requests in flight, which no proxy can answer (the likely cause of one 502 "incomplete
/// response" seen in the kill -9 loop), so it would measure the workload, not the chain.
#[derive(Debug)]
pub struct Churn {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<ChurnStats>>,
}

/// What one churn thread did.
#[derive(Debug, Clone, Default)]
pub struct ChurnStats {
    /// Containers started (and removed).
    pub cycles: u64,
    /// `docker` commands that failed (the engine away, …).
    pub errors: Vec<String>,
}

impl Churn {
    /// One thread per host in `hosts`: start a `service` container, keep it `life`, remove it.
    pub fn start(
        fleet: &Fleet,
        hosts: &[usize],
        service: &str,
        life: Duration,
        marks: Marks,
    ) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = hosts
            .iter()
            .map(|&i| {
                let docker = fleet.hosts[i].docker_client();
                let stop = stop.clone();
                let marks = marks.clone();
                let service = service.to_owned();
                std::thread::spawn(move || {
                    let mut s = ChurnStats::default();
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let name = format!("churn-{}-{n}", docker.index);
                        let web: Web = match docker.try_run_web(&service, &name, "no") {
                            Ok(w) => w,
                            Err(e) => {
                                s.errors.push(e.to_string());
                                // The engine may have started it before it went away: the
                                // container must not outlive the churn.
                                let _ = docker.docker(&["rm", "-f", &name]);
                                std::thread::sleep(Duration::from_millis(500));
                                continue;
                            }
                        };
                        marks.live(std::slice::from_ref(&web.instance));
                        let until = Instant::now() + life;
                        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        marks.dead(std::slice::from_ref(&web.instance), None, &[], "churn");
                        // A dockerd killed meanwhile refuses the removal, and with
                        // live-restore the container keeps running (and stays registered,
                        // rightly): retry until the engine is back, bounded.
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while let Err(e) = docker.try_stop_and_remove(&web) {
                            s.errors.push(e.to_string());
                            if Instant::now() > deadline {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(250));
                        }
                        s.cycles += 1;
                    }
                    s
                })
            })
            .collect();
        Churn { stop, threads }
    }

    /// Stops every thread after its current cycle (its container removed).
    pub fn stop(mut self) -> Vec<ChurnStats> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .drain(..)
            .map(|t| t.join().expect("a churn thread panicked"))
            .collect()
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Median and max of some durations (`None` when empty).
pub fn median_max(v: &[Duration]) -> Option<(Duration, Duration)> {
    let mut v = v.to_vec();
    v.sort();
    Some((*v.get(v.len() / 2)?, *v.last()?))
}
