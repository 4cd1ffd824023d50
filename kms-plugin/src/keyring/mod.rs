//! The local keyring: the default KEK backend.
//!
//! [`file`] is the on-disk format and its edits; [`Keyring`] is one loaded,
//! immutable snapshot of it with ciphers ready; [`LocalKeyring`] holds the
//! snapshot in service and swaps it atomically on reload.

pub mod admin;
pub mod file;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use arc_swap::ArcSwap;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::backend::{DecryptError, EncryptError, KekBackend, KekSet};
use crate::envelope::{self, Envelope, MAX_PLAINTEXT_LEN};
use file::{KeyringFile, KeyringFileError, RawKeyring};

/// HKDF info for the AES-256-GCM key a KEK encrypts with (kept apart from the
/// key_id derivation, so a key_id reveals nothing about the encryption key).
const ENCRYPTION_KEY_INFO: &[u8] = b"atrest kms-plugin v1 kek encryption key";
/// HKDF info prefix for key_ids.
const KEY_ID_INFO: &[u8] = b"atrest kms-plugin v1 key_id";

/// One KEK with its cipher ready and every key_id it answers to.
struct Kek {
    number: u32,
    cipher: Aes256Gcm,
}

/// What `keyring list` and metrics show of a KEK. No key bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KekInfo {
    /// Its number in the keyring.
    pub kek: u32,
    /// `primary` or `decrypt-only`.
    pub state: &'static str,
    /// When it was generated.
    pub created: String,
    /// Its latest key_id, if it was ever primary.
    pub key_id: Option<String>,
    /// Every key_id it ever had, oldest first.
    pub key_ids: Vec<String>,
}

/// One loaded keyring file: immutable, shared by every call that started
/// while it was in service.
pub struct Keyring {
    generation: u64,
    digest: [u8; 32],
    primary: Arc<Kek>,
    primary_key_id: String,
    by_key_id: HashMap<String, Arc<Kek>>,
    infos: Vec<KekInfo>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("generation", &self.generation)
            .field("primary_key_id", &self.primary_key_id)
            .field("keks", &self.infos)
            .finish_non_exhaustive()
    }
}

/// The key_id of `kek` promoted at `epoch`: public, derived, never secret.
/// The HKDF output is a PRF of the key, so it says nothing about the key; the
/// epoch makes a reinstated KEK's id new.
fn derive_key_id(material: &[u8; file::KEK_LEN], kek: u32, epoch: u32) -> String {
    let mut info = Vec::with_capacity(KEY_ID_INFO.len() + 8);
    info.extend_from_slice(KEY_ID_INFO);
    info.extend_from_slice(&kek.to_be_bytes());
    info.extend_from_slice(&epoch.to_be_bytes());
    let mut out = [0u8; 16];
    expand(material, &info, &mut out);
    format!("atrest-v1-k{kek}-e{epoch}-{}", hex::encode(out))
}

fn expand(material: &[u8; file::KEK_LEN], info: &[u8], out: &mut [u8]) {
    // from_prk only fails for a PRK shorter than the hash (32 bytes), and
    // expand only for outputs over 255*32 bytes: neither can happen here.
    if let Ok(hk) = Hkdf::<Sha256>::from_prk(material) {
        let _ = hk.expand(info, out);
    }
}

impl Keyring {
    /// Builds a snapshot from raw file bytes.
    pub fn from_raw(path: &Path, raw: &RawKeyring) -> Result<Self, KeyringFileError> {
        let file = KeyringFile::parse(path, &raw.bytes)?;
        Self::from_file(path, &file, raw.digest)
    }

    /// Reads and builds a snapshot from the file at `path`.
    pub fn load(path: &Path) -> Result<Self, KeyringFileError> {
        Self::from_raw(path, &file::read_raw(path)?)
    }

    fn from_file(
        path: &Path,
        file: &KeyringFile,
        digest: [u8; 32],
    ) -> Result<Self, KeyringFileError> {
        let invalid = |reason: String| KeyringFileError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let primary_number = file
            .primary()
            .map(|r| r.kek)
            .ok_or_else(|| invalid("no primary KEK".into()))?;
        let mut by_key_id = HashMap::new();
        let mut infos = Vec::with_capacity(file.keks.len());
        let mut primary = None;
        let mut primary_key_id = String::new();
        for record in &file.keks {
            let material = record.material().map_err(invalid)?;
            let mut enc_key = Zeroizing::new([0u8; 32]);
            expand(&material, ENCRYPTION_KEY_INFO, enc_key.as_mut());
            let kek = Arc::new(Kek {
                number: record.kek,
                cipher: Aes256Gcm::new(enc_key.as_ref().into()),
            });
            let key_ids: Vec<String> = record
                .promotions
                .iter()
                .map(|epoch| derive_key_id(&material, record.kek, *epoch))
                .collect();
            for id in &key_ids {
                by_key_id.insert(id.clone(), kek.clone());
            }
            let is_primary = record.kek == primary_number;
            if is_primary {
                primary_key_id = key_ids.last().cloned().unwrap_or_default();
                primary = Some(kek.clone());
            }
            infos.push(KekInfo {
                kek: record.kek,
                state: if is_primary {
                    "primary"
                } else {
                    "decrypt-only"
                },
                created: record.created.clone(),
                key_id: key_ids.last().cloned(),
                key_ids,
            });
        }
        let primary = primary.ok_or_else(|| invalid("no primary KEK".into()))?;
        Ok(Keyring {
            generation: file.generation,
            digest,
            primary,
            primary_key_id,
            by_key_id,
            infos,
        })
    }

    /// The file's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// SHA-256 of the file this snapshot was built from.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// What `keyring list` shows.
    pub fn infos(&self) -> &[KekInfo] {
        &self.infos
    }
}

impl KekSet for Keyring {
    fn key_id(&self) -> &str {
        &self.primary_key_id
    }

    fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, EncryptError> {
        if plaintext.is_empty() {
            return Err(EncryptError::EmptyPlaintext);
        }
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(EncryptError::PlaintextTooLong(plaintext.len()));
        }
        let header = Envelope::header_for(self.primary.number);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = envelope::associated_data(&header, &self.primary_key_id);
        let sealed = self
            .primary
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| EncryptError::Cipher)?;
        let mut out = Vec::with_capacity(header.len() + nonce.len() + sealed.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn decrypt(&self, key_id: &str, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        let env = Envelope::parse(ciphertext)?;
        let kek = self
            .by_key_id
            .get(key_id)
            .ok_or(DecryptError::UnknownKeyId)?;
        if kek.number != env.kek {
            return Err(DecryptError::KekMismatch {
                in_ciphertext: env.kek,
                for_key_id: kek.number,
            });
        }
        let aad = envelope::associated_data(env.header, key_id);
        kek.cipher
            .decrypt(
                Nonce::from_slice(env.nonce),
                Payload {
                    msg: env.sealed,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| DecryptError::Authentication)
    }

    fn kek_count(&self) -> usize {
        self.infos.len()
    }
}

/// The local keyring backend: the snapshot in service, swapped on reload.
pub struct LocalKeyring {
    current: ArcSwap<Keyring>,
}

impl std::fmt::Debug for LocalKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyring")
            .field("current", &self.current.load())
            .finish()
    }
}

impl LocalKeyring {
    /// Puts `keyring` in service.
    pub fn new(keyring: Keyring) -> Self {
        LocalKeyring {
            current: ArcSwap::from_pointee(keyring),
        }
    }

    /// The snapshot in service, with its concrete type (for reload decisions).
    pub fn snapshot(&self) -> Arc<Keyring> {
        self.current.load_full()
    }

    /// Replaces the snapshot in service. Calls already running finish on the
    /// snapshot they started with.
    pub fn replace(&self, keyring: Keyring) {
        self.current.store(Arc::new(keyring));
    }
}

impl KekBackend for LocalKeyring {
    fn current(&self) -> Arc<dyn KekSet> {
        self.current.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn keyring(file: &KeyringFile) -> Keyring {
        Keyring::from_file(&PathBuf::from("k.json"), file, [0; 32]).unwrap()
    }

    #[test]
    fn round_trip_and_binding_to_key_id() {
        let p = Path::new("k.json");
        let mut f = KeyringFile::new_with_primary();
        let k1 = keyring(&f);
        let ct = k1.encrypt(b"seed seed seed seed seed seed 32").unwrap();
        assert_eq!(
            &*k1.decrypt(k1.key_id(), &ct).unwrap(),
            b"seed seed seed seed seed seed 32"
        );
        assert_ne!(
            ct,
            k1.encrypt(b"seed seed seed seed seed seed 32").unwrap(),
            "nonce reuse"
        );

        f.add(true);
        let k2 = keyring(&f);
        assert_ne!(k1.key_id(), k2.key_id());
        assert!(
            k2.decrypt(k1.key_id(), &ct).is_ok(),
            "old ciphertext must still decrypt"
        );
        // The right KEK but the wrong key_id fails: the key_id is bound.
        f.promote(p, 1).unwrap();
        let k3 = keyring(&f);
        assert!(k3.key_id().starts_with("atrest-v1-k1-e3-"));
        assert_ne!(k3.key_id(), k1.key_id(), "reinstated KEK reused a key_id");
        assert_eq!(
            k3.decrypt(k3.key_id(), &ct),
            Err(DecryptError::Authentication)
        );
        assert!(k3.decrypt(k1.key_id(), &ct).is_ok());
        assert_eq!(k3.decrypt("nope", &ct), Err(DecryptError::UnknownKeyId));
    }

    #[test]
    fn key_ids_depend_only_on_the_file() {
        let f = KeyringFile::new_with_primary();
        let bytes = f.to_bytes();
        let a = keyring(&KeyringFile::parse(Path::new("a"), &bytes).unwrap());
        let b = keyring(&KeyringFile::parse(Path::new("b"), &bytes).unwrap());
        assert_eq!(a.key_id(), b.key_id());
        let ct = a.encrypt(b"x").unwrap();
        assert_eq!(&*b.decrypt(a.key_id(), &ct).unwrap(), b"x");
    }

    #[test]
    fn plaintext_limits() {
        let k = keyring(&KeyringFile::new_with_primary());
        assert_eq!(k.encrypt(b""), Err(EncryptError::EmptyPlaintext));
        let max = vec![7u8; MAX_PLAINTEXT_LEN];
        assert_eq!(k.encrypt(&max).unwrap().len(), 1024);
        assert_eq!(
            k.encrypt(&[7u8; MAX_PLAINTEXT_LEN + 1]),
            Err(EncryptError::PlaintextTooLong(MAX_PLAINTEXT_LEN + 1))
        );
    }

    #[test]
    fn tampering_anywhere_is_refused() {
        let k = keyring(&KeyringFile::new_with_primary());
        let ct = k.encrypt(&[9u8; 32]).unwrap();
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x01;
            assert!(
                k.decrypt(k.key_id(), &bad).is_err(),
                "byte {i} flip accepted"
            );
        }
        for len in 0..ct.len() {
            assert!(
                k.decrypt(k.key_id(), &ct[..len]).is_err(),
                "prefix {len} accepted"
            );
        }
    }

    proptest::proptest! {
        /// Whatever arrives from the network, Decrypt answers with an error
        /// (or, for a genuine ciphertext, the plaintext), never a panic.
        #[test]
        fn decrypt_of_arbitrary_input_never_panics(
            key_id in ".{0,80}",
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1100),
        ) {
            let k = keyring(&KeyringFile::new_with_primary());
            proptest::prop_assert!(k.decrypt(&key_id, &bytes).is_err());
            let mut ours = Envelope::header_for(1).to_vec();
            ours.extend_from_slice(&bytes);
            proptest::prop_assert!(k.decrypt(k.key_id(), &ours).is_err());
        }
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let f = KeyringFile::new_with_primary();
        let material = f.keks[0].material().unwrap();
        let k = keyring(&f);
        let shown = format!("{k:?} {:?}", LocalKeyring::new(keyring(&f)));
        let hexed = hex::encode(material.as_ref());
        assert!(!shown.contains(&hexed), "{shown}");
        assert!(
            !shown.contains(&format!("{:?}", material.as_ref())),
            "{shown}"
        );
        assert!(shown.contains(k.key_id()));
    }
}
