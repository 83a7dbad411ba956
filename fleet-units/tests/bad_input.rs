//! Bad input: every error names the file, line, column and field, says what is wrong, and
//! nothing is written. Each case runs the real binary and checks its whole stderr.

mod common;

use common::*;
use std::fs;

const HOSTS: &str = "\
hosts:
  h1: {metadata: {role: web, zone: a}}
  h2: {metadata: {role: web, zone: b}}
  h3: {metadata: {role: web, zone: b}}
  h4: {metadata: {role: db, zone: c}}
";

/// Runs `unitgen services.yaml [extra...] -o out` in a temp dir; expects exit 1 and nothing written.
fn fail_with(services: &str, extra: &[&str]) -> String {
    fail_with_hosts(services, HOSTS, extra)
}

fn fail_with_hosts(services: &str, hosts: &str, extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("services.yaml"), services).unwrap();
    fs::write(tmp.path().join("hosts.yaml"), hosts).unwrap();
    let mut args = vec!["services.yaml"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-o", "out"]);
    let out = output(unitgen().args(&args).current_dir(tmp.path()));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "unitgen {args:?} should fail with 1:\n{stderr}"
    );
    assert!(
        !tmp.path().join("out").exists(),
        "nothing may be written on error"
    );
    stderr
}

fn fail(services: &str) -> String {
    fail_with(services, &[])
}

fn assert_errors(stderr: &str, expected: &[&str]) {
    let mut want: Vec<String> = expected.iter().map(|e| format!("error: {e}")).collect();
    let n = expected.len();
    want.push(format!(
        "unitgen: {n} error{}; nothing written",
        if n == 1 { "" } else { "s" }
    ));
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        want,
        "full stderr:\n{stderr}"
    );
}

#[test]
fn latest_is_rejected() {
    let e = fail("services:\n  web:\n    image: registry.example.com/web:latest\n");
    assert_errors(&e, &["services.yaml:3:12: services.web.image: tag `latest` of image `registry.example.com/web:latest` moves (moving tags: latest, stable, main, master); pin an exact tag such as `git-3f2a9c1` or a digest"]);
}

#[test]
fn moving_tag_in_the_tag_field_points_at_that_field() {
    let e = fail("services:\n  web:\n    image: web\n    tag: Stable\n");
    assert_errors(&e, &["services.yaml:4:10: services.web.tag: tag `Stable` of image `web:Stable` moves (moving tags: latest, stable, main, master); pin an exact tag such as `git-3f2a9c1` or a digest"]);
}

#[test]
fn missing_tag_is_rejected() {
    let e = fail("services:\n  web:\n    image: web\n");
    assert_errors(&e, &["services.yaml:3:12: services.web.image: image `web` has no tag: pin an exact tag (e.g. `web:git-3f2a9c1`) or a digest (`@sha256:...`)"]);
    // A registry port is not a tag.
    let e = fail("services:\n  web:\n    image: reg:5000/app\n");
    assert_errors(&e, &["services.yaml:3:12: services.web.image: image `reg:5000/app` has no tag: pin an exact tag (e.g. `reg:5000/app:git-3f2a9c1`) or a digest (`@sha256:...`)"]);
}

#[test]
fn malformed_reference_is_rejected() {
    let e = fail("services:\n  web:\n    image: acme//web:1\n");
    assert_errors(&e, &["services.yaml:3:12: services.web.image: malformed image reference `acme//web:1`: image name `acme//web` has an empty path component (`//` or a leading or trailing `/`)"]);
    let e = fail("services:\n  web:\n    image: web@sha256:1234\n");
    assert_errors(&e, &["services.yaml:3:12: services.web.image: malformed image reference `web@sha256:1234`: digest `sha256:1234` is malformed: sha256 takes exactly 64 lowercase hex digits, got 4"]);
}

#[test]
fn tag_pattern_is_enforced() {
    let e = fail("image_policy:\n  tag_pattern: '^git-[0-9a-f]{7,40}$'\nservices:\n  web:\n    image: web:v1.2\n");
    assert_errors(&e, &["services.yaml:5:12: services.web.image: tag `v1.2` of image `web:v1.2` does not match image_policy.tag_pattern `^git-[0-9a-f]{7,40}$`"]);
}

#[test]
fn yaml_syntax_error() {
    let e = fail("services:\n  web:\n    image: web:1\n   instances: 2\n");
    assert_errors(&e, &["services.yaml:4:4: (yaml): did not find expected key, while parsing a block mapping at line 2 column 3"]);
}

#[test]
fn wrong_type() {
    let e = fail("services:\n  web:\n    image: web:1\n    instances: three\n");
    assert_errors(&e, &["services.yaml:4:16: services.web.instances: invalid type: string \"three\", expected u32"]);
}

#[test]
fn unknown_field() {
    let e = fail("services:\n  web:\n    image: web:1\n    constraints:\n      max_per_hots: 1\n");
    assert_errors(&e, &["services.yaml:5:7: services.web.constraints: unknown field `max_per_hots`, expected one of `metadata`, `max_per_host`, `spread`"]);
}

#[test]
fn impossible_constraint() {
    let e = fail_with(
        "services:\n  web:\n    image: web:git-1\n    instances: 4\n    constraints:\n      metadata: {role: web}\n      max_per_host: 1\n",
        &["--format", "systemd", "--hosts", "hosts.yaml"],
    );
    assert_errors(&e, &["services.yaml:7:21: services.web.constraints.max_per_host: web needs 4 hosts with role=web (max_per_host 1), 3 match"]);
}

#[test]
fn impossible_spread_and_inherited_metadata() {
    let hosts = "hosts:\n  h1: {metadata: {zone: a}}\n  h2: {metadata: {zone: b}}\n  h3: {metadata: {zone: c}}\n  h4: {metadata: {zone: c}}\n  h5: {metadata: {zone: c}}\n";
    let e = fail_with_hosts(
        "defaults:\n  constraints:\n    metadata: {role: gpu}\nservices:\n  a:\n    image: a:1\n  b:\n    image: b:1\n    instances: 5\n    constraints: {metadata: {role: []}, spread: zone, max_per_host: 1}\n",
        hosts,
        &["--format", "systemd", "--hosts", "hosts.yaml"],
    );
    assert_errors(
        &e,
        &[
            "services.yaml:3:15: defaults.constraints.metadata: a needs hosts with role=gpu; none of the 5 hosts match",
            "services.yaml:10:49: services.b.constraints.spread: b spreads 5 instances over `zone` (a, b, c), so 2 of the 3 values need 2 instances, but only 1 has room for that",
        ],
    );
}

#[test]
fn published_host_port_limits_instances_per_host() {
    let e = fail_with(
        "services:\n  web:\n    image: web:1\n    instances: 5\n    ports: [\"8080:80\"]\n",
        &["--format", "systemd", "--hosts", "hosts.yaml"],
    );
    assert_errors(&e, &["services.yaml:5:13: services.web.ports[0]: web needs 5 hosts (one per host, because it publishes host port 8080), the inventory has 4"]);
}

#[test]
fn control_characters_are_rejected_with_their_field() {
    let e = fail("services:\n  web:\n    image: web:1\n    env:\n      MOTD: \"hello\\nExecStartPre=/bin/rm -rf /\"\n    command: [\"a\\tb\"]\n");
    assert_errors(
        &e,
        &[
            "services.yaml:5:13: services.web.env.MOTD: value contains the control character '\\n'; newlines, tabs and other control characters cannot go into a unit file",
            "services.yaml:6:15: services.web.command[0]: value contains the control character '\\t'; newlines, tabs and other control characters cannot go into a unit file",
        ],
    );
}

#[test]
fn every_value_error_is_reported_at_once() {
    let e = fail(
        "defaults:\n  memory: lots\nservices:\n  Web:\n    image: web:1\n  api:\n    image: api:main\n    depends_on: [nope]\n    ports: [\"70000\"]\n    labels: {flotilla.service: x}\n",
    );
    assert_errors(
        &e,
        &[
            "services.yaml:2:11: defaults.memory: `lots` is not a memory limit: write a number with an optional unit b, k, m or g (`512m`)",
            "services.yaml:5:5: services.Web: service name `Web` must be a DNS label: lowercase letters, digits and `-`, at most 63, not starting or ending with `-`",
            "services.yaml:7:12: services.api.image: tag `main` of image `api:main` moves (moving tags: latest, stable, main, master); pin an exact tag such as `git-3f2a9c1` or a digest",
            "services.yaml:8:18: services.api.depends_on[0]: api depends on `nope`, which is not a service in this file",
            "services.yaml:9:13: services.api.ports[0]: container port `70000` must be a number from 1 to 65535",
            "services.yaml:10:32: services.api.labels.flotilla.service: label `flotilla.service` is reserved: unitgen writes the flotilla.* labels from the `flotilla:` section",
        ],
    );
}

#[test]
fn duplicate_keys_and_dependency_cycles() {
    let e = fail("services:\n  web:\n    image: web:1\n  web:\n    image: web:2\n");
    assert_errors(
        &e,
        &["services.yaml:4:3: services: duplicate key `web`; each key may appear once"],
    );
    let e =
        fail("services:\n  a: {image: a:1, depends_on: [b]}\n  b: {image: b:1, sidekick_of: a}\n");
    assert_errors(
        &e,
        &["services.yaml:2:31: services.a.depends_on: depends_on/sidekick_of form a cycle: a -> b -> a"],
    );
}

#[test]
fn hosts_file_errors_name_the_hosts_file() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("services.yaml"), "services: {}\n").unwrap();
    fs::write(
        tmp.path().join("hosts.yaml"),
        "hosts:\n  h1: {address: 10.0.0.300, metadat: {}}\n",
    )
    .unwrap();
    let out = output(
        unitgen()
            .args([
                "services.yaml",
                "--check",
                "--format",
                "systemd",
                "--hosts",
                "hosts.yaml",
            ])
            .current_dir(tmp.path()),
    );
    assert_eq!(out.status.code(), Some(1));
    assert_errors(
        &String::from_utf8(out.stderr).unwrap(),
        &["hosts.yaml:2:29: hosts.h1: unknown field `metadat`, expected `address` or `metadata`"],
    );
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("services.yaml"), "services: {}\n").unwrap();
    let out = output(
        unitgen()
            .args(["services.yaml", "--format", "systemd"])
            .current_dir(tmp.path()),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--format systemd needs --hosts hosts.yaml")
    );
    let out = output(unitgen().args(["missing.yaml"]).current_dir(tmp.path()));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.yaml: No such file or directory")
    );
}

#[test]
fn check_validates_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let services = golden_dir("example").join("services.yaml");
    let hosts = golden_dir("example").join("hosts.yaml");
    let out = output(
        unitgen()
            .arg(&services)
            .args(["--check", "--format", "systemd", "--hosts"])
            .arg(&hosts)
            .args(["-o", "out"])
            .current_dir(tmp.path()),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "unitgen: ok: 5 services, 15 instances on 6 hosts, 7 platform units (systemd); 0 instances moved\n"
    );
    assert!(out.stdout.is_empty());
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn platform_units_need_addresses_and_matching_hosts() {
    let hosts = "hosts:\n  h1: {metadata: {role: web}}\n  h2: {address: 10.0.0.2}\n";
    let e = fail_with_hosts(
        "services: {}\nplatform:\n  presence: {}\n  confgen:\n    metadata: {role: lb}\n",
        hosts,
        &["--format", "systemd", "--hosts", "hosts.yaml"],
    );
    assert_errors(
        &e,
        &[
            "hosts.yaml:2:7: hosts.h1.address: host h1 runs presence, which needs this host's `address` for --advertise-ip",
            "services.yaml:5:15: platform.confgen.metadata: confgen is to run on hosts with role=lb, but none of the 2 hosts match",
        ],
    );
}

#[test]
fn a_dependent_needs_as_many_instances_as_its_dependency() {
    let e = fail("services:\n  a: {image: a:1, instances: 2}\n  b: {image: b:1, instances: 3, depends_on: [a]}\n");
    assert_errors(&e, &["services.yaml:3:46: services.b.depends_on[0]: b depends on a: instance N of b runs beside instance N of a, so a needs at least 3 instances, it has 2"]);
    let e = fail("services:\n  a: {image: a:1}\n  b: {image: b:1, sidekick_of: c}\n");
    assert_errors(&e, &["services.yaml:3:32: services.b.sidekick_of: b is a sidekick of `c`, which is not a service in this file"]);
}

#[test]
fn dependents_that_cannot_follow_are_errors() {
    // b's instance 1 must run beside a's, on the db host, which b's own metadata excludes.
    let e = fail_with(
        "services:\n  a: {image: a:1, constraints: {metadata: {role: db}}}\n  b: {image: b:1, depends_on: [a], constraints: {metadata: {role: web}}}\n",
        &["--format", "systemd", "--hosts", "hosts.yaml"],
    );
    assert_errors(&e, &["services.yaml:3:60: services.b.constraints.metadata: b@1 runs beside a@1 (depends_on) on h4, which does not match role=web"]);
}

#[test]
fn platform_args_that_carry_a_secret_are_refused_without_echoing_it() {
    // Issue 16 item 6: the units are world-readable (0644, `systemctl cat`), so a password in
    // `platform.*.args` is readable by every local user.
    let e = fail(
        "services: {}\nplatform:\n  presence:\n    args: [--etcd-password, hunter2]\n  confgen:\n    args: [\"--etcd-password=hunter2\", --api-token=abc, FLOTILLA_ETCD_PASSWORD=hunter2]\n",
    );
    assert!(
        !e.contains("hunter2") && !e.contains("abc"),
        "the secret is echoed:\n{e}"
    );
    let hint = "the units are world-readable; put the password in a file (platform.etcd.password_file: --etcd-password-file, mode 0600) or FLOTILLA_ETCD_PASSWORD=… in platform.environment_file (EnvironmentFile=)";
    assert_errors(
        &e,
        &[
            &format!("services.yaml:4:12: platform.presence.args[0]: `--etcd-password` would write a secret into the unit: {hint}"),
            &format!("services.yaml:6:12: platform.confgen.args[0]: `--etcd-password=…` would write a secret into the unit: {hint}"),
            &format!("services.yaml:6:39: platform.confgen.args[1]: `--api-token=…` would write a secret into the unit: {hint}"),
            &format!("services.yaml:6:56: platform.confgen.args[2]: `FLOTILLA_ETCD_PASSWORD=…` would write a secret into the unit: {hint}"),
        ],
    );
}

#[test]
fn platform_etcd_password_file_goes_into_the_units_as_a_path() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(
        tmp.path().join("services.yaml"),
        "services: {}\nplatform:\n  etcd: {user: flotilla, password_file: /etc/flotilla/etcd-password}\n  presence: {}\n  confgen: {}\n",
    )
    .unwrap();
    unitgen_ok(&["services.yaml", "-o", "out"], tmp.path());
    let tree = read_tree(&tmp.path().join("out"));
    for daemon in ["presence", "confgen"] {
        let (_, unit) = tree
            .iter()
            .find(|(k, _)| k.ends_with(&format!("{daemon}.service")))
            .unwrap_or_else(|| panic!("no {daemon} unit in {:?}", tree.keys()));
        assert!(
            unit.contains("--etcd-password-file /etc/flotilla/etcd-password \\\n")
                && unit.contains("--etcd-user flotilla"),
            "{unit}"
        );
    }
}

#[test]
fn a_loopback_host_address_for_presence_needs_allow_loopback() {
    // presence refuses a loopback / link-local --advertise-ip without --allow-loopback (issue 16
    // item 3): the generated unit would never start.
    let hosts = "hosts:\n  h1: {address: 127.0.0.1}\n  h2: {address: 'fe80::1'}\n";
    let e = fail_with_hosts(
        "services: {}\nplatform:\n  presence: {}\n",
        hosts,
        &["--format", "systemd", "--hosts", "hosts.yaml"],
    );
    assert_errors(
        &e,
        &[
            "hosts.yaml:2:17: hosts.h1.address: host h1's address 127.0.0.1 is loopback or link-local, which presence refuses as --advertise-ip (other proxy hosts would route to themselves); give an address other hosts reach, or add --allow-loopback to platform.presence.args for a single-host setup",
            "hosts.yaml:3:17: hosts.h2.address: host h2's address fe80::1 is loopback or link-local, which presence refuses as --advertise-ip (other proxy hosts would route to themselves); give an address other hosts reach, or add --allow-loopback to platform.presence.args for a single-host setup",
        ],
    );
    // With --allow-loopback it is a single-host setup: the unit is written.
    let tmp = tempfile::tempdir().unwrap();
    fs::write(
        tmp.path().join("services.yaml"),
        "services: {}\nplatform:\n  presence: {args: [--allow-loopback]}\n",
    )
    .unwrap();
    fs::write(tmp.path().join("hosts.yaml"), hosts).unwrap();
    unitgen_ok(
        &[
            "services.yaml",
            "--format",
            "systemd",
            "--hosts",
            "hosts.yaml",
            "-o",
            "out",
        ],
        tmp.path(),
    );
    let unit = fs::read_to_string(tmp.path().join("out/h1/presence.service")).unwrap();
    assert!(
        unit.contains("--advertise-ip 127.0.0.1") && unit.contains("--allow-loopback"),
        "{unit}"
    );
}
