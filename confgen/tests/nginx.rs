//! The shipped nginx template against a real etcd and a real nginx: its render passes
//! `nginx -t` as the check_cmd, and nginx routes by host and path after a `proxyctl` reload.

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
    // reloads. A free port can be taken by another test between free_port() and nginx's bind
    // (seen once: "nginx to listen" timed out in a full run): nginx then exits, and the test
    // takes another port.
    let mut attempt = 0;
    let (port, _nginx) = loop {
        attempt += 1;
        let port = free_port();
        reg.put("/flotilla/config/nginx/listen", format!("127.0.0.1:{port}"));
        std::fs::write(
            &dest,
            format!(
                "pid {};\nerror_log {};\nevents {{}}\nhttp {{\n    access_log off;\n    \
                 server {{ listen 127.0.0.1:{port}; return 503; }}\n}}\n",
                pid.display(),
                d.join("error.log").display()
            ),
        )
        .unwrap();
        let mut n = Nginx::start(&dest, &pid, d);
        let deadline = Instant::now() + Duration::from_secs(15);
        let exited = loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && pid.exists() {
                break None;
            }
            if let Some(status) = n
                .master
                .0
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                break Some(status);
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening on 127.0.0.1:{port} after 15 s; its output:\n{}\nerror.log:\n{}",
                std::fs::read_to_string(d.join("nginx.out")).unwrap_or_default(),
                std::fs::read_to_string(d.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        match exited {
            None => break (port, n),
            Some(status) => {
                let out = std::fs::read_to_string(d.join("nginx.out")).unwrap_or_default();
                assert!(
                    attempt < 3 && out.contains("Address already in use"),
                    "nginx exited ({status}) on its bootstrap config:\n{out}"
                );
            }
        }
    };
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
