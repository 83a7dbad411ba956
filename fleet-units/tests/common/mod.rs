//! Helpers shared by unitgen's integration tests. Each test file uses a different subset.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The crate directory.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/golden/<name>`.
pub fn golden_dir(name: &str) -> PathBuf {
    crate_dir().join("tests/golden").join(name)
}

/// The unitgen binary built for this test run.
pub fn unitgen() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_unitgen"));
    // Flags must not leak in from the developer's environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("FLOTILLA_UNITGEN_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs a command and returns its output, panicking if it could not be started.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs unitgen and asserts success, returning stdout.
pub fn unitgen_ok(args: &[&str], cwd: &Path) -> String {
    let out = output(unitgen().args(args).current_dir(cwd));
    assert!(
        out.status.success(),
        "unitgen {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Every file under `dir`, by `/`-separated relative path.
pub fn read_tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).expect("under base");
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                out.insert(rel, fs::read_to_string(&p).expect("utf-8 file"));
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// A short, readable difference between two texts: the first differing line with context.
pub fn first_difference(expected: &str, actual: &str) -> String {
    let e: Vec<&str> = expected.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    let n = e.len().max(a.len());
    for i in 0..n {
        if e.get(i) != a.get(i) {
            let from = i.saturating_sub(3);
            let mut s = String::new();
            for j in from..i {
                s.push_str(&format!("   {:>4} | {}\n", j + 1, e.get(j).unwrap_or(&"")));
            }
            s.push_str(&format!(
                " - {:>4} | {}\n",
                i + 1,
                e.get(i).copied().unwrap_or("<end of file>")
            ));
            s.push_str(&format!(
                " + {:>4} | {}\n",
                i + 1,
                a.get(i).copied().unwrap_or("<end of file>")
            ));
            return s;
        }
    }
    if expected != actual {
        return "texts differ only in the final newline".into();
    }
    String::new()
}

/// Compares `actual` with the golden tree `golden`, or rewrites the golden tree when
/// `UPDATE_GOLDEN=1`.
pub fn assert_golden_tree(golden: &Path, actual: &BTreeMap<String, String>) {
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        if golden.exists() {
            fs::remove_dir_all(golden).expect("remove old golden tree");
        }
        for (rel, content) in actual {
            let p = golden.join(rel);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir golden");
            fs::write(&p, content).expect("write golden");
        }
        eprintln!("updated {}", golden.display());
        return;
    }
    let expected = read_tree(golden);
    assert!(
        !expected.is_empty(),
        "no golden files in {}; run with UPDATE_GOLDEN=1 to create them",
        golden.display()
    );
    let mut problems = Vec::new();
    for rel in expected.keys().filter(|k| !actual.contains_key(*k)) {
        problems.push(format!("missing output file {rel}"));
    }
    for rel in actual.keys().filter(|k| !expected.contains_key(*k)) {
        problems.push(format!("unexpected output file {rel}"));
    }
    for (rel, want) in &expected {
        if let Some(got) = actual.get(rel) {
            if got != want {
                problems.push(format!(
                    "{rel} differs (- golden, + actual):\n{}",
                    first_difference(want, got)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "output differs from {} (UPDATE_GOLDEN=1 regenerates it):\n{}",
        golden.display(),
        problems.join("\n")
    );
}

/// One `Exec*=` line of a unit, split the way systemd splits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecLine {
    /// `ExecStartPre`, `ExecStart`, `ExecStop`, ...
    pub key: String,
    /// A leading `-`: failure is ignored.
    pub ignore_failure: bool,
    /// argv, with specifiers and `$$` resolved.
    pub argv: Vec<String>,
}

/// The settings of one section, continuation lines joined, in file order.
pub fn section_settings(unit: &str, section: &str) -> Vec<(String, String)> {
    // systemd.syntax(5): a line ending in a backslash continues on the next line; the backslash
    // is replaced by a space.
    let mut joined: Vec<String> = Vec::new();
    let mut pending: Option<String> = None;
    for line in unit.lines() {
        let mut cur = match pending.take() {
            Some(p) => p + line,
            None => line.to_string(),
        };
        if cur.ends_with('\\') {
            cur.pop();
            cur.push(' ');
            pending = Some(cur);
        } else {
            joined.push(cur);
        }
    }
    let mut current = String::new();
    let mut out = Vec::new();
    for line in joined {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if t.starts_with('[') && t.ends_with(']') {
            current = t[1..t.len() - 1].to_string();
            continue;
        }
        if current == section {
            let (k, v) = t
                .split_once('=')
                .unwrap_or_else(|| panic!("not a setting: {t}"));
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// Expands the specifiers this test suite allows (`%%`, `%i`), as systemd does on the whole value
/// before splitting it; any other specifier is a test failure.
pub fn expand_specifiers(value: &str, instance: Option<&str>) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('i') if instance.is_some() => out.push_str(instance.unwrap_or_default()),
            other => panic!("unexpected specifier %{other:?} in {value:?}"),
        }
    }
    out
}

/// Splits a command line into words following systemd.service(5) "Command lines": whitespace
/// separates words; double or single quotes group; backslash escapes `\\ \" \' \n \t \s` and
/// `\xNN` (ASCII; Quadlet writes spaces as `\x20`) apply inside and outside quotes; `$$` is a literal `$`, and any other `$` (a variable) is refused
/// here because unitgen never emits one in a service unit.
pub fn split_command(value: &str) -> Vec<String> {
    let chars: Vec<char> = value.chars().collect();
    let mut words = Vec::new();
    let mut i = 0;
    let escape = |c: char| match c {
        '\\' => '\\',
        '"' => '"',
        '\'' => '\'',
        'n' => '\n',
        't' => '\t',
        's' => ' ',
        ';' => ';',
        other => panic!("unexpected escape \\{other} in {value:?}"),
    };
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let mut word = String::new();
        if chars[i] == '"' || chars[i] == '\'' {
            let q = chars[i];
            i += 1;
            loop {
                assert!(i < chars.len(), "unbalanced quoting in {value:?}");
                match chars[i] {
                    c if c == q => {
                        i += 1;
                        break;
                    }
                    '\\' if chars[i + 1] == 'x' => {
                        word.push(hex_escape(&chars[i + 2..i + 4], value));
                        i += 4;
                    }
                    '\\' => {
                        word.push(escape(chars[i + 1]));
                        i += 2;
                    }
                    c => {
                        word.push(c);
                        i += 1;
                    }
                }
            }
            assert!(
                i >= chars.len() || chars[i].is_whitespace(),
                "quote not followed by a space in {value:?}"
            );
        } else {
            if chars[i] == ';' && chars.get(i + 1).is_none_or(|c| c.is_whitespace()) {
                panic!("unquoted `;` (command separator) in {value:?}");
            }
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && chars[i + 1] == 'x' {
                    word.push(hex_escape(&chars[i + 2..i + 4], value));
                    i += 4;
                } else if chars[i] == '\\' {
                    word.push(escape(chars[i + 1]));
                    i += 2;
                } else {
                    word.push(chars[i]);
                    i += 1;
                }
            }
        }
        words.push(resolve_dollars(&word, value));
    }
    words
}

fn hex_escape(digits: &[char], line: &str) -> char {
    let text: String = digits.iter().collect();
    let byte = u8::from_str_radix(&text, 16)
        .unwrap_or_else(|_| panic!("bad \\x escape \\x{text} in {line:?}"));
    assert!(byte.is_ascii(), "non-ASCII \\x{text} in {line:?}");
    char::from(byte)
}

fn resolve_dollars(word: &str, line: &str) -> String {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' {
            match chars.next() {
                Some('$') => out.push('$'),
                other => panic!("environment variable reference ${other:?}… in {line:?}"),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `Exec*=` lines of a unit's `[Service]` section, in file order.
pub fn exec_lines(unit: &str, instance: Option<&str>) -> Vec<ExecLine> {
    section_settings(unit, "Service")
        .into_iter()
        .filter(|(k, _)| k.starts_with("Exec"))
        .map(|(key, value)| {
            let expanded = expand_specifiers(&value, instance);
            let mut argv = split_command(&expanded);
            let mut ignore_failure = false;
            // Prefixes on the executable: "-" ignores failure; unitgen uses no other.
            if let Some(first) = argv.first_mut() {
                if let Some(rest) = first.strip_prefix('-') {
                    ignore_failure = true;
                    *first = rest.to_string();
                }
            }
            ExecLine {
                key,
                ignore_failure,
                argv,
            }
        })
        .collect()
}

/// Runs `systemd-analyze verify` on one unit file and returns (success, combined output).
/// `--man=no` skips the check that Documentation= man pages exist.
pub fn systemd_verify(unit: &Path) -> (bool, String) {
    let out = output(
        Command::new("/usr/bin/systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(unit),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The example services file with presence watching Podman's socket (what `--format quadlet`
/// requires), written to `dir/services.yaml`.
pub fn example_for_podman(dir: &Path) -> PathBuf {
    let mut doc: serde_norway::Value = serde_norway::from_str(
        &fs::read_to_string(golden_dir("example").join("services.yaml")).unwrap(),
    )
    .unwrap();
    doc["platform"]["presence"]["docker_host"] =
        serde_norway::Value::String("unix:///run/podman/podman.sock".into());
    let path = dir.join("services.yaml");
    fs::write(&path, serde_norway::to_string(&doc).unwrap()).unwrap();
    path
}
