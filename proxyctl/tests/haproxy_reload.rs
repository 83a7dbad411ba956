//! `proxyctl reload` against a real HAProxy 2.6 in master-worker mode.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn reload_with_a_new_backend_makes_it_serve() {
    let a = StaticBackend::start("A");
    let b = StaticBackend::start("B");
    let port = free_port();
    let hx = Haproxy::start(&site(port, &[("s1", &a.addr())]));
    assert_eq!(get(port), "A");
    let before = show_proc(&hx);

    hx.write_config(&site(port, &[("s1", &b.addr())]));
    let started = Instant::now();
    let run = reload(&hx).expect_code(0);
    // The goal is 1 s (measured by the benchmark); the test allows several times that.
    wait_for("the new backend to serve", Duration::from_secs(5), || {
        (get(port) == "B").then_some(())
    });
    eprintln!("reload → new backend serving: {:?}", started.elapsed());

    assert!(run.stdout.starts_with("reloaded "), "{}", run.stdout);
    let after = show_proc(&hx);
    assert_eq!(after.master.pid, before.master.pid);
    assert_eq!(after.master.reloads, before.master.reloads + 1);
    assert_eq!(after.master.failed_reloads, 0);
    let new: Vec<u32> = after.current_workers().map(|w| w.pid).collect();
    assert!(!new.is_empty(), "no current worker in {after}");
    for pid in &new {
        assert!(
            before.workers.iter().all(|w| w.pid != *pid),
            "worker {pid} was already there before the reload: {before} / {after}"
        );
        assert!(
            run.stdout.contains(&pid.to_string()),
            "the new worker {pid} is not reported: {}",
            run.stdout
        );
    }
}

/// Requests in a loop on a thread until stopped (bounded in count and time); remembers every
/// failure and every body.
struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Result<String, String>>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (stop.clone(), results.clone());
        let handle = thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(60);
            for _ in 0..20_000 {
                if s.load(Ordering::Relaxed) || Instant::now() > until {
                    break;
                }
                let result = match http_get(port, "/", Duration::from_secs(5)) {
                    Ok((200, body)) => Ok(body),
                    Ok((status, body)) => Err(format!("{status}: {body}")),
                    Err(e) => Err(e.to_string()),
                };
                r.lock().unwrap().push(result);
                thread::sleep(Duration::from_millis(2));
            }
        });
        Load {
            stop,
            results,
            handle: Some(handle),
        }
    }

    fn count(&self) -> usize {
        self.results.lock().unwrap().len()
    }

    /// Waits until `n` more requests completed.
    fn wait_more(&self, n: usize) {
        let target = self.count() + n;
        wait_for("requests to complete", Duration::from_secs(20), || {
            (self.count() >= target).then_some(())
        });
    }

    fn finish(mut self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("load thread");
        }
        std::mem::take(&mut *self.results.lock().unwrap())
    }
}

#[test]
fn a_broken_config_fails_with_haproxys_line_and_the_old_config_keeps_serving() {
    let a = StaticBackend::start("A");
    let port = free_port();
    let hx = Haproxy::start(&site(port, &[("s1", &a.addr())]));
    let before = show_proc(&hx);
    let load = Load::start(port);
    load.wait_more(20);

    let mut broken = hx.render(&site(port, &[("s1", &a.addr())]));
    broken.push_str("    bogus-keyword on\n");
    let line = line_of(&broken, "bogus-keyword");
    hx.write_raw_config(&broken);
    let run = reload(&hx).expect_code(1);
    load.wait_more(20);
    let results = load.finish();

    let cfg = path_str(hx.config_path());
    // HAProxy's own message, with the file and line, then one summary line.
    assert!(
        run.stderr.contains(&format!(
            "{cfg}:{line}: error: unknown keyword 'bogus-keyword'"
        )),
        "{}",
        run.stderr
    );
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(
        errors[0].contains(&cfg) && errors[0].contains("bogus-keyword"),
        "{}",
        errors[0]
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);

    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    assert!(results.iter().all(|r| r.as_deref() == Ok("A")));
    assert!(results.len() >= 40);
    // Nothing was reloaded: same master counters, same worker.
    let after = show_proc(&hx);
    assert_eq!(
        (
            after.master.pid,
            after.master.reloads,
            after.master.failed_reloads
        ),
        (
            before.master.pid,
            before.master.reloads,
            before.master.failed_reloads
        )
    );
    let pids = |p: &proxyctl::ProcList| p.workers.iter().map(|w| w.pid).collect::<Vec<_>>();
    assert_eq!(pids(&after), pids(&before));
}

#[test]
fn a_config_that_passes_the_check_but_cannot_load_fails_the_reload_and_the_old_workers_serve() {
    let a = StaticBackend::start("A");
    let port = free_port();
    let hx = Haproxy::start(&site(port, &[("s1", &a.addr())]));
    let before = show_proc(&hx);
    // `haproxy -c` does not bind, so a port that is taken only fails when the master loads it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let mut sections = site(port, &[("s1", &a.addr())]);
    sections.push_str(&format!(
        "\nfrontend other\n    bind 127.0.0.1:{taken_port}\n    default_backend be\n"
    ));
    hx.write_config(&sections);

    let run = reload(&hx).expect_code(3);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(
        errors[0].contains(&path_str(hx.master_socket()))
            && errors[0].contains("could not load the new configuration")
            && errors[0].contains("keep serving"),
        "{}",
        errors[0]
    );
    assert_eq!(get(port), "A");
    let after = show_proc(&hx);
    assert_eq!(after.master.reloads, before.master.reloads + 1);
    assert_eq!(after.master.failed_reloads, 1);
    let old: Vec<u32> = before.workers.iter().map(|w| w.pid).collect();
    assert_eq!(after.workers.iter().map(|w| w.pid).collect::<Vec<_>>(), old);
    assert!(hx.log().contains("cannot bind socket"), "{}", hx.log());

    // Once the port is free again, the next reload succeeds and resets the failure counter.
    drop(taken);
    reload(&hx).expect_code(0);
    assert_eq!(show_proc(&hx).master.failed_reloads, 0);
}

#[test]
fn reload_refuses_a_config_the_master_does_not_run() {
    let a = StaticBackend::start("A");
    let port = free_port();
    let hx = Haproxy::start(&site(port, &[("s1", &a.addr())]));
    let other = hx.dir().join("other.cfg");
    std::fs::write(&other, hx.render(&site(port, &[("s1", &a.addr())]))).unwrap();
    let run = Run::of(
        proxyctl()
            .arg("reload")
            .arg("--config")
            .arg(&other)
            .arg("--master-socket")
            .arg(hx.master_socket()),
    )
    .expect_code(2);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(
        errors[0].contains("--config")
            && errors[0].contains(&path_str(&other))
            && errors[0].contains(&path_str(hx.config_path())),
        "{}",
        errors[0]
    );
    assert_eq!(show_proc(&hx).master.reloads, 0);
}

#[tokio::test]
async fn the_library_reports_the_new_generation_and_the_old_workers() {
    let a = StaticBackend::start("A");
    let port = free_port();
    let hx = Haproxy::start(&site(port, &[("s1", &a.addr())]));
    let master = proxyctl::MasterSocket::new(hx.master_socket());
    let before = master.show_proc().await.unwrap();
    assert_eq!(before.workers.len(), 1);

    // Hold a keep-alive connection on the old worker so it stays alive after the reload.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::Write;
    write!(held, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();

    let done = proxyctl::Haproxy::default()
        .check_and_reload(hx.config_path(), &master, Duration::from_secs(8))
        .await
        .unwrap();
    assert!(done.check.valid);
    assert_eq!(done.reload.master_pid, before.master.pid);
    assert_eq!(done.reload.reloads, 1);
    assert_eq!(done.reload.new_workers.len(), 1);
    assert_ne!(done.reload.new_workers[0], before.workers[0].pid);
    assert!(done.reload.elapsed < Duration::from_secs(8));
    let info = master
        .worker_command(done.reload.new_workers[0], "show info")
        .await
        .unwrap();
    assert!(
        info.contains(&format!("Pid: {}", done.reload.new_workers[0])),
        "{info}"
    );
    drop(held);
}

#[test]
fn a_reload_not_verified_within_the_timeout_is_exit_3_and_names_the_socket() {
    let a = StaticBackend::start("A");
    let b = StaticBackend::start("B");
    let port = free_port();
    let hx = Haproxy::start(&site(port, &[("s1", &a.addr())]));
    hx.write_config(&site(port, &[("s1", &b.addr())]));
    // The master needs tens of milliseconds to re-execute: 1 ms cannot be met.
    let run = Run::of(
        proxyctl()
            .arg("reload")
            .arg("--config")
            .arg(hx.config_path())
            .arg("--master-socket")
            .arg(hx.master_socket())
            .args(["--timeout", "1ms"]),
    )
    .expect_code(3);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(
        errors[0].contains(&path_str(hx.master_socket()))
            && errors[0].contains("no new worker generation answered within 1ms"),
        "{}",
        errors[0]
    );
    // The reload itself was sent and completes late, as the message says it may.
    wait_for(
        "the late generation to serve",
        Duration::from_secs(5),
        || (get(port) == "B").then_some(()),
    );
    assert_eq!(show_proc(&hx).master.reloads, 1);
}

#[test]
fn a_drain_and_a_runtime_weight_survive_a_reload_and_a_moved_server_takes_its_new_address() {
    let (a, b, c) = (
        StaticBackend::start("A"),
        StaticBackend::start("B"),
        StaticBackend::start("C"),
    );
    let port = free_port();
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("server-state");
    let global = format!("    server-state-file {}\n", state.display());
    let sections = |servers: &[(&str, &str)]| {
        site(port, servers).replacen(
            "    mode http\n",
            "    mode http\n    load-server-state-from-file global\n",
            1,
        )
    };
    let hx =
        Haproxy::start_with_global(&sections(&[("s1", &a.addr()), ("s2", &b.addr())]), &global);
    assert_eq!(hx.runtime_cli("set server be/s1 state drain").trim(), "");
    assert_eq!(hx.runtime_cli("set server be/s2 weight 7").trim(), "");

    // The new file moves s2 to C. HAProxy itself would take the saved address over the file's
    // (init-addr last, and the port always): proxyctl saves the file's instead.
    hx.write_config(&sections(&[("s1", &a.addr()), ("s2", &c.addr())]));
    let run = reload(&hx).expect_code(0);
    assert!(
        run.stdout.contains("the state of 2 server(s) carried over"),
        "{}",
        run.stdout
    );
    let rows = flotilla_harness::wait_for("the new worker", Duration::from_secs(5), || {
        hx.try_runtime_cli("show servers state be")
            .ok()
            .and_then(|t| proxyctl::parse_servers_state(&t).ok())
    });
    let s1 = rows.iter().find(|r| r.name == "s1").unwrap();
    let s2 = rows.iter().find(|r| r.name == "s2").unwrap();
    assert_eq!(
        s1.admin_state & proxyctl::ServerState::ADMIN_FDRAIN,
        proxyctl::ServerState::ADMIN_FDRAIN,
        "the drain was lost: {rows:?}"
    );
    assert_eq!(s2.weight, 7, "the runtime weight was lost: {rows:?}");
    assert_eq!(s2.port, c.port(), "s2 kept its old address: {rows:?}");
    for _ in 0..6 {
        assert_eq!(get(port), "C");
    }
    // Emptied after the reload: a later restart loads no stale state.
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "1\n");

    // A weight the file changes wins over the runtime one (HAProxy's rule for state files).
    hx.write_config(&sections(&[
        ("s1", &a.addr()),
        ("s2", &format!("{} weight 3", c.addr())),
    ]));
    reload(&hx).expect_code(0);
    let rows = flotilla_harness::wait_for("the new worker", Duration::from_secs(5), || {
        hx.try_runtime_cli("show servers state be")
            .ok()
            .and_then(|t| proxyctl::parse_servers_state(&t).ok())
    });
    assert_eq!(rows.iter().find(|r| r.name == "s2").unwrap().weight, 3);
}
