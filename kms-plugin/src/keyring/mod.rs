//! The local keyring backend: one loaded, immutable snapshot of the keyring
//! file with its ciphers ready ([`Keyring`]), and the snapshot in service,
//! swapped atomically on reload ([`LocalKeyring`]).
//!
//! The file itself (format, rules, edits, key_id derivation, the listing and
//! the successor check) is the `keyring` crate's; this module only serves it.
//!
//! A KEK kept in a PKCS#11 token is served through the process's token
//! configuration ([`crate::pkcs11::serving`]): its key handle is found and
//! its check value verified when the snapshot is built (start and reload),
//! and its calls run inside the token. A keyring with such a KEK is refused
//! when the plugin has no `--pkcs11-module`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub use ::keyring::RawKeyring;
use ::keyring::{Dropped, KeyringError, KeyringFile, Listing};
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use crate::backend::{DecryptError, EncryptError, KekBackend, KekSet};
use crate::envelope::{self, Envelope, MAX_PLAINTEXT_LEN, VERSION, VERSION_TOKEN};
use crate::pkcs11::serving::TokenKey;

/// One KEK with its cipher ready.
struct Kek {
    number: u32,
    cipher: Cipher,
}

// One per KEK, behind an Arc: the size difference costs nothing, and the
// local cipher stays inline (no extra indirection on the hot path).
#[allow(clippy::large_enum_variant)]
enum Cipher {
    /// A local KEK: AES-256-GCM in this process.
    Local(Aes256Gcm),
    /// A KEK in a token: AES-256-GCM inside it.
    Token(TokenKey),
}

impl Cipher {
    fn version(&self) -> u8 {
        match self {
            Cipher::Local(_) => VERSION,
            Cipher::Token(_) => VERSION_TOKEN,
        }
    }
}

/// One loaded keyring file: immutable, shared by every call that started
/// while it was in service.
pub struct Keyring {
    digest: [u8; 32],
    primary: Arc<Kek>,
    by_key_id: HashMap<String, Arc<Kek>>,
    /// What `keyring list` shows of it (no key bytes); also what the next
    /// file is judged against.
    listing: Listing,
    /// Whether it holds a KEK in a token (calls may block).
    blocks: bool,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("listing", &self.listing)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Builds a snapshot from raw file bytes.
    pub fn from_raw(path: &Path, raw: &RawKeyring) -> Result<Self, KeyringError> {
        let file = KeyringFile::parse(path, &raw.bytes)?;
        Self::from_file(path, &file, raw.digest)
    }

    /// Reads and builds a snapshot from the file at `path`.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        Self::from_raw(path, &::keyring::read_raw(path)?)
    }

    /// What `serve` loads at start: the file at `path`, which must be a newer
    /// successor of `<path>.prev` where that exists. Also returns the KEKs
    /// `.prev` had and this file dropped (to log).
    pub fn load_at_start(path: &Path) -> Result<(Self, Dropped), KeyringError> {
        let raw = ::keyring::read_raw(path)?;
        let keyring = Self::from_raw(path, &raw)?;
        let dropped = ::keyring::check_against_prev(path, &raw)?;
        Ok((keyring, dropped))
    }

    fn from_file(path: &Path, file: &KeyringFile, digest: [u8; 32]) -> Result<Self, KeyringError> {
        let listing = Listing::of(file);
        let mut by_key_id = HashMap::new();
        let mut primary = None;
        let mut blocks = false;
        for (kek, info) in file.keks().iter().zip(&listing.keks) {
            let cipher = match kek.material() {
                ::keyring::KekMaterial::Pkcs11(reference) => {
                    let Some(hsm) = crate::pkcs11::serving::installed() else {
                        return Err(KeyringError::Invalid {
                            path: path.to_owned(),
                            reason: format!(
                                "KEK {} is kept in a PKCS#11 token; serve it with --pkcs11-module",
                                kek.number
                            ),
                        });
                    };
                    blocks = true;
                    let key =
                        hsm.resolve(kek.number, reference)
                            .map_err(|e| KeyringError::Invalid {
                                path: path.to_owned(),
                                reason: format!("KEK {}: {e}", kek.number),
                            })?;
                    Cipher::Token(key)
                }
                material => {
                    let Some(enc_key) = ::keyring::derive::encryption_key(material) else {
                        return Err(KeyringError::Invalid {
                            path: path.to_owned(),
                            reason: format!(
                                "KEK {} is of a kind this build cannot serve",
                                kek.number
                            ),
                        });
                    };
                    Cipher::Local(Aes256Gcm::new(enc_key.as_ref().into()))
                }
            };
            let served = Arc::new(Kek {
                number: kek.number,
                cipher,
            });
            for id in &info.key_ids {
                by_key_id.insert(id.clone(), served.clone());
            }
            // A decrypt-only KEK also answers to the key_id its next
            // promotion will have: another host may already serve the
            // promoted copy of this file while ours is still on its way.
            if let Some(id) = file.next_promotion_key_id(kek) {
                by_key_id.insert(id, served.clone());
            }
            if kek.number == listing.primary {
                primary = Some(served);
            }
        }
        // Validation already refuses a keyring where no KEK was ever promoted.
        let primary = primary.ok_or_else(|| KeyringError::Invalid {
            path: path.to_owned(),
            reason: "no primary KEK".into(),
        })?;
        Ok(Keyring {
            digest,
            primary,
            by_key_id,
            listing,
            blocks,
        })
    }

    /// The file's generation.
    pub fn generation(&self) -> u64 {
        self.listing.generation
    }

    /// SHA-256 of the file this snapshot was built from.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// What `keyring list` shows of it.
    pub fn listing(&self) -> &Listing {
        &self.listing
    }
}

impl KekSet for Keyring {
    fn key_id(&self) -> &str {
        &self.listing.key_id
    }

    fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, EncryptError> {
        if plaintext.is_empty() {
            return Err(EncryptError::EmptyPlaintext);
        }
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(EncryptError::PlaintextTooLong(plaintext.len()));
        }
        let header = Envelope::header_with(self.primary.cipher.version(), self.primary.number);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = envelope::associated_data(&header, &self.listing.key_id);
        let sealed = match &self.primary.cipher {
            Cipher::Local(cipher) => cipher
                .encrypt(
                    &nonce,
                    Payload {
                        msg: plaintext,
                        aad: &aad,
                    },
                )
                .map_err(|_| EncryptError::Cipher)?,
            Cipher::Token(key) => key.encrypt(&nonce.into(), &aad, plaintext).map_err(|e| {
                if e.is_busy() {
                    EncryptError::Exhausted(e.to_string())
                } else {
                    EncryptError::Unavailable(e.to_string())
                }
            })?,
        };
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
        if env.version != kek.cipher.version() {
            return Err(DecryptError::KindMismatch {
                version: env.version,
            });
        }
        let aad = envelope::associated_data(env.header, key_id);
        match &kek.cipher {
            Cipher::Local(cipher) => cipher
                .decrypt(
                    Nonce::from_slice(env.nonce),
                    Payload {
                        msg: env.sealed,
                        aad: &aad,
                    },
                )
                .map(Zeroizing::new)
                .map_err(|_| DecryptError::Authentication),
            Cipher::Token(key) => {
                let mut iv = [0u8; envelope::NONCE_LEN];
                iv.copy_from_slice(env.nonce);
                match key.decrypt(&iv, &aad, env.sealed) {
                    Ok(Some(plaintext)) => Ok(plaintext),
                    Ok(None) => Err(DecryptError::Authentication),
                    Err(e) if e.is_busy() => Err(DecryptError::Exhausted(e.to_string())),
                    Err(e) => Err(DecryptError::Unavailable(e.to_string())),
                }
            }
        }
    }

    fn encrypt_blocks(&self) -> bool {
        matches!(self.primary.cipher, Cipher::Token(_))
    }

    fn decrypt_blocks(&self, key_id: &str) -> bool {
        self.blocks
            && self
                .by_key_id
                .get(key_id)
                .is_some_and(|kek| matches!(kek.cipher, Cipher::Token(_)))
    }

    fn kek_count(&self) -> usize {
        self.listing.keks.len()
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

    fn keyring(file: &KeyringFile) -> Keyring {
        Keyring::from_file(Path::new("k.json"), file, [0; 32]).unwrap()
    }

    fn new_file() -> KeyringFile {
        KeyringFile::new_with_primary().unwrap()
    }

    #[test]
    fn round_trip_and_binding_to_key_id() {
        let mut f = new_file();
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

        f.add(true).unwrap();
        let k2 = keyring(&f);
        assert_ne!(k1.key_id(), k2.key_id());
        assert!(
            k2.decrypt(k1.key_id(), &ct).is_ok(),
            "old ciphertext must still decrypt"
        );
        // The right KEK but the wrong key_id fails: the key_id is bound.
        f.promote(1).unwrap();
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
    fn a_decrypt_only_kek_already_decrypts_under_its_next_promotion() {
        let mut f = new_file();
        let added = f.add(false).unwrap();
        let before = keyring(&f);
        let mut promoted = KeyringFile::parse(Path::new("p"), &f.to_bytes()).unwrap();
        promoted.promote(added).unwrap();
        let after = keyring(&promoted);
        let ct = after.encrypt(b"written by a host that promoted").unwrap();
        assert_eq!(
            &*before.decrypt(after.key_id(), &ct).unwrap(),
            b"written by a host that promoted",
            "the copy from before the promote must read the promoted copy's writes"
        );
        // Only the next epoch: one further promotion is not accepted early.
        promoted.promote(1).unwrap();
        promoted.promote(added).unwrap();
        let later = keyring(&promoted);
        let ct = later.encrypt(b"x").unwrap();
        assert_eq!(
            before.decrypt(later.key_id(), &ct),
            Err(DecryptError::UnknownKeyId)
        );
        // The primary answers to its own key_ids only.
        assert_eq!(f.next_promotion_key_id(f.primary().unwrap()), None);
    }

    #[test]
    fn key_ids_depend_only_on_the_file() {
        let f = new_file();
        let bytes = f.to_bytes();
        let a = keyring(&KeyringFile::parse(Path::new("a"), &bytes).unwrap());
        let b = keyring(&KeyringFile::parse(Path::new("b"), &bytes).unwrap());
        assert_eq!(a.key_id(), b.key_id());
        let ct = a.encrypt(b"x").unwrap();
        assert_eq!(&*b.decrypt(a.key_id(), &ct).unwrap(), b"x");
    }

    #[test]
    fn plaintext_limits() {
        let k = keyring(&new_file());
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
        let k = keyring(&new_file());
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
            let k = keyring(&new_file());
            proptest::prop_assert!(k.decrypt(&key_id, &bytes).is_err());
            let mut ours = Envelope::header_for(1).to_vec();
            ours.extend_from_slice(&bytes);
            proptest::prop_assert!(k.decrypt(k.key_id(), &ours).is_err());
        }
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let f = new_file();
        let ::keyring::KekMaterial::Local(material) = f.keks()[0].material() else {
            unreachable!("a new keyring holds local KEKs")
        };
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
