//! Feeds arbitrary bytes to the ciphertext parser and to the whole Decrypt
//! path (parse, key_id lookup, AEAD) of a fixed test keyring: it must return
//! an error or the plaintext, never panic.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use kms_plugin::backend::KekSet;
use kms_plugin::envelope::Envelope;
use kms_plugin::keyring::Keyring;
use kms_plugin::keyring::RawKeyring;
use libfuzzer_sys::fuzz_target;

// A test-only keyring (two KEKs, KEK 1 reinstated); never used anywhere else.
const TEST_KEYRING: &str = r#"{
  "format": "atrest.kms-plugin.keyring/v1",
  "generation": 3,
  "keks": [
    {"kek": 1, "created": "2026-11-28T00:00:00Z", "promotions": [1, 3], "material": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="},
    {"kek": 2, "created": "2026-11-28T00:00:00Z", "promotions": [2], "material": "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="}
  ]
}"#;

fn keyring() -> &'static Keyring {
    static K: OnceLock<Keyring> = OnceLock::new();
    K.get_or_init(|| {
        let raw = RawKeyring {
            bytes: TEST_KEYRING.as_bytes().to_vec().into(),
            digest: [0; 32],
        };
        Keyring::from_raw(Path::new("fuzz-keyring.json"), &raw).expect("test keyring is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::parse(data);
    let k = keyring();
    // Under the real key_id (the interesting path: header ok, AEAD fails)...
    let _ = k.decrypt(k.key_id(), data);
    // ...and with the first bytes taken as a key_id.
    let split = data
        .first()
        .map_or(0, |b| usize::from(*b) % (data.len() + 1));
    if let Ok(key_id) = std::str::from_utf8(&data[..split]) {
        let _ = k.decrypt(key_id, &data[split..]);
    }
});
