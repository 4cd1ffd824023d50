//! The rotator's file writes, through the project's one atomic writer
//! ([`atomic_file`]). Every file the rotator writes holds keys or decides
//! which keys are used, so every write is 0600; EncryptionConfigurations and
//! keyring copies keep the previous content as `<name>.prev` (0600). Writing
//! the content a file already has does nothing, so a resumed stage never
//! replaces a good backup with a copy of the new file.

use std::path::Path;

use atomic_file::Options;
pub use atomic_file::{WriteError, Written, backup_path};

/// Replaces `path` with `bytes` atomically (mode 0600), keeping the previous
/// content at `<path>.prev`.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<Written, WriteError> {
    atomic_file::write(path, bytes, &Options::secret_with_backup())
}

/// Writes `path` atomically (mode 0600) without keeping a backup: for the
/// rotator's own state file, which is rewritten often.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    atomic_file::write(path, bytes, &Options::secret()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn configs_keep_a_0600_prev_and_state_files_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("enc.yaml");
        assert_eq!(replace(&p, b"one").unwrap(), Written::Created);
        assert_eq!(replace(&p, b"two").unwrap(), Written::Replaced);
        assert_eq!(fs::read(backup_path(&p)).unwrap(), b"one");
        assert!(backup_path(&p).to_string_lossy().ends_with("enc.yaml.prev"));
        for f in [&p, &backup_path(&p)] {
            assert_eq!(fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(replace(&p, b"two").unwrap(), Written::Unchanged);
        let s = dir.path().join("state.json");
        write_atomic(&s, b"1").unwrap();
        write_atomic(&s, b"2").unwrap();
        assert!(!backup_path(&s).exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn names_the_file_on_error() {
        let e = replace(Path::new("/nonexistent-dir/x.yaml"), b"x").unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x.yaml"));
    }
}
