//! `k8s:enc:aesgcm:v1:<key>:` payload: `nonce (12) ‖ ciphertext ‖ tag (16)`, AAD = etcd key.
//! Also the AES-GCM core of KMS v1 and KMS v2.

use aes::Aes192;
use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Aes256Gcm, AesGcm, Nonce};

use super::FormatError;
use crate::secret::Plaintext;

/// Nonce size.
pub const NONCE: usize = 12;
/// Tag size.
pub const TAG: usize = 16;

type Aes192Gcm = AesGcm<Aes192, U12>;

fn key_size_error(len: usize) -> FormatError {
    FormatError::KeySize {
        cipher: "AES-GCM",
        len,
        expected: "16, 24 or 32 bytes",
    }
}

/// Checks the shape without a key: nonce and tag present.
pub fn check_structure(payload: &[u8]) -> Result<(), FormatError> {
    if payload.len() < NONCE + TAG {
        return Err(FormatError::TooShort {
            len: payload.len(),
            min: NONCE + TAG,
        });
    }
    Ok(())
}

/// Encrypts with a random nonce.
pub fn seal(key: &[u8], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, FormatError> {
    let nonce = crate::rand::bytes::<NONCE>()?;
    seal_with_nonce(key, &nonce, plaintext, aad)
}

/// Encrypts with the given nonce (for known-answer tests; never reuse a nonce).
pub fn seal_with_nonce(
    key: &[u8],
    nonce: &[u8; NONCE],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let body = match key.len() {
        16 => enc::<Aes128Gcm>(key, nonce, plaintext, aad),
        24 => enc::<Aes192Gcm>(key, nonce, plaintext, aad),
        32 => enc::<Aes256Gcm>(key, nonce, plaintext, aad),
        n => return Err(key_size_error(n)),
    }?;
    let mut out = Vec::with_capacity(NONCE + body.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decrypts `nonce ‖ ciphertext ‖ tag` with `aad`.
pub fn open(key: &[u8], payload: &[u8], aad: &[u8]) -> Result<Plaintext, FormatError> {
    check_structure(payload)?;
    let (nonce, body) = payload.split_at(NONCE);
    let plain = match key.len() {
        16 => dec::<Aes128Gcm>(key, nonce, body, aad),
        24 => dec::<Aes192Gcm>(key, nonce, body, aad),
        32 => dec::<Aes256Gcm>(key, nonce, body, aad),
        n => return Err(key_size_error(n)),
    }?;
    Ok(Plaintext::new(plain))
}

fn enc<C>(key: &[u8], nonce: &[u8], msg: &[u8], aad: &[u8]) -> Result<Vec<u8>, FormatError>
where
    C: Aead + KeyInit + aes_gcm::aead::AeadCore<NonceSize = U12>,
{
    let cipher = C::new_from_slice(key).map_err(|_| key_size_error(key.len()))?;
    // Encryption fails only for inputs over ~64 GiB, far beyond an etcd value.
    cipher
        .encrypt(Nonce::from_slice(nonce), Payload { msg, aad })
        .map_err(|_| FormatError::TooLarge("plaintext too large for AES-GCM".into()))
}

fn dec<C>(key: &[u8], nonce: &[u8], body: &[u8], aad: &[u8]) -> Result<Vec<u8>, FormatError>
where
    C: Aead + KeyInit + aes_gcm::aead::AeadCore<NonceSize = U12>,
{
    let cipher = C::new_from_slice(key).map_err(|_| key_size_error(key.len()))?;
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
        .map_err(|_| FormatError::AuthFailed)
}
