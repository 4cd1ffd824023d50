//! Health from memory: a background self-test (encrypt + decrypt of a random
//! seed with the primary KEK) decides what Status's `healthz` says. Status
//! never does work beyond reading this.
//!
//! Separately, [`Health`] remembers whether the keyring *file on disk* is
//! refused (and why) while the keyring in service keeps serving. That does
//! not change Status's `healthz`: kube-apiserver stops using a plugin whose
//! healthz is not `ok`, and this one still encrypts and decrypts correctly.
//! It shows in `/readyz` (503), in `/healthz`'s text (still 200: a restart
//! would not help, it would only load the refused file), in the
//! `atrest_kms_keyring_file_*` gauges and in the log.

use std::sync::Arc;

use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;
use arc_swap::ArcSwap;
use zeroize::Zeroizing;

use crate::backend::KekSet;

/// The text Status reports when healthy.
pub const HEALTHY: &str = "ok";

/// The last self-test's verdict.
#[derive(Debug)]
pub struct Health {
    healthz: ArcSwap<String>,
    keyring_file: ArcSwap<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            healthz: ArcSwap::from_pointee("self-test has not run yet".to_owned()),
            keyring_file: ArcSwap::from_pointee(None),
        }
    }
}

impl Health {
    /// `"ok"`, or words saying what is wrong.
    pub fn healthz(&self) -> Arc<String> {
        self.healthz.load_full()
    }

    /// Whether the last self-test passed.
    pub fn is_healthy(&self) -> bool {
        self.healthz.load().as_str() == HEALTHY
    }

    /// Why the keyring file on disk is refused now, if it is.
    pub fn keyring_file_refused(&self) -> Arc<Option<String>> {
        self.keyring_file.load_full()
    }

    /// Records why the keyring file on disk is refused (`None`: it is not).
    /// The reason must name no value from the file (positions only).
    pub fn set_keyring_file_refused(&self, reason: Option<String>) {
        self.keyring_file.store(Arc::new(reason));
    }

    /// Runs the self-test on `set` and records the verdict.
    pub fn check(&self, set: &dyn KekSet) -> bool {
        let verdict = self_test(set);
        let ok = verdict.is_ok();
        let text = verdict.err().unwrap_or_else(|| HEALTHY.to_owned());
        if text != *self.healthz.load().as_str() {
            if ok {
                tracing::info!(key_id = set.key_id(), "self-test passed: healthy");
            } else {
                tracing::warn!(key_id = set.key_id(), reason = %text, "self-test failed: unhealthy");
            }
        }
        self.healthz.store(Arc::new(text));
        ok
    }
}

/// Encrypts and decrypts a fresh random seed with the primary KEK.
pub fn self_test(set: &dyn KekSet) -> Result<(), String> {
    let key_id = set.key_id();
    if key_id.is_empty() || key_id.len() > 1024 {
        return Err(format!(
            "keyring has no usable primary key_id ({} bytes)",
            key_id.len()
        ));
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(seed.as_mut());
    let ciphertext = set
        .encrypt(seed.as_ref())
        .map_err(|e| format!("self-test encrypt with primary KEK {key_id} failed: {e}"))?;
    let back = set
        .decrypt(key_id, &ciphertext)
        .map_err(|e| format!("self-test decrypt with primary KEK {key_id} failed: {e}"))?;
    if back.as_slice() != seed.as_ref() {
        return Err(format!(
            "self-test with primary KEK {key_id} returned different plaintext"
        ));
    }
    Ok(())
}
