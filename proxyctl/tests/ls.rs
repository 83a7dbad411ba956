//! `proxyctl ls` against a real etcd.

use std::process::Command;

use flotilla_harness::etcd::Etcd;
use flotilla_harness::free_port;

fn endpoint_json(node: &str, service: &str, n: u32, host: &str) -> (String, String) {
    let container = format!("{n:012x}");
    let instance = format!("{node}-{container}-80");
    let key = format!("/flotilla/endpoints/{node}/{service}/{instance}");
    let value = serde_json::json!({
        "service": service, "instance": instance, "node": node, "host": host,
        "port": 30000 + n, "proto": "tcp", "container": container, "image": "web:git-3f2a9c1",
        "tags": ["v1", "prod"], "meta": {}, "health": "healthy",
        "registered_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    });
    (key, value.to_string())
}

fn proxyctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_proxyctl"))
        .args(args)
        .output()
        .expect("run proxyctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ls_lists_services_json_filters_and_reports_bad_records() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    for (key, value) in [
        endpoint_json("node-a", "web", 1, "10.0.0.1"),
        endpoint_json("node-b", "web", 2, "10.0.0.2"),
        endpoint_json("node-a", "api", 3, "10.0.0.1"),
    ] {
        etcd.etcdctl(&["put", &key, &value]).unwrap();
    }
    let (bad_key, mut bad) = endpoint_json("node-a", "web", 4, "10.0.0.1");
    bad = bad.replace("10.0.0.1", "10.0.0.1\\n  server evil 1.2.3.4:80");
    etcd.etcdctl(&["put", &bad_key, &bad]).unwrap();

    let (code, out, err) = proxyctl(&["ls", "--etcd-endpoints", &ep]);
    assert_eq!(code, 0, "stderr: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("SERVICE") && lines[0].contains("HEALTH"),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "header + 3 valid endpoints:\n{out}");
    assert!(
        lines[1].starts_with("api ") && lines[1].contains("10.0.0.1:30003"),
        "{out}"
    );
    assert!(
        out.contains("node-b-000000000002-80")
            && out.contains("v1,prod")
            && out.contains("healthy"),
        "{out}"
    );
    assert!(
        !out.contains("evil"),
        "an invalid record is never listed: {out}"
    );
    assert!(
        err.contains(&bad_key) && err.contains("host"),
        "the bad record is named on stderr: {err}"
    );

    let (code, out, err) = proxyctl(&["ls", "web", "--json", "--etcd-endpoints", &ep]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ls --json parses");
    assert_eq!(v["services"].as_object().unwrap().len(), 1);
    assert_eq!(v["services"]["web"].as_array().unwrap().len(), 2);
    assert_eq!(v["services"]["web"][0]["node"], "node-a");
    assert!(
        v["rejected"][&bad_key].as_str().unwrap().contains("host"),
        "{out}"
    );
    assert!(v["revision"].as_i64().unwrap() > 0);

    let (code, _, err) = proxyctl(&["ls", "nosuch", "--etcd-endpoints", &ep]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nosuch"), "{err}");

    let dead = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) = proxyctl(&[
        "ls",
        "--etcd-endpoints",
        &dead,
        "--etcd-dial-timeout",
        "500ms",
    ]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains(&dead) && err.contains("--etcd-endpoints"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");

    let (code, _, err) = proxyctl(&["ls", "--etcd-endpoints", &ep, "--prefix", "flotilla/"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--prefix"), "{err}");
}
