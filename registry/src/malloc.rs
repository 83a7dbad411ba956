//! One glibc malloc arena for a daemon's whole process.
//!
//! glibc gives each thread that allocates an arena of its own (up to 8 per core). Memory freed
//! in one arena is reused only by the threads of that arena, so a process whose work moves
//! between threads (a listing decoded on the runtime's worker, the view built on the main
//! thread, first renders spread over every core) holds the peak of each arena at once. For
//! confgen at 10,000 endpoints that was 3.7 MB of its 35 MB peak (docs/BENCHMARKS.md); with one
//! arena it is reused. The cost is a lock that the threads share, which the daemons (one worker
//! thread, bursts of parallel work at start) do not feel.
//!
//! glibc reads the limit (`MALLOC_ARENA_MAX`) from the environment when its allocator starts,
//! before `main`; the workspace forbids `unsafe` (so no `mallopt`). [`use_one_arena`] therefore
//! re-executes the process once, the same binary with the same arguments, with
//! `MALLOC_ARENA_MAX=1` set. The re-executed process takes the variable out of its environment
//! again, so the commands it runs (check and reload commands) start with glibc's defaults. An
//! operator who sets `MALLOC_ARENA_MAX` (or `GLIBC_TUNABLES`) keeps that choice, and
//! `FLOTILLA_MALLOC_ARENAS=default` turns the re-execution off.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

/// Marks the environment of the re-executed process: the variable is ours, not the operator's.
const MARK: &str = "FLOTILLA_MALLOC_ARENA_SET";
/// glibc's limit on the number of arenas.
const ARENA_MAX: &str = "MALLOC_ARENA_MAX";
/// `default` here leaves glibc's defaults alone.
const OPT_OUT: &str = "FLOTILLA_MALLOC_ARENAS";

/// What [`use_one_arena`] should do, from the environment it started with.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Re-execute with one arena.
    Reexec,
    /// This is the re-executed process: take our variables out of the environment.
    Unmark,
    /// The operator chose (a limit, tunables, or the opt-out): do nothing.
    Leave,
}

fn step(var: &dyn Fn(&str) -> Option<OsString>) -> Step {
    if var(MARK).is_some() {
        Step::Unmark
    } else if var(ARENA_MAX).is_some()
        || var("GLIBC_TUNABLES").is_some()
        || var(OPT_OUT).is_some_and(|v| v == "default")
    {
        Step::Leave
    } else {
        Step::Reexec
    }
}

/// Makes this process use one malloc arena (see the module's doc). Call it first in `main`,
/// before any thread exists. Returns only in the process that goes on: after a failed
/// re-execution (the process carries on with glibc's defaults), or in the re-executed process.
pub fn use_one_arena() {
    match step(&|k| std::env::var_os(k)) {
        Step::Leave => {}
        Step::Unmark => {
            // Single-threaded still: nothing reads the environment concurrently.
            std::env::remove_var(MARK);
            std::env::remove_var(ARENA_MAX);
        }
        Step::Reexec => {
            let mut args = std::env::args_os();
            let argv0 = args.next().unwrap_or_default();
            // /proc/self/exe is this very binary, even if its path was replaced since.
            let _failed = std::process::Command::new("/proc/self/exe")
                .arg0(argv0)
                .args(args)
                .env(ARENA_MAX, "1")
                .env(MARK, "1")
                .exec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn reexecutes_only_when_nobody_chose() {
        assert_eq!(step(&env(&[])), Step::Reexec);
        assert_eq!(step(&env(&[(MARK, "1"), (ARENA_MAX, "1")])), Step::Unmark);
        assert_eq!(step(&env(&[(ARENA_MAX, "4")])), Step::Leave);
        assert_eq!(
            step(&env(&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")])),
            Step::Leave
        );
        assert_eq!(step(&env(&[(OPT_OUT, "default")])), Step::Leave);
        assert_eq!(step(&env(&[(OPT_OUT, "one")])), Step::Reexec);
    }
}
