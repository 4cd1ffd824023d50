//! The byte formats kube-apiserver stores in etcd, one module per provider.
//! Functions here work on the payload *after* the prefix; [`prefix`] builds
//! and splits prefixes, and [`crate::classify_value`] / [`crate::read`] put it together.

pub mod aescbc;
pub mod aesgcm;
pub mod kmsv1;
pub mod kmsv2;
pub mod plaintext;
pub mod prefix;
pub mod secretbox;

use crate::rand::RandomError;

/// Why a stored payload could not be decoded or encoded. Never contains key
/// material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The payload is shorter than the format's fixed parts.
    #[error("payload too short: {len} bytes, need at least {min}")]
    TooShort {
        /// Payload length.
        len: usize,
        /// Minimum length of the format.
        min: usize,
    },
    /// AES-CBC data is not whole blocks, or has no data block after the IV.
    #[error("AES-CBC payload of {len} bytes is not an IV followed by one or more 16-byte blocks")]
    CbcLength {
        /// Payload length.
        len: usize,
    },
    /// AES-CBC decrypted but the PKCS#7 padding is wrong (wrong key or corrupted data).
    #[error("AES-CBC padding is invalid (wrong key or corrupted data)")]
    BadPadding,
    /// AEAD authentication failed: wrong key, wrong etcd key (AAD) or tampered data.
    #[error(
        "authentication failed (wrong key, value moved from another etcd key, or tampered data)"
    )]
    AuthFailed,
    /// The key has the wrong size for the cipher.
    #[error("{cipher} key is {len} bytes; it must be {expected}")]
    KeySize {
        /// Cipher name.
        cipher: &'static str,
        /// Given length.
        len: usize,
        /// Allowed lengths.
        expected: &'static str,
    },
    /// The KMS v2 `EncryptedObject` does not decode as protobuf.
    #[error("KMS v2 EncryptedObject does not decode: {0}")]
    Protobuf(String),
    /// The KMS v2 `EncryptedObject` breaks one of kube-apiserver's rules.
    #[error("invalid KMS v2 EncryptedObject: {field}: {message}")]
    InvalidObject {
        /// Field name as in the apiserver's proto (`keyID`, `encryptedDEKSource`, ...).
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A KMS v1 payload whose encrypted DEK length prefix runs past the end.
    #[error(
        "KMS v1 payload: encrypted DEK length {dek_len} exceeds the {available} bytes available"
    )]
    KmsV1Length {
        /// Declared encrypted DEK length.
        dek_len: usize,
        /// Bytes after the length field.
        available: usize,
    },
    /// The OS random generator failed while encrypting.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// A value too large for the format (e.g. a KMS v1 DEK over 65535 bytes).
    #[error("{0}")]
    TooLarge(String),
}
