//! `k8s:enc:kms:v2:<provider>:` payload: a protobuf `EncryptedObject`, validated
//! exactly as kube-apiserver does, and the data encryption inside it:
//! type 1 (`HKDF_SHA256_XNONCE_AES_GCM_SEED`): `info (32) ‖ nonce (12) ‖ ct ‖ tag`,
//! key = HKDF-SHA256-Expand(PRK = seed, info, 32), AES-256-GCM, AAD = etcd key;
//! type 0 (`AES_GCM_KEY`, read only): AES-256-GCM under the DEK itself.

use std::collections::BTreeMap;

pub use atrest_proto::stored::kmsv2::{EncryptedDekSourceType, EncryptedObject};
use hkdf::Hkdf;
use prost::Message;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::FormatError;
use crate::secret::{Plaintext, Seed};

/// Maximum `encryptedDEKSource` length.
pub const MAX_ENCRYPTED_DEK_SOURCE: usize = 1024;
/// Maximum `keyID` length.
pub const MAX_KEY_ID: usize = 1024;
/// Maximum sum of annotation key and value lengths.
pub const MAX_ANNOTATIONS_SIZE: usize = 32 * 1024;
/// Size of the random HKDF info in type-1 `encryptedData`.
pub const INFO: usize = 32;

/// Decodes and validates an `EncryptedObject`.
pub fn decode(payload: &[u8]) -> Result<EncryptedObject, FormatError> {
    let object =
        EncryptedObject::decode(payload).map_err(|e| FormatError::Protobuf(e.to_string()))?;
    validate(&object)?;
    Ok(object)
}

/// Validates and encodes an `EncryptedObject`.
pub fn encode(object: &EncryptedObject) -> Result<Vec<u8>, FormatError> {
    validate(object)?;
    Ok(object.encode_to_vec())
}

/// kube-apiserver's checks, applied on write and on read.
pub fn validate(object: &EncryptedObject) -> Result<(), FormatError> {
    let invalid =
        |field: &'static str, message: String| Err(FormatError::InvalidObject { field, message });
    if EncryptedDekSourceType::try_from(object.encrypted_dek_source_type).is_err() {
        return invalid(
            "encryptedDEKSourceType",
            format!(
                "unknown type {} (expected 0 or 1)",
                object.encrypted_dek_source_type
            ),
        );
    }
    if object.encrypted_data.is_empty() {
        return invalid("encryptedData", "is empty".into());
    }
    validate_encrypted_dek_source(&object.encrypted_dek_source)?;
    validate_key_id(&object.key_id)?;
    validate_annotations(
        object
            .annotations
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice())),
    )
}

/// `encryptedDEKSource`: 1..=1024 bytes.
pub fn validate_encrypted_dek_source(source: &[u8]) -> Result<(), FormatError> {
    if source.is_empty() || source.len() > MAX_ENCRYPTED_DEK_SOURCE {
        return Err(FormatError::InvalidObject {
            field: "encryptedDEKSource",
            message: format!(
                "is {} bytes; must be 1 to {MAX_ENCRYPTED_DEK_SOURCE}",
                source.len()
            ),
        });
    }
    Ok(())
}

/// `keyID`: 1..=1024 bytes.
pub fn validate_key_id(key_id: &str) -> Result<(), FormatError> {
    if key_id.is_empty() || key_id.len() > MAX_KEY_ID {
        return Err(FormatError::InvalidObject {
            field: "keyID",
            message: format!("is {} bytes; must be 1 to {MAX_KEY_ID}", key_id.len()),
        });
    }
    Ok(())
}

/// Annotations: every key a fully qualified DNS subdomain (≥ 2 labels), and the
/// sum of key and value lengths at most 32 KiB.
pub fn validate_annotations<'a, I>(annotations: I) -> Result<(), FormatError>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut total = 0usize;
    for (key, value) in annotations {
        if !is_fully_qualified_domain_name(key) {
            return Err(FormatError::InvalidObject {
                field: "annotations",
                message: format!(
                    "key {key:?} is not a fully qualified domain name with at least two labels"
                ),
            });
        }
        total = total.saturating_add(key.len()).saturating_add(value.len());
    }
    if total > MAX_ANNOTATIONS_SIZE {
        return Err(FormatError::InvalidObject {
            field: "annotations",
            message: format!("total size {total} exceeds {MAX_ANNOTATIONS_SIZE} bytes"),
        });
    }
    Ok(())
}

/// Kubernetes' `IsFullyQualifiedDomainName`: an optional trailing dot, a DNS-1123
/// subdomain (≤ 253 chars) with at least two labels, each a DNS-1123 label (≤ 63).
pub fn is_fully_qualified_domain_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() >= 2 && labels.iter().all(|l| is_dns1123_label(l))
}

fn is_dns1123_label(label: &str) -> bool {
    let b = label.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

/// The per-write AES-256-GCM key: HKDF-SHA256 Expand only (PRK = seed), info, 32 bytes.
pub fn derive_key(seed: &Seed, info: &[u8]) -> Result<Zeroizing<[u8; 32]>, FormatError> {
    // from_prk only fails for a PRK shorter than the hash output; a Seed is 32 bytes.
    let hk = Hkdf::<Sha256>::from_prk(seed.expose()).map_err(|_| FormatError::KeySize {
        cipher: "HKDF-SHA256",
        len: 32,
        expected: "at least 32 bytes",
    })?;
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand(info, okm.as_mut_slice())
        .map_err(|_| FormatError::TooLarge("HKDF output length".into()))?;
    Ok(okm)
}

/// Type-1 `encryptedData` with random info and nonce.
pub fn seal_data(seed: &Seed, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, FormatError> {
    let info = crate::rand::bytes::<INFO>()?;
    let nonce = crate::rand::bytes::<{ super::aesgcm::NONCE }>()?;
    seal_data_with(seed, &info, &nonce, plaintext, aad)
}

/// Type-1 `encryptedData` with the given info and nonce (known-answer tests).
pub fn seal_data_with(
    seed: &Seed,
    info: &[u8; INFO],
    nonce: &[u8; super::aesgcm::NONCE],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let key = derive_key(seed, info)?;
    let sealed = super::aesgcm::seal_with_nonce(key.as_slice(), nonce, plaintext, aad)?;
    let mut out = Vec::with_capacity(INFO + sealed.len());
    out.extend_from_slice(info);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Decrypts `encryptedData` of either type. `seed` is the plugin's Decrypt of
/// `encryptedDEKSource` (the seed for type 1, the DEK for type 0).
pub fn open_data(
    seed: &Seed,
    source_type: EncryptedDekSourceType,
    encrypted_data: &[u8],
    aad: &[u8],
) -> Result<Plaintext, FormatError> {
    match source_type {
        EncryptedDekSourceType::AesGcmKey => {
            super::aesgcm::open(seed.expose(), encrypted_data, aad)
        }
        EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed => {
            if encrypted_data.len() < INFO + super::aesgcm::NONCE + super::aesgcm::TAG {
                return Err(FormatError::TooShort {
                    len: encrypted_data.len(),
                    min: INFO + super::aesgcm::NONCE + super::aesgcm::TAG,
                });
            }
            let (info, rest) = encrypted_data.split_at(INFO);
            let key = derive_key(seed, info)?;
            super::aesgcm::open(key.as_slice(), rest, aad)
        }
    }
}

/// Decrypts a validated object's data with its seed.
pub fn open(seed: &Seed, object: &EncryptedObject, aad: &[u8]) -> Result<Plaintext, FormatError> {
    let source_type =
        EncryptedDekSourceType::try_from(object.encrypted_dek_source_type).map_err(|_| {
            FormatError::InvalidObject {
                field: "encryptedDEKSourceType",
                message: format!("unknown type {}", object.encrypted_dek_source_type),
            }
        })?;
    open_data(seed, source_type, &object.encrypted_data, aad)
}

/// What a KMS v2 write needs from the plugin, obtained by the caller: the current
/// seed, the plugin's ciphertext of it, the `key_id` and annotations Encrypt returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsV2WriteKey {
    /// The 32-byte seed (redacted in `Debug`).
    pub seed: Seed,
    /// The plugin's Encrypt ciphertext of the seed.
    pub encrypted_dek_source: Vec<u8>,
    /// The `key_id` Encrypt returned (equal to Status' at that time).
    pub key_id: String,
    /// The annotations Encrypt returned (stored in plaintext).
    pub annotations: BTreeMap<String, Vec<u8>>,
}

/// Builds and encodes a type-1 `EncryptedObject` payload for `plaintext` under `aad`.
pub fn seal(
    write_key: &KmsV2WriteKey,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let object = EncryptedObject {
        encrypted_data: seal_data(&write_key.seed, plaintext, aad)?,
        key_id: write_key.key_id.clone(),
        encrypted_dek_source: write_key.encrypted_dek_source.clone(),
        annotations: write_key
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        encrypted_dek_source_type: EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed as i32,
    };
    encode(&object)
}

/// The non-secret facts of a stored KMS v2 value (what `etcd-inspect` reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsV2Header {
    /// The KEK id the plugin returned from Encrypt.
    pub key_id: String,
    /// The DEK source type (0 legacy per-object DEK, 1 HKDF seed).
    pub dek_source_type: EncryptedDekSourceType,
    /// The plugin's annotations, sorted by key.
    pub annotations: BTreeMap<String, Vec<u8>>,
    /// Length of `encryptedDEKSource`.
    pub encrypted_dek_source_len: usize,
    /// Length of `encryptedData`.
    pub encrypted_data_len: usize,
}

impl KmsV2Header {
    /// Summarizes a validated object.
    pub fn of(object: &EncryptedObject) -> Self {
        Self {
            key_id: object.key_id.clone(),
            dek_source_type: EncryptedDekSourceType::try_from(object.encrypted_dek_source_type)
                .unwrap_or(EncryptedDekSourceType::AesGcmKey),
            annotations: object
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            encrypted_dek_source_len: object.encrypted_dek_source.len(),
            encrypted_data_len: object.encrypted_data.len(),
        }
    }
}
