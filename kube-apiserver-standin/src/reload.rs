//! The EncryptionConfiguration controller: the file is read at start; with
//! automatic reload it is polled by content hash, and a changed file is applied
//! only if it parses, validates and its KMS v2 plugins answer a healthy Status
//! (then the config-hash and reload metrics change). A bad file leaves the old
//! config serving and counts a failure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::encryption::Encryption;
use super::metrics::{Metrics, ReloadStatus};

/// The configuration serving now; requests take a snapshot per operation.
#[derive(Debug)]
pub struct Current(RwLock<Arc<Encryption>>);

impl Current {
    /// Starts with `encryption`.
    pub fn new(encryption: Encryption) -> Self {
        Self(RwLock::new(Arc::new(encryption)))
    }

    /// The serving configuration.
    pub fn get(&self) -> Arc<Encryption> {
        // Writers only swap an Arc, so a poisoned lock still holds a valid value.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, encryption: Encryption) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(encryption);
    }
}

/// Why the configuration could not be loaded at start.
#[derive(Debug, thiserror::Error)]
#[error("--encryption-provider-config {path}: {message}")]
pub struct LoadError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Reads the file at start. KMS plugins that do not answer yet do not stop the
/// start (kube-apiserver starts and reports them in /readyz); they are polled.
pub async fn load_at_start(
    path: Option<&Path>,
    metrics: &Arc<Metrics>,
    kms_interval: Duration,
) -> Result<Current, LoadError> {
    let Some(path) = path else {
        return Ok(Current::new(Encryption::identity()));
    };
    let error = |message: String| LoadError {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let mut encryption = Encryption::parse(&bytes).map_err(error)?;
    if let Err(e) = encryption.check_kms(metrics).await {
        tracing::warn!(error = %e, "KMS v2 plugin not healthy at start; will keep polling");
    }
    encryption.start_kms_polling(metrics.clone(), kms_interval);
    if let Some(hash) = encryption.hash() {
        metrics.set_config_hash(hash.to_owned());
    }
    tracing::info!(path = %path.display(), hash = encryption.hash().unwrap_or_default(), "encryption config loaded");
    Ok(Current::new(encryption))
}

/// Settings of the automatic reload loop.
#[derive(Debug, Clone)]
pub struct Reloader {
    /// The file.
    pub path: PathBuf,
    /// Poll period.
    pub interval: Duration,
    /// Apply a change only this long after first seeing it.
    pub delay: Duration,
    /// KMS Status period for a new config's providers.
    pub kms_interval: Duration,
}

impl Reloader {
    /// Polls forever (run it as a task).
    pub async fn run(self, current: Arc<Current>, metrics: Arc<Metrics>) {
        // (hash, first seen) of a changed file waiting for --reload-delay.
        let mut pending: Option<(String, Instant)> = None;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let bytes = match tokio::fs::read(&self.path).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot read the encryption config");
                    continue;
                }
            };
            let hash = storage_encryption::config_file_hash(&bytes);
            if current.get().hash() == Some(hash.as_str()) {
                pending = None;
                continue;
            }
            let seen = match &pending {
                Some((h, seen)) if *h == hash => *seen,
                _ => {
                    let now = Instant::now();
                    pending = Some((hash.clone(), now));
                    now
                }
            };
            if seen.elapsed() < self.delay {
                continue;
            }
            match self.load(&bytes, &metrics).await {
                Ok(encryption) => {
                    current.set(encryption);
                    metrics.set_config_hash(hash.clone());
                    metrics.record_reload(ReloadStatus::Success);
                    pending = None;
                    tracing::info!(%hash, "encryption config reloaded");
                }
                Err(e) => {
                    // Retried on every poll, like kube-apiserver's requeue.
                    metrics.record_reload(ReloadStatus::Failure);
                    tracing::warn!(%hash, error = %e, "encryption config refused; the old one keeps serving");
                }
            }
        }
    }

    async fn load(&self, bytes: &[u8], metrics: &Arc<Metrics>) -> Result<Encryption, String> {
        let mut encryption = Encryption::parse(bytes)?;
        encryption.check_kms(metrics).await?;
        encryption.start_kms_polling(metrics.clone(), self.kms_interval);
        Ok(encryption)
    }
}
