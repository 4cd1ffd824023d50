//! Helpers shared by the etcd-inspect tests: test keys, values written exactly
//! as kube-apiserver writes them (storage-encryption's write path), KMS v2
//! write keys from a real plugin, and the `unix://` endpoint a config names.
//! They panic on failure: they only build test data.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine as _;
use storage_encryption::{
    EncryptionConfiguration, GroupResource, KmsV2WriteKey, NoKms, ProviderConfig, Seed,
    transform_to_storage,
};

use crate::plugin::{PluginProcess, SocketEndpoint, encrypt};

/// `testdata/vectors/` at the workspace root (values kube-apiserver's own code
/// wrote, with its verdicts); fails loudly when absent.
pub fn vectors_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/vectors"));
    assert!(
        dir.join("apiserver-written.json").is_file(),
        "known-answer vectors missing: expected {}",
        dir.join("apiserver-written.json").display()
    );
    dir
}

/// The vectors document (`apiserver-written.json`) and its values as
/// `(etcd key, stored bytes)`, in file order, ready for `EtcdServer::put_all`.
pub fn apiserver_written() -> (serde_json::Value, Vec<(String, Vec<u8>)>) {
    let path = vectors_dir().join("apiserver-written.json");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read the vectors"))
            .expect("the vectors are JSON");
    let kvs = doc["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            let stored = base64::engine::general_purpose::STANDARD
                .decode(i["stored_b64"].as_str().expect("stored_b64"))
                .expect("stored_b64 is base64");
            (i["etcd_key"].as_str().expect("etcd_key").to_owned(), stored)
        })
        .collect();
    (doc, kvs)
}

/// A local test key: 32 bytes of `n`, base64 (as a config's `secret:`).
pub fn key(n: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

/// The `endpoint:` a config names for the plugin at `e`.
pub fn unix_endpoint(e: &SocketEndpoint) -> String {
    match e {
        SocketEndpoint::File(p) => format!("unix://{}", p.display()),
        SocketEndpoint::Abstract(_) => e.listen_arg(),
    }
}

/// Encrypts `plaintext` for `etcd_key` exactly as kube-apiserver would with
/// `provider_yaml` first (storage-encryption's `transform_to_storage`); a KMS
/// v2 provider writes with `kms`, whatever its name.
#[allow(clippy::unwrap_used)]
pub fn write_with(
    provider_yaml: &str,
    etcd_key: &str,
    plaintext: &[u8],
    kms: Option<&KmsV2WriteKey>,
) -> Vec<u8> {
    let yaml = format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: ['*.*']\n    providers:\n      - {provider_yaml}\n"
    );
    let cfg = EncryptionConfiguration::parse(&yaml).unwrap();
    let providers = cfg
        .providers_for(&GroupResource::new("any.example.com", "things"))
        .providers;
    match kms {
        Some(k) => {
            let keys: BTreeMap<String, KmsV2WriteKey> = providers
                .iter()
                .filter_map(|p| match p {
                    ProviderConfig::Kms(c) => Some((c.name.clone(), k.clone())),
                    _ => None,
                })
                .collect();
            transform_to_storage(&providers, plaintext, etcd_key.as_bytes(), &keys).unwrap()
        }
        None => transform_to_storage(&providers, plaintext, etcd_key.as_bytes(), &NoKms).unwrap(),
    }
}

/// A fresh KMS v2 write key: a random seed encrypted by the real `plugin`.
#[allow(clippy::unwrap_used)]
pub async fn kms_write_key(plugin: &PluginProcess) -> KmsV2WriteKey {
    let seed = Seed::random().unwrap();
    let resp = encrypt(&plugin.client(), seed.expose()).await.unwrap();
    KmsV2WriteKey {
        seed,
        encrypted_dek_source: resp.ciphertext,
        key_id: resp.key_id,
        annotations: BTreeMap::new(),
    }
}
