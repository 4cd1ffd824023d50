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
//!
//! For a KEK kept in a PKCS#11 token the key never leaves the token, so the
//! public derivations start from its reference instead: HKDF-SHA256 extract
//! over [`Pkcs11Ref::canonical`] (token, serial, key label, CKA_ID, check
//! value — no secret), then the same expansions. Every host that sees the
//! same file derives the same key_id; a replaced token key has another check
//! value, so another fingerprint. There is no encryption key to derive: the
//! token encrypts with its own key ([`encryption_key`] gives `None`).

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::file::{KEK_LEN, KekMaterial};
use crate::pkcs11::Pkcs11Ref;

/// HKDF salt of the public derivations from a PKCS#11 reference.
const PKCS11_SALT: &[u8] = b"atrest keyring v1 pkcs11 kek";

/// HKDF info for the AES-256-GCM key a KEK encrypts with.
const ENCRYPTION_KEY_INFO: &[u8] = b"atrest kms-plugin v1 kek encryption key";
/// HKDF info prefix for key_ids.
const KEY_ID_INFO: &[u8] = b"atrest kms-plugin v1 key_id";
/// HKDF info for fingerprints.
const FINGERPRINT_INFO: &[u8] = b"atrest keyring v1 kek fingerprint";

fn expand(material: &KekMaterial, info: &[u8], out: &mut [u8]) {
    match material {
        KekMaterial::Local(key) => expand_local(key, info, out),
        KekMaterial::Pkcs11(r) => expand_reference(r, info, out),
    }
}

fn expand_reference(reference: &Pkcs11Ref, info: &[u8], out: &mut [u8]) {
    let hk = Hkdf::<Sha256>::new(Some(PKCS11_SALT), &reference.canonical());
    // expand only fails for outputs over 255*32 bytes.
    let _ = hk.expand(info, out);
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

/// The AES-256-GCM key a local KEK encrypts with. Secret. `None` for a KEK
/// kept in a token: the token encrypts with its own key.
pub fn encryption_key(material: &KekMaterial) -> Option<Zeroizing<[u8; 32]>> {
    match material {
        KekMaterial::Local(key) => {
            let mut out = Zeroizing::new([0u8; 32]);
            expand_local(key, ENCRYPTION_KEY_INFO, out.as_mut());
            Some(out)
        }
        KekMaterial::Pkcs11(_) => None,
    }
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
        let enc = hex::encode(encryption_key(&m).unwrap().as_ref());
        assert!(!key_id(&m, 1, 1).contains(&fp[12..]));
        assert!(!enc.contains(&fp[12..]));
        let other = KekMaterial::Local(Zeroizing::new([8u8; KEK_LEN]));
        assert_ne!(fingerprint(&other), fp);
    }

    #[test]
    fn token_keks_derive_from_their_reference() {
        let r = Pkcs11Ref {
            token: "atrest".into(),
            serial: None,
            key_label: "kek".into(),
            id: vec![1, 2],
            check_value: [3; 16],
        };
        let m = KekMaterial::Pkcs11(r.clone());
        assert!(encryption_key(&m).is_none());
        // Known answer (HKDF-SHA256 of the canonical reference): a change
        // here changes every HSM key_id in the field.
        assert_eq!(
            key_id(&m, 2, 5),
            "atrest-v1-k2-e5-760891d534fca197e205cb7e223b13f2"
        );
        assert_eq!(
            key_id(&m, 2, 5),
            key_id(&KekMaterial::Pkcs11(r.clone()), 2, 5)
        );
        assert_ne!(key_id(&m, 2, 5), key_id(&m, 2, 6));
        let mut replaced = r.clone();
        replaced.check_value[15] ^= 1;
        let replaced = KekMaterial::Pkcs11(replaced);
        assert_ne!(fingerprint(&replaced), fingerprint(&m));
        assert_ne!(key_id(&replaced, 2, 5), key_id(&m, 2, 5));
    }
}
