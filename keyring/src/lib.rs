//! atrest's keyring of KEKs: the file every control-plane host holds a copy
//! of, and everything that decides which keys it contains.
//!
//! Start at [`KeyringFile`] (the format and its rules, [`file`]), then
//! [`edit`] (the `keyring init/rotate/add/promote/retire/list` commands with
//! their lock), [`Listing`] (the one `keyring list --output json` schema) and
//! [`check_successor`] (may a new file replace the one in service?).
//! [`pkcs11`] describes KEKs kept in a PKCS#11 token (the file holds only a
//! reference and a public check value). [`derive`] holds every derivation from a KEK: the public key_id and
//! fingerprint and the secret encryption key. The ciphers, the ciphertext
//! envelope and the serving snapshot live in `kms-plugin`, which serves.
//!
//! # Who uses it
//!
//! - `kms-plugin` loads the file at start and on every change, and its
//!   `keyring` subcommands are thin wrappers over [`edit`].
//! - The rotator does **not** link this crate's edits: it keeps driving the
//!   `kms-plugin keyring` CLI and parses its JSON into [`Listing`]. The edit
//!   must run where the keys are: today that is the first host's file, and
//!   once KEKs live in an HSM, an add has to run on the host holding the
//!   token (possibly over SSH), with the plugin binary that is deployed
//!   there. So the listing carries a [`LISTING_FORMAT`] and the rotator
//!   refuses a plugin whose listing format it does not know instead of
//!   misreading it.
//!
//! # Lineage, and what is protected across restarts
//!
//! `init` gives every keyring a random, public lineage. A keyring written
//! before lineages existed loads as it is; its next edit adds one (and a
//! plugin accepts that change). The plugin judges every file with
//! [`check_successor`]:
//!
//! - on reload, against the keyring in service (plus a newer generation);
//! - at start, against `<file>.prev` where it exists: the file this one
//!   replaced, written by every edit and every rotator copy. A start refuses
//!   a file that is not a newer successor of its `.prev`, so an edit or an
//!   atomic copy of a foreign, tampered or older keyring is caught across a
//!   restart too.
//!
//! Not protected across a restart: a file replaced by something that does
//! not keep `.prev` (a plain `cp`, a configuration tool) *together with* a
//! matching `.prev`, or `.prev` removed — a restarted plugin then has nothing
//! to compare with and trusts the file. A foreign keyring that is meant (a
//! restore, a new cluster) is put in service by moving `.prev` away and
//! restarting.
//!
//! # Files
//!
//! Reads go through [`atomic_file::read_bounded`]: a regular file (symlinks
//! followed; FIFOs, devices and directories refused without blocking) of at
//! most [`MAX_FILE_LEN`] bytes. Writes go through [`atomic_file::write`]:
//! temp file, fsync, rename, directory fsync, 0600, `.prev` kept (0600).
//! A symlinked keyring is edited where it leads (the link stays a link).
//! Errors name the file and a position or field path, never a value.
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![warn(missing_docs)]

pub mod derive;
pub mod edit;
pub mod file;
pub mod listing;
pub mod pkcs11;
pub mod successor;

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

pub use file::{EditError, FORMAT, KEK_LEN, Kek, KekMaterial, KeyringFile};
pub use listing::{KekInfo, KekState, LISTING_FORMAT, Listing, Pkcs11Info};
pub use pkcs11::Pkcs11Ref;
pub use successor::{Dropped, Refusal, check_successor};

/// Largest keyring file read (a keyring is a few KiB).
pub const MAX_FILE_LEN: u64 = 1024 * 1024;

/// Why a keyring file could not be read, understood or changed. Messages name
/// the file and the field or position; they never contain a value from it.
#[derive(Debug, Error)]
pub enum KeyringError {
    /// The file could not be read, or is not a small regular file.
    #[error("keyring: {source}")]
    Read {
        /// The keyring file.
        path: PathBuf,
        /// What went wrong (names the path).
        #[source]
        source: atomic_file::ReadError,
    },
    /// The file is not a keyring (bad JSON, wrong shape). Only the position is
    /// reported: serde's own messages may quote values or field names, which
    /// may be keys.
    #[error("keyring {path} is not valid: {what} at line {line} column {column}")]
    Syntax {
        /// The keyring file.
        path: PathBuf,
        /// Syntax, data shape or end-of-file.
        what: &'static str,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
    },
    /// The JSON is well formed but breaks a keyring rule.
    #[error("keyring {path} is not valid: {reason}")]
    Invalid {
        /// The keyring file.
        path: PathBuf,
        /// Which field and what is wrong with it.
        reason: String,
    },
    /// `init` found a file already there.
    #[error(
        "keyring {0} already exists; refusing to overwrite it (use `keyring rotate` to add a KEK)"
    )]
    AlreadyExists(PathBuf),
    /// An edit that makes no sense for this keyring.
    #[error("keyring {path}: {reason}")]
    Edit {
        /// The keyring file.
        path: PathBuf,
        /// What was asked and why it cannot be done.
        reason: String,
    },
    /// The edit lock could not be taken.
    #[error("cannot lock keyring {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing the new file failed; the old one is untouched.
    #[error("keyring: {0}")]
    Write(#[from] atomic_file::WriteError),
    /// The file is not a successor of the one it replaced (`<file>.prev`).
    #[error(
        "keyring {path} is refused: compared with {prev}, {refusal}. If this file is the keyring you mean to serve, move {prev} away and start again"
    )]
    NotSuccessor {
        /// The keyring file.
        path: PathBuf,
        /// The file it replaced.
        prev: PathBuf,
        /// Why.
        refusal: String,
    },
}

/// Raw bytes of a keyring file plus their SHA-256, zeroized on drop.
pub struct RawKeyring {
    /// The file content.
    pub bytes: Zeroizing<Vec<u8>>,
    /// SHA-256 of `bytes`: tells an unchanged file without parsing it.
    pub digest: [u8; 32],
}

impl std::fmt::Debug for RawKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawKeyring")
            .field("len", &self.bytes.len())
            .field("digest", &hex::encode(self.digest))
            .finish()
    }
}

/// Reads the file as it is now: a regular file of at most [`MAX_FILE_LEN`]
/// bytes, opened without blocking.
pub fn read_raw(path: &Path) -> Result<RawKeyring, KeyringError> {
    let bytes =
        atomic_file::read_bounded(path, MAX_FILE_LEN).map_err(|source| KeyringError::Read {
            path: path.to_owned(),
            source,
        })?;
    let digest = Sha256::digest(bytes.as_slice()).into();
    Ok(RawKeyring { bytes, digest })
}

/// The start check: `current` (the content of `path`) must be a newer
/// successor of `<path>.prev` where that exists and differs. Returns the
/// KEKs `.prev` had and `current` dropped (for a WARN), or why it is refused.
/// A `.prev` that cannot be read or parsed refuses the start too: a check
/// that judged nothing is not a pass.
pub fn check_against_prev(path: &Path, current: &RawKeyring) -> Result<Dropped, KeyringError> {
    let target = atomic_file::resolve(path).unwrap_or_else(|_| path.to_owned());
    let prev = atomic_file::backup_path(&target);
    let refused = |refusal: String| KeyringError::NotSuccessor {
        path: path.to_owned(),
        prev: prev.clone(),
        refusal,
    };
    let old = match read_raw(&prev) {
        Ok(raw) => raw,
        Err(KeyringError::Read {
            source: atomic_file::ReadError::Io { source, .. },
            ..
        }) if source.kind() == io::ErrorKind::NotFound => return Ok(Dropped::default()),
        Err(e) => return Err(refused(format!("it cannot be judged ({e})"))),
    };
    if old.digest == current.digest {
        return Ok(Dropped::default());
    }
    let old = KeyringFile::parse(&prev, &old.bytes)
        .map_err(|e| refused(format!("it cannot be judged ({e})")))?;
    let new = KeyringFile::parse(path, &current.bytes)?;
    if new.generation() <= old.generation() {
        return Err(refused(format!(
            "its generation {} is not newer than generation {} (rolled back, or replaced by an older copy)",
            new.generation(),
            old.generation()
        )));
    }
    check_successor(&Listing::of(&old), &Listing::of(&new)).map_err(|r| refused(r.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_check_follows_prev() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        edit::init(&path).unwrap();
        // No .prev yet: nothing to compare, accepted.
        assert!(check_against_prev(&path, &read_raw(&path).unwrap()).is_ok());
        edit::add(&path).unwrap();
        edit::promote(&path, 2).unwrap();
        edit::retire(&path, 1).unwrap();
        let dropped = check_against_prev(&path, &read_raw(&path).unwrap()).unwrap();
        assert_eq!(dropped.keks, vec![1]);

        // Another keyring copied over (atomically, so .prev is ours).
        let other = dir.path().join("other.json");
        edit::init(&other).unwrap();
        for _ in 0..4 {
            edit::rotate(&other).unwrap();
        }
        let theirs = fs_read(&other);
        atomic_file::write(&path, &theirs, &atomic_file::Options::secret_with_backup()).unwrap();
        let e = check_against_prev(&path, &read_raw(&path).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lineage") && e.contains("keyring.json.prev"),
            "{e}"
        );

        // A rollback: the file is older than its .prev.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let prev = dir.path().join("keyring.json.prev");
        edit::init(&path).unwrap();
        edit::rotate(&path).unwrap(); // .prev = generation 1, file = generation 2
        let (gen1, gen2) = (fs_read(&prev), fs_read(&path));
        std::fs::write(&prev, gen2).unwrap();
        std::fs::write(&path, gen1).unwrap();
        let e = check_against_prev(&path, &read_raw(&path).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not newer"), "{e}");

        // An unreadable .prev is not a pass.
        std::fs::write(&prev, b"{").unwrap();
        let e = check_against_prev(&path, &read_raw(&path).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be judged"), "{e}");
    }

    fn fs_read(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }
}
