//! Two unitgen runs writing into the same output directory at once both succeed and leave the
//! tree a single run leaves: every file is staged under a name of its own (the old fixed
//! `.<name>.unitgen-tmp` made one run's rename fail with "No such file" after the other had
//! renamed the shared temp file, or rename a file the other was still writing).

mod common;

use common::*;
use std::process::Stdio;

#[test]
fn two_runs_into_the_same_directory_at_once_both_succeed() {
    let example = |f: &str| golden_dir("example").join(f).display().to_string();
    let (services, hosts) = (example("services.yaml"), example("hosts.yaml"));
    let golden = read_tree(&golden_dir("example/systemd"));
    let tmp = tempfile::tempdir().unwrap();
    for round in 0..25 {
        // A fresh directory each round, so both runs write every file (an unchanged file is
        // not written at all).
        let out = tmp.path().join(format!("units-{round}"));
        let out_arg = out.display().to_string();
        let args = [
            &services, "--format", "systemd", "--hosts", &hosts, "-o", &out_arg,
        ];
        let children: Vec<_> = (0..2)
            .map(|_| {
                unitgen()
                    .args(args)
                    .current_dir(crate_dir())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start unitgen")
            })
            .collect();
        for child in children {
            let got = child.wait_with_output().expect("wait for unitgen");
            assert!(
                got.status.success(),
                "round {round}: a concurrent unitgen failed ({}):\n{}",
                got.status,
                String::from_utf8_lossy(&got.stderr)
            );
        }
        assert_eq!(
            read_tree(&out),
            golden,
            "round {round}: the tree (no staged file may be left)"
        );
    }
}
