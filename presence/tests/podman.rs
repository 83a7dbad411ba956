//! presence against Podman: the real presence binary pointed at a rootful `podman system service`
//! (`--docker-host unix://<its socket>`, Podman's Docker-compatible API) and a real etcd, through
//! the core cases of the Docker e2e tests: register, stop, health, kill -9 of presence.
//!
//! Each test starts its own Podman service (own storage and run dirs, harness/src/podman.rs), its
//! own etcd on free ports, its own node name and container label. Containers, the service and its
//! dirs are removed on drop, also on panic. Podman missing is a failed test naming `scripts/setup`,
//! not a skip. What Podman's API gives and how presence behaves on it differs from Docker in
//! places; each test prints what it saw, and docs/PRESENCE.md ("Podman") says what differs.
//!
//! `cargo test -p presence --test podman -- --test-threads=1 --nocapture`

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{uniq, wait_instances, Args, EtcdView, Presence};
use flotilla_harness::docker::unique_name;
use flotilla_harness::etcd::Etcd;
use flotilla_harness::podman::{Podman, PodmanContainer, IMAGE_STORED};
use flotilla_harness::wait_for;
use flotilla_registry::{Health, Proto};
use nix::sys::signal::Signal;

const LONG: Duration = Duration::from_secs(20);

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// presence for this test's node and label, on Podman's socket, with a 3 s TTL.
fn presence(
    podman: &Podman,
    etcd: &Etcd,
    node: &str,
    label: &str,
    dir: &std::path::Path,
) -> Presence {
    let args = Args::new(node, label, vec![etcd.endpoint()])
        .ttl("3s")
        .arg("--docker-host")
        .arg(podman.docker_host());
    let p = Presence::start(&args, dir);
    p.wait_ready(LONG);
    p
}

/// busybox `httpd` on 8080 published on 127.0.0.1 (a random host port), labelled for this test.
fn web(
    podman: &Podman,
    tag: &str,
    label: &str,
    labels: &[&str],
    extra: &[&str],
    cmd: &[&str],
) -> PodmanContainer {
    let image = podman.busybox_image();
    let test_label = format!("flotilla.test={label}");
    let mut args: Vec<&str> = vec!["-l", &test_label, "-p", "127.0.0.1::8080"];
    for l in labels {
        args.push("-l");
        args.push(l);
    }
    args.extend_from_slice(extra);
    args.push(image);
    if cmd.is_empty() {
        args.extend_from_slice(&["httpd", "-f", "-p", "8080"]);
    } else {
        args.extend_from_slice(cmd);
    }
    podman.run_container(&unique_name(tag), &args)
}

fn instance(node: &str, c: &PodmanContainer, port: u16) -> String {
    format!("{node}-{}-{port}", c.short_id())
}

/// SIGHUP, then waits until the full list it starts has reached etcd.
fn resync_now(p: &Presence) {
    let syncs = p.metric("presence_full_syncs_total");
    p.signal(Signal::SIGHUP);
    wait_for("the SIGHUP resync to reach etcd", LONG, || {
        (p.metric("presence_full_syncs_total") > syncs).then_some(())
    });
}

/// The presence_docker_events_total samples, by action, that are not zero.
fn events_seen(p: &Presence) -> Vec<(String, f64)> {
    p.metrics()
        .into_iter()
        .filter_map(|(k, v)| {
            let action = k
                .strip_prefix("presence_docker_events_total{action=\"")?
                .strip_suffix("\"}")?;
            Some((action.to_owned(), v))
        })
        .collect()
}

#[test]
fn podman_a_published_port_appears_with_host_port_service_and_tags() {
    let podman = Podman::start();
    let version = podman.version();
    let (_, body) = podman.api_get("/version").expect("GET /version");
    let reported: serde_json::Value = serde_json::from_str(&body).expect("/version is JSON");
    let api = reported["ApiVersion"]
        .as_str()
        .expect("ApiVersion")
        .to_owned();
    eprintln!(
        "Podman {version}: Docker API {api} (min {}), libpod API {}",
        reported["MinAPIVersion"], reported["Components"][0]["Details"]["APIVersion"]
    );
    let etcd = Etcd::start();
    let view = EtcdView::plain(vec![etcd.endpoint()]);
    let dir = tmp();
    let (node, label) = (uniq("preg"), uniq("preg"));
    let p = presence(&podman, &etcd, &node, &label, dir.path());
    // bollard negotiated down to what Podman reports.
    assert!(
        p.log().contains(&format!("api_version={api}")),
        "presence did not negotiate API {api}; log:\n{}",
        p.log()
    );

    podman.busybox_image();
    let t0 = Instant::now();
    let c = web(
        &podman,
        "preg",
        &label,
        &[
            "flotilla.service=shop",
            "flotilla.tags=v1,canary",
            "flotilla.service.53=dns",
        ],
        &["-p", "127.0.0.1::53/udp"],
        &[],
    );
    let run_took = t0.elapsed();
    let tcp = instance(&node, &c, 8080);
    let udp = format!("{}-udp", instance(&node, &c, 53));
    let took = wait_instances(&view, &node, &[tcp.clone(), udp.clone()], LONG);
    eprintln!("registered {took:?} after `podman run` returned (which took {run_took:?})");
    assert!(
        took <= Duration::from_secs(3),
        "registered {took:?} after `podman run` returned; the goal is 1 s (3 s allowed here)"
    );

    let eps = view.endpoints(&node).unwrap();
    let ep = &eps[&tcp].endpoint;
    assert_eq!(ep.service, "shop");
    assert_eq!(ep.host, "127.0.0.1");
    assert_eq!(ep.port, c.host_port("8080/tcp"));
    assert_eq!(ep.proto, Proto::Tcp);
    assert_eq!(ep.tags, vec!["v1", "canary"]);
    assert_eq!(ep.container, c.short_id());
    // Podman reports the image as it stored it (`localhost/` added), not as given to `run`.
    assert_eq!(ep.image, IMAGE_STORED);
    assert_eq!(ep.health, Health::None);
    assert_eq!(ep.node, node);
    assert_eq!(
        ep.meta.get("container_name").map(String::as_str),
        Some(c.name.as_str())
    );
    let dns = &eps[&udp].endpoint;
    assert_eq!((dns.service.as_str(), dns.proto), ("dns", Proto::Udp));
    assert_eq!(dns.port, c.host_port("53/udp"));
    // The address in etcd reaches the container (busybox httpd: 404 for an empty docroot).
    let (status, _) =
        flotilla_harness::haproxy::http_get_host(ep.port, "127.0.0.1", "/", Duration::from_secs(5))
            .expect("GET the registered address");
    assert_eq!(
        status, 404,
        "busybox httpd answers at {}:{}",
        ep.host, ep.port
    );

    let (_, node_lease) = view
        .get(&view.keys.node(&node))
        .unwrap()
        .expect("node record");
    assert!(node_lease != 0);
    assert!(eps.values().all(|s| s.lease == node_lease));

    wait_for("the gauge to count both endpoints", LONG, || {
        (p.metric("presence_endpoints_registered") == 2.0).then_some(())
    });
    assert!(p.metric("presence_docker_events_total{action=\"start\"}") >= 1.0);
    let (status, body) = p.healthz().expect("healthz");
    assert!(status.contains("200"), "{status}\n{body}");
    assert!(body.contains("docker: ok"), "{body}");
    eprintln!("events presence counted: {:?}", events_seen(&p));
}

#[test]
fn podman_stop_removes_the_entry_when_the_container_exits() {
    let podman = Podman::start();
    let etcd = Etcd::start();
    let view = EtcdView::plain(vec![etcd.endpoint()]);
    let dir = tmp();
    let (node, label) = (uniq("pstop"), uniq("pstop"));
    let p = presence(&podman, &etcd, &node, &label, dir.path());
    // Traps SIGTERM and takes 4 s to exit, as a server draining its connections would.
    let c = web(
        &podman,
        "pstop",
        &label,
        &["flotilla.service=drainer"],
        &[],
        &[
            "sh",
            "-c",
            "trap 'sleep 4; exit 0' TERM; httpd -f -p 8080 & wait",
        ],
    );
    let inst = instance(&node, &c, 8080);
    wait_instances(&view, &node, std::slice::from_ref(&inst), LONG);

    let mut stop = c
        .command("stop", &["-t", "20"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("podman stop");
    let t0 = Instant::now();
    wait_instances(&view, &node, &[], LONG);
    let gone_after = t0.elapsed();
    let gone_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let running_when_gone = c.inspect("{{.State.Running}}").unwrap() == "true";
    assert!(stop.wait().unwrap().success());
    assert_eq!(c.inspect("{{.State.Running}}").unwrap(), "false");
    let finished = Duration::from_nanos(
        c.inspect("{{.State.FinishedAt.UnixNano}}")
            .unwrap()
            .parse()
            .expect("FinishedAt.UnixNano"),
    );
    let events = events_seen(&p);
    eprintln!(
        "deregistered {gone_after:?} after `podman stop`; container still running then: \
         {running_when_gone}; key gone {} the container exited; events presence counted: {events:?}",
        if gone_at >= finished {
            format!("{:?} after", gone_at - finished)
        } else {
            format!("{:?} before", finished - gone_at)
        }
    );
    // The container did drain (so "when it exits" is not "at once" by accident).
    assert!(
        gone_after >= Duration::from_secs(3) || running_when_gone,
        "the container exited {gone_after:?} after stop; it traps TERM for 4 s"
    );
    // Podman 4.3 sends no event when `podman stop` signals a container that then exits within
    // the timeout (no `kill`, no `stop`): the first is `die` at the exit. The key goes with it.
    assert!(
        gone_at <= finished + Duration::from_secs(2),
        "the key was still there {:?} after the container exited",
        gone_at - finished
    );
    assert!(
        events.iter().any(|(a, n)| a == "die" && *n >= 1.0),
        "{events:?}"
    );
    // A resync after the exit does not bring it back.
    resync_now(&p);
    assert_eq!(view.instances(&node), Some(BTreeSet::new()));
}

/// What one health case saw: how many `podman healthcheck run`s it took until etcd agreed.
struct HealthRuns {
    failing: u32,
    passing: u32,
    failing_again: u32,
}

/// A container whose HEALTHCHECK is `check` (it passes once /ok exists), driven by
/// `podman healthcheck run`: never in etcd while starting or unhealthy, in etcd (health
/// `healthy`) once a check passed, out again once one failed.
fn health_case(tag: &str, check: &str) -> HealthRuns {
    let podman = Podman::start();
    let etcd = Etcd::start();
    let view = EtcdView::plain(vec![etcd.endpoint()]);
    let dir = tmp();
    let (node, label) = (uniq(tag), uniq(tag));
    let p = presence(&podman, &etcd, &node, &label, dir.path());
    let rev0 = view.revision();
    let c = web(
        &podman,
        tag,
        &label,
        &["flotilla.service=checked"],
        &[
            "--health-cmd",
            check,
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            "--health-timeout",
            "10s",
        ],
        &[],
    );
    let inst = instance(&node, &c, 8080);
    let key = format!("/flotilla/endpoints/{node}/checked/{inst}");
    // Without systemd no timer runs the check: the container stays `starting` until one is run.
    assert_eq!(c.inspect("{{.State.Health.Status}}").unwrap(), "starting");
    resync_now(&p);
    assert_eq!(
        view.instances(&node),
        Some(BTreeSet::new()),
        "registered while starting"
    );

    // Failing: never registered.
    let failing = check_until(&podman, &c, &p, &view, &node, false, &[]);
    resync_now(&p);
    assert_eq!(view.instances(&node), Some(BTreeSet::new()));

    let rev_before_ok = view.revision();
    podman
        .podman(&["exec", &c.name, "touch", "/ok"])
        .expect("touch /ok");
    let passing = check_until(
        &podman,
        &c,
        &p,
        &view,
        &node,
        true,
        std::slice::from_ref(&inst),
    );
    let ep = &view.endpoints(&node).unwrap()[&inst].endpoint;
    assert_eq!(ep.health, Health::Healthy);
    let early = view.revisions_with_key(&key, rev0, rev_before_ok);
    assert!(
        early.is_empty(),
        "registered while not healthy at revisions {early:?}"
    );

    // Failing again: deregistered.
    podman
        .podman(&["exec", &c.name, "rm", "/ok"])
        .expect("rm /ok");
    let failing_again = check_until(&podman, &c, &p, &view, &node, false, &[]);
    resync_now(&p);
    assert_eq!(view.instances(&node), Some(BTreeSet::new()));
    let runs = HealthRuns {
        failing,
        passing,
        failing_again,
    };
    eprintln!(
        "check `{check}`: `podman healthcheck run`s until etcd agreed: failing {}, passing {}, \
         failing again {}; events presence counted: {:?}",
        runs.failing,
        runs.passing,
        runs.failing_again,
        events_seen(&p)
    );
    runs
}

/// Runs the check until etcd holds `want` for this node (each run emits one `health_status`
/// event, which Podman 4.3 sends *before* it stores the result). Returns the runs it took.
fn check_until(
    podman: &Podman,
    c: &PodmanContainer,
    p: &Presence,
    view: &EtcdView,
    node: &str,
    passes: bool,
    want: &[String],
) -> u32 {
    let want: BTreeSet<String> = want.iter().cloned().collect();
    for run in 1..=4 {
        let events = p.metric("presence_docker_events_total{action=\"health_status\"}");
        assert_eq!(podman.healthcheck_run(&c.name).unwrap(), passes);
        let status = c.inspect("{{.State.Health.Status}}").unwrap();
        assert_eq!(status, if passes { "healthy" } else { "unhealthy" });
        wait_for("presence to read the health_status event", LONG, || {
            (p.metric("presence_docker_events_total{action=\"health_status\"}") > events)
                .then_some(())
        });
        // Time for the inspect that follows the event to reach etcd.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if view.instances(node).as_ref() == Some(&want) {
                return run;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!(
        "etcd did not follow 4 health checks (passing: {passes}); has {:?}, want {want:?}; log:\n{}",
        view.instances(node),
        p.log()
    );
}

/// A quick check (`test -f /ok`, some 30 ms): the check's own `health_status` event, read some
/// 0.1–0.2 s after it is written, finds the result stored.
#[test]
fn podman_a_failing_healthcheck_is_never_registered_and_a_passing_one_is() {
    let runs = health_case("phealth", "test -f /ok");
    assert!(
        runs.passing <= 2 && runs.failing_again <= 2,
        "more than one check late"
    );
}

/// A check that outlasts the event's delivery (2 s): Podman 4.3 writes `health_status` when the
/// check starts, presence inspects on it and still sees the previous status, so each change
/// reaches etcd one check later (on a real host one `--health-interval`, or the next
/// `--resync`, whichever comes first).
#[test]
fn podman_a_slow_healthcheck_reaches_etcd_one_check_late() {
    let runs = health_case("pslow", "sleep 2; test -f /ok");
    assert_eq!(
        runs.failing, 1,
        "unhealthy after starting: never registered"
    );
    assert_eq!(
        (runs.passing, runs.failing_again),
        (2, 2),
        "Podman's health_status event no longer precedes the result: docs/PRESENCE.md \
         (Podman) needs updating"
    );
}

#[test]
fn podman_kill_9_of_presence_entries_vanish_within_ttl_plus_2s() {
    let podman = Podman::start();
    let etcd = Etcd::start();
    let view = EtcdView::plain(vec![etcd.endpoint()]);
    let dir = tmp();
    let (node, label) = (uniq("pkill9"), uniq("pkill9"));
    let mut p = presence(&podman, &etcd, &node, &label, dir.path());
    let c = web(&podman, "pkill9", &label, &["flotilla.service=k"], &[], &[]);
    wait_instances(&view, &node, &[instance(&node, &c, 8080)], LONG);
    let node_key = view.keys.node(&node);
    p.child.kill(); // SIGKILL
    let t0 = Instant::now();
    wait_for("entries to expire", LONG, || {
        let gone = view.instances(&node)?.is_empty() && view.get(&node_key).ok()?.is_none();
        gone.then_some(())
    });
    let took = t0.elapsed();
    eprintln!("entries gone {took:?} after kill -9 (TTL 3s)");
    assert!(
        took <= Duration::from_secs(5),
        "entries took {took:?} to vanish, more than TTL + 2 s"
    );
    // The container itself is untouched.
    assert_eq!(c.inspect("{{.State.Running}}").unwrap(), "true");
}

#[test]
fn podman_kill_with_a_reload_signal_keeps_the_entry() {
    let podman = Podman::start();
    let etcd = Etcd::start();
    let view = EtcdView::plain(vec![etcd.endpoint()]);
    let dir = tmp();
    let (node, label) = (uniq("phup"), uniq("phup"));
    let p = presence(&podman, &etcd, &node, &label, dir.path());
    // Reloads on SIGHUP (the trap keeps the shell, pid 1, alive).
    let c = web(
        &podman,
        "phup",
        &label,
        &["flotilla.service=reloader"],
        &[],
        &[
            "sh",
            "-c",
            "trap 'echo reload' HUP; httpd -f -p 8080 & while :; do wait; done",
        ],
    );
    let inst = instance(&node, &c, 8080);
    wait_instances(&view, &node, std::slice::from_ref(&inst), LONG);
    let kills = p.metric("presence_docker_events_total{action=\"kill\"}");
    c.podman("kill", &["-s", "HUP"])
        .expect("podman kill -s HUP");
    wait_for("presence to read the kill event", LONG, || {
        (p.metric("presence_docker_events_total{action=\"kill\"}") > kills).then_some(())
    });
    resync_now(&p);
    assert_eq!(c.inspect("{{.State.Running}}").unwrap(), "true");
    assert_eq!(
        view.instances(&node),
        Some(BTreeSet::from([inst])),
        "a SIGHUP (reload) took the container out of etcd; log:\n{}",
        p.log()
    );
    // A kill that stops it (SIGKILL, `podman kill`'s default) is followed by `die` at once.
    c.podman("kill", &[]).expect("podman kill");
    let took = wait_instances(&view, &node, &[], LONG);
    eprintln!("deregistered {took:?} after `podman kill` (SIGKILL) returned");
    assert!(took <= Duration::from_secs(3), "{took:?}");
}
