//! etcd + HAProxy + a confdir with the shipped HAProxy templates: the setup of the tests that
//! route real traffic through what confgen renders.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flotilla_harness::etcd::Etcd;
use flotilla_harness::haproxy::{Haproxy, TEST_DEFAULTS};
use flotilla_harness::{free_port, require};

use super::{count_lines, http_get, read, tail, workspace_bin, Confdir, Confgen, Registry};

/// etcd + HAProxy + a confdir with the shipped haproxy templates whose resource writes
/// HAProxy's config file and reloads it with `reload.sh` (which logs each reload, keeps a copy of
/// the file it reloaded, can be told to fail once, and then runs `proxyctl reload`).
pub struct Setup {
    // Drop order: confgen first, then HAProxy, etcd, the dir.
    pub confgen: Option<Confgen>,
    pub haproxy: Haproxy,
    pub reg: Registry,
    pub etcd: Etcd,
    pub http_port: u16,
    pub confdir: Confdir,
}

impl Setup {
    pub fn start(resource_extra: &str) -> Setup {
        Setup::start_with(|_, _| resource_extra.to_string())
    }

    /// Like [`Setup::start`], with resource lines that may name HAProxy's files or the confdir
    /// (e.g. `runtime_api = "<its stats socket>"`).
    pub fn start_with(resource_extra: impl FnOnce(&Haproxy, &Confdir) -> String) -> Setup {
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
            // Each test its own (the default is one file for the whole host).
            (
                "server_state_file",
                haproxy.dir().join("server-state").display().to_string(),
            ),
        ] {
            reg.put(&format!("/flotilla/config/haproxy/{k}"), v);
        }
        let confdir = Confdir::new();
        confdir.shipped_haproxy_templates();
        let resource_extra = resource_extra(&haproxy, &confdir);
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

    pub fn start_confgen(&mut self) {
        self.start_confgen_with(&[]);
    }

    /// Starts confgen with extra environment variables (flags are given as `FLOTILLA_*`).
    pub fn start_confgen_with(&mut self, env: &[(&str, &str)]) {
        self.confgen = Some(Confgen::start_with_env(
            &self.confdir,
            &self.etcd.endpoint(),
            &[],
            env,
        ));
    }

    pub fn confgen(&mut self) -> &mut Confgen {
        self.confgen.as_mut().expect("confgen started")
    }

    pub fn dest(&self) -> PathBuf {
        self.haproxy.config_path().to_owned()
    }

    pub fn reloads(&self) -> usize {
        count_lines(&self.confdir.path().join("reloads.log"))
    }

    /// The file as it was when reload number `n` (1-based) ran.
    pub fn reloaded(&self, n: usize) -> String {
        read(&self.confdir.path().join("reloaded").join(n.to_string()))
    }

    pub fn diagnostics(&self) -> String {
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

    pub fn get(&self, service: &str) -> std::io::Result<(u16, String)> {
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
    pub fn wait_served_by(&self, service: &str, bodies: &[&str], timeout: Duration) {
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
