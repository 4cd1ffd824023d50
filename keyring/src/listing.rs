//! The one listing type: what `kms-plugin keyring list --output json` prints,
//! what the rotator reads back, and what the plugin keeps of a keyring in
//! service to judge the next one ([`crate::check_successor`]). No key bytes.
//!
//! ```json
//! {
//!   "format": "atrest.keyring.list/v1",
//!   "lineage": "5f0c…",
//!   "generation": 3,
//!   "primary": 2,
//!   "key_id": "atrest-v1-k2-e2-…",
//!   "keks": [
//!     { "kek": 1, "state": "decrypt-only", "created": "…", "fingerprint": "hkdf-sha256:…",
//!       "key_id": "atrest-v1-k1-e1-…", "key_ids": ["atrest-v1-k1-e1-…"] },
//!     { "kek": 2, "state": "primary", "created": "…", "fingerprint": "hkdf-sha256:…",
//!       "key_id": "atrest-v1-k2-e2-…", "key_ids": ["atrest-v1-k2-e2-…"],
//!       "kind": "pkcs11", "pkcs11": { "token": "atrest", "key_label": "…", "id": "…", "check_value": "…" } }
//!   ]
//! }
//! ```
//! `kind` is `local` (key bytes in the file) or `pkcs11` (a reference to a
//! token key, shown in `pkcs11`: all public). Both were added without a
//! format change: a reader that predates them ignores them, and a listing
//! without them reads as local KEKs.
//!
//! `format` changes whenever a field changes meaning or goes away; a reader
//! refuses a format it does not know rather than guess.

use serde::{Deserialize, Serialize};

use crate::derive;
use crate::file::{KekMaterial, KeyringFile};

/// The `format` of every listing this build prints.
pub const LISTING_FORMAT: &str = "atrest.keyring.list/v1";

/// What a KEK is for in its keyring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KekState {
    /// Encrypts new data (exactly one KEK per keyring).
    Primary,
    /// Decrypts only.
    DecryptOnly,
}

impl KekState {
    /// `primary` or `decrypt-only`, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            KekState::Primary => "primary",
            KekState::DecryptOnly => "decrypt-only",
        }
    }
}

impl std::fmt::Display for KekState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for KekState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One KEK in a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekInfo {
    /// Its number in the keyring (what `--kek N` names).
    pub kek: u32,
    /// Primary or decrypt-only.
    pub state: KekState,
    /// When it was generated (RFC 3339).
    #[serde(default)]
    pub created: String,
    /// Public fingerprint of its material (see [`crate::derive::fingerprint`]).
    #[serde(default)]
    pub fingerprint: String,
    /// Its latest key_id; `None` for a KEK never promoted.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Every key_id it ever had, oldest first.
    #[serde(default)]
    pub key_ids: Vec<String>,
    /// `local` or `pkcs11` (empty in listings that predate it: local).
    #[serde(default)]
    pub kind: String,
    /// Where a token KEK is (public); `None` for a local KEK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<Pkcs11Info>,
}

/// The public reference of a KEK kept in a PKCS#11 token, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pkcs11Info {
    /// Token label.
    pub token: String,
    /// Token serial, when pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The key object's `CKA_LABEL`.
    pub key_label: String,
    /// The key object's `CKA_ID`, hex.
    pub id: String,
    /// The public check value, hex (see [`crate::pkcs11`]).
    pub check_value: String,
}

/// A keyring as `keyring list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// [`LISTING_FORMAT`] when printed by this build. Empty when read from
    /// somewhere that predates it (a rotator state file).
    #[serde(default)]
    pub format: String,
    /// The keyring's lineage, if it has one yet.
    #[serde(default)]
    pub lineage: Option<String>,
    /// The file's generation.
    pub generation: u64,
    /// The primary KEK's number.
    pub primary: u32,
    /// The primary KEK's current key_id.
    #[serde(default)]
    pub key_id: String,
    /// Every KEK, in file order.
    pub keks: Vec<KekInfo>,
}

impl Listing {
    /// The listing of a loaded keyring.
    pub fn of(file: &KeyringFile) -> Self {
        let primary = file.primary().map(|k| k.number).unwrap_or(0);
        let keks: Vec<KekInfo> = file
            .keks()
            .iter()
            .map(|k| {
                let key_ids: Vec<String> = k
                    .promotions
                    .iter()
                    .map(|epoch| derive::key_id(k.material(), k.number, *epoch))
                    .collect();
                KekInfo {
                    kek: k.number,
                    state: if k.number == primary {
                        KekState::Primary
                    } else {
                        KekState::DecryptOnly
                    },
                    created: k.created.clone(),
                    fingerprint: derive::fingerprint(k.material()),
                    key_id: key_ids.last().cloned(),
                    key_ids,
                    kind: k.material().kind().into(),
                    pkcs11: match k.material() {
                        KekMaterial::Pkcs11(r) => Some(Pkcs11Info {
                            token: r.token.clone(),
                            serial: r.serial.clone(),
                            key_label: r.key_label.clone(),
                            id: hex::encode(&r.id),
                            check_value: hex::encode(r.check_value),
                        }),
                        _ => None,
                    },
                }
            })
            .collect();
        let key_id = keks
            .iter()
            .find(|k| k.kek == primary)
            .and_then(|k| k.key_id.clone())
            .unwrap_or_default();
        Listing {
            format: LISTING_FORMAT.into(),
            lineage: file.lineage().map(str::to_owned),
            generation: file.generation(),
            primary,
            key_id,
            keks,
        }
    }

    /// The primary KEK's entry.
    pub fn primary_kek(&self) -> Option<&KekInfo> {
        self.kek(self.primary)
    }

    /// A KEK by number.
    pub fn kek(&self, n: u32) -> Option<&KekInfo> {
        self.keks.iter().find(|k| k.kek == n)
    }

    /// Every key_id of every KEK.
    pub fn all_key_ids(&self) -> Vec<String> {
        self.keks
            .iter()
            .flat_map(|k| k.key_ids.iter().cloned())
            .collect()
    }

    /// The JSON `keyring list --output json` prints.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string_pretty(self)
    }

    /// The human table `keyring list` prints.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "generation {}; primary KEK {}; key_id {}; lineage {}\n",
            self.generation,
            self.primary,
            self.key_id,
            self.lineage
                .as_deref()
                .unwrap_or("none (added on the next edit)")
        );
        let _ = writeln!(out, "{:<5} {:<13} {:<21} KEY_ID", "KEK", "STATE", "CREATED");
        for k in &self.keks {
            let _ = writeln!(
                out,
                "{:<5} {:<13} {:<21} {}",
                k.kek,
                k.state.as_str(),
                k.created,
                k.key_id.as_deref().unwrap_or("-")
            );
            for old in k.key_ids.iter().rev().skip(1) {
                let _ = writeln!(out, "{:<41} {old} (earlier)", "");
            }
            if let Some(p) = &k.pkcs11 {
                let _ = writeln!(
                    out,
                    "{:<5} in PKCS#11 token {:?}{}, key label {:?}, CKA_ID {}",
                    "",
                    p.token,
                    p.serial
                        .as_deref()
                        .map(|s| format!(" (serial {s})"))
                        .unwrap_or_default(),
                    p.key_label,
                    p.id
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_round_trips_and_reads_older_shapes() {
        let mut f = KeyringFile::new_with_primary().unwrap();
        f.add(false).unwrap();
        let l = Listing::of(&f);
        assert_eq!(l.format, LISTING_FORMAT);
        assert_eq!(l.primary_kek().unwrap().state, KekState::Primary);
        assert_eq!(l.kek(2).unwrap().state, "decrypt-only");
        assert_eq!(l.kek(2).unwrap().key_id, None);
        let json = l.to_json().unwrap();
        assert!(json.contains("\"decrypt-only\""), "{json}");
        let back: Listing = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
        // What a rotator state file written before `format` holds.
        let old: Listing = serde_json::from_str(
            r#"{"generation":3,"primary":2,"keks":[{"kek":2,"state":"primary","key_id":"b","key_ids":["b"]}]}"#,
        )
        .unwrap();
        assert_eq!(old.format, "");
        assert_eq!(old.primary_kek().unwrap().key_id.as_deref(), Some("b"));
    }

    #[test]
    fn the_text_names_states_and_earlier_key_ids() {
        let mut f = KeyringFile::new_with_primary().unwrap();
        f.add(true).unwrap();
        f.promote(1).unwrap();
        let text = Listing::of(&f).to_text();
        assert!(text.contains("primary") && text.contains("decrypt-only"));
        assert!(text.contains("(earlier)"), "{text}");
    }
}
