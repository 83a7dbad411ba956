//! `--state-file`: the lease id of the running presence, so its successor can revoke it at once.
//!
//! Written atomically (temp file in the same directory, fsync, rename). A missing file means no
//! predecessor; an unreadable or malformed one is reported and ignored (its lease then simply
//! expires).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    let io = |source| StateFileError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path).map_err(io)?;
    let body = serde_json::to_vec(state).expect("state serialises");
    tmp.1.write_all(&body).map_err(io)?;
    tmp.1.write_all(b"\n").map_err(io)?;
    tmp.1.sync_all().map_err(io)?;
    fs::rename(&tmp.0, path).map_err(io)?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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

fn tempfile_in(dir: &Path, target: &Path) -> std::io::Result<(PathBuf, fs::File)> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "presence-state".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let file = fs::File::create(&tmp)?;
    Ok((tmp, file))
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
