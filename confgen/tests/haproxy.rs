//! confgen against a real etcd and a real HAProxy (master-worker), with the shipped HAProxy
//! template: rendering, `haproxy -c`, reloads through `proxyctl`, HTTP routing, a failing check,
//! a failing reload, and `kill -9` during writes.
//!
//! Deadlines are generous multiples of the goals (this machine is shared and noisy); the goals
//! themselves are measured by the benchmark (docs/BENCHMARKS.md).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    count_lines, haproxy_check, http_get, identity, read, tail, workspace_bin, Confdir, Confgen,
    Registry,
};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::haproxy::{Haproxy, StaticBackend, TEST_DEFAULTS};
use flotilla_harness::{free_port, require, wait_for};

/// etcd + HAProxy + a confdir with the shipped haproxy templates whose resource writes
/// HAProxy's config file and reloads it with `reload.sh` (which logs each reload, keeps a copy of
/// the file it reloaded, can be told to fail once, and then runs `proxyctl reload`).
struct Setup {
    // Drop order: confgen first, then HAProxy, etcd, the dir.
    confgen: Option<Confgen>,
    haproxy: Haproxy,
    reg: Registry,
    etcd: Etcd,
    http_port: u16,
    confdir: Confdir,
}

impl Setup {
    fn start(resource_extra: &str) -> Setup {
        let etcd = Etcd::start();
        let reg = Registry::connect(&etcd);
        let http_port = free_port();
        let haproxy = Haproxy::start(&format!(
            "{TEST_DEFAULTS}\nfrontend http\n    bind 127.0.0.1:{http_port}\n"
        ));
        for (k, v) in [
            ("http_bind", format!("127.0.0.1:{http_port}")),
            // The harness talks to the runtime API on this socket; keep it where it is.
            ("stats_socket", haproxy.stats_socket().display().to_string()),
            ("hard_stop_after", "5s".into()),
            ("maxconn", "1000".into()),
        ] {
            reg.put(&format!("/flotilla/config/haproxy/{k}"), v);
        }
        let confdir = Confdir::new();
        confdir.shipped_haproxy_templates();
        let cfg = haproxy.config_path().to_owned();
        let hap = require("haproxy", "haproxy");
        let d = confdir.path();
        std::fs::create_dir_all(d.join("reloaded")).unwrap();
        std::fs::write(
            d.join("reload.sh"),
            format!(
                "set -e\n\
                 echo reload >> {d}/reloads.log\n\
                 n=$(wc -l < {d}/reloads.log)\n\
                 cp {cfg} {d}/reloaded/$n\n\
                 if [ -e {d}/fail-next-reload ]; then\n  \
                   rm {d}/fail-next-reload\n  \
                   echo 'simulated reload failure' >&2\n  \
                   exit 1\n\
                 fi\n\
                 exec {proxyctl} reload --config {cfg} --master-socket {master} --haproxy-bin {hap} --timeout 10s\n",
                d = d.display(),
                cfg = cfg.display(),
                proxyctl = workspace_bin("proxyctl").display(),
                master = haproxy.master_socket().display(),
                hap = hap.display(),
            ),
        )
        .unwrap();
        confdir.resource(
            "haproxy",
            &format!(
                r#"[template]
src = "haproxy.cfg.tmpl"
dest = "{cfg}"
prefix = "/flotilla"
keys = ["/endpoints/", "/config/haproxy/"]
mode = "0644"
# Without -q: a failed check then says why (with -q HAProxy prints nothing at all).
check_cmd = "{hap} -c -f {{{{src}}}}"
reload_cmd = "/bin/sh {d}/reload.sh"
reload_timeout = "20s"
{resource_extra}
"#,
                cfg = cfg.display(),
                hap = hap.display(),
                d = d.display(),
            ),
        );
        Setup {
            confgen: None,
            haproxy,
            reg,
            etcd,
            http_port,
            confdir,
        }
    }

    fn start_confgen(&mut self) {
        self.confgen = Some(Confgen::start(&self.confdir, &self.etcd.endpoint(), &[]));
    }

    fn confgen(&mut self) -> &mut Confgen {
        self.confgen.as_mut().expect("confgen started")
    }

    fn dest(&self) -> PathBuf {
        self.haproxy.config_path().to_owned()
    }

    fn reloads(&self) -> usize {
        count_lines(&self.confdir.path().join("reloads.log"))
    }

    /// The file as it was when reload number `n` (1-based) ran.
    fn reloaded(&self, n: usize) -> String {
        read(&self.confdir.path().join("reloaded").join(n.to_string()))
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- haproxy.cfg\n{}\n--- confgen\n{}\n--- haproxy\n{}",
            read(&self.dest()),
            tail(
                &self.confgen.as_ref().map(Confgen::log).unwrap_or_default(),
                40
            ),
            tail(&self.haproxy.log(), 20)
        )
    }

    fn get(&self, service: &str) -> std::io::Result<(u16, String)> {
        http_get(
            self.http_port,
            &format!("{service}.localhost"),
            "/",
            Duration::from_secs(3),
        )
    }

    /// Waits until requests for `service` are answered by exactly the backends with `bodies`:
    /// each of them answered, and nothing else answered for `4 × len + 4` requests in a row
    /// (round robin would have reached a leftover backend by then).
    fn wait_served_by(&self, service: &str, bodies: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut seen = BTreeSet::new();
        let mut in_a_row = 0;
        loop {
            match self.get(service) {
                Ok((200, body)) if bodies.contains(&body.trim()) => {
                    seen.insert(body.trim().to_string());
                    in_a_row += 1;
                    if seen.len() == bodies.len() && in_a_row >= 4 * bodies.len() + 4 {
                        return;
                    }
                }
                _ => {
                    // A backend that should be gone answered, or none did: start over.
                    seen.clear();
                    in_a_row = 0;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{service} not served by exactly {bodies:?} within {timeout:?} (seen {seen:?})\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

#[test]
fn endpoints_written_to_etcd_are_rendered_checked_and_routed_by_haproxy_after_a_reload() {
    let mut s = Setup::start("wait = \"20ms:200ms\"");
    let alpha = StaticBackend::start("alpha");
    let beta = StaticBackend::start("beta");
    let gamma = StaticBackend::start("gamma");
    let alpha_key = s.reg.put_endpoint("node-a", "web", 1, alpha.port());
    s.reg.put_endpoint("node-b", "web", 2, beta.port());
    s.start_confgen();

    // Rendered from the shipped template, checked, written over HAProxy's file and reloaded.
    let dest = s.dest();
    wait_for(
        "confgen to write haproxy.cfg with both endpoints",
        Duration::from_secs(30),
        || {
            let cfg = read(&dest);
            (cfg.contains("Generated by confgen")
                && cfg.contains(&alpha.addr())
                && cfg.contains(&beta.addr()))
            .then_some(())
        },
    );
    let cfg = read(&dest);
    assert!(cfg.contains("backend svc_web"), "{cfg}");
    assert!(
        cfg.contains("acl host_web hdr(host),field(1,:) -i web.localhost"),
        "{cfg}"
    );
    haproxy_check(&dest).unwrap_or_else(|e| panic!("haproxy -c rejects the render: {e}\n{cfg}"));
    s.wait_served_by("web", &["alpha", "beta"], Duration::from_secs(30));
    assert!(s.reloads() >= 1, "served without a reload?");
    let show = s.haproxy.master_cli("show proc");
    assert!(
        show.contains("worker"),
        "HAProxy (master-worker) has no worker after the reload:\n{show}"
    );

    // A new endpoint is routed to after the next reload; a deleted one is not.
    let before = s.reloads();
    let gamma_key = s.reg.put_endpoint("node-a", "web", 3, gamma.port());
    s.wait_served_by("web", &["alpha", "beta", "gamma"], Duration::from_secs(30));
    s.reg.delete(&gamma_key);
    s.wait_served_by("web", &["alpha", "beta"], Duration::from_secs(30));
    assert!(
        s.reloads() >= before + 2,
        "expected a reload per change, saw {} → {}",
        before,
        s.reloads()
    );
    s.reg.delete(&alpha_key);
    s.wait_served_by("web", &["beta"], Duration::from_secs(30));
    let cfg = read(&dest);
    assert!(!cfg.contains(&alpha.addr()) && cfg.contains(&beta.addr()));
    haproxy_check(&dest).unwrap();

    // A config key every service's (cached) fragment uses: all of them are rendered again.
    s.reg.put_endpoint("node-a", "shop", 4, gamma.port());
    s.wait_served_by("shop", &["gamma"], Duration::from_secs(30));
    s.reg.put("/flotilla/config/haproxy/domain", "example.test");
    let hosts_served = |host: &str| {
        http_get(s.http_port, host, "/", Duration::from_secs(3))
            .ok()
            .filter(|(code, _)| *code == 200)
            .map(|(_, body)| body.trim().to_string())
    };
    wait_for("routing by the new domain", Duration::from_secs(30), || {
        (hosts_served("web.example.test").as_deref() == Some("beta")
            && hosts_served("shop.example.test").as_deref() == Some("gamma"))
        .then_some(())
    });
    assert_eq!(
        s.get("web").unwrap().0,
        503,
        "the old domain is still routed"
    );
    s.confgen().assert_running();
}

#[test]
fn tcp_services_get_their_own_frontend_and_path_prefixes_are_routed() {
    let mut s = Setup::start("wait = \"20ms:200ms\"");
    s.reg
        .put("/flotilla/config/haproxy/tcp_bind_address", "127.0.0.1");
    let db = StaticBackend::start("db");
    let api = StaticBackend::start("api");
    let tcp_port = free_port();
    let tcp_port_s = tcp_port.to_string();
    let (k, v) = s.reg.endpoint_meta(
        "node-a",
        "db",
        1,
        db.port(),
        &[("mode", "tcp"), ("service_port", &tcp_port_s)],
    );
    s.reg.put(&k, v);
    let (k, v) = s
        .reg
        .endpoint_meta("node-b", "api", 2, api.port(), &[("path", "/api")]);
    s.reg.put(&k, v);
    s.start_confgen();

    // TCP: raw connections to the service port reach the backend (an HTTP server here).
    wait_for("the TCP frontend", Duration::from_secs(30), || {
        http_get(tcp_port, "anything", "/", Duration::from_secs(2))
            .ok()
            .filter(|(code, body)| *code == 200 && body.trim() == "db")
    });
    let cfg = read(&s.dest());
    assert!(cfg.contains("frontend tcp_db"), "{cfg}");
    assert!(
        !cfg.contains("acl host_db"),
        "a TCP service got an HTTP route:\n{cfg}"
    );
    // Path prefix: any host, path /api or /api/… goes to the api service (busybox answers 404
    // for a file it lacks; HAProxy would answer 503 for an unrouted request).
    s.wait_served_by("api", &["api"], Duration::from_secs(30));
    let (code, _) = http_get(
        s.http_port,
        "other.localhost",
        "/api/v1/x",
        Duration::from_secs(3),
    )
    .unwrap();
    assert_eq!(code, 404, "/api/v1/x was not routed to the api backend");
    let (code, _) = http_get(
        s.http_port,
        "other.localhost",
        "/apix",
        Duration::from_secs(3),
    )
    .unwrap();
    assert_eq!(code, 503, "/apix was routed by the /api prefix");
    haproxy_check(&s.dest()).unwrap();
    s.confgen().assert_running();
}

#[test]
fn a_failing_check_leaves_the_file_untouched_and_a_failing_reload_restores_the_previous_file() {
    let mut s = Setup::start("wait = \"20ms:200ms\"");
    let alpha = StaticBackend::start("alpha");
    let beta = StaticBackend::start("beta");
    s.reg.put_endpoint("node-a", "web", 1, alpha.port());
    s.start_confgen();
    s.wait_served_by("web", &["alpha"], Duration::from_secs(30));
    let dest = s.dest();

    // 1. A render HAProxy rejects (`hard-stop-after banana`): check_cmd fails, the file keeps
    //    its bytes and inode, nothing is reloaded, and the failure is reported.
    let good = std::fs::read(&dest).unwrap();
    let good_id = identity(&dest).unwrap();
    let reloads = s.reloads();
    s.reg
        .put("/flotilla/config/haproxy/hard_stop_after", "banana");
    let log = s
        .confgen()
        .wait_log("check_cmd failed", Duration::from_secs(30));
    assert!(log.contains("hard-stop-after"), "{}", tail(&log, 20));
    // It is retried with a growing backoff, and logged as an error once, not at every retry
    // (regression: HAProxy names the staged file, whose random name made every retry look like
    // a new failure, logged at error level with a backoff started afresh each time).
    let failing_since = Instant::now();
    wait_for("a fourth failed check", Duration::from_secs(30), || {
        let m = s.confgen.as_ref().unwrap().metrics();
        (common::metric(&m, "confgen_failures_total", &[("kind", "check")]) >= 4.0).then_some(())
    });
    let log = s.confgen().log();
    assert_eq!(log.matches("apply failed").count(), 1, "{}", tail(&log, 20));
    assert!(
        log.matches("still failing").count() >= 3,
        "{}",
        tail(&log, 20)
    );
    // Growing delays (0.5-1 s, 1-2 s, 2-4 s): the fourth attempt comes at least 3.5 s after
    // the first; delays that restart at 0.5-1 s would allow 1.5 s. (1 s of slack for noise in
    // noticing the first failure.)
    assert!(
        failing_since.elapsed() >= Duration::from_millis(2500),
        "four checks in {:?}: the backoff does not grow",
        failing_since.elapsed()
    );
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        good,
        "the destination changed"
    );
    assert_eq!(
        identity(&dest).unwrap(),
        good_id,
        "the destination was rewritten"
    );
    assert_eq!(s.reloads(), reloads, "a reload ran after a failed check");
    let (code, health) = s.confgen().healthz().unwrap();
    assert_eq!(code, 503, "{health}");
    assert!(health.contains("failing (check)"), "{health}");
    s.wait_served_by("web", &["alpha"], Duration::from_secs(5));

    // Fixing the key gives back the same render: nothing is written, nothing reloaded.
    s.reg.put("/flotilla/config/haproxy/hard_stop_after", "5s");
    s.confgen().wait_log("recovered", Duration::from_secs(30));
    assert_eq!(identity(&dest).unwrap(), good_id);
    assert_eq!(s.reloads(), reloads);

    // 2. A reload that fails: the previous file is restored and HAProxy reloaded with it, then
    //    the apply is retried and succeeds.
    let previous = read(&dest);
    let reloads = s.reloads();
    std::fs::write(s.confdir.path().join("fail-next-reload"), "").unwrap();
    s.reg.put_endpoint("node-b", "web", 2, beta.port());
    let log = s
        .confgen()
        .wait_log("reload_cmd failed", Duration::from_secs(30));
    assert!(
        log.contains("simulated reload failure")
            && log.contains("the previous file was restored and reloaded"),
        "{}",
        tail(&log, 20)
    );
    // Reload n+1 saw the new file and failed; reload n+2 ran on the restored previous file.
    wait_for(
        "the reload after the rollback",
        Duration::from_secs(30),
        || (s.reloads() >= reloads + 2).then_some(()),
    );
    let failed_on = s.reloaded(reloads + 1);
    let restored = s.reloaded(reloads + 2);
    assert!(
        failed_on.contains(&beta.addr()),
        "the failed reload did not see the new file:\n{failed_on}"
    );
    assert_eq!(
        restored, previous,
        "after the failed reload the destination is not the previous file"
    );
    let bak = read(&PathBuf::from(format!("{}.bak", dest.display())));
    assert_eq!(bak, previous, "<dest>.bak is not the previous file");
    // The retry applies the change for real.
    s.wait_served_by("web", &["alpha", "beta"], Duration::from_secs(30));
    assert!(read(&dest).contains(&beta.addr()));
    let m = s.confgen().metrics();
    assert_eq!(
        common::metric(&m, "confgen_failures_total", &[("kind", "reload")]),
        1.0,
        "{m}"
    );
    assert!(common::metric(&m, "confgen_reloads_total", &[("result", "failed")]) >= 1.0);
    s.confgen().assert_running();
}

/// The template's last line, appended to the shipped template: a file that ends without it was
/// cut short.
const TRAILER: &str = "# end of haproxy.cfg";

#[test]
fn kill_9_during_writes_never_leaves_a_partial_or_empty_destination() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.shipped_haproxy_templates();
    let main = confdir.template_path("haproxy.cfg.tmpl");
    let text = read(&main);
    confdir.template("haproxy.cfg.tmpl", &format!("{text}\n{TRAILER}\n"));
    let dest = confdir.out("haproxy.cfg");
    // No check and no quiescence: write as often as possible so kills land during writes.
    confdir.resource(
        "haproxy",
        &format!(
            r#"[template]
src = "haproxy.cfg.tmpl"
dest = "{}"
prefix = "/flotilla"
keys = ["/endpoints/", "/config/haproxy/"]
max_drop = "100%"
"#,
            dest.display()
        ),
    );
    reg.put("/flotilla/config/haproxy/http_bind", "127.0.0.1:1");
    reg.put(
        "/flotilla/config/haproxy/stats_socket",
        confdir.path().join("admin.sock").display().to_string(),
    );
    // 200 endpoints in 20 services: a ~40 KB file, so a write is not instantaneous.
    let initial: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| reg.endpoint("node-a", &format!("svc{}", i % 20), i, 10000 + i as u16))
        .collect();
    reg.put_each(initial, 16);

    // Churn: endpoints come and go for as long as the test runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = std::thread::spawn({
        let stop = stop.clone();
        let endpoint = etcd.endpoint();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut c = etcd_client::Client::connect([endpoint], None)
                    .await
                    .unwrap();
                let keys = flotilla_registry::Keys::new("/flotilla").unwrap();
                let mut i: u32 = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = 1000 + i % 50;
                    let ep = churn_endpoint(n, i);
                    let key = ep.key(&keys);
                    if i % 3 == 2 {
                        let _ = c.delete(key, None).await;
                    } else {
                        let _ = c.put(key, ep.encode(&keys).unwrap(), None).await;
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
        }
    });

    let mut checked = 0;
    let mut replaced = 0;
    let mut leftovers_seen = 0;
    let mut sizes = BTreeSet::new();
    for round in 0..20u64 {
        let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
        let before = identity(&dest);
        // Let it write (the first write, then writes for the churn) and kill it at a varying
        // moment.
        wait_for("confgen to write", Duration::from_secs(30), || {
            c.assert_running();
            (identity(&dest).is_some() && identity(&dest) != before).then_some(())
        });
        std::thread::sleep(Duration::from_millis(
            (round * 37) % 200 + fastrand::u64(0..50),
        ));
        c.proc.kill();
        replaced += 1;
        leftovers_seen += staged_leftovers(&dest);

        let cfg = std::fs::read_to_string(&dest).expect("the destination exists after kill -9");
        assert!(
            cfg.trim_end().ends_with(TRAILER),
            "round {round}: the destination is cut short ({} bytes):\n{}",
            cfg.len(),
            tail(&cfg, 5)
        );
        assert!(cfg.starts_with("# Generated by confgen"), "round {round}");
        haproxy_check(&dest)
            .unwrap_or_else(|e| panic!("round {round}: haproxy -c rejects the file: {e}"));
        // The backup a rollback would restore is complete too.
        let bak = read(&PathBuf::from(format!("{}.bak", dest.display())));
        assert!(
            bak.is_empty() || bak.trim_end().ends_with(TRAILER),
            "round {round}: <dest>.bak is cut short"
        );
        sizes.insert(cfg.len());
        checked += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
    let log = read(&confdir.path().join("confgen.log"));
    let writes = log.matches("written").count();
    eprintln!(
        "kill -9 loop: {checked} kills, {writes} writes logged, {} distinct file sizes, \
         {leftovers_seen} staged files left by kills (removed at the next start)",
        sizes.len()
    );
    assert_eq!(checked, 20);
    assert!(
        replaced == 20 && writes >= 20,
        "{writes} writes in 20 rounds"
    );
    // A later start removes what killed runs left behind, and brings the file to exactly a
    // full render of the registry as the churn left it (dump → render).
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("leftovers removed", Duration::from_secs(30), || {
        (staged_leftovers(&dest) == 0).then_some(())
    });
    let dump = common::confgen(&["dump", "--etcd-endpoints", &etcd.endpoint()]);
    assert!(dump.status.success());
    let snap = confdir.path().join("snap.json");
    std::fs::write(&snap, &dump.stdout).unwrap();
    let full = common::confgen(&[
        "render",
        "--template",
        main.to_str().unwrap(),
        "--data",
        snap.to_str().unwrap(),
        "--keys",
        "/flotilla/endpoints/,/flotilla/config/haproxy/",
        "--key-prefix",
        "/flotilla",
    ]);
    assert!(full.status.success());
    wait_for(
        "the file equal to a full render",
        Duration::from_secs(30),
        || {
            c.assert_running();
            (std::fs::read(&dest).ok()? == full.stdout).then_some(())
        },
    );
}

fn churn_endpoint(n: u32, i: u32) -> flotilla_registry::Endpoint {
    let container = format!("{:012x}", 0xfeed00000000u64 + u64::from(n));
    flotilla_registry::Endpoint {
        service: format!("churn{}", n % 5),
        instance: format!("node-c-{container}-80"),
        node: "node-c".into(),
        host: "127.0.0.1".into(),
        port: 20000 + (i % 1000) as u16,
        proto: flotilla_registry::Proto::Tcp,
        container,
        image: "flotilla/test:1".into(),
        tags: vec![],
        meta: Default::default(),
        health: flotilla_registry::Health::None,
        registered_at: "2026-01-01T00:00:00Z".into(),
    }
}

/// Staged files (`.<name>.confgen-*`) beside `dest`.
fn staged_leftovers(dest: &Path) -> usize {
    let name = dest.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".{name}.confgen-"))
        })
        .count()
}
