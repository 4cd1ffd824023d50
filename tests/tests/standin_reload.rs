//! EncryptionConfiguration reload on the kube-apiserver stand-in: the config
//! hash and reload metrics, a local key rotation where a no-op update
//! re-encrypts only stale objects, a bad file that leaves the old config serving.
#![allow(clippy::unwrap_used)]

use atrest_tests::etcd::EtcdServer;
use atrest_tests::standin::StandinProcess;
use atrest_tests::standin::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use storage_encryption::config_file_hash;

fn secret(name: &str) -> Secret {
    secret_object(name, "k", name.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_reload_rewrites_only_stale_objects_and_a_bad_file_is_refused() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encryption.yaml");
    let config1 = aescbc_config(&[("key1", 1)]);
    write_config(&path, &config1);
    let standin = StandinProcess::start(
        etcd.endpoint(),
        &[
            "--encryption-provider-config",
            path.to_str().unwrap(),
            "--encryption-provider-config-automatic-reload",
            "--config-reload-interval",
            "100ms",
            "--apiserver-id",
            "apiserver-1",
        ],
    )
    .unwrap();
    let m = standin.metrics().await.unwrap();
    assert_eq!(config_hash(&m), Some(config_file_hash(config1.as_bytes())));
    let id = hash("apiserver-1");
    assert_eq!(
        m.label_names("apiserver_encryption_config_controller_last_config_info"),
        ["apiserver_id_hash", "hash"].map(String::from).into()
    );
    assert!(m.text.contains(&format!("apiserver_id_hash=\"{id}\"")));
    assert_eq!(reloads(&m, "success"), 0.0);

    let secrets: Api<Secret> = Api::namespaced(client(&standin, None), "ns");
    let pp = PostParams::default();
    for name in ["a", "b"] {
        secrets.create(&pp, &secret(name)).await.unwrap();
    }

    // Stage: key2 first, key1 second. Reload is seen in the metrics.
    let config2 = aescbc_config(&[("key2", 2), ("key1", 1)]);
    write_config(&path, &config2);
    let hash2 = config_file_hash(config2.as_bytes());
    let m = wait_metrics(&standin, "the reload of config2", |m| {
        config_hash(m).as_deref() == Some(hash2.as_str())
    })
    .await
    .unwrap();
    assert_eq!(reloads(&m, "success"), 1.0);
    assert_eq!(reloads(&m, "failure"), 0.0);
    assert!(
        m.get(
            "apiserver_encryption_config_controller_automatic_reload_last_timestamp_seconds",
            &[("status", "success"), ("apiserver_id_hash", &id)]
        )
        .unwrap()
            > 0.0
    );

    // New writes use key2; c is not stale.
    secrets.create(&pp, &secret("c")).await.unwrap();
    let (c_value, c_rev) = raw(&etcd, "/registry/secrets/ns/c").await.unwrap();
    assert!(c_value.starts_with(b"k8s:enc:aescbc:v1:key2:"));
    let (a_value, a_rev) = raw(&etcd, "/registry/secrets/ns/a").await.unwrap();
    assert!(a_value.starts_with(b"k8s:enc:aescbc:v1:key1:"));

    // No-op PUT: a (read by the second key, stale) is rewritten with key2 ...
    let a = secrets.get("a").await.unwrap();
    let a2 = secrets.replace("a", &pp, &a).await.unwrap();
    let (a_value, a_rev2) = raw(&etcd, "/registry/secrets/ns/a").await.unwrap();
    assert!(a_rev2 > a_rev);
    assert_eq!(a2.metadata.resource_version, Some(a_rev2.to_string()));
    assert!(a_value.starts_with(b"k8s:enc:aescbc:v1:key2:"));
    assert_eq!(a2.data, a.data);
    // ... c (current key) and a, once rewritten, are not written again.
    let c = secrets.get("c").await.unwrap();
    let c2 = secrets.replace("c", &pp, &c).await.unwrap();
    assert_eq!(c2.metadata.resource_version, c.metadata.resource_version);
    assert_eq!(raw(&etcd, "/registry/secrets/ns/c").await.unwrap().1, c_rev);
    secrets.replace("a", &pp, &a2).await.unwrap();
    assert_eq!(
        raw(&etcd, "/registry/secrets/ns/a").await.unwrap().1,
        a_rev2
    );

    // A bad file: failure counted, config2 keeps serving.
    let mut bad = config2.clone();
    bad.push_str("unknownField: 1\n");
    write_config(&path, &bad);
    let m = wait_metrics(&standin, "a failed reload", |m| {
        reloads(m, "failure") >= 1.0
    })
    .await
    .unwrap();
    assert_eq!(config_hash(&m), Some(hash2.clone()));
    secrets.create(&pp, &secret("d")).await.unwrap();
    let (d_value, _) = raw(&etcd, "/registry/secrets/ns/d").await.unwrap();
    assert!(d_value.starts_with(b"k8s:enc:aescbc:v1:key2:"));
    assert!(standin.log().contains("encryption config refused"));

    // Removing key1 too early: b (never rewritten) becomes unreadable.
    let config3 = aescbc_config(&[("key2", 2)]);
    write_config(&path, &config3);
    let hash3 = config_file_hash(config3.as_bytes());
    wait_metrics(&standin, "the reload of config3", |m| {
        config_hash(m).as_deref() == Some(hash3.as_str())
    })
    .await
    .unwrap();
    assert!(secrets.get("a").await.is_ok());
    match secrets.get("b").await.unwrap_err() {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 500);
            assert!(
                s.message
                    .contains("unable to transform key \"/registry/secrets/ns/b\"")
            );
        }
        other => panic!("expected 500, got {other:?}"),
    }
    let m = standin.metrics().await.unwrap();
    assert!(
        m.sum(
            "apiserver_storage_transformation_operations_total",
            &[
                ("transformation_type", "to_storage"),
                ("transformer_prefix", "k8s:enc:aescbc:v1:key2:"),
                ("resource", "secrets"),
                ("status", "OK"),
            ]
        ) >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_file_at_start_stops_the_stand_in_with_a_message_naming_it() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encryption.yaml");
    write_config(
        &path,
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources: [{resources: [secrets], providers: [{aescbc: {keys: [{name: k, secret: c2hvcnQ=}]}}]}]\n",
    );
    let err = StandinProcess::start(
        etcd.endpoint(),
        &["--encryption-provider-config", path.to_str().unwrap()],
    )
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("secret"), "{message}");
    assert!(message.contains(path.to_str().unwrap()), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_delay_holds_a_changed_config_back() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encryption.yaml");
    write_config(&path, &aescbc_config(&[("key1", 1)]));
    let standin = StandinProcess::start(
        etcd.endpoint(),
        &[
            "--encryption-provider-config",
            path.to_str().unwrap(),
            "--encryption-provider-config-automatic-reload",
            "--config-reload-interval",
            "100ms",
            "--reload-delay",
            "1500ms",
        ],
    )
    .unwrap();
    let config2 = aescbc_config(&[("key2", 2), ("key1", 1)]);
    let hash2 = config_file_hash(config2.as_bytes());
    let written = std::time::Instant::now();
    write_config(&path, &config2);
    wait_metrics(&standin, "the delayed reload", |m| {
        config_hash(m).as_deref() == Some(hash2.as_str())
    })
    .await
    .unwrap();
    // A lower bound set by the flag, not a performance measurement.
    assert!(written.elapsed() >= std::time::Duration::from_millis(1500));
}
