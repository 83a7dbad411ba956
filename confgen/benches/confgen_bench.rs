//! confgen benchmark (not a timed test): real etcd, the release binary, the shipped HAProxy
//! template (`templates/templates/haproxy*.tmpl`).
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-confgen-bench cargo bench -p confgen --bench confgen_bench
//! CONFGEN_BENCH_SCALES=10k CONFGEN_BENCH_ROUNDS=1 …   # one scale (10k | 100k), fewer rounds
//! ```
//!
//! `cargo bench` builds the `confgen` binary with the bench profile (= release) and hands its
//! path to this program (`CARGO_BIN_EXE_confgen`). The resource is the shipped
//! `conf.d/haproxy.toml` with `dest` in a temp dir and **no** `check_cmd` / `reload_cmd` (the
//! figures are confgen's own; `haproxy -c` on a 550 KB config adds ~50 ms, a reload more).
//!
//! Registry: N endpoints in N/20 services (20 per service, spread over 50 nodes), hosts
//! `127.x.y.z` (synthetic, nothing listens), loaded with etcd transactions of 128 puts. Every 10th
//! service has meta `path`, every 25th `check_path`, every 100th `mode=tcp` + `service_port`.
//!
//! Per round (a fresh daemon each round):
//! 1. change → file: one endpoint's port changes (one etcd put), then the next after 40-80 ms
//!    (the shipped `wait = "20ms:1s"`: a change after ≥ 20 ms of quiet is applied at once).
//!    Latency = put response → inotify event of the rename of the destination whose content has
//!    the new `host:port`. Also the daemon's own `confgen_change_to_write_seconds` histogram.
//! 2. RSS: VmHWM of the daemon from /proc after the changes (and after the burst).
//! 3. burst: every endpoint gets a new port, 10,000 single puts (64 in flight); CPU time
//!    (utime + stime from /proc/PID/stat) and renders (`confgen_renders`) from just before the
//!    first put until the file holds all 10,000 new addresses and no render came for 1.5 s.
//! 4. `--onetime` (daemon stopped, destination removed so it is written): wall time of the whole
//!    process, start to exit, including connecting, listing etcd, rendering and writing.
//!
//! Side by side with confd (`CONFD=/path/to/confd`, built from its public source outside this
//! repository): the same etcd also holds every endpoint record in confd's usual layout,
//! `/confd/services/<service>/<instance>` (the same JSON), and confd renders [`CONFD_TEMPLATE`],
//! the same shape as [`PLAIN_TEMPLATE`] written the way confd templates are (`lsdir`, `gets`,
//! `json`). After confgen's phases of a round, confd's: `confd -watch -backend etcdv3` started
//! alone (confgen stopped, so neither takes the other's CPU), the same change → file measurement
//! on its keys, its VmHWM, then `confd -onetime` timed like confgen's. The table has the ratios.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Txn, TxnOp};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::free_port;
use flotilla_registry::{Endpoint, Health, Keys, Proto};
use futures::StreamExt;

const PER_SERVICE: usize = 20;
const NODES: usize = 50;
const TXN_OPS: usize = 128;

/// `CONFGEN_BENCH_TEMPLATE`: `shipped` (the shipped HAProxy template, per-service fragments) or
/// `plain` (the obvious template a confd user writes: loops over `services`, nothing special).
fn template_kind() -> String {
    std::env::var("CONFGEN_BENCH_TEMPLATE").unwrap_or_else(|_| "shipped".into())
}

/// An HAProxy template written the way every confd template is: a host rule per service, then a
/// backend per service with a server line per endpoint.
const PLAIN_TEMPLATE: &str = "\
{% set domain = getv(key=\"/config/haproxy/domain\", default=\"localhost\") %}\
global
    maxconn 4000

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend http
    bind :80
{% for name, eps in services %}    acl host_{{ name }} hdr(host),field(1,:) -i {{ name }}.{{ domain }}
    use_backend svc_{{ name }} if host_{{ name }}
{% endfor %}
{% for name, eps in services %}
backend svc_{{ name }}
    balance roundrobin
{%- for ep in eps %}{% if ep.health != \"unhealthy\" %}
    server {{ ep.instance }} {{ ep.addr }} check inter 2s fall 3 rise 2{% if ep.meta.weight %} weight {{ ep.meta.weight }}{% endif %}
{%- endif %}{% endfor %}
{% endfor %}";

/// [`PLAIN_TEMPLATE`] for confd: a host rule per service, a backend per service, a server line
/// per endpoint (the record's JSON parsed with confd's `json`).
const CONFD_TEMPLATE: &str = "\
global
    maxconn 4000

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend http
    bind :80
{{range $svc := lsdir \"/confd/services\"}}    acl host_{{$svc}} hdr(host),field(1,:) -i {{$svc}}.{{getv \"/confd/config/domain\" \"localhost\"}}
    use_backend svc_{{$svc}} if host_{{$svc}}
{{end}}
{{range $svc := lsdir \"/confd/services\"}}
backend svc_{{$svc}}
    balance roundrobin
{{- range gets (printf \"/confd/services/%s/*\" $svc)}}{{$ep := json .Value}}{{if ne $ep.health \"unhealthy\"}}
    server {{$ep.instance}} {{$ep.host}}:{{$ep.port}} check inter 2s fall 3 rise 2{{if $ep.meta.weight}} weight {{$ep.meta.weight}}{{end}}{{end}}{{end}}
{{end}}";

/// `CONFD`: confd's binary, for the side-by-side phase.
fn confd_bin() -> Option<PathBuf> {
    std::env::var_os("CONFD").map(PathBuf::from)
}

/// The key confd reads for endpoint `ep`.
fn confd_key(ep: &Endpoint) -> String {
    format!("/confd/services/{}/{}", ep.service, ep.instance)
}

async fn load_confd(client: &Client, keys: &Keys, eps: &[Endpoint]) {
    let batches: Vec<Vec<TxnOp>> = eps
        .chunks(TXN_OPS)
        .map(|c| {
            c.iter()
                .map(|ep| TxnOp::put(confd_key(ep), ep.encode(keys).unwrap(), None))
                .collect()
        })
        .collect();
    futures::stream::iter(batches)
        .map(|ops| {
            let mut c = client.clone();
            async move { c.txn(Txn::new().and_then(ops)).await.unwrap() }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
}

fn shipped_templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates/templates")
}

/// Endpoint `i` of a registry of `services` services, on `port`.
fn endpoint(i: usize, services: usize, port: u16) -> Endpoint {
    let s = i % services;
    let node = format!("node-{:02}", i % NODES);
    let container = format!("{:012x}", 0xbe00_0000_0000u64 + i as u64);
    let service = format!("svc-{s:04}");
    let meta = BTreeMap::new();
    let n = i + 1;
    Endpoint {
        instance: format!("{node}-{container}-8080"),
        service,
        node,
        host: format!("127.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
        port,
        proto: Proto::Tcp,
        container,
        image: "example/web:1.0".into(),
        tags: vec![],
        meta,
        health: Health::Healthy,
        registered_at: "2026-12-01T00:00:00Z".into(),
    }
}

/// The line fragment the rendered haproxy.cfg has for this endpoint's address.
fn marker(ep: &Endpoint) -> String {
    format!(" {}:{} check", ep.host, ep.port)
}

/// The operator's service settings (`<prefix>/config/services/<svc>/`): every 10th service has a
/// path route, every 25th an HTTP check, every 100th is a TCP service on its own port.
fn settings(keys: &Keys, services: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in 0..services {
        let service = format!("svc-{s:04}");
        if s % 10 == 1 {
            out.push((
                keys.service_setting(&service, "path"),
                format!("/{service}"),
            ));
        }
        if s % 25 == 3 {
            out.push((
                keys.service_setting(&service, "check_path"),
                "/health".into(),
            ));
        }
        if s % 100 == 7 {
            out.push((keys.service_setting(&service, "mode"), "tcp".into()));
            out.push((
                keys.service_setting(&service, "service_port"),
                (20000 + s).to_string(),
            ));
        }
    }
    out
}

/// The node records of the synthetic nodes (confgen routes only endpoints of live nodes).
fn nodes(keys: &Keys) -> Vec<(String, Vec<u8>)> {
    (0..NODES)
        .map(|i| {
            let n = flotilla_registry::Node {
                node: format!("node-{i:02}"),
                version: "bench".into(),
                started_at: "2026-12-01T00:00:00Z".into(),
                advertise_ip: "127.0.0.1".parse().unwrap(),
                labels: Default::default(),
            };
            (keys.node(&n.node), n.encode(keys).unwrap())
        })
        .collect()
}

async fn load(client: &Client, keys: &Keys, eps: &[Endpoint], services: usize) {
    let mut first: Vec<TxnOp> = nodes(keys)
        .into_iter()
        .map(|(k, v)| TxnOp::put(k, v, None))
        .collect();
    first.extend(
        settings(keys, services)
            .into_iter()
            .map(|(k, v)| TxnOp::put(k, v, None)),
    );
    let mut batches: Vec<Vec<TxnOp>> = first.chunks(TXN_OPS).map(<[TxnOp]>::to_vec).collect();
    batches.extend(eps.chunks(TXN_OPS).map(|c| {
        c.iter()
            .map(|ep| TxnOp::put(ep.key(keys), ep.encode(keys).unwrap(), None))
            .collect()
    }));
    futures::stream::iter(batches)
        .map(|ops| {
            let mut c = client.clone();
            async move { c.txn(Txn::new().and_then(ops)).await.unwrap() }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
}

fn metrics(addr: &str) -> String {
    let once = || -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let mut tries = 0;
    loop {
        match once() {
            Ok(out) if out.contains("# EOF") => return out,
            r => {
                tries += 1;
                assert!(tries < 20, "GET http://{addr}/metrics: {r:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Sum of every sample of `name` (any labels).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (upper bound, cumulative count) of a histogram.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once('"')?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// Quantile `q` of the observations between two scrapes, as the bucket's upper bound.
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let d: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - b)
        })
        .collect();
    let total = d.last().map_or(0.0, |(_, c)| *c);
    d.iter()
        .find(|(_, c)| *c >= q * total)
        .map_or(f64::NAN, |(le, _)| *le)
}

fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn cpu_ticks(pid: u32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &text[text.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return f64::NAN;
    }
    let idx = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[idx]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

struct Setup {
    dir: tempfile::TempDir,
    etcd_url: String,
}

impl Setup {
    fn confdir(&self) -> PathBuf {
        self.dir.path().join("confdir")
    }
    fn dest(&self) -> PathBuf {
        self.dir.path().join("out/haproxy.cfg")
    }
    fn confd_dir(&self) -> PathBuf {
        self.dir.path().join("confd")
    }
    fn confd_dest(&self) -> PathBuf {
        self.dir.path().join("out-confd/haproxy.cfg")
    }
    fn new(etcd_url: String) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let s = Setup { dir, etcd_url };
        let conf = s.confdir();
        fs::create_dir_all(conf.join("conf.d")).unwrap();
        fs::create_dir_all(conf.join("templates")).unwrap();
        fs::create_dir_all(s.dir.path().join("out")).unwrap();
        fs::create_dir_all(s.dir.path().join("out-confd")).unwrap();
        fs::create_dir_all(s.confd_dir().join("conf.d")).unwrap();
        fs::create_dir_all(s.confd_dir().join("templates")).unwrap();
        fs::write(
            s.confd_dir().join("templates/haproxy.cfg.tmpl"),
            CONFD_TEMPLATE,
        )
        .unwrap();
        fs::write(
            s.confd_dir().join("conf.d/haproxy.toml"),
            format!(
                "[template]\nsrc = \"haproxy.cfg.tmpl\"\ndest = \"{}\"\n\
                 keys = [\"/confd/services\", \"/confd/config\"]\nmode = \"0644\"\n",
                s.confd_dest().display()
            ),
        )
        .unwrap();
        if template_kind() == "plain" {
            fs::write(conf.join("templates/haproxy.cfg.tmpl"), PLAIN_TEMPLATE).unwrap();
        } else {
            for e in fs::read_dir(shipped_templates()).unwrap() {
                let p = e.unwrap().path();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with("haproxy") {
                    fs::copy(&p, conf.join("templates").join(&name)).unwrap();
                }
            }
        }
        // The shipped resource (conf.d/haproxy.toml) with dest here and no check/reload.
        fs::write(
            conf.join("conf.d/haproxy.toml"),
            format!(
                "[template]\nsrc = \"haproxy.cfg.tmpl\"\ndest = \"{}\"\nprefix = \"/flotilla\"\n\
                 keys = [\"/endpoints/\", \"/config/haproxy/\"]\nmode = \"0644\"\n\
                 wait = \"20ms:1s\"\nmax_drop = \"50%\"\ndrop_grace = \"30s\"\n",
                s.dest().display()
            ),
        )
        .unwrap();
        s
    }
}

struct Daemon {
    child: Child,
    metrics: String,
}

impl Daemon {
    fn start(bin: &Path, s: &Setup, log: &Path) -> Daemon {
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = fs::File::create(log).unwrap();
        // CONFGEN_BENCH_WRAP="perf record -g -o /tmp/perf.data --" profiles the daemon.
        let wrap = std::env::var("CONFGEN_BENCH_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = Command::new(w);
                c.args(words).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(["run", "--confdir"])
            .arg(s.confdir())
            // Synthetic endpoints are 127.x.y.z addresses on 50 simulated nodes.
            .args([
                "--allow-loopback",
                "--etcd-endpoints",
                &s.etcd_url,
                "--metrics-addr",
                &metrics,
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        if !wrap.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
        Daemon { child, metrics }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn scrape(&self) -> String {
        metrics(&self.metrics)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Instants of file events on the destination (renames into place).
fn watch_dest(dest: &Path) -> (notify::RecommendedWatcher, mpsc::Receiver<Instant>) {
    use notify::{RecursiveMode, Watcher};
    let (tx, rx) = mpsc::channel();
    let want = dest.to_owned();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let now = Instant::now();
        if let Ok(ev) = res {
            if ev.paths.iter().any(|p| p == &want)
                && !matches!(ev.kind, notify::EventKind::Access(_))
            {
                let _ = tx.send(now);
            }
        }
    })
    .unwrap();
    w.watch(dest.parent().unwrap(), RecursiveMode::NonRecursive)
        .unwrap();
    (w, rx)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every `host:port` of a `server` line.
fn server_addrs(cfg: &str) -> HashSet<String> {
    cfg.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "server").then_some(())?;
            w.next()?;
            Some(w.next()?.to_string())
        })
        .collect()
}

#[derive(Default, Debug)]
struct Round {
    startup_ms: f64,
    lat: Vec<f64>,
    d_p50: f64,
    d_p99: f64,
    d_mean: f64,
    render_mean: f64,
    rss_kb: u64,
    burst_cpu_s: Option<f64>,
    burst_renders: Option<f64>,
    burst_writes: Option<f64>,
    burst_put_s: Option<f64>,
    burst_settle_s: Option<f64>,
    rss_after_burst_kb: Option<u64>,
    onetime_ms: Vec<f64>,
    confd: Option<ConfdRound>,
}

#[derive(Default, Debug)]
struct ConfdRound {
    startup_ms: f64,
    lat: Vec<f64>,
    rss_kb: u64,
    onetime_ms: Vec<f64>,
}

fn confd_cmd(confd: &Path, s: &Setup) -> Command {
    let mut c = Command::new(confd);
    c.args(["-backend", "etcdv3", "-node", &s.etcd_url, "-confdir"])
        .arg(s.confd_dir())
        .args(["-log-level", "error"]);
    c
}

/// confd's phase of a round (see the module's comment): alone on the machine's CPU.
#[allow(clippy::too_many_arguments)]
fn confd_round(
    rt: &tokio::runtime::Runtime,
    confd: &Path,
    s: &Setup,
    client: &Client,
    keys: &Keys,
    eps: &mut [Endpoint],
    changes: usize,
    onetimes: usize,
    port_seq: &mut u16,
) -> ConfdRound {
    let mut r = ConfdRound::default();
    let dest = s.confd_dest();
    let _ = fs::remove_file(&dest);
    let started = Instant::now();
    let mut child = confd_cmd(confd, s)
        .arg("-watch")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let guard = Kill(&mut child);
    let expect = eps.len();
    wait_until("confd's first render", Duration::from_secs(900), || {
        fs::read_to_string(&dest).is_ok_and(|c| server_addrs(&c).len() == expect)
    });
    r.startup_ms = started.elapsed().as_secs_f64() * 1e3;
    let (_w, events) = watch_dest(&dest);
    std::thread::sleep(Duration::from_millis(300));
    let mut rng = fastrand::Rng::with_seed(eps.len() as u64 * 11 + *port_seq as u64);
    for _ in 0..changes {
        let i = rng.usize(..eps.len());
        *port_seq = if *port_seq >= 60000 {
            10000
        } else {
            *port_seq + 1
        };
        eps[i].port = *port_seq;
        let want = marker(&eps[i]);
        // The /flotilla copy too, so confgen's next round starts from the same registry.
        let ops = vec![
            TxnOp::put(confd_key(&eps[i]), eps[i].encode(keys).unwrap(), None),
            TxnOp::put(eps[i].key(keys), eps[i].encode(keys).unwrap(), None),
        ];
        while events.try_recv().is_ok() {}
        let mut c = client.clone();
        rt.block_on(c.txn(Txn::new().and_then(ops))).unwrap();
        let acked = Instant::now();
        loop {
            // confd's `gets` scans every key for each service: O(services × keys) per render,
            // about 1 s at 10,000 endpoints and 100 times that at 100,000.
            let bound = Duration::from_secs(if eps.len() > 20_000 { 900 } else { 30 });
            let at = events
                .recv_timeout(bound)
                .expect("no confd file event within the bound after a change");
            if fs::read_to_string(&dest).is_ok_and(|c| c.contains(&want)) {
                r.lat
                    .push(at.saturating_duration_since(acked).as_secs_f64() * 1e3);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(40 + rng.u64(..40)));
    }
    r.rss_kb = proc_field(pid, "status", "VmHWM:");
    drop(guard);
    for _ in 0..onetimes {
        let _ = fs::remove_file(&dest);
        let t = Instant::now();
        let out = confd_cmd(confd, s)
            .arg("-onetime")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(
            out.status.success(),
            "confd -onetime failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            server_addrs(&fs::read_to_string(&dest).unwrap()).len(),
            eps.len()
        );
        r.onetime_ms.push(ms);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn round(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    s: &Setup,
    client: &Client,
    keys: &Keys,
    eps: &mut [Endpoint],
    services: usize,
    changes: usize,
    burst: bool,
    onetimes: usize,
    port_seq: &mut u16,
) -> Round {
    let mut r = Round::default();
    let _ = fs::remove_file(s.dest());
    let log = s.dir.path().join("confgen.log");
    let started = Instant::now();
    let d = Daemon::start(bin, s, &log);
    let expect = eps.len();
    wait_until("the first render", Duration::from_secs(300), || {
        fs::read_to_string(s.dest()).is_ok_and(|c| server_addrs(&c).len() == expect)
    });
    r.startup_ms = started.elapsed().as_secs_f64() * 1e3;
    let (_w, events) = watch_dest(&s.dest());
    std::thread::sleep(Duration::from_millis(300));
    let before = d.scrape();
    let mut rng = fastrand::Rng::with_seed(services as u64 * 7 + *port_seq as u64);
    for _ in 0..changes {
        let i = rng.usize(..eps.len());
        *port_seq = if *port_seq >= 60000 {
            10000
        } else {
            *port_seq + 1
        };
        eps[i].port = *port_seq;
        let want = marker(&eps[i]);
        let (k, v) = (eps[i].key(keys), eps[i].encode(keys).unwrap());
        while events.try_recv().is_ok() {}
        let sent = Instant::now();
        let mut c = client.clone();
        rt.block_on(c.put(k, v, None)).unwrap();
        let acked = Instant::now();
        loop {
            let at = events
                .recv_timeout(Duration::from_secs(10))
                .expect("no file event within 10 s of a change");
            if fs::read_to_string(s.dest()).is_ok_and(|c| c.contains(&want)) {
                // The rename can beat the put's response to this process; never below 0.
                let _ = sent;
                r.lat
                    .push(at.saturating_duration_since(acked).as_secs_f64() * 1e3);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(40 + rng.u64(..40)));
    }
    let after = d.scrape();
    let h = "confgen_change_to_write_seconds";
    let (bb, ba) = (buckets(&before, h), buckets(&after, h));
    r.d_p50 = bucket_quantile(&bb, &ba, 0.5) * 1e3;
    r.d_p99 = bucket_quantile(&bb, &ba, 0.99) * 1e3;
    let dn = metric(&after, &format!("{h}_count")) - metric(&before, &format!("{h}_count"));
    let ds = metric(&after, &format!("{h}_sum")) - metric(&before, &format!("{h}_sum"));
    r.d_mean = ds / dn * 1e3;
    let rn = "confgen_render_seconds";
    r.render_mean = (metric(&after, &format!("{rn}_sum")) - metric(&before, &format!("{rn}_sum")))
        / (metric(&after, &format!("{rn}_count")) - metric(&before, &format!("{rn}_count")))
        * 1e3;
    r.rss_kb = proc_field(d.pid(), "status", "VmHWM:");

    if burst {
        for ep in eps.iter_mut() {
            *port_seq = if *port_seq >= 60000 {
                10000
            } else {
                *port_seq + 1
            };
            ep.port = *port_seq;
        }
        let puts: Vec<(String, Vec<u8>)> = eps
            .iter()
            .map(|e| (e.key(keys), e.encode(keys).unwrap()))
            .collect();
        let want: HashSet<String> = eps
            .iter()
            .map(|e| format!("{}:{}", e.host, e.port))
            .collect();
        let m0 = d.scrape();
        let cpu0 = cpu_ticks(d.pid());
        let t0 = Instant::now();
        rt.block_on(async {
            futures::stream::iter(puts)
                .map(|(k, v)| {
                    let mut c = client.clone();
                    async move { c.put(k, v, None).await.unwrap() }
                })
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await
        });
        r.burst_put_s = Some(t0.elapsed().as_secs_f64());
        wait_until("the burst to be applied", Duration::from_secs(120), || {
            fs::read_to_string(s.dest()).is_ok_and(|c| server_addrs(&c) == want)
        });
        r.burst_settle_s = Some(t0.elapsed().as_secs_f64());
        // No render for 1.5 s (wait.max is 1 s): the burst is absorbed.
        let mut last = metric(&d.scrape(), "confgen_renders_total");
        loop {
            std::thread::sleep(Duration::from_millis(1500));
            let now = metric(&d.scrape(), "confgen_renders_total");
            if now == last {
                break;
            }
            last = now;
        }
        let cpu1 = cpu_ticks(d.pid());
        let m1 = d.scrape();
        r.burst_cpu_s = Some((cpu1 - cpu0) as f64 / clk_tck());
        r.burst_renders =
            Some(metric(&m1, "confgen_renders_total") - metric(&m0, "confgen_renders_total"));
        r.burst_writes =
            Some(metric(&m1, "confgen_writes_total") - metric(&m0, "confgen_writes_total"));
        r.rss_after_burst_kb = Some(proc_field(d.pid(), "status", "VmHWM:"));
    }
    drop(d);

    for _ in 0..onetimes {
        let _ = fs::remove_file(s.dest());
        let t = Instant::now();
        // CONFGEN_BENCH_ONETIME_WRAP="perf record -g -o /tmp/onetime.data --" profiles it.
        let wrap = std::env::var("CONFGEN_BENCH_ONETIME_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = Command::new(w);
                c.args(words).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let out = cmd
            .args(["run", "--onetime", "--confdir"])
            .arg(s.confdir())
            .args(["--allow-loopback", "--etcd-endpoints", &s.etcd_url])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(
            out.status.success(),
            "--onetime failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            server_addrs(&fs::read_to_string(s.dest()).unwrap()).len(),
            eps.len()
        );
        r.onetime_ms.push(ms);
    }
    r
}

fn list(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_confgen"));
    let scales: Vec<usize> = std::env::var("CONFGEN_BENCH_SCALES")
        .unwrap_or_else(|_| "10k,100k".into())
        .split(',')
        .map(|s| match s.trim() {
            "10k" => 10_000,
            "100k" => 100_000,
            other => other
                .parse()
                .expect("CONFGEN_BENCH_SCALES: 10k,100k or numbers"),
        })
        .collect();
    let rounds: usize = std::env::var("CONFGEN_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let keys = Keys::new("/flotilla").unwrap();
    let load_avg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "confgen benchmark: {} ({} cores), template {}, load at start: {}",
        bin.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        template_kind(),
        load_avg.trim()
    );
    // One line per figure with a target, for scripts/bench's summary table.
    let summaries = std::cell::RefCell::new(Vec::<String>::new());
    for n in scales {
        let services = n / PER_SERVICE;
        let etcd = Etcd::start();
        let client = rt
            .block_on(Client::connect([etcd.endpoint()], None))
            .unwrap();
        let mut eps: Vec<Endpoint> = (0..n).map(|i| endpoint(i, services, 8080)).collect();
        let t = Instant::now();
        rt.block_on(load(&client, &keys, &eps, services));
        if confd_bin().is_some() {
            rt.block_on(load_confd(&client, &keys, &eps));
        }
        println!(
            "\n## {n} endpoints in {services} services (loaded in {:.1} s)",
            t.elapsed().as_secs_f64()
        );
        let s = Setup::new(etcd.endpoint());
        // CONFGEN_BENCH_SERVE=SECS: keep this etcd and confdir for SECS seconds and stop, for
        // whole-process timings from outside (e.g. two builds of `confgen run --onetime` against
        // one registry with /usr/bin/time).
        if let Some(secs) = std::env::var("CONFGEN_BENCH_SERVE")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            println!(
                "serving: --confdir {} --etcd-endpoints {} --allow-loopback ({secs} s)",
                s.confdir().display(),
                etcd.endpoint()
            );
            std::thread::sleep(Duration::from_secs(secs));
            return;
        }
        let big = n > 20_000;
        let (mut changes, onetimes) = if big { (60, 3) } else { (200, 5) };
        if let Some(n) = std::env::var("CONFGEN_BENCH_CHANGES")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            changes = n;
        }
        let mut port_seq = 10000u16;
        let mut rs = Vec::new();
        for k in 0..rounds {
            let mut r = round(
                &rt,
                &bin,
                &s,
                &client,
                &keys,
                &mut eps,
                services,
                changes,
                !big,
                onetimes,
                &mut port_seq,
            );
            println!(
                "round {}: start→first file {:.0} ms; change→file p50 {:.2} ms p99 {:.2} ms max {:.2} ms (n={}); daemon histogram p50 ≤{:.0} ms p99 ≤{:.0} ms mean {:.2} ms; render mean {:.2} ms; VmHWM {:.1} MB; burst: puts {:.2} s, applied after {:.2} s, CPU {:.2} s, renders {}, writes {}, VmHWM {:.1} MB; --onetime ms {}",
                k + 1,
                r.startup_ms,
                percentile(&r.lat, 0.5),
                percentile(&r.lat, 0.99),
                percentile(&r.lat, 1.0),
                r.lat.len(),
                r.d_p50,
                r.d_p99,
                r.d_mean,
                r.render_mean,
                r.rss_kb as f64 / 1024.0,
                r.burst_put_s.unwrap_or(f64::NAN),
                r.burst_settle_s.unwrap_or(f64::NAN),
                r.burst_cpu_s.unwrap_or(f64::NAN),
                r.burst_renders.unwrap_or(f64::NAN),
                r.burst_writes.unwrap_or(f64::NAN),
                r.rss_after_burst_kb.unwrap_or(0) as f64 / 1024.0,
                list(&r.onetime_ms, 0),
            );
            if let Some(confd) = confd_bin() {
                let changes = std::env::var("CONFGEN_BENCH_CONFD_CHANGES")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(if big { 3 } else { 30 });
                let c = confd_round(
                    &rt,
                    &confd,
                    &s,
                    &client,
                    &keys,
                    &mut eps,
                    changes,
                    if big { 1 } else { onetimes },
                    &mut port_seq,
                );
                println!(
                    "round {} confd: start→first file {:.0} ms; change→file p50 {:.1} ms p99 {:.1} ms max {:.1} ms (n={}); VmHWM {:.1} MB; -onetime ms {}",
                    k + 1,
                    c.startup_ms,
                    percentile(&c.lat, 0.5),
                    percentile(&c.lat, 0.99),
                    percentile(&c.lat, 1.0),
                    c.lat.len(),
                    c.rss_kb as f64 / 1024.0,
                    list(&c.onetime_ms, 0),
                );
                r.confd = Some(c);
            }
            rs.push(r);
        }
        let per = |f: &dyn Fn(&Round) -> f64| -> (f64, String) {
            let v: Vec<f64> = rs.iter().map(f).collect();
            (median(&v), list(&v, 2))
        };
        let all_lat: Vec<f64> = rs.iter().flat_map(|r| r.lat.clone()).collect();
        println!("\n| figure ({n} endpoints) | target | median of rounds | every round |");
        println!("| --- | --- | --- | --- |");
        let row = |name: &str, target: &str, (m, all): (f64, String)| {
            println!("| {name} | {target} | {m:.2} | {all} |");
            if !target.is_empty() && target != "—" {
                summaries.borrow_mut().push(format!(
                    "summary: confgen ({} template), {n} endpoints, {name}, median of rounds | {target} | {m:.2} (rounds {all})",
                    template_kind()
                ));
            }
        };
        // Issue 12's goals, for any template of the obvious kind.
        let (lt50, lt99) = if big {
            ("≤ 50 ms", "—")
        } else {
            ("≤ 5 ms", "≤ 15 ms")
        };
        row(
            "change → file p50 (ms)",
            lt50,
            per(&|r| percentile(&r.lat, 0.5)),
        );
        row(
            "change → file p99 (ms)",
            lt99,
            per(&|r| percentile(&r.lat, 0.99)),
        );
        println!(
            "| change → file, all {} changes pooled: p50 / p99 / max (ms) | | {:.2} / {:.2} / {:.2} | |",
            all_lat.len(),
            percentile(&all_lat, 0.5),
            percentile(&all_lat, 0.99),
            percentile(&all_lat, 1.0)
        );
        row(
            "daemon histogram change→write p50, bucket bound (ms)",
            "",
            per(&|r| r.d_p50),
        );
        row(
            "daemon histogram change→write p99, bucket bound (ms)",
            "",
            per(&|r| r.d_p99),
        );
        row(
            "daemon histogram change→write mean (ms)",
            "",
            per(&|r| r.d_mean),
        );
        row(
            "`--onetime` whole process (ms; median of each round's runs)",
            if big { "—" } else { "≤ 100 ms" },
            per(&|r| median(&r.onetime_ms)),
        );
        row(
            "daemon RSS after the changes, VmHWM (MB)",
            if big { "—" } else { "≤ 30 MB" },
            per(&|r| r.rss_kb as f64 / 1024.0),
        );
        row("daemon start → first file (ms)", "", per(&|r| r.startup_ms));
        if !big {
            row(
                "burst of 10,000 puts: CPU (s)",
                "≤ 1.5 s",
                per(&|r| r.burst_cpu_s.unwrap()),
            );
            row("burst: renders", "≤ 10", per(&|r| r.burst_renders.unwrap()));
            row("burst: file writes", "", per(&|r| r.burst_writes.unwrap()));
            row("burst: puts took (s)", "", per(&|r| r.burst_put_s.unwrap()));
            row(
                "burst: first put → file complete (s)",
                "",
                per(&|r| r.burst_settle_s.unwrap()),
            );
            row(
                "daemon RSS after the burst, VmHWM (MB)",
                "≤ 30 MB",
                per(&|r| r.rss_after_burst_kb.unwrap() as f64 / 1024.0),
            );
        }
        if rs.iter().all(|r| r.confd.is_some()) {
            let c = |f: &dyn Fn(&ConfdRound) -> f64| per(&|r| f(r.confd.as_ref().unwrap()));
            row(
                "confd: change → file p50 (ms)",
                "",
                c(&|c| percentile(&c.lat, 0.5)),
            );
            row(
                "confd: change → file p99 (ms)",
                "",
                c(&|c| percentile(&c.lat, 0.99)),
            );
            row(
                "confd p50 / confgen p50 (same round)",
                if big { "" } else { "≥ 250×" },
                per(&|r| percentile(&r.confd.as_ref().unwrap().lat, 0.5) / percentile(&r.lat, 0.5)),
            );
            row(
                "confd `-onetime` whole process (ms)",
                "",
                c(&|c| median(&c.onetime_ms)),
            );
            row(
                "confd -onetime / confgen --onetime (same round)",
                "",
                per(&|r| median(&r.confd.as_ref().unwrap().onetime_ms) / median(&r.onetime_ms)),
            );
            row(
                "confd -watch RSS, VmHWM (MB)",
                "",
                c(&|c| c.rss_kb as f64 / 1024.0),
            );
            row("confd start → first file (ms)", "", c(&|c| c.startup_ms));
        }
        let size = fs::metadata(s.dest()).map(|m| m.len()).unwrap_or(0);
        println!("\nrendered haproxy.cfg: {} KB", size / 1024);
        drop(etcd);
    }
    println!(
        "\nload at end: {}",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!();
    for line in summaries.into_inner() {
        println!("{line}");
    }
}
