//! KMS v2 on the kube-apiserver stand-in with the real kms-plugin over a unix
//! socket: values stored as `k8s:enc:kms:v2:<name>:` EncryptedObjects under
//! the plugin's key_id, the key_id metric, `keyring rotate` making old objects
//! stale by key_id (a no-op update rewrites them, and only them), a reload to
//! a config whose plugin is down refused, readiness following plugin health.
#![allow(clippy::unwrap_used)]

use atrest_tests::etcd::EtcdServer;
use atrest_tests::plugin::{PluginOptions, PluginProcess, WAIT, eventually};
use atrest_tests::standin::StandinProcess;
use atrest_tests::standin::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use storage_encryption::format::kmsv2;

const PROVIDER: &str = "atrest-kms";
const METRIC: &str = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds";

fn kms_config(endpoints: &[(&str, String)]) -> String {
    let mut text = String::from(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n",
    );
    for (name, endpoint) in endpoints {
        text.push_str(&format!(
            "      - kms:\n          apiVersion: v2\n          name: {name}\n          endpoint: {endpoint}\n          timeout: 3s\n"
        ));
    }
    text.push_str("      - identity: {}\n");
    text
}

fn secret(name: &str) -> Secret {
    secret_object(name, "k", b"kms-canary")
}

/// The stored KMS v2 object's keyID and the etcd mod revision.
async fn stored_key_id(etcd: &EtcdServer, name: &str) -> (String, i64) {
    let (value, revision) = raw(etcd, &format!("/registry/secrets/ns/{name}"))
        .await
        .unwrap();
    let prefix = format!("k8s:enc:kms:v2:{PROVIDER}:");
    let payload = value
        .strip_prefix(prefix.as_bytes())
        .unwrap_or_else(|| panic!("{name}: not a {prefix} value"));
    let object = kmsv2::decode(payload).unwrap();
    assert_eq!(object.encrypted_dek_source_type, 1, "HKDF seed DEK source");
    (object.key_id, revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_v2_writes_rotation_staleness_and_plugin_health() {
    let etcd = EtcdServer::start();
    let plugin = PluginProcess::start(PluginOptions::new()).await.unwrap();
    let key_id0 = plugin.status().await.unwrap().key_id;
    let endpoint = format!("unix://{}", plugin.endpoint().path().unwrap().display());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encryption.yaml");
    let config = kms_config(&[(PROVIDER, endpoint.clone())]);
    write_config(&path, &config);
    let standin = StandinProcess::start(
        etcd.endpoint(),
        &[
            "--encryption-provider-config",
            path.to_str().unwrap(),
            "--encryption-provider-config-automatic-reload",
            "--config-reload-interval",
            "100ms",
            "--kms-status-interval",
            "100ms",
            "--apiserver-id",
            "kms-apiserver",
        ],
    )
    .unwrap();
    eventually(WAIT, "the stand-in to be ready", || async {
        Ok((standin.get("/readyz").await?.status == 200).then_some(()))
    })
    .await
    .unwrap();
    let m = standin.metrics().await.unwrap();
    assert!(
        m.get(
            METRIC,
            &[
                ("provider_name", PROVIDER),
                ("key_id_hash", &hash(&key_id0)),
                ("apiserver_id_hash", &hash("kms-apiserver")),
            ]
        )
        .is_some(),
        "{}",
        m.text
    );

    let secrets: Api<Secret> = Api::namespaced(client(&standin, None), "ns");
    let pp = PostParams::default();
    for name in ["x", "y"] {
        secrets.create(&pp, &secret(name)).await.unwrap();
        assert_eq!(stored_key_id(&etcd, name).await.0, key_id0);
    }
    let x = secrets.get("x").await.unwrap();
    assert_eq!(x.data.as_ref().unwrap()["k"].0, b"kms-canary");
    // Not stale: a no-op update writes nothing.
    let (_, x_rev) = stored_key_id(&etcd, "x").await;
    secrets.replace("x", &pp, &x).await.unwrap();
    assert_eq!(stored_key_id(&etcd, "x").await.1, x_rev);

    // KEK rotation: the plugin reports a new key_id; the stand-in adopts it.
    let key_id1 = plugin.keyring().rotate().await.unwrap();
    assert_eq!(
        plugin.wait_for_key_id_change(&key_id0).await.unwrap(),
        key_id1
    );
    wait_metrics(&standin, "the stand-in to see the new key_id", |m| {
        m.get(METRIC, &[("key_id_hash", &hash(&key_id1))]).is_some()
    })
    .await
    .unwrap();
    // x is now stale by key_id: a no-op update re-encrypts it under key_id1.
    let x = secrets.get("x").await.unwrap();
    let x2 = secrets.replace("x", &pp, &x).await.unwrap();
    let (key_id, x_rev2) = stored_key_id(&etcd, "x").await;
    assert_eq!(key_id, key_id1);
    assert!(x_rev2 > x_rev);
    assert_eq!(x2.metadata.resource_version, Some(x_rev2.to_string()));
    // Once rewritten it is not stale any more.
    secrets.replace("x", &pp, &x2).await.unwrap();
    assert_eq!(stored_key_id(&etcd, "x").await.1, x_rev2);
    // y was not touched and still reads through the decrypt-only old KEK.
    let (y_key, _) = stored_key_id(&etcd, "y").await;
    assert_eq!(y_key, key_id0);
    assert_eq!(secrets.get("y").await.unwrap().data, x.data);

    // A config naming a plugin that is not running is refused; the old one serves.
    let down = format!("unix://{}", dir.path().join("nobody.sock").display());
    write_config(&path, &kms_config(&[("other", down), (PROVIDER, endpoint)]));
    let m = wait_metrics(&standin, "a failed reload", |m| {
        reloads(m, "failure") >= 1.0
    })
    .await
    .unwrap();
    assert_eq!(
        config_hash(&m),
        Some(storage_encryption::config_file_hash(config.as_bytes()))
    );
    secrets.create(&pp, &secret("z")).await.unwrap();
    assert_eq!(stored_key_id(&etcd, "z").await.0, key_id1);

    // The plugin goes away: not ready, with the provider named.
    drop(plugin);
    let body = eventually(WAIT, "/readyz to fail", || async {
        let r = standin.get("/readyz").await?;
        Ok((r.status == 500).then_some(r.body))
    })
    .await
    .unwrap();
    assert!(body.contains(PROVIDER), "{body}");
}
