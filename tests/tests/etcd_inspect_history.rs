//! `etcd-inspect snapshot FILE --all-revisions`: encryption turned on and
//! every object rewritten still leaves the plaintext revisions in the file
//! until a compaction; after `etcdctl compact` + `etcdctl defrag` and a new
//! snapshot they are gone. Real etcd 3.4, real etcdctl, the real binary.
#![allow(clippy::unwrap_used)]

mod snapshot_kit;

use std::path::Path;
use std::process::Command;

use atrest_tests::etcd::{EtcdServer, k8s_protobuf, run_etcd_inspect};
use base64::Engine;
use serde_json::{Value, json};
use storage_encryption::{EncryptionConfiguration, GroupResource, NoKms, transform_to_storage};

fn config_yaml() -> String {
    let k = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - aesgcm: {{keys: [{{name: k1, secret: {k}}}]}}\n      - identity: {{}}\n"
    )
}

fn encrypted(etcd_key: &str, plaintext: &[u8]) -> Vec<u8> {
    let cfg = EncryptionConfiguration::parse(&config_yaml()).unwrap();
    let providers = cfg
        .providers_for(&GroupResource::new("", "secrets"))
        .providers;
    transform_to_storage(&providers, plaintext, etcd_key.as_bytes(), &NoKms).unwrap()
}

fn etcdctl(etcd: &EtcdServer, args: &[&str]) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(etcd.etcdctl_args())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn audit(snap: &Path, config: &Path, extra: &[&str]) -> (Option<i32>, Value, String) {
    let mut args = vec![
        "snapshot".to_owned(),
        snap.display().to_string(),
        "--config".to_owned(),
        config.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let json_run = run_etcd_inspect(
        args.iter()
            .cloned()
            .chain(["--output".into(), "json".into()]),
    );
    let table = run_etcd_inspect(args);
    assert_eq!(json_run.code, table.code, "{}", json_run.stderr);
    (json_run.code, json_run.json(), table.stdout)
}

#[test]
fn old_plaintext_revisions_are_found_until_compact_and_defrag() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, config_yaml()).unwrap();
    let keys: Vec<String> = (0..10)
        .map(|i| format!("/registry/secrets/ns/s{i}"))
        .collect();
    let body = k8s_protobuf("v1", "Secret", b"CANARY");
    // Before encryption: plaintext.
    let plain: Vec<(String, Vec<u8>)> = keys.iter().map(|k| (k.clone(), body.clone())).collect();
    etcd.put_all(&plain);
    // Encryption on, every object rewritten; one deleted.
    let enc: Vec<(String, Vec<u8>)> = keys
        .iter()
        .map(|k| (k.clone(), encrypted(k, &body)))
        .collect();
    let rev = etcd.put_all(&enc);
    etcdctl(&etcd, &["del", &keys[9]]);
    let before = dir.path().join("before.db");
    snapshot_kit::snapshot_save(&etcd.etcdctl_args(), &before);

    // The latest view is clean (the deleted key is gone).
    let (code, doc, _) = audit(&before, &config, &[]);
    assert_eq!(code, Some(0), "{doc}");
    assert_eq!(doc["summary"]["keys"], json!(9));

    // History: 10 plaintext revisions, 10 encrypted, 1 tombstone.
    let (code, doc, table) = audit(&before, &config, &["--all-revisions"]);
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(doc["all_revisions"], json!(true));
    let recs = doc["records"].as_array().unwrap();
    assert_eq!(recs.len(), 21);
    let plain_revs: Vec<&Value> = recs
        .iter()
        .filter(|r| r["finding"] == json!("plaintext"))
        .collect();
    assert_eq!(plain_revs.len(), 10);
    for r in &plain_revs {
        assert!(r["revision"]["revision"].as_i64().unwrap() < rev);
        assert_eq!(r["revision"]["version"], json!(1));
        assert_eq!(r["revision"]["tombstone"], json!(false));
    }
    let tomb: Vec<&Value> = recs
        .iter()
        .filter(|r| r["revision"]["tombstone"] == json!(true))
        .collect();
    assert_eq!(tomb.len(), 1);
    assert_eq!(tomb[0]["key"], json!(keys[9]));
    assert_eq!(tomb[0]["finding"], Value::Null);
    assert_eq!(
        recs.iter().filter(|r| r["finding"] == json!("ok")).count(),
        10
    );
    // Revision order, and the advice.
    let order: Vec<i64> = recs
        .iter()
        .map(|r| r["revision"]["revision"].as_i64().unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]));
    assert!(table.contains("21 revisions under /registry"), "{table}");
    assert!(
        table.contains("etcdctl compact") && table.contains("etcdctl defrag"),
        "{table}"
    );
    assert!(!table.contains("CANARY") && !doc.to_string().contains("CANARY"));

    // The freed pages still hold the plaintext (bolt is copy-on-write).
    let free = |file: &Path| {
        let run = run_etcd_inspect([
            "snapshot".to_owned(),
            file.display().to_string(),
            "--free-pages".to_owned(),
            "--output".to_owned(),
            "json".to_owned(),
        ]);
        let table = run_etcd_inspect([
            "snapshot".to_owned(),
            file.display().to_string(),
            "--free-pages".to_owned(),
        ]);
        assert_eq!(run.code, table.code, "{}", run.stderr);
        assert!(!table.stdout.contains("CANARY") && !run.stdout.contains("CANARY"));
        (run.code, run.json(), table.stdout)
    };
    // Compaction alone: the old revisions leave the key bucket, but bolt is
    // copy-on-write, so the pages that held them are only freed.
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(etcd.etcdctl_args())
        .args(["get", "x", "-w", "json"])
        .output()
        .unwrap();
    let now: Value = serde_json::from_slice(&out.stdout).unwrap();
    let now = now["header"]["revision"].as_i64().unwrap().to_string();
    etcdctl(&etcd, &["compact", &now, "--physical"]);
    let mid = dir.path().join("compacted.db");
    snapshot_kit::snapshot_save(&etcd.etcdctl_args(), &mid);
    let (code, doc, _) = audit(&mid, &config, &["--all-revisions"]);
    assert_eq!(code, Some(0), "{doc}");
    assert_eq!(doc["records"].as_array().unwrap().len(), 9);
    let (code, doc, table) = free(&mid);
    eprintln!("free pages after compaction: {doc}");
    assert_eq!(code, Some(1), "{table}");
    assert!(doc["remnants"].as_u64().unwrap() > 0, "{doc}");
    assert!(doc["kinds"]["Secret"].as_u64().unwrap() > 0, "{doc}");
    assert!(
        table.contains("Secret") && table.contains("etcdctl defrag"),
        "{table}"
    );

    // Defragment + a new backup: nothing old remains.
    etcdctl(&etcd, &["defrag"]);
    let after = dir.path().join("after.db");
    snapshot_kit::snapshot_save(&etcd.etcdctl_args(), &after);
    let (code, doc, _) = audit(&after, &config, &["--all-revisions"]);
    assert_eq!(code, Some(0), "{doc}");
    let recs = doc["records"].as_array().unwrap();
    assert_eq!(recs.len(), 9);
    assert!(recs.iter().all(|r| r["finding"] == json!("ok")));
    let (code, doc, table) = free(&after);
    eprintln!("free pages after: {doc}");
    assert_eq!(code, Some(0), "{table}");
    assert_eq!(doc["remnants"], json!(0));

    // --all-revisions needs a file.
    let run = run_etcd_inspect(
        etcd.etcdctl_args()
            .into_iter()
            .chain(["--all-revisions".into()]),
    );
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("snapshot FILE"), "{}", run.stderr);
}
