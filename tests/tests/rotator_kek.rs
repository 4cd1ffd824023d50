//! The rotator's KEK rotation end to end: two control-plane "hosts", each with
//! its own copy of the keyring, its own real kms-plugin process over a unix
//! socket and its own kube-apiserver stand-in, over one real etcd. The
//! rotator runs the real `kms-plugin keyring add/promote/retire` on the first
//! keyring and copies the file to the second; at the end every Secret is
//! under the new key_id and the old KEK is gone from both keyrings. On the
//! way the run is stopped and resumed at stage boundaries, and the gate
//! refuses to retire the old KEK while a value still carries its key_id.
//!
//! One machine cannot give two hosts the same socket path, and every host must
//! get the same EncryptionConfiguration, so both stand-ins dial the first
//! plugin's socket; the second plugin serves the second keyring copy, and the
//! test checks through its Status that the copy carries the new primary.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Output;

use atrest_tests::etcd::EtcdServer;
use atrest_tests::plugin::{Keyring, PluginOptions, PluginProcess, bin_path};
use atrest_tests::standin::StandinProcess;
use etcd_client::GetOptions;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use storage_encryption::format::kmsv2;

const PROVIDER: &str = "atrest";

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

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
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = Keyring::init(dir.path().join("cp0-keyring.json"))
        .await
        .unwrap();
    let second = dir.path().join("cp1-keyring.json");
    std::fs::copy(first.path(), &second).unwrap();
    let keyrings = [first.path().to_owned(), second];
    let old = first.list().await.unwrap();
    let old_key_id = old.primary_kek().unwrap().key_id.clone().unwrap();

    let mut plugins = Vec::new();
    let mut standins = Vec::new();
    let mut hosts = String::new();
    let mut endpoint = String::new();
    for (i, keyring) in keyrings.iter().enumerate() {
        let plugin = PluginProcess::start(
            PluginOptions::new()
                .keyring(keyring)
                .arg("--reload-interval")
                .arg("200ms"),
        )
        .await
        .unwrap();
        if i == 0 {
            endpoint = format!("unix://{}", plugin.endpoint().path().unwrap().display());
        }
        let config = dir.path().join(format!("cp{i}-encryption.yaml"));
        std::fs::write(
            &config,
            format!(
                "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms:\n          apiVersion: v2\n          name: {PROVIDER}\n          endpoint: {endpoint}\n          timeout: 3s\n      - identity: {{}}\n"
            ),
        )
        .unwrap();
        let standin = StandinProcess::start(
            etcd.endpoint(),
            &[
                "--encryption-provider-config",
                config.to_str().unwrap(),
                "--encryption-provider-config-automatic-reload",
                "--config-reload-interval",
                "200ms",
                "--kms-status-interval",
                "200ms",
                "--apiserver-id",
                &format!("cp{i}"),
                "--resources",
                "secrets",
            ],
        )
        .unwrap();
        hosts.push_str(&format!(
            "  - name: cp{i}\n    encryptionConfig: {}\n    keyring: {}\n    apiserver: {{ url: '{}' }}\n",
            config.display(),
            keyring.display(),
            standin.url()
        ));
        plugins.push(plugin);
        standins.push(standin);
    }
    let mut kc = kube::Config::new(standins[0].url().parse().unwrap());
    kc.default_namespace = "default".into();
    let secrets: Api<Secret> = Api::namespaced(kube::Client::try_from(kc).unwrap(), "default");
    for i in 0..80 {
        let obj = Secret {
            metadata: ObjectMeta {
                name: Some(format!("s-{i}")),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "k".to_owned(),
                ByteString(vec![i as u8; 8]),
            )])),
            ..Default::default()
        };
        secrets.create(&PostParams::default(), &obj).await.unwrap();
    }
    assert!(key_ids(&etcd).await.iter().all(|id| *id == old_key_id));

    let rotator_config = dir.path().join("rotator.yaml");
    std::fs::write(
        &rotator_config,
        format!(
            "hosts:\n{hosts}etcd:\n  endpoints: [{}]\nkmsPlugin: {}\n",
            etcd.endpoint(),
            bin_path("kms-plugin").display()
        ),
    )
    .unwrap();
    let state = dir.path().join("state.json");
    let rotator = |args: &'static [&'static str]| {
        let (rotator_config, state) = (rotator_config.clone(), state.clone());
        async move {
            tokio::process::Command::new(bin_path("rotator"))
                .arg("--config")
                .arg(&rotator_config)
                .arg("--state")
                .arg(&state)
                .args(args)
                .args([
                    "--poll-interval",
                    "100ms",
                    "--proof-timeout",
                    "60s",
                    "--plugin-settle",
                    "2s",
                ])
                .output()
                .await
                .unwrap()
        }
    };
    let victim = "/registry/secrets/default/s-3";
    let mut client = etcd.client().await;
    let old_value = client.get(victim, None).await.unwrap().kvs()[0]
        .value()
        .to_vec();

    // Add + promote, then stop; resume does the rewrite and stops again.
    let out = rotator(&["apply", "--stages", "2", "rotate-kek"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let out = rotator(&["resume", "--stages", "1"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        key_ids(&etcd).await.iter().all(|id| *id != old_key_id),
        "the rewrite left old key_ids"
    );

    // A value under the old KEK reappears: the gate refuses to retire it, naming it.
    client.put(victim, old_value, None).await.unwrap();
    let out = rotator(&["resume"]).await;
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
    let out = rotator(&["resume"]).await;
    assert!(out.status.success(), "{}", text(&out));

    // Both hosts have the same keyring; the old KEK is gone; a new primary serves.
    assert_eq!(
        std::fs::read(&keyrings[0]).unwrap(),
        std::fs::read(&keyrings[1]).unwrap()
    );
    let now = first.list().await.unwrap();
    let old_kek = old.primary;
    assert!(
        now.keks.iter().all(|k| k.kek != old_kek),
        "old KEK {old_kek} still in {now:?}"
    );
    let new_key_id = now.primary_kek().unwrap().key_id.clone().unwrap();
    assert_ne!(new_key_id, old_key_id);
    let ids = key_ids(&etcd).await;
    assert_eq!(ids.len(), 80);
    assert!(
        ids.iter().all(|id| *id == new_key_id),
        "some Secret is not under the new key_id"
    );
    for p in &plugins {
        assert_eq!(
            p.status().await.unwrap().key_id,
            new_key_id,
            "every plugin serves the new KEK"
        );
    }
}
