//! The fault suite: many hosts on real parts, each fault a test.
//!
//! Each test starts a fleet (`flotilla_harness::hosts`): 3 etcd members in namespaces of their
//! own and 3 hosts, each a network namespace with its own dockerd, presence (TTL 3 s), confgen
//! (the shipped HAProxy template and resource settings) and HAProxy, all on one virtual switch.
//! Every host runs two containers of service `web`; requests go from a client namespace through
//! the HAProxies of the hosts that stay healthy. An observer (`flotilla_harness::observe`)
//! samples every proxy's file and running HAProxy every ~20 ms; the test marks what it makes
//! live or dead, and at the end the figures are computed and asserted:
//!
//! - stale endpoints still routed beyond TTL + 2 s after a host is cut off or killed: 0;
//! - live endpoints lost from any proxy (during a leader kill, a partition of another host, …): 0;
//! - partial or empty configs written: 0 (every distinct version seen passes `haproxy -c`);
//! - failed requests through a healthy host's HAProxy: 0;
//! - time to converge after the fault heals: reported, and asserted against a generous bound.
//!
//! Each test prints its figures (`figures: …` on stderr) and appends them to the file named by
//! `FLOTILLA_FAULT_REPORT` if set; docs/OPERATIONS.md "Failure modes" quotes them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flotilla_harness::hosts::{Binaries, Fleet, FleetSpec, HostSpec, Web};
use flotilla_harness::observe::{load_summary, Churn, Figures, Load, LoadStats, Marks, Observer};

const SERVICE: &str = "web";
/// Deadline for a fleet to route what it should (several times what it takes).
const ROUTED: Duration = Duration::from_secs(30);
/// The generous bound on the time to converge after a fault heals.
const CONVERGE: Duration = Duration::from_secs(30);
/// Client timeout of the request load: a request to a backend that vanished from the network
/// waits for HAProxy's `timeout connect` (5 s) before it is retried elsewhere.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn bins() -> Binaries {
    Binaries {
        presence: common::bin("presence"),
        confgen: common::bin("confgen"),
        proxyctl: common::bin("proxyctl"),
        templates: common::chain::repo().join("templates/templates"),
    }
}

fn names<'a>(webs: impl IntoIterator<Item = &'a Web>) -> BTreeSet<String> {
    webs.into_iter().map(|w| w.instance.clone()).collect()
}

fn instances<'a>(webs: impl IntoIterator<Item = &'a Web>) -> Vec<String> {
    webs.into_iter().map(|w| w.instance.clone()).collect()
}

struct Setup {
    // Drop order: the observer before the fleet it samples.
    obs: Observer,
    marks: Marks,
    base: Vec<Web>,
    fleet: Fleet,
    started: Instant,
}

/// Starts the fleet, two `web` containers per host with a dockerd, waits until every proxy
/// routes all of them, and starts the observer.
fn setup(spec: FleetSpec, restart: &str) -> Setup {
    let started = Instant::now();
    let fleet = Fleet::start(spec);
    let mut base = Vec::new();
    for h in fleet.hosts.iter().filter(|h| h.has_docker()) {
        for k in 0..2 {
            base.push(h.run_web(SERVICE, &format!("web-{}-{k}", h.index), restart));
        }
    }
    fleet.wait_routed(&names(&base), ROUTED);
    let obs = Observer::start(&fleet);
    let marks = obs.marks();
    marks.live(&instances(&base));
    eprintln!("fleet up and routing in {:?}", started.elapsed());
    Setup {
        obs,
        marks,
        base,
        fleet,
        started,
    }
}

impl Setup {
    fn on(&self, host: usize) -> Vec<&Web> {
        self.base.iter().filter(|w| w.host == host).collect()
    }

    fn not_on(&self, host: usize) -> Vec<&Web> {
        self.base.iter().filter(|w| w.host != host).collect()
    }

    fn load(&self, through: &[usize]) -> Load {
        let targets = through
            .iter()
            .map(|&i| {
                (
                    self.fleet.hosts[i].name.clone(),
                    self.fleet.hosts[i].http_addr(),
                )
            })
            .collect();
        Load::start(
            self.fleet.client(),
            targets,
            SERVICE,
            Duration::from_millis(10),
            REQUEST_TIMEOUT,
        )
    }

    /// Stops the observer, prints the figures, asserts them; returns them.
    fn finish(self, test: &str, load: &[LoadStats], converge: &[(&str, Duration)]) -> Figures {
        let fig = self.obs.finish();
        let (ok, failed, max_latency) = load_summary(load);
        let conv: Vec<String> = converge
            .iter()
            .map(|(what, d)| format!("{what} {} ms", d.as_millis()))
            .collect();
        let line = format!(
            "figures: {test}: {fig}; requests {ok} ok, {failed} failed, slowest {} ms; converged: {}; wall {:.1} s",
            max_latency.as_millis(),
            if conv.is_empty() { "-".to_string() } else { conv.join(", ") },
            self.started.elapsed().as_secs_f64()
        );
        eprintln!("{line}");
        if let Ok(path) = std::env::var("FLOTILLA_FAULT_REPORT") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
        let failures: Vec<(&str, &Duration, &String)> = load
            .iter()
            .flat_map(|s| s.failed.iter().map(move |(t, e)| (s.target.as_str(), t, e)))
            .collect();
        let diag = || self.fleet.diagnostics();
        assert_eq!(fig.stale, 0, "stale endpoints: {fig}\n{}", diag());
        assert_eq!(fig.lost, 0, "live endpoints lost: {fig}\n{}", diag());
        assert_eq!(fig.partial, 0, "partial configs: {fig}\n{}", diag());
        assert_eq!(fig.empty, 0, "empty configs: {fig}\n{}", diag());
        assert!(
            failures.is_empty(),
            "{failed} of {} requests failed through healthy proxies: {:?}\n{}",
            ok + failed as u64,
            &failures[..failures.len().min(5)],
            diag()
        );
        assert!(ok > 100, "too few requests to mean anything: {ok}");
        for (what, d) in converge {
            assert!(
                *d <= CONVERGE,
                "{what}: converged after {d:?}, more than {CONVERGE:?}"
            );
        }
        fig
    }
}

/// Sleeps until `t0 + d`.
fn sleep_until(t0: Instant, d: Duration) {
    std::thread::sleep((t0 + d).saturating_duration_since(Instant::now()));
}

/// Takes host 2 away from the others with `away` for 2 × TTL and brings it back with `back`,
/// under load through hosts 0 and 1: host 2's endpoints must leave their routing within
/// TTL + 2 s, `while_away` checks what host 2 itself keeps, and every proxy must route the
/// whole base set again after `back`. Returns the figures under `test`.
fn away_for_two_ttls_and_back(
    mut s: Setup,
    test: &str,
    how: &str,
    away: impl FnOnce(&mut Fleet),
    while_away: impl FnOnce(&Setup),
    back: impl FnOnce(&mut Fleet),
) -> Figures {
    let ttl = s.fleet.ttl();
    let bound = ttl + Duration::from_secs(2);
    let load = s.load(&[0, 1]);
    let others = names(s.not_on(2));

    s.marks.dead(&instances(s.on(2)), Some(bound), &[2], how);
    let gone = Instant::now();
    away(&mut s.fleet);
    let unrouted = s.fleet.wait_routed_on(&[0, 1], &others, ttl + ROUTED);
    eprintln!("{how}: its endpoints unrouted by host-0 and host-1 {unrouted:?} after");
    sleep_until(gone, 2 * ttl);
    while_away(&s);

    s.marks.live_except(&instances(s.on(2)), &[2]);
    back(&mut s.fleet);
    let converged = s.fleet.wait_routed(&names(&s.base), CONVERGE + ROUTED);
    eprintln!(
        "converged {converged:?} after it came back ({:?} after it went)",
        gone.elapsed()
    );
    let stats = load.stop();
    s.finish(test, &stats, &[("after it is back", converged)])
}

#[test]
fn a_host_partitioned_from_etcd_for_two_ttls_is_unrouted_within_ttl_and_back_after_heal() {
    away_for_two_ttls_and_back(
        setup(FleetSpec::new(bins(), 3), "no"),
        "partition one host from etcd for 2 × TTL",
        "host cut off from etcd",
        |fleet| fleet.cut_from_etcd(2),
        // The cut-off host cannot see the registry: it keeps its last good file, everything
        // in it.
        |s| {
            let kept = s.fleet.hosts[2].routed().unwrap_or_default();
            assert!(
                kept.is_superset(&names(&s.base)),
                "the cut-off host's proxy lost endpoints: {kept:?}"
            );
        },
        |fleet| fleet.heal_etcd_cut(2),
    );
}

#[test]
fn a_host_that_dies_is_unrouted_within_ttl_and_healthy_proxies_fail_no_request() {
    // Unplugged from the switch: no packet reaches it or leaves it, as if it lost power.
    away_for_two_ttls_and_back(
        setup(FleetSpec::new(bins(), 3), "no"),
        "a host dies (unplugged) and comes back",
        "host died (unplugged)",
        |fleet| fleet.unplug(2),
        |_| {},
        |fleet| fleet.plug(2),
    );
}

#[test]
fn killing_the_etcd_leader_under_churn_loses_no_live_endpoint() {
    let mut s = setup(FleetSpec::new(bins(), 3), "no");
    let ttl = s.fleet.ttl();
    let load = s.load(&[0, 1, 2]);
    let mut converge = Vec::new();
    for round in 0..2 {
        let churn = Churn::start(
            &s.fleet,
            &[0, 1],
            SERVICE,
            Duration::from_millis(1500),
            s.marks.clone(),
        );
        std::thread::sleep(Duration::from_secs(1));
        let leader = s.fleet.etcd_leader();
        let killed = Instant::now();
        s.fleet.kill_etcd(leader);
        let next = s.fleet.etcd_leader();
        let elected = killed.elapsed();
        assert_ne!(next, leader);
        // Two TTLs with one member less, churn going on: every lease must be kept alive.
        sleep_until(killed, 2 * ttl);
        let churned = churn.stop();
        assert!(
            churned.iter().all(|c| c.cycles >= 2),
            "churn made no progress: {churned:?}"
        );
        let restarted = Instant::now();
        s.fleet.restart_etcd(leader);
        s.fleet.wait_etcd_healthy(Duration::from_secs(60));
        s.fleet.wait_routed(&names(&s.base), CONVERGE + ROUTED);
        let d = restarted.elapsed();
        eprintln!("round {round}: new leader after {elected:?}; member back and routed after {d:?}; churn {churned:?}");
        converge.push((format!("round {round}: leader re-elected"), elected));
        converge.push((
            format!("round {round}: member restarted → cluster healthy and routed"),
            d,
        ));
    }
    let stats = load.stop();
    let conv: Vec<(&str, Duration)> = converge.iter().map(|(w, d)| (w.as_str(), *d)).collect();
    s.finish("kill the etcd leader under churn (2 rounds)", &stats, &conv);
}

#[test]
fn losing_etcd_quorum_for_two_ttls_loses_no_live_endpoint_and_catches_up_after() {
    let mut s = setup(FleetSpec::new(bins(), 3), "no");
    let ttl = s.fleet.ttl();
    let load = s.load(&[0, 1, 2]);
    let leader = s.fleet.etcd_leader();
    let follower = (leader + 1) % 3;
    let lost_at = Instant::now();
    s.fleet.kill_etcd(leader);
    s.fleet.kill_etcd(follower);
    // Changes nobody can write down: one container goes, one comes.
    let gone_idx = s.base.iter().position(|w| w.host == 0).unwrap();
    let gone = s.base.remove(gone_idx);
    s.marks.dead(
        std::slice::from_ref(&gone.instance),
        None,
        &[],
        "removed during quorum loss",
    );
    s.fleet.hosts[0].remove_web(&gone);
    let new = s.fleet.hosts[1].run_web(SERVICE, "web-during-loss", "no");
    s.marks.live(std::slice::from_ref(&new.instance));
    sleep_until(lost_at, 2 * ttl);

    let back = Instant::now();
    s.fleet.restart_etcd(leader);
    s.fleet.restart_etcd(follower);
    s.fleet.wait_etcd_healthy(Duration::from_secs(60));
    let healthy = back.elapsed();
    s.base.push(new);
    s.fleet.wait_routed(&names(&s.base), CONVERGE + ROUTED);
    let converged = back.elapsed();
    eprintln!("quorum back after {healthy:?}; routed after {converged:?}");
    let stats = load.stop();
    s.finish(
        "lose etcd quorum for 2 × TTL, then recover",
        &stats,
        &[
            ("quorum back", healthy),
            ("after quorum → routed", converged),
        ],
    );
}

/// Also the regression test for the shipped backend's server order: host-2 holds half of the
/// backend (4 of 8 servers), and while its dockerd starts it refuses connections to its published
/// ports for ~200 ms (it rebuilds its NAT rules). A refused request is retried and redispatched
/// to the *next* server; with the servers grouped by node (the order `eps` has) that was another
/// server of host-2 and the request failed (503 after 3 retries: ~10 per run of 8 restarts, every
/// run); with the servers interleaved by node it is another host's, and none fails.
#[test]
fn restarting_dockerd_with_live_restore_on_and_off_recovers_every_endpoint() {
    let mut spec = FleetSpec::new(bins(), 3);
    spec.hosts[1] = HostSpec::full().live_restore(false);
    let mut s = setup(spec, "always");
    for k in 0..2 {
        let w = s.fleet.hosts[2].run_web(SERVICE, &format!("web-2-extra{k}"), "always");
        s.marks.live(std::slice::from_ref(&w.instance));
        s.base.push(w);
    }
    s.fleet.wait_routed(&names(&s.base), ROUTED);
    let load = s.load(&[0, 1, 2]);
    let addrs = |s: &Setup| -> BTreeMap<String, String> {
        s.base
            .iter()
            .map(|w| {
                let h = &s.fleet.hosts[w.host];
                (w.instance.clone(), h.docker_client().addr(w, h.ip).unwrap())
            })
            .collect()
    };

    // live-restore on (host-2): the containers keep running and serving while dockerd is down.
    let before = addrs(&s);
    s.fleet.hosts[2].stop_dockerd();
    let mut served_while_down = 0;
    for w in s.on(2) {
        let addr: std::net::SocketAddr = before[&w.instance].parse().unwrap();
        let r = s.fleet.client().enter(move || {
            flotilla_harness::haproxy::http_get_at(addr, "x", "/", Duration::from_secs(5))
        });
        if matches!(r, Ok((200, _))) {
            served_while_down += 1;
        }
    }
    assert_eq!(
        served_while_down, 4,
        "containers must keep serving (live-restore)"
    );
    let mut on_back = Vec::new();
    for round in 0..4 {
        if round > 0 {
            // kill -9 (containerd runs on: the containers too).
            s.fleet.hosts[2].kill_dockerd();
        }
        s.fleet.hosts[2].start_dockerd();
        let back = Instant::now();
        s.fleet.wait_routed_addrs(&before, CONVERGE);
        on_back.push(back.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    // presence follows the new engine: a container started now is routed.
    let fresh = s.fleet.hosts[2].run_web(SERVICE, "web-after-restart", "always");
    s.marks.live(std::slice::from_ref(&fresh.instance));
    s.base.push(fresh);
    let fresh_routed = s.fleet.wait_routed(&names(&s.base), ROUTED);
    let (on_med, on_max) = flotilla_harness::observe::median_max(&on_back).unwrap();
    eprintln!(
        "live-restore on: 1 stop + 3 kill -9, dockerd back → routed as before median {on_med:?} max {on_max:?}; \
         a new container routed {fresh_routed:?} after docker run"
    );

    // live-restore off (host-1): dockerd stops its containers; with restart=always it starts
    // them again (perhaps on new ports) when it is back.
    let before = addrs(&s);
    let host1 = instances(s.on(1));
    s.marks
        .dead(&host1, None, &[], "dockerd stopped (live-restore off)");
    let t = Instant::now();
    s.fleet.hosts[1].stop_dockerd();
    let stopped = t.elapsed();
    s.fleet.hosts[1].start_dockerd();
    let back = Instant::now();
    let want = addrs(&s);
    s.marks.live(&host1);
    s.fleet.wait_routed_addrs(&want, CONVERGE + ROUTED);
    let off_converged = back.elapsed();
    let moved = want
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .count();
    eprintln!(
        "live-restore off: dockerd stopped in {stopped:?}; back and every container routed at its address ({moved} moved) {off_converged:?} after"
    );
    let stats = load.stop();
    s.finish(
        "restart dockerd: live-restore on (host-2, half the backend; 1 stop + 3 kill -9) and off (host-1)",
        &stats,
        &[
            ("live-restore on: dockerd back → routed (max)", on_max),
            ("live-restore off: dockerd back → routed at its ports", off_converged),
        ],
    );
}

#[test]
fn kill_9_of_every_daemon_in_a_loop_under_churn_loses_nothing() {
    let mut s = setup(FleetSpec::new(bins(), 3), "no");
    let load = s.load(&[0, 1, 2]);
    let churn = Churn::start(
        &s.fleet,
        &[0, 1, 2],
        SERVICE,
        Duration::from_secs(2),
        s.marks.clone(),
    );
    let mut presence_back = Vec::new();
    let mut confgen_back = Vec::new();
    let mut etcd_back = Vec::new();
    let mut dockerd_back = Vec::new();
    let t0 = Instant::now();
    for round in 0..2 {
        for i in 0..3 {
            let h = &mut s.fleet.hosts[i];
            eprintln!("+{:?} kill presence {i}", t0.elapsed());
            h.kill_presence();
            let t = Instant::now();
            h.start_presence();
            h.wait_presence_ready(ROUTED);
            presence_back.push(t.elapsed());

            eprintln!("+{:?} kill confgen {i}", t0.elapsed());
            h.kill_confgen();
            let t = Instant::now();
            h.start_confgen();
            flotilla_harness::wait_for("confgen healthy again", ROUTED, || {
                matches!(h.confgen_healthz(), Ok((200, _))).then_some(())
            });
            confgen_back.push(t.elapsed());
        }
        // One etcd member per round.
        let m = round % 3;
        eprintln!("+{:?} kill etcd {m}", t0.elapsed());
        s.fleet.kill_etcd(m);
        let t = Instant::now();
        s.fleet.restart_etcd(m);
        s.fleet.wait_etcd_healthy(Duration::from_secs(60));
        etcd_back.push(t.elapsed());
        // One dockerd per round (live-restore on: its containers keep running).
        let d = 2 - round % 3;
        eprintln!("+{:?} kill dockerd {d}", t0.elapsed());
        s.fleet.hosts[d].kill_dockerd();
        let t = Instant::now();
        s.fleet.hosts[d].start_dockerd();
        dockerd_back.push(t.elapsed());
        eprintln!("+{:?} dockerd {d} answers", t0.elapsed());
    }
    let churned = churn.stop();
    let t = Instant::now();
    s.fleet.wait_routed(&names(&s.base), CONVERGE + ROUTED);
    let converged = t.elapsed();
    for h in &mut s.fleet.hosts {
        h.assert_running();
    }
    eprintln!("churn: {churned:?}");
    let stats = load.stop();
    let med = |v: &[Duration]| flotilla_harness::observe::median_max(v).unwrap();
    let (p, c, e, d) = (
        med(&presence_back),
        med(&confgen_back),
        med(&etcd_back),
        med(&dockerd_back),
    );
    eprintln!(
        "restarts, median/max: presence → synced {:?}/{:?}, confgen → healthy {:?}/{:?}, etcd member → healthy {:?}/{:?}, dockerd → answering {:?}/{:?}",
        p.0, p.1, c.0, c.1, e.0, e.1, d.0, d.1
    );
    s.finish(
        "kill -9 presence, confgen (each host), an etcd member and a dockerd, 2 rounds under churn",
        &stats,
        &[
            ("presence restart → synced (max)", p.1),
            ("confgen restart → healthy (max)", c.1),
            ("etcd member restart → healthy (max)", e.1),
            ("churn stopped → routed", converged),
        ],
    );
}

#[test]
fn a_full_disk_under_confgens_destination_keeps_the_last_good_file_until_there_is_room() {
    let mut spec = FleetSpec::new(bins(), 3);
    spec.hosts[1] = HostSpec::full().dest_tmpfs(512 * 1024);
    let mut s = setup(spec, "no");
    let load = s.load(&[0, 1, 2]);
    let before = s.fleet.hosts[1].config();
    let write_failures = |s: &Setup| {
        s.fleet.hosts[1].confgen_metric_sum("confgen_failures_total", &["kind=\"write\""])
    };
    let failures_before = write_failures(&s);
    s.fleet.hosts[1].fill_dest_disk();
    let new = s.fleet.hosts[0].run_web(SERVICE, "web-while-full", "no");
    s.marks.live(std::slice::from_ref(&new.instance));
    s.base.push(new);
    let want = names(&s.base);
    s.fleet.wait_routed_on(&[0, 2], &want, ROUTED);
    flotilla_harness::wait_for("confgen on host-1 to report a failed write", ROUTED, || {
        (write_failures(&s) > failures_before).then_some(())
    });
    let (status, body) = s.fleet.hosts[1].confgen_healthz().expect("healthz");
    assert_eq!(status, 503, "{body}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        s.fleet.hosts[1].config(),
        before,
        "the full disk's file must stay the last good one"
    );
    let freed = Instant::now();
    s.fleet.hosts[1].free_dest_disk();
    s.fleet.wait_routed(&want, CONVERGE + ROUTED);
    let converged = freed.elapsed();
    let stats = load.stop();
    s.finish(
        "fill the disk under confgen's destination (tmpfs), then free it",
        &stats,
        &[("space freed → routed", converged)],
    );
}
