//! The whole chain on one machine, with real parts: Docker containers → presence → etcd →
//! confgen (shipped haproxy template) → proxyctl reload → HAProxy (master-worker) → HTTP.
//!
//! The goals (a started container served within 3 s of `docker run` returning; a dead host's
//! endpoint out of HAProxy within TTL + 3 s) are asserted here: the first with twice its
//! figure as the test's bound, since a noisy CI machine is not the benchmark (the bench,
//! `scripts/bench pipeline`, measures it against 3 s: docs/BENCHMARKS.md); the second as
//! stated, since its 3 s over the TTL is already the slack. Waits run longer than the bounds,
//! so a miss fails with the measured figure, not a timeout.

mod common;

use std::time::{Duration, Instant};

use common::chain::{Chain, TTL};

/// The goal: a started container served within 3 s; the test's bound is twice that (above).
const SERVED_BOUND: Duration = Duration::from_secs(6);
/// TTL + 3 s, the goal for a dead host's endpoint to leave HAProxy.
fn gone_bound() -> Duration {
    let secs: u64 = TTL
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .expect("TTL in whole seconds");
    Duration::from_secs(secs + 3)
}
use flotilla_harness::docker::unique_name;
use flotilla_harness::wait_for;

fn svc(tag: &str) -> String {
    format!("e2e{}{tag}", std::process::id())
}

#[test]
fn a_new_container_is_served_and_a_stopped_one_drains_without_failed_requests() {
    let chain = Chain::start("serve");
    let service = svc("a");
    let names: Vec<String> = (0..3).map(|i| unique_name(&format!("serve{i}"))).collect();

    let t0 = Instant::now();
    let first = chain.container(&service, &names[0]);
    chain.wait_served_by(&service, &[&names[0]], Duration::from_secs(20));
    let served = t0.elapsed();
    eprintln!(
        "first container served {} ms after docker run returned",
        served.as_millis()
    );
    assert!(
        served <= SERVED_BOUND,
        "first container served {served:?} after docker run returned (bound {SERVED_BOUND:?})\n{}",
        chain.diagnostics()
    );

    let second = chain.container(&service, &names[1]);
    let t1 = Instant::now();
    let _third = chain.container(&service, &names[2]);
    chain.wait_served_by(
        &service,
        &[&names[0], &names[1], &names[2]],
        Duration::from_secs(20),
    );
    let served = t1.elapsed();
    assert!(
        served <= SERVED_BOUND,
        "the second and third containers served {served:?} after the second's docker run returned (bound {SERVED_BOUND:?})\n{}",
        chain.diagnostics()
    );

    // Stop one of three while a bounded request loop runs: no request may fail.
    let stopper = std::thread::spawn({
        let name = second.name.clone();
        move || {
            std::thread::sleep(Duration::from_millis(300));
            let out = std::process::Command::new("docker")
                .args(["stop", "-t", "10", &name])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "docker stop: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
    let (mut ok, mut failed, mut answers) = (
        0,
        Vec::new(),
        std::collections::BTreeMap::<String, u32>::new(),
    );
    let loop_start = Instant::now();
    while loop_start.elapsed() < Duration::from_secs(6) && ok + failed.len() < 3000 {
        match chain.get(&service) {
            Ok((200, body)) => {
                ok += 1;
                *answers.entry(body.trim().to_string()).or_default() += 1;
            }
            other => failed.push(format!("{other:?}")),
        }
    }
    stopper.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during docker stop: {:?}\n{}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)],
        chain.diagnostics()
    );
    assert!(
        ok > 50,
        "the loop made too few requests to mean anything: {ok}"
    );
    chain.wait_served_by(&service, &[&names[0], &names[2]], Duration::from_secs(20));
    drop(first);
}

#[test]
fn presence_killed_removes_its_endpoints_and_etcd_restart_recovers() {
    // Another host's endpoint too, as in any real registry: this host's container is half of
    // what the template sees, which the shipped drop guard (more than half) lets through.
    let mut chain = Chain::start_with("faults", &["--allow-loopback"]);
    chain.register_other_host(&format!("steady-{}", std::process::id()), "steady", 1);
    let service = svc("b");
    let name = unique_name("faults0");
    let _c = chain.container(&service, &name);
    chain.wait_served_by(&service, &[&name], Duration::from_secs(20));

    // kill -9 presence: the lease expires after TTL and HAProxy stops routing to the container.
    chain.presence.as_mut().unwrap().proc.kill();
    let killed = Instant::now();
    wait_for(
        "the dead host's endpoint to leave HAProxy",
        Duration::from_secs(3 + 3 + 20),
        || matches!(chain.get(&service), Ok((503, _))).then_some(()),
    );
    let gone_after = killed.elapsed();
    eprintln!(
        "endpoint left HAProxy {} ms after kill -9 of presence (TTL {TTL})",
        gone_after.as_millis()
    );
    assert!(
        gone_after <= gone_bound(),
        "the dead host's endpoint left HAProxy {gone_after:?} after kill -9 (bound TTL + 3 s = {:?})\n{}",
        gone_bound(),
        chain.diagnostics()
    );
    assert!(
        !chain.config().contains(&chain.node),
        "the rendered config still names the dead node:\n{}",
        chain.config()
    );

    // presence back: served again.
    chain.start_presence();
    chain.wait_served_by(&service, &[&name], Duration::from_secs(20));

    // etcd restarted: the chain recovers by itself, and a container started afterwards is served.
    chain.etcd.kill();
    std::thread::sleep(Duration::from_secs(1));
    chain.etcd.restart();
    let later = unique_name("faults1");
    let _c2 = chain.container(&service, &later);
    chain.wait_served_by(&service, &[&name, &later], Duration::from_secs(40));
    chain.confgen.assert_running();
    chain.presence.as_mut().unwrap().assert_running();
}

/// The shipped drop guard end to end (`max_drop = "50%"`, `drop_grace = "30s"` from
/// templates/conf.d/haproxy.toml): a presence killed on a host whose container is every endpoint
/// the proxy has (the registry emptied, as in an outage that expired every lease) is held:
/// HAProxy keeps routing to the still-running container, not one request fails, and only
/// after the grace is the drop applied.
#[test]
fn the_shipped_drop_guard_holds_the_loss_of_every_endpoint_for_its_grace_then_applies_it() {
    const GRACE: Duration = Duration::from_secs(30);
    let mut chain = Chain::start("guard");
    let shipped =
        std::fs::read_to_string(common::chain::repo().join("templates/conf.d/haproxy.toml"))
            .unwrap();
    assert!(
        shipped.contains("max_drop = \"50%\"") && shipped.contains("drop_grace = \"30s\""),
        "the shipped guard settings changed: update this test"
    );
    let service = svc("g");
    let name = unique_name("guard0");
    let _c = chain.container(&service, &name);
    chain.wait_served_by(&service, &[&name], Duration::from_secs(20));

    chain.presence.as_mut().unwrap().proc.kill();
    let endpoints_left = || {
        chain
            .etcd
            .etcdctl(&["get", "--prefix", "--keys-only", "/flotilla/endpoints/"])
            .unwrap()
            .lines()
            .filter(|l| l.contains(&service))
            .count()
    };
    wait_for("the lease to expire", Duration::from_secs(3 + 20), || {
        (endpoints_left() == 0).then_some(())
    });
    let emptied = Instant::now();
    let (mut ok, mut failed) = (0u32, Vec::new());
    let held_for = loop {
        match chain.get(&service) {
            Ok((200, _)) => ok += 1,
            Ok((503, _)) => break emptied.elapsed(),
            other => failed.push(format!("{:.1}s {other:?}", emptied.elapsed().as_secs_f64())),
        }
        assert!(
            emptied.elapsed() < GRACE + Duration::from_secs(30),
            "the held drop was not applied {:?} after the registry emptied\n{}",
            emptied.elapsed(),
            chain.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "registry emptied → HAProxy answered 503 after {} ms; {ok} requests served meanwhile",
        held_for.as_millis()
    );
    assert!(
        chain.confgen.log().contains("drop guard: holding"),
        "no hold logged\n{}",
        chain.diagnostics()
    );
    assert!(
        failed.is_empty(),
        "{} requests failed while the drop was held: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        chain.diagnostics()
    );
    // The hold starts at the first render after the delete, which this poll saw a little
    // later; 2 s covers that on a loaded machine.
    assert!(
        held_for >= GRACE - Duration::from_secs(2),
        "the drop was applied {held_for:?} after the registry emptied (grace {GRACE:?})\n{}",
        chain.diagnostics()
    );
    assert!(
        ok > 100,
        "too few requests during the hold to mean anything: {ok}"
    );
    assert!(
        chain
            .confgen
            .log()
            .contains("the drop persisted for the grace period"),
        "{}",
        chain.diagnostics()
    );
}
