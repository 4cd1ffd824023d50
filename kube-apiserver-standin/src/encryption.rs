//! One loaded EncryptionConfiguration with its KMS v2 providers: kube-apiserver's
//! transformers, built on storage-encryption's `transform_from_storage` /
//! `transform_to_storage` (AAD = etcd key, first provider writes, stale rules).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use storage_encryption::format::prefix::{self, ProviderKind};
use storage_encryption::{
    Decrypted, EncryptionConfiguration, GroupResource, KmsApiVersion, KmsError, KmsSeeds,
    KmsV2SeedRequest, KmsV2WriteKey, ProviderConfig, Seed, transform_from_storage,
    transform_to_storage,
};
use tokio::task::AbortHandle;

use super::kms::KmsProvider;
use super::metrics::{Metrics, Transformation};

/// A loaded configuration. Dropping it stops its KMS Status pollers.
#[derive(Debug)]
pub struct Encryption {
    config: EncryptionConfiguration,
    /// `sha256:<hex>` of the file bytes, `None` without a file.
    hash: Option<String>,
    kms: BTreeMap<String, Arc<KmsProvider>>,
    poller: Option<AbortHandle>,
}

impl Drop for Encryption {
    fn drop(&mut self) {
        if let Some(poller) = &self.poller {
            poller.abort();
        }
    }
}

/// The seeds one read needs, fetched from the plugins before the synchronous decrypt.
#[derive(Default)]
struct FetchedSeeds(HashMap<String, (Vec<u8>, Result<Seed, String>)>);

impl KmsSeeds for FetchedSeeds {
    fn kms_v2_seed(
        &self,
        provider: &str,
        request: &KmsV2SeedRequest<'_>,
    ) -> Result<Seed, KmsError> {
        match self.0.get(provider) {
            Some((source, result)) if source.as_slice() == request.encrypted_dek_source => {
                result.clone().map_err(KmsError::new)
            }
            _ => Err(KmsError::new(format!(
                "no KMS v2 provider {provider:?} is running"
            ))),
        }
    }
}

impl Encryption {
    /// No file: every resource is stored in plaintext (identity).
    pub fn identity() -> Self {
        Self {
            config: EncryptionConfiguration {
                api_version: Default::default(),
                resources: Vec::new(),
            },
            hash: None,
            kms: BTreeMap::new(),
            poller: None,
        }
    }

    /// Parses and validates `bytes` and prepares (does not dial) its KMS v2 providers.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let config = EncryptionConfiguration::parse_bytes(bytes).map_err(|e| e.to_string())?;
        let mut kms = BTreeMap::new();
        for (_, _, provider) in config.all_providers() {
            if let ProviderConfig::Kms(k) = provider {
                if k.api_version != KmsApiVersion::V2 {
                    return Err(format!(
                        "kms provider {:?}: KMS v1 is not supported by the stand-in (kube-apiserver disables it by default since 1.29)",
                        k.name
                    ));
                }
                kms.insert(k.name.clone(), Arc::new(KmsProvider::new(k)?));
            }
        }
        Ok(Self {
            config,
            hash: Some(storage_encryption::config_file_hash(bytes)),
            kms,
            poller: None,
        })
    }

    /// Polls every KMS v2 provider once (Status, and Encrypt for a new key_id).
    /// `Err` lists every unhealthy provider.
    pub async fn check_kms(&self, metrics: &Metrics) -> Result<(), String> {
        let mut errors = Vec::new();
        for provider in self.kms.values() {
            if let Err(e) = provider.poll(metrics).await {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Starts polling the KMS providers every `interval` (no-op without KMS providers).
    pub fn start_kms_polling(&mut self, metrics: Arc<Metrics>, interval: Duration) {
        if self.kms.is_empty() {
            return;
        }
        let providers: Vec<Arc<KmsProvider>> = self.kms.values().cloned().collect();
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                for provider in &providers {
                    if let Err(e) = provider.poll(&metrics).await {
                        tracing::warn!(provider = provider.name(), error = %e, "KMS v2 provider unhealthy");
                    }
                }
            }
        });
        self.poller = Some(task.abort_handle());
    }

    /// The config file hash, if loaded from a file.
    pub fn hash(&self) -> Option<&str> {
        self.hash.as_deref()
    }

    /// Health of every KMS v2 provider: `(name, Ok | reason)`.
    pub fn kms_health(&self) -> Vec<(String, Result<(), String>)> {
        self.kms
            .iter()
            .map(|(name, p)| (name.clone(), p.health()))
            .collect()
    }

    fn providers(&self, gr: &GroupResource) -> Vec<&ProviderConfig> {
        self.config.providers_for(gr).providers
    }

    /// kube-apiserver's read: decrypts `value` stored under `key` and says whether it is stale.
    pub async fn read(
        &self,
        gr: &GroupResource,
        key: &str,
        value: &[u8],
        metrics: &Metrics,
    ) -> Result<Decrypted, String> {
        let providers = self.providers(gr);
        let mut seeds = FetchedSeeds::default();
        for provider in &providers {
            let ProviderConfig::Kms(k) = provider else {
                continue;
            };
            let Some(payload) = prefix::strip(value, ProviderKind::KmsV2, &k.name) else {
                continue;
            };
            // A malformed payload is reported by transform_from_storage below.
            let Ok(object) = storage_encryption::format::kmsv2::decode(payload) else {
                continue;
            };
            if let Some(kms) = self.kms.get(&k.name) {
                let seed = kms.seed(&object).await;
                seeds
                    .0
                    .insert(k.name.clone(), (object.encrypted_dek_source, seed));
            }
        }
        let write_state: BTreeMap<String, String> = self
            .kms
            .iter()
            .filter_map(|(name, p)| p.current_key_id().map(|id| (name.clone(), id)))
            .collect();
        let result =
            transform_from_storage(&providers, value, key.as_bytes(), &write_state, &seeds);
        let label = match &result {
            Ok(d) => transformer_prefix(d.read.reader.kind, d.read.reader.name.as_deref()),
            Err(_) => stored_prefix(value),
        };
        metrics.record_transformation(
            &gr.config_name(),
            Transformation::FromStorage,
            &label,
            result.is_ok(),
        );
        result.map_err(|e| e.to_string())
    }

    /// kube-apiserver's write: encrypts `plaintext` for `key` with the first provider.
    pub fn write(
        &self,
        gr: &GroupResource,
        key: &str,
        plaintext: &[u8],
        metrics: &Metrics,
    ) -> Result<Vec<u8>, String> {
        let providers = self.providers(gr);
        let write_keys: BTreeMap<String, KmsV2WriteKey> = self
            .kms
            .iter()
            .filter_map(|(name, p)| p.write_key().map(|k| (name.clone(), k)))
            .collect();
        let result = transform_to_storage(&providers, plaintext, key.as_bytes(), &write_keys);
        let label = match providers.first() {
            None | Some(ProviderConfig::Identity) => "identity".to_owned(),
            Some(ProviderConfig::Kms(k)) => transformer_prefix(ProviderKind::KmsV2, Some(&k.name)),
            Some(p) => match &result {
                Ok(stored) => stored_prefix(stored),
                Err(_) => p.type_name().to_owned(),
            },
        };
        metrics.record_transformation(
            &gr.config_name(),
            Transformation::ToStorage,
            &label,
            result.is_ok(),
        );
        result.map_err(|e| e.to_string())
    }
}

/// The transformer prefix label: `k8s:enc:aescbc:v1:key1:`, `identity`.
fn transformer_prefix(kind: ProviderKind, name: Option<&str>) -> String {
    match (kind, name) {
        (ProviderKind::Identity, _) | (_, None) => "identity".to_owned(),
        (kind, Some(name)) => String::from_utf8_lossy(&kind.prefix(name)).into_owned(),
    }
}

/// The prefix of a stored value, up to the key or provider name: `k8s:enc:aescbc:v1:key1:`.
fn stored_prefix(value: &[u8]) -> String {
    if !value.starts_with(prefix::ENCRYPTED) {
        return "identity".to_owned();
    }
    // k8s:enc:<type>:v<n>:<name>: is five ':'-terminated fields.
    let mut colons = 0;
    for (i, b) in value.iter().enumerate().take(300) {
        if *b == b':' {
            colons += 1;
            if colons == 5 {
                return String::from_utf8_lossy(&value[..=i]).into_owned();
            }
        }
    }
    "unknown".to_owned()
}
