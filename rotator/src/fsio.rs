//! Atomic file replacement: a temp file in the same folder, written with mode
//! 0600, fsynced, renamed over the target, and the folder fsynced. The
//! previous file is kept as `<name>.bak` (also 0600). Writing the content a
//! file already has does nothing, so a resumed stage never replaces a good
//! backup with a copy of the new file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A write that failed; names the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// What [`replace`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The file already had this content.
    Unchanged,
    /// The file was replaced (the old one is at `.bak`) or created.
    Replaced,
}

/// The backup path of `path`.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".bak");
    path.with_file_name(name)
}

fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // The umask cannot widen 0600, but a pre-set ACL could: set it explicitly.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` atomically (mode 0600), keeping the previous
/// content at `<path>.bak`.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<Written, WriteError> {
    let err = |source| WriteError {
        path: path.to_owned(),
        source,
    };
    let old = match fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(e)),
    };
    if old.as_deref() == Some(bytes) {
        return Ok(Written::Unchanged);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(old) = &old {
        let bak = backup_path(path);
        let tmp = dir.join(format!(".{name}.bak.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        write_new(&tmp, old).map_err(err)?;
        fs::rename(&tmp, &bak).map_err(err)?;
    }
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    if let Err(e) = write_new(&tmp, bytes) {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    fs::rename(&tmp, path).map_err(err)?;
    sync_dir(&dir).map_err(err)?;
    Ok(Written::Replaced)
}

/// Writes `path` atomically (mode 0600) without keeping a backup: for the
/// rotator's own state file, which is rewritten often.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let err = |source| WriteError {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    if let Err(e) = write_new(&tmp, bytes) {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    fs::rename(&tmp, path).map_err(err)?;
    sync_dir(&dir).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_atomically_with_backup_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("enc.yaml");
        assert_eq!(replace(&p, b"one").unwrap(), Written::Replaced);
        assert!(!backup_path(&p).exists());
        assert_eq!(replace(&p, b"two").unwrap(), Written::Replaced);
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read(backup_path(&p)).unwrap(), b"one");
        for f in [&p, &backup_path(&p)] {
            assert_eq!(fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600);
        }
        // Same content again: nothing changes, the backup keeps the older file.
        assert_eq!(replace(&p, b"two").unwrap(), Written::Unchanged);
        assert_eq!(fs::read(backup_path(&p)).unwrap(), b"one");
        // No temp files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn names_the_file_on_error() {
        let e = replace(Path::new("/nonexistent-dir/x.yaml"), b"x").unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x.yaml"));
    }
}
