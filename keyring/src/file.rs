//! The keyring file: its JSON format, strict loading and the edits.
//!
//! ```json
//! {
//!   "format": "atrest.kms-plugin.keyring/v1",
//!   "lineage": "5f0c…(32 hex digits)",
//!   "generation": 3,
//!   "highest_kek": 2,
//!   "keks": [
//!     { "kek": 1, "created": "2026-11-28T01:30:00Z", "promotions": [1], "material": "<base64 32 bytes>" },
//!     { "kek": 2, "created": "2026-11-29T09:00:00Z", "promotions": [2], "material": "<base64 32 bytes>" }
//!   ]
//! }
//! ```
//! - `lineage`: random, public, fixed by `init`: which keyring this is. A file
//!   written before lineages existed has none; the next edit adds one.
//! - `generation` grows by one on every write, so a running plugin can refuse
//!   an older file (a rollback).
//! - `highest_kek`: the highest KEK number ever issued, so a retired KEK's
//!   number is never given to a new KEK (a number names one key material for
//!   the life of the keyring). Optional on read (then the highest present).
//! - `promotions` lists the keyring-wide epochs at which a KEK became primary;
//!   the primary is the KEK holding the highest epoch. A key_id is derived
//!   from a KEK and one of its epochs (see [`crate::derive`]).
//! - `material` is the KEK itself (a [`KekMaterial::Local`] key). A KEK kept
//!   in a PKCS#11 token has a `pkcs11` object instead, naming the token
//!   object and its public check value ([`KekMaterial::Pkcs11`], see
//!   [`crate::pkcs11`]); exactly one of the two is present.
//!
//! Parsing is strict (unknown fields are refused) and its errors give
//! positions and field paths only, never a value and never an unknown field's
//! name as written: a key pasted into the wrong place must not be echoed.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::KeyringError;
use crate::pkcs11::{CHECK_LEN, MAX_ID, Pkcs11Ref, decode_hex};

/// The `format` value of every keyring file this build reads and writes.
pub const FORMAT: &str = "atrest.kms-plugin.keyring/v1";
/// Length of a local KEK in bytes (AES-256).
pub const KEK_LEN: usize = 32;
/// Length of a lineage in bytes (shown as twice as many hex digits).
pub const LINEAGE_LEN: usize = 16;

/// Where a KEK's key material is. No `Debug` shows key bytes.
#[non_exhaustive]
pub enum KekMaterial {
    /// 32 key bytes kept in the keyring file itself.
    Local(Zeroizing<[u8; KEK_LEN]>),
    /// A key kept in a PKCS#11 token: only its reference is here.
    Pkcs11(Pkcs11Ref),
}

impl std::fmt::Debug for KekMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KekMaterial::Local(_) => f.write_str("Local(<redacted>)"),
            KekMaterial::Pkcs11(r) => f.debug_tuple("Pkcs11").field(r).finish(),
        }
    }
}

impl KekMaterial {
    /// `local` or `pkcs11`, as `keyring list` shows the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            KekMaterial::Local(_) => "local",
            KekMaterial::Pkcs11(_) => "pkcs11",
        }
    }

    fn generate() -> Result<Self, EditError> {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        getrandom::getrandom(bytes.as_mut()).map_err(|_| EditError::Random)?;
        Ok(KekMaterial::Local(bytes))
    }
}

/// One KEK of a loaded keyring.
#[derive(Debug)]
pub struct Kek {
    /// Its number in this keyring (1, 2, ...), never reused.
    pub number: u32,
    /// When it was generated (RFC 3339, UTC).
    pub created: String,
    /// The epochs at which it became primary, strictly ascending.
    pub promotions: Vec<u32>,
    material: KekMaterial,
}

impl Kek {
    /// Its key material.
    pub fn material(&self) -> &KekMaterial {
        &self.material
    }

    /// The epoch at which it last became primary, if ever.
    pub fn last_promotion(&self) -> Option<u32> {
        self.promotions.last().copied()
    }
}

/// A loaded, validated keyring file. Every rule of the format holds for it.
#[derive(Debug)]
pub struct KeyringFile {
    lineage: Option<String>,
    generation: u64,
    highest_kek: u32,
    keks: Vec<Kek>,
}

/// The file as stored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lineage: Option<String>,
    generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    highest_kek: Option<u32>,
    keks: Vec<RawKek>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKek {
    kek: u32,
    created: String,
    promotions: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    material: Option<Zeroizing<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pkcs11: Option<RawPkcs11>,
}

/// A [`Pkcs11Ref`] as stored (hex strings).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPkcs11 {
    token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    key_label: String,
    id: String,
    check_value: String,
}

/// Why an edit was not made. Names KEKs and fields, never a value from the
/// file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EditError {
    /// The edit makes no sense for this keyring.
    #[error("{0}")]
    Refused(String),
    /// The operating system gave no random bytes for a new key or lineage.
    #[error("the system random number generator failed")]
    Random,
}

fn refused(reason: impl Into<String>) -> EditError {
    EditError::Refused(reason.into())
}

impl KeyringFile {
    /// Parses and validates file content. `path` only names the file in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, KeyringError> {
        let raw: RawFile = serde_json::from_slice(bytes).map_err(|e| KeyringError::Syntax {
            path: path.to_owned(),
            what: match e.classify() {
                serde_json::error::Category::Io => "read error",
                serde_json::error::Category::Syntax => "JSON syntax error",
                serde_json::error::Category::Data => "unknown field, missing field or wrong type",
                serde_json::error::Category::Eof => "unexpected end of file",
            },
            line: e.line(),
            column: e.column(),
        })?;
        Self::validate(raw).map_err(|reason| KeyringError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Checks every rule a keyring must keep; the error names the field,
    /// never its value.
    fn validate(raw: RawFile) -> Result<Self, String> {
        if raw.format != FORMAT {
            return Err(format!(
                "format is not {FORMAT:?} (a keyring of another kind or version)"
            ));
        }
        if let Some(l) = &raw.lineage
            && (l.len() != 2 * LINEAGE_LEN
                || !l
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Err(format!(
                "lineage is not {} lowercase hex digits",
                2 * LINEAGE_LEN
            ));
        }
        if raw.generation == 0 {
            return Err("generation must be at least 1".into());
        }
        if raw.keks.is_empty() {
            return Err("keks is empty: a keyring needs at least one KEK".into());
        }
        let mut numbers = BTreeSet::new();
        let mut epochs = BTreeSet::new();
        let mut keks = Vec::with_capacity(raw.keks.len());
        for (i, record) in raw.keks.into_iter().enumerate() {
            if record.kek == 0 || !numbers.insert(record.kek) {
                return Err(format!(
                    "keks[{i}].kek: KEK numbers must be unique and at least 1"
                ));
            }
            humantime::parse_rfc3339(&record.created)
                .map_err(|_| format!("keks[{i}].created is not an RFC 3339 UTC time"))?;
            if !record.promotions.windows(2).all(|w| w[0] < w[1]) {
                return Err(format!("keks[{i}].promotions must be strictly ascending"));
            }
            for epoch in &record.promotions {
                if *epoch == 0 || !epochs.insert(*epoch) {
                    return Err(format!(
                        "keks[{i}].promotions: an epoch is zero or used by another KEK"
                    ));
                }
            }
            let material = match (record.material, record.pkcs11) {
                (Some(material), None) => local_material(i, &material)?,
                (None, Some(reference)) => pkcs11_material(i, reference)?,
                _ => {
                    return Err(format!(
                        "keks[{i}] must have exactly one of material (a local KEK) and pkcs11 (a KEK in a token)"
                    ));
                }
            };
            keks.push(Kek {
                number: record.kek,
                created: record.created,
                promotions: record.promotions,
                material,
            });
        }
        if epochs.is_empty() {
            return Err("no KEK was ever promoted: a keyring needs a primary".into());
        }
        let present = numbers.last().copied().unwrap_or(0);
        let highest_kek = match raw.highest_kek {
            Some(h) if h < present => {
                return Err("highest_kek is lower than a KEK number in keks".into());
            }
            Some(h) => h,
            None => present,
        };
        Ok(KeyringFile {
            lineage: raw.lineage,
            generation: raw.generation,
            highest_kek,
            keks,
        })
    }

    /// A new keyring with a fresh lineage and one primary KEK.
    pub fn new_with_primary() -> Result<Self, EditError> {
        Ok(KeyringFile {
            lineage: Some(new_lineage()?),
            generation: 1,
            highest_kek: 1,
            keks: vec![Kek {
                number: 1,
                created: now(),
                promotions: vec![1],
                material: KekMaterial::generate()?,
            }],
        })
    }

    /// The lineage: which keyring this is (`None` for a file written before
    /// lineages existed).
    pub fn lineage(&self) -> Option<&str> {
        self.lineage.as_deref()
    }

    /// Grows by one on every write.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The KEKs, in the order they were added.
    pub fn keks(&self) -> &[Kek] {
        &self.keks
    }

    /// The primary KEK: the one holding the highest epoch (validation
    /// guarantees there is one).
    pub fn primary(&self) -> Option<&Kek> {
        self.keks
            .iter()
            .filter(|k| k.last_promotion().is_some())
            .max_by_key(|k| k.last_promotion())
    }

    /// The key_id `kek` would get if it were promoted next in this file
    /// (the next epoch), or `None` for the primary (promoting it changes
    /// nothing) and when the epochs are exhausted. Every copy of the same
    /// file computes the same answer, so a plugin still serving the copy from
    /// before a `promote` can already decrypt what a plugin serving the
    /// promoted copy encrypts: the window while the rotator copies the
    /// promoted file from host to host is safe.
    pub fn next_promotion_key_id(&self, kek: &Kek) -> Option<String> {
        if self.primary().map(|p| p.number) == Some(kek.number) {
            return None;
        }
        let epoch = self.next_epoch().ok()?;
        Some(crate::derive::key_id(&kek.material, kek.number, epoch))
    }

    fn next_epoch(&self) -> Result<u32, EditError> {
        self.keks
            .iter()
            .filter_map(Kek::last_promotion)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| refused("the epoch is at its maximum; no KEK can be promoted"))
    }

    /// Starts an edit: the next generation, and a lineage for a file that
    /// had none.
    fn bump(&mut self) -> Result<(), EditError> {
        self.generation = self
            .generation
            .checked_add(1)
            .ok_or_else(|| refused("generation is at its maximum"))?;
        if self.lineage.is_none() {
            self.lineage = Some(new_lineage()?);
        }
        Ok(())
    }

    /// Adds a fresh KEK: promoted at once when `promote` is set, otherwise
    /// decrypt-only until promoted. Returns its number.
    pub fn add(&mut self, promote: bool) -> Result<u32, EditError> {
        let number = self
            .highest_kek
            .checked_add(1)
            .ok_or_else(|| refused("KEK numbers are at their maximum"))?;
        let promotions = if promote {
            vec![self.next_epoch()?]
        } else {
            Vec::new()
        };
        self.bump()?;
        self.keks.push(Kek {
            number,
            created: now(),
            promotions,
            material: KekMaterial::generate()?,
        });
        self.highest_kek = number;
        Ok(number)
    }

    /// Adds a KEK kept in a PKCS#11 token, decrypt-only until promoted.
    /// Refuses a reference that breaks the format, or names the same token
    /// object as a KEK already in the keyring. Returns its number.
    pub fn add_pkcs11(&mut self, reference: Pkcs11Ref) -> Result<u32, EditError> {
        reference.validate("pkcs11").map_err(refused)?;
        let same_object = |r: &Pkcs11Ref| {
            r.token == reference.token && r.serial == reference.serial && r.id == reference.id
        };
        if let Some(k) = self
            .keks
            .iter()
            .find(|k| matches!(&k.material, KekMaterial::Pkcs11(r) if same_object(r)))
        {
            return Err(refused(format!(
                "KEK {} already names this token object (same token and CKA_ID)",
                k.number
            )));
        }
        let number = self
            .highest_kek
            .checked_add(1)
            .ok_or_else(|| refused("KEK numbers are at their maximum"))?;
        self.bump()?;
        self.keks.push(Kek {
            number,
            created: now(),
            promotions: Vec::new(),
            material: KekMaterial::Pkcs11(reference),
        });
        self.highest_kek = number;
        Ok(number)
    }

    /// Makes KEK `number` primary under a new epoch (so a new key_id).
    pub fn promote(&mut self, number: u32) -> Result<(), EditError> {
        if self.primary().map(|k| k.number) == Some(number) {
            return Err(refused(format!("KEK {number} is already primary")));
        }
        let epoch = self.next_epoch()?;
        if !self.keks.iter().any(|k| k.number == number) {
            return Err(refused(format!("no KEK {number} in this keyring")));
        }
        self.bump()?;
        if let Some(kek) = self.keks.iter_mut().find(|k| k.number == number) {
            kek.promotions.push(epoch);
        }
        Ok(())
    }

    /// Removes decrypt-only KEK `number`. Everything it encrypted becomes
    /// undecryptable: callers must have proven nothing needs it.
    pub fn retire(&mut self, number: u32) -> Result<(), EditError> {
        if self.primary().map(|k| k.number) == Some(number) {
            return Err(refused(format!(
                "KEK {number} is the primary; promote another KEK before retiring it"
            )));
        }
        if !self.keks.iter().any(|k| k.number == number) {
            return Err(refused(format!("no KEK {number} in this keyring")));
        }
        self.bump()?;
        self.keks.retain(|k| k.number != number);
        Ok(())
    }

    /// The pretty JSON of this keyring, in zeroizing memory.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let raw = RawFile {
            format: FORMAT.into(),
            lineage: self.lineage.clone(),
            generation: self.generation,
            highest_kek: Some(self.highest_kek),
            keks: self
                .keks
                .iter()
                .map(|k| RawKek {
                    kek: k.number,
                    created: k.created.clone(),
                    promotions: k.promotions.clone(),
                    material: match &k.material {
                        KekMaterial::Local(key) => {
                            Some(Zeroizing::new(BASE64.encode(key.as_ref())))
                        }
                        KekMaterial::Pkcs11(_) => None,
                    },
                    pkcs11: match &k.material {
                        KekMaterial::Local(_) => None,
                        KekMaterial::Pkcs11(r) => Some(RawPkcs11 {
                            token: r.token.clone(),
                            serial: r.serial.clone(),
                            key_label: r.key_label.clone(),
                            id: hex::encode(&r.id),
                            check_value: hex::encode(r.check_value),
                        }),
                    },
                })
                .collect(),
        };
        // Room for everything up front: a reallocation would leave an
        // unzeroized copy of the key text behind.
        let mut out = Zeroizing::new(Vec::with_capacity(1024 + 512 * self.keks.len()));
        // Serializing plain structs into a Vec cannot fail; an empty result
        // would be refused by every reader.
        if serde_json::to_writer_pretty(&mut *out, &raw).is_err() {
            out.clear();
        }
        out.push(b'\n');
        out
    }

    #[cfg(test)]
    pub(crate) fn set_for_test(&mut self, generation: u64, highest_kek: u32) {
        self.generation = generation;
        self.highest_kek = highest_kek;
    }

    #[cfg(test)]
    pub(crate) fn drop_lineage_for_test(&mut self) {
        self.lineage = None;
    }
}

fn local_material(i: usize, text: &str) -> Result<KekMaterial, String> {
    let decoded = Zeroizing::new(
        BASE64
            .decode(text.as_bytes())
            .map_err(|_| format!("keks[{i}].material is not standard base64"))?,
    );
    if decoded.len() != KEK_LEN {
        return Err(format!(
            "keks[{i}].material decodes to {} bytes, want {KEK_LEN}",
            decoded.len()
        ));
    }
    let mut key = Zeroizing::new([0u8; KEK_LEN]);
    key.copy_from_slice(&decoded);
    Ok(KekMaterial::Local(key))
}

fn pkcs11_material(i: usize, raw: RawPkcs11) -> Result<KekMaterial, String> {
    let at = format!("keks[{i}].pkcs11");
    let id = decode_hex(&raw.id, &format!("{at}.id"), None, MAX_ID)?;
    let check = decode_hex(
        &raw.check_value,
        &format!("{at}.check_value"),
        Some(CHECK_LEN),
        CHECK_LEN,
    )?;
    let mut check_value = [0u8; CHECK_LEN];
    check_value.copy_from_slice(&check);
    let reference = Pkcs11Ref {
        token: raw.token,
        serial: raw.serial,
        key_label: raw.key_label,
        id,
        check_value,
    };
    reference.validate(&at)?;
    Ok(KekMaterial::Pkcs11(reference))
}

fn new_lineage() -> Result<String, EditError> {
    let mut bytes = [0u8; LINEAGE_LEN];
    getrandom::getrandom(&mut bytes).map_err(|_| EditError::Random)?;
    Ok(hex::encode(bytes))
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("k.json")
    }

    fn key(k: &Kek) -> [u8; KEK_LEN] {
        match k.material() {
            KekMaterial::Local(b) => **b,
            KekMaterial::Pkcs11(_) => panic!("a local KEK was expected"),
        }
    }

    #[test]
    fn a_new_keyring_round_trips_and_validates() {
        let k = KeyringFile::new_with_primary().unwrap();
        let back = KeyringFile::parse(p(), &k.to_bytes()).unwrap();
        assert_eq!(back.generation(), 1);
        assert_eq!(back.primary().unwrap().number, 1);
        assert_eq!(key(&back.keks()[0]), key(&k.keks()[0]));
        assert_eq!(back.lineage(), k.lineage());
        assert_eq!(back.lineage().unwrap().len(), 32);
        assert_ne!(
            KeyringFile::new_with_primary().unwrap().lineage(),
            k.lineage(),
            "every init gets its own lineage"
        );
    }

    #[test]
    fn edits_bump_generation_track_epochs_and_never_reuse_numbers() {
        let mut k = KeyringFile::new_with_primary().unwrap();
        assert_eq!(k.add(true).unwrap(), 2);
        assert_eq!(k.primary().unwrap().number, 2);
        assert_eq!(k.add(false).unwrap(), 3);
        assert_eq!(k.primary().unwrap().number, 2);
        k.promote(1).unwrap();
        assert_eq!(k.keks()[0].promotions, vec![1, 3]);
        assert_eq!(k.primary().unwrap().number, 1);
        assert!(k.retire(1).is_err(), "primary retired");
        k.retire(3).unwrap();
        assert!(k.retire(3).is_err(), "retired twice");
        assert!(k.promote(1).is_err(), "already primary");
        assert_eq!(k.generation(), 5);
        // 3 was the highest and is gone: a new KEK still gets 4.
        assert_eq!(k.add(true).unwrap(), 4, "numbers are not reused");
        let back = KeyringFile::parse(p(), &k.to_bytes()).unwrap();
        assert_eq!(back.add_preview(), 5);
    }

    impl KeyringFile {
        fn add_preview(&self) -> u32 {
            self.highest_kek + 1
        }
    }

    #[test]
    fn a_file_without_lineage_loads_and_gets_one_on_the_next_edit() {
        let mut k = KeyringFile::new_with_primary().unwrap();
        k.drop_lineage_for_test();
        let mut old: serde_json::Value = serde_json::from_slice(&k.to_bytes()).unwrap();
        old.as_object_mut().unwrap().remove("highest_kek");
        let mut back = KeyringFile::parse(p(), old.to_string().as_bytes()).unwrap();
        assert_eq!(back.lineage(), None);
        back.add(false).unwrap();
        assert_eq!(back.lineage().map(str::len), Some(32));
    }

    #[test]
    fn counters_at_their_maximum_give_clean_errors() {
        let mut k = KeyringFile::new_with_primary().unwrap();
        k.set_for_test(u64::MAX, 1);
        let e = k.add(true).unwrap_err().to_string();
        assert!(e.contains("generation is at its maximum"), "{e}");

        let mut k = KeyringFile::new_with_primary().unwrap();
        k.set_for_test(1, u32::MAX);
        let e = k.add(false).unwrap_err().to_string();
        assert!(e.contains("KEK numbers are at their maximum"), "{e}");

        // An epoch of u32::MAX written by hand: loads, but nothing can be promoted.
        let k = KeyringFile::new_with_primary().unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&k.to_bytes()).unwrap();
        v["keks"][0]["promotions"] = serde_json::json!([u32::MAX]);
        let mut k = KeyringFile::parse(p(), v.to_string().as_bytes()).unwrap();
        let e = k.add(true).unwrap_err().to_string();
        assert!(e.contains("epoch is at its maximum"), "{e}");
        let n = k.add(false).unwrap();
        let e = k.promote(n).unwrap_err().to_string();
        assert!(e.contains("epoch is at its maximum"), "{e}");
    }

    #[test]
    fn invalid_files_name_the_field_and_never_echo_a_value() {
        let good = KeyringFile::new_with_primary().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&good.to_bytes()).unwrap();
        let secret = json["keks"][0]["material"].as_str().unwrap().to_owned();
        let keks = json["keks"].clone();
        let cases: Vec<(serde_json::Value, &str)> = vec![
            // A key pasted into `format`.
            (
                serde_json::json!({"format": secret, "generation": 1, "keks": keks}),
                "format is not",
            ),
            // A key pasted as an unknown field's name, and as its value.
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "keks": keks, secret.clone(): secret}),
                "unknown field",
            ),
            (
                serde_json::json!({"format": FORMAT, "lineage": secret, "generation": 1, "keks": keks}),
                "lineage is not",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 0, "keks": keks}),
                "generation",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "keks": []}),
                "keks is empty",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "keks": [{"kek": 1, "created": secret, "promotions": [1], "material": secret}]}),
                "keks[0].created",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "keks": [{"kek": 1, "created": "2026-01-01T00:00:00Z", "promotions": [1], "material": "AAAA"}]}),
                "keks[0].material decodes to 3 bytes",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "keks": [{"kek": 1, "created": "2026-01-01T00:00:00Z", "promotions": [1], "material": format!("{secret}!")}]}),
                "keks[0].material is not standard base64",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "keks": [{"kek": 1, "created": "2026-01-01T00:00:00Z", "promotions": [], "material": secret}]}),
                "was ever promoted",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": secret, "keks": keks}),
                "line 1",
            ),
            (
                serde_json::json!({"format": FORMAT, "generation": 1, "highest_kek": 0, "keks": keks}),
                "highest_kek",
            ),
        ];
        for (value, want) in cases {
            let err = KeyringFile::parse(p(), value.to_string().as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} lacks {want}");
            assert!(!err.contains(&secret), "{err} leaks material");
            assert!(!err.contains(&secret[..8]), "{err} leaks part of it");
        }
    }

    fn token_ref() -> Pkcs11Ref {
        Pkcs11Ref {
            token: "atrest".into(),
            serial: Some("0123abcd".into()),
            key_label: "atrest-kek".into(),
            id: vec![0xa1, 0xb2],
            check_value: [0x5c; CHECK_LEN],
        }
    }

    #[test]
    fn token_keks_round_trip_beside_local_ones() {
        let mut k = KeyringFile::new_with_primary().unwrap();
        let n = k.add_pkcs11(token_ref()).unwrap();
        assert_eq!(n, 2);
        assert!(k.primary().unwrap().number == 1, "added decrypt-only");
        let e = k.add_pkcs11(token_ref()).unwrap_err().to_string();
        assert!(e.contains("KEK 2 already names this token object"), "{e}");
        k.promote(2).unwrap();
        let bytes = k.to_bytes();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.contains("\"pkcs11\"") && text.contains("5c5c5c"),
            "{text}"
        );
        let back = KeyringFile::parse(p(), &bytes).unwrap();
        assert_eq!(back.primary().unwrap().number, 2);
        match back.keks()[1].material() {
            KekMaterial::Pkcs11(r) => assert_eq!(r, &token_ref()),
            KekMaterial::Local(_) => panic!("kind lost"),
        }
        assert_eq!(back.keks()[0].material().kind(), "local");
        let mut bad = token_ref();
        bad.token = String::new();
        assert!(
            k.add_pkcs11(bad)
                .unwrap_err()
                .to_string()
                .contains("pkcs11.token")
        );
    }

    #[test]
    fn bad_token_references_name_the_field_and_never_echo_a_value() {
        let good = KeyringFile::new_with_primary().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&good.to_bytes()).unwrap();
        let secret = json["keks"][0]["material"].as_str().unwrap().to_owned();
        let kek = |pkcs11: serde_json::Value, material: Option<&str>| {
            let mut k = serde_json::json!({"kek": 1, "created": "2026-01-01T00:00:00Z", "promotions": [1], "pkcs11": pkcs11});
            if let Some(m) = material {
                k["material"] = m.into();
            }
            serde_json::json!({"format": FORMAT, "generation": 1, "keks": [k]})
        };
        let ok = serde_json::json!({"token": "t", "key_label": "l", "id": "01", "check_value": "00".repeat(16)});
        assert!(KeyringFile::parse(p(), kek(ok.clone(), None).to_string().as_bytes()).is_ok());
        let with = |field: &str, v: serde_json::Value| {
            let mut o = ok.clone();
            o[field] = v;
            kek(o, None)
        };
        let cases = vec![
            (kek(ok.clone(), Some(&secret)), "exactly one of material"),
            (with("token", secret.clone().into()), "keks[0].pkcs11.token"),
            (
                with("serial", format!("{secret}{secret}").into()),
                "keks[0].pkcs11.serial",
            ),
            (
                with("key_label", format!("{secret}\n").into()),
                "keks[0].pkcs11.key_label",
            ),
            (with("id", secret.clone().into()), "keks[0].pkcs11.id"),
            (with("id", "".into()), "keks[0].pkcs11.id must be 1 to"),
            (
                with("check_value", "00".into()),
                "keks[0].pkcs11.check_value must be 16 bytes",
            ),
            (with("check_value", "AB".repeat(16).into()), "lowercase"),
            (with(&secret, "x".into()), "unknown field"),
        ];
        for (value, want) in cases {
            let err = KeyringFile::parse(p(), value.to_string().as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} lacks {want}");
            assert!(!err.contains(&secret[..8]), "{err} leaks a value");
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let k = KeyringFile::new_with_primary().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&k.to_bytes()).unwrap();
        let secret = json["keks"][0]["material"].as_str().unwrap().to_owned();
        let shown = format!("{k:?}");
        assert!(!shown.contains(&secret));
        assert!(!shown.contains(&format!("{:?}", key(&k.keks()[0]))));
        assert!(shown.contains("redacted"));
    }
}
