//! Helpers shared by the `standin_*` tests: configs, a `kube` client on the
//! stand-in, raw etcd reads, metrics lookups.
#![allow(dead_code)]

use std::path::Path;

use anyhow::{Context, Result};
use atrest_tests::etcd::EtcdServer;
use atrest_tests::plugin::{Metrics, WAIT, eventually};
use atrest_tests::standin::StandinProcess;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// A test key: 32 bytes of `fill`.
pub fn key(fill: u8) -> String {
    STANDARD.encode([fill; 32])
}

/// An EncryptionConfiguration: `secrets` with aescbc `keys` (name, fill byte) in order,
/// then identity; configmaps not configured (identity).
pub fn aescbc_config(keys: &[(&str, u8)]) -> String {
    let mut text = String::from(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - aescbc:\n          keys:\n",
    );
    for (name, fill) in keys {
        text.push_str(&format!(
            "            - name: {name}\n              secret: {}\n",
            key(*fill)
        ));
    }
    text.push_str("      - identity: {}\n");
    text
}

/// Writes `text` to `path` atomically.
pub fn write_config(path: &Path, text: &str) {
    atrest_tests::plugin::write_atomically(path, text.as_bytes()).expect("write the config file");
}

/// A `kube` client on the stand-in (plain HTTP), optionally with a bearer token.
pub fn client(standin: &StandinProcess, token: Option<&str>) -> kube::Client {
    let mut config = kube::Config::new(standin.url().parse().expect("stand-in URL"));
    config.default_namespace = "default".into();
    if let Some(token) = token {
        config.auth_info.token = Some(token.to_owned().into());
    }
    kube::Client::try_from(config).expect("build a kube client")
}

/// The raw etcd value and mod revision under `key`, if any.
pub async fn raw(etcd: &EtcdServer, key: &str) -> Option<(Vec<u8>, i64)> {
    let mut client = etcd.client().await;
    let response = client.get(key, None).await.expect("etcd get");
    response
        .kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision()))
}

/// `sha256:<hex>` as the stand-in labels apiserver ids and key_ids.
pub fn hash(text: &str) -> String {
    storage_encryption::key_id_hash(text)
}

/// Waits until `/metrics` satisfies `check`; returns that page.
pub async fn wait_metrics(
    standin: &StandinProcess,
    what: &str,
    check: impl Fn(&Metrics) -> bool,
) -> Result<Metrics> {
    eventually(WAIT, what, || async {
        let m = standin.metrics().await?;
        Ok(check(&m).then_some(m))
    })
    .await
    .with_context(|| format!("stand-in log:\n{}", standin.log()))
}

/// The `hash` label of `apiserver_encryption_config_controller_last_config_info` (must be one).
pub fn config_hash(m: &Metrics) -> Option<String> {
    let samples: Vec<_> = m
        .matching(
            "apiserver_encryption_config_controller_last_config_info",
            &[],
        )
        .collect();
    assert!(
        samples.len() <= 1,
        "more than one config hash exposed: {}",
        m.text
    );
    samples.first().map(|s| s.labels["hash"].clone())
}

/// `apiserver_encryption_config_controller_automatic_reloads_total{status}`.
pub fn reloads(m: &Metrics, status: &str) -> f64 {
    m.sum(
        "apiserver_encryption_config_controller_automatic_reloads_total",
        &[("status", status)],
    )
}
