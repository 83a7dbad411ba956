//! `proxyctl status`, `drain` and `enable` against a real HAProxy's runtime API.

mod common;

use common::*;

fn status_json(hx: &Haproxy) -> Vec<serde_json::Value> {
    let run = Run::of(
        proxyctl()
            .arg("status")
            .arg("--socket")
            .arg(hx.stats_socket())
            .arg("--json"),
    )
    .expect_code(0);
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", run.stdout))
}

fn row<'a>(rows: &'a [serde_json::Value], proxy: &str, name: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["proxy"] == proxy && r["name"] == name)
        .unwrap_or_else(|| panic!("no row {proxy}/{name} in {rows:#?}"))
}

fn status_table(hx: &Haproxy) -> String {
    Run::of(
        proxyctl()
            .arg("status")
            .arg("--socket")
            .arg(hx.stats_socket()),
    )
    .expect_code(0)
    .stdout
}

/// The table line of server `name` in backend `be`, split into columns.
fn table_row(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cols| cols.len() > 3 && cols[0] == "be" && cols[1] == name)
        .unwrap_or_else(|| panic!("no row be/{name} in\n{table}"))
}

fn state(hx: &Haproxy, verb: &str, server: &str) -> Run {
    Run::of(
        proxyctl()
            .arg(verb)
            .arg(server)
            .arg("--socket")
            .arg(hx.stats_socket()),
    )
}

#[test]
fn drain_shows_drain_in_status_and_enable_brings_the_server_back() {
    let a = StaticBackend::start("A");
    let b = StaticBackend::start("B");
    let port = free_port();
    let hx = Haproxy::start(&site(port, &[("s1", &a.addr()), ("s2", &b.addr())]));

    let table = status_table(&hx);
    assert_eq!(
        table
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["PROXY", "NAME", "TYPE", "STATUS", "WEIGHT", "CUR", "TOTAL", "CHECK", "ADDR"]
    );
    assert_eq!(table_row(&table, "s1")[3], "no"); // `no check`: no health check configured
    let rows = status_json(&hx);
    assert_eq!(row(&rows, "fe", "FRONTEND")["kind"], "frontend");
    assert_eq!(row(&rows, "fe", "FRONTEND")["status"], "OPEN");
    assert_eq!(row(&rows, "be", "BACKEND")["kind"], "backend");
    assert_eq!(row(&rows, "be", "s1")["kind"], "server");
    assert_eq!(row(&rows, "be", "s1")["addr"], a.addr().as_str());
    assert_eq!(row(&rows, "be", "s2")["addr"], b.addr().as_str());

    let run = state(&hx, "drain", "be/s1").expect_code(0);
    assert_eq!(run.stdout.trim(), "be/s1: drain");
    assert_eq!(table_row(&status_table(&hx), "s1")[3], "DRAIN");
    let rows = status_json(&hx);
    assert_eq!(row(&rows, "be", "s1")["status"], "DRAIN");
    assert_ne!(row(&rows, "be", "s2")["status"], "DRAIN");
    // A drained server takes no new sessions: every request goes to s2.
    for _ in 0..10 {
        assert_eq!(get(port), "B");
    }
    let before = row(&status_json(&hx), "be", "s2")["total_sessions"]
        .as_u64()
        .unwrap();
    assert!(before >= 10, "s2 counted {before} sessions");

    state(&hx, "enable", "be/s1").expect_code(0);
    let rows = status_json(&hx);
    assert_eq!(row(&rows, "be", "s1")["status"], "no check");
    let bodies: Vec<String> = (0..6).map(|_| get(port)).collect();
    assert!(
        bodies.iter().any(|b| b == "A"),
        "s1 serves again: {bodies:?}"
    );
}

#[test]
fn an_unknown_server_is_refused_with_haproxys_message() {
    let a = StaticBackend::start("A");
    let port = free_port();
    let hx = Haproxy::start(&site(port, &[("s1", &a.addr())]));

    let run = state(&hx, "drain", "be/nope").expect_code(5);
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(
        errors[0].contains("--socket")
            && errors[0].contains(&path_str(hx.stats_socket()))
            && errors[0].contains("No such server."),
        "{}",
        errors[0]
    );
    // Pointing --socket at the master CLI by mistake says so.
    let run = Run::of(
        proxyctl()
            .arg("status")
            .arg("--socket")
            .arg(hx.master_socket()),
    )
    .expect_code(5);
    assert!(
        run.stderr.contains("is this the master CLI socket?"),
        "{}",
        run.stderr
    );
    let run = state(&hx, "drain", "nope/s1").expect_code(5);
    assert!(run.stderr.contains("No such backend."), "{}", run.stderr);

    // Names that could smuggle a second command never reach HAProxy.
    let run = state(&hx, "drain", "be/s1;disable frontend fe").expect_code(2);
    assert!(
        run.stderr.contains("only letters, digits"),
        "{}",
        run.stderr
    );
    let run = state(&hx, "drain", "s1").expect_code(2);
    assert!(
        run.stderr.contains("expected BACKEND/SERVER"),
        "{}",
        run.stderr
    );
    assert_eq!(get(port), "A");
}

#[test]
fn a_socket_below_level_admin_explains_the_missing_level() {
    let a = StaticBackend::start("A");
    let port = free_port();
    let sockets = tempfile::tempdir().unwrap();
    let user_socket = sockets.path().join("user.sock");
    let _hx = Haproxy::start_with_global(
        &site(port, &[("s1", &a.addr())]),
        &format!(
            "    stats socket {} mode 600 level user\n",
            user_socket.display()
        ),
    );
    let run = Run::of(
        proxyctl()
            .args(["drain", "be/s1", "--socket"])
            .arg(&user_socket),
    )
    .expect_code(5);
    assert!(
        run.stderr.contains("Permission denied") && run.stderr.contains("level admin"),
        "{}",
        run.stderr
    );
    // Reading is allowed at level user.
    let run = Run::of(
        proxyctl()
            .args(["status", "--json", "--socket"])
            .arg(&user_socket),
    )
    .expect_code(0);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&run.stdout).unwrap();
    assert!(rows.iter().any(|r| r["name"] == "s1"), "{rows:#?}");
}
