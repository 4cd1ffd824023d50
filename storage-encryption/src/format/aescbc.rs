//! `k8s:enc:aescbc:v1:<key>:` payload: `IV (16) ‖ AES-CBC(PKCS#7(plaintext))`. No MAC, no AAD.

use aes::{Aes128, Aes192, Aes256};
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, KeyInit, KeyIvInit,
};

use super::FormatError;
use crate::secret::Plaintext;

/// IV and block size.
pub const BLOCK: usize = 16;

fn key_size_error(len: usize) -> FormatError {
    FormatError::KeySize {
        cipher: "AES-CBC",
        len,
        expected: "16, 24 or 32 bytes",
    }
}

/// Checks the shape without a key: an IV, then one or more whole blocks.
/// (A payload of exactly 16 bytes is an error here, where kube-apiserver panics.)
pub fn check_structure(payload: &[u8]) -> Result<(), FormatError> {
    if payload.len() < BLOCK {
        return Err(FormatError::TooShort {
            len: payload.len(),
            min: 2 * BLOCK,
        });
    }
    if !payload.len().is_multiple_of(BLOCK) || payload.len() == BLOCK {
        return Err(FormatError::CbcLength { len: payload.len() });
    }
    Ok(())
}

/// Encrypts with a random IV.
pub fn encrypt(key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, FormatError> {
    let iv = crate::rand::bytes::<BLOCK>()?;
    encrypt_with_iv(key, &iv, plaintext)
}

/// Encrypts with the given IV (for known-answer tests; use [`encrypt`] otherwise).
pub fn encrypt_with_iv(
    key: &[u8],
    iv: &[u8; BLOCK],
    plaintext: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let body = match key.len() {
        16 => enc::<Aes128>(key, iv, plaintext),
        24 => enc::<Aes192>(key, iv, plaintext),
        32 => enc::<Aes256>(key, iv, plaintext),
        n => return Err(key_size_error(n)),
    }?;
    let mut out = Vec::with_capacity(BLOCK + body.len());
    out.extend_from_slice(iv);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decrypts a payload (IV ‖ blocks) and removes the PKCS#7 padding.
pub fn decrypt(key: &[u8], payload: &[u8]) -> Result<Plaintext, FormatError> {
    check_structure(payload)?;
    let (iv, data) = payload.split_at(BLOCK);
    let plain = match key.len() {
        16 => dec::<Aes128>(key, iv, data),
        24 => dec::<Aes192>(key, iv, data),
        32 => dec::<Aes256>(key, iv, data),
        n => return Err(key_size_error(n)),
    }?;
    Ok(Plaintext::new(plain))
}

fn enc<C>(key: &[u8], iv: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, FormatError>
where
    C: BlockCipher + BlockEncrypt + KeyInit,
    cbc::Encryptor<C>: KeyIvInit,
{
    let cipher =
        cbc::Encryptor::<C>::new_from_slices(key, iv).map_err(|_| key_size_error(key.len()))?;
    Ok(cipher.encrypt_padded_vec_mut::<Pkcs7>(plaintext))
}

fn dec<C>(key: &[u8], iv: &[u8], data: &[u8]) -> Result<Vec<u8>, FormatError>
where
    C: BlockCipher + BlockDecrypt + KeyInit,
    cbc::Decryptor<C>: KeyIvInit,
{
    let cipher =
        cbc::Decryptor::<C>::new_from_slices(key, iv).map_err(|_| key_size_error(key.len()))?;
    cipher
        .decrypt_padded_vec_mut::<Pkcs7>(data)
        .map_err(|_| FormatError::BadPadding)
}
