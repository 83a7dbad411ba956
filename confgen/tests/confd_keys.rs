//! confd resource files copied unchanged: keys outside `--prefix` (confd's absolute keys, no
//! `prefix`) are watched as given, by `confgen run` against a real etcd, including keys a
//! resource added at SIGHUP starts to need.

mod common;

use std::time::Duration;

use common::{read, tail, Confdir, Confgen, Registry};
use flotilla_harness::etcd::Etcd;
use flotilla_harness::wait_for;

/// confd's quick-start template (docs/quick-start-guide.md), as `confgen convert` writes it.
const MYCONFIG: &str = "[myconfig]\n\
database_url = {{ getv(key=\"/myapp/database/url\") }}\n\
database_user = {{ getv(key=\"/myapp/database/user\") }}\n";

fn failures(c: &Confgen) -> f64 {
    let text = c.metrics();
    text.lines()
        .filter(|l| l.starts_with("confgen_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn confd_quick_start_resource_with_keys_outside_the_prefix_works_unchanged() {
    let etcd = Etcd::start();
    let reg = Registry::connect(&etcd);
    reg.put("/myapp/database/url", "db.example.com");
    reg.put("/myapp/database/user", "rob");
    reg.put("/team-b/upstreams/a", "10.0.0.1:80");
    let confdir = Confdir::new();
    confdir.template("myconfig.conf.tmpl", MYCONFIG);
    let dest = confdir.out("myconfig.conf");
    // confd's quick-start resource (keys absolute, no prefix), with its own check_cmd form.
    confdir.resource(
        "myconfig",
        &format!(
            r#"[template]
src = "myconfig.conf.tmpl"
dest = "{}"
keys = [
    "/myapp/database/url",
    "/myapp/database/user",
]
check_cmd = "grep -q database_url {{{{.src}}}}"
"#,
            dest.display()
        ),
    );
    // The default --prefix (/flotilla): nothing to add to the command line.
    let mut c = Confgen::start(&confdir, &etcd.endpoint(), &[]);
    let want = "[myconfig]\ndatabase_url = db.example.com\ndatabase_user = rob\n";
    wait_for("the first write", Duration::from_secs(30), || {
        c.assert_running();
        (read(&dest) == want).then_some(())
    });
    assert!(
        c.log()
            .contains("/flotilla/,/myapp/database/url,/myapp/database/user"),
        "the log names the watched prefixes:\n{}",
        tail(&c.log(), 20)
    );

    // A change outside the prefix reaches the file; one outside the resource's keys does not
    // cause a render.
    reg.put("/myapp/database/url", "db2.example.com");
    wait_for("the change", Duration::from_secs(30), || {
        (read(&dest) == want.replace("db.example", "db2.example")).then_some(())
    });
    let renders = c.metric("confgen_renders_total", &[]);
    reg.put("/myapp/unrelated", "x");
    reg.put("/flotilla/config/barrier", "x");
    let revision = reg.revision();
    wait_for("confgen at that revision", Duration::from_secs(10), || {
        (c.metric("confgen_registry_revision", &[]) as i64 >= revision).then_some(())
    });
    assert_eq!(c.metric("confgen_renders_total", &[]), renders);

    // A resource added at SIGHUP with keys under yet another root: the registry is relisted
    // with them before anything is written, so its first render sees its keys (a getv of a
    // missing key would fail the render).
    confdir.template(
        "upstreams.tmpl",
        "first={{ getv(key=\"/team-b/upstreams/a\") }}\n\
         {% for kv in gets(key=\"/team-b/upstreams/*\") %}{{ kv.key }}={{ kv.value }}\n{% endfor %}",
    );
    let upstreams = confdir.out("upstreams");
    confdir.resource(
        "upstreams",
        &format!(
            "[template]\nsrc = \"upstreams.tmpl\"\ndest = \"{}\"\nkeys = [\"/team-b/upstreams\"]\n",
            upstreams.display()
        ),
    );
    let failed_before = failures(&c);
    c.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while read(&upstreams) != "first=10.0.0.1:80\n/team-b/upstreams/a=10.0.0.1:80\n" {
        c.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "the new resource was not written within 30 s ({:?}):\n{}",
            read(&upstreams),
            tail(&c.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    reg.put("/team-b/upstreams/b", "10.0.0.2:80");
    wait_for("its change", Duration::from_secs(30), || {
        (read(&upstreams)
            == "first=10.0.0.1:80\n/team-b/upstreams/a=10.0.0.1:80\n/team-b/upstreams/b=10.0.0.2:80\n")
            .then_some(())
    });
    assert_eq!(
        failures(&c),
        failed_before,
        "a render failed around the relist:\n{}",
        tail(&c.log(), 30)
    );
    assert!(
        c.log().contains("relisting the registry before writing"),
        "{}",
        tail(&c.log(), 30)
    );
    // The first resource kept working across the relist.
    reg.put("/myapp/database/user", "alice");
    wait_for(
        "the first resource still follows",
        Duration::from_secs(30),
        || {
            (read(&dest) == "[myconfig]\ndatabase_url = db2.example.com\ndatabase_user = alice\n")
                .then_some(())
        },
    );
    let (code, body) = c.healthz().expect("healthz");
    assert_eq!(code, 200, "{body}");
}
