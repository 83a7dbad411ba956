//! The confgen command line against a real etcd: `run --onetime`, `--noop --diff`, the
//! `dump` → `render` round trip, and errors that name template, line, column and key.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::{confgen, haproxy_check, identity, read, Confdir, Registry};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::require;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// The shipped haproxy templates with a resource like the shipped one writing `out/haproxy.cfg`.
fn haproxy_confdir() -> Confdir {
    let confdir = Confdir::new();
    confdir.shipped_haproxy_templates();
    confdir.resource(
        "haproxy",
        &format!(
            r#"[template]
src = "haproxy.cfg.tmpl"
dest = "{}"
prefix = "/flotilla"
keys = ["/endpoints/", "/config/haproxy/"]
mode = "0640"
check_cmd = "{} -c -q -f {{{{src}}}}"
"#,
            confdir.out("haproxy.cfg").display(),
            require("haproxy", "haproxy").display()
        ),
    );
    confdir
}

#[test]
fn onetime_noop_diff_and_the_dump_render_round_trip() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let reg = Registry::connect(&etcd);
    let confdir = haproxy_confdir();
    let dest = confdir.out("haproxy.cfg");
    reg.put("/flotilla/config/haproxy/http_bind", "127.0.0.1:1");
    reg.put(
        "/flotilla/config/haproxy/stats_socket",
        confdir.path().join("admin.sock").display().to_string(),
    );
    reg.put("/flotilla/config/haproxy/domain", "example.test");
    reg.put_endpoint("node-a", "web", 1, 8001);
    reg.put_endpoint("node-b", "web", 2, 8002);
    reg.put_endpoint("node-a", "api", 3, 8003);
    // A key outside the resource's keys: the template must not see it.
    reg.put("/flotilla/config/other/x", "y");
    let d = confdir.path().display().to_string();

    // --onetime: applies once and exits 0.
    let started = Instant::now();
    let o = confgen(&["run", "--confdir", &d, "--onetime", "--etcd-endpoints", &ep]);
    eprintln!("run --onetime took {} ms", started.elapsed().as_millis());
    assert!(o.status.success(), "{}", show(&o));
    let first = read(&dest);
    assert!(first.contains("127.0.0.1:8001") && first.contains("127.0.0.1:8003"));
    assert!(first.contains("-i web.example.test"), "{first}");
    haproxy_check(&dest).unwrap();
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    };
    assert_eq!(mode(&dest), 0o640, "the resource's mode");

    // --onetime again with nothing changed: nothing is written.
    let id = identity(&dest).unwrap();
    let o = confgen(&["run", "--confdir", &d, "--onetime", "--etcd-endpoints", &ep]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(identity(&dest).unwrap(), id);

    // --noop --diff: prints a unified diff of the change, writes nothing.
    reg.put_endpoint("node-b", "api", 4, 8004);
    let o = confgen(&[
        "run",
        "--confdir",
        &d,
        "--onetime",
        "--noop",
        "--diff",
        "--etcd-endpoints",
        &ep,
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let diff = text(&o.stdout);
    let dest_s = dest.display().to_string();
    assert!(diff.contains(&format!("--- {dest_s}\n")), "{diff}");
    assert!(
        diff.contains(&format!("+++ {dest_s} (rendered)\n")),
        "{diff}"
    );
    let added: Vec<&str> = diff
        .lines()
        .filter(|l| l.starts_with('+') && !l.starts_with("+++"))
        .collect();
    assert_eq!(added.len(), 1, "{diff}");
    assert!(added[0].contains("127.0.0.1:8004"), "{diff}");
    assert!(!diff
        .lines()
        .any(|l| l.starts_with('-') && !l.starts_with("---")));
    assert!(diff.contains("@@ "), "{diff}");
    assert_eq!(identity(&dest).unwrap(), id, "--noop wrote the file");
    assert_eq!(read(&dest), first);
    let mut beside: Vec<String> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    // The file and the endpoint count the drop guard of a later run compares with.
    assert_eq!(
        beside,
        [".haproxy.cfg.endpoints", "haproxy.cfg"],
        "--noop left files beside the destination"
    );

    // dump → render gives the file run --onetime writes.
    let o = confgen(&["dump", "--etcd-endpoints", &ep]);
    assert!(o.status.success(), "{}", show(&o));
    let snap_path = confdir.path().join("snap.json");
    std::fs::write(&snap_path, &o.stdout).unwrap();
    let snap: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(snap["prefix"], "/flotilla");
    assert!(snap["revision"].as_i64().unwrap() > 0);
    assert_eq!(
        snap["kvs"]["/flotilla/config/haproxy/domain"],
        "example.test"
    );
    let o = confgen(&["run", "--confdir", &d, "--onetime", "--etcd-endpoints", &ep]);
    assert!(o.status.success(), "{}", show(&o));
    let applied = std::fs::read(&dest).unwrap();
    assert!(text(&applied).contains("127.0.0.1:8004"));
    assert_eq!(mode(&dest), 0o640, "the mode after a replace");
    let template = confdir.template_path("haproxy.cfg.tmpl");
    let render_args = [
        "render",
        "--template",
        template.to_str().unwrap(),
        "--data",
        snap_path.to_str().unwrap(),
        "--keys",
        "/flotilla/endpoints/,/flotilla/config/haproxy/",
        "--key-prefix",
        "/flotilla",
    ];
    let o = confgen(&render_args);
    assert!(o.status.success(), "{}", show(&o));
    if o.stdout != applied {
        panic!(
            "render --data differs from run --onetime:\n{}",
            similar::TextDiff::from_lines(&text(&applied), &text(&o.stdout))
                .unified_diff()
                .header("run --onetime", "render")
        );
    }
}

#[test]
fn onetime_without_etcd_exits_3_and_writes_nothing() {
    let mut etcd = Etcd::start();
    let ep = etcd.endpoint();
    etcd.stop();
    let confdir = haproxy_confdir();
    let dest = confdir.out("haproxy.cfg");
    std::fs::write(&dest, "last good\n").unwrap();
    let d = confdir.path().display().to_string();
    let o = confgen(&[
        "run",
        "--confdir",
        &d,
        "--onetime",
        "--sync-timeout",
        "2s",
        "--etcd-endpoints",
        &ep,
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("nothing was written"),
        "{}",
        show(&o)
    );
    assert_eq!(read(&dest), "last good\n");
    let o = confgen(&["dump", "--sync-timeout", "2s", "--etcd-endpoints", &ep]);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
}

#[test]
fn template_errors_name_template_line_and_column_and_a_missing_key_names_the_key() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let reg = Registry::connect(&etcd);
    reg.put_endpoint("node-a", "web", 1, 8001);
    let confdir = Confdir::new();
    let d = confdir.path().display().to_string();
    let snap = confdir.path().join("snap.json");
    let o = confgen(&["dump", "--etcd-endpoints", &ep]);
    assert!(o.status.success(), "{}", show(&o));
    std::fs::write(&snap, &o.stdout).unwrap();
    let snap = snap.to_str().unwrap();

    // A syntax error: `render` names template, line and column.
    confdir.template("syntax.tmpl", "global\n  # fine\n  {% for x in %}\n");
    let t = confdir.template_path("syntax.tmpl");
    let o = confgen(&["render", "--template", t.to_str().unwrap(), "--data", snap]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(err.contains("template syntax.tmpl:3:"), "{err}");
    let col = err.split("template syntax.tmpl:3:").nth(1).unwrap();
    assert!(col.starts_with(|c: char| c.is_ascii_digit()), "{err}");

    // An error inside an included fragment names the fragment.
    confdir.template("main.tmpl", "top\n{% include \"part.tmpl\" %}\n");
    confdir.template("part.tmpl", "one\ntwo {{ nope }}\n");
    let t = confdir.template_path("main.tmpl");
    let o = confgen(&["render", "--template", t.to_str().unwrap(), "--data", snap]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("template part.tmpl:2:"),
        "{}",
        show(&o)
    );

    // getv of a missing key without a default names the key (render and run --onetime).
    confdir.template(
        "getv.tmpl",
        "a\n{% for name, eps in services %}{{ name }}\n{% endfor %}domain {{ getv(key=\"/config/app/domain\") }}\n",
    );
    let t = confdir.template_path("getv.tmpl");
    let o = confgen(&[
        "render",
        "--template",
        t.to_str().unwrap(),
        "--data",
        snap,
        "--key-prefix",
        "/flotilla",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(
        err.contains("key \"/flotilla/config/app/domain\" not found"),
        "{err}"
    );
    assert!(err.contains("template getv.tmpl:3:20:"), "{err}");

    let dest = confdir.out("app.conf");
    confdir.resource(
        "app",
        &format!(
            "[template]\nsrc = \"getv.tmpl\"\ndest = \"{}\"\nprefix = \"/flotilla\"\nkeys = [\"/endpoints/\", \"/config/app/\"]\n",
            dest.display()
        ),
    );
    let o = confgen(&["run", "--confdir", &d, "--onetime", "--etcd-endpoints", &ep]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(err.contains("/config/app/domain"), "{err}");
    assert!(err.contains("getv.tmpl:3:20:"), "{err}");
    assert!(!dest.exists(), "a failed render wrote {}", dest.display());
    // With the key, the same run succeeds.
    reg.put("/flotilla/config/app/domain", "example.test");
    let o = confgen(&["run", "--confdir", &d, "--onetime", "--etcd-endpoints", &ep]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(read(&dest), "a\nweb\ndomain example.test\n");

    // A bad resource: exit 2 naming the file, the field, line and column.
    confdir.resource(
        "bad",
        "[template]\nsrc = \"getv.tmpl\"\ndest = \"/tmp/x\"\nkeys = [\"/k\"]\nreload_command = \"x\"\n",
    );
    let o = confgen(&["run", "--confdir", &d, "--onetime", "--etcd-endpoints", &ep]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("reload_command") && err.contains("line 5"),
        "{err}"
    );
}

#[test]
fn values_that_would_inject_directives_never_reach_the_file() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let reg = Registry::connect(&etcd);
    let confdir = haproxy_confdir();
    let dest = confdir.out("haproxy.cfg");
    let d = confdir.path().display().to_string();
    reg.put("/flotilla/config/haproxy/http_bind", "127.0.0.1:1");
    reg.put(
        "/flotilla/config/haproxy/stats_socket",
        confdir.path().join("admin.sock").display().to_string(),
    );
    reg.put_endpoint("node-a", "web", 1, 8001);
    // Records written around the registry's encoding: a host and a meta value that would add a
    // server line, and a body that is not JSON.
    let (key, good) = reg.endpoint("node-a", "web", 2, 8002);
    let mut evil: serde_json::Value = serde_json::from_slice(&good).unwrap();
    evil["host"] = "127.0.0.1 weight 1\n    server evil 6.6.6.6:80 #".into();
    reg.put(&key, serde_json::to_vec(&evil).unwrap());
    let (key3, good3) = reg.endpoint("node-a", "web", 3, 8003);
    let mut evil3: serde_json::Value = serde_json::from_slice(&good3).unwrap();
    evil3["meta"] = serde_json::json!({"path": "/api\n    server evil 6.6.6.6:80"});
    reg.put(&key3, serde_json::to_vec(&evil3).unwrap());
    reg.put("/flotilla/endpoints/node-a/web/broken-1", "{not json");

    let o = confgen(&["run", "--confdir", &d, "--onetime", "--etcd-endpoints", &ep]);
    assert!(o.status.success(), "{}", show(&o));
    let cfg = read(&dest);
    assert!(cfg.contains("127.0.0.1:8001"), "{cfg}");
    assert!(!cfg.contains("evil") && !cfg.contains("6.6.6.6"), "{cfg}");
    assert!(!cfg.contains("8002") && !cfg.contains("8003"), "{cfg}");
    haproxy_check(&dest).unwrap();
    let err = text(&o.stderr);
    assert!(err.contains(&key) && err.contains("host"), "{err}");
    assert!(err.contains(&key3), "{err}");
    assert!(err.contains("broken-1"), "{err}");

    // A free-form config value the template prints as one argument: the render fails, naming
    // where, and the file keeps its content.
    let id = identity(&dest).unwrap();
    reg.put(
        "/flotilla/config/haproxy/domain",
        "example.test\n    bind :1",
    );
    let o = confgen(&["run", "--confdir", &d, "--onetime", "--etcd-endpoints", &ep]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(err.contains("template haproxy"), "{err}");
    assert!(err.contains("token"), "{err}");
    assert_eq!(identity(&dest).unwrap(), id);
    assert_eq!(read(&dest), cfg);
}

/// Regression: `run --onetime` before the proxy runs (the ExecStartPre of docs/OPERATIONS.md)
/// could not write the first config: the reload failed (no proxy yet) and its rollback took the
/// new file away again. `--no-reload` writes it (checked), and the proxy then starts on it.
#[test]
fn onetime_no_reload_writes_the_first_config_before_the_proxy_starts() {
    use flotilla_harness::haproxy::StaticBackend;
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.shipped_haproxy_templates();
    let d = confdir.path();
    let dest = confdir.out("haproxy.cfg");
    let master = d.join("master.sock");
    let haproxy = require("haproxy", "haproxy");
    confdir.resource(
        "haproxy",
        &format!(
            r#"[template]
src = "haproxy.cfg.tmpl"
dest = "{dest}"
prefix = "/flotilla"
keys = ["/endpoints/", "/config/haproxy/"]
check_cmd = "{haproxy} -c -q -f {{{{src}}}}"
reload_cmd = "{proxyctl} reload --config {dest} --master-socket {master} --haproxy-bin {haproxy} --timeout 10s"
wait = "20ms:200ms"
"#,
            dest = dest.display(),
            haproxy = haproxy.display(),
            proxyctl = common::workspace_bin("proxyctl").display(),
            master = master.display(),
        ),
    );
    let http_port = flotilla_harness::free_port();
    reg.put(
        "/flotilla/config/haproxy/http_bind",
        format!("127.0.0.1:{http_port}"),
    );
    reg.put(
        "/flotilla/config/haproxy/stats_socket",
        d.join("admin.sock").display().to_string(),
    );
    reg.put("/flotilla/config/haproxy/hard_stop_after", "5s");
    reg.put(
        "/flotilla/config/haproxy/server_state_file",
        d.join("server-state").display().to_string(),
    );
    let alpha = StaticBackend::start("alpha");
    let beta = StaticBackend::start("beta");
    reg.put_endpoint("node-a", "web", 1, alpha.port());
    let ds = d.to_str().unwrap();

    // Without --no-reload: the reload cannot work yet, and the rollback leaves no file.
    let o = confgen(&["run", "--confdir", ds, "--onetime", "--etcd-endpoints", &ep]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("reload_cmd failed"),
        "{}",
        show(&o)
    );
    assert!(!dest.exists());

    // With it: written and checked, no reload attempted, exit 0.
    let o = confgen(&[
        "run",
        "--confdir",
        ds,
        "--onetime",
        "--no-reload",
        "--etcd-endpoints",
        &ep,
    ]);
    assert!(o.status.success(), "{}", show(&o));
    haproxy_check(&dest).unwrap();
    assert!(read(&dest).contains(&alpha.addr()));

    // HAProxy starts on it and serves; the daemon then reloads it as usual.
    let _proxy = MasterWorker::start(&haproxy, &dest, &master, d);
    let get = |host: &str| {
        common::http_get(http_port, host, "/", Duration::from_secs(3))
            .ok()
            .filter(|(code, _)| *code == 200)
            .map(|(_, body)| body.trim().to_string())
    };
    flotilla_harness::wait_for("HAProxy to serve alpha", Duration::from_secs(15), || {
        (get("web.localhost").as_deref() == Some("alpha")).then_some(())
    });
    let mut c = common::Confgen::start(&confdir, &ep, &[]);
    reg.put_endpoint("node-b", "shop", 2, beta.port());
    flotilla_harness::wait_for("HAProxy to serve shop", Duration::from_secs(30), || {
        c.assert_running();
        (get("shop.localhost").as_deref() == Some("beta")).then_some(())
    });
}

/// `haproxy -W -db -S <master> -f <config>`: SIGTERM (the master stops its workers), then
/// SIGKILL, on drop.
struct MasterWorker(flotilla_harness::KillOnDrop);

impl MasterWorker {
    fn start(
        haproxy: &std::path::Path,
        config: &std::path::Path,
        master: &std::path::Path,
        dir: &std::path::Path,
    ) -> MasterWorker {
        let log = std::fs::File::create(dir.join("haproxy.log")).unwrap();
        let child = std::process::Command::new(haproxy)
            .arg("-W")
            .arg("-db")
            .arg("-S")
            .arg(format!("{},mode,600", master.display()))
            .arg("-f")
            .arg(config)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        MasterWorker(flotilla_harness::KillOnDrop(Some(child)))
    }
}

impl Drop for MasterWorker {
    fn drop(&mut self) {
        self.0.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(c) = self.0 .0.as_mut() {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0.kill();
    }
}

/// Logs in a pipe or file carry no colour codes; on the journal stream (systemd's
/// `JOURNAL_STREAM` names stderr) lines start with the syslog priority and carry no timestamp.
#[test]
fn logs_are_plain_in_a_pipe_and_carry_priorities_on_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let confdir = Confdir::new();
    confdir.template("t.tmpl", "x\n");
    confdir.resource(
        "t",
        &format!(
            "[template]\nsrc = \"t.tmpl\"\ndest = \"{}\"\nprefix = \"/flotilla\"\nkeys = [\"/config/\"]\n",
            confdir.out("t").display()
        ),
    );
    // Nothing listens there: confgen logs a warning about etcd and gives up after 1 s.
    let port = flotilla_harness::free_port().to_string();
    let args = |c: &mut std::process::Command| {
        c.args(["run", "--onetime", "--sync-timeout", "1s", "--confdir"])
            .arg(confdir.path())
            .args(["--etcd-endpoints", &format!("http://127.0.0.1:{port}")])
            .env("RUST_LOG", "info");
    };
    let piped = {
        let mut c = common::clean_env(std::process::Command::new(common::confgen_bin()));
        args(&mut c);
        c.output().unwrap()
    };
    let err = text(&piped.stderr);
    assert!(err.contains("WARN"), "{err}");
    assert!(!err.contains('\u{1b}'), "colour codes in a pipe:\n{err:?}");
    // The journal: stderr is a file whose device and inode JOURNAL_STREAM names.
    let path = d.path().join("journal");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let mut c = common::clean_env(std::process::Command::new(common::confgen_bin()));
    args(&mut c);
    c.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(file)
        .stdout(std::process::Stdio::null());
    c.status().unwrap();
    let journal = read(&path);
    let lines: Vec<&str> = journal
        .lines()
        .filter(|l| !l.starts_with("confgen:"))
        .collect();
    assert!(!lines.is_empty(), "{journal}");
    let stamped = regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d").unwrap();
    for l in &lines {
        assert!(
            l.starts_with("<4>") || l.starts_with("<6>") || l.starts_with("<3>"),
            "no priority prefix: {l:?}"
        );
        assert!(!stamped.is_match(l) && !l.contains('\u{1b}'), "{l:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>") && l.contains("WARN")),
        "{journal}"
    );
}

/// confgen runs with one malloc arena (it re-executes itself once with `MALLOC_ARENA_MAX=1`;
/// registry/src/malloc.rs), and the commands it runs do not inherit that setting.
#[test]
fn confgen_runs_with_one_malloc_arena_and_its_commands_keep_glibc_defaults() {
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let confdir = Confdir::new();
    confdir.template("plain.tmpl", "hello\n");
    let seen = confdir.out("seen");
    // The check command (run by `/bin/sh -c`, confgen's child) records its own environment and
    // its parent's, confgen's, as the kernel kept it from the exec (NUL-separated).
    confdir.resource(
        "plain",
        &format!(
            r#"[template]
src = "plain.tmpl"
dest = "{dest}"
prefix = "/flotilla"
keys = ["/endpoints/"]
check_cmd = "test -f {{{{src}}}} && env > {seen}.own && cat /proc/$PPID/environ > {seen}.parent"
"#,
            dest = confdir.out("plain").display(),
            seen = seen.display(),
        ),
    );
    let d = confdir.path().display().to_string();
    let o = confgen(&["run", "--confdir", &d, "--onetime", "--etcd-endpoints", &ep]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(read(&confdir.out("plain")), "hello\n");
    let parent = std::fs::read(seen.with_extension("parent")).expect("confgen's environment");
    let parent: Vec<String> = parent
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert!(
        parent.iter().any(|v| v == "MALLOC_ARENA_MAX=1"),
        "confgen was not re-executed with one arena: {parent:?}"
    );
    let own = read(&seen.with_extension("own"));
    assert!(
        !own.contains("MALLOC_ARENA_MAX") && !own.contains("FLOTILLA_MALLOC_ARENA_SET"),
        "the check command inherited confgen's malloc setting:\n{own}"
    );
}
