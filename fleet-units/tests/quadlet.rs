//! `--format quadlet`: the `.container` files, checked two ways.
//!
//! Always: their structure — only the sections and `[Container]` keys Podman 4.6+ knows
//! (Quadlet refuses a file with an unknown key), one file per placed instance where
//! `--format systemd` places it, pinned images, and every value read back with systemd's
//! splitting rules, which Quadlet uses for `Environment=`, `Label=`, `Exec=` and `PodmanArgs=`.
//!
//! With Podman's generator: `quadlet -dryrun` must convert every file without an error or a
//! warning other than the short-name one, and the `podman run` line it generates must carry the
//! awkward values exactly. The generator is looked for in `$FLOTILLA_QUADLET`,
//! `/usr/libexec/podman/quadlet` and `/usr/lib/systemd/system-generators/podman-system-generator`.
//! scripts/setup does not install Podman (Debian 12's podman 4.3 predates Quadlet), so without
//! one these tests say so on stderr and pass on the structural checks alone; with
//! `FLOTILLA_REQUIRE_QUADLET=1` a missing generator fails them instead.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `[Container]` keys a Podman 4.6 Quadlet knows that unitgen may write.
const CONTAINER_KEYS: &[&str] = &[
    "Image",
    "ContainerName",
    "Pull",
    "Label",
    "Environment",
    "PublishPort",
    "Volume",
    "HealthCmd",
    "HealthInterval",
    "HealthTimeout",
    "HealthStartPeriod",
    "HealthRetries",
    "PodmanArgs",
    "Exec",
];

fn hosts() -> String {
    golden_dir("example")
        .join("hosts.yaml")
        .display()
        .to_string()
}

fn generate(services: &Path, format: &str, out: &Path) {
    unitgen_ok(
        &[
            &services.display().to_string(),
            "--format",
            format,
            "--hosts",
            &hosts(),
            "-o",
            &out.display().to_string(),
        ],
        services.parent().unwrap(),
    );
}

/// Podman's generator, if there is one here.
fn quadlet() -> Option<PathBuf> {
    let candidates = std::env::var_os("FLOTILLA_QUADLET")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from("/usr/libexec/podman/quadlet"),
            PathBuf::from("/usr/lib/systemd/system-generators/podman-system-generator"),
        ]);
    for c in candidates {
        if c.is_file() {
            return Some(c);
        }
    }
    let msg = "Podman's Quadlet generator is not installed (looked for $FLOTILLA_QUADLET, \
               /usr/libexec/podman/quadlet, /usr/lib/systemd/system-generators/podman-system-generator): \
               `quadlet -dryrun` NOT run, only the structural checks (install podman >= 4.6 to run it)";
    if std::env::var("FLOTILLA_REQUIRE_QUADLET").as_deref() == Ok("1") {
        panic!("{msg}; FLOTILLA_REQUIRE_QUADLET=1 requires it");
    }
    // Straight to fd 2, past the test harness's capture: a skipped check must be seen.
    let _ = writeln!(std::io::stderr().lock(), "NOTE: {msg}");
    None
}

/// Runs `quadlet -dryrun` on the `.container` files of `dir`: the generated services by name.
fn dryrun(quadlet: &Path, dir: &Path) -> BTreeMap<String, String> {
    let out = output(
        Command::new(quadlet)
            .args(["-dryrun", "-no-kmsg-log"])
            .env("QUADLET_UNIT_DIRS", dir),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} -dryrun on {} failed ({}):\n{stderr}",
        quadlet.display(),
        dir.display(),
        out.status
    );
    // Debug lines name each file loaded; anything else is a warning or an error.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("Loading source unit file"))
        .filter(|l| !l.contains("not a fully qualified image name"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        complaints.is_empty(),
        "quadlet complained about {}:\n{}",
        dir.display(),
        complaints.join("\n")
    );
    let mut services = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("---").and_then(|l| l.strip_suffix("---")) {
            if let Some((n, t)) = current.take() {
                services.insert(n, t);
            }
            let name = name.rsplit('/').next().unwrap_or(name).to_string();
            current = Some((name, String::new()));
        } else if let Some((_, t)) = current.as_mut() {
            t.push_str(line);
            t.push('\n');
        }
    }
    if let Some((n, t)) = current {
        services.insert(n, t);
    }
    services
}

/// The `podman run` words of a generated service, the way systemd reads its `ExecStart=`
/// (`%%` and the specifiers Quadlet writes resolved, `$$` a literal `$`).
fn podman_run_argv(service: &str) -> Vec<String> {
    let (_, value) = section_settings(service, "Service")
        .into_iter()
        .rfind(|(k, _)| k == "ExecStart")
        .expect("ExecStart=");
    let mut expanded = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            expanded.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => expanded.push('%'),
            Some('t') => expanded.push_str("/run"),
            Some('N') => expanded.push_str("UNIT"),
            other => panic!("unexpected specifier %{other:?} in {value:?}"),
        }
    }
    split_command(&expanded)
}

#[test]
fn quadlet_units_have_the_structure_podman_reads_and_the_systemd_placement() {
    let tmp = tempfile::tempdir().unwrap();
    let services = example_for_podman(tmp.path());
    let (q, s) = (tmp.path().join("q"), tmp.path().join("s"));
    generate(&services, "quadlet", &q);
    generate(&services, "systemd", &s);
    let qtree = read_tree(&q);
    let stree = read_tree(&s);
    // The same placement (and so the same lock) as --format systemd.
    assert_eq!(qtree["placement.lock"], stree["placement.lock"]);
    let instances = |tree: &BTreeMap<String, String>, ext: &str| -> Vec<String> {
        tree.keys()
            .filter_map(|k| k.strip_suffix(ext).map(str::to_string))
            .filter(|k| k.contains('@'))
            .collect()
    };
    assert_eq!(
        instances(&qtree, ".container"),
        instances(&stree, ".service")
    );
    assert_eq!(instances(&qtree, ".container").len(), 15);
    // Platform units stay plain services, one per host that runs them.
    for (path, text) in qtree.iter().filter(|(k, _)| k.ends_with(".service")) {
        assert!(path.ends_with("/presence.service") || path.ends_with("/confgen.service"));
        if path.ends_with("/presence.service") {
            assert!(
                text.contains("After=network-online.target podman.socket\n"),
                "{text}"
            );
            assert!(
                text.contains("--docker-host unix:///run/podman/podman.sock"),
                "{text}"
            );
            assert!(!text.contains("docker.service"), "{text}");
        }
    }
    let spec: serde_norway::Value =
        serde_norway::from_str(&fs::read_to_string(&services).unwrap()).unwrap();
    for (path, text) in qtree.iter().filter(|(k, _)| k.ends_with(".container")) {
        let file = path.rsplit('/').next().unwrap();
        let (svc, n) = file
            .strip_suffix(".container")
            .and_then(|b| b.split_once('@'))
            .expect("svc@N.container");
        assert!(text.starts_with("# Generated by unitgen"), "{path}");
        let sections: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
        assert_eq!(
            sections,
            ["[Unit]", "[Container]", "[Service]", "[Install]"],
            "{path}"
        );
        let container = section_settings(text, "Container");
        for (k, _) in &container {
            assert!(
                CONTAINER_KEYS.contains(&k.as_str()),
                "{path}: unknown key {k}"
            );
        }
        let get = |k: &str| -> Vec<String> {
            container
                .iter()
                .filter(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .collect()
        };
        assert_eq!(get("ContainerName"), [format!("{svc}-{n}")], "{path}");
        // Pinned: the image exactly as services.yaml writes it, never a moving tag.
        let image = &get("Image")[0];
        let want = spec["services"][svc]["image"].as_str().unwrap().to_string();
        let want = match spec["services"][svc]["tag"].as_str() {
            Some(t) => format!("{want}:{t}"),
            None => want,
        };
        assert_eq!(image, &want, "{path}");
        assert!(!image.ends_with(":latest"));
        assert_eq!(get("Pull"), ["always"], "{path}");
        // Values Quadlet splits systemd's way read back as single KEY=VALUE words.
        for key in ["Label", "Environment"] {
            for v in get(key) {
                let words = split_command(&expand_specifiers(&v, None));
                assert_eq!(words.len(), 1, "{path}: {key}={v}");
                assert!(words[0].contains('='), "{path}: {key}={v}");
            }
        }
        let service = section_settings(text, "Service");
        assert!(
            service.contains(&("Restart".into(), "always".into())),
            "{path}"
        );
        assert_eq!(
            section_settings(text, "Install"),
            [("WantedBy".to_string(), "multi-user.target".to_string())]
        );
        // The registration labels presence reads.
        let labels = get("Label");
        if spec["services"][svc]["flotilla"]["ignore"].as_bool() == Some(true) {
            assert!(
                labels.contains(&"flotilla.ignore=true".to_string()),
                "{path}"
            );
        } else {
            assert!(
                labels.iter().any(|l| l.starts_with("flotilla.service=")),
                "{path}"
            );
        }
    }
    // web: everything the example gives it.
    let web = qtree
        .iter()
        .find(|(k, _)| k.ends_with("/web@1.container"))
        .map(|(_, v)| v.clone())
        .unwrap();
    let env: Vec<String> = section_settings(&web, "Container")
        .into_iter()
        .filter(|(k, _)| k == "Environment")
        .map(|(_, v)| split_command(&expand_specifiers(&v, None)).remove(0))
        .collect();
    assert!(
        env.contains(&"GREETING=Hello, 100% of you; cost: $5".to_string()),
        "{env:?}"
    );
    let exec = section_settings(&web, "Container")
        .into_iter()
        .find(|(k, _)| k == "Exec")
        .unwrap()
        .1;
    assert_eq!(
        split_command(&exec),
        ["httpd", "-f", "-p", "8080", "-h", "/srv/www"]
    );
    assert!(
        web.contains("\nHealthCmd=wget -q -O /dev/null http://127.0.0.1:8080/health || exit 1\n")
    );
    assert!(web.contains(
        "\nPodmanArgs=--memory 512m\nPodmanArgs=--cpus 0.5\nPodmanArgs=--stop-timeout 10\n"
    ));
    // The sidekick is bound to its main instance, the dependent requires its dependency.
    let sidekick = qtree
        .iter()
        .find(|(k, _)| k.ends_with("/web-sidecar@3.container"))
        .unwrap()
        .1;
    assert!(
        sidekick.contains("\nAfter=web@3.service\nBindsTo=web@3.service\n"),
        "{sidekick}"
    );
    assert!(!sidekick.contains("Requires="));
    let api = qtree
        .iter()
        .find(|(k, _)| k.ends_with("/api@2.container"))
        .unwrap()
        .1;
    assert!(
        api.contains("\nAfter=cache@2.service\nRequires=cache@2.service\n"),
        "{api}"
    );
}

#[test]
fn podman_quadlet_dryrun_converts_every_generated_file() {
    let Some(quadlet) = quadlet() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let services = example_for_podman(tmp.path());
    let out = tmp.path().join("out");
    generate(&services, "quadlet", &out);
    let mut converted = 0;
    for host in fs::read_dir(&out).unwrap() {
        let dir = host.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let generated = dryrun(&quadlet, &dir);
        for f in fs::read_dir(&dir).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(base) = name.strip_suffix(".container") {
                let svc = generated
                    .get(&format!("{base}.service"))
                    .unwrap_or_else(|| {
                        panic!("quadlet made no {base}.service from {}", dir.display())
                    });
                let argv = podman_run_argv(svc);
                let (s, n) = base.split_once('@').unwrap();
                assert!(
                    argv.contains(&format!("--name={s}-{n}"))
                        || argv
                            .windows(2)
                            .any(|w| w == [String::from("--name"), format!("{s}-{n}")]),
                    "{argv:?}"
                );
                converted += 1;
            }
        }
    }
    assert_eq!(converted, 15);
}

#[test]
fn awkward_values_survive_quadlet_into_the_podman_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let nasty = [
        "plain",
        "two words",
        "100%",
        "%i %n %%",
        "$HOME ${PATH} $$",
        "back\\slash\\",
        "\"double\" and 'single'",
        "a ; b",
        "grüße, 世界",
        "#not-a-comment",
        "-dash",
        "\\x20",
        "'",
        "\"",
    ];
    let yaml = |s: &str| serde_norway::to_string(s).unwrap().trim_end().to_string();
    let args: String = nasty
        .iter()
        .map(|s| format!("      - {}\n", yaml(s)))
        .collect();
    let health = [
        "wget -q -O- \"http://127.0.0.1/x?a=1&b=100%\" || exit 1",
        " curl -f \"http://127.0.0.1/\" ",
    ];
    let mut services = String::from("services:\n");
    for (i, h) in health.iter().enumerate() {
        services.push_str(&format!(
            "  odd{i}:\n    image: registry.example.com/odd:1.0.0\n    env:\n      NASTY: {}\n      EMPTY: \"\"\n    labels:\n      com.example.odd: {}\n    volumes: [{}]\n    health:\n      cmd: {}\n    command:\n{args}",
            yaml(&nasty.join("|")),
            yaml("a b \"c\" %d $e"),
            yaml("/srv/with space/100%:/data"),
            yaml(h),
        ));
    }
    fs::write(tmp.path().join("services.yaml"), services).unwrap();
    fs::write(
        tmp.path().join("hosts.yaml"),
        "hosts:\n  h1: {address: 10.0.0.1}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    unitgen_ok(
        &[
            "services.yaml",
            "--format",
            "quadlet",
            "--hosts",
            "hosts.yaml",
            "-o",
            "out",
        ],
        tmp.path(),
    );
    // Structure: the values read back with systemd's rules.
    for (i, h) in health.iter().enumerate() {
        let unit = fs::read_to_string(out.join(format!("h1/odd{i}@1.container"))).unwrap();
        let c = section_settings(&unit, "Container");
        let exec = &c.iter().find(|(k, _)| k == "Exec").unwrap().1;
        assert_eq!(
            split_command(&expand_specifiers(exec, None)),
            nasty.map(String::from)
        );
        if i == 0 {
            let hc = &c.iter().find(|(k, _)| k == "HealthCmd").unwrap().1;
            assert_eq!(&expand_specifiers(hc, None).replace("$$", "$"), h);
        } else {
            // Not portable as HealthCmd=: given as a PodmanArgs= word instead.
            assert!(!c.iter().any(|(k, _)| k == "HealthCmd"));
            let pa = c
                .iter()
                .map(|(k, v)| (k, split_command(&expand_specifiers(v, None))))
                .find(|(k, v)| *k == "PodmanArgs" && v[0] == "--health-cmd")
                .unwrap()
                .1;
            assert_eq!(pa, ["--health-cmd".to_string(), h.to_string()]);
        }
    }
    let Some(quadlet) = quadlet() else {
        return;
    };
    let generated = dryrun(&quadlet, &out.join("h1"));
    for (i, h) in health.iter().enumerate() {
        let argv = podman_run_argv(&generated[&format!("odd{i}@1.service")]);
        let image_at = argv
            .iter()
            .position(|a| a == "registry.example.com/odd:1.0.0")
            .unwrap();
        assert_eq!(
            &argv[image_at + 1..],
            &nasty.map(String::from)[..],
            "{argv:?}"
        );
        let pair = |flag: &str, value: &str| argv.windows(2).any(|w| w[0] == flag && w[1] == value);
        assert!(
            pair("--env", &format!("NASTY={}", nasty.join("|"))),
            "{argv:?}"
        );
        assert!(pair("--env", "EMPTY="), "{argv:?}");
        assert!(
            pair("--label", "com.example.odd=a b \"c\" %d $e"),
            "{argv:?}"
        );
        assert!(
            pair(
                "--label",
                "flotilla.service=odd"
                    .to_string()
                    .as_str()
                    .replace("odd", &format!("odd{i}"))
                    .as_str()
            ),
            "{argv:?}"
        );
        assert!(pair("-v", "/srv/with space/100%:/data"), "{argv:?}");
        assert!(pair("--health-cmd", h), "{argv:?}");
        assert!(pair("--pull", "always"), "{argv:?}");
        assert!(pair("--stop-timeout", "10"), "{argv:?}");
    }
}

fn unitgen_err(args: &[&str], cwd: &Path) -> String {
    let out = output(unitgen().args(args).current_dir(cwd));
    assert!(!out.status.success(), "unitgen {args:?} succeeded");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn what_quadlet_cannot_carry_is_refused_naming_service_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(
        tmp.path().join("hosts.yaml"),
        "hosts:\n  h1: {address: 10.0.0.1}\n",
    )
    .unwrap();
    fs::write(
        tmp.path().join("services.yaml"),
        r#"services:
  a:
    image: registry.example.com/a:v1.image
    command: [run, "", ";"]
    volumes: ["data.volume:/data", "/srv/x:/y\\"]
  b:
    image: registry.example.com/b:1.0.0
    health:
      cmd: '["curl", "-f", "http://x/"]'
  c:
    image: registry.example.com/c:1.0.0
    health:
      cmd: CMD-SHELL curl -f http://x/
"#,
    )
    .unwrap();
    let args = [
        "services.yaml",
        "--format",
        "quadlet",
        "--hosts",
        "hosts.yaml",
    ];
    let err = unitgen_err(&args, tmp.path());
    let want = [
        "error: services.yaml:3:12: services.a.image: a: image `registry.example.com/a:v1.image` ends in `.image`, which Quadlet reads as a reference to a `.image` unit (unitgen writes none); use another tag or a digest with --format quadlet",
        "error: services.yaml:4:20: services.a.command[1]: a: command argument 2 is empty; Quadlet drops empty arguments from the command line",
        "error: services.yaml:4:24: services.a.command[2]: a: command argument 3 is a lone `;`, which Quadlet writes unquoted into ExecStart=, where systemd reads it as a command separator",
        "error: services.yaml:5:15: services.a.volumes[0]: a: volume name `data.volume` ends in `.volume` or `.artifact`, which Quadlet reads as a reference to a Quadlet unit of that name (unitgen writes none); rename the volume",
        "error: services.yaml:5:36: services.a.volumes[1]: a: volume target `/y\\` ends in whitespace or `\\`, which a Quadlet `Volume=` line cannot carry (the line is trimmed, and a trailing `\\` continues it)",
        "error: services.yaml:9:12: services.b.health.cmd: b: health.cmd `[\"curl\", \"-f\", \"http://x/\"]` is a JSON array, which Podman runs as an exec-form command (Docker runs the text with /bin/sh -c); write it so that its first word is the program",
        "error: services.yaml:13:12: services.c.health.cmd: c: health.cmd `CMD-SHELL curl -f http://x/` starts with the word CMD, CMD-SHELL or NONE, which Podman reads as a keyword of the health check (Docker runs the text with /bin/sh -c); write it so that its first word is the program",
        "unitgen: 7 errors; nothing written",
    ];
    assert_eq!(err.lines().collect::<Vec<_>>(), want, "{err}");
    // The same file is fine for the Docker formats.
    unitgen_ok(
        &[
            "services.yaml",
            "--format",
            "systemd",
            "--hosts",
            "hosts.yaml",
            "--check",
        ],
        tmp.path(),
    );
}

#[test]
fn quadlet_keeps_the_image_rules_usage_rules_and_the_presence_socket_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::write(d.join("hosts.yaml"), "hosts:\n  h1: {address: 10.0.0.1}\n").unwrap();
    fs::write(
        d.join("latest.yaml"),
        "services:\n  web:\n    image: registry.example.com/web:latest\n",
    )
    .unwrap();
    let err = unitgen_err(
        &[
            "latest.yaml",
            "--format",
            "quadlet",
            "--hosts",
            "hosts.yaml",
        ],
        d,
    );
    assert!(err.starts_with("error: latest.yaml:3:12: services.web.image: tag `latest` of image `registry.example.com/web:latest` moves"), "{err}");
    fs::write(
        d.join("ok.yaml"),
        "services:\n  web:\n    image: registry.example.com/web:1.0.0\n",
    )
    .unwrap();
    let err = unitgen_err(&["ok.yaml", "--format", "quadlet"], d);
    assert_eq!(
        err,
        "error: --format quadlet needs --hosts hosts.yaml to know where units may run\n"
    );
    let err = unitgen_err(
        &[
            "ok.yaml",
            "--format",
            "quadlet",
            "--hosts",
            "hosts.yaml",
            "--docker",
            "/usr/bin/docker",
        ],
        d,
    );
    assert_eq!(err, "error: --docker names the docker CLI in the units; --format quadlet units run Podman, which Quadlet finds itself\n");
    fs::write(
        d.join("platform.yaml"),
        "services:\n  web:\n    image: registry.example.com/web:1.0.0\nplatform:\n  presence:\n    ttl: 15s\n",
    )
    .unwrap();
    let err = unitgen_err(
        &[
            "platform.yaml",
            "--format",
            "quadlet",
            "--hosts",
            "hosts.yaml",
        ],
        d,
    );
    assert_eq!(
        err,
        "error: platform.yaml:6:5: platform.presence.docker_host: --format quadlet runs the containers under Podman, so presence must watch Podman's Docker-compatible API: set `docker_host: unix:///run/podman/podman.sock` (and enable podman.socket on the hosts)\nunitgen: 1 error; nothing written\n"
    );
    // --no-pull and pull: false become Pull=never; a short image name is a note.
    fs::write(
        d.join("short.yaml"),
        "services:\n  db:\n    image: postgres:16.4.0\n",
    )
    .unwrap();
    let out = output(
        unitgen()
            .args([
                "short.yaml",
                "--format",
                "quadlet",
                "--hosts",
                "hosts.yaml",
                "--no-pull",
            ])
            .current_dir(d),
    );
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with("==> h1/db@1.container <==\n# Generated by unitgen"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\nImage=postgres:16.4.0\nContainerName=db-1\nPull=never\n"),
        "{stdout}"
    );
    assert_eq!(
        String::from_utf8(out.stderr).unwrap().lines().next().unwrap(),
        "note: db: image `postgres:16.4.0` names no registry; Podman resolves a short name through registries.conf (unqualified-search-registries, short-name-mode) where Docker uses Docker Hub: write the registry (e.g. docker.io/library/postgres) to pin where it comes from"
    );
}

#[test]
fn a_moved_instance_leaves_no_container_file_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::write(
        d.join("services.yaml"),
        "services:\n  web:\n    image: registry.example.com/web:1.0.0\n    instances: 2\n    constraints: {max_per_host: 1}\n",
    )
    .unwrap();
    fs::write(d.join("hosts.yaml"), "hosts:\n  h1: {}\n  h2: {}\n").unwrap();
    let args = [
        "services.yaml",
        "--format",
        "quadlet",
        "--hosts",
        "hosts.yaml",
        "-o",
        "out",
    ];
    unitgen_ok(&args, d);
    let before: Vec<String> = read_tree(&d.join("out")).into_keys().collect();
    assert_eq!(
        before,
        ["h1/web@1.container", "h2/web@2.container", "placement.lock"]
    );
    fs::write(d.join("out/h1/mine.container"), "[Container]\nImage=x:1\n").unwrap();
    fs::write(d.join("hosts.yaml"), "hosts:\n  h1: {}\n  h3: {}\n").unwrap();
    unitgen_ok(&args, d);
    let after: Vec<String> = read_tree(&d.join("out")).into_keys().collect();
    assert_eq!(
        after,
        [
            "h1/mine.container",
            "h1/web@1.container",
            "h3/web@2.container",
            "placement.lock"
        ],
        "the instance on the removed host moved, its old file went, the hand-written one stayed"
    );
}

#[test]
fn apply_refuses_a_quadlet_tree_before_touching_systemd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fs::write(
        d.join("services.yaml"),
        "services:\n  web:\n    image: registry.example.com/web:1.0.0\n",
    )
    .unwrap();
    fs::write(d.join("hosts.yaml"), "hosts:\n  h1: {}\n").unwrap();
    unitgen_ok(
        &[
            "services.yaml",
            "--format",
            "quadlet",
            "--hosts",
            "hosts.yaml",
            "-o",
            "out",
        ],
        d,
    );
    let unit_dir = d.join("etc");
    let out = output(
        unitgen()
            .args(["apply", "--host", "h1", "--units", "out", "--unit-dir"])
            .arg(&unit_dir)
            .args(["--dbus-address", "unix:path=/nonexistent/bus"])
            .current_dir(d),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        "error: out/h1/web@1.container: a Podman Quadlet unit (--format quadlet); unitgen apply installs --format systemd units only: copy the .container files into /etc/containers/systemd/ and run `systemctl daemon-reload`\n"
    );
    assert!(!unit_dir.exists(), "nothing installed");
}
