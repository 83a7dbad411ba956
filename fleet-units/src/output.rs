//! Writing the generated tree: atomic per file, unchanged files left alone, and generated files
//! that are no longer produced removed (so an instance that moved to another host does not keep
//! running on the old one). Files unitgen did not generate are never touched.

use crate::app::OutFile;
use crate::error::Error;
use crate::render::GENERATED_MARK;
use flotilla_registry::atomic;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// What a write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Files created or changed.
    pub written: Vec<String>,
    /// Files already up to date.
    pub unchanged: usize,
    /// Stale generated files removed.
    pub removed: Vec<String>,
}

/// Writes `content` to `path` atomically ([`flotilla_registry::atomic`]: a staged file of its
/// own in the same directory, fsync, rename, directory fsync), so a reader never sees half a
/// file and two unitgen runs writing the same file at once do not collide (the last rename
/// wins). Creates the directory. Returns `false` when the file already had this content.
pub fn write_atomic(path: &Path, content: &str) -> Result<bool, Error> {
    if fs::read(path).ok().as_deref() == Some(content.as_bytes()) {
        return Ok(false);
    }
    let dir = atomic::parent_dir(path);
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    atomic::write_atomic(
        path,
        content.as_bytes(),
        &atomic::Options::tagged("unitgen"),
    )
    .map_err(|e| Error::io(path, e.into()))?;
    Ok(true)
}

fn is_generated(path: &Path) -> bool {
    fs::read_to_string(path).is_ok_and(|t| t.starts_with(GENERATED_MARK))
}

/// Writes every file under `dir` and removes generated `.service` and `.container` files (in `dir` and its direct
/// subdirectories) that are not in `files`; host directories left empty are removed too.
pub fn write_tree(dir: &Path, files: &[OutFile]) -> Result<WriteReport, Error> {
    let mut report = WriteReport::default();
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let wanted: BTreeSet<PathBuf> = files.iter().map(|f| dir.join(&f.path)).collect();
    for f in files {
        if write_atomic(&dir.join(&f.path), &f.content)? {
            report.written.push(f.path.clone());
        } else {
            report.unchanged += 1;
        }
    }
    let mut dirs = vec![(dir.to_path_buf(), String::new())];
    let top = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut entries: Vec<PathBuf> = top.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in &entries {
        if p.is_dir() {
            let rel = p
                .file_name()
                .map(|n| format!("{}/", n.to_string_lossy()))
                .unwrap_or_default();
            dirs.push((p.clone(), rel));
        }
    }
    for (d, rel) in &dirs {
        let mut list: Vec<PathBuf> = fs::read_dir(d)
            .map_err(|e| Error::io(d, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        list.sort();
        for p in list {
            let is_unit = p
                .extension()
                .is_some_and(|e| e == "service" || e == "container");
            if is_unit && p.is_file() && !wanted.contains(&p) && is_generated(&p) {
                fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                report.removed.push(format!("{rel}{name}"));
            }
        }
        if !rel.is_empty() && fs::read_dir(d).is_ok_and(|mut it| it.next().is_none()) {
            let _ = fs::remove_dir(d);
        }
    }
    Ok(report)
}

/// The files as one text for stdout: `==> path <==` before each (like `head` with many files).
pub fn listing(files: &[OutFile]) -> String {
    let mut out = String::new();
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("==> {} <==\n{}", f.path, f.content));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str) -> OutFile {
        OutFile {
            path: path.into(),
            content: content.into(),
        }
    }

    #[test]
    fn writes_replaces_and_removes_only_generated_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let gen = format!("{GENERATED_MARK} from s.yaml\n");
        let first = vec![file("a/web@1.service", &gen), file("b/web@2.service", &gen)];
        let r = write_tree(d, &first).unwrap();
        assert_eq!(r.written.len(), 2);
        fs::write(d.join("b/mine.service"), "[Unit]\n").unwrap();
        fs::write(d.join("notes.txt"), "keep").unwrap();
        // web@2 moves from b to a.
        let second = vec![file("a/web@1.service", &gen), file("a/web@2.service", &gen)];
        let r = write_tree(d, &second).unwrap();
        assert_eq!(r.written, vec!["a/web@2.service".to_string()]);
        assert_eq!(r.unchanged, 1);
        assert_eq!(r.removed, vec!["b/web@2.service".to_string()]);
        assert!(
            d.join("b/mine.service").exists(),
            "a hand-written unit is kept"
        );
        assert!(d.join("notes.txt").exists());
        // With b/ holding only generated files, it disappears when emptied.
        fs::remove_file(d.join("b/mine.service")).unwrap();
        let r = write_tree(d, &[file("a/web@1.service", &gen)]).unwrap();
        assert_eq!(r.removed, vec!["a/web@2.service".to_string()]);
        assert!(!d.join("b").exists());
    }

    #[test]
    fn listing_format() {
        let text = listing(&[file("x", "1\n"), file("y", "2\n")]);
        assert_eq!(text, "==> x <==\n1\n\n==> y <==\n2\n");
    }
}
