//! The rotator's KEK rotation end to end: two control-plane "hosts", each with
//! its own copy of the keyring, its own real kms-plugin process over a unix
//! socket and its own kube-apiserver stand-in, over one real etcd. The
//! rotator runs the real `kms-plugin keyring add/promote/retire` on the first
//! keyring and copies the file to the second; at the end every Secret is
//! under the new key_id and the old KEK is gone from both keyrings. On the
//! way the run is stopped and resumed at stage boundaries, and the gate
//! refuses to retire the old KEK while a value still carries its key_id.
//!
//! Every host gets the same EncryptionConfiguration, so both plugins listen
//! on the same socket path: the second host runs in its own mount namespace
//! (the rotator kit, `atrest_tests::cluster`), and the test checks through
//! each plugin's Status that every keyring copy carries the new primary.
#![allow(clippy::unwrap_used)]

use atrest_tests::cluster::{Cluster, Options, text};
use atrest_tests::etcd::EtcdServer;
use atrest_tests::plugin::Keyring;
use etcd_client::GetOptions;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use storage_encryption::format::kmsv2;

const PROVIDER: &str = "atrest";

/// keyID of every stored Secret.
async fn key_ids(etcd: &EtcdServer) -> Vec<String> {
    let mut client = etcd.client().await;
    let r = client
        .get("/registry/secrets/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let prefix = format!("k8s:enc:kms:v2:{PROVIDER}:");
    r.kvs()
        .iter()
        .map(|kv| {
            let payload = kv
                .value()
                .strip_prefix(prefix.as_bytes())
                .expect("a KMS v2 value");
            kmsv2::decode(payload).unwrap().key_id
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_kek_across_two_hosts() {
    let mut opts = Options::new(2);
    opts.kms = vec!["a"];
    opts.config = format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms:\n          apiVersion: v2\n          name: {PROVIDER}\n          endpoint: unix://{{KMS_DIR}}/a.sock\n          timeout: 3s\n      - identity: {{}}\n"
    );
    opts.run_flags
        .extend(["--plugin-settle".to_owned(), "2s".to_owned()]);
    let mut c = Cluster::start(opts).await;
    let first = Keyring::at(&c.hosts[0].keyring);
    let old = first.list().await.unwrap();
    let old_key_id = old.primary_kek().unwrap().key_id.clone().unwrap();
    c.seed(80, 0).await;
    assert!(key_ids(&c.etcd).await.iter().all(|id| *id == old_key_id));
    let secrets: Api<Secret> = Api::namespaced(c.client(0), "default");

    let victim = "/registry/secrets/default/s-3";
    let mut client = c.etcd.client().await;
    let old_value = client.get(victim, None).await.unwrap().kvs()[0]
        .value()
        .to_vec();

    // Add + promote, then stop; resume does the rewrite and stops again.
    let out = c.apply(&["--stages", "2"], &["rotate-kek"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let out = c.resume(&["--stages", "1"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        key_ids(&c.etcd).await.iter().all(|id| *id != old_key_id),
        "the rewrite left old key_ids"
    );

    // A value under the old KEK reappears: the gate refuses to retire it, naming it.
    client.put(victim, old_value, None).await.unwrap();
    let out = c.resume(&[]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(victim) && err.contains(&old_key_id), "{err}");
    assert!(
        first
            .list()
            .await
            .unwrap()
            .keks
            .iter()
            .any(|k| k.kek == old.primary),
        "the old KEK must stay"
    );

    // Rewrite it through the API (its key_id is stale), and the run finishes.
    let obj = secrets.get("s-3").await.unwrap();
    secrets
        .replace("s-3", &PostParams::default(), &obj)
        .await
        .unwrap();
    let out = c.resume(&[]).await;
    assert!(out.status.success(), "{}", text(&out));

    // Both hosts have the same keyring; the old KEK is gone; a new primary serves.
    c.keyring_bytes();
    let now = first.list().await.unwrap();
    let old_kek = old.primary;
    assert!(
        now.keks.iter().all(|k| k.kek != old_kek),
        "old KEK {old_kek} still in {now:?}"
    );
    let new_key_id = now.primary_kek().unwrap().key_id.clone().unwrap();
    assert_ne!(new_key_id, old_key_id);
    let ids = key_ids(&c.etcd).await;
    assert_eq!(ids.len(), 80);
    assert!(
        ids.iter().all(|id| *id == new_key_id),
        "some Secret is not under the new key_id"
    );
    for h in &c.hosts {
        assert_eq!(
            h.plugins[0].status().await.unwrap().key_id,
            new_key_id,
            "every plugin serves the new KEK"
        );
    }
}
