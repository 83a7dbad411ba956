//! One presence per `--state-file` (issue 17): the real binary against a real etcd and the real
//! Docker engine. A second presence given the same state file is refused before it touches
//! Docker or etcd, and the first keeps its lease and its keys; a lock file left by a presence
//! killed with SIGKILL blocks nobody.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use flotilla_harness::etcd::Etcd;

const LONG: Duration = Duration::from_secs(20);

fn lease_in(state_file: &Path) -> i64 {
    let text = std::fs::read_to_string(state_file).expect("state file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("state file JSON");
    v["lease"].as_i64().expect("lease")
}

/// Waits (bounded) for `p` to exit by itself.
fn wait_exit(p: &mut Presence, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        let child = p.child.0.as_mut().expect("running");
        if let Some(st) = child.try_wait().expect("try_wait") {
            p.child.0 = None;
            return st;
        }
        assert!(
            start.elapsed() < timeout,
            "presence still running {timeout:?} after start; log:\n{}",
            p.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_second_presence_on_the_same_state_file_is_refused_and_the_first_keeps_its_lease() {
    let etcd = Etcd::start();
    let view = EtcdView::plain(vec![etcd.endpoint()]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("presence.state");
    let lock = dir.path().join("presence.state.lock");
    let (node, label) = (uniq("lock"), uniq("lock"));
    let args = Args::new(&node, &label, vec![etcd.endpoint()])
        .arg("--state-file")
        .arg(state.display().to_string());

    let mut first = Presence::start(&args, dir.path());
    first.wait_ready(LONG);
    let first_pid = first.child.pid().expect("running");
    let c = web("lock", &label, &["flotilla.service=shop"], &[]);
    let inst = instance(&node, &c, 8080);
    wait_instances(&view, &node, std::slice::from_ref(&inst), LONG);
    let lease = lease_in(&state);
    let before = view.endpoints(&node).unwrap()[&inst].clone();
    assert_eq!(before.lease, lease);
    let node_before = view.get(&view.keys.node(&node)).unwrap().expect("node key");
    assert_eq!(node_before.1, lease);
    let state_before = std::fs::read_to_string(&state).unwrap();
    let revision = view.revision();

    // The same command again (same node, same state file), as a second unit or a copy-pasted
    // one would run it; its log in its own directory.
    let second_dir = tempfile::tempdir().unwrap();
    let mut second = Presence::start(&args, second_dir.path());
    let st = wait_exit(&mut second, Duration::from_secs(10));
    let log = second.log();
    assert_eq!(st.code(), Some(2), "{log}");
    let expected = format!(
        "presence: --state-file {}: in use by another presence (pid {first_pid}), which holds the lock {}",
        state.display(),
        lock.display()
    );
    assert!(log.contains(&expected), "want {expected:?} in:\n{log}");
    for never in ["Docker engine", "etcd", "lease"] {
        assert!(
            !log.lines()
                .any(|l| l.contains(never) && !l.contains(&expected)),
            "the refused presence did something with {never:?}:\n{log}"
        );
    }

    // The first is untouched: still running, same lease (alive), same keys, nothing written.
    assert!(
        first
            .child
            .0
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the first presence exited; log:\n{}",
        first.log()
    );
    assert!(view.lease_ttl(lease) > 0, "the first's lease is gone");
    let after = view.endpoints(&node).unwrap();
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        vec![&inst],
        "registrations changed"
    );
    assert_eq!(after[&inst].lease, lease);
    assert_eq!(after[&inst].create_revision, before.create_revision);
    assert_eq!(view.get(&view.keys.node(&node)).unwrap(), Some(node_before));
    assert_eq!(view.revision(), revision, "something was written to etcd");
    assert_eq!(std::fs::read_to_string(&state).unwrap(), state_before);
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        format!("{first_pid}\n"),
        "the lock file names the first presence"
    );

    // SIGKILL the first: its lock file stays behind (naming a dead pid) and blocks nobody, as
    // the kernel dropped the flock with the process.
    first.child.kill();
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        format!("{first_pid}\n")
    );
    let third_dir = tempfile::tempdir().unwrap();
    let mut third = Presence::start(&args, third_dir.path());
    third.wait_ready(LONG);
    let third_pid = third.child.pid().expect("running");
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        format!("{third_pid}\n")
    );
    // It took over as the first's successor: the container on its own lease, the dead one's
    // lease revoked from the state file.
    let new_lease = lease_in(&state);
    assert_ne!(new_lease, lease);
    wait_instances(&view, &node, std::slice::from_ref(&inst), LONG);
    assert_eq!(view.endpoints(&node).unwrap()[&inst].lease, new_lease);
    flotilla_harness::wait_for("the predecessor's lease revoked", LONG, || {
        (view.lease_ttl(lease) == -1).then_some(())
    });
    let st = third.terminate(LONG);
    assert!(st.success(), "{st}; log:\n{}", third.log());
    drop(c);
}
