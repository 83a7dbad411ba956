//! Sets `FLOTILLA_BUILD_COMMIT` for `flotilla_build_info`: the environment's
//! `FLOTILLA_BUILD_COMMIT` if set (a packager building from a tarball), else
//! `git rev-parse --short HEAD` when the source is a git checkout and git answers, else
//! `unknown`. Never fails the build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=FLOTILLA_BUILD_COMMIT");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let commit = std::env::var("FLOTILLA_BUILD_COMMIT")
        .ok()
        .filter(|c| valid(c))
        .or_else(|| from_git(&dir))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=FLOTILLA_BUILD_COMMIT={commit}");
}

/// A commit as a label value: 4 to 64 of `[0-9A-Za-z._-]`.
fn valid(c: &str) -> bool {
    (4..=64).contains(&c.len())
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// The short commit of HEAD. Asks cargo to run this again when HEAD moves (a commit, a
/// checkout), through the files git keeps it in: watched whenever git knows a repository here,
/// so a first commit, or a fix to a git that did not answer, is noticed too.
fn from_git(dir: &Path) -> Option<String> {
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &name]) {
            let path = dir.join(path);
            // A path that does not exist would make cargo run this on every build.
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    // The source must be this checkout's (not a tarball unpacked inside another repository).
    git(dir, &["ls-files", "--error-unmatch", "build.rs"])?;
    git(dir, &["rev-parse", "--short", "HEAD"]).filter(|c| valid(c))
}
