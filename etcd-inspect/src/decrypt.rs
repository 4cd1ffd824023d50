//! `--decrypt-check`: decrypt each value the way kube-apiserver would, with
//! the config's keys and, for KMS v2, seeds obtained from the plugin's
//! Decrypt — each distinct `encryptedDEKSource` once. Only success or a
//! reason leaves this module; plaintext is dropped (and zeroized) at once.

use std::collections::{BTreeMap, HashMap};

use storage_encryption::format::kmsv2;
use storage_encryption::format::prefix;
use storage_encryption::{
    Classification, KmsError, KmsSeeds, KmsV2SeedRequest, KmsWriteState, ProviderConfig, Seed,
    transform_from_storage,
};

use crate::kms::KmsClient;

/// Seeds kept at most; past this the cache starts over (a cluster has few
/// distinct seeds: kube-apiserver reuses one per key_id and process).
const MAX_CACHED_SEEDS: usize = 65_536;

/// The result of decrypting one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecryptCheck {
    /// It decrypts.
    Ok,
    /// Not checked, and why.
    Skipped(&'static str),
    /// It does not decrypt; the reason names no secret.
    Failed(String),
}

#[derive(Hash, PartialEq, Eq)]
struct SeedKey {
    provider: String,
    key_id: String,
    encrypted_dek_source: Vec<u8>,
}

/// Decrypts values, caching plugin-decrypted seeds.
#[derive(Debug)]
pub struct Decryptor {
    clients: BTreeMap<String, KmsClient>,
    seeds: HashMap<SeedKey, Result<Seed, String>>,
    plugin_calls: u64,
    outage: Option<PluginOutage>,
}

/// A KMS plugin that did not answer (down, hung, connection lost): the value
/// that needed it was not judged, and nothing after it can be trusted to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KMS provider {provider}: {reason}")]
pub struct PluginOutage {
    /// The KMS v2 provider name.
    pub provider: String,
    /// What happened (names the endpoint; no secret).
    pub reason: String,
}

impl std::fmt::Debug for SeedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedKey")
            .field("provider", &self.provider)
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl Decryptor {
    /// `clients`: a connected plugin client per KMS v2 provider name.
    pub fn new(clients: BTreeMap<String, KmsClient>) -> Self {
        Decryptor {
            clients,
            seeds: HashMap::new(),
            plugin_calls: 0,
            outage: None,
        }
    }

    /// The plugin outage met by the last [`check`](Self::check), if any. Once
    /// set it stays: the caller must stop, since a value checked during an
    /// outage reads as `decrypt-failed` though the plugin never judged it.
    pub fn outage(&self) -> Option<&PluginOutage> {
        self.outage.as_ref()
    }

    /// How many plugin Decrypt calls were made so far.
    pub fn plugin_calls(&self) -> u64 {
        self.plugin_calls
    }

    /// Decrypts `value` stored under `etcd_key` with `providers`.
    pub async fn check(
        &mut self,
        providers: &[&ProviderConfig],
        classification: &Classification,
        etcd_key: &[u8],
        value: &[u8],
        kms_state: &dyn KmsWriteState,
    ) -> DecryptCheck {
        match classification {
            Classification::Plaintext(_) => return DecryptCheck::Skipped("plaintext"),
            Classification::KmsV1 { .. } => {
                return DecryptCheck::Skipped("KMS v1 values are not decrypted (deprecated API)");
            }
            Classification::KmsV2 { provider, .. } => self.fetch_seed(provider, value).await,
            _ => {}
        }
        let seeds = CachedSeeds { seeds: &self.seeds };
        match transform_from_storage(providers, value, etcd_key, kms_state, &seeds) {
            Ok(decrypted) => {
                drop(decrypted); // zeroizes the plaintext
                DecryptCheck::Ok
            }
            Err(e) => DecryptCheck::Failed(e.to_string()),
        }
    }

    /// Makes sure the seed of a KMS v2 value is in the cache (or its failure).
    async fn fetch_seed(&mut self, provider: &str, value: &[u8]) {
        let Some(payload) = prefix::strip(value, storage_encryption::ProviderKind::KmsV2, provider)
        else {
            return;
        };
        let Ok(object) = kmsv2::decode(payload) else {
            return;
        };
        let key = SeedKey {
            provider: provider.to_owned(),
            key_id: object.key_id.clone(),
            encrypted_dek_source: object.encrypted_dek_source.clone(),
        };
        if self.seeds.contains_key(&key) {
            return;
        }
        let Some(client) = self.clients.get_mut(provider) else {
            // Not a provider of the config: the read fails without asking a plugin.
            return;
        };
        self.plugin_calls += 1;
        let result = match client
            .decrypt(
                &object.encrypted_dek_source,
                &object.key_id,
                &object.annotations,
            )
            .await
        {
            Ok(plain) => Seed::from_slice(&plain).ok_or_else(|| {
                format!(
                    "plugin Decrypt returned {} bytes, a seed is {}",
                    plain.len(),
                    Seed::LEN
                )
            }),
            Err(e) if e.is_outage() => {
                // Not cached: an outage says nothing about this ciphertext.
                self.outage = Some(PluginOutage {
                    provider: provider.to_owned(),
                    reason: e.to_string(),
                });
                return;
            }
            Err(e) => Err(e.to_string()),
        };
        if self.seeds.len() >= MAX_CACHED_SEEDS {
            self.seeds.clear();
        }
        self.seeds.insert(key, result);
    }
}

/// Answers the library's synchronous seed requests from the cache.
struct CachedSeeds<'a> {
    seeds: &'a HashMap<SeedKey, Result<Seed, String>>,
}

impl KmsSeeds for CachedSeeds<'_> {
    fn kms_v2_seed(
        &self,
        provider: &str,
        request: &KmsV2SeedRequest<'_>,
    ) -> Result<Seed, KmsError> {
        let key = SeedKey {
            provider: provider.to_owned(),
            key_id: request.key_id.to_owned(),
            encrypted_dek_source: request.encrypted_dek_source.to_vec(),
        };
        match self.seeds.get(&key) {
            Some(Ok(seed)) => Ok(seed.clone()),
            Some(Err(msg)) => Err(KmsError::new(msg.clone())),
            None => Err(KmsError::new(format!(
                "no plugin connection for KMS provider {provider:?}"
            ))),
        }
    }
}
