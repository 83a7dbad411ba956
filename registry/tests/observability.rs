//! The `/metrics` + `/healthz` listener every daemon runs: requests arriving in several TCP
//! segments (as some scrapers and `write!` loops send them) are read whole.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_registry::daemon::{
    serve_observability, serve_observability_with, HealthFn, ListenerLimits,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

fn get_in_pieces(port: u16, pieces: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for p in pieces {
        s.write_all(p.as_bytes()).unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_request_split_over_several_writes_is_answered() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut registry = Registry::default();
    let c = Counter::<u64>::default();
    c.inc_by(7);
    registry.register("flotilla_test_things", "things", c);
    let health: HealthFn = Arc::new(|| (false, "etcd: unreachable".to_string()));
    rt.spawn(serve_observability(
        listener,
        Arc::new(Mutex::new(registry)),
        health,
    ));

    let metrics = get_in_pieces(port, &["GET /met", "rics HTTP/1.1\r\n", "Host: x\r\n\r\n"]);
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("flotilla_test_things_total 7"),
        "{metrics}"
    );

    let health = get_in_pieces(port, &["GET /healthz HTTP/1.1\r\n", "\r\n"]);
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.contains("etcd: unreachable"), "{health}");
}

/// Starts the listener (default limits) on a free port, in `rt`.
fn start(rt: &tokio::runtime::Runtime) -> u16 {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let health: HealthFn = Arc::new(|| (true, "ok\n".to_string()));
    rt.spawn(serve_observability(
        listener,
        Arc::new(Mutex::new(Registry::default())),
        health,
    ));
    port
}

/// A connection to 127.0.0.1:port from the loopback address `from` (any of 127.0.0.0/8).
fn connect_from(rt: &tokio::runtime::Runtime, from: &str, port: u16) -> TcpStream {
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let s = sock
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    })
}

/// Reads until EOF or `within`; true if the server closed the connection in time.
fn closed_within(s: &mut TcpStream, within: Duration) -> (bool, String) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => (true, String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => (false, String::from_utf8_lossy(&buf).into_owned()),
    }
}

#[test]
fn one_peer_cannot_hold_more_than_eight_connections() {
    // Issue 16 item 5: the listener accepted any number of idle connections (each a task and a
    // file descriptor for 5 s, renewable forever by reconnecting).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = start(&rt);
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut ninth = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (closed, text) = closed_within(&mut ninth, Duration::from_secs(1));
    assert!(
        closed,
        "the 9th idle connection of one peer is closed at once"
    );
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 503"),
        "{text}"
    );
    drop(idle);
}

fn start_with(rt: &tokio::runtime::Runtime, limits: ListenerLimits) -> (u16, Arc<Mutex<Registry>>) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let health: HealthFn = Arc::new(|| (true, "ok\n".to_string()));
    let registry = Arc::new(Mutex::new(Registry::default()));
    rt.spawn(serve_observability_with(
        listener,
        registry.clone(),
        health,
        limits,
    ));
    (port, registry)
}

fn healthz_from(rt: &tokio::runtime::Runtime, from: &str, port: u16) -> String {
    let mut s = connect_from(rt, from, port);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn connections_are_bounded_per_peer_in_total_in_head_size_and_in_time() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let limits = ListenerLimits {
        max_connections: 4,
        max_per_peer: 2,
        head_timeout: Duration::from_millis(800),
        ..ListenerLimits::default()
    };
    let (port, registry) = start_with(&rt, limits);

    // One peer holds its two slots with idle connections: its third is closed at once, while
    // another address is still served.
    let mut idle_a: Vec<TcpStream> = (0..2)
        .map(|_| connect_from(&rt, "127.0.0.2", port))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut third = connect_from(&rt, "127.0.0.2", port);
    let (closed, text) = closed_within(&mut third, Duration::from_millis(500));
    assert!(
        closed && text.starts_with("HTTP/1.1 503"),
        "{closed} {text}"
    );
    let ok = healthz_from(&rt, "127.0.0.3", port);
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    // Two more idle peers fill the total of four: everyone else is refused.
    let _idle_b = connect_from(&rt, "127.0.0.4", port);
    let _idle_c = connect_from(&rt, "127.0.0.5", port);
    std::thread::sleep(Duration::from_millis(100));
    let refused = healthz_from(&rt, "127.0.0.6", port);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");

    // Idle connections are dropped after the head timeout, and their slots are free again.
    for s in &mut idle_a {
        let (closed, _) = closed_within(s, Duration::from_secs(3));
        assert!(closed, "an idle connection outlived the head timeout");
    }
    std::thread::sleep(Duration::from_millis(100));
    let ok = healthz_from(&rt, "127.0.0.2", port);
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    // A request head over the limit is answered with 431, not read on.
    let mut big = connect_from(&rt, "127.0.0.7", port);
    big.write_all(format!("GET /metrics HTTP/1.1\r\nX-Pad: {}", "a".repeat(4000)).as_bytes())
        .unwrap();
    let (_, text) = closed_within(&mut big, Duration::from_secs(3));
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");

    // The refusals are counted.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry.lock().unwrap()).unwrap();
    assert!(
        text.contains("metrics_listener_refused_connections_total 2"),
        "{text}"
    );
}

#[test]
fn every_listener_serves_build_info_and_process_metrics() {
    // Issue 17: no daemon's /metrics said which build it ran, nor its CPU, memory or fds.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = start(&rt);
    let text = get_in_pieces(port, &["GET /metrics HTTP/1.1\r\n\r\n"]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.rsplit_once(' ').unwrap().1.parse().unwrap()
    };
    assert!(
        text.contains(&format!(
            "flotilla_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            flotilla_registry::process::COMMIT
        )),
        "{text}"
    );
    assert!(value("process_resident_memory_bytes") > 0.0);
    assert!(value("process_open_fds") > 0.0);
    assert!(value("process_cpu_seconds_total") >= 0.0);
    assert!(value("process_start_time_seconds") > 1.5e9);
}
