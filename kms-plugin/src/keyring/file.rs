//! The keyring file: its JSON format, strict loading, edits and atomic writes.
//!
//! ```json
//! {
//!   "format": "atrest.kms-plugin.keyring/v1",
//!   "generation": 3,
//!   "keks": [
//!     { "kek": 1, "created": "2026-11-28T01:30:00Z", "promotions": [1], "material": "<base64 32 bytes>" },
//!     { "kek": 2, "created": "2026-11-29T09:00:00Z", "promotions": [2], "material": "<base64 32 bytes>" }
//!   ]
//! }
//! ```
//! `generation` grows by one on every write, so a running plugin can refuse an
//! older file (a rollback). `promotions` lists the keyring-wide epochs at which a
//! KEK became primary; the primary is the KEK holding the highest epoch. A key_id
//! is derived from a KEK and one of its epochs, so reinstating an old KEK gives a
//! new key_id while every key_id it ever had stays decryptable. Everything a
//! key_id depends on is in this file: every host with a copy derives the same ids.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

/// The `format` value of every keyring file this build reads and writes.
pub const FORMAT: &str = "atrest.kms-plugin.keyring/v1";
/// Length of a KEK in bytes (AES-256).
pub const KEK_LEN: usize = 32;

/// Why a keyring file could not be read, understood or changed. Messages name
/// the file and the field; they never contain key material.
#[derive(Debug, Error)]
pub enum KeyringFileError {
    /// The file could not be read.
    #[error("cannot read keyring {path}: {source}")]
    Read {
        /// The keyring file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not a keyring (bad JSON, wrong shape). Only the position is
    /// reported: serde's own messages may quote values, which may be keys.
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
    /// Writing the new file failed; the old one is untouched.
    #[error("cannot write keyring {path}: {source}")]
    Write {
        /// The keyring file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The keyring file as stored. Key material stays base64 in zeroizing strings.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringFile {
    /// Always [`FORMAT`].
    pub format: String,
    /// Grows by one on every write.
    pub generation: u64,
    /// The KEKs, in the order they were added.
    pub keks: Vec<KekRecord>,
}

/// One KEK as stored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekRecord {
    /// Its number in this keyring (1, 2, ...), never reused.
    pub kek: u32,
    /// When it was generated (RFC 3339, UTC).
    pub created: String,
    /// The epochs at which it became primary, ascending.
    pub promotions: Vec<u32>,
    /// Base64 of the 32 key bytes.
    material: Zeroizing<String>,
}

impl std::fmt::Debug for KeyringFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringFile")
            .field("format", &self.format)
            .field("generation", &self.generation)
            .field("keks", &self.keks)
            .finish()
    }
}

impl std::fmt::Debug for KekRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KekRecord")
            .field("kek", &self.kek)
            .field("created", &self.created)
            .field("promotions", &self.promotions)
            .field("material", &"<redacted>")
            .finish()
    }
}

impl KekRecord {
    fn generate(kek: u32, promotions: Vec<u32>) -> Self {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        OsRng.fill_bytes(bytes.as_mut());
        KekRecord {
            kek,
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            promotions,
            material: Zeroizing::new(BASE64.encode(bytes.as_ref())),
        }
    }

    /// The key bytes, decoded and length-checked.
    pub fn material(&self) -> Result<Zeroizing<[u8; KEK_LEN]>, String> {
        let decoded = Zeroizing::new(
            BASE64
                .decode(self.material.as_bytes())
                .map_err(|_| format!("keks[kek={}].material is not standard base64", self.kek))?,
        );
        if decoded.len() != KEK_LEN {
            return Err(format!(
                "keks[kek={}].material decodes to {} bytes, want {KEK_LEN}",
                self.kek,
                decoded.len()
            ));
        }
        let mut out = Zeroizing::new([0u8; KEK_LEN]);
        out.copy_from_slice(&decoded);
        Ok(out)
    }

    /// The epoch at which it last became primary, if ever.
    pub fn last_promotion(&self) -> Option<u32> {
        self.promotions.last().copied()
    }
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

/// Reads the file as it is now.
pub fn read_raw(path: &Path) -> Result<RawKeyring, KeyringFileError> {
    let bytes = Zeroizing::new(fs::read(path).map_err(|source| KeyringFileError::Read {
        path: path.to_owned(),
        source,
    })?);
    let digest = Sha256::digest(bytes.as_slice()).into();
    Ok(RawKeyring { bytes, digest })
}

impl KeyringFile {
    /// Parses and validates file content. `path` only names the file in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, KeyringFileError> {
        let file: KeyringFile =
            serde_json::from_slice(bytes).map_err(|e| KeyringFileError::Syntax {
                path: path.to_owned(),
                what: match e.classify() {
                    serde_json::error::Category::Io => "read error",
                    serde_json::error::Category::Syntax => "JSON syntax error",
                    serde_json::error::Category::Data => "unexpected field or value",
                    serde_json::error::Category::Eof => "unexpected end of file",
                },
                line: e.line(),
                column: e.column(),
            })?;
        file.validate()
            .map_err(|reason| KeyringFileError::Invalid {
                path: path.to_owned(),
                reason,
            })?;
        Ok(file)
    }

    /// Checks every rule a keyring must keep; the error names the field.
    fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, want {FORMAT:?}", self.format));
        }
        if self.generation == 0 {
            return Err("generation must be at least 1".into());
        }
        if self.keks.is_empty() {
            return Err("keks is empty: a keyring needs at least one KEK".into());
        }
        let mut numbers = std::collections::BTreeSet::new();
        let mut epochs = std::collections::BTreeSet::new();
        for record in &self.keks {
            if record.kek == 0 || !numbers.insert(record.kek) {
                return Err(format!(
                    "keks[kek={}]: KEK numbers must be unique and at least 1",
                    record.kek
                ));
            }
            humantime::parse_rfc3339(&record.created).map_err(|_| {
                format!(
                    "keks[kek={}].created is not an RFC 3339 UTC time",
                    record.kek
                )
            })?;
            if !record.promotions.windows(2).all(|w| w[0] < w[1]) {
                return Err(format!(
                    "keks[kek={}].promotions must be strictly ascending",
                    record.kek
                ));
            }
            for epoch in &record.promotions {
                if *epoch == 0 || !epochs.insert(*epoch) {
                    return Err(format!(
                        "keks[kek={}].promotions: epoch {epoch} is zero or used by another KEK",
                        record.kek
                    ));
                }
            }
            record.material()?;
        }
        if epochs.is_empty() {
            return Err("no KEK was ever promoted: a keyring needs a primary".into());
        }
        Ok(())
    }

    /// A new keyring with one primary KEK.
    pub fn new_with_primary() -> Self {
        KeyringFile {
            format: FORMAT.into(),
            generation: 1,
            keks: vec![KekRecord::generate(1, vec![1])],
        }
    }

    /// The record of the primary KEK (the one with the highest epoch).
    pub fn primary(&self) -> Option<&KekRecord> {
        self.keks
            .iter()
            .filter(|r| r.last_promotion().is_some())
            .max_by_key(|r| r.last_promotion())
    }

    fn next_epoch(&self) -> u32 {
        self.keks
            .iter()
            .filter_map(KekRecord::last_promotion)
            .max()
            .unwrap_or(0)
            + 1
    }

    fn next_kek_number(&self) -> u32 {
        // A retired KEK's number can come back for a new KEK; that is harmless
        // because key_ids are derived from the key material, not the number.
        self.keks.iter().map(|r| r.kek).max().unwrap_or(0) + 1
    }

    /// Adds a fresh KEK. Promoted at once when `promote` is set, otherwise
    /// decrypt-only until promoted. Returns its number.
    pub fn add(&mut self, promote: bool) -> u32 {
        let number = self.next_kek_number();
        let promotions = if promote {
            vec![self.next_epoch()]
        } else {
            Vec::new()
        };
        self.keks.push(KekRecord::generate(number, promotions));
        self.generation += 1;
        number
    }

    /// Makes KEK `number` primary under a new epoch (so a new key_id).
    pub fn promote(&mut self, path: &Path, number: u32) -> Result<(), KeyringFileError> {
        if self.primary().map(|r| r.kek) == Some(number) {
            return Err(KeyringFileError::Edit {
                path: path.to_owned(),
                reason: format!("KEK {number} is already primary"),
            });
        }
        let epoch = self.next_epoch();
        let record = self
            .keks
            .iter_mut()
            .find(|r| r.kek == number)
            .ok_or_else(|| KeyringFileError::Edit {
                path: path.to_owned(),
                reason: format!("no KEK {number} in this keyring"),
            })?;
        record.promotions.push(epoch);
        self.generation += 1;
        Ok(())
    }

    /// Removes decrypt-only KEK `number`. Everything it encrypted becomes
    /// undecryptable: callers must have proven nothing needs it.
    pub fn retire(&mut self, path: &Path, number: u32) -> Result<(), KeyringFileError> {
        if self.primary().map(|r| r.kek) == Some(number) {
            return Err(KeyringFileError::Edit {
                path: path.to_owned(),
                reason: format!(
                    "KEK {number} is the primary; promote another KEK before retiring it"
                ),
            });
        }
        let before = self.keks.len();
        self.keks.retain(|r| r.kek != number);
        if self.keks.len() == before {
            return Err(KeyringFileError::Edit {
                path: path.to_owned(),
                reason: format!("no KEK {number} in this keyring"),
            });
        }
        self.generation += 1;
        Ok(())
    }

    /// The pretty JSON of this keyring, in zeroizing memory.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(512));
        // Serializing plain structs into a Vec cannot fail.
        if serde_json::to_writer_pretty(&mut *out, self).is_err() {
            out.clear();
        }
        out.push(b'\n');
        out
    }
}

/// How [`write_atomic`] treats an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Fail if the file exists.
    CreateNew,
    /// Replace it, keeping the previous content as `<path>.prev`.
    Replace,
}

/// Writes `bytes` to `path` atomically with mode 0600: a temporary file in
/// the same directory, fsync, then rename (or link, for [`WriteMode::CreateNew`],
/// which fails rather than overwrite), then fsync of the directory. A reader
/// sees the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: WriteMode) -> Result<(), KeyringFileError> {
    let err = |source| KeyringFileError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| err(io::Error::other("path has no file name")))?;
    let mut tmp_name = file_name.to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        match mode {
            WriteMode::CreateNew => {
                fs::hard_link(&tmp, path)?;
                fs::remove_file(&tmp)?;
            }
            WriteMode::Replace => {
                if path.exists() {
                    let mut prev_name = file_name.to_owned();
                    prev_name.push(".prev");
                    let prev = dir.join(prev_name);
                    let mut prev_tmp_name = file_name.to_owned();
                    prev_tmp_name.push(format!(".prev.tmp.{}", std::process::id()));
                    let prev_tmp = dir.join(prev_tmp_name);
                    let _ = fs::remove_file(&prev_tmp);
                    fs::hard_link(path, &prev_tmp)?;
                    fs::rename(&prev_tmp, &prev)?;
                }
                fs::rename(&tmp, path)?;
            }
        }
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists && mode == WriteMode::CreateNew {
            KeyringFileError::AlreadyExists(path.to_owned())
        } else {
            err(e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_keyring_round_trips_and_validates() {
        let k = KeyringFile::new_with_primary();
        let bytes = k.to_bytes();
        let back = KeyringFile::parse(Path::new("k.json"), &bytes).unwrap();
        assert_eq!(back.generation, 1);
        assert_eq!(back.primary().unwrap().kek, 1);
        assert_eq!(
            *back.keks[0].material().unwrap(),
            *k.keks[0].material().unwrap()
        );
    }

    #[test]
    fn edits_bump_generation_and_track_epochs() {
        let p = Path::new("k.json");
        let mut k = KeyringFile::new_with_primary();
        assert_eq!(k.add(true), 2);
        assert_eq!(k.primary().unwrap().kek, 2);
        assert_eq!(k.add(false), 3);
        assert_eq!(k.primary().unwrap().kek, 2);
        k.promote(p, 1).unwrap();
        assert_eq!(k.keks[0].promotions, vec![1, 3]);
        assert_eq!(k.primary().unwrap().kek, 1);
        assert!(k.retire(p, 1).is_err(), "primary retired");
        k.retire(p, 2).unwrap();
        assert!(k.retire(p, 2).is_err(), "retired twice");
        assert!(k.promote(p, 1).is_err(), "already primary");
        assert_eq!(k.generation, 5);
        assert_eq!(k.add(true), 4, "numbers are not reused");
        KeyringFile::parse(p, &k.to_bytes()).unwrap();
    }

    #[test]
    fn invalid_files_name_the_field_and_never_echo_material() {
        let p = Path::new("k.json");
        let good = KeyringFile::new_with_primary();
        let secret = good.keks[0].material.to_string();
        let json: serde_json::Value = serde_json::from_slice(&good.to_bytes()).unwrap();
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                serde_json::json!({"format": "x", "generation": 1, "keks": json["keks"]}),
                "format",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 0, "keks": json["keks"]}),
                "generation",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "keks": []}),
                "keks is empty",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "keks": [{"kek": 1, "created": "2026-01-01T00:00:00Z", "promotions": [1], "material": "AAAA"}]}),
                "material decodes to 3 bytes",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "keks": [{"kek": 1, "created": "2026-01-01T00:00:00Z", "promotions": [], "material": secret}]}),
                "was ever promoted",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": secret, "keks": json["keks"]}),
                "line 1",
            ),
        ];
        for (value, want) in cases {
            let err = KeyringFile::parse(p, value.to_string().as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} lacks {want}");
            assert!(!err.contains(&secret), "{err} leaks material");
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let k = KeyringFile::new_with_primary();
        let secret = k.keks[0].material.to_string();
        let shown = format!("{k:?}");
        assert!(!shown.contains(&secret));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn atomic_write_is_0600_never_overwrites_on_create_and_keeps_prev() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        write_atomic(&path, b"one", WriteMode::CreateNew).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = write_atomic(&path, b"two", WriteMode::CreateNew).unwrap_err();
        assert!(
            matches!(again, KeyringFileError::AlreadyExists(_)),
            "{again}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_atomic(&path, b"two", WriteMode::Replace).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::read(dir.path().join("keyring.json.prev")).unwrap(),
            b"one"
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
