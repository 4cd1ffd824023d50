//! `k8s:enc:secretbox:v1:<key>:` payload: `nonce (24) ‖ tag (16) ‖ ciphertext`
//! (NaCl secretbox, XSalsa20-Poly1305). No AAD.

use crypto_secretbox::aead::{AeadInPlace, KeyInit};
use crypto_secretbox::{Nonce, Tag, XSalsa20Poly1305};

use super::FormatError;
use crate::secret::Plaintext;

/// Nonce size.
pub const NONCE: usize = 24;
/// Poly1305 tag size.
pub const TAG: usize = 16;
/// Key size.
pub const KEY: usize = 32;

fn cipher(key: &[u8]) -> Result<XSalsa20Poly1305, FormatError> {
    if key.len() != KEY {
        return Err(FormatError::KeySize {
            cipher: "secretbox",
            len: key.len(),
            expected: "32 bytes",
        });
    }
    XSalsa20Poly1305::new_from_slice(key).map_err(|_| FormatError::KeySize {
        cipher: "secretbox",
        len: key.len(),
        expected: "32 bytes",
    })
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
pub fn seal(key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, FormatError> {
    let nonce = crate::rand::bytes::<NONCE>()?;
    seal_with_nonce(key, &nonce, plaintext)
}

/// Encrypts with the given nonce (for known-answer tests; never reuse a nonce).
pub fn seal_with_nonce(
    key: &[u8],
    nonce: &[u8; NONCE],
    plaintext: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let cipher = cipher(key)?;
    let mut body = plaintext.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(nonce), b"", &mut body)
        .map_err(|_| FormatError::TooLarge("plaintext too large for secretbox".into()))?;
    let mut out = Vec::with_capacity(NONCE + TAG + body.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decrypts `nonce ‖ tag ‖ ciphertext`.
pub fn open(key: &[u8], payload: &[u8]) -> Result<Plaintext, FormatError> {
    check_structure(payload)?;
    let cipher = cipher(key)?;
    let (nonce, rest) = payload.split_at(NONCE);
    let (tag, body) = rest.split_at(TAG);
    // Decryption happens in place only after the tag verified, so on error `buf`
    // still holds ciphertext.
    let mut buf = body.to_vec();
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            b"",
            &mut buf,
            Tag::from_slice(tag),
        )
        .map_err(|_| FormatError::AuthFailed)?;
    Ok(Plaintext::new(buf))
}
