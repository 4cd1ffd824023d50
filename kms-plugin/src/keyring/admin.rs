//! The `kms-plugin keyring ...` commands: each takes an exclusive lock on
//! `<keyring>.lock`, reads the file, edits it, and writes it atomically.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::file::{self, KeyringFile, KeyringFileError, WriteMode};
use super::{KekInfo, Keyring};
use crate::backend::KekSet;

/// Holds `<keyring>.lock` while an edit runs, so two edits never interleave.
struct EditLock {
    _lock: Flock<std::fs::File>,
}

fn lock(path: &Path) -> Result<EditLock, KeyringFileError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let err = |source| KeyringFileError::Write {
        path: lock_path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(err)?;
    let lock =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| err(errno.into()))?;
    Ok(EditLock { _lock: lock })
}

/// `keyring init`: a new keyring with one primary KEK. Returns its key_id.
pub fn init(path: &Path) -> Result<String, KeyringFileError> {
    let _lock = lock(path)?;
    if path.exists() {
        return Err(KeyringFileError::AlreadyExists(path.to_owned()));
    }
    let keyring = KeyringFile::new_with_primary();
    file::write_atomic(path, &keyring.to_bytes(), WriteMode::CreateNew)?;
    Ok(Keyring::load(path)?.key_id().to_owned())
}

fn edit<T>(
    path: &Path,
    change: impl FnOnce(&mut KeyringFile) -> Result<T, KeyringFileError>,
) -> Result<(T, Keyring), KeyringFileError> {
    let _lock = lock(path)?;
    let raw = file::read_raw(path)?;
    let mut keyring = KeyringFile::parse(path, &raw.bytes)?;
    let out = change(&mut keyring)?;
    let bytes = keyring.to_bytes();
    // Re-parse what we are about to write: never write a keyring we would refuse.
    let snapshot = Keyring::from_raw(
        path,
        &file::RawKeyring {
            digest: [0; 32],
            bytes: bytes.clone(),
        },
    )?;
    file::write_atomic(path, &bytes, WriteMode::Replace)?;
    Ok((out, snapshot))
}

/// `keyring rotate`: adds a KEK and makes it primary. Returns the new key_id.
pub fn rotate(path: &Path) -> Result<String, KeyringFileError> {
    let ((), keyring) = edit(path, |k| {
        k.add(true);
        Ok(())
    })?;
    Ok(keyring.key_id().to_owned())
}

/// `keyring add`: adds a decrypt-only KEK (to promote later). Returns its number.
pub fn add(path: &Path) -> Result<u32, KeyringFileError> {
    Ok(edit(path, |k| Ok(k.add(false)))?.0)
}

/// `keyring promote`: makes KEK `number` primary. Returns its new key_id.
pub fn promote(path: &Path, number: u32) -> Result<String, KeyringFileError> {
    let ((), keyring) = edit(path, |k| k.promote(path, number))?;
    Ok(keyring.key_id().to_owned())
}

/// `keyring retire`: removes decrypt-only KEK `number`.
pub fn retire(path: &Path, number: u32) -> Result<(), KeyringFileError> {
    edit(path, |k| k.retire(path, number)).map(|_| ())
}

/// What `keyring list` shows: generation and KEKs, no key bytes.
#[derive(Debug, serde::Serialize)]
pub struct Listing {
    /// The file's generation.
    pub generation: u64,
    /// The primary KEK's number.
    pub primary: u32,
    /// The primary KEK's current key_id.
    pub key_id: String,
    /// Every KEK.
    pub keks: Vec<KekInfo>,
}

/// `keyring list`.
pub fn list(path: &Path) -> Result<Listing, KeyringFileError> {
    let keyring = Keyring::load(path)?;
    let primary = keyring
        .infos()
        .iter()
        .find(|i| i.state == "primary")
        .map(|i| i.kek)
        .unwrap_or(0);
    Ok(Listing {
        generation: keyring.generation(),
        primary,
        key_id: keyring.key_id().to_owned(),
        keks: keyring.infos().to_vec(),
    })
}

impl Listing {
    /// The human table.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "generation {}; primary KEK {}; key_id {}\n",
            self.generation, self.primary, self.key_id
        );
        let _ = writeln!(out, "{:<5} {:<13} {:<21} KEY_ID", "KEK", "STATE", "CREATED");
        for k in &self.keks {
            let _ = writeln!(
                out,
                "{:<5} {:<13} {:<21} {}",
                k.kek,
                k.state,
                k.created,
                k.key_id.as_deref().unwrap_or("-")
            );
            for old in k.key_ids.iter().rev().skip(1) {
                let _ = writeln!(out, "{:<41} {old} (earlier)", "");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn commands_edit_the_file_in_place_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let first = init(&path).unwrap();
        assert!(matches!(
            init(&path),
            Err(KeyringFileError::AlreadyExists(_))
        ));
        let second = rotate(&path).unwrap();
        assert_ne!(first, second);
        assert_eq!(add(&path).unwrap(), 3);
        let again = promote(&path, 1).unwrap();
        assert!(again != first && again != second);
        retire(&path, 2).unwrap();
        let listing = list(&path).unwrap();
        assert_eq!(listing.generation, 5);
        assert_eq!(listing.primary, 1);
        assert_eq!(listing.keks[0].key_ids, vec![first, again.clone()]);
        assert_eq!(listing.key_id, again);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = listing.to_text();
        assert!(
            text.contains("primary") && text.contains("decrypt-only"),
            "{text}"
        );
    }
}
