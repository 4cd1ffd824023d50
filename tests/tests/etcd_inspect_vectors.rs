//! The values kube-apiserver itself wrote (`testdata/vectors/apiserver-written.json`)
//! put into a real etcd and audited with both configurations of that folder;
//! kube-apiserver's own read path (`read_with`) is the ground truth. One etcd and
//! one audit per configuration serve every vector; a failure lists every vector
//! that disagreed, by etcd key, instead of stopping at the first.
#![allow(clippy::unwrap_used)]

use atrest_tests::etcd::{EtcdServer, run_etcd_inspect};
use base64::Engine;
use serde_json::{Value, json};

/// What kube-apiserver's verdict means in etcd-inspect's vocabulary. The
/// config's first provider for the resource decides between `plaintext` and
/// `stale` for values identity reads.
fn expected_finding(item: &Value, config: &str) -> &'static str {
    let truth = &item["read_with"][config];
    let stored = base64::engine::general_purpose::STANDARD
        .decode(item["stored_b64"].as_str().unwrap())
        .unwrap();
    let encrypted = stored.starts_with(b"k8s:enc:");
    let resource = item["resource"].as_str().unwrap();
    // First provider per resource, from the two configs' text.
    let first_is_identity = match config {
        "config-secrets-all-providers.yaml" => resource != "secrets",
        "config-wildcard-events-exempt.yaml" => resource == "events",
        other => panic!("unknown config {other}"),
    };
    if !truth["ok"].as_bool().unwrap() {
        return "unreadable";
    }
    if !encrypted && !first_is_identity {
        return "plaintext";
    }
    if truth["stale"].as_bool().unwrap() {
        "stale"
    } else {
        "ok"
    }
}

#[test]
fn apiserver_written_values_audited_with_both_configs() {
    let dir = atrest_tests::inspect::vectors_dir();
    let (doc, kvs) = atrest_tests::inspect::apiserver_written();
    let key_id = doc["kms_plugin"]["key_id"].as_str().unwrap();
    let items = doc["items"].as_array().unwrap();
    assert!(items.len() >= 18);

    let etcd = EtcdServer::start();
    etcd.put_all(&kvs);

    for config in [
        "config-secrets-all-providers.yaml",
        "config-wildcard-events-exempt.yaml",
    ] {
        // The vectors' plugin is not running here: its key_id is given instead of Status.
        let run = run_etcd_inspect(etcd.etcdctl_args().into_iter().chain([
            "--config".to_owned(),
            dir.join(config).display().to_string(),
            "--kms-key-id".to_owned(),
            format!("test-plugin={key_id}"),
            "--output".to_owned(),
            "json".to_owned(),
        ]));
        assert!(
            run.code == Some(0) || run.code == Some(1),
            "{config}: {}",
            run.stderr
        );
        let records = run.records();
        let mut any_fail = false;
        let mut wrong = Vec::new();
        for item in items {
            let k = item["etcd_key"].as_str().unwrap();
            let Some(r) = records.get(k) else {
                wrong.push(format!("{k}: no record"));
                continue;
            };
            let want = expected_finding(item, config);
            if r["finding"] != json!(want) {
                wrong.push(format!("{k}: finding {} (want {want})", r["finding"]));
            }
            any_fail |= matches!(want, "plaintext" | "unreadable");
            // The key maps to the resource kube-apiserver used.
            let group = item["group"].as_str().unwrap();
            let resource = item["resource"].as_str().unwrap();
            let name = if group.is_empty() {
                resource.to_owned()
            } else {
                format!("{resource}.{group}")
            };
            if r["resource"] != json!(name) {
                wrong.push(format!("{k}: resource {} (want {name})", r["resource"]));
            }
            if r["provider"] == json!("kms-v2")
                && (r["provider_name"] != json!("test-plugin") || r["key_id"] != json!(key_id))
            {
                wrong.push(format!(
                    "{k}: provider_name {} key_id {}",
                    r["provider_name"], r["key_id"]
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{config}: vectors that disagree with kube-apiserver:\n{}",
            wrong.join("\n")
        );
        assert_eq!(
            records.len(),
            items.len(),
            "{config}: one record per vector"
        );
        assert_eq!(run.code, Some(if any_fail { 1 } else { 0 }), "{config}");
    }
}

#[test]
fn a_different_plugin_key_id_makes_kms_values_key_stale() {
    let dir = atrest_tests::inspect::vectors_dir();
    let (_, kvs) = atrest_tests::inspect::apiserver_written();
    let etcd = EtcdServer::start();
    etcd.put_all(&kvs);
    let run = run_etcd_inspect(
        etcd.etcdctl_args().into_iter().chain([
            "--config".to_owned(),
            dir.join("config-wildcard-events-exempt.yaml")
                .display()
                .to_string(),
            "--kms-key-id".to_owned(),
            "test-plugin=rotated-key-id".to_owned(),
            "--output".to_owned(),
            "json".to_owned(),
            "--fail-on".to_owned(),
            "kms-key-stale".to_owned(),
        ]),
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let recs = run.records();
    let kms: Vec<_> = recs
        .values()
        .filter(|r| r["provider"] == json!("kms-v2"))
        .collect();
    let stored_kms = kvs
        .iter()
        .filter(|(_, v)| v.starts_with(b"k8s:enc:kms:v2:"))
        .count();
    assert_eq!(kms.len(), stored_kms);
    assert!(stored_kms > 0);
    for r in kms {
        assert_eq!(r["finding"], json!("kms-key-stale"), "{r}");
    }
}
