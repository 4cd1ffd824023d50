//! Everything derived from a KEK's material, in one place so the HKDF
//! domains stay apart: the public key_id and fingerprint, and the secret
//! AES-256-GCM key the plugin encrypts with.
//!
//! - **key_id** = `atrest-v1-k<kek>-e<epoch>-<hex>`, the hex being 16 bytes of
//!   HKDF-SHA256 (the KEK as PRK) with the epoch: public, identical on every
//!   host with the same file, and new whenever a KEK is (re)promoted.
//! - **fingerprint** = 16 bytes of HKDF-SHA256 with its own info: public,
//!   tells two copies of a KEK apart without comparing key bytes (the
//!   successor check uses it; a KEK that was never primary has no key_id).
//! - **encryption key**: 32 bytes of HKDF-SHA256 with a third info; a key_id
//!   or fingerprint reveals nothing about it (HKDF outputs under different
//!   infos are independent).

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::file::{KEK_LEN, KekMaterial};

/// HKDF info for the AES-256-GCM key a KEK encrypts with.
const ENCRYPTION_KEY_INFO: &[u8] = b"atrest kms-plugin v1 kek encryption key";
/// HKDF info prefix for key_ids.
const KEY_ID_INFO: &[u8] = b"atrest kms-plugin v1 key_id";
/// HKDF info for fingerprints.
const FINGERPRINT_INFO: &[u8] = b"atrest keyring v1 kek fingerprint";

fn expand(material: &KekMaterial, info: &[u8], out: &mut [u8]) {
    match material {
        KekMaterial::Local(key) => expand_local(key, info, out),
    }
}

fn expand_local(key: &[u8; KEK_LEN], info: &[u8], out: &mut [u8]) {
    // from_prk only fails for a PRK shorter than the hash (32 bytes), and
    // expand only for outputs over 255*32 bytes: neither can happen here.
    if let Ok(hk) = Hkdf::<Sha256>::from_prk(key) {
        let _ = hk.expand(info, out);
    }
}

/// The key_id of `kek` promoted at `epoch`: public, derived, never secret.
pub fn key_id(material: &KekMaterial, kek: u32, epoch: u32) -> String {
    let mut info = Vec::with_capacity(KEY_ID_INFO.len() + 8);
    info.extend_from_slice(KEY_ID_INFO);
    info.extend_from_slice(&kek.to_be_bytes());
    info.extend_from_slice(&epoch.to_be_bytes());
    let mut out = [0u8; 16];
    expand(material, &info, &mut out);
    format!("atrest-v1-k{kek}-e{epoch}-{}", hex::encode(out))
}

/// The public fingerprint of a KEK's material (`hkdf-sha256:<32 hex>`).
pub fn fingerprint(material: &KekMaterial) -> String {
    let mut out = [0u8; 16];
    expand(material, FINGERPRINT_INFO, &mut out);
    format!("hkdf-sha256:{}", hex::encode(out))
}

/// The AES-256-GCM key a KEK encrypts with. Secret.
pub fn encryption_key(material: &KekMaterial) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    expand(material, ENCRYPTION_KEY_INFO, out.as_mut());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_are_stable_and_apart() {
        let m = KekMaterial::Local(Zeroizing::new([7u8; KEK_LEN]));
        // Known answer, checked against an independent HMAC-SHA256 computation
        // of HKDF-Expand (RFC 5869): a change here changes every key_id in
        // the field.
        assert_eq!(
            key_id(&m, 1, 1),
            "atrest-v1-k1-e1-cded4933dbb326ed1b649aedf54a64cd"
        );
        assert_ne!(key_id(&m, 1, 1), key_id(&m, 1, 2));
        assert!(key_id(&m, 3, 9).starts_with("atrest-v1-k3-e9-"));
        let fp = fingerprint(&m);
        let enc = hex::encode(encryption_key(&m).as_ref());
        assert!(!key_id(&m, 1, 1).contains(&fp[12..]));
        assert!(!enc.contains(&fp[12..]));
        let other = KekMaterial::Local(Zeroizing::new([8u8; KEK_LEN]));
        assert_ne!(fingerprint(&other), fp);
    }
}
