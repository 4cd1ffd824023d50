//! One KMS v2 provider of the loaded config, as kube-apiserver runs it
//! (spec/kms-v2-api.md): Status polled every `--kms-status-interval`; a new
//! `key_id` triggers Encrypt of a fresh 32-byte seed, and the write key changes
//! only when that Encrypt returns the same `key_id`; Decrypt results cached by
//! (`encryptedDEKSource`, `key_id`). Talks to the real kms-plugin.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use atrest_proto::kms::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use kms_client::{Endpoint, KmsClient};
use storage_encryption::{EncryptedObject, KmsConfig, KmsV2WriteKey, Seed};

use super::metrics::Metrics;

/// How many decrypted seeds a provider keeps (kube-apiserver keeps an LRU; the
/// stand-in simply starts over when full).
const SEED_CACHE_LIMIT: usize = 4096;

/// A KMS v2 provider: its plugin connection, health and write state.
#[derive(Debug)]
pub struct KmsProvider {
    name: String,
    endpoint: Endpoint,
    timeout: Duration,
    client: tokio::sync::Mutex<Option<KmsClient>>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// `Ok` after a healthy Status (and a matching Encrypt), else why not.
    health: Result<(), String>,
    /// The write state: changes only after an Encrypt whose key_id matched Status.
    write_key: Option<KmsV2WriteKey>,
    /// Decrypted seeds by (encryptedDEKSource, key_id).
    seeds: HashMap<(Vec<u8>, String), Seed>,
}

impl KmsProvider {
    /// A provider for `config` (not yet dialed). Fails on a bad endpoint.
    pub fn new(config: &KmsConfig) -> Result<Self, String> {
        let endpoint: Endpoint = config.endpoint.parse().map_err(|e| {
            format!(
                "kms provider {:?}: endpoint {:?}: {e}",
                config.name, config.endpoint
            )
        })?;
        Ok(Self {
            name: config.name.clone(),
            endpoint,
            timeout: config.effective_timeout(),
            client: tokio::sync::Mutex::new(None),
            state: Mutex::new(State {
                health: Err("Status not called yet".into()),
                write_key: None,
                seeds: HashMap::new(),
            }),
        })
    }

    /// Provider name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // Every update is a single assignment, so a poisoned lock holds consistent data.
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// `Ok` when the last Status was healthy and a write key matches it.
    pub fn health(&self) -> Result<(), String> {
        self.with(|s| s.health.clone())
    }

    /// The `key_id` writes use now (the write state), if any.
    pub fn current_key_id(&self) -> Option<String> {
        self.with(|s| s.write_key.as_ref().map(|k| k.key_id.clone()))
    }

    /// The current write key, if any.
    pub fn write_key(&self) -> Option<KmsV2WriteKey> {
        self.with(|s| s.write_key.clone())
    }

    async fn client(&self) -> Result<KmsClient, String> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = kms_client::connect_client(&self.endpoint, self.timeout)
            .await
            .map_err(|e| format!("dialing {}: {e}", self.endpoint))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// One Status poll: records the key_id metric, and on a new key_id calls
    /// Encrypt of a fresh seed. Updates and returns the health.
    pub async fn poll(&self, metrics: &Metrics) -> Result<(), String> {
        let result = self.poll_inner(metrics).await;
        let result = result.map_err(|e| format!("kms provider {:?}: {e}", self.name));
        self.with(|s| s.health = result.clone());
        result
    }

    async fn poll_inner(&self, metrics: &Metrics) -> Result<(), String> {
        let mut client = self.client().await?;
        let status = tokio::time::timeout(self.timeout, client.status(StatusRequest {}))
            .await
            .map_err(|_| format!("Status timed out after {:?}", self.timeout))?
            .map_err(|e| format!("Status failed: {}", e.message()))?
            .into_inner();
        if status.version != "v2" && status.version != "v2beta1" {
            return Err(format!(
                "Status version {:?}, expected \"v2\"",
                status.version
            ));
        }
        if status.key_id.is_empty() || status.key_id.len() > 1024 {
            return Err(format!(
                "Status key_id is {} bytes, must be 1 to 1024",
                status.key_id.len()
            ));
        }
        if status.healthz != "ok" {
            metrics.record_key_id_seen(&self.name, &status.key_id);
            return Err(format!("Status healthz: {}", status.healthz));
        }
        let result = if self.current_key_id().as_deref() == Some(status.key_id.as_str()) {
            Ok(())
        } else {
            self.rotate(&mut client, &status.key_id).await
        };
        // Recorded after the Encrypt that a new key_id triggers (kube-apiserver records
        // it on Status, a moment earlier), so a test that sees the metric knows writes
        // already use that key_id.
        metrics.record_key_id_seen(&self.name, &status.key_id);
        result
    }

    /// Encrypts a fresh seed; adopts it only when Encrypt's key_id equals Status'.
    async fn rotate(&self, client: &mut KmsClient, status_key_id: &str) -> Result<(), String> {
        let seed = Seed::random().map_err(|e| format!("random seed: {e}"))?;
        let request = EncryptRequest {
            plaintext: seed.expose().to_vec(),
            uid: new_uid(),
        };
        let response = tokio::time::timeout(self.timeout, client.encrypt(request))
            .await
            .map_err(|_| format!("Encrypt timed out after {:?}", self.timeout))?
            .map_err(|e| format!("Encrypt failed: {}", e.message()))?
            .into_inner();
        if response.key_id != status_key_id {
            // kube-apiserver throws such a response away; the old write key stays.
            return Err(format!(
                "Encrypt returned key_id {} but Status reported {}",
                storage_encryption::key_id_hash(&response.key_id),
                storage_encryption::key_id_hash(status_key_id)
            ));
        }
        let write_key = KmsV2WriteKey {
            seed: seed.clone(),
            encrypted_dek_source: response.ciphertext.clone(),
            key_id: response.key_id.clone(),
            annotations: response.annotations.into_iter().collect::<BTreeMap<_, _>>(),
        };
        storage_encryption::format::kmsv2::validate_encrypted_dek_source(
            &write_key.encrypted_dek_source,
        )
        .map_err(|e| format!("Encrypt response: {e}"))?;
        self.with(|s| {
            s.seeds.insert((response.ciphertext, response.key_id), seed);
            s.write_key = Some(write_key);
        });
        Ok(())
    }

    /// The plugin's Decrypt of a stored object's `encryptedDEKSource`, cached.
    pub async fn seed(&self, object: &EncryptedObject) -> Result<Seed, String> {
        let cache_key = (object.encrypted_dek_source.clone(), object.key_id.clone());
        if let Some(seed) = self.with(|s| s.seeds.get(&cache_key).cloned()) {
            return Ok(seed);
        }
        let mut client = self.client().await?;
        let request = DecryptRequest {
            ciphertext: object.encrypted_dek_source.clone(),
            uid: new_uid(),
            key_id: object.key_id.clone(),
            annotations: object.annotations.clone(),
        };
        let response = tokio::time::timeout(self.timeout, client.decrypt(request))
            .await
            .map_err(|_| format!("Decrypt timed out after {:?}", self.timeout))?
            .map_err(|e| format!("Decrypt failed: {}", e.message()))?
            .into_inner();
        let seed = Seed::from_slice(&response.plaintext).ok_or_else(|| {
            format!(
                "Decrypt returned {} bytes, expected {}",
                response.plaintext.len(),
                Seed::LEN
            )
        })?;
        self.with(|s| {
            if s.seeds.len() >= SEED_CACHE_LIMIT {
                s.seeds.clear();
            }
            s.seeds.insert(cache_key, seed.clone());
        });
        Ok(seed)
    }
}

/// A random RFC 4122 version-4 UUID (object uids, KMS request uids).
pub fn new_uid() -> String {
    // Seed::random is the OS random source storage-encryption already uses.
    let bytes = match Seed::random() {
        Ok(seed) => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&seed.expose()[..16]);
            b
        }
        Err(_) => {
            // Only uniqueness matters for uids; fall back to the clock.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            nanos.to_le_bytes()
        }
    };
    let mut b = bytes;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}
