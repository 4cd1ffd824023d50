//! The edits behind `kms-plugin keyring ...`: each takes an exclusive lock on
//! `<keyring>.lock`, reads the file, edits it, checks that the result is a
//! keyring it would load and a successor of the old one, and writes it
//! atomically (0600, the old file kept as `<keyring>.prev`).
//!
//! A keyring path that is a symlink is edited where it leads: the target is
//! replaced, the link stays, and the lock and `.prev` sit beside the target.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use atomic_file::{Options, Written};
use nix::fcntl::{Flock, FlockArg};

use crate::file::{EditError, KeyringFile};
use crate::listing::Listing;
use crate::successor::check_successor;
use crate::{KeyringError, read_raw};

/// Holds `<keyring>.lock` while an edit runs, so two edits never interleave.
#[derive(Debug)]
pub struct EditLock {
    _lock: Flock<std::fs::File>,
}

/// Takes the edit lock of the keyring at `path` (already resolved).
fn lock(path: &Path) -> Result<EditLock, KeyringError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let err = |source| KeyringError::Lock {
        path: lock_path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(err)?;
    let lock =
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| err(errno.into()))?;
    Ok(EditLock { _lock: lock })
}

fn resolve(path: &Path) -> Result<PathBuf, KeyringError> {
    atomic_file::resolve(path).map_err(|source| KeyringError::Read {
        path: path.to_owned(),
        source: atomic_file::ReadError::Io {
            path: path.to_owned(),
            source,
        },
    })
}

fn edit_err(path: &Path) -> impl Fn(EditError) -> KeyringError + '_ {
    move |e| KeyringError::Edit {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// `keyring init`: a new keyring with a fresh lineage and one primary KEK.
/// Refuses to overwrite anything, and refuses while an earlier keyring's
/// `.prev` is beside the path (a plugin would judge the new keyring against
/// it). Returns its listing.
pub fn init(path: &Path) -> Result<Listing, KeyringError> {
    let target = resolve(path)?;
    let _lock = lock(&target)?;
    let prev = atomic_file::backup_path(&target);
    if std::fs::symlink_metadata(&target).is_err() && std::fs::symlink_metadata(&prev).is_ok() {
        // A plugin judges a start against `.prev`: a new lineage beside an
        // old keyring's `.prev` would be refused at the next restart.
        return Err(KeyringError::Edit {
            path: path.to_owned(),
            reason: format!(
                "{} is left from an earlier keyring; a plugin would refuse the new keyring against it: move it away first",
                prev.display()
            ),
        });
    }
    let keyring = KeyringFile::new_with_primary().map_err(edit_err(path))?;
    match atomic_file::write(&target, &keyring.to_bytes(), &Options::secret_new()) {
        Ok(_) => Ok(Listing::of(&keyring)),
        Err(e) if e.is_already_exists() => Err(KeyringError::AlreadyExists(path.to_owned())),
        Err(e) => Err(e.into()),
    }
}

fn edit<T>(
    path: &Path,
    change: impl FnOnce(&mut KeyringFile) -> Result<T, EditError>,
) -> Result<(T, Listing), KeyringError> {
    let target = resolve(path)?;
    let _lock = lock(&target)?;
    let raw = read_raw(&target)?;
    let mut keyring = KeyringFile::parse(path, &raw.bytes)?;
    let before = Listing::of(&keyring);
    let out = change(&mut keyring).map_err(edit_err(path))?;
    let bytes = keyring.to_bytes();
    // Never write a keyring we would refuse to load or to reload.
    let after = Listing::of(&KeyringFile::parse(path, &bytes)?);
    check_successor(&before, &after).map_err(|refusal| KeyringError::Edit {
        path: path.to_owned(),
        reason: format!("the edited keyring would not be a successor: {refusal}"),
    })?;
    match atomic_file::write(&target, &bytes, &Options::secret_with_backup())? {
        Written::Replaced | Written::Created | Written::Unchanged => Ok((out, after)),
    }
}

/// `keyring rotate`: adds a KEK and makes it primary. Returns the listing.
pub fn rotate(path: &Path) -> Result<Listing, KeyringError> {
    Ok(edit(path, |k| k.add(true))?.1)
}

/// `keyring add`: adds a decrypt-only KEK (to promote later). Returns its number.
pub fn add(path: &Path) -> Result<u32, KeyringError> {
    Ok(edit(path, |k| k.add(false))?.0)
}

/// `keyring add --pkcs11-…`: adds a decrypt-only KEK kept in a PKCS#11
/// token, by reference. The caller has found the token object and computed
/// its check value. Returns its number.
pub fn add_pkcs11(path: &Path, reference: crate::Pkcs11Ref) -> Result<u32, KeyringError> {
    Ok(edit(path, |k| k.add_pkcs11(reference))?.0)
}

/// `keyring promote`: makes KEK `number` primary. Returns the listing.
pub fn promote(path: &Path, number: u32) -> Result<Listing, KeyringError> {
    Ok(edit(path, |k| k.promote(number))?.1)
}

/// `keyring retire`: removes decrypt-only KEK `number`.
pub fn retire(path: &Path, number: u32) -> Result<(), KeyringError> {
    edit(path, |k| k.retire(number)).map(|_| ())
}

/// `keyring list`.
pub fn list(path: &Path) -> Result<Listing, KeyringError> {
    let raw = read_raw(path)?;
    Ok(Listing::of(&KeyringFile::parse(path, &raw.bytes)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn commands_edit_the_file_in_place_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let first = init(&path).unwrap().key_id;
        assert!(matches!(init(&path), Err(KeyringError::AlreadyExists(_))));
        let second = rotate(&path).unwrap().key_id;
        assert_ne!(first, second);
        assert_eq!(add(&path).unwrap(), 3);
        let again = promote(&path, 1).unwrap().key_id;
        assert!(again != first && again != second);
        retire(&path, 2).unwrap();
        let listing = list(&path).unwrap();
        assert_eq!(listing.generation, 5);
        assert_eq!(listing.primary, 1);
        assert_eq!(listing.keks[0].key_ids, vec![first, again.clone()]);
        assert_eq!(listing.key_id, again);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&atomic_file::backup_path(&path)), 0o600);
        let e = retire(&path, 1).unwrap_err().to_string();
        assert!(e.contains("keyring.json") && e.contains("primary"), "{e}");
    }

    #[test]
    fn a_symlinked_keyring_is_edited_where_it_leads() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.json");
        init(&real).unwrap();
        let link = dir.path().join("keyring.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let key_id = rotate(&link).unwrap().key_id;
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(list(&real).unwrap().key_id, key_id);
        assert!(dir.path().join("real.json.prev").exists());
        assert!(!dir.path().join("keyring.json.prev").exists());
        // init through a link to an existing file refuses too.
        assert!(matches!(init(&link), Err(KeyringError::AlreadyExists(_))));
    }

    #[test]
    fn init_refuses_beside_an_earlier_keyrings_prev() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        init(&path).unwrap();
        rotate(&path).unwrap();
        fs::remove_file(&path).unwrap();
        let e = init(&path).unwrap_err().to_string();
        assert!(
            e.contains("keyring.json.prev") && e.contains("move it away"),
            "{e}"
        );
        fs::remove_file(dir.path().join("keyring.json.prev")).unwrap();
        init(&path).unwrap();
    }

    #[test]
    fn a_hand_made_0644_keyring_gets_0600_copies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        init(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        rotate(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&atomic_file::backup_path(&path)), 0o600);
    }

    #[test]
    fn a_keyring_that_is_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = list(dir.path()).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        let big = dir.path().join("big.json");
        fs::write(&big, vec![b' '; 2 << 20]).unwrap();
        let e = rotate(&big).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
    }
}
