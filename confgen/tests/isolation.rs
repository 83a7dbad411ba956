//! One bad container, host or key never freezes or hijacks routing for everyone (the confgen
//! half of the threat model in docs/OPERATIONS.md): real etcd, real HAProxy reloaded through
//! `proxyctl`, the shipped template, traffic through HAProxy.
//!
//! Each test writes a *valid* record that today's proxies let take routing down or steal
//! traffic, then proves: the other services keep updating and serving with 0 failed requests,
//! the bad input is named in one log line and a metric, and nothing else is lost. Options are
//! given as `FLOTILLA_*` environment variables.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::setup::Setup;
use common::{http_get, read, tail};
use flotilla_harness::haproxy::StaticBackend;
use flotilla_harness::wait_for;

const WAIT: &str = "wait = \"20ms:200ms\"";

/// Requests to `<service>.localhost` through HAProxy every 10 ms until stopped: how many were
/// answered 200 by each body, and how many failed.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(http_port: u16, service: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicUsize::new(0));
        let host = format!("{service}.localhost");
        let handle = std::thread::spawn({
            let (stop, failed) = (stop.clone(), failed.clone());
            move || {
                let mut bodies = Vec::new();
                // Bounded: at most 10,000 requests (100 s at 10 ms).
                for _ in 0..10_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match http_get(http_port, &host, "/", Duration::from_secs(3)) {
                        Ok((200, body)) => bodies.push(body.trim().to_string()),
                        other => {
                            eprintln!("load on {host}: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                bodies
            }
        });
        Load {
            stop,
            failed,
            handle: Some(handle),
        }
    }

    /// Stops; returns (bodies answered, failed requests).
    fn stop(mut self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let bodies = self.handle.take().unwrap().join().unwrap();
        (bodies, self.failed.load(Ordering::Relaxed))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn excluded(s: &Setup, reason: &str) -> f64 {
    s.confgen
        .as_ref()
        .unwrap()
        .metric("confgen_endpoints_excluded", &[("reason", reason)])
}

/// web served by alpha, then load on it; returns the setup, alpha and the load.
fn web_under_load(env: &[(&str, &str)]) -> (Setup, StaticBackend, Load) {
    let mut s = Setup::start(WAIT);
    let alpha = StaticBackend::start("alpha");
    s.reg.put_endpoint("node-a", "web", 1, alpha.port());
    s.start_confgen_with(env);
    s.wait_served_by("web", &["alpha"], Duration::from_secs(30));
    let load = Load::start(s.http_port, "web");
    (s, alpha, load)
}

/// Another web endpoint comes: it must be served (the registry keeps flowing).
fn web_keeps_updating(s: &Setup) -> StaticBackend {
    let beta = StaticBackend::start("beta");
    s.reg.put_endpoint("node-a", "web", 2, beta.port());
    s.wait_served_by("web", &["alpha", "beta"], Duration::from_secs(30));
    beta
}

#[test]
fn a_weight_haproxy_refuses_is_left_out_and_every_other_service_keeps_updating() {
    let (mut s, _alpha, load) = web_under_load(&[]);
    let evil = StaticBackend::start("evil");
    // Valid as a record (meta values are free-form), refused by HAProxy (weight 0-256).
    let (key, v) = s
        .reg
        .endpoint_meta("node-b", "evil", 9, evil.port(), &[("weight", "300")]);
    s.reg.put(&key, v);
    let _beta = web_keeps_updating(&s);
    let log = s
        .confgen()
        .wait_log("endpoint left out", Duration::from_secs(10));
    let line = log
        .lines()
        .find(|l| l.contains("endpoint left out"))
        .unwrap();
    assert!(
        line.contains(&key) && line.contains("weight"),
        "the log line names the key and the field: {line}"
    );
    assert_eq!(excluded(&s, "weight"), 1.0);
    assert!(!read(&s.dest()).contains("weight 300"));
    let (bodies, failed) = load.stop();
    assert_eq!(failed, 0, "failed requests to web while evil was refused");
    assert!(bodies.iter().all(|b| b == "alpha" || b == "beta"));
    s.confgen().assert_running();
}

#[test]
fn an_endpoint_the_check_rejects_is_quarantined_and_the_rest_flows_until_it_is_fixed() {
    // DNS names allowed: a name that does not resolve passes every rule confgen knows and only
    // HAProxy's check rejects it, so confgen has to find it by checking without it.
    let (mut s, _alpha, load) = web_under_load(&[("FLOTILLA_ALLOW_DNS_HOSTS", "true")]);
    let evil = StaticBackend::start("evil");
    let (key, v) = s.reg.endpoint("node-b", "evil", 9, evil.port());
    let mut rec: serde_json::Value = serde_json::from_slice(&v).unwrap();
    rec["host"] = "no-such-host.invalid".into();
    s.reg.put(&key, serde_json::to_vec(&rec).unwrap());
    let _beta = web_keeps_updating(&s);
    let log = s
        .confgen()
        .wait_log("left out of this resource", Duration::from_secs(10));
    let line = log
        .lines()
        .find(|l| l.contains("left out of this resource"))
        .unwrap();
    assert!(
        line.contains(&key) && line.contains("no-such-host.invalid"),
        "the log line names the endpoint and HAProxy's complaint: {line}"
    );
    let q = |s: &Setup| {
        s.confgen
            .as_ref()
            .unwrap()
            .metric("confgen_endpoints_quarantined", &[("resource", "haproxy")])
    };
    assert_eq!(q(&s), 1.0);
    assert!(!read(&s.dest()).contains("no-such-host"));
    // Fixed by its owner: tried again, served.
    s.reg.put(&key, v);
    wait_for("evil served once fixed", Duration::from_secs(30), || {
        s.get("evil")
            .ok()
            .filter(|(c, b)| *c == 200 && b.trim() == "evil")
    });
    wait_for("the quarantine released", Duration::from_secs(10), || {
        (q(&s) == 0.0).then_some(())
    });
    let (_, failed) = load.stop();
    assert_eq!(failed, 0, "failed requests to web");
    s.confgen().assert_running();
}

#[test]
fn a_check_failure_the_endpoints_cannot_fix_backs_off_instead_of_retrying_per_change() {
    let (mut s, _alpha, load) = web_under_load(&[]);
    // The operator breaks a setting: every render fails the check, whatever the endpoints.
    s.reg
        .put("/flotilla/config/haproxy/hard_stop_after", "banana");
    s.confgen()
        .wait_log("check_cmd failed", Duration::from_secs(30));
    let checks = |s: &Setup| {
        s.confgen
            .as_ref()
            .unwrap()
            .metric("confgen_failures_total", &[("kind", "check")])
    };
    let before = checks(&s);
    let reloads = s.reloads();
    // 30 endpoint changes over about 3 s.
    let spare: Vec<StaticBackend> = (0..3)
        .map(|i| StaticBackend::start(&format!("s{i}")))
        .collect();
    for i in 0..30u32 {
        // Each put changes its record (another port than the key's previous one).
        s.reg.put_endpoint(
            "node-a",
            "web",
            10 + i % 3,
            spare[((i / 3) % 3) as usize].port(),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = checks(&s);
    // Backoff 1 s doubling: about 3 checks in 3 s; one per change would be 30.
    assert!(
        after - before <= 6.0,
        "{} failed checks for 30 endpoint changes: retried per change\n{}",
        after - before,
        tail(&s.confgen().log(), 30)
    );
    assert_eq!(s.reloads(), reloads, "a failing config was reloaded");
    // The fix is a config change: applied at once, not after the backoff.
    s.reg.put("/flotilla/config/haproxy/hard_stop_after", "5s");
    wait_for("the fixed config applied", Duration::from_secs(10), || {
        read(&s.dest()).contains("hard-stop-after 5s").then_some(())
    });
    let (_, failed) = load.stop();
    assert_eq!(failed, 0);
    s.confgen().assert_running();
}

#[test]
fn a_node_outside_the_claim_policy_never_receives_a_services_traffic() {
    let mut s = Setup::start(WAIT);
    s.reg
        .put("/flotilla/policy/services/web", r#"{"nodes": ["node-a"]}"#);
    let alpha = StaticBackend::start("alpha");
    s.reg.put_endpoint("node-a", "web", 1, alpha.port());
    s.start_confgen();
    s.wait_served_by("web", &["alpha"], Duration::from_secs(30));
    let load = Load::start(s.http_port, "web");
    // node-b has valid credentials and a live node record, and announces web.
    let rogue = StaticBackend::start("rogue");
    let (rogue_key, v) = s.reg.endpoint("node-b", "web", 2, rogue.port());
    s.reg.put(&rogue_key, v);
    let _beta = web_keeps_updating(&s);
    let log = s
        .confgen()
        .wait_log("endpoint left out", Duration::from_secs(10));
    assert!(
        log.lines()
            .any(|l| l.contains(&rogue_key) && l.contains("claim policy")),
        "{}",
        tail(&log, 20)
    );
    assert_eq!(excluded(&s, "claim"), 1.0);
    let (bodies, failed) = load.stop();
    assert_eq!(failed, 0);
    assert!(
        !bodies.iter().any(|b| b == "rogue"),
        "the rogue endpoint was served"
    );
    assert!(!read(&s.dest()).contains(&format!("127.0.0.1:{}", rogue.port())));
    // The operator allows node-b: now it is served.
    s.reg.put(
        "/flotilla/policy/services/web",
        r#"{"nodes": ["node-a", "node-b"]}"#,
    );
    s.wait_served_by("web", &["alpha", "beta", "rogue"], Duration::from_secs(30));
    s.confgen().assert_running();
}

#[test]
fn endpoint_meta_can_neither_take_a_route_nor_change_a_services_mode() {
    let mut s = Setup::start(WAIT);
    let api = StaticBackend::start("api");
    let web = StaticBackend::start("web");
    s.reg.put("/flotilla/config/services/api/path", "/api");
    s.reg.put_endpoint("node-a", "api", 1, api.port());
    s.reg.put_endpoint("node-a", "web", 2, web.port());
    s.start_confgen();
    s.wait_served_by("web", &["web"], Duration::from_secs(30));
    let via_path = |s: &Setup, path: &str| {
        http_get(s.http_port, "other.localhost", path, Duration::from_secs(3))
    };
    // busybox httpd answers 404 for a path it has no file for; HAProxy 503 for an unrouted one.
    wait_for("/api routed", Duration::from_secs(30), || {
        via_path(&s, "/api/x").ok().filter(|(c, _)| *c == 404)
    });
    let load = Load::start(s.http_port, "web");
    // A rogue service claims a longer prefix under /api, and a rogue endpoint joins web (open:
    // no policy) saying mode=tcp on a port of its choosing. Its node name sorts first.
    let rogue = StaticBackend::start("rogue");
    let tcp_port = flotilla_harness::free_port();
    let (k, v) = s.reg.endpoint_meta(
        "aaa-rogue",
        "login",
        3,
        rogue.port(),
        &[("path", "/api/v2/login")],
    );
    s.reg.put(&k, v);
    let port_s = tcp_port.to_string();
    let (k, v) = s.reg.endpoint_meta(
        "aaa-rogue",
        "web",
        4,
        rogue.port(),
        &[("mode", "tcp"), ("service_port", &port_s)],
    );
    s.reg.put(&k, v);
    // The rogue web endpoint is a server of web (the service is open), still over HTTP.
    s.wait_served_by("web", &["web", "rogue"], Duration::from_secs(30));
    let cfg = read(&s.dest());
    assert!(!cfg.contains("frontend tcp_web"), "{cfg}");
    assert!(
        !cfg.contains("path_login"),
        "a route from endpoint meta:\n{cfg}"
    );
    assert!(
        !cfg.contains("use_backend svc_login if path_login"),
        "the rogue service got a path route:\n{cfg}"
    );
    assert!(cfg.contains("use_backend svc_api if path_api"), "{cfg}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", tcp_port)).is_err(),
        "a TCP frontend was opened on the port the endpoint chose"
    );
    let (_, failed) = load.stop();
    assert_eq!(failed, 0);
    s.confgen().assert_running();
}

#[test]
fn another_nodes_instance_id_is_refused_and_the_victim_keeps_serving() {
    let (mut s, alpha, load) = web_under_load(&[]);
    // node-b writes under its own prefix a record reusing node-a's instance id.
    let rogue = StaticBackend::start("rogue");
    let (victim_key, v) = s.reg.endpoint("node-a", "web", 1, alpha.port());
    let instance = victim_key.rsplit('/').next().unwrap().to_string();
    let mut rec: serde_json::Value = serde_json::from_slice(&v).unwrap();
    rec["node"] = "node-b".into();
    rec["port"] = rogue.port().into();
    let rogue_key = format!("/flotilla/endpoints/node-b/web/{instance}");
    s.reg.put(&rogue_key, serde_json::to_vec(&rec).unwrap());
    let _beta = web_keeps_updating(&s);
    let log = s
        .confgen()
        .wait_log("skipping an invalid record", Duration::from_secs(10));
    assert!(
        log.lines().any(|l| l.contains(&rogue_key)
            && l.contains("instance")
            && l.contains("must start with the node name")),
        "{}",
        tail(&log, 20)
    );
    let (bodies, failed) = load.stop();
    assert_eq!(failed, 0);
    assert!(!bodies.iter().any(|b| b == "rogue"));
    s.confgen().assert_running();
}

#[test]
fn endpoints_are_routed_only_while_their_node_has_a_live_record() {
    let (mut s, _alpha, load) = web_under_load(&[]);
    // Written straight to etcd, without the node record presence would write first.
    let ghost = StaticBackend::start("ghost");
    let (k, v) = s.reg.endpoint("node-ghost", "web", 5, ghost.port());
    s.reg.put_raw(&k, v);
    let _beta = web_keeps_updating(&s);
    assert_eq!(excluded(&s, "no_node_record"), 1.0);
    let log = s.confgen().log();
    assert!(
        log.lines()
            .any(|l| l.contains(&k) && l.contains("no live node record")),
        "{}",
        tail(&log, 20)
    );
    // The node record appears: routed; it goes (as when its lease expires): not routed.
    let (nk, nv) = s.reg.node_record("node-ghost");
    s.reg.put_raw(&nk, nv);
    s.wait_served_by("web", &["alpha", "beta", "ghost"], Duration::from_secs(30));
    s.reg.delete(&nk);
    s.wait_served_by("web", &["alpha", "beta"], Duration::from_secs(30));
    let (_, failed) = load.stop();
    assert_eq!(failed, 0);
    s.confgen().assert_running();
}

#[test]
fn loopback_addresses_from_another_node_are_refused() {
    // This host is node-a; node-b announcing 127.0.0.1 would point every proxy at its own
    // loopback (here: a "secret" service only this host should reach).
    let (mut s, _alpha, load) = web_under_load(&[
        ("FLOTILLA_ALLOW_LOOPBACK", "false"),
        ("FLOTILLA_NODE", "node-a"),
    ]);
    let secret = StaticBackend::start("secret");
    let (k, v) = s.reg.endpoint("node-b", "web", 7, secret.port());
    s.reg.put(&k, v);
    let _beta = web_keeps_updating(&s);
    assert_eq!(excluded(&s, "loopback"), 1.0);
    let log = s.confgen().log();
    assert!(
        log.lines()
            .any(|l| l.contains(&k) && l.contains("loopback")),
        "{}",
        tail(&log, 20)
    );
    let (bodies, failed) = load.stop();
    assert_eq!(failed, 0);
    assert!(!bodies.iter().any(|b| b == "secret"));
    s.confgen().assert_running();
}

#[test]
fn one_node_flooding_the_registry_is_capped_and_the_others_keep_updating() {
    let (mut s, _alpha, load) = web_under_load(&[("FLOTILLA_MAX_ENDPOINTS_PER_NODE", "50")]);
    let sink = StaticBackend::start("flood");
    let flood: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| s.reg.endpoint("node-flood", "flood", 100 + i, sink.port()))
        .collect();
    s.reg.put_each(flood, 16);
    let _beta = web_keeps_updating(&s);
    wait_for("the flood capped", Duration::from_secs(30), || {
        (excluded(&s, "node_cap") == 250.0).then_some(())
    });
    let cfg = read(&s.dest());
    let flood_servers = cfg
        .lines()
        .filter(|l| l.trim_start().starts_with("server node-flood-"))
        .count();
    assert_eq!(flood_servers, 50, "{}", tail(&cfg, 10));
    // One log line for the node's 250, not 250 lines.
    let log = s.confgen().log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("WARN") && l.contains("endpoint left out") && l.contains("node-flood")
        })
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("cap of 50 endpoints"), "{}", lines[0]);
    let (_, failed) = load.stop();
    assert_eq!(failed, 0);
    s.confgen().assert_running();
}

/// With real credentials (etcd TLS + RBAC, as docs/OPERATIONS.md lays them out): a host whose
/// credentials are valid announces another team's service; the claim policy, which only the
/// policy role may write, keeps it out of every config, and the host cannot change the policy.
#[test]
fn a_host_with_valid_credentials_cannot_join_another_teams_service() {
    use flotilla_harness::etcd::TlsEtcd;
    let t = TlsEtcd::start();
    let login = |user: &str, password: &str| flotilla_registry::EtcdArgs {
        endpoints: vec![t.etcd.endpoint()],
        cacert: Some(t.tls.ca.clone()),
        cert: Some(t.tls.client_cert.clone()),
        key: Some(t.tls.client_key.clone()),
        user: Some(user.into()),
        password: Some(password.into()),
        ..flotilla_registry::EtcdArgs::default()
    };
    let node_a = common::Registry::connect_with(&login("node-a", "node-a-secret"));
    let node_b = common::Registry::connect_with(&login("node-b", "node-b-secret"));
    let policy = common::Registry::connect_with(&login("policy-admin", "policy-admin-secret"));
    policy.put("/flotilla/policy/services/web", r#"{"nodes": ["node-a"]}"#);
    node_a.put_endpoint("node-a", "web", 1, 8001);
    // node-b: its own prefix, a valid record, another team's service.
    let rogue = node_b.put_endpoint("node-b", "web", 2, 8002);
    node_b.put_endpoint("node-b", "api", 3, 8003);
    // Nor can it open the service for itself.
    let err = node_b
        .try_put("/flotilla/policy/services/web", r#"{"nodes": ["node-b"]}"#)
        .unwrap_err();
    assert!(err.contains("permission denied"), "{err}");

    let confdir = common::Confdir::new();
    confdir.template(
        "list.tmpl",
        "{% for name, eps in services %}{% for ep in eps %}{{ name }} {{ ep.instance }}\n{% endfor %}{% endfor %}",
    );
    confdir.resource(
        "list",
        &format!(
            "[template]\nsrc = \"list.tmpl\"\ndest = \"{}\"\nprefix = \"/flotilla\"\nkeys = [\"/endpoints/\"]\n",
            confdir.out("list").display()
        ),
    );
    let (ca, cert, key) = (
        t.tls.ca.display().to_string(),
        t.tls.client_cert.display().to_string(),
        t.tls.client_key.display().to_string(),
    );
    let mut c = common::Confgen::start_with_env(
        &confdir,
        &t.etcd.endpoint(),
        &[],
        &[
            ("FLOTILLA_ETCD_CACERT", &ca),
            ("FLOTILLA_ETCD_CERT", &cert),
            ("FLOTILLA_ETCD_KEY", &key),
            ("FLOTILLA_ETCD_USER", "reader"),
            ("FLOTILLA_ETCD_PASSWORD", "reader-secret"),
        ],
    );
    let want = "api node-b-c0ffee000003-8080\nweb node-a-c0ffee000001-8080\n";
    wait_for(
        "the file without node-b's web",
        Duration::from_secs(30),
        || {
            c.assert_running();
            (read(&confdir.out("list")) == want).then_some(())
        },
    );
    let log = c.wait_log("endpoint left out", Duration::from_secs(10));
    assert!(
        log.lines()
            .any(|l| l.contains(&rogue) && l.contains("claim policy")),
        "{}",
        tail(&log, 20)
    );
    assert_eq!(
        c.metric("confgen_endpoints_excluded", &[("reason", "claim")]),
        1.0
    );
}
