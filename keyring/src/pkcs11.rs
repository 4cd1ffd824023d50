//! KEKs kept in a PKCS#11 token (an HSM): what the keyring file holds of
//! them — a reference and a public check value, never a secret.
//!
//! ```json
//! { "kek": 3, "created": "…", "promotions": [3],
//!   "pkcs11": { "token": "atrest", "serial": "0123abcd", "key_label": "atrest-kek-3",
//!               "id": "9f2c…(hex CKA_ID)", "check_value": "…(32 hex digits)" } }
//! ```
//!
//! - `token`: the token label (`CKA_LABEL` of the token, at most 32 bytes);
//!   `serial` (optional) pins one token when several share a label.
//! - `key_label` and `id`: the key object's `CKA_LABEL` and `CKA_ID` (hex).
//! - `check_value`: the 16-byte AES-GCM tag the token computes under the key
//!   over an empty plaintext, with a fixed all-zero 12-byte IV and the AAD
//!   [`CHECK_AAD`]. It tells whether the object the reference finds is the
//!   key the keyring was built with (a wrong or replaced key is refused
//!   before serving) and reveals nothing usable about the key.
//!
//! **Why not AES-ECB of a zero block**, the classic "key check value": for a
//! key used with GCM, `E_K(0^128)` *is* GCM's hash key `H`. Publishing `H`
//! lets anyone forge GCM tags under that key. A GCM tag over a fixed message
//! is a MAC output; it reveals nothing about `H` or `K`.
//!
//! The PKCS#11 module path and the PIN are **not** in the file: the same file
//! is copied to hosts whose client library lives at different paths, and the
//! file is not a place for secrets. They are flags of the plugin.

use std::fmt;

/// The AAD of the check value computation (see the module docs).
pub const CHECK_AAD: &[u8] = b"atrest kek check v1";
/// The IV of the check value computation: twelve zero bytes. Fixed on
/// purpose: the check value must be reproducible, and it encrypts no data.
pub const CHECK_IV: [u8; 12] = [0; 12];
/// Length of a check value (an AES-GCM tag).
pub const CHECK_LEN: usize = 16;
/// Longest token label PKCS#11 allows (the field is 32 bytes, blank padded).
pub const MAX_TOKEN_LABEL: usize = 32;
/// Longest token serial PKCS#11 allows (16 bytes, blank padded).
pub const MAX_SERIAL: usize = 16;
/// Longest key label this format accepts.
pub const MAX_KEY_LABEL: usize = 128;
/// Longest `CKA_ID` this format accepts, in bytes.
pub const MAX_ID: usize = 64;

/// Where a KEK kept in a PKCS#11 token is, and how to tell it is the right
/// key. Holds no secret; its fields are public.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Ref {
    /// The token label.
    pub token: String,
    /// The token serial number, when pinned.
    pub serial: Option<String>,
    /// The key object's `CKA_LABEL`.
    pub key_label: String,
    /// The key object's `CKA_ID`.
    pub id: Vec<u8>,
    /// The public check value (see the module docs).
    pub check_value: [u8; CHECK_LEN],
}

impl fmt::Debug for Pkcs11Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Ref")
            .field("token", &self.token)
            .field("serial", &self.serial)
            .field("key_label", &self.key_label)
            .field("id", &hex::encode(&self.id))
            .field("check_value", &hex::encode(self.check_value))
            .finish()
    }
}

impl Pkcs11Ref {
    /// Checks the rules of the format; the error names the field (under
    /// `at`, e.g. `keks[2].pkcs11`), never its value.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        let printable = |s: &str| s.bytes().all(|b| (0x20..0x7f).contains(&b));
        if self.token.is_empty() || self.token.len() > MAX_TOKEN_LABEL || !printable(&self.token) {
            return Err(format!(
                "{at}.token must be 1 to {MAX_TOKEN_LABEL} printable ASCII characters"
            ));
        }
        if self.token.ends_with(' ') {
            return Err(format!(
                "{at}.token must not end with a blank (PKCS#11 pads labels with blanks)"
            ));
        }
        if let Some(serial) = &self.serial
            && (serial.is_empty()
                || serial.len() > MAX_SERIAL
                || !printable(serial)
                || serial.ends_with(' '))
        {
            return Err(format!(
                "{at}.serial must be 1 to {MAX_SERIAL} printable ASCII characters, no trailing blank"
            ));
        }
        if self.key_label.is_empty()
            || self.key_label.len() > MAX_KEY_LABEL
            || !printable(&self.key_label)
        {
            return Err(format!(
                "{at}.key_label must be 1 to {MAX_KEY_LABEL} printable ASCII characters"
            ));
        }
        if self.id.is_empty() || self.id.len() > MAX_ID {
            return Err(format!("{at}.id must be 1 to {MAX_ID} bytes"));
        }
        Ok(())
    }

    /// The canonical bytes every public derivation starts from: each field
    /// length-prefixed, so no two references share an encoding.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.token.len() + self.key_label.len());
        out.extend_from_slice(b"atrest pkcs11 kek reference v1");
        let mut field = |bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(bytes);
        };
        field(self.token.as_bytes());
        field(self.serial.as_deref().unwrap_or("").as_bytes());
        field(self.key_label.as_bytes());
        field(&self.id);
        field(&self.check_value);
        out
    }
}

/// Decodes lowercase hex of `want` bytes (`None`: any length from 1 to
/// `max`); the error names `field` only.
pub(crate) fn decode_hex(
    text: &str,
    field: &str,
    want: Option<usize>,
    max: usize,
) -> Result<Vec<u8>, String> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("{field} must be lowercase hex"));
    }
    let bytes = hex::decode(text).map_err(|_| format!("{field} is not hex"))?;
    match want {
        Some(n) if bytes.len() != n => {
            Err(format!("{field} must be {n} bytes ({} hex digits)", 2 * n))
        }
        None if bytes.is_empty() || bytes.len() > max => {
            Err(format!("{field} must be 1 to {max} bytes"))
        }
        _ => Ok(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Pkcs11Ref {
        Pkcs11Ref {
            token: "atrest".into(),
            serial: None,
            key_label: "atrest-kek".into(),
            id: vec![1, 2, 3],
            check_value: [9; CHECK_LEN],
        }
    }

    #[test]
    fn validation_names_fields_not_values() {
        assert!(sample().validate("x").is_ok());
        let mut r = sample();
        r.token = "t".repeat(33);
        assert!(
            r.validate("keks[0].pkcs11")
                .unwrap_err()
                .contains("keks[0].pkcs11.token")
        );
        let mut r = sample();
        r.serial = Some(String::new());
        assert!(r.validate("p").unwrap_err().contains("p.serial"));
        let mut r = sample();
        r.key_label = "secret\n".into();
        let e = r.validate("p").unwrap_err();
        assert!(e.contains("p.key_label") && !e.contains("secret"), "{e}");
        let mut r = sample();
        r.id.clear();
        assert!(r.validate("p").unwrap_err().contains("p.id"));
    }

    #[test]
    fn canonical_bytes_tell_every_field_apart() {
        let a = sample();
        let mut b = sample();
        b.token = "atrest-".into();
        b.key_label = "kek".into();
        assert_ne!(a.canonical(), b.canonical());
        let mut c = sample();
        c.serial = Some("1".into());
        assert_ne!(a.canonical(), c.canonical());
        let mut d = sample();
        d.check_value[0] ^= 1;
        assert_ne!(a.canonical(), d.canonical());
    }

    #[test]
    fn hex_fields_are_strict() {
        assert_eq!(decode_hex("0a", "f", None, 4).unwrap(), vec![10]);
        assert!(
            decode_hex("0A", "f", None, 4)
                .unwrap_err()
                .contains("lowercase")
        );
        assert!(
            decode_hex("zz", "f", None, 4)
                .unwrap_err()
                .contains("not hex")
        );
        assert!(decode_hex("", "f", None, 4).is_err());
        assert!(decode_hex("0102030405", "f", None, 4).is_err());
        assert!(
            decode_hex("00", "f", Some(16), 16)
                .unwrap_err()
                .contains("16 bytes")
        );
    }
}
