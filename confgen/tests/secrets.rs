//! confgen's child commands (`check_cmd`, `reload_cmd`) never see etcd credentials: confgen runs
//! with `FLOTILLA_ETCD_*` in its environment (here a password user against a TLS etcd with
//! RBAC), and the commands record their own environment.

mod common;

use common::*;
use flotilla_harness::etcd::TlsEtcd;

#[test]
fn check_and_reload_commands_do_not_inherit_etcd_credentials() {
    let t = TlsEtcd::start();
    let confdir = Confdir::new();
    confdir.template("t.tmpl", "ok\n");
    let check_env = confdir.out("check.env");
    let reload_env = confdir.out("reload.env");
    confdir.resource(
        "t",
        &format!(
            r#"[template]
src = "t.tmpl"
dest = "{dest}"
keys = ["/flotilla/endpoints/"]
check_cmd = "env > {check} && test -s {{{{src}}}}"
reload_cmd = "env > {reload}"
"#,
            dest = confdir.out("t.conf").display(),
            check = check_env.display(),
            reload = reload_env.display(),
        ),
    );
    let pw_file = confdir.path().join("reader.pw");
    std::fs::write(&pw_file, "reader-secret\n").unwrap();
    for (how, env) in [
        (
            "password in the environment",
            vec![("FLOTILLA_ETCD_PASSWORD", "reader-secret".to_string())],
        ),
        (
            "password file",
            vec![("FLOTILLA_ETCD_PASSWORD_FILE", pw_file.display().to_string())],
        ),
    ] {
        let _ = std::fs::remove_file(&check_env);
        let _ = std::fs::remove_file(&reload_env);
        let _ = std::fs::remove_file(confdir.out("t.conf"));
        let mut cmd = clean_env(std::process::Command::new(confgen_bin()));
        cmd.args(["run", "--onetime", "--confdir"])
            .arg(confdir.path())
            .env("FLOTILLA_ETCD_ENDPOINTS", t.etcd.endpoint())
            .env("FLOTILLA_ETCD_CACERT", &t.tls.ca)
            .env("FLOTILLA_ETCD_CERT", &t.tls.client_cert)
            .env("FLOTILLA_ETCD_KEY", &t.tls.client_key)
            .env("FLOTILLA_ETCD_USER", "reader")
            .env("FLOTILLA_PREFIX", "/flotilla")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let out = cmd.output().expect("run confgen");
        assert!(
            out.status.success(),
            "{how}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for file in [&check_env, &reload_env] {
            let text = read(file);
            assert!(
                text.contains("PATH="),
                "{how}: {} was not written by the command",
                file.display()
            );
            assert!(
                !text.contains("reader-secret"),
                "{how}: the password reached {}:\n{text}",
                file.display()
            );
            let leaked: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("FLOTILLA_ETCD_"))
                .collect();
            assert!(
                leaked.is_empty(),
                "{how}: {} inherited {leaked:?}",
                file.display()
            );
            // Other variables are kept (the command may need them).
            assert!(text.contains("FLOTILLA_PREFIX=/flotilla"), "{how}: {text}");
        }
    }
}
