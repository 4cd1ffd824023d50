//! `rotator check` against real stand-ins over a real etcd: a clean cluster
//! passes (exit 0); a hand-edited config on one host is drift (exit 7) with
//! both hashes shown, in the table and in JSON; a keyring copy that differs
//! is drift; a stopped stand-in is unreachable (exit 6), never ok.
#![allow(clippy::unwrap_used)]

use atrest_tests::cluster::{Cluster, Options, text};
use storage_encryption::config_file_hash;

fn rows(out: &std::process::Output) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(out)));
    v["rows"].as_array().unwrap().clone()
}

fn find<'a>(rows: &'a [serde_json::Value], host: &str, check: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["host"] == host && r["check"] == check)
        .unwrap_or_else(|| panic!("no row {host} {check}: {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_cluster_passes_and_a_hand_edited_config_is_drift_with_both_hashes() {
    // cp1 applies a changed file only after an hour: it keeps running the old one.
    let c = Cluster::start(Options::specs(&["0s", "1h"])).await;
    let out = c.rotator(&["check"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("result: ok: every host checked and agrees"),
        "{table}"
    );
    for check in ["apiserver", "config-file", "config-hash", "config-same"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("cp1") && l.contains(check) && l.contains(" ok ")),
            "{check}: {table}"
        );
    }
    let out = c.rotator(&["check", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert!(rows(&out).iter().all(|r| r["result"] == "ok"), "{v}");

    // Someone edits cp1's file by hand.
    let original = std::fs::read(&c.hosts[1].config).unwrap();
    let old_hash = config_file_hash(&original);
    let mut edited = original.clone();
    edited.extend_from_slice(b"# edited by hand\n");
    std::fs::write(&c.hosts[1].config, &edited).unwrap();
    let new_hash = config_file_hash(&edited);

    let out = c.rotator(&["check"]).await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with("cp1") && l.contains("config-hash"))
        .unwrap();
    assert!(
        line.contains("DRIFT") && line.contains(&new_hash) && line.contains(&old_hash),
        "{table}"
    );
    assert!(table.contains("result: DRIFT (exit 7)"), "{table}");

    let out = c.rotator(&["check", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let rows = rows(&out);
    let hash = find(&rows, "cp1", "config-hash");
    assert_eq!(hash["result"], "drift");
    assert_eq!(hash["expected"], new_hash.as_str(), "on disk");
    assert_eq!(hash["found"], old_hash.as_str(), "what the apiserver runs");
    let same = find(&rows, "cp1", "config-same");
    assert_eq!(same["result"], "drift");
    assert_eq!(same["expected"], old_hash.as_str(), "cp0's");
    assert_eq!(same["found"], new_hash.as_str());
    assert_eq!(find(&rows, "cp0", "config-hash")["result"], "ok");
    // The key in the file is never shown.
    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    assert!(!text(&out).contains(&key));

    // Restored: clean again.
    std::fs::write(&c.hosts[1].config, &original).unwrap();
    let out = c.rotator(&["check"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyring_copy_that_differs_is_drift() {
    let c = Cluster::start(Options::new(3)).await;
    for h in &c.hosts {
        std::fs::write(&h.keyring, b"{\"same\": true}\n").unwrap();
    }
    let out = c.rotator(&["check", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(find(&rows(&out), "cp2", "keyring-same")["result"], "ok");

    std::fs::write(&c.hosts[2].keyring, b"{\"same\": false}\n").unwrap();
    let out = c.rotator(&["check", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let rows = rows(&out);
    let r = find(&rows, "cp2", "keyring-same");
    assert_eq!(r["result"], "drift", "{r}");
    assert_ne!(r["expected"], r["found"]);
    assert!(r["found"].as_str().unwrap().starts_with("sha256:"), "{r}");
    assert_eq!(find(&rows, "cp1", "keyring-same")["result"], "ok");

    // A missing copy is drift too (the others have one).
    std::fs::remove_file(&c.hosts[1].keyring).unwrap();
    let out = c.rotator(&["check"]).await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no file"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_apiserver_is_unreachable_never_ok() {
    let mut c = Cluster::start(Options::new(2)).await;
    let out = c.rotator(&["check"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    c.hosts[1].standin.terminate().unwrap();
    let out = c.rotator(&["check", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let rows = rows(&out);
    assert_eq!(find(&rows, "cp1", "apiserver")["result"], "unreachable");
    assert_eq!(find(&rows, "cp1", "config-hash")["result"], "unreachable");
    assert_eq!(find(&rows, "cp0", "apiserver")["result"], "ok");
    // Accepting unreported metrics does not accept an unreachable host.
    let out = c.rotator(&["check", "--accept-unreported"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("NOT CHECKED"),
        "{}",
        text(&out)
    );
    // A new run refuses to start on it; a dry run says it could not look.
    let out = c.apply(&[], &["rotate-key"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(!c.state.exists(), "a refused run wrote a state file");
    let out = c.rotator(&["apply", "--dry-run", "rotate-key"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_plugin_serves_another_key_id_is_drift() {
    use atrest_tests::plugin::Keyring;
    let mut opts = Options::new(2);
    opts.kms = vec!["a"];
    opts.config = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms:\n          apiVersion: v2\n          name: p\n          endpoint: unix://{KMS_DIR}/a.sock\n          timeout: 3s\n      - identity: {}\n".to_owned();
    let c = Cluster::start(opts).await;
    // Both apiservers have seen the plugins' key_id (Status every 200 ms).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let out = loop {
        let out = c.rotator(&["check", "--output", "json"]).await;
        if out.status.success() || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ok = rows(&out);
    assert_eq!(find(&ok, "cp1", "kms-key-id p")["result"], "ok");
    assert_eq!(find(&ok, "cp1", "keyring-same")["result"], "ok");

    // Someone rotates the KEK in cp1's copy only: its plugin loads it, its
    // apiserver sees the new key_id, cp0 does not.
    let new_key_id = Keyring::at(&c.hosts[1].keyring).rotate().await.unwrap();
    let want = storage_encryption::key_id_hash(new_key_id.trim());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let out = loop {
        let out = c.rotator(&["check", "--output", "json"]).await;
        let seen = rows(&out)
            .iter()
            .any(|r| r["check"] == "kms-key-id p" && r["found"] == want.as_str());
        if seen || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let rows = rows(&out);
    let r = find(&rows, "cp1", "kms-key-id p");
    assert_eq!(r["result"], "drift", "{r}");
    assert_eq!(r["found"], want.as_str(), "{r}");
    assert_ne!(r["expected"], r["found"], "{r}");
    assert_eq!(find(&rows, "cp1", "keyring-same")["result"], "drift");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apiserver_without_the_config_hash_metric_is_unverified_never_ok() {
    use atrest_tests::cluster::HostOptions;
    let mut opts = Options::new(2);
    // cp1 behaves like kube-apiserver before 1.34; it is proven by its reload metrics.
    opts.hosts[1] = HostOptions {
        proof: Some("reload".into()),
        ..HostOptions::extra(&["--without-config-hash-metric"])
    };
    let mut c = Cluster::start(opts).await;
    c.seed(10, 0).await;
    let out = c.rotator(&["check", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let r = find(&rows(&out), "cp1", "config-hash").clone();
    assert_eq!(r["result"], "unverified", "{r}");
    assert!(
        r["detail"].as_str().unwrap().contains("not compared"),
        "{r}"
    );
    assert!(r["found"].is_null(), "{r}");

    // Accepted by the operator: exit 0, and the row still says unverified.
    let out = c.rotator(&["check", "--accept-unreported"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("cp1") && l.contains("config-hash") && l.contains("unverified")),
        "{table}"
    );
    assert!(table.contains("unverified rows accepted"), "{table}");

    // A new run refuses on it, unless the operator accepts it too.
    let out = c.apply(&[], &["rotate-key"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    assert!(!c.state.exists());
    c.apply_ok(&["--accept-unreported"], &["rotate-key"]).await;
    c.assert_rotated().await;
}
