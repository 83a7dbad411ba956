//! `confgen convert` on confd's own templates (tests/fixtures/confd, see its README): every
//! template whose output confd produced is converted without a problem, rendered by confgen from
//! the same keys, and must give confd's bytes exactly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/confd")
}

fn confgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_confgen"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // confd ran with HOSTNAME=localhost (templates-getenv, tomcat-server.xml read it).
        .env("HOSTNAME", "localhost")
        .stdin(Stdio::null())
        .output()
        .expect("run confgen")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// (template, confd's output) for every fixture confd rendered.
fn cases() -> Vec<(PathBuf, PathBuf)> {
    let f = fixtures();
    let mut out = Vec::new();
    for (dir, prefix) in [("docs", ""), ("integration/templates", "integration-")] {
        for e in std::fs::read_dir(f.join(dir)).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap();
            let Some(stem) = name.strip_suffix(".tmpl") else {
                continue;
            };
            let stem = if prefix.is_empty() {
                stem.to_string()
            } else {
                // integration/templates/basic.conf.tmpl → expect-confd/integration-basic
                format!("{prefix}{}", stem.strip_suffix(".conf").unwrap_or(stem))
            };
            let expect = f.join("expect-confd").join(&stem);
            if expect.exists() {
                out.push((path, expect));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn confds_templates_convert_and_render_confds_bytes() {
    let cases = cases();
    // 27 from confd's docs and quick start, 4 from its integration tests.
    assert!(cases.len() >= 31, "fixtures missing: {cases:?}");
    let dir = tempfile::tempdir().unwrap();
    let data = fixtures().join("snapshot.json");
    let mut failures = Vec::new();
    for (tmpl, expect) in &cases {
        let name = tmpl.file_name().unwrap().to_str().unwrap();
        let out = dir.path().join(name);
        let o = confgen(&[
            "convert",
            tmpl.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        if !o.status.success() {
            failures.push(format!("{name}: convert failed: {}", stderr(&o)));
            continue;
        }
        let o = confgen(&[
            "render",
            "--template",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ]);
        if !o.status.success() {
            failures.push(format!("{name}: render failed: {}", stderr(&o)));
            continue;
        }
        let want = std::fs::read(expect).unwrap();
        if o.stdout != want {
            failures.push(format!(
                "{name}: differs from confd's output\n--- confd\n{}\n--- confgen\n{}",
                String::from_utf8_lossy(&want),
                String::from_utf8_lossy(&o.stdout)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn what_cannot_be_converted_is_named_with_its_line_and_fails() {
    let tmpl = fixtures().join("docs/templates-cget.tmpl");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cget.tmpl");
    let o = confgen(&[
        "convert",
        tmpl.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("templates-cget.tmpl:1:1: not converted: cget"),
        "{err}"
    );
    assert!(
        err.contains("templates-cget.tmpl:5:8: not converted: cgetv"),
        "{err}"
    );
    // The output is still written, with the unconverted constructs left as comments.
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("{#"), "{text}");
}

#[test]
fn templates_with_time_or_dns_convert_cleanly() {
    // Their output depends on the clock or a DNS server: converted, not compared.
    for name in ["templates-datetime.tmpl", "templates-lookupSRV.tmpl"] {
        let tmpl = fixtures().join("docs").join(name);
        let o = confgen(&["convert", tmpl.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert!(!o.stdout.is_empty(), "{name}: empty output");
    }
}
