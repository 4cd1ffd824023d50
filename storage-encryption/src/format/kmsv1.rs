//! `k8s:enc:kms:v1:<provider>:` payload (deprecated KMS v1):
//! `uint16 BE len(encDEK) ‖ encDEK ‖ data`, where `data` is AES-256-GCM
//! (`nonce ‖ ct ‖ tag`, AAD = etcd key) or, for values written by Kubernetes
//! ≤ 1.24, AES-CBC (`IV ‖ PKCS#7`). The DEK is the plugin's Decrypt of encDEK.

use super::FormatError;
use crate::secret::{Plaintext, Seed};

/// The two parts of a KMS v1 payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsV1Parts<'a> {
    /// The plugin's ciphertext of the DEK.
    pub encrypted_dek: &'a [u8],
    /// The data encrypted under the DEK.
    pub data: &'a [u8],
}

/// Splits a payload into encrypted DEK and data.
pub fn split(payload: &[u8]) -> Result<KmsV1Parts<'_>, FormatError> {
    let (len_bytes, rest) = payload
        .split_first_chunk::<2>()
        .ok_or(FormatError::TooShort {
            len: payload.len(),
            min: 2,
        })?;
    let dek_len = usize::from(u16::from_be_bytes(*len_bytes));
    if dek_len > rest.len() {
        return Err(FormatError::KmsV1Length {
            dek_len,
            available: rest.len(),
        });
    }
    let (encrypted_dek, data) = rest.split_at(dek_len);
    Ok(KmsV1Parts {
        encrypted_dek,
        data,
    })
}

/// Builds a payload from an encrypted DEK and encrypted data.
pub fn join(encrypted_dek: &[u8], data: &[u8]) -> Result<Vec<u8>, FormatError> {
    let len = u16::try_from(encrypted_dek.len()).map_err(|_| {
        FormatError::TooLarge(format!(
            "KMS v1 encrypted DEK of {} bytes exceeds 65535",
            encrypted_dek.len()
        ))
    })?;
    let mut out = Vec::with_capacity(2 + encrypted_dek.len() + data.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(encrypted_dek);
    out.extend_from_slice(data);
    Ok(out)
}

/// Decrypts the data part with the DEK: AES-256-GCM first, then the AES-CBC
/// fallback. Returns the plaintext and whether the CBC fallback was used (such a
/// read is stale).
pub fn open(dek: &Seed, data: &[u8], aad: &[u8]) -> Result<(Plaintext, bool), FormatError> {
    match super::aesgcm::open(dek.expose(), data, aad) {
        Ok(plain) => Ok((plain, false)),
        Err(gcm_err) => match super::aescbc::decrypt(dek.expose(), data) {
            Ok(plain) => Ok((plain, true)),
            Err(_) => Err(gcm_err),
        },
    }
}

/// Encrypts `plaintext` the way current KMS v1 writes: AES-256-GCM under `dek`,
/// prefixed with the encrypted DEK. (Writes with KMS v1 are for tests; v1 is deprecated.)
pub fn seal(
    dek: &Seed,
    encrypted_dek: &[u8],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let data = super::aesgcm::seal(dek.expose(), plaintext, aad)?;
    join(encrypted_dek, &data)
}

/// For a classified `rest` (what follows `k8s:enc:kms:v1:`), the payload if the
/// value belongs to provider `name` (provider names may contain `:`).
pub fn strip_provider<'r>(rest: &'r [u8], name: &str) -> Option<&'r [u8]> {
    rest.strip_prefix(name.as_bytes())?.strip_prefix(b":")
}

/// Picks which of `names` a `rest` belongs to: the longest name that matches, so
/// `a:b` wins over `a` when both are configured.
pub fn match_provider<'n, I>(rest: &[u8], names: I) -> Option<&'n str>
where
    I: IntoIterator<Item = &'n str>,
{
    names
        .into_iter()
        .filter(|n| strip_provider(rest, n).is_some())
        .max_by_key(|n| n.len())
}
