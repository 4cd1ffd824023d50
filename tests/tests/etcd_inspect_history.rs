//! `etcd-inspect snapshot FILE --all-revisions` and live `--history`:
//! encryption turned on and every object rewritten still leaves the
//! plaintext revisions in etcd and in the file until a compaction; after
//! `etcdctl compact` (+ `etcdctl defrag` and a new snapshot for the file)
//! they are gone. Real etcd 3.4, real etcdctl, the real binary.
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
}

fn live(etcd: &EtcdServer, config: &Path, extra: &[&str]) -> (Option<i32>, Value, String) {
    let mut args = etcd.etcdctl_args();
    args.extend([
        "--history".to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let json_run = run_etcd_inspect(
        args.iter()
            .cloned()
            .chain(["--output".into(), "json".into()]),
    );
    let table = run_etcd_inspect(args);
    assert_eq!(json_run.code, table.code, "{}", json_run.stderr);
    assert!(!table.stdout.contains("CANARY") && !json_run.stdout.contains("CANARY"));
    let doc = if json_run.stdout.trim().is_empty() {
        json!({"stderr": json_run.stderr})
    } else {
        json_run.json()
    };
    (
        json_run.code,
        doc,
        format!("{}{}", table.stdout, table.stderr),
    )
}

fn now(etcd: &EtcdServer) -> i64 {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(etcd.etcdctl_args())
        .args(["get", "x", "-w", "json"])
        .output()
        .unwrap();
    let now: Value = serde_json::from_slice(&out.stdout).unwrap();
    now["header"]["revision"].as_i64().unwrap()
}

#[test]
fn live_history_finds_old_plaintext_until_compaction() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, config_yaml()).unwrap();
    let keys: Vec<String> = (0..10)
        .map(|i| format!("/registry/secrets/ns/s{i}"))
        .collect();
    let body = k8s_protobuf("v1", "Secret", b"CANARY");
    let plain: Vec<(String, Vec<u8>)> = keys.iter().map(|k| (k.clone(), body.clone())).collect();
    etcd.put_all(&plain);
    // Outside the prefix: never reported.
    etcd.put("/other/x", b"CANARY");
    let enc: Vec<(String, Vec<u8>)> = keys
        .iter()
        .map(|k| (k.clone(), encrypted(k, &body)))
        .collect();
    let rev = etcd.put_all(&enc);
    etcdctl(&etcd, &["del", &keys[9]]);
    etcd.put("/other/y", b"CANARY");

    // The latest view is clean.
    let mut latest = etcd.etcdctl_args();
    latest.extend(["--config".to_owned(), config.display().to_string()]);
    assert_eq!(run_etcd_inspect(latest).code, Some(0));

    // History: the 10 plaintext revisions, 10 encrypted, 1 tombstone.
    let (code, doc, table) = live(&etcd, &config, &[]);
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(doc["all_revisions"], json!(true));
    let recs = doc["records"].as_array().unwrap();
    assert_eq!(recs.len(), 21, "{doc}");
    let plain_revs: Vec<&Value> = recs
        .iter()
        .filter(|r| r["finding"] == json!("plaintext"))
        .collect();
    assert_eq!(plain_revs.len(), 10);
    for r in &plain_revs {
        assert!(r["revision"]["revision"].as_i64().unwrap() < rev);
        assert_eq!(r["revision"]["version"], json!(1));
    }
    let tomb: Vec<&Value> = recs
        .iter()
        .filter(|r| r["revision"]["tombstone"] == json!(true))
        .collect();
    assert_eq!(tomb.len(), 1);
    assert_eq!(tomb[0]["key"], json!(keys[9]));
    assert!(
        recs.iter()
            .all(|r| r["key"].as_str().unwrap().starts_with("/registry/"))
    );
    assert!(table.contains("21 revisions under /registry"), "{table}");
    for advice in [
        "etcdctl compact",
        "etcdctl defrag",
        "new backup",
        "retire the old",
    ] {
        assert!(table.contains(advice), "{advice}: {table}");
    }

    // The same records as the snapshot's history, revision for revision.
    let snap = dir.path().join("s.db");
    snapshot_kit::snapshot_save(&etcd.etcdctl_args(), &snap);
    let (_, file_doc, _) = audit(&snap, &config, &["--all-revisions"]);
    assert_eq!(doc["records"], file_doc["records"]);

    // After a compaction the old revisions are gone: what was kept at the
    // compaction revision is judged, plus what was written since.
    let c = now(&etcd);
    etcdctl(&etcd, &["compact", &c.to_string()]);
    let (code, doc, table) = live(&etcd, &config, &[]);
    assert_eq!(code, Some(0), "{doc} {table}");
    let recs = doc["records"].as_array().unwrap();
    assert_eq!(recs.len(), 9, "{doc}");
    assert!(recs.iter().all(|r| r["finding"] == json!("ok")), "{doc}");
    assert!(table.contains("result: PASS"), "{table}");
    // A plaintext write after the compaction is found again.
    etcd.put(&keys[0], &body);
    let (code, doc, _) = live(&etcd, &config, &[]);
    assert_eq!(code, Some(1), "{doc}");
    let recs = doc["records"].as_array().unwrap();
    assert_eq!(recs.len(), 10, "{doc}");
    let found: Vec<&Value> = recs
        .iter()
        .filter(|r| r["finding"] == json!("plaintext"))
        .collect();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["key"], json!(keys[0]));
    assert!(found[0]["revision"]["revision"].as_i64().unwrap() > c);

    // Fail closed: a history that judged nothing exits 2.
    let (code, doc, table) = live(&etcd, &config, &["--prefix", "/registry/nothing/"]);
    assert_eq!(code, Some(2), "{doc}");
    assert!(table.contains("nothing was judged"), "{table}");
    let (code, _, table) = live(&etcd, &config, &["--prefix", "/other/"]);
    assert_eq!(code, Some(2), "{table}");
}

#[test]
fn live_history_equals_the_snapshot_history_across_a_compaction() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, config_yaml()).unwrap();
    let compacted = snapshot_kit::write_history(&etcd);
    let snap = dir.path().join("s.db");
    snapshot_kit::snapshot_save(&etcd.etcdctl_args(), &snap);
    let (file_code, file_doc, _) = audit(&snap, &config, &["--all-revisions"]);
    let (code, doc, table) = live(&etcd, &config, &[]);
    assert_eq!(code, file_code, "{table}");
    assert_eq!(doc["revision"], file_doc["revision"]);
    // Same revisions; the values kept at the compaction come in key order
    // (a range) and without their position in the transaction.
    let shape = |d: &Value| {
        let mut v: Vec<(String, i64, i64, i64, bool, Value)> = d["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let rev = &r["revision"];
                (
                    r["key"].as_str().unwrap().to_owned(),
                    rev["revision"].as_i64().unwrap(),
                    rev["create_revision"].as_i64().unwrap(),
                    rev["version"].as_i64().unwrap(),
                    rev["tombstone"].as_bool().unwrap(),
                    r["finding"].clone(),
                )
            })
            .collect();
        v.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        v
    };
    let (live_recs, file_recs) = (shape(&doc), shape(&file_doc));
    assert!(live_recs.len() > 300, "{}", live_recs.len());
    assert_eq!(live_recs, file_recs);
    assert!(live_recs.iter().any(|r| r.1 <= compacted));
    assert!(
        live_recs.iter().any(|r| r.4),
        "tombstones after the compaction"
    );
}
