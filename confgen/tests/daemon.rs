//! `confgen run` as a process against a real etcd: coalescing a burst, no write for an
//! unchanged render, template edits (file watch and SIGHUP), the drop guard, and staleness while
//! etcd is unreachable. Reloads are counted by a `reload_cmd` that appends to a file.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{count_lines, haproxy_check, identity, read, tail, Confdir, Confgen, Registry};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::{require, wait_for};

/// A small template listing every endpoint, one `server` line each, and a trailer.
const LIST: &str = "# services\n\
{% for name, eps in services %}{% for ep in eps %}server {{ name }} {{ ep.addr }}\n{% endfor %}{% endfor %}\
# end\n";

fn servers(text: &str) -> usize {
    text.lines()
        .filter(|l| l.trim_start().starts_with("server "))
        .count()
}

/// A resource `name` rendering `src` to `out/<name>`, counting reloads in `<name>.reloads`.
fn resource(confdir: &Confdir, name: &str, src: &str, extra: &str) -> (PathBuf, PathBuf) {
    let dest = confdir.out(name);
    let reloads = confdir.path().join(format!("{name}.reloads"));
    confdir.resource(
        name,
        &format!(
            r#"[template]
src = "{src}"
dest = "{dest}"
prefix = "/flotilla"
keys = ["/endpoints/", "/config/"]
reload_cmd = "echo reload >> {reloads}"
{extra}
"#,
            dest = dest.display(),
            reloads = reloads.display(),
        ),
    );
    (dest, reloads)
}

#[test]
fn a_burst_of_1000_puts_gives_a_few_reloads_and_an_unchanged_render_none() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.shipped_haproxy_templates();
    let haproxy = require("haproxy", "haproxy");
    // The shipped resource's quiescence (templates/conf.d/haproxy.toml) and a real check.
    let (dest, reloads) = resource(
        &confdir,
        "haproxy",
        "haproxy.cfg.tmpl",
        &format!(
            "check_cmd = \"{} -c -q -f {{{{src}}}}\"\nwait = \"20ms:1s\"\n",
            haproxy.display()
        ),
    );
    reg.put("/flotilla/config/haproxy/http_bind", "127.0.0.1:1");
    reg.put(
        "/flotilla/config/haproxy/stats_socket",
        confdir.path().join("admin.sock").display().to_string(),
    );
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("the first write", Duration::from_secs(30), || {
        c.assert_running();
        (count_lines(&reloads) == 1).then_some(())
    });
    let renders_before = c.metric("confgen_renders_total", &[]);

    // 1,000 puts, each its own request and revision, 32 in flight.
    let kvs: Vec<(String, Vec<u8>)> = (0..1000u32)
        .map(|i| reg.endpoint("node-a", &format!("svc{}", i % 50), i, 30000 + i as u16))
        .collect();
    let started = Instant::now();
    reg.put_each(kvs.clone(), 32);
    let put_took = started.elapsed();
    wait_for(
        "every endpoint of the burst in the file",
        Duration::from_secs(60),
        || (servers(&read(&dest)) == 1000).then_some(()),
    );
    let settled = started.elapsed();
    // Every write has had its reload.
    wait_for("the last reload", Duration::from_secs(30), || {
        let writes = c.metric("confgen_writes_total", &[]) as usize;
        (writes == count_lines(&reloads)).then_some(writes)
    });
    let burst_reloads = count_lines(&reloads) - 1;
    let burst_renders = c.metric("confgen_renders_total", &[]) - renders_before;
    eprintln!(
        "burst: 1000 puts in {} ms; file complete after {} ms; {burst_renders} renders, \
         {burst_reloads} reloads",
        put_took.as_millis(),
        settled.as_millis()
    );
    haproxy_check(&dest).unwrap();
    // What the incremental view and the per-service fragment cache produced after 1,000
    // changes is exactly a full render of the same registry (dump → render).
    assert!(
        full_render(&confdir, &etcd) == std::fs::read(&dest).unwrap(),
        "the daemon's file differs from a full render of the same registry"
    );
    // The puts take ~0.5-1.5 s here and a batch is flushed at least every second (wait max);
    // a pause of 20 ms (wait min) between puts on a loaded machine ends a batch early. Seen:
    // 3-5 reloads.
    assert!(
        (1..=8).contains(&burst_reloads),
        "{burst_reloads} reloads for a burst of 1000 puts\n{}",
        tail(&c.log(), 30)
    );

    // The same values again (new revisions, identical bytes), and a changed record whose
    // change the template does not show (the image), and an unused config key: no write, no
    // reload. The config key's render is the barrier: after it everything before was handled.
    let id = identity(&dest).unwrap();
    let writes = c.metric("confgen_writes_total", &[]);
    let reloads_now = count_lines(&reloads);
    reg.put_each(kvs[..100].to_vec(), 8);
    let (key, _) = reg.endpoint("node-a", "svc7", 7, 30007);
    let mut ep: flotilla_registry::Endpoint = serde_json::from_slice(&kvs[7].1).unwrap();
    ep.image = "flotilla/test:2".into();
    reg.put(&key, ep.encode(&reg.keys).unwrap());
    let renders = c.metric("confgen_renders_total", &[]);
    let unchanged = c.log().matches("render unchanged").count();
    reg.put("/flotilla/config/unused", "barrier");
    c.wait_log_count(
        "render unchanged; nothing written",
        unchanged + 1,
        Duration::from_secs(30),
    );
    let revision = reg.revision();
    wait_for("confgen at the barrier", Duration::from_secs(30), || {
        (c.metric("confgen_registry_revision", &[]) as i64 >= revision).then_some(())
    });
    // The barrier's render may still be in its quiet period when the revision is seen.
    wait_for("the barrier's render", Duration::from_secs(30), || {
        (c.metric("confgen_renders_total", &[]) > renders).then_some(())
    });
    assert_eq!(c.metric("confgen_writes_total", &[]), writes, "a write");
    assert_eq!(count_lines(&reloads), reloads_now, "a reload");
    assert_eq!(identity(&dest).unwrap(), id, "the file was rewritten");

    // Deletes (whole services among them) and moved endpoints, applied incrementally: the file
    // again ends up exactly a full render.
    let mut gone: Vec<String> = kvs
        .iter()
        .filter(|(k, _)| k.contains("/svc1/") || k.contains("/svc2/"))
        .map(|(k, _)| k.clone())
        .collect();
    gone.extend(kvs.iter().step_by(7).map(|(k, _)| k.clone()));
    for k in &gone {
        reg.delete(k);
    }
    let moved: Vec<(String, Vec<u8>)> = (0..1000u32)
        .step_by(11)
        .map(|i| reg.endpoint("node-a", &format!("svc{}", i % 50), i, 40000 + i as u16))
        .collect();
    reg.put_each(moved, 8);
    let full = full_render(&confdir, &etcd);
    wait_for(
        "the file equal to a full render",
        Duration::from_secs(30),
        || {
            c.assert_running();
            (std::fs::read(&dest).ok()? == full).then_some(())
        },
    );
    // svc1's endpoint 1 was deleted with its whole service (and not moved back).
    assert!(!read(&dest).contains("127.0.0.1:30001 check"));
    c.assert_running();
}

/// `confgen dump` of the registry, then `confgen render` of the confdir's haproxy template from
/// it (keys and prefix as the tests' resources): what a full render gives.
fn full_render(confdir: &Confdir, etcd: &Etcd) -> Vec<u8> {
    let dump = common::confgen(&["dump", "--etcd-endpoints", &etcd.endpoint()]);
    assert!(dump.status.success());
    let snap = confdir.path().join("snap.json");
    std::fs::write(&snap, &dump.stdout).unwrap();
    let full = common::confgen(&[
        "render",
        "--template",
        confdir.template_path("haproxy.cfg.tmpl").to_str().unwrap(),
        "--data",
        snap.to_str().unwrap(),
        "--keys",
        "/flotilla/endpoints/,/flotilla/config/",
        "--key-prefix",
        "/flotilla",
    ]);
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    full.stdout
}

#[test]
fn template_edits_are_picked_up_by_the_file_watch_and_sighup_and_a_broken_one_keeps_the_file() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    // templates/list.tmpl is a link to src/list.tmpl, outside the watched directories: editing
    // src/list.tmpl in place is seen only through SIGHUP.
    let outside = confdir.path().join("src");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("list.tmpl"), LIST).unwrap();
    std::os::unix::fs::symlink(
        outside.join("list.tmpl"),
        confdir.template_path("list.tmpl"),
    )
    .unwrap();
    let (dest, reloads) = resource(&confdir, "list", "list.tmpl", "");
    reg.put_endpoint("node-a", "web", 1, 8001);
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("the first write", Duration::from_secs(30), || {
        c.assert_running();
        (servers(&read(&dest)) == 1).then_some(())
    });

    // SIGHUP re-reads the template.
    std::fs::write(outside.join("list.tmpl"), format!("# v2\n{LIST}")).unwrap();
    c.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the SIGHUP re-render", Duration::from_secs(30), || {
        read(&dest).starts_with("# v2\n").then_some(())
    });
    let log = c.log();
    assert!(log.contains("SIGHUP: re-reading conf.d and templates"));
    assert!(
        !log.contains("template or resource file changed"),
        "the file watch saw an edit outside the watched directories"
    );
    wait_for("the reload", Duration::from_secs(30), || {
        (count_lines(&reloads) == 2).then_some(())
    });

    // A broken save (replacing the link): the old file stays, the error names template, line
    // and column.
    let good = std::fs::read(&dest).unwrap();
    let good_id = identity(&dest).unwrap();
    let saved = Instant::now();
    common::write_atomic(
        &confdir.template_path("list.tmpl"),
        b"# v3\n{% for name, eps in services %}\n{{ name }}\n{% for ep in %}\n",
    );
    let log = c.wait_log("template does not load", Duration::from_secs(30));
    let noticed = saved.elapsed();
    let line = log
        .lines()
        .find(|l| l.contains("template does not load"))
        .unwrap();
    assert!(line.contains("template list.tmpl:4:"), "{line}");
    let column = line.split("template list.tmpl:4:").nth(1).unwrap();
    assert!(
        column.starts_with(|ch: char| ch.is_ascii_digit()),
        "no column in {line}"
    );
    // A registry change now renders nothing: the file keeps its content.
    reg.put_endpoint("node-a", "web", 2, 8002);
    wait_for("the render failure", Duration::from_secs(30), || {
        (c.metric("confgen_failures_total", &[("kind", "render")]) >= 2.0).then_some(())
    });
    assert_eq!(std::fs::read(&dest).unwrap(), good);
    assert_eq!(identity(&dest).unwrap(), good_id);
    assert_eq!(count_lines(&reloads), 2, "a reload after a broken template");
    let (code, health) = c.healthz().unwrap();
    assert_eq!(code, 503);
    assert!(health.contains("list.tmpl:4:"), "{health}");

    // The fix is applied with the change that came meanwhile.
    let saved = Instant::now();
    common::write_atomic(&confdir.template_path("list.tmpl"), LIST.as_bytes());
    wait_for(
        "the fixed template applied",
        Duration::from_secs(30),
        || (servers(&read(&dest)) == 2).then_some(()),
    );
    let applied = saved.elapsed();
    eprintln!(
        "template save → error logged {} ms; fixed save → file written {} ms",
        noticed.as_millis(),
        applied.as_millis()
    );
    assert_eq!(
        read(&dest),
        format!("# services\nserver web 127.0.0.1:8001\nserver web 127.0.0.1:8002\n# end\n")
    );
    wait_for("the reload", Duration::from_secs(30), || {
        (count_lines(&reloads) == 3).then_some(())
    });
    c.assert_running();
}

#[test]
fn the_drop_guard_holds_a_render_losing_80_percent_for_the_grace_then_applies_it() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.template("list.tmpl", LIST);
    let grace = Duration::from_secs(2);
    let (dest, reloads) = resource(
        &confdir,
        "list",
        "list.tmpl",
        "wait = \"20ms:200ms\"\nmax_drop = \"50%\"\ndrop_grace = \"2s\"\n",
    );
    let keys: Vec<String> = (0..10)
        .map(|i| reg.put_endpoint("node-a", "web", i, 9000 + i as u16))
        .collect();
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("10 endpoints in the file", Duration::from_secs(30), || {
        c.assert_running();
        (servers(&read(&dest)) == 10).then_some(())
    });
    let ten = read(&dest);

    // 8 of 10 vanish in one transaction.
    reg.delete_at_once(&keys[..8]);
    let deleted = Instant::now();
    c.wait_log("drop guard: holding", Duration::from_secs(10));
    let (code, health) = c.healthz().unwrap();
    assert!(
        health.contains("held by the drop guard (2 of 10 endpoints)"),
        "{code} {health}"
    );
    // Held: the file keeps all 10 until the grace has passed.
    while deleted.elapsed() < grace - Duration::from_millis(300) {
        assert_eq!(
            read(&dest),
            ten,
            "the drop was applied {} ms after the delete, before the {grace:?} grace",
            deleted.elapsed().as_millis()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for("the drop applied after the grace", grace * 10, || {
        (servers(&read(&dest)) == 2).then_some(())
    });
    let applied = deleted.elapsed();
    eprintln!(
        "drop guard: 8 of 10 deleted; applied {} ms later (grace {grace:?})",
        applied.as_millis()
    );
    assert!(applied >= grace, "applied after {applied:?}");
    c.wait_log(
        "the drop persisted for the grace period",
        Duration::from_secs(5),
    );
    let m = c.metrics();
    assert!(common::metric(&m, "confgen_held_total", &[]) >= 1.0, "{m}");
    wait_for("its reload", Duration::from_secs(30), || {
        (count_lines(&reloads) == 2).then_some(())
    });

    // A small drop (1 of 2 is 50 %, not more) is applied at once.
    reg.delete(&keys[8]);
    wait_for("a 50 % drop applied", Duration::from_secs(10), || {
        (servers(&read(&dest)) == 1).then_some(())
    });
    c.assert_running();
}

#[test]
fn nothing_is_written_before_a_complete_view_nor_while_etcd_is_down_and_healthz_says_stale() {
    let mut etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    reg.put_endpoint("node-a", "web", 1, 8001);
    drop(reg);
    let confdir = Confdir::new();
    confdir.template("list.tmpl", LIST);
    let (dest, reloads) = resource(&confdir, "list", "list.tmpl", "");
    std::fs::write(&dest, "the last good config\n").unwrap();
    let id = identity(&dest).unwrap();

    // etcd down from the start: no view, nothing written, stale.
    etcd.stop();
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    let (code, body) = wait_for("/healthz", Duration::from_secs(30), || c.healthz().ok());
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("registry: stale (no complete view yet)"),
        "{body}"
    );
    assert_eq!(c.metric("confgen_stale", &[]), 1.0);
    // A template save would render now if anything could be: it must not.
    confdir.template("list.tmpl", &format!("# edited\n{LIST}"));
    c.wait_log("template or resource file changed", Duration::from_secs(10));
    wait_until_the_edit_waits_for_a_view(&c);
    assert_eq!(
        identity(&dest).unwrap(),
        id,
        "written without a registry view"
    );
    assert_eq!(read(&dest), "the last good config\n");
    assert_eq!(count_lines(&reloads), 0);

    // etcd back: the first complete view is applied.
    etcd.restart();
    wait_for("the first write", Duration::from_secs(30), || {
        c.assert_running();
        (servers(&read(&dest)) == 1).then_some(())
    });
    assert!(read(&dest).starts_with("# edited\n"));
    let (code, body) = wait_for("healthy", Duration::from_secs(30), || {
        c.healthz().ok().filter(|(code, _)| *code == 200)
    });
    assert!(body.contains("registry: current"), "{code} {body}");

    // etcd stops: stale, and the file stays as it is (a template save is not applied).
    etcd.stop();
    let stopped = Instant::now();
    let body = wait_for("/healthz to say stale", Duration::from_secs(30), || {
        c.healthz()
            .ok()
            .filter(|(code, _)| *code == 503)
            .map(|(_, b)| b)
    });
    eprintln!(
        "etcd stopped → /healthz stale after {} ms: {}",
        stopped.elapsed().as_millis(),
        body.trim()
    );
    assert!(body.contains("registry: stale"), "{body}");
    assert_eq!(c.metric("confgen_stale", &[]), 1.0);
    let written = std::fs::read(&dest).unwrap();
    let id = identity(&dest).unwrap();
    let saves = c.log().matches("template or resource file changed").count();
    confdir.template("list.tmpl", &format!("# edited again\n{LIST}"));
    c.wait_log_count(
        "template or resource file changed",
        saves + 1,
        Duration::from_secs(10),
    );
    wait_until_the_edit_waits_for_a_view(&c);
    assert_eq!(std::fs::read(&dest).unwrap(), written);
    assert_eq!(identity(&dest).unwrap(), id, "written while etcd was down");

    // Back again: current, and the pending edit is applied.
    etcd.restart();
    wait_for("the edit applied", Duration::from_secs(30), || {
        read(&dest).starts_with("# edited again\n").then_some(())
    });
    wait_for("healthy again", Duration::from_secs(30), || {
        c.healthz().ok().filter(|(code, _)| *code == 200)
    });
    c.assert_running();
}

#[test]
fn a_change_renders_only_the_resources_whose_keys_it_touches_and_a_shared_reload_runs_once() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    let reloads = confdir.path().join("shared.reloads");
    confdir.template(
        "a.tmpl",
        &format!("a={{{{ getv(key=\"/config/a/x\", default=\"-\") }}}}\n{LIST}"),
    );
    confdir.template(
        "b.tmpl",
        "b={{ getv(key=\"/config/b/x\", default=\"-\") }}\n",
    );
    for (name, keys) in [
        ("a", "[\"/endpoints/\", \"/config/a/\"]"),
        ("b", "[\"/config/b/\"]"),
    ] {
        confdir.resource(
            name,
            &format!(
                "[template]\nsrc = \"{name}.tmpl\"\ndest = \"{}\"\nprefix = \"/flotilla\"\nkeys = {keys}\n\
                 reload_cmd = \"echo reload >> {}\"\nwait = \"20ms:200ms\"\n",
                confdir.out(name).display(),
                reloads.display()
            ),
        );
    }
    reg.put_endpoint("node-a", "web", 1, 8001);
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("both files", Duration::from_secs(30), || {
        c.assert_running();
        (confdir.out("a").exists() && confdir.out("b").exists() && count_lines(&reloads) >= 1)
            .then_some(())
    });
    // Both were written in the first batch: their one reload command ran once.
    wait_for("the writes counted", Duration::from_secs(10), || {
        (c.metric("confgen_writes_total", &[]) == 2.0).then_some(())
    });
    assert_eq!(count_lines(&reloads), 1);
    let renders = |c: &Confgen, r: &str| c.metric("confgen_renders_total", &[("resource", r)]);
    let a_renders = renders(&c, "a");

    // A change only b sees: only b is rendered.
    reg.put("/flotilla/config/b/x", "1");
    wait_for("b written", Duration::from_secs(30), || {
        (read(&confdir.out("b")) == "b=1\n").then_some(())
    });
    wait_for("its reload", Duration::from_secs(10), || {
        (count_lines(&reloads) == 2).then_some(())
    });
    assert_eq!(
        renders(&c, "a"),
        a_renders,
        "a was rendered for a change of b's keys"
    );
    // Nothing is left to apply: the watch lag is back to 0 (a is current too).
    wait_for("watch lag 0", Duration::from_secs(10), || {
        (c.metric("confgen_watch_lag_revisions", &[]) == 0.0).then_some(())
    });

    // A key outside every resource's keys: nothing is rendered, and no lag either.
    let before = c.metric("confgen_renders_total", &[]);
    reg.put("/flotilla/config/elsewhere/x", "1");
    let revision = reg.revision();
    wait_for("confgen at that revision", Duration::from_secs(10), || {
        (c.metric("confgen_registry_revision", &[]) as i64 >= revision).then_some(())
    });
    assert_eq!(c.metric("confgen_renders_total", &[]), before);
    assert_eq!(c.metric("confgen_watch_lag_revisions", &[]), 0.0);

    // One transaction touching both: both written, one reload.
    reg.put_at_once(&[("/flotilla/config/a/x", "2"), ("/flotilla/config/b/x", "2")]);
    wait_for("both written", Duration::from_secs(30), || {
        (read(&confdir.out("a")).starts_with("a=2\n") && read(&confdir.out("b")) == "b=2\n")
            .then_some(())
    });
    wait_for("the writes counted", Duration::from_secs(10), || {
        (c.metric("confgen_writes_total", &[]) == 5.0).then_some(())
    });
    wait_for("the reload", Duration::from_secs(10), || {
        (count_lines(&reloads) == 3).then_some(())
    });
    c.assert_running();
}

/// The cause of a flaky run of the test above: each resource has its own quiet timer, so a
/// transaction that arrives while one resource is inside its quiet period (it was flushed less
/// than `wait.min` ago) and the other is not was applied in two batches, with two reloads. Here
/// b's quiet period is long (8 s), so that split is certain without the fix.
#[test]
fn one_transaction_touching_two_resources_with_one_reload_command_reloads_once() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    let reloads = confdir.path().join("shared.reloads");
    for (name, wait) in [("a", "20ms:200ms"), ("b", "8s:16s")] {
        confdir.template(
            &format!("{name}.tmpl"),
            &format!("{name}={{{{ getv(key=\"/config/{name}/x\", default=\"-\") }}}}\n"),
        );
        confdir.resource(
            name,
            &format!(
                "[template]\nsrc = \"{name}.tmpl\"\ndest = \"{}\"\nprefix = \"/flotilla\"\n\
                 keys = [\"/config/{name}/\"]\nreload_cmd = \"echo reload >> {}\"\nwait = \"{wait}\"\n",
                confdir.out(name).display(),
                reloads.display()
            ),
        );
    }
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("both files and one reload", Duration::from_secs(30), || {
        c.assert_running();
        (confdir.out("a").exists() && confdir.out("b").exists() && count_lines(&reloads) == 1)
            .then_some(())
    });
    // b changes alone (a leading edge: applied at once) and starts its 8 s quiet period.
    reg.put("/flotilla/config/b/x", "1");
    wait_for("b=1 and its reload", Duration::from_secs(30), || {
        (read(&confdir.out("b")) == "b=1\n" && count_lines(&reloads) == 2).then_some(())
    });
    // Within b's quiet period, one transaction touching both.
    let start = Instant::now();
    reg.put_at_once(&[("/flotilla/config/a/x", "2"), ("/flotilla/config/b/x", "2")]);
    wait_for("both written", Duration::from_secs(30), || {
        (read(&confdir.out("a")) == "a=2\n" && read(&confdir.out("b")) == "b=2\n").then_some(())
    });
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "b waited out its quiet period ({:?}) instead of joining a's batch",
        start.elapsed()
    );
    wait_for("the writes counted", Duration::from_secs(10), || {
        (c.metric("confgen_writes_total", &[]) == 5.0).then_some(())
    });
    // Past b's quiet period: still one reload for the transaction, none trailing.
    std::thread::sleep(Duration::from_secs(9).saturating_sub(start.elapsed()));
    assert_eq!(count_lines(&reloads), 3, "one reload per batch: 1 + 1 + 1");
    assert_eq!(c.metric("confgen_writes_total", &[]), 5.0);
    c.assert_running();
}

#[test]
fn sd_notify_ready_only_once_every_template_rendered_then_watchdog_pings_and_stopping() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    reg.put_endpoint("node-a", "web", 1, 8001);
    let confdir = Confdir::new();
    confdir.template("good.tmpl", LIST);
    confdir.template("broken.tmpl", "x\n{% if %}\n");
    resource(&confdir, "good", "good.tmpl", "");
    let (broken_dest, _) = resource(&confdir, "broken", "broken.tmpl", "");
    let socket_path = confdir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut c = Confgen::start_with_env(
        &confdir,
        &etcd.endpoint(),
        &[],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
            ("WATCHDOG_PID", "self"),
        ],
    );
    let mut messages: Vec<String> = Vec::new();
    fn receive(
        socket: &std::os::unix::net::UnixDatagram,
        messages: &mut Vec<String>,
        until: impl Fn(&[String]) -> bool,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 512];
        while !until(messages) {
            assert!(
                Instant::now() < deadline,
                "sd_notify messages so far: {messages:?}"
            );
            if let Ok(n) = socket.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
            }
        }
    }
    // One template renders, the other cannot: watchdog pings, but no READY.
    wait_for("the good template written", Duration::from_secs(30), || {
        (servers(&read(&confdir.out("good"))) == 1).then_some(())
    });
    receive(
        &socket,
        &mut messages,
        |m| m.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        Duration::from_secs(10),
    );
    assert!(
        !messages.iter().any(|m| m.contains("READY=1")),
        "READY before every template rendered: {messages:?}"
    );
    assert!(!broken_dest.exists());

    // Fixed: READY once.
    confdir.template("broken.tmpl", "fixed\n");
    receive(
        &socket,
        &mut messages,
        |m| m.iter().any(|m| m.contains("READY=1")),
        Duration::from_secs(30),
    );
    assert_eq!(read(&broken_dest), "fixed\n");
    // SIGTERM: STOPPING=1, and a clean exit.
    c.signal(nix::sys::signal::Signal::SIGTERM);
    receive(
        &socket,
        &mut messages,
        |m| m.iter().any(|m| m.contains("STOPPING=1")),
        Duration::from_secs(10),
    );
    let status = wait_for("confgen to exit", Duration::from_secs(10), || {
        c.proc.0.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(status.success(), "{status}\n{}", tail(&c.log(), 20));
    assert_eq!(
        messages.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "{messages:?}"
    );
}

/// Regression: confgen killed after renaming a new file into place but before its reload ran
/// left the proxy on the old config for good: the restarted confgen found the file equal to its
/// render ("unchanged") and never reloaded.
#[test]
fn a_kill_between_write_and_reload_is_followed_by_a_reload_after_restart() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.template("a.tmpl", LIST);
    confdir.template("b.tmpl", "b {{ services | length }}\n");
    // a is written first; b's check then takes 25 s while the file `slow` exists (the kill
    // must land while it runs: with a 3 s check a loaded machine once let the check end and
    // the batch's reload of a start before the kill, and that orphaned reload was counted as
    // the restarted run's), and the batch's reloads run after it.
    let (a_dest, a_reloads) = resource(&confdir, "a", "a.tmpl", "");
    let b_check = confdir.path().join("b-check-started");
    let slow = confdir.path().join("slow");
    resource(
        &confdir,
        "b",
        "b.tmpl",
        &format!(
            "check_cmd = \"touch {} && if [ -e {} ]; then sleep 25; fi && test -s {{{{src}}}}\"\n",
            b_check.display(),
            slow.display()
        ),
    );
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("the first reload of a", Duration::from_secs(30), || {
        c.assert_running();
        (count_lines(&a_reloads) == 1).then_some(())
    });
    std::fs::remove_file(&b_check).unwrap();
    std::fs::write(&slow, "").unwrap();

    reg.put_endpoint("node-a", "web", 1, 8001);
    wait_for(
        "a written and b's check running",
        Duration::from_secs(30),
        || (servers(&read(&a_dest)) == 1 && b_check.exists()).then_some(()),
    );
    c.proc.kill();
    assert_eq!(count_lines(&a_reloads), 1, "a was reloaded before the kill");
    // The check command runs in its own process group and outlives a SIGKILLed confgen: end it.
    kill_processes_mentioning(&b_check.display().to_string());
    std::fs::remove_file(&slow).unwrap();

    // The file is new and the proxy has not loaded it: the next run reloads it.
    let before_second = read(&confdir.path().join("confgen.log")).len();
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for(
        "a reload of the file written by the killed run",
        Duration::from_secs(30),
        || {
            c.assert_running();
            (count_lines(&a_reloads) == 2).then_some(())
        },
    );
    // And only once: a further restart with nothing changed reloads nothing.
    // (The log is shared by the runs: look at this run's part, or the first run's "ready" lets
    // the test kill this one in the middle of its reload.)
    wait_for("the restart settled", Duration::from_secs(30), || {
        c.log()[before_second..]
            .contains("every template has rendered; ready")
            .then_some(())
    });
    drop(c);
    let log_len = read(&confdir.path().join("confgen.log")).len();
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("the third run ready", Duration::from_secs(30), || {
        c.assert_running();
        read(&confdir.path().join("confgen.log"))[log_len..]
            .contains("every template has rendered; ready")
            .then_some(())
    });
    assert_eq!(
        count_lines(&a_reloads),
        2,
        "a restart without changes reloaded:\n{}",
        tail(&c.log(), 40)
    );
}

#[test]
fn conf_d_edits_add_and_remove_resources_and_an_invalid_edit_keeps_the_running_configuration() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.template("list.tmpl", LIST);
    let (a_dest, _) = resource(&confdir, "a", "list.tmpl", "");
    reg.put_endpoint("node-a", "web", 1, 8001);
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("a written", Duration::from_secs(30), || {
        c.assert_running();
        (servers(&read(&a_dest)) == 1).then_some(())
    });

    // A new resource file is picked up and rendered.
    let (b_dest, _) = resource(&confdir, "b", "list.tmpl", "");
    wait_for("b written", Duration::from_secs(30), || {
        (servers(&read(&b_dest)) == 1).then_some(())
    });

    // An invalid edit (unknown field): reported with file and field, the running
    // configuration (a and b) keeps working.
    let changed = c.log().matches("template or resource file changed").count();
    confdir.resource(
        "b",
        &format!(
            "[template]\nsrc = \"list.tmpl\"\ndest = \"{}\"\nkeys = [\"/flotilla/endpoints/\"]\nreload_command = \"x\"\n",
            b_dest.display()
        ),
    );
    let log = c.wait_log_count(
        "the new configuration is invalid; keeping the running one",
        1,
        Duration::from_secs(10),
    );
    assert!(log.matches("template or resource file changed").count() > changed);
    let line = log
        .lines()
        .find(|l| l.contains("keeping the running one"))
        .unwrap();
    assert!(
        line.contains("b.toml") && line.contains("reload_command"),
        "{line}"
    );
    reg.put_endpoint("node-a", "web", 2, 8002);
    wait_for("both still applied", Duration::from_secs(30), || {
        (servers(&read(&a_dest)) == 2 && servers(&read(&b_dest)) == 2).then_some(())
    });

    // Removing b: it is no longer managed (its file stays as it is).
    std::fs::remove_file(confdir.path().join("conf.d/b.toml")).unwrap();
    c.wait_log("resource removed", Duration::from_secs(10));
    reg.put_endpoint("node-a", "web", 3, 8003);
    wait_for("a applied", Duration::from_secs(30), || {
        (servers(&read(&a_dest)) == 3).then_some(())
    });
    assert_eq!(servers(&read(&b_dest)), 2, "a removed resource was written");
    c.assert_running();
}

#[test]
fn noop_daemon_prints_diffs_and_writes_nothing() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.template("list.tmpl", LIST);
    let (dest, reloads) = resource(&confdir, "list", "list.tmpl", "");
    std::fs::write(&dest, "# services\n# end\n").unwrap();
    let id = identity(&dest).unwrap();
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &["--noop", "--diff"]);
    reg.put_endpoint("node-a", "web", 1, 8001);
    let log = c.wait_log("+server web 127.0.0.1:8001", Duration::from_secs(30));
    assert!(
        log.contains("would be written (--noop)"),
        "{}",
        tail(&log, 10)
    );
    reg.put_endpoint("node-a", "web", 2, 8002);
    c.wait_log("+server web 127.0.0.1:8002", Duration::from_secs(30));
    assert_eq!(identity(&dest).unwrap(), id);
    assert_eq!(read(&dest), "# services\n# end\n");
    assert_eq!(count_lines(&reloads), 0);
    let leftovers = std::fs::read_dir(dest.parent().unwrap()).unwrap().count();
    assert_eq!(leftovers, 1, "--noop left files beside the destination");
    c.assert_running();
}

/// SIGKILLs every process whose command line contains `needle`.
fn kill_processes_mentioning(needle: &str) {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            // The shell leads its own process group (as confgen starts commands): end the
            // whole group, its `sleep` too.
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The pid of the etcd process serving `endpoint` (found by its command line).
fn etcd_pid(endpoint: &str) -> i32 {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let listens = args
            .windows(2)
            .any(|w| w[0] == b"--listen-client-urls" && w[1] == endpoint.as_bytes());
        if args.first().is_some_and(|a| a.ends_with(b"etcd")) && listens {
            return pid;
        }
    }
    panic!("no etcd process listening on {endpoint}");
}

#[test]
fn a_hung_etcd_is_noticed_healthz_says_stale_and_nothing_is_written_until_it_answers() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    reg.put_endpoint("node-a", "web", 1, 8001);
    let confdir = Confdir::new();
    confdir.template("list.tmpl", LIST);
    let (dest, _) = resource(&confdir, "list", "list.tmpl", "");
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("healthy", Duration::from_secs(30), || {
        c.assert_running();
        c.healthz().ok().filter(|(code, _)| *code == 200)
    });
    assert_eq!(
        servers(&read(&dest)),
        1,
        "/healthz was 200 before the file was written: {:?}\n{}",
        read(&dest),
        tail(&c.log(), 30)
    );

    // etcd stops answering (SIGSTOP: connections stay open, nothing comes back).
    let pid = nix::unistd::Pid::from_raw(etcd_pid(&etcd.endpoint()));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    struct Resume(nix::unistd::Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let resume = Resume(pid);
    let hung = Instant::now();
    let body = wait_for("/healthz to say stale", Duration::from_secs(30), || {
        c.healthz()
            .ok()
            .filter(|(code, _)| *code == 503)
            .map(|(_, b)| b)
    });
    eprintln!(
        "etcd hung (SIGSTOP) → /healthz stale after {} ms: {}",
        hung.elapsed().as_millis(),
        body.trim()
    );
    assert!(body.contains("registry: stale"), "{body}");
    let id = identity(&dest).unwrap();
    confdir.template("list.tmpl", &format!("# edited\n{LIST}"));
    c.wait_log("template or resource file changed", Duration::from_secs(10));
    wait_until_the_edit_waits_for_a_view(&c);
    assert_eq!(identity(&dest).unwrap(), id, "written while etcd hung");

    // It answers again: current, and the edit is applied.
    drop(resume);
    wait_for("the edit applied", Duration::from_secs(30), || {
        read(&dest).starts_with("# edited\n").then_some(())
    });
    wait_for("healthy again", Duration::from_secs(30), || {
        c.healthz().ok().filter(|(code, _)| *code == 200)
    });
    c.assert_running();
}

/// Regression: the drop guard compared with the endpoints of the last render *of this run*, so
/// a confgen restarted while 80 % of the endpoints had vanished wrote the drop at once.
#[test]
fn the_drop_guard_also_holds_a_drop_that_happened_while_confgen_was_not_running() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.template("list.tmpl", LIST);
    let grace = Duration::from_secs(2);
    let (dest, _) = resource(
        &confdir,
        "list",
        "list.tmpl",
        "wait = \"20ms:200ms\"\nmax_drop = \"50%\"\ndrop_grace = \"2s\"\n",
    );
    let keys: Vec<String> = (0..10)
        .map(|i| reg.put_endpoint("node-a", "web", i, 9000 + i as u16))
        .collect();
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("10 endpoints in the file", Duration::from_secs(30), || {
        c.assert_running();
        (servers(&read(&dest)) == 10).then_some(())
    });
    c.signal(nix::sys::signal::Signal::SIGTERM);
    wait_for("confgen to exit", Duration::from_secs(10), || {
        c.proc.0.as_mut().unwrap().try_wait().unwrap()
    });
    let ten = read(&dest);

    reg.delete_at_once(&keys[..8]);
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    let started = Instant::now();
    c.wait_log("drop guard: holding", Duration::from_secs(10));
    while started.elapsed() < grace - Duration::from_millis(300) {
        assert_eq!(read(&dest), ten, "the drop was applied before the grace");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for("the drop applied after the grace", grace * 10, || {
        (servers(&read(&dest)) == 2).then_some(())
    });
    c.assert_running();

    // --onetime cannot wait out a grace: it leaves the file as it is and says so (exit 4), and
    // --allow-drop (a bootstrap after an intended scale-down) applies it.
    drop(c);
    reg.delete_at_once(&keys[8..10]);
    let two = read(&dest);
    let o = onetime(&confdir, &etcd, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("drop guard: not applied"), "{stderr}");
    assert!(stderr.contains("list"), "names the resource: {stderr}");
    assert_eq!(read(&dest), two, "--onetime applied a held drop");
    let o = onetime(&confdir, &etcd, &["--allow-drop"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(servers(&read(&dest)), 0);
}

/// The daemon has seen the template edit and, at the flush that would have applied it, left it
/// waiting for a current registry view (what `/healthz` says after that flush): from here on,
/// an unchanged destination means "not written", not "not written yet".
fn wait_until_the_edit_waits_for_a_view(c: &Confgen) {
    wait_for(
        "/healthz to say the edit waits",
        Duration::from_secs(10),
        || {
            c.healthz().ok().filter(|(_, b)| {
                b.contains("resource list: ")
                    && b.contains("a change waits for a current registry view")
            })
        },
    );
}

fn onetime(confdir: &Confdir, etcd: &Etcd, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "--confdir",
        confdir.path().to_str().unwrap(),
        "--onetime",
        "--etcd-endpoints",
    ];
    let endpoint = etcd.endpoint();
    args.push(&endpoint);
    args.extend_from_slice(extra);
    common::confgen(&args)
}

/// A destination written by another tool (confd, an older confgen) has no record of its
/// endpoints: the guard compares sizes then. A render under half the file is held (by the daemon
/// for the grace, by --onetime with exit 4); one that is not is applied at once and recorded.
#[test]
fn without_a_record_of_the_endpoints_the_drop_guard_compares_with_the_size_of_the_file() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.template("list.tmpl", LIST);
    let (dest, _) = resource(
        &confdir,
        "list",
        "list.tmpl",
        "wait = \"20ms:200ms\"\nmax_drop = \"50%\"\ndrop_grace = \"2s\"\n",
    );
    let record = dest.with_file_name(".list.endpoints");
    reg.put_endpoint("node-a", "web", 0, 9000);
    // What confd left: the same shape, ten servers.
    let foreign: String = std::iter::once("# services\n".to_string())
        .chain((0..10).map(|i| format!("server web 10.0.0.{i}:9000\n")))
        .chain(std::iter::once("# end\n".to_string()))
        .collect();
    std::fs::write(&dest, &foreign).unwrap();
    assert!(!record.exists());

    let o = onetime(&confdir, &etcd, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("unit=bytes"), "{stderr}");
    assert_eq!(read(&dest), foreign, "--onetime replaced the file");

    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    c.wait_log("drop guard: holding", Duration::from_secs(30));
    let (_, body) = wait_for("/healthz to show the hold", Duration::from_secs(10), || {
        c.healthz()
            .ok()
            .filter(|(_, b)| b.contains("held by the drop guard"))
    });
    assert!(body.contains("bytes"), "{body}");
    assert_eq!(read(&dest), foreign, "applied before the grace");
    wait_for(
        "the render applied after the grace",
        Duration::from_secs(30),
        || {
            c.assert_running();
            (servers(&read(&dest)) == 1).then_some(())
        },
    );
    wait_for("the count recorded", Duration::from_secs(10), || {
        (std::fs::read_to_string(&record).ok()?.trim() == "1").then_some(())
    });
    drop(c);

    // A small foreign file (a package's default config) is replaced at once: no hold.
    std::fs::remove_file(&record).unwrap();
    std::fs::write(&dest, "# default\n").unwrap();
    let o = onetime(&confdir, &etcd, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(servers(&read(&dest)), 1);
    assert_eq!(std::fs::read_to_string(&record).unwrap().trim(), "1");
}

#[test]
fn under_steady_churn_a_batch_is_flushed_by_wait_max_at_the_latest() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.template("list.tmpl", LIST);
    // Changes never pause for 100 ms, so only `max` (400 ms) ends a batch.
    let (dest, reloads) = resource(
        &confdir,
        "list",
        "list.tmpl",
        "wait = \"100ms:400ms\"\nmax_drop = \"100%\"\n",
    );
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("the first write", Duration::from_secs(30), || {
        c.assert_running();
        (count_lines(&reloads) == 1).then_some(())
    });
    let writes_before = c.metric("confgen_writes_total", &[]);
    let churn = Duration::from_secs(3);
    let started = Instant::now();
    let mut i = 0u32;
    let mut seen_during = 0;
    let mut last_servers = servers(&read(&dest));
    while started.elapsed() < churn {
        reg.put_endpoint("node-a", "web", i % 40, 10000 + (i % 1000) as u16);
        i += 1;
        let now = servers(&read(&dest));
        if now != last_servers {
            seen_during += 1;
            last_servers = now;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let writes = c.metric("confgen_writes_total", &[]) - writes_before;
    eprintln!(
        "steady churn: {i} puts in {:?}, {writes} writes during it (wait 100ms:400ms)",
        started.elapsed()
    );
    assert!(
        seen_during >= 1,
        "nothing was written while the churn lasted"
    );
    // 3 s / 400 ms ≈ 7 batches; allow for a slow machine, but not one write per put.
    assert!(
        (3.0..=15.0).contains(&writes),
        "{writes} writes for {i} puts in 3 s"
    );
    c.assert_running();
}

/// `owner`, `uid`/`gid` and `mode` with users other than root: the destination (and every
/// rewrite of it) belongs to them; a user that does not exist is a start-up error naming it.
#[test]
fn owner_uid_gid_and_mode_apply_to_every_write_for_users_other_than_root() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.template("list.tmpl", LIST);
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("Debian has the user nobody");
    let (by_name, _) = resource(
        &confdir,
        "by-name",
        "list.tmpl",
        "owner = \"nobody\"\nmode = \"0640\"\nmax_drop = \"100%\"\n",
    );
    // Numeric ids that name no user: written as given, as chown(2) takes them.
    let (by_id, _) = resource(
        &confdir,
        "by-id",
        "list.tmpl",
        "uid = 4242\ngid = 4343\nmode = \"0600\"\nmax_drop = \"100%\"\n",
    );
    let owned = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.permissions().mode() & 0o7777)
    };
    for n in 0..2u32 {
        reg.put_endpoint("node-a", "web", n, 9100 + n as u16);
        let o = onetime(&confdir, &etcd, &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(servers(&read(&by_name)), n as usize + 1);
        assert_eq!(
            owned(&by_name),
            (nobody.uid.as_raw(), nobody.gid.as_raw(), 0o640),
            "write {n} of by-name"
        );
        assert_eq!(owned(&by_id), (4242, 4343, 0o600), "write {n} of by-id");
    }
    // The previous content kept beside it is no more readable than the file itself.
    let bak = |p: &std::path::Path| {
        p.with_file_name(format!("{}.bak", p.file_name().unwrap().to_str().unwrap()))
    };
    assert_eq!(
        owned(&bak(&by_name)),
        (nobody.uid.as_raw(), nobody.gid.as_raw(), 0o640)
    );
    assert_eq!(owned(&bak(&by_id)), (4242, 4343, 0o600));

    // A user that does not exist: exit 2 naming the file and the user; nothing written.
    let (missing, _) = resource(
        &confdir,
        "missing",
        "list.tmpl",
        "owner = \"no-such-user-flotilla\"\n",
    );
    let o = onetime(&confdir, &etcd, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("missing.toml") && stderr.contains("no-such-user-flotilla"),
        "{stderr}"
    );
    assert!(!missing.exists());
}

/// One shutdown scheme (registry::shutdown): the first SIGTERM lets a running reload command
/// finish under its timeout (the drain), a second ends confgen at once with 130, saying so.
#[test]
fn a_second_sigterm_during_a_slow_reload_exits_130_at_once() {
    use std::os::unix::process::ExitStatusExt;
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    let confdir = Confdir::new();
    confdir.template(
        "a.tmpl",
        "a={{ getv(key=\"/config/a/x\", default=\"-\") }}\n",
    );
    let started = confdir.path().join("reload.started");
    confdir.resource(
        "a",
        &format!(
            "[template]\nsrc = \"a.tmpl\"\ndest = \"{}\"\nprefix = \"/flotilla\"\n\
             keys = [\"/config/\"]\nreload_cmd = \"touch {} && sleep 60\"\nreload_timeout = \"120s\"\n",
            confdir.out("a").display(),
            started.display()
        ),
    );
    reg.put("/flotilla/config/a/x", "1");
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    wait_for("the reload to be running", Duration::from_secs(30), || {
        c.assert_running();
        started.exists().then_some(())
    });
    c.signal(nix::sys::signal::Signal::SIGTERM);
    c.wait_log("termination signal received", Duration::from_secs(10));
    // The first signal drains: the reload (60 s) is still running, confgen with it (had it
    // exited at the first signal, wait_exit below would see 0 or the signal, not 130).
    c.assert_running();
    let t0 = Instant::now();
    c.signal(nix::sys::signal::Signal::SIGTERM);
    let status = c.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(130),
        "{status:?} (signal {:?})",
        status.signal()
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        c.log().contains("second signal (SIGTERM); exiting now"),
        "{}",
        tail(&c.log(), 20)
    );
}
