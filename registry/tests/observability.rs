//! The `/metrics` + `/healthz` listener every daemon runs: requests arriving in several TCP
//! segments (as some scrapers and `write!` loops send them) are read whole.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_registry::daemon::{
    serve_observability, serve_observability_with, HealthFn, ListenerLimits, MIN_HEAD_BYTES,
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

/// Reads until EOF, a reset or `within`; true if the server closed (or reset) the connection in
/// time. A server that closes with unread request bytes resets the connection; what it wrote
/// before is still read first.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> (bool, String) {
    let deadline = Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (closed, String::from_utf8_lossy(&buf).into_owned())
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

/// The status code of an answer (`HTTP/1.x NNN …`); an HTTP/1.0 request is answered in 1.0.
fn status(answer: &str) -> Option<u16> {
    let line = answer.lines().next()?;
    let mut words = line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/1."))?;
    words.next()?.parse().ok()
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
    assert_eq!(status(&ok), Some(200), "{ok}");

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
    assert_eq!(status(&ok), Some(200), "{ok}");

    // A request head over the limit (hyper's minimum, 8 KiB, since the listener is hyper's)
    // is answered with 431, not read on.
    let mut big = connect_from(&rt, "127.0.0.7", port);
    let pad = "a".repeat(MIN_HEAD_BYTES + 4000);
    big.write_all(format!("GET /metrics HTTP/1.1\r\nX-Pad: {pad}").as_bytes())
        .unwrap();
    let (closed, text) = read_until_closed(&mut big, Duration::from_secs(3));
    assert!(
        closed && text.starts_with("HTTP/1.1 431"),
        "{closed} {text}"
    );

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

/// `GET path` over HTTP/1.1 on a fresh connection from `from`, the request in one write: the
/// whole answer, once the server closes (it always does: one request per connection).
fn get_from(rt: &tokio::runtime::Runtime, from: &str, port: u16, path: &str) -> String {
    let mut s = connect_from(rt, from, port);
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: flotilla\r\n\r\n").as_bytes())
        .unwrap();
    let (closed, text) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(closed, "the server keeps the connection open after {text}");
    text
}

/// Calls `f` until it returns `Some`, at most `within`; panics naming `what` otherwise.
fn poll_until<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_healthz_and_other_paths_answer_as_before_over_http_1_0_and_1_1() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let h = healthy.clone();
    let health: HealthFn = Arc::new(move || {
        if h.load(std::sync::atomic::Ordering::SeqCst) {
            (true, "etcd: ok\n".to_string())
        } else {
            (false, "etcd: down\n".to_string())
        }
    });
    rt.spawn(serve_observability(
        listener,
        Arc::new(Mutex::new(Registry::default())),
        health,
    ));

    let m = get_from(&rt, "127.0.0.1", port, "/metrics");
    assert!(m.starts_with("HTTP/1.1 200 OK\r\n"), "{m}");
    let (head, body) = m.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains(
            "\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
        ),
        "{head}"
    );
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(
        head.contains(&format!("\r\ncontent-length: {}", body.len())),
        "{head}"
    );
    assert!(body.contains("flotilla_build_info{"), "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");

    let ok = get_from(&rt, "127.0.0.1", port, "/healthz");
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        ok.to_ascii_lowercase()
            .contains("\r\ncontent-type: text/plain; charset=utf-8\r\n"),
        "{ok}"
    );
    assert!(ok.ends_with("\r\n\r\netcd: ok\n"), "{ok}");
    healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    let down = get_from(&rt, "127.0.0.1", port, "/healthz");
    assert!(
        down.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{down}"
    );
    assert!(down.ends_with("\r\n\r\netcd: down\n"), "{down}");

    let other = get_from(&rt, "127.0.0.1", port, "/");
    assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
    assert!(
        other.ends_with("\r\n\r\ntry /metrics or /healthz\n"),
        "{other}"
    );

    // HTTP/1.0 (as scripts and the benches send it) is answered in HTTP/1.0, then closed.
    let old = healthz_from(&rt, "127.0.0.1", port);
    assert!(old.starts_with("HTTP/1.0 503 "), "{old}");
    assert!(old.ends_with("etcd: down\n"), "{old}");

    // A client that shuts down its sending side after the request still gets the answer.
    let mut s = connect_from(&rt, "127.0.0.1", port);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: flotilla\r\n\r\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (closed, text) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(
        closed && text.starts_with("HTTP/1.1 200"),
        "{closed} {text}"
    );

    // Garbage is a 400 on its own connection; the listener serves the next one.
    let mut s = connect_from(&rt, "127.0.0.1", port);
    s.write_all(b"\x16\x03\x01 hello\r\n\r\n").unwrap();
    let (closed, text) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(
        closed && text.starts_with("HTTP/1.1 400"),
        "{closed} {text}"
    );
    let m = get_from(&rt, "127.0.0.1", port, "/metrics");
    assert_eq!(status(&m), Some(200), "{m}");
}

#[test]
fn an_oversized_head_is_refused_and_the_listener_serves_others() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let limits = ListenerLimits {
        max_head_bytes: 16 * 1024,
        ..ListenerLimits::default()
    };
    let (port, _) = start_with(&rt, limits);
    let head = |pad: usize| {
        format!(
            "GET /healthz HTTP/1.1\r\nHost: flotilla\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(pad)
        )
    };

    // Within the configured 16 KiB (more than the old 2 KiB and hyper's 8 KiB minimum): served.
    let mut s = connect_from(&rt, "127.0.0.2", port);
    s.write_all(head(12 * 1024).as_bytes()).unwrap();
    let (closed, text) = read_until_closed(&mut s, Duration::from_secs(10));
    assert!(
        closed && text.starts_with("HTTP/1.1 200"),
        "{closed} {text}"
    );

    // Over it, complete or not: 431 and closed, never served.
    for oversized in [head(20 * 1024), head(64 * 1024)] {
        let mut s = connect_from(&rt, "127.0.0.2", port);
        // The server may reset the connection before taking all of it; what it answered is
        // still read.
        let _ = s.write_all(oversized.as_bytes());
        let (closed, text) = read_until_closed(&mut s, Duration::from_secs(10));
        assert!(closed, "an oversized head was not refused: {text}");
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
        assert!(!text.ends_with("ok\n"), "{text}");
    }

    // Everyone else (the same address too) is still served.
    let ok = get_from(&rt, "127.0.0.2", port, "/healthz");
    assert_eq!(status(&ok), Some(200), "{ok}");
    let ok = get_from(&rt, "127.0.0.3", port, "/metrics");
    assert_eq!(status(&ok), Some(200), "{ok}");
}

#[test]
fn a_client_that_stalls_in_its_request_head_is_dropped_within_the_head_timeout() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let head_timeout = Duration::from_millis(400);
    let limits = ListenerLimits {
        max_per_peer: 1,
        head_timeout,
        ..ListenerLimits::default()
    };
    let (port, _) = start_with(&rt, limits);

    // Half a request, then nothing: the server closes the connection, without an answer,
    // after the head timeout (counted from the accept, so never earlier than this connect).
    let started = Instant::now();
    let mut half = connect_from(&rt, "127.0.0.2", port);
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: flot")
        .unwrap();
    let (closed, text) = read_until_closed(&mut half, Duration::from_secs(10));
    let took = started.elapsed();
    assert!(closed, "a stalled client was not dropped: {text}");
    assert!(
        took >= head_timeout,
        "dropped after {took:?}, before the timeout"
    );
    assert!(text.is_empty(), "{text}");

    // Its slot (the only one of its address) is free again.
    let ok = poll_until(
        "the stalled client's slot to be free",
        Duration::from_secs(10),
        || {
            let text = get_from(&rt, "127.0.0.2", port, "/healthz");
            (status(&text) == Some(200)).then_some(text)
        },
    );
    assert!(ok.ends_with("ok\n"), "{ok}");
}

#[test]
fn connections_over_the_cap_are_refused_while_the_admitted_ones_are_served() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let limits = ListenerLimits {
        max_connections: 3,
        max_per_peer: 3,
        ..ListenerLimits::default()
    };
    let (port, registry) = start_with(&rt, limits);

    // Three connections hold every slot (connections are accepted in the order they were
    // made, so these are admitted before the next).
    let mut held: Vec<TcpStream> = ["127.0.0.2", "127.0.0.3", "127.0.0.3"]
        .iter()
        .map(|from| connect_from(&rt, from, port))
        .collect();
    for from in ["127.0.0.3", "127.0.0.4"] {
        let mut s = connect_from(&rt, from, port);
        let (closed, text) = read_until_closed(&mut s, Duration::from_secs(10));
        assert!(
            closed && text.starts_with("HTTP/1.1 503"),
            "{closed} {text}"
        );
    }

    // The admitted ones are served all the same.
    for s in &mut held {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: flotilla\r\n\r\n")
            .unwrap();
        let (closed, text) = read_until_closed(s, Duration::from_secs(10));
        assert!(
            closed && text.starts_with("HTTP/1.1 200") && text.ends_with("ok\n"),
            "{closed} {text}"
        );
    }

    // Once they are done, new connections are admitted again.
    poll_until("a slot to be free again", Duration::from_secs(10), || {
        (status(&get_from(&rt, "127.0.0.4", port, "/metrics")) == Some(200)).then_some(())
    });
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry.lock().unwrap()).unwrap();
    assert!(
        text.contains("metrics_listener_refused_connections_total "),
        "{text}"
    );
}

#[test]
fn a_client_that_does_not_read_its_answer_is_dropped_after_the_write_timeout() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    // An answer far larger than the socket buffers of both ends (the client's is kept small).
    const BIG: usize = 16 << 20;
    let health: HealthFn = Arc::new(|| (true, "x".repeat(BIG)));
    let limits = ListenerLimits {
        max_per_peer: 1,
        head_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
        ..ListenerLimits::default()
    };
    rt.spawn(serve_observability_with(
        listener,
        Arc::new(Mutex::new(Registry::default())),
        health,
        limits,
    ));
    let started = Instant::now();
    let mut stalled = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(64 * 1024).unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let s = sock
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s
    });
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: flotilla\r\n\r\n")
        .unwrap();

    // While it holds its address's only slot, the address is refused; the connection is
    // dropped at the latest head + write timeout after its accept, and the slot is free.
    poll_until(
        "the stalled reader's slot to be free",
        Duration::from_secs(10),
        || {
            let mut s = connect_from(&rt, "127.0.0.2", port);
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: flotilla\r\n\r\n")
                .unwrap();
            let (_, text) = read_until_closed(&mut s, Duration::from_secs(10));
            (status(&text) == Some(200)).then_some(())
        },
    );
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "freed after {:?}",
        started.elapsed()
    );

    // The stalled client got the start of the answer, then the close: never all of it.
    let (closed, text) = read_until_closed(&mut stalled, Duration::from_secs(10));
    assert!(closed, "the stalled reader's connection is still open");
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(
        text.len() < BIG,
        "the whole answer was sent: {} bytes",
        text.len()
    );
}
