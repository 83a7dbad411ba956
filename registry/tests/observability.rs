//! The `/metrics` + `/healthz` listener every daemon runs: requests arriving in several TCP
//! segments (as some scrapers and `write!` loops send them) are read whole.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_registry::daemon::{serve_observability, HealthFn};
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
