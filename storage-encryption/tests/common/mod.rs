//! Shared helpers: the known-answer vectors in `testdata/vectors/` (in this
//! repository) and the test KMS plugin's seed format described in its README.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use storage_encryption::format::aesgcm;
use storage_encryption::{KmsError, KmsSeeds, KmsV2SeedRequest, Seed};

/// `testdata/vectors/` at the workspace root.
pub fn vectors_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/vectors"));
    assert!(
        dir.join("apiserver-written.json").is_file(),
        "known-answer vectors missing: expected {}",
        dir.join("apiserver-written.json").display()
    );
    dir
}

pub fn read_vector_file(name: &str) -> String {
    let path = vectors_dir().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read vector file {}: {e}", path.display()))
}

pub struct Item {
    pub etcd_key: String,
    pub group: String,
    pub resource: String,
    pub stored: Vec<u8>,
    pub plaintext: Vec<u8>,
    /// (config file name, ok, stale, error)
    pub read_with: Vec<(String, bool, bool, String)>,
}

pub struct Vectors {
    pub provider_name: String,
    pub key_id: String,
    pub kek: Vec<u8>,
    pub local_key: Vec<u8>,
    pub items: Vec<Item>,
}

pub fn load_vectors() -> Vectors {
    let v: serde_json::Value =
        serde_json::from_str(&read_vector_file("apiserver-written.json")).unwrap();
    let s = |v: &serde_json::Value| v.as_str().unwrap().to_string();
    let items = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|it| Item {
            etcd_key: s(&it["etcd_key"]),
            group: s(&it["group"]),
            resource: s(&it["resource"]),
            stored: STANDARD.decode(s(&it["stored_b64"])).unwrap(),
            plaintext: STANDARD.decode(s(&it["plaintext_b64"])).unwrap(),
            read_with: it["read_with"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(cfg, r)| {
                    (
                        cfg.clone(),
                        r["ok"].as_bool().unwrap(),
                        r["stale"].as_bool().unwrap(),
                        s(&r["error"]),
                    )
                })
                .collect(),
        })
        .collect();
    Vectors {
        provider_name: s(&v["kms_plugin"]["provider_name"]),
        key_id: s(&v["kms_plugin"]["key_id"]),
        kek: hex::decode(s(&v["kms_plugin"]["kek_hex"])).unwrap(),
        local_key: hex::decode(s(&v["local_key_hex"])).unwrap(),
        items,
    }
}

/// The vectors' test plugin: `encryptedDEKSource = nonce ‖ AES-256-GCM(kek, seed) ‖ tag`
/// with the key_id as associated data.
pub struct TestPlugin {
    pub provider: String,
    pub kek: Vec<u8>,
}

impl TestPlugin {
    /// Encrypts a seed the way the test plugin does (for write tests).
    pub fn encrypt_seed(&self, seed: &Seed, key_id: &str) -> Vec<u8> {
        aesgcm::seal(&self.kek, seed.expose(), key_id.as_bytes()).unwrap()
    }
}

impl KmsSeeds for TestPlugin {
    fn kms_v2_seed(
        &self,
        provider: &str,
        request: &KmsV2SeedRequest<'_>,
    ) -> Result<Seed, KmsError> {
        if provider != self.provider {
            return Err(KmsError::new(format!("unknown provider {provider}")));
        }
        let plain = aesgcm::open(
            &self.kek,
            request.encrypted_dek_source,
            request.key_id.as_bytes(),
        )
        .map_err(|e| KmsError::new(e.to_string()))?;
        Seed::from_slice(plain.expose()).ok_or_else(|| KmsError::new("seed is not 32 bytes"))
    }
}
