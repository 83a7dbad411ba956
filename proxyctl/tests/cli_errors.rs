//! Every way of pointing proxyctl at the wrong thing gives one line naming the path and the flag,
//! and the exit code documented in `--help`.

mod common;

use std::os::unix::net::UnixListener;
use std::path::Path;

use common::*;

/// A configuration `haproxy -c` accepts.
fn valid_config() -> String {
    format!(
        "global\n    maxconn 100\n{TEST_DEFAULTS}\nfrontend fe\n    bind 127.0.0.1:{}\n    \
         default_backend be\nbackend be\n    server s1 127.0.0.1:1\n",
        free_port()
    )
}

fn status(socket: &Path) -> Run {
    Run::of(proxyctl().arg("status").arg("--socket").arg(socket))
}

/// Exactly one error line, containing every needle.
fn one_line(run: &Run, needles: &[&str]) {
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "stderr:\n{}", run.stderr);
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "more than the error line on stderr:\n{}",
        run.stderr
    );
    for n in needles {
        assert!(errors[0].contains(n), "{n:?} missing from {:?}", errors[0]);
    }
}

#[test]
fn help_documents_every_exit_code() {
    for args in [
        &["--help"][..],
        &["reload", "--help"],
        &["status", "--help"],
    ] {
        let run = Run::of(proxyctl().args(args)).expect_code(0);
        assert!(run.stdout.contains("Exit codes:"), "{}", run.stdout);
        for code in 0..=6 {
            assert!(
                run.stdout.contains(&format!("\n  {code}  ")),
                "exit code {code} is not documented in {args:?}:\n{}",
                run.stdout
            );
        }
    }
}

#[test]
fn a_missing_socket_names_the_path_and_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stats.sock");
    let run = status(&socket).expect_code(4);
    one_line(&run, &["--socket", &path_str(&socket), "no such socket"]);

    let run = Run::of(proxyctl().args(["drain", "be/s1", "--socket"]).arg(&socket)).expect_code(4);
    one_line(&run, &["--socket", &path_str(&socket)]);

    let config = dir.path().join("haproxy.cfg");
    std::fs::write(&config, valid_config()).unwrap();
    let master = dir.path().join("master.sock");
    let run = Run::of(
        proxyctl()
            .arg("reload")
            .arg("--config")
            .arg(&config)
            .arg("--master-socket")
            .arg(&master),
    )
    .expect_code(4);
    one_line(&run, &["--master-socket", &path_str(&master), "-W -S"]);
}

#[test]
fn a_stale_socket_file_is_reported_as_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stats.sock");
    drop(UnixListener::bind(&socket).unwrap()); // leaves the file, nobody listens
    let run = status(&socket).expect_code(4);
    one_line(
        &run,
        &["--socket", &path_str(&socket), "connection refused"],
    );
}

#[test]
fn a_path_that_is_not_a_socket_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("haproxy.cfg");
    std::fs::write(&file, "global\n").unwrap();
    let run = status(&file).expect_code(4);
    one_line(&run, &["--socket", &path_str(&file), "not a Unix socket"]);
}

#[test]
fn permission_denied_on_the_socket_names_it() {
    let a = StaticBackend::start("A");
    let port = free_port();
    let hx = Haproxy::start(&site(port, &[("s1", &a.addr())]));
    // The socket is mode 600 in a private temp dir. Root may open anything, so as root the
    // check runs proxyctl as `nobody`; otherwise as this user with the socket made unreadable.
    // (`nobody` runs a copy in a world-readable dir, wherever the target dir lives.)
    let bin_dir = tempfile::tempdir().unwrap();
    let mut cmd = if nix::unistd::Uid::effective().is_root() {
        use std::os::unix::fs::PermissionsExt;
        let bin = bin_dir.path().join("proxyctl");
        std::fs::copy(env!("CARGO_BIN_EXE_proxyctl"), &bin).unwrap();
        std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cmd =
            std::process::Command::new(flotilla_harness::require("setpriv", "util-linux"));
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin);
        cmd
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(hx.stats_socket(), std::fs::Permissions::from_mode(0o000))
            .unwrap();
        proxyctl()
    };
    let run = Run::of(cmd.arg("status").arg("--socket").arg(hx.stats_socket())).expect_code(4);
    one_line(
        &run,
        &[
            "--socket",
            &path_str(hx.stats_socket()),
            "permission denied",
        ],
    );
}

#[test]
fn a_missing_config_names_the_path_and_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nope.cfg");
    let run = Run::of(proxyctl().arg("check").arg("--config").arg(&config)).expect_code(2);
    one_line(&run, &["--config", &path_str(&config), "no such file"]);

    // Checked before the socket is even looked at.
    let run = Run::of(
        proxyctl()
            .arg("reload")
            .arg("--config")
            .arg(&config)
            .arg("--master-socket")
            .arg(dir.path().join("master.sock")),
    )
    .expect_code(2);
    one_line(&run, &["--config", &path_str(&config)]);

    let run = Run::of(
        proxyctl()
            .args(["check", "--proxy", "nginx", "--config"])
            .arg(&config),
    )
    .expect_code(2);
    one_line(&run, &["--config", &path_str(&config)]);
}

#[test]
fn reload_without_a_master_socket_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(&config, "global\n").unwrap();
    let run = Run::of(proxyctl().arg("reload").arg("--config").arg(&config)).expect_code(2);
    one_line(&run, &["--master-socket"]);
}

#[test]
fn a_missing_proxy_binary_is_exit_6() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(&config, "global\n").unwrap();
    let missing = dir.path().join("bin/haproxy");
    let run = Run::of(
        proxyctl()
            .arg("check")
            .arg("--config")
            .arg(&config)
            .arg("--haproxy-bin")
            .arg(&missing),
    )
    .expect_code(6);
    one_line(&run, &[&path_str(&missing), "--haproxy-bin"]);
}

#[test]
fn check_prints_haproxys_messages_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("haproxy.cfg");
    let good = valid_config();
    std::fs::write(&config, &good).unwrap();
    let run = Run::of(proxyctl().arg("check").arg("--config").arg(&config)).expect_code(0);
    assert_eq!(
        run.stdout.trim(),
        format!(
            "{}: configuration is valid (0 warning(s))",
            config.display()
        )
    );

    let bad = good.replace("server s1 127.0.0.1:1", "server s1 127.0.0.1:1 weight 1000");
    std::fs::write(&config, &bad).unwrap();
    let line = line_of(&bad, "weight 1000");
    let run = Run::of(proxyctl().arg("check").arg("--config").arg(&config)).expect_code(1);
    assert!(
        run.stderr.lines().next().unwrap().starts_with(&format!(
            "{}:{line}: error: 'server be/s1' : weight of server s1 is not within 0 and 256",
            config.display()
        )),
        "{}",
        run.stderr
    );
    assert_eq!(run.error_lines().len(), 1, "{}", run.stderr);

    let run = Run::of(
        proxyctl()
            .args(["check", "--json", "--config"])
            .arg(&config),
    )
    .expect_code(1);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report["valid"], false);
    let first_error = report["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["severity"] == "error")
        .unwrap();
    assert_eq!(first_error["line"], line);
    assert_eq!(first_error["file"], path_str(&config));
    assert!(run.stderr.contains("weight of server s1"));
}
