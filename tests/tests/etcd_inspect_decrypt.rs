//! `etcd-inspect --decrypt-check` against a real etcd and the real
//! kms-plugin: it catches values the config's keys cannot decrypt and KMS v2
//! values whose seed the plugin refuses, asks the plugin once per distinct
//! seed, and never prints plaintext.
#![allow(clippy::unwrap_used)]

use atrest_tests::etcd::{EtcdServer, k8s_protobuf, run_etcd_inspect};
use atrest_tests::inspect::{key, kms_write_key as write_key, unix_endpoint, write_with};
use atrest_tests::plugin::{PluginOptions, PluginProcess};
use serde_json::json;

const CANARY: &str = "PLAINTEXT-CANARY-7f3a";

fn secret(n: &str) -> Vec<u8> {
    k8s_protobuf("v1", "Secret", format!("{CANARY} {n}").as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrypt_check_catches_wrong_keys_and_refused_seeds() {
    let plugin = PluginProcess::start(PluginOptions::new().metrics())
        .await
        .unwrap();
    // A second plugin with its own keyring: its ciphertexts are foreign to the first.
    let other = PluginProcess::start(PluginOptions::new()).await.unwrap();
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms: {{apiVersion: v2, name: plugin-a, endpoint: \"{}\"}}\n      - aesgcm: {{keys: [{{name: gcm1, secret: {}}}]}}\n      - identity: {{}}\n",
            unix_endpoint(plugin.endpoint()),
            key(1)
        ),
    )
    .unwrap();

    let kms = "kms: {apiVersion: v2, name: plugin-a, endpoint: unix:///x.sock}";
    let gcm =
        |name: &str, n: u8| format!("aesgcm: {{keys: [{{name: {name}, secret: {}}}]}}", key(n));
    let seed1 = write_key(&plugin).await;
    let seed2 = write_key(&plugin).await;
    let mut tampered = write_key(&plugin).await;
    let last = tampered.encrypted_dek_source.len() - 1;
    tampered.encrypted_dek_source[last] ^= 0x01;
    let foreign = write_key(&other).await;

    let mut kvs: Vec<(String, Vec<u8>, &str, &str)> = Vec::new(); // key, value, finding without / with check
    for i in 0..5 {
        let k = format!("/registry/secrets/app/kms-seed1-{i}");
        kvs.push((
            k.clone(),
            write_with(kms, &k, &secret(&k), Some(&seed1)),
            "ok",
            "ok",
        ));
    }
    let k = "/registry/secrets/app/kms-seed2".to_owned();
    kvs.push((
        k.clone(),
        write_with(kms, &k, &secret(&k), Some(&seed2)),
        "ok",
        "ok",
    ));
    let k = "/registry/secrets/app/kms-tampered-seed".to_owned();
    kvs.push((
        k.clone(),
        write_with(kms, &k, &secret(&k), Some(&tampered)),
        "ok",
        "decrypt-failed",
    ));
    let k = "/registry/secrets/app/kms-foreign-plugin".to_owned();
    kvs.push((
        k.clone(),
        write_with(kms, &k, &secret(&k), Some(&foreign)),
        "kms-key-stale",
        "decrypt-failed",
    ));
    let k = "/registry/secrets/app/gcm-good".to_owned();
    kvs.push((
        k.clone(),
        write_with(&gcm("gcm1", 1), &k, &secret(&k), None),
        "stale",
        "stale",
    ));
    // The config's gcm1 is not the key this value was written with (the old
    // key material was removed and the name reused): only decrypting shows it.
    let k = "/registry/secrets/app/gcm-replaced-key".to_owned();
    kvs.push((
        k.clone(),
        write_with(&gcm("gcm1", 9), &k, &secret(&k), None),
        "stale",
        "decrypt-failed",
    ));
    // A key whose name is gone from the config: unreadable either way.
    let k = "/registry/secrets/app/gcm-removed-key".to_owned();
    kvs.push((
        k.clone(),
        write_with(&gcm("gcm0", 0), &k, &secret(&k), None),
        "unreadable",
        "unreadable",
    ));
    // A value copied from another etcd key: AES-GCM authenticates the key.
    let moved = write_with(
        &gcm("gcm1", 1),
        "/registry/secrets/app/elsewhere",
        &secret("m"),
        None,
    );
    kvs.push((
        "/registry/secrets/app/gcm-moved".to_owned(),
        moved,
        "stale",
        "decrypt-failed",
    ));
    let put: Vec<(&str, &[u8])> = kvs
        .iter()
        .map(|(k, v, _, _)| (k.as_str(), v.as_slice()))
        .collect();
    etcd.put_all(&put);

    let decrypts_before = decrypt_calls(&plugin).await;
    let base: Vec<String> = etcd
        .etcdctl_args()
        .into_iter()
        .chain([
            "--config".into(),
            config.display().to_string(),
            "--output".into(),
            "json".into(),
        ])
        .collect();

    let plain = run_etcd_inspect(&base);
    assert_eq!(plain.code, Some(1), "{}", plain.stderr); // the unreadable value fails
    let recs = plain.records();
    for (k, _, without, _) in &kvs {
        assert_eq!(
            recs[k]["finding"],
            json!(without),
            "without --decrypt-check: {k}: {}",
            recs[k]
        );
    }
    assert_eq!(
        decrypt_calls(&plugin).await,
        decrypts_before,
        "no Decrypt without --decrypt-check"
    );

    let checked = run_etcd_inspect(base.iter().cloned().chain(["--decrypt-check".to_owned()]));
    assert_eq!(checked.code, Some(1), "{}", checked.stderr);
    let recs = checked.records();
    for (k, _, _, with) in &kvs {
        assert_eq!(
            recs[k]["finding"],
            json!(with),
            "with --decrypt-check: {k}: {}",
            recs[k]
        );
    }
    assert!(
        recs["/registry/secrets/app/kms-tampered-seed"]["detail"]
            .as_str()
            .unwrap()
            .contains("plugin")
    );
    for out in [
        &checked.stdout,
        &checked.stderr,
        &plain.stdout,
        &plain.stderr,
    ] {
        assert!(!out.contains(CANARY), "plaintext leaked: {out}");
    }
    // One Decrypt per distinct seed: seed1 (5 values), seed2, the tampered one.
    // The foreign one goes to this plugin too (same provider name) and is refused.
    assert_eq!(decrypt_calls(&plugin).await - decrypts_before, 4.0);

    // Only the decrypt failures fail when asked for just those.
    let only = run_etcd_inspect(base.iter().cloned().chain([
        "--decrypt-check".to_owned(),
        "--fail-on".to_owned(),
        "decrypt-failed".to_owned(),
    ]));
    assert_eq!(only.code, Some(1));
    let clean = run_etcd_inspect(base.iter().cloned().chain([
        "--decrypt-check".to_owned(),
        "--prefix".to_owned(),
        "/registry/secrets/app/kms-seed".to_owned(),
    ]));
    assert_eq!(clean.code, Some(0), "{}", clean.stdout);
    assert_eq!(clean.records().len(), 6);
}

async fn decrypt_calls(plugin: &PluginProcess) -> f64 {
    plugin
        .metrics()
        .await
        .unwrap()
        .sum("atrest_kms_requests_total", &[("method", "decrypt")])
}
