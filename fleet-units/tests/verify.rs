//! Every generated unit passes `systemd-analyze verify` (Debian's systemd 252).
//!
//! How: units are verified by absolute path, so systemd adds their directory to the unit search
//! path and finds the units they require (`db@1.service` beside `web-sidecar@1.service`);
//! `docker.service` comes from the installed docker.io package. `--man=no` skips the man-page
//! check. Fleet templates (`web@.service`) cannot be verified on their own, so their instance
//! files (`web@1.service`, byte-identical copies) are. systemd also checks that every `Exec*=`
//! binary exists: `/usr/bin/docker` does after `scripts/setup`, and the platform units get stub
//! binaries in a temp dir (the real presence/confgen need not be installed here). Exit status 0
//! is not enough: systemd only warns about unknown settings, so any output at all fails the test.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The example services file with the platform binaries replaced by stubs under `dir`.
fn example_with_stub_binaries(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let mut doc: serde_norway::Value = serde_norway::from_str(
        &fs::read_to_string(golden_dir("example").join("services.yaml")).unwrap(),
    )
    .unwrap();
    for daemon in ["presence", "confgen"] {
        let stub = bin.join(daemon);
        fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
        doc["platform"][daemon]["binary"] = serde_norway::Value::String(stub.display().to_string());
    }
    let path = dir.join("services.yaml");
    fs::write(&path, serde_norway::to_string(&doc).unwrap()).unwrap();
    path
}

fn verify_all(root: &Path) -> usize {
    assert!(
        Path::new("/usr/bin/docker").is_file(),
        "/usr/bin/docker is missing: run scripts/setup (Debian docker.io)"
    );
    let tree = read_tree(root);
    let mut verified = 0;
    let mut failures = Vec::new();
    for (rel, content) in &tree {
        if !rel.ends_with(".service") {
            continue;
        }
        if rel.ends_with("@.service") {
            // A template: its instances are verified instead; make sure they are copies.
            let inst = rel.replace("@.service", "@1.service");
            assert_eq!(tree.get(&inst), Some(content), "{inst} is a copy of {rel}");
            continue;
        }
        let (ok, text) = systemd_verify(&root.join(rel));
        if !ok || !text.trim().is_empty() {
            failures.push(format!("{rel} (ok={ok}):\n{text}"));
        }
        verified += 1;
    }
    assert!(
        failures.is_empty(),
        "systemd-analyze verify complained:\n{}",
        failures.join("\n")
    );
    verified
}

#[test]
fn fleet_units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let services = example_with_stub_binaries(tmp.path());
    let out = tmp.path().join("out");
    unitgen_ok(
        &[
            &services.display().to_string(),
            "-o",
            &out.display().to_string(),
        ],
        tmp.path(),
    );
    let n = verify_all(&out);
    // web, cache, web-sidecar: 4 instances each; api 2; db 1; presence and confgen.
    assert_eq!(n, 17);
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let services = example_with_stub_binaries(tmp.path());
    let out = tmp.path().join("out");
    let hosts = golden_dir("example").join("hosts.yaml");
    unitgen_ok(
        &[
            &services.display().to_string(),
            "--format",
            "systemd",
            "--hosts",
            &hosts.display().to_string(),
            "-o",
            &out.display().to_string(),
        ],
        tmp.path(),
    );
    let n = verify_all(&out);
    // 15 instances, presence on 6 hosts, confgen on the one edge host.
    assert_eq!(n, 15 + 6 + 1);
}

#[test]
fn awkward_values_pass_verify_and_split_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let services = tmp.path().join("services.yaml");
    let nasty = [
        "plain",
        "two words",
        "100%",
        "%i %n %%",
        "$HOME ${PATH} $$",
        "back\\slash\\",
        "\"double\" and 'single'",
        ";",
        "a ; b",
        "",
        "grüße, 世界",
        "#not-a-comment",
        "-dash",
    ];
    let args: Vec<String> = nasty
        .iter()
        .map(|s| {
            format!(
                "      - {}\n",
                serde_norway::to_string(s).unwrap().trim_end()
            )
        })
        .collect();
    fs::write(
        &services,
        format!(
            "services:\n  odd:\n    image: flotilla-busybox:test\n    env:\n      NASTY: {}\n    command:\n{}",
            serde_norway::to_string(&nasty.join("|")).unwrap().trim_end(),
            args.concat()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    unitgen_ok(
        &[
            &services.display().to_string(),
            "-o",
            &out.display().to_string(),
        ],
        tmp.path(),
    );
    assert_eq!(verify_all(&out), 1);
    let unit = fs::read_to_string(out.join("odd@1.service")).unwrap();
    let start = exec_lines(&unit, Some("1"))
        .into_iter()
        .find(|l| l.key == "ExecStart")
        .unwrap();
    let argv = &start.argv;
    let image_at = argv
        .iter()
        .position(|a| a == "flotilla-busybox:test")
        .unwrap();
    assert_eq!(&argv[image_at + 1..], &nasty.map(String::from)[..]);
    assert!(argv.contains(&format!("NASTY={}", nasty.join("|"))));
    assert_eq!(&argv[..4], &["/usr/bin/docker", "run", "--rm", "--name"]);
    assert_eq!(argv[4], "odd-1");
}
