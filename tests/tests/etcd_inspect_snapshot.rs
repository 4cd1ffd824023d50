//! `etcd-inspect snapshot FILE` gives the same records, findings, reports
//! and exit codes as the live scan of the same etcd: real etcd 3.4, real
//! `etcdctl snapshot save`, the real binary, output compared byte for byte
//! (JSON without its `snapshot` field, which names the file).
#![allow(clippy::unwrap_used)]

mod snapshot_kit;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use atrest_tests::etcd::{EtcdServer, InspectRun, k8s_protobuf, run_etcd_inspect};
use base64::Engine;
use serde_json::{Value, json};
use storage_encryption::{
    EncryptionConfiguration, GroupResource, KmsV2WriteKey, NoKms, Seed, transform_to_storage,
};

fn b64key(n: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

/// Runs the live audit and the snapshot audit with the same flags and
/// checks that every output format and the exit code agree.
fn live_equals_snapshot(etcd: &EtcdServer, snapshot: &Path, flags: &[String]) -> Value {
    let mut json_doc = Value::Null;
    for output in ["json", "table", "junit"] {
        let common: Vec<String> = flags
            .iter()
            .cloned()
            .chain(["--output".to_owned(), output.to_owned()])
            .collect();
        let live = run_etcd_inspect(etcd.etcdctl_args().into_iter().chain(common.clone()));
        let file = run_etcd_inspect(
            ["snapshot".to_owned(), snapshot.display().to_string()]
                .into_iter()
                .chain(common),
        );
        assert!(
            matches!(live.code, Some(0 | 1)),
            "live {output}: {}",
            live.stderr
        );
        assert_eq!(
            live.code, file.code,
            "{output} exit codes: live {} / snapshot {}",
            live.stderr, file.stderr
        );
        if output == "json" {
            let (l, f) = (without_source(&live), without_source(&file));
            assert_eq!(f["snapshot"], Value::Null);
            assert!(l["records"].as_array().unwrap().len() > 5);
            if l != f {
                diff_records(&l, &f);
            }
            assert_eq!(l, f, "JSON documents differ");
            json_doc = l;
        } else {
            assert_eq!(live.stdout, file.stdout, "{output} reports differ");
        }
    }
    json_doc
}

fn without_source(run: &InspectRun) -> Value {
    let mut doc = run.json();
    let source = doc["snapshot"].take();
    if let Some(path) = source.as_str() {
        assert!(
            path.ends_with(".db"),
            "snapshot field names the file: {path}"
        );
    }
    doc
}

fn diff_records(l: &Value, f: &Value) {
    let by_key = |d: &Value| -> BTreeMap<String, Value> {
        d["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["key"].as_str().unwrap().to_owned(), r.clone()))
            .collect()
    };
    let (l, f) = (by_key(l), by_key(f));
    for (k, r) in &l {
        assert_eq!(Some(r), f.get(k), "record {k}: live vs snapshot");
    }
    assert_eq!(l.len(), f.len(), "record count");
}

fn save(etcd: &EtcdServer, dir: &Path) -> PathBuf {
    let file = dir.join("snap.db");
    snapshot_kit::snapshot_save(&etcd.etcdctl_args(), &file);
    file
}

const MIXED_CONFIG: &str = "apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms: {apiVersion: v2, name: plug, endpoint: 'unix:///nonexistent/kms.sock'}
      - aesgcm: {keys: [{name: key2, secret: K2}, {name: key1, secret: K1}]}
      - aescbc: {keys: [{name: old, secret: K3}]}
      - identity: {}
  - resources: [configmaps, widgets.stable.example.com]
    providers:
      - secretbox: {keys: [{name: sb, secret: K4}]}
      - identity: {}
";

fn mixed_config() -> String {
    MIXED_CONFIG
        .replace("K1", &b64key(1))
        .replace("K2", &b64key(2))
        .replace("K3", &b64key(3))
        .replace("K4", &b64key(4))
}

fn write_with(provider_yaml: &str, etcd_key: &str, plaintext: &[u8]) -> Vec<u8> {
    let yaml = format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: ['*.*']\n    providers:\n      - {provider_yaml}\n"
    );
    let cfg = EncryptionConfiguration::parse(&yaml).unwrap();
    let providers = cfg
        .providers_for(&GroupResource::new("x.example.com", "things"))
        .providers;
    transform_to_storage(&providers, plaintext, etcd_key.as_bytes(), &NoKms).unwrap()
}

fn kms_value(etcd_key: &str, key_id: &str) -> Vec<u8> {
    let cfg = EncryptionConfiguration::parse(&mixed_config()).unwrap();
    let providers = cfg
        .providers_for(&GroupResource::new("", "secrets"))
        .providers;
    let wk = KmsV2WriteKey {
        seed: Seed::new([5; 32]),
        encrypted_dek_source: vec![9; 40],
        key_id: key_id.into(),
        annotations: Default::default(),
    };
    let keys: BTreeMap<String, KmsV2WriteKey> = [("plug".to_owned(), wk)].into();
    transform_to_storage(
        &providers[..1],
        &k8s_protobuf("v1", "Secret", b"CANARY"),
        etcd_key.as_bytes(),
        &keys,
    )
    .unwrap()
}

/// Every provider and finding, with history: values first written one way
/// and then rewritten, deleted keys, a compaction.
fn write_mixed(etcd: &EtcdServer) {
    let gcm2 = format!("aesgcm: {{keys: [{{name: key2, secret: {}}}]}}", b64key(2));
    let gcm1 = format!("aesgcm: {{keys: [{{name: key1, secret: {}}}]}}", b64key(1));
    let cbc = format!("aescbc: {{keys: [{{name: old, secret: {}}}]}}", b64key(3));
    let gone = format!("aescbc: {{keys: [{{name: gone, secret: {}}}]}}", b64key(5));
    let sb = format!("secretbox: {{keys: [{{name: sb, secret: {}}}]}}", b64key(4));
    let pb = |kind: &str| k8s_protobuf("v1", kind, b"CANARY");
    let mut kvs: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..40 {
        let k = format!("/registry/secrets/ns{}/s{i:02}", i % 4);
        let v = match i % 8 {
            0 => kms_value(&k, "kek-new"),
            1 => kms_value(&k, "kek-old"),
            2 => write_with(&gcm2, &k, &pb("Secret")),
            3 => write_with(&gcm1, &k, &pb("Secret")),
            4 => write_with(&cbc, &k, &pb("Secret")),
            5 => write_with(&gone, &k, &pb("Secret")),
            6 => pb("Secret"),
            _ => b"\x00junk".to_vec(),
        };
        kvs.push((k, v));
    }
    for i in 0..10 {
        let k = format!("/registry/configmaps/kube-system/c{i}");
        let v = if i % 3 == 0 {
            pb("ConfigMap")
        } else {
            write_with(&sb, &k, &pb("ConfigMap"))
        };
        kvs.push((k, v));
    }
    kvs.push((
        "/registry/stable.example.com/widgets/default/w".into(),
        write_with(
            &sb,
            "/registry/stable.example.com/widgets/default/w",
            b"{\"kind\":\"Widget\"}",
        ),
    ));
    kvs.push(("/registry/events/default/e.1".into(), pb("Event")));
    kvs.push(("/registry/no-such-thing".into(), pb("Thing")));
    etcd.put_all(&kvs);
    // History: plaintext first, then rewritten encrypted (the live scan and
    // the snapshot both see only the latest).
    let rewritten: Vec<(String, Vec<u8>)> = kvs[..8]
        .iter()
        .map(|(k, _)| (k.clone(), kms_value(k, "kek-new")))
        .collect();
    let ep = etcd.endpoint().to_owned();
    let opts = etcd.connect_options();
    let deleted: Vec<String> = kvs[30..34].iter().map(|(k, _)| k.clone()).collect();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut c = etcd_client::Client::connect([ep], Some(opts))
                    .await
                    .unwrap();
                for k in &deleted {
                    c.delete(k.as_str(), None).await.unwrap();
                }
                let rev = c
                    .put(rewritten[0].0.as_str(), b"plain".to_vec(), None)
                    .await
                    .unwrap()
                    .header()
                    .unwrap()
                    .revision();
                c.compact(rev, None).await.unwrap();
                for (k, v) in rewritten {
                    c.put(k, v, None).await.unwrap();
                }
            })
    })
    .join()
    .unwrap();
}

#[test]
fn mixed_providers_with_history_snapshot_equals_live() {
    let etcd = EtcdServer::start();
    write_mixed(&etcd);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mixed.yaml");
    std::fs::write(&config, mixed_config()).unwrap();
    let snap = save(&etcd, dir.path());
    let base = vec![
        "--config".to_owned(),
        config.display().to_string(),
        "--kms-key-id".to_owned(),
        "plug=kek-new".to_owned(),
    ];
    let doc = live_equals_snapshot(&etcd, &snap, &base);
    // The dataset reaches every finding the pipeline gives without a plugin.
    let f = &doc["summary"]["findings"];
    for name in [
        "ok",
        "plaintext",
        "stale",
        "kms-key-stale",
        "unreadable",
        "undecodable",
        "unmapped",
    ] {
        assert!(f[name].as_u64().unwrap() > 0, "{name}: {f}");
    }
    assert!(!doc.to_string().contains("CANARY"));

    // A narrower prefix and another --fail-on.
    let mut flags = base.clone();
    flags.extend(["--prefix", "/registry/configmaps/", "--fail-on", "stale"].map(String::from));
    live_equals_snapshot(&etcd, &snap, &flags);
    // Without a config: classification only.
    live_equals_snapshot(&etcd, &snap, &[]);

    // An empty prefix fails closed the same way offline.
    let run = run_etcd_inspect([
        "snapshot".to_owned(),
        snap.display().to_string(),
        "--prefix".to_owned(),
        "/registry/nothing-here/".to_owned(),
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}

#[test]
fn corrupt_or_missing_snapshot_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, b"not a bolt file\n".repeat(1000)).unwrap();
    let run = run_etcd_inspect(["snapshot".to_owned(), bad.display().to_string()]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains(&bad.display().to_string()) && run.stderr.contains("bad magic"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "no report for an unreadable file");
    let run = run_etcd_inspect(["snapshot", "/nonexistent/snap.db"]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("/nonexistent/snap.db"),
        "{}",
        run.stderr
    );
}

#[test]
fn apiserver_vectors_snapshot_equals_live_with_both_configs() {
    let dir = atrest_tests::inspect::vectors_dir();
    let (doc, kvs) = atrest_tests::inspect::apiserver_written();
    let key_id = doc["kms_plugin"]["key_id"].as_str().unwrap();
    let etcd = EtcdServer::start();
    etcd.put_all(&kvs);
    let tmp = tempfile::tempdir().unwrap();
    let snap = save(&etcd, tmp.path());
    for config in [
        "config-secrets-all-providers.yaml",
        // A `*.*` wildcard config.
        "config-wildcard-events-exempt.yaml",
    ] {
        let flags = vec![
            "--config".to_owned(),
            dir.join(config).display().to_string(),
            "--kms-key-id".to_owned(),
            format!("test-plugin={key_id}"),
        ];
        let d = live_equals_snapshot(&etcd, &snap, &flags);
        assert_eq!(d["summary"]["keys"], json!(kvs.len()), "{config}");
    }
}

fn fingerprint(kind: &str, secret: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"atrest key fingerprint v1\0");
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(secret);
    format!("sha256:{}", hex::encode(&h.finalize()[..16]))
}

fn needs_of(args: Vec<String>) -> Value {
    let run = run_etcd_inspect(args);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let mut doc = run.json();
    doc["snapshot"] = Value::Null;
    doc
}

#[test]
fn needs_lists_keys_key_ids_and_fingerprints_never_keys() {
    let etcd = EtcdServer::start();
    write_mixed(&etcd);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mixed.yaml");
    std::fs::write(&config, mixed_config()).unwrap();
    let snap = save(&etcd, dir.path());
    let flags: Vec<String> = [
        "--config",
        &config.display().to_string(),
        "--kms-key-id",
        "plug=kek-new",
        "--needs",
        "--output",
        "json",
    ]
    .map(String::from)
    .to_vec();
    let offline = needs_of(
        ["snapshot".to_owned(), snap.display().to_string()]
            .into_iter()
            .chain(flags.clone())
            .collect(),
    );
    let live = needs_of(etcd.etcdctl_args().into_iter().chain(flags).collect());
    assert_eq!(offline, live, "--needs offline and live");

    let needs = offline["needs"].as_array().unwrap();
    let find = |provider: &str, name: &str, key_id: Option<&str>| {
        needs
            .iter()
            .find(|n| {
                n["provider"] == json!(provider)
                    && (n["provider_name"] == json!(name) || n["key_name"] == json!(name))
                    && n["key_id"] == json!(key_id)
            })
            .unwrap_or_else(|| panic!("no need {provider}/{name}/{key_id:?} in {offline}"))
    };
    find("kms-v2", "plug", Some("kek-new"));
    find("kms-v2", "plug", Some("kek-old"));
    assert_eq!(
        find("aesgcm", "key1", None)["fingerprints"],
        json!([fingerprint("aesgcm", &[1; 32])])
    );
    assert_eq!(
        find("aesgcm", "key2", None)["fingerprints"],
        json!([fingerprint("aesgcm", &[2; 32])])
    );
    assert_eq!(
        find("secretbox", "sb", None)["fingerprints"],
        json!([fingerprint("secretbox", &[4; 32])])
    );
    // A key the config does not have: needed, fingerprint unknown.
    assert_eq!(find("aescbc", "gone", None)["fingerprints"], json!([]));
    // Plaintext needs nothing; no key material in the output.
    assert!(needs.iter().all(|n| n["provider"] != json!("identity")));
    let text = offline.to_string();
    for n in 1..=5u8 {
        assert!(!text.contains(&b64key(n)), "key {n} printed");
        assert!(!text.contains(&hex::encode([n; 32])), "key {n} printed");
    }
}

#[test]
fn a_snapshot_taken_before_a_key_rotation_needs_the_old_key() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let gcm = |n: u8| {
        format!(
            "aesgcm: {{keys: [{{name: key{n}, secret: {}}}]}}",
            b64key(n)
        )
    };
    let keys: Vec<String> = (0..20)
        .map(|i| format!("/registry/secrets/ns/s{i}"))
        .collect();
    let write = |n: u8| {
        let kvs: Vec<(String, Vec<u8>)> = keys
            .iter()
            .map(|k| {
                let v = write_with(&gcm(n), k, &k8s_protobuf("v1", "Secret", b"x"));
                (k.clone(), v)
            })
            .collect();
        etcd.put_all(&kvs);
    };
    write(1);
    let before = dir.path().join("before.db");
    snapshot_kit::snapshot_save(&etcd.etcdctl_args(), &before);
    // Rotation: key2 first, every secret rewritten.
    write(2);
    let after = dir.path().join("after.db");
    snapshot_kit::snapshot_save(&etcd.etcdctl_args(), &after);
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - aesgcm: {{keys: [{{name: key2, secret: {}}}, {{name: key1, secret: {}}}]}}\n",
            b64key(2),
            b64key(1)
        ),
    )
    .unwrap();
    let needs = |file: &Path| -> Vec<(String, u64)> {
        needs_of(
            [
                "snapshot",
                &file.display().to_string(),
                "--config",
                &config.display().to_string(),
                "--needs",
                "--output",
                "json",
            ]
            .map(String::from)
            .to_vec(),
        )["needs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["key_name"].as_str().unwrap().to_owned(),
                    n["values"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(needs(&before), [("key1".to_owned(), 20)]);
    assert_eq!(needs(&after), [("key2".to_owned(), 20)]);
    // The table form names the key and its fingerprint.
    let run = run_etcd_inspect([
        "snapshot".to_owned(),
        before.display().to_string(),
        "--config".to_owned(),
        config.display().to_string(),
        "--needs".to_owned(),
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("aesgcm")
            && run.stdout.contains("key1")
            && run.stdout.contains(&fingerprint("aesgcm", &[1; 32])),
        "{}",
        run.stdout
    );
}
