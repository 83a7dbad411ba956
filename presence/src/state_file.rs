//! `--state-file`: the lease id of the running presence, so its successor can revoke it at once.
//!
//! Written atomically ([`flotilla_registry::atomic`]: a staged file of its own in the same
//! directory, fsync, rename, directory fsync). A missing file means no
//! predecessor; an unreadable or malformed one is reported and ignored (its lease then simply
//! expires).

use std::fs;
use std::path::{Path, PathBuf};

use flotilla_registry::atomic::{write_atomic, Options};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The etcd lease id.
    pub lease: i64,
    /// The node it belongs to.
    pub node: String,
    /// The presence process that held it.
    pub pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("--state-file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--state-file {path}: not a presence state file: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// Reads the state file; `Ok(None)` if there is none.
pub fn read(path: &Path) -> Result<Option<State>, StateFileError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateFileError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| StateFileError::Malformed {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Writes the state file atomically.
pub fn write(path: &Path, state: &State) -> Result<(), StateFileError> {
    let mut body = serde_json::to_vec(state).expect("state serialises");
    body.push(b'\n');
    write_atomic(path, &body, &Options::tagged("presence")).map_err(|e| StateFileError::Io {
        path: path.to_owned(),
        source: e.into(),
    })
}

/// Removes the state file (after a clean revoke).
pub fn remove(path: &Path) -> Result<(), StateFileError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateFileError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("presence.state");
        assert!(read(&path).unwrap().is_none());
        let st = State {
            lease: 0x7a3c_0000_1234,
            node: "node-a".into(),
            pid: 42,
        };
        write(&path, &st).unwrap();
        assert_eq!(read(&path).unwrap(), Some(st));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
        fs::write(&path, "garbage").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(
            e.contains("--state-file") && e.contains("presence.state"),
            "{e}"
        );
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(!path.exists());
    }
}
