//! One presence per `--state-file`: an exclusive `flock` on `<state-file>.lock`, held for the
//! life of the process and taken before presence touches Docker or etcd.
//!
//! Two presences given the same state file would each revoke the lease the other recorded there
//! (each reads it as its predecessor's), taking the other's entries out of every proxy. The lock
//! is on a sibling file, not on the state file itself: the state file is replaced by a rename at
//! every lease grant and removed on a clean stop, so a lock on it would be on an inode that the
//! next presence never opens. The lock file is never removed (removing it would let a third
//! process lock a new inode while the second still holds the old one); it is a lock only while a
//! live process holds the `flock`, which the kernel drops when the process exits however it
//! exits, so a file left by a dead presence blocks nobody. The holder writes its pid into it,
//! for the refusal message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct StateLock {
    _flock: Flock<File>,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "--state-file {state}: in use by another presence ({holder}), which holds the lock {lock}; \
         two presences with one state file revoke each other's lease. Stop that presence, or give \
         this one its own --state-file",
        state = state.display(),
        lock = lock.display(),
        holder = match pid { Some(p) => format!("pid {p}"), None => "pid not yet written".to_owned() }
    )]
    Held {
        state: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
    #[error("--state-file {state}: cannot lock {lock}: {source}", state = state.display(), lock = lock.display())]
    Io {
        state: PathBuf,
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `<state-file>.lock`, beside the state file.
pub fn lock_path(state_file: &Path) -> PathBuf {
    let mut name = state_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "presence-state".into());
    name.push(".lock");
    state_file.with_file_name(name)
}

/// Takes the lock without waiting (LOCK_EX | LOCK_NB) and writes this process's pid into it.
pub fn acquire(state_file: &Path) -> Result<StateLock, LockError> {
    let lock = lock_path(state_file);
    let io = |source: std::io::Error| LockError::Io {
        state: state_file.to_owned(),
        lock: lock.clone(),
        source,
    };
    // Not truncated on open: the holder's pid must survive a refused second open.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&lock)
        .map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => {
            let mut f: &File = &held;
            f.set_len(0).map_err(io)?;
            f.write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(io)?;
            Ok(StateLock {
                _flock: held,
                path: lock.clone(),
            })
        }
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Err(LockError::Held {
                state: state_file.to_owned(),
                lock: lock.clone(),
                pid: text.trim().parse().ok(),
            })
        }
        Err((_, errno)) => Err(io(std::io::Error::from(errno))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_a_sibling_and_excludes_a_second_holder_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        assert_eq!(lock_path(&state), dir.path().join("state.json.lock"));

        let first = acquire(&state).expect("first");
        assert_eq!(first.path, dir.path().join("state.json.lock"));
        let pid = std::process::id();
        assert_eq!(
            std::fs::read_to_string(&first.path).unwrap(),
            format!("{pid}\n")
        );
        // flock locks belong to the open file description, so a second open in this very
        // process conflicts just as another process's would.
        match acquire(&state) {
            Err(e @ LockError::Held { pid: Some(p), .. }) if p == pid => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("pid {pid}")) && msg.contains("state.json.lock"),
                    "{msg}"
                );
            }
            other => panic!("second lock: {other:?}"),
        }
        // The refused attempt left the holder's pid alone.
        assert_eq!(
            std::fs::read_to_string(&first.path).unwrap(),
            format!("{pid}\n")
        );
        drop(first);
        // The file stays behind and blocks nobody.
        let again = acquire(&state).expect("after release");
        drop(again);
        assert!(dir.path().join("state.json.lock").exists());
        // The state file itself is not touched.
        assert!(!state.exists());
    }

    #[test]
    fn an_unusable_directory_is_an_error_naming_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("missing").join("state.json");
        let e = acquire(&state).expect_err("no directory").to_string();
        assert!(
            e.contains("cannot lock") && e.contains("state.json.lock"),
            "{e}"
        );
    }
}
