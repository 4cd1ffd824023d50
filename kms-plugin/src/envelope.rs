//! The plugin's ciphertext format: what Encrypt returns and Decrypt accepts.
//!
//! ```text
//! offset  size  field
//! 0       3     magic "ATR"
//! 3       1     format version: 1 = a local KEK, 2 = a KEK in a PKCS#11 token
//! 4       4     KEK number, big-endian u32
//! 8       12    AES-GCM nonce (random per call)
//! 20      n+16  AES-256-GCM(ciphertext of n plaintext bytes ‖ tag)
//! ```
//! The associated data is the 8-byte header followed by the `key_id` bytes, so a
//! ciphertext is bound to the key_id it was returned with: presenting it under
//! any other key_id (even one of the same KEK) fails authentication.
//!
//! Both versions have the same layout; the version says which kind of KEK
//! made the ciphertext (local: AES-256-GCM in this process under a key
//! derived from the keyring file; token: AES-256-GCM inside the token,
//! `CKM_AES_GCM` with our random 12-byte IV and a 128-bit tag), so a
//! ciphertext is never handed to the wrong kind of key. Version 1
//! ciphertexts are exactly what earlier builds wrote.

use thiserror::Error;

/// The first bytes of every ciphertext this plugin writes.
pub const MAGIC: [u8; 3] = *b"ATR";
/// The format version of ciphertexts made with a local KEK.
pub const VERSION: u8 = 1;
/// The format version of ciphertexts made with a KEK in a PKCS#11 token.
pub const VERSION_TOKEN: u8 = 2;
/// Header: magic, version, KEK number.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + 4;
/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a ciphertext adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// kube-apiserver refuses ciphertexts longer than this.
pub const MAX_CIPHERTEXT_LEN: usize = 1024;
/// The largest plaintext whose ciphertext still fits in [`MAX_CIPHERTEXT_LEN`].
pub const MAX_PLAINTEXT_LEN: usize = MAX_CIPHERTEXT_LEN - OVERHEAD;

/// Why bytes are not a ciphertext of this plugin. Messages never include the bytes.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Nothing to decrypt.
    #[error("ciphertext is empty")]
    Empty,
    /// Longer than any ciphertext this plugin writes.
    #[error("ciphertext is {0} bytes, more than the {MAX_CIPHERTEXT_LEN}-byte limit")]
    TooLong(usize),
    /// Does not start with this plugin's magic: written by something else.
    #[error("ciphertext was not produced by atrest kms-plugin (unknown magic)")]
    Foreign,
    /// A version this build does not read.
    #[error(
        "ciphertext format version {0} is not supported (this build reads versions {VERSION} and {VERSION_TOKEN})"
    )]
    UnsupportedVersion(u8),
    /// Cut short.
    #[error("ciphertext is truncated: {0} bytes, at least {min} needed", min = OVERHEAD)]
    Truncated(usize),
}

/// A parsed, not yet authenticated ciphertext. Borrowed from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The format version: [`VERSION`] (local KEK) or [`VERSION_TOKEN`].
    pub version: u8,
    /// The KEK number the writer used.
    pub kek: u32,
    /// The 8-byte header, part of the associated data.
    pub header: &'a [u8],
    /// The AES-GCM nonce.
    pub nonce: &'a [u8],
    /// Ciphertext followed by the tag.
    pub sealed: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Splits `bytes` into its parts, checking everything that can be checked
    /// without a key.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        if bytes.is_empty() {
            return Err(EnvelopeError::Empty);
        }
        if bytes.len() > MAX_CIPHERTEXT_LEN {
            return Err(EnvelopeError::TooLong(bytes.len()));
        }
        if !bytes.starts_with(&MAGIC[..bytes.len().min(MAGIC.len())]) {
            return Err(EnvelopeError::Foreign);
        }
        if bytes.len() > MAGIC.len() && ![VERSION, VERSION_TOKEN].contains(&bytes[MAGIC.len()]) {
            return Err(EnvelopeError::UnsupportedVersion(bytes[MAGIC.len()]));
        }
        // The tag must be there and at least one byte of plaintext.
        if bytes.len() <= OVERHEAD {
            return Err(EnvelopeError::Truncated(bytes.len()));
        }
        let (header, rest) = bytes.split_at(HEADER_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let kek = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        Ok(Envelope {
            version: header[3],
            kek,
            header,
            nonce,
            sealed,
        })
    }

    /// The header a writer puts in front of a ciphertext made with local KEK `kek`.
    pub fn header_for(kek: u32) -> [u8; HEADER_LEN] {
        Self::header_with(VERSION, kek)
    }

    /// The header of a ciphertext of format `version` made with `kek`.
    pub fn header_with(version: u8, kek: u32) -> [u8; HEADER_LEN] {
        let n = kek.to_be_bytes();
        [
            MAGIC[0], MAGIC[1], MAGIC[2], version, n[0], n[1], n[2], n[3],
        ]
    }
}

/// The associated data that binds a ciphertext to its header and key_id.
pub fn associated_data(header: &[u8], key_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + key_id.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        let mut v = Envelope::header_for(7).to_vec();
        v.resize(len, 0xAB);
        v
    }

    #[test]
    fn parses_the_documented_layout() {
        let bytes = sample(OVERHEAD + 32);
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(env.kek, 7);
        assert_eq!(env.header, &bytes[..8]);
        assert_eq!(env.nonce.len(), NONCE_LEN);
        assert_eq!(env.sealed.len(), 32 + TAG_LEN);
    }

    #[test]
    fn refuses_every_malformed_shape() {
        assert_eq!(Envelope::parse(&[]), Err(EnvelopeError::Empty));
        assert_eq!(Envelope::parse(b"k8s:enc:"), Err(EnvelopeError::Foreign));
        assert_eq!(Envelope::parse(b"AT"), Err(EnvelopeError::Truncated(2)));
        assert_eq!(
            Envelope::parse(b"ATR\x03rest"),
            Err(EnvelopeError::UnsupportedVersion(3))
        );
        for len in 1..=OVERHEAD {
            let bytes = sample(len);
            assert!(Envelope::parse(&bytes).is_err(), "length {len} accepted");
        }
        assert_eq!(
            Envelope::parse(&sample(MAX_CIPHERTEXT_LEN + 1)),
            Err(EnvelopeError::TooLong(MAX_CIPHERTEXT_LEN + 1))
        );
        assert!(Envelope::parse(&sample(MAX_CIPHERTEXT_LEN)).is_ok());
    }

    #[test]
    fn max_plaintext_fills_the_apiserver_limit_exactly() {
        assert_eq!(MAX_PLAINTEXT_LEN + OVERHEAD, 1024);
    }
}
