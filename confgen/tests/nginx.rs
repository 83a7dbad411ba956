//! The shipped nginx template against a real etcd and a real nginx: its render passes
//! `nginx -t` as the check_cmd, and nginx routes by host and path after a `proxyctl` reload;
//! with Debian's stream module loaded, a TCP service is proxied (a plain TCP backend, not HTTP)
//! and follows endpoint changes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, read, repo, tail, workspace_bin, Confdir, Confgen, Registry};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::haproxy::StaticBackend;
use flotilla_harness::{free_port, require, wait_for, KillOnDrop};

/// nginx (master + workers) on a config file; the master is SIGQUIT, then SIGKILLed, on drop.
struct Nginx {
    master: KillOnDrop,
    pid_file: std::path::PathBuf,
}

impl Nginx {
    fn start(config: &Path, pid_file: &Path, dir: &Path) -> Nginx {
        let log = std::fs::File::create(dir.join("nginx.out")).unwrap();
        let child = Command::new(require("nginx", "nginx"))
            .arg("-c")
            .arg(config)
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start nginx");
        Nginx {
            master: KillOnDrop(Some(child)),
            pid_file: pid_file.to_owned(),
        }
    }

    /// nginx on a bootstrap config `config(ports)` written to `dest`, listening on `n` free
    /// 127.0.0.1 ports, once every port accepts and the pid file exists. A free port can be
    /// taken by another test between free_port() and nginx's bind (seen once: "nginx to
    /// listen" timed out in a full run): nginx then exits, and it is started again on other
    /// ports (3 attempts). A nginx that does not listen fails with its output and error.log.
    fn bootstrap(
        dest: &Path,
        pid: &Path,
        dir: &Path,
        n: usize,
        config: impl Fn(&[u16]) -> String,
    ) -> (Vec<u16>, Nginx) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
            std::fs::write(dest, config(&ports)).unwrap();
            let mut nginx = Nginx::start(dest, pid, dir);
            let deadline = Instant::now() + Duration::from_secs(15);
            let exited = loop {
                if ports
                    .iter()
                    .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
                    && pid.exists()
                {
                    break None;
                }
                if let Some(status) = nginx
                    .master
                    .0
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    break Some(status);
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx not listening on 127.0.0.1:{ports:?} after 15 s; its output:\n{}\n\
                     error.log:\n{}",
                    std::fs::read_to_string(dir.join("nginx.out")).unwrap_or_default(),
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            match exited {
                None => return (ports, nginx),
                Some(status) => {
                    let out = std::fs::read_to_string(dir.join("nginx.out")).unwrap_or_default();
                    assert!(
                        attempt < 3 && out.contains("Address already in use"),
                        "nginx exited ({status}) on its bootstrap config:\n{out}"
                    );
                }
            }
        }
    }

    /// The master's pid (nginx's own pid file says the same while it runs).
    fn master_pid(&self) -> u32 {
        self.master.pid().expect("nginx master")
    }

    /// Fails with nginx's output and error log if the master has exited.
    fn assert_running(&mut self, dir: &Path) {
        if let Some(status) = self
            .master
            .0
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!(
                "nginx exited ({status}); its output:\n{}\nerror.log:\n{}",
                std::fs::read_to_string(dir.join("nginx.out")).unwrap_or_default(),
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Workers exit when their master does; give them a moment, then kill whatever is left.
        self.master.signal(nix::sys::signal::Signal::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(c) = self.master.0.as_mut() {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.master.kill();
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

#[test]
fn the_shipped_nginx_template_passes_nginx_t_and_nginx_routes_after_a_reload() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    std::fs::copy(
        repo().join("templates/templates/nginx.conf.tmpl"),
        confdir.template_path("nginx.conf.tmpl"),
    )
    .unwrap();
    let d = confdir.path();
    let dest = confdir.out("nginx.conf");
    let pid = d.join("nginx.pid");
    let tmp = d.join("nginx-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    for (k, v) in [
        ("pid", pid.display().to_string()),
        ("error_log", d.join("error.log").display().to_string()),
        ("temp_dir", tmp.display().to_string()),
        ("worker_processes", "1".into()),
    ] {
        reg.put(&format!("/flotilla/config/nginx/{k}"), v);
    }
    let nginx = require("nginx", "nginx");
    // The shipped resource's fields, with paths into the temp dir.
    confdir.resource(
        "nginx",
        &format!(
            r#"[template]
src = "nginx.conf.tmpl"
dest = "{dest}"
prefix = "/flotilla"
keys = ["/endpoints/", "/config/nginx/"]
check_cmd = "{nginx} -t -q -c {{{{src}}}}"
reload_cmd = "{proxyctl} reload --proxy nginx --config {dest} --pid-file {pid} --nginx-bin {nginx} --timeout 10s"
wait = "20ms:200ms"
"#,
            dest = dest.display(),
            nginx = nginx.display(),
            proxyctl = workspace_bin("proxyctl").display(),
            pid = pid.display(),
        ),
    );
    let web = StaticBackend::start("web-1");
    let api = StaticBackend::start("api-1");
    reg.put_endpoint("node-a", "web", 1, web.port());
    reg.put("/flotilla/config/services/api/path", "/api");
    reg.put_endpoint("node-a", "api", 2, api.port());

    // nginx starts on a bootstrap config; --onetime renders, checks (nginx -t), writes and
    // reloads.
    let (ports, _nginx) = Nginx::bootstrap(&dest, &pid, d, 1, |ports| {
        format!(
            "pid {};\nerror_log {};\nevents {{}}\nhttp {{\n    access_log off;\n    \
             server {{ listen 127.0.0.1:{}; return 503; }}\n}}\n",
            pid.display(),
            d.join("error.log").display(),
            ports[0]
        )
    });
    let port = ports[0];
    reg.put("/flotilla/config/nginx/listen", format!("127.0.0.1:{port}"));
    let o = common::confgen(&[
        "run",
        "--confdir",
        d.to_str().unwrap(),
        "--onetime",
        "--etcd-endpoints",
        &etcd.endpoint(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let get = |host: &str, path: &str| {
        http_get(port, host, path, Duration::from_secs(3))
            .ok()
            .map(|(code, body)| (code, body.trim().to_string()))
    };
    wait_for(
        "nginx to route web.localhost",
        Duration::from_secs(15),
        || (get("web.localhost", "/") == Some((200, "web-1".into()))).then_some(()),
    );
    // Old workers (bootstrap config) may take a last connection while they close their
    // listeners: wait for each answer rather than assert the first one.
    let answers = |host: &str, path: &str, code: u16| {
        wait_for(
            &format!("{host}{path} answered {code}"),
            Duration::from_secs(15),
            || (get(host, path).map(|r| r.0) == Some(code)).then_some(()),
        )
    };
    answers("api.localhost", "/", 200);
    // Path prefix on the default server: routed to api (busybox: 404 for a missing file).
    answers("other", "/api/x", 404);
    answers("other", "/x", 503);

    // The daemon: a new endpoint and service, applied and reloaded through proxyctl.
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    let shop = StaticBackend::start("shop-1");
    reg.put_endpoint("node-b", "shop", 3, shop.port());
    wait_for(
        "nginx to route shop.localhost",
        Duration::from_secs(30),
        || {
            c.assert_running();
            (get("shop.localhost", "/") == Some((200, "shop-1".into()))).then_some(())
        },
    );
    let log = c.wait_log("written and reloaded", Duration::from_secs(10));
    assert!(!log.contains("apply failed"), "{}", tail(&log, 20));
    assert!(read(&dest).contains(&shop.addr()));
}

/// Where Debian's `libnginx-mod-stream` puts nginx's stream module (`dpkg -L`).
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// A plain TCP service on 127.0.0.1 (not HTTP): it speaks first, `<name> ready\n`, then answers
/// the client's line with `<name> echo <line>\n` and closes. Counts the connections it accepted.
/// Stopped (listener closed, thread joined) on drop.
struct TcpBackend {
    name: &'static str,
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpBackend {
    fn start(name: &'static str) -> TcpBackend {
        use std::io::{BufRead, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (acc, st) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                acc.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                    if writeln!(conn, "{name} ready").is_err() {
                        return;
                    }
                    let mut line = String::new();
                    let mut reader = std::io::BufReader::new(&conn);
                    if reader.read_line(&mut line).is_ok() && line.ends_with('\n') {
                        let _ = write!(&conn, "{name} echo {line}");
                    }
                });
            }
        });
        TcpBackend {
            name,
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop; it sees `stop` and returns, dropping the listener.
        let _ = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.port).into(),
            Duration::from_secs(1),
        );
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One exchange with whatever answers on 127.0.0.1:`port`: reads the banner, sends a line with
/// a fresh nonce, reads the echo. Some(backend name) if both came back intact from the same
/// backend; None if the connection failed or another answer came (nginx's bootstrap server).
fn exchange(port: u16) -> Option<&'static str> {
    use std::io::{BufRead, Write};
    static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        NONCE.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let conn = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(3),
    )
    .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    conn.set_write_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut reader = std::io::BufReader::new(&conn);
    let mut banner = String::new();
    reader.read_line(&mut banner).ok()?;
    let name = ["echo-1", "echo-2"]
        .into_iter()
        .find(|n| banner == format!("{n} ready\n"))?;
    writeln!(&conn, "ping {nonce}").ok()?;
    let mut echo = String::new();
    reader.read_line(&mut echo).ok()?;
    (echo == format!("{name} echo ping {nonce}\n")).then_some(name)
}

/// Waits until `n` exchanges in a row through `port` are answered by `want` (old nginx workers
/// may take a last connection while they close their listeners), then proves it: `n` more
/// exchanges, every one answered by `want`, and `other` accepted no connection meanwhile.
fn only_through(port: u16, want: &TcpBackend, other: &TcpBackend, n: usize) {
    let mut run = 0;
    wait_for(
        &format!(
            "{n} exchanges in a row through nginx answered by {}",
            want.name
        ),
        Duration::from_secs(20),
        || {
            run = if exchange(port) == Some(want.name) {
                run + 1
            } else {
                0
            };
            (run >= n).then_some(())
        },
    );
    let (before_want, before_other) = (want.accepted(), other.accepted());
    for i in 0..n {
        assert_eq!(exchange(port), Some(want.name), "exchange {i} of {n}");
    }
    assert_eq!(want.accepted() - before_want, n, "{} accepted", want.name);
    assert_eq!(other.accepted(), before_other, "{} accepted", other.name);
}

/// Waits until both backends answered through `port` (round robin over both).
fn both_through(port: u16) {
    let mut seen = std::collections::BTreeSet::new();
    wait_for(
        "both backends answering through nginx",
        Duration::from_secs(20),
        || {
            if let Some(name) = exchange(port) {
                seen.insert(name);
            }
            (seen.len() == 2).then_some(())
        },
    );
}

#[test]
fn the_shipped_nginx_template_proxies_tcp_services_through_the_stream_module() {
    assert!(
        Path::new(STREAM_MODULE).is_file(),
        "{STREAM_MODULE} is missing (Debian package `libnginx-mod-stream`): run `scripts/setup` \
         first; this test needs the real module and does not skip"
    );
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    std::fs::copy(
        repo().join("templates/templates/nginx.conf.tmpl"),
        confdir.template_path("nginx.conf.tmpl"),
    )
    .unwrap();
    let d = confdir.path();
    let dest = confdir.out("nginx.conf");
    let pid = d.join("nginx.pid");
    let tmp = d.join("nginx-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let error_log = d.join("error.log");
    for (k, v) in [
        ("pid", pid.display().to_string()),
        ("error_log", error_log.display().to_string()),
        ("temp_dir", tmp.display().to_string()),
        ("worker_processes", "1".into()),
        ("stream_module", STREAM_MODULE.into()),
        ("tcp_bind_address", "127.0.0.1".into()),
    ] {
        reg.put(&format!("/flotilla/config/nginx/{k}"), v);
    }
    let nginx = require("nginx", "nginx");
    // The shipped resource's fields, with paths into the temp dir.
    confdir.resource(
        "nginx",
        &format!(
            r#"[template]
src = "nginx.conf.tmpl"
dest = "{dest}"
prefix = "/flotilla"
keys = ["/endpoints/", "/config/nginx/"]
check_cmd = "{nginx} -t -q -c {{{{src}}}}"
reload_cmd = "{proxyctl} reload --proxy nginx --config {dest} --pid-file {pid} --nginx-bin {nginx} --timeout 10s"
wait = "20ms:200ms"
"#,
            dest = dest.display(),
            nginx = nginx.display(),
            proxyctl = workspace_bin("proxyctl").display(),
            pid = pid.display(),
        ),
    );

    // nginx starts with the stream module and both ports already bound (HTTP, and the TCP
    // service's port answered by a `return`), so the reloads only ever keep these sockets.
    let (ports, mut nginx_proc) = Nginx::bootstrap(&dest, &pid, d, 2, |ports| {
        format!(
            "load_module {STREAM_MODULE};\npid {};\nerror_log {};\nevents {{}}\n\
             http {{\n    access_log off;\n    server {{ listen 127.0.0.1:{}; return 503; }}\n}}\n\
             stream {{\n    server {{ listen 127.0.0.1:{}; return \"bootstrap\\n\"; }}\n}}\n",
            pid.display(),
            error_log.display(),
            ports[0],
            ports[1]
        )
    });
    let (http_port, tcp_port) = (ports[0], ports[1]);
    let master = nginx_proc.master_pid();
    assert_eq!(
        exchange(tcp_port),
        None,
        "the bootstrap answers, not a backend"
    );
    reg.put(
        "/flotilla/config/nginx/listen",
        format!("127.0.0.1:{http_port}"),
    );
    reg.put("/flotilla/config/services/echo/mode", "tcp");
    reg.put(
        "/flotilla/config/services/echo/service_port",
        tcp_port.to_string(),
    );
    let b1 = TcpBackend::start("echo-1");
    let b2 = TcpBackend::start("echo-2");
    let addr = |b: &TcpBackend| format!("127.0.0.1:{}", b.port);
    let k1 = reg.put_endpoint("node-a", "echo", 1, b1.port);

    // --onetime: render, nginx -t on the staged file, write, proxyctl reload.
    let o = common::confgen(&[
        "run",
        "--confdir",
        d.to_str().unwrap(),
        "--onetime",
        "--etcd-endpoints",
        &etcd.endpoint(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let conf = read(&dest);
    assert!(
        conf.starts_with(&format!(
            "# Generated by confgen from nginx.conf.tmpl. Do not edit: changes are overwritten.\n\
             load_module {STREAM_MODULE};\n"
        )),
        "{conf}"
    );
    assert!(
        conf.contains(&format!(
            "\nstream {{\n    upstream tcp_echo {{\n        server {} max_fails=3 fail_timeout=10s;\n    }}\n    \
             server {{\n        listen 127.0.0.1:{tcp_port};\n        proxy_pass tcp_echo;\n    }}\n}}\n",
            addr(&b1)
        )),
        "{conf}"
    );
    only_through(tcp_port, &b1, &b2, 10);
    // The HTTP side of the same config still answers (no HTTP service: the default 503).
    assert_eq!(
        http_get(http_port, "other", "/", Duration::from_secs(3))
            .ok()
            .map(|r| r.0),
        Some(503)
    );

    // The daemon. Each step below changes what answers, so each proves a reload reached nginx.
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    let reloads = |c: &mut Confgen, n: usize| {
        let log = c.wait_log_count("written and reloaded", n, Duration::from_secs(20));
        assert!(!log.contains("apply failed"), "{}", tail(&log, 20));
    };
    // A second backend: both answer.
    let k2 = reg.put_endpoint("node-b", "echo", 2, b2.port);
    reloads(&mut c, 1);
    both_through(tcp_port);
    // Its weight 0 renders as `down`: only the first answers again.
    let (_, drained) = reg.endpoint_meta("node-b", "echo", 2, b2.port, &[("weight", "0")]);
    reg.put(&k2, drained);
    reloads(&mut c, 2);
    assert!(
        read(&dest).contains(&format!(
            "server {} max_fails=3 fail_timeout=10s down;",
            addr(&b2)
        )),
        "{}",
        read(&dest)
    );
    only_through(tcp_port, &b1, &b2, 10);
    // Back to weight 1, then the first endpoint removed: only the second answers, although
    // the first backend still listens.
    reg.put_endpoint("node-b", "echo", 2, b2.port);
    reloads(&mut c, 3);
    both_through(tcp_port);
    reg.delete(&k1);
    reloads(&mut c, 4);
    let conf = read(&dest);
    assert!(!conf.contains(&addr(&b1)), "{conf}");
    assert!(conf.contains(&addr(&b2)), "{conf}");
    only_through(tcp_port, &b2, &b1, 20);

    // Reloads, not restarts: the same master throughout, as its pid file says.
    c.assert_running();
    nginx_proc.assert_running(d);
    assert_eq!(nginx_proc.master_pid(), master);
    assert_eq!(read(&pid).trim(), master.to_string());
    let log = c.log();
    assert!(!log.contains("apply failed"), "{}", tail(&log, 20));
    let errors = read(&error_log);
    assert!(!errors.contains("[emerg]"), "{errors}");
}
