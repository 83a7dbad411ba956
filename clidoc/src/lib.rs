//! Shell completions and man pages for the Flotilla binaries, generated from each binary's own
//! clap definition at run time (`clap_complete`, `clap_mangen`), so they cannot drift from the
//! flags the binary really takes.
//!
//! A binary with subcommands adds the hidden ones as a flattened variant of its subcommand enum
//! and runs them with the whole command:
//!
//! ```ignore
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     Run(RunArgs),
//!     #[command(flatten)]
//!     Doc(flotilla_clidoc::DocCommand),
//! }
//! // in main: Command::Doc(d) => return d.run(Cli::command()),
//! ```
//!
//! A binary without subcommands (whose required flags would refuse `completions bash`) calls
//! [`intercept`] first thing in `main`:
//! `if let Some(code) = flotilla_clidoc::intercept(Cli::command) { return code; }`.
//!
//! Either way: `BIN completions bash|zsh|fish|elvish|powershell` prints a completion script,
//! `BIN man` prints `BIN.1`, `BIN man DIR` writes `BIN.1` and `BIN-<subcommand>.1` for every
//! visible subcommand into DIR. Both are hidden from `--help`, the completions and the man
//! pages themselves, and take no flags (only positionals), so they add nothing to the
//! environment-variable rule of `flotilla_registry::cli`.
//!
//! [`missing_mentions`] is the test every binary runs: every visible subcommand and flag of its
//! command appears in the bash, zsh and fish completions and in the man pages.

use clap::Command;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use clap_complete::Shell;

/// The hidden subcommands `completions SHELL` and `man [DIR]`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DocCommand {
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    #[command(hide = true)]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page on stdout, or write it and one page per subcommand into DIR.
    #[command(hide = true)]
    Man {
        /// Directory for `BIN.1` and `BIN-<subcommand>.1` (created if needed).
        dir: Option<PathBuf>,
    },
}

impl DocCommand {
    /// Runs the subcommand for `cmd` (the binary's whole clap command, `Cli::command()`):
    /// exit status 0, or 3 when the output could not be written (message on stderr).
    pub fn run(&self, cmd: Command) -> ExitCode {
        let name = cmd.get_name().to_string();
        let result = match self {
            DocCommand::Completions { shell } => std::io::stdout()
                .write_all(completions(cmd, *shell).as_bytes())
                .map_err(|e| format!("cannot write to stdout: {e}")),
            DocCommand::Man { dir: None } => std::io::stdout()
                .write_all(&man_page(cmd))
                .map_err(|e| format!("cannot write to stdout: {e}")),
            DocCommand::Man { dir: Some(dir) } => write_man_pages(cmd, dir).map(|written| {
                for p in written {
                    eprintln!("{name}: wrote {}", p.display());
                }
            }),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: error: {e}");
                ExitCode::from(3)
            }
        }
    }
}

/// For a binary without subcommands: when the first argument is `completions` or `man`, parses
/// the arguments as [`DocCommand`], runs it for `cmd()` and returns the exit status; otherwise
/// `None`, and the binary parses its own command line as usual.
pub fn intercept(cmd: impl FnOnce() -> Command) -> Option<ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    intercept_from(cmd, args)
}

/// [`intercept`] with the arguments given (the first is the program name).
pub fn intercept_from(
    cmd: impl FnOnce() -> Command,
    args: Vec<std::ffi::OsString>,
) -> Option<ExitCode> {
    let first = args.get(1)?.to_str()?;
    if !matches!(first, "completions" | "man") {
        return None;
    }
    let cmd = cmd();
    let parser = <DocCommand as clap::Subcommand>::augment_subcommands(
        Command::new("doc")
            .bin_name(cmd.get_name().to_string())
            .subcommand_required(true)
            .disable_help_subcommand(true),
    );
    let matches = match parser.try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => e.exit(),
    };
    let doc = match <DocCommand as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(d) => d,
        Err(e) => e.exit(),
    };
    Some(doc.run(cmd))
}

/// The completion script of `cmd` for `shell`.
pub fn completions(mut cmd: Command, shell: Shell) -> String {
    let name = cmd.get_name().to_string();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The man page of `cmd` itself (roff).
pub fn man_page(cmd: Command) -> Vec<u8> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut buf)
        .expect("rendering into memory does not fail");
    buf
}

/// Every man page: `(file name, roff)` for `cmd` (`BIN.1`) and each visible subcommand,
/// recursively (`BIN-<sub>.1`, `BIN-<sub>-<subsub>.1`), `cmd` first.
pub fn man_pages(mut cmd: Command) -> Vec<(String, Vec<u8>)> {
    cmd.build();
    let mut out = Vec::new();
    collect_pages(&cmd, &mut out);
    out
}

fn collect_pages(cmd: &Command, out: &mut Vec<(String, Vec<u8>)>) {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut buf = Vec::new();
    man.render(&mut buf)
        .expect("rendering into memory does not fail");
    out.push((man.get_filename(), buf));
    for sub in visible_subcommands(cmd) {
        collect_pages(sub, out);
    }
}

/// Writes [`man_pages`] into `dir` (created if needed); returns the paths written.
pub fn write_man_pages(cmd: Command, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for (name, roff) in man_pages(cmd) {
        let path = dir.join(name);
        std::fs::write(&path, roff).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// What the generated documents fail to mention, one line each; empty when the bash, zsh and
/// fish completions are non-empty and name every visible subcommand and every visible flag
/// (long and short) of `cmd` and its subcommands, and the man pages do too (each subcommand
/// in its parent's page as `BIN-<sub>(1)`, each flag in its command's page). `--help` and `--version` count as
/// flags like any other.
pub fn missing_mentions(cmd: &Command) -> Vec<String> {
    let scripts: Vec<(Shell, String)> = [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|sh| (sh, completions(cmd.clone(), sh)))
        .collect();
    missing_in(cmd, &scripts, &man_pages(cmd.clone()))
}

/// [`missing_mentions`] for documents given: completion scripts by shell, man pages by file name.
pub fn missing_in(
    cmd: &Command,
    scripts: &[(Shell, String)],
    pages: &[(String, Vec<u8>)],
) -> Vec<String> {
    let mut cmd = cmd.clone();
    cmd.build();
    let mut problems = Vec::new();
    for (shell, script) in scripts {
        let shell = *shell;
        if script.trim().is_empty() {
            problems.push(format!("{shell} completions are empty"));
            continue;
        }
        walk(&cmd, &mut |path, c| {
            for sub in visible_subcommands(c) {
                if !mentions_word(script, sub.get_name()) {
                    problems.push(format!(
                        "{shell} completions do not mention subcommand `{path} {}`",
                        sub.get_name()
                    ));
                }
            }
            for (long, short) in visible_flags(c) {
                let found_long = long.as_ref().is_none_or(|l| match shell {
                    Shell::Fish => script.contains(&format!("-l {l}")),
                    _ => mentions_word(script, &format!("--{l}")),
                });
                let found_short = short.is_none_or(|s| match shell {
                    Shell::Fish => script.contains(&format!("-s {s}")),
                    _ => mentions_word(script, &format!("-{s}")),
                });
                if !found_long || !found_short {
                    problems.push(format!(
                        "{shell} completions do not mention `{path}` flag {}",
                        describe(&long, short)
                    ));
                }
            }
        });
    }
    let page_of = |display: &str| -> Option<String> {
        let want = format!("{display}.1");
        pages
            .iter()
            .find(|(n, _)| *n == want)
            .map(|(_, roff)| roff_text(roff))
    };
    walk(&cmd, &mut |path, c| {
        let display = c.get_display_name().unwrap_or(c.get_name()).to_string();
        let Some(page) = page_of(&display) else {
            problems.push(format!("no man page {display}.1 for `{path}`"));
            return;
        };
        if page.trim().is_empty() {
            problems.push(format!("man page {display}.1 is empty"));
        }
        for sub in visible_subcommands(c) {
            // Listed as `BIN-<sub>(1)`, the subcommand's own page.
            let sub_page = sub.get_display_name().unwrap_or(sub.get_name());
            if !mentions_word(&page, sub_page) {
                problems.push(format!(
                    "man page {display}.1 does not mention subcommand `{}` ({sub_page}(1))",
                    sub.get_name()
                ));
            }
        }
        for (long, short) in visible_flags(c) {
            let found_long = long
                .as_ref()
                .is_none_or(|l| mentions_word(&page, &format!("--{l}")));
            let found_short = short.is_none_or(|s| mentions_word(&page, &format!("-{s}")));
            if !found_long || !found_short {
                problems.push(format!(
                    "man page {display}.1 does not mention flag {}",
                    describe(&long, short)
                ));
            }
        }
    });
    problems
}

/// The words of a roff page: hyphens unescaped (`\-`), font changes (`\fB`, `\fR`, …) removed.
fn roff_text(roff: &[u8]) -> String {
    let text = String::from_utf8_lossy(roff).replace("\\-", "-");
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.peek() == Some(&'f') {
            chars.next();
            chars.next();
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

fn describe(long: &Option<String>, short: Option<char>) -> String {
    match (long, short) {
        (Some(l), Some(s)) => format!("-{s}/--{l}"),
        (Some(l), None) => format!("--{l}"),
        (None, Some(s)) => format!("-{s}"),
        (None, None) => "(positional)".into(),
    }
}

/// Calls `f(path, command)` for `cmd` and each visible subcommand, recursively; `path` is the
/// command line that reaches it (`unitgen apply`).
fn walk(cmd: &Command, f: &mut dyn FnMut(&str, &Command)) {
    fn go(cmd: &Command, path: String, f: &mut dyn FnMut(&str, &Command)) {
        f(&path, cmd);
        for sub in visible_subcommands(cmd) {
            go(sub, format!("{path} {}", sub.get_name()), f);
        }
    }
    go(cmd, cmd.get_name().to_string(), f);
}

fn visible_subcommands(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

/// The visible flags of `cmd` (not positionals): (long name, short name).
fn visible_flags(cmd: &Command) -> Vec<(Option<String>, Option<char>)> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_positional())
        .map(|a| (a.get_long().map(str::to_string), a.get_short()))
        .collect()
}

/// Whether `needle` occurs in `text` not as part of a longer name: the characters around it
/// are not letters, digits, `-` or `_` (so `--host` is not found in `--hosts`).
fn mentions_word(text: &str, needle: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut from = 0;
    while let Some(i) = text[from..].find(needle) {
        let start = from + i;
        let end = start + needle.len();
        let before = text[..start].chars().next_back();
        let after = text[end..].chars().next();
        if !before.is_some_and(is_name) && !after.is_some_and(is_name) {
            return true;
        }
        from = start + 1;
        while !text.is_char_boundary(from) {
            from += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn sample() -> Command {
        Command::new("demo")
            .version("1.0")
            .arg(
                Arg::new("verbose")
                    .long("verbose")
                    .short('v')
                    .action(ArgAction::SetTrue),
            )
            .subcommand(
                Command::new("serve")
                    .about("Serve")
                    .arg(Arg::new("port").long("listen-port").value_name("PORT")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn a_complete_command_is_fully_mentioned() {
        assert_eq!(missing_mentions(&sample()), Vec::<String>::new());
    }

    #[test]
    fn man_pages_cover_visible_subcommands_only() {
        let names: Vec<String> = man_pages(sample()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["demo.1", "demo-serve.1"]);
    }

    #[test]
    fn words_are_matched_whole() {
        assert!(mentions_word("a --host b", "--host"));
        assert!(mentions_word("'--host=[x]'", "--host"));
        assert!(!mentions_word("a --hosts b", "--host"));
        assert!(!mentions_word("a --no-host", "--host"));
        assert!(mentions_word("(apply)", "apply"));
    }

    #[test]
    fn the_check_names_what_is_missing() {
        let cmd = sample();
        let without_port = |s: String| s.replace("listen-port", "lp");
        let scripts = vec![
            (
                Shell::Bash,
                without_port(completions(cmd.clone(), Shell::Bash)),
            ),
            (Shell::Fish, String::new()),
        ];
        let mut pages = man_pages(cmd.clone());
        pages.retain(|(n, _)| n != "demo-serve.1");
        assert_eq!(
            missing_in(&cmd, &scripts, &pages),
            [
                "bash completions do not mention `demo serve` flag --listen-port",
                "fish completions are empty",
                "no man page demo-serve.1 for `demo serve`",
            ]
        );
        // Walking finds nested subcommands and their flags.
        let nested = Command::new("n").subcommand(
            Command::new("a").subcommand(Command::new("b").arg(Arg::new("x").long("deep-flag"))),
        );
        assert_eq!(missing_mentions(&nested), Vec::<String>::new());
        let mut seen = Vec::new();
        walk(&nested, &mut |p, _| seen.push(p.to_string()));
        assert_eq!(seen, ["n", "n a", "n a b"]);
    }

    #[test]
    fn intercept_leaves_other_arguments_alone() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect();
        assert!(intercept_from(sample, args(&["demo", "--verbose"])).is_none());
        assert!(intercept_from(sample, args(&["demo"])).is_none());
        assert!(intercept_from(sample, args(&["demo", "serve"])).is_none());
    }

    #[test]
    fn man_pages_are_written_into_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_man_pages(sample(), &dir.path().join("man1")).unwrap();
        assert_eq!(written.len(), 2);
        let main = std::fs::read_to_string(dir.path().join("man1/demo.1")).unwrap();
        assert!(main.contains(".TH demo 1"), "{main}");
    }
}
