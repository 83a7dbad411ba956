//! Rules every daemon's command line keeps, checked by each binary's tests.

/// Flags every daemon shares (through [`crate::EtcdArgs`] and [`crate::daemon::ObsArgs`]):
/// one variable each, the same in every binary.
pub const SHARED: &[&str] = &[
    "etcd-endpoints",
    "etcd-cacert",
    "etcd-cert",
    "etcd-key",
    "etcd-user",
    "etcd-password",
    "etcd-password-file",
    "etcd-dial-timeout",
    "prefix",
    "log-format",
    "metrics-addr",
];

/// Every flag of `cmd` and of its subcommands (other than `--help` and `--version`) reads an
/// environment variable: `prefix` + the long name in capitals with `-` as `_`
/// (`FLOTILLA_` and `--etcd-endpoints` → `FLOTILLA_ETCD_ENDPOINTS`), or the name `renamed`
/// gives it (`-`: the flag reads none). The shared flags ([`SHARED`]: etcd, `--prefix`,
/// logging, metrics) read `FLOTILLA_` + the name in every binary, whatever `prefix`. A key of
/// `renamed` is `--flag` (wherever it appears) or `<subcommand> --flag` (`convert --output`).
/// Returns one line per flag that breaks the rule and per `renamed` entry no flag uses; empty
/// when the command line and the documented rule agree.
pub fn env_var_mismatches(
    cmd: &clap::Command,
    prefix: &str,
    renamed: &[(&str, &str)],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut used = vec![false; renamed.len()];
    walk(cmd, "", prefix, renamed, &mut used, &mut problems);
    for ((key, env), used) in renamed.iter().zip(used) {
        if !used {
            problems.push(format!("renamed {key} = {env}: no such flag"));
        }
    }
    problems
}

fn walk(
    cmd: &clap::Command,
    path: &str,
    prefix: &str,
    renamed: &[(&str, &str)],
    used: &mut [bool],
    problems: &mut Vec<String>,
) {
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else {
            continue; // positional
        };
        if matches!(long, "help" | "version") {
            continue;
        }
        let flag = format!("--{long}");
        let scoped = format!("{path} {flag}");
        let found = renamed
            .iter()
            .position(|(k, _)| *k == scoped.trim_start() || *k == flag);
        let want = match found {
            Some(i) => {
                used[i] = true;
                renamed[i].1.to_string()
            }
            None if SHARED.contains(&long) => {
                format!("FLOTILLA_{}", long.to_uppercase().replace('-', "_"))
            }
            None => format!("{prefix}{}", long.to_uppercase().replace('-', "_")),
        };
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        let agrees = match env.as_deref() {
            None => want == "-",
            Some(e) => e == want,
        };
        if !agrees {
            let shown = env.map_or("none".to_string(), |e| e);
            problems.push(format!(
                "{}: env {shown}, documented {want}",
                scoped.trim_start()
            ));
        }
    }
    for sub in cmd.get_subcommands() {
        let p = format!("{path} {}", sub.get_name());
        walk(sub, p.trim_start(), prefix, renamed, used, problems);
    }
}

/// The renamed variables of `binary` from the table in docs/OPERATIONS.md ("Environment
/// variables"): rows `| `binary` | `flag` | `FLOTILLA_…` | why |`. The tests read the docs, so
/// the table and the command line cannot drift apart.
pub fn documented_renames(operations_md: &str, binary: &str) -> Vec<(String, String)> {
    let row = format!("| `{binary}` |");
    operations_md
        .lines()
        .filter(|l| l.starts_with(&row))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let unquote = |c: &str| c.trim_matches('`').to_string();
            Some((unquote(cells.get(2)?), unquote(cells.get(3)?)))
        })
        .collect()
}

/// [`env_var_mismatches`] with the renames [`documented_renames`] reads for `binary`.
pub fn env_var_mismatches_with_docs(
    cmd: &clap::Command,
    binary: &str,
    prefix: &str,
    operations_md: &str,
) -> Vec<String> {
    let renames = documented_renames(operations_md, binary);
    let refs: Vec<(&str, &str)> = renames
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    env_var_mismatches(cmd, prefix, &refs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_docs_table_is_read_per_binary() {
        let doc = "| binary | flag | variable | why |\n| --- | --- | --- | --- |\n\
                   | `confgen` | `convert --output` | `FLOTILLA_CONVERT_OUTPUT` | x |\n\
                   | `proxyctl` | `--config` | `FLOTILLA_PROXY_CONFIG` | y |\n";
        assert_eq!(
            documented_renames(doc, "confgen"),
            vec![(
                "convert --output".to_string(),
                "FLOTILLA_CONVERT_OUTPUT".to_string()
            )]
        );
    }

    use super::*;

    #[test]
    fn flags_without_or_with_another_variable_are_named() {
        let cmd = clap::Command::new("t")
            .arg(
                clap::Arg::new("a")
                    .long("etcd-endpoints")
                    .env("FLOTILLA_ETCD_ENDPOINTS"),
            )
            .arg(
                clap::Arg::new("b")
                    .long("dry-run")
                    .action(clap::ArgAction::SetTrue),
            )
            .arg(clap::Arg::new("file"))
            .subcommand(
                clap::Command::new("convert")
                    .arg(
                        clap::Arg::new("o")
                            .long("output")
                            .env("FLOTILLA_CONVERT_OUTPUT"),
                    )
                    .arg(clap::Arg::new("j").long("json").env("FLOTILLA_JSN")),
            );
        let p = env_var_mismatches(
            &cmd,
            "FLOTILLA_",
            &[
                ("convert --output", "FLOTILLA_CONVERT_OUTPUT"),
                ("--gone", "X"),
            ],
        );
        assert_eq!(
            p,
            vec![
                "--dry-run: env none, documented FLOTILLA_DRY_RUN".to_string(),
                "convert --json: env FLOTILLA_JSN, documented FLOTILLA_JSON".to_string(),
                "renamed --gone = X: no such flag".to_string(),
            ]
        );
    }
}
