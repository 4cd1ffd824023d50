//! The KEK backend seam: what the gRPC service needs from wherever KEKs live.
//! The local keyring ([`crate::keyring::LocalKeyring`]) is the default; an HSM
//! backend would implement the same traits.

use std::sync::Arc;

use thiserror::Error;
use zeroize::Zeroizing;

use crate::envelope::{EnvelopeError, MAX_PLAINTEXT_LEN};

/// A source of KEK snapshots.
pub trait KekBackend: Send + Sync + 'static {
    /// The KEK set in service now. Status and Encrypt each take one snapshot
    /// and use only it, so the key_id Encrypt returns is the one Status
    /// reports for that snapshot.
    fn current(&self) -> Arc<dyn KekSet>;
}

/// One immutable set of KEKs: a primary for writes, all for reads.
pub trait KekSet: Send + Sync {
    /// The primary KEK's key_id.
    fn key_id(&self) -> &str;
    /// Encrypts under the primary; the result decrypts with [`Self::key_id`].
    fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, EncryptError>;
    /// Decrypts a ciphertext that Encrypt returned with `key_id`.
    fn decrypt(&self, key_id: &str, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, DecryptError>;
    /// How many KEKs the set holds.
    fn kek_count(&self) -> usize;
    /// Whether Encrypt may block on I/O (the primary KEK is in a PKCS#11
    /// token): the service then runs it off the async workers.
    fn encrypt_blocks(&self) -> bool {
        false
    }
    /// Whether Decrypt for `key_id` may block on I/O (that KEK is in a
    /// token). A local KEK's reads stay on the async workers also in a
    /// mixed keyring (and while its token is away).
    fn decrypt_blocks(&self, _key_id: &str) -> bool {
        false
    }
}

/// Why Encrypt failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EncryptError {
    /// Nothing to encrypt.
    #[error("plaintext is empty")]
    EmptyPlaintext,
    /// Its ciphertext would not fit kube-apiserver's 1024-byte limit.
    #[error("plaintext is {0} bytes; at most {MAX_PLAINTEXT_LEN} fit in a 1024-byte ciphertext")]
    PlaintextTooLong(usize),
    /// The cipher refused (cannot happen for valid lengths).
    #[error("encryption failed")]
    Cipher,
    /// The token holding the primary KEK cannot be used now (gone); the
    /// words say why.
    #[error("{0}")]
    Unavailable(String),
    /// Every session of the token's pool stayed busy for the whole wait;
    /// the words name the pool.
    #[error("{0}")]
    Exhausted(String),
}

/// Why Decrypt refused. Never includes the ciphertext or the plaintext.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecryptError {
    /// Not a well-formed ciphertext of this plugin.
    #[error(transparent)]
    Malformed(#[from] EnvelopeError),
    /// No KEK in the keyring answers to this key_id.
    #[error("key_id is not in this plugin's keyring (retired, or from another keyring)")]
    UnknownKeyId,
    /// The ciphertext names another KEK than the key_id does.
    #[error("ciphertext was made with KEK {in_ciphertext}, but its key_id names KEK {for_key_id}")]
    KekMismatch {
        /// KEK number in the ciphertext header.
        in_ciphertext: u32,
        /// KEK number the key_id belongs to.
        for_key_id: u32,
    },
    /// Tampered, or not encrypted under this key_id.
    #[error("ciphertext failed authentication: tampered, or not produced under this key_id")]
    Authentication,
    /// The header's format version is for another kind of KEK than the one
    /// the key_id names.
    #[error("ciphertext format version {version} does not match the kind of KEK its key_id names")]
    KindMismatch {
        /// The version in the header.
        version: u8,
    },
    /// The token holding the KEK cannot be used now; the words say why.
    #[error("{0}")]
    Unavailable(String),
    /// Every session of the token's pool stayed busy for the whole wait;
    /// the words name the pool.
    #[error("{0}")]
    Exhausted(String),
}

/// Runs `f`, which may call into a token (a self-test, a reload's checks),
/// from an async task without stalling the runtime if the token hangs: on
/// the multi-threaded runtime the worker hands its other tasks to another
/// thread for the duration (`block_in_place`). These calls are rare (a
/// self-test interval, a reload), so that hand-off's cost does not matter;
/// the per-request calls use the token call threads instead.
pub fn may_block<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
