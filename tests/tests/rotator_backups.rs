//! The rotator listens to kept backups: a snapshot taken (`etcdctl snapshot
//! save`) before a `rotate-key` still needs the old key; while it is in the
//! rotator config's `backups:`, the stage that removes that key is refused
//! (exit 3, naming the file and the key), a backup that cannot be read is
//! refused even with `--allow-unrestorable-backups`, and with that flag the
//! removal proceeds, recorded in the state file, `rotator status` and the
//! run's summary. Real etcd, stand-in apiserver, the real `rotator` and
//! `etcd-inspect` binaries.
#![allow(clippy::unwrap_used)]

mod snapshot_kit;

use atrest_tests::cluster::{Cluster, Options, key_names, text};
use atrest_tests::etcd::run_etcd_inspect;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_waits_for_the_backups_that_need_the_old_key() {
    let backups = tempfile::tempdir().unwrap();
    let mut opts = Options::specs(&["0s"]);
    opts.rotator_config_extra = format!("backups:\n  - {}\n", backups.path().display());
    let mut c = Cluster::start(opts).await;
    c.seed(20, 5).await;

    // A backup before the rotation: --needs lists the old key (and its fingerprint).
    let snap = backups.path().join("before-rotate.db");
    snapshot_kit::snapshot_save(&c.etcd.etcdctl_args(), &snap);
    let needs = run_etcd_inspect([
        "snapshot".to_owned(),
        snap.display().to_string(),
        "--needs".to_owned(),
        "--config".to_owned(),
        c.hosts[0].config.display().to_string(),
        "--output".to_owned(),
        "json".to_owned(),
    ]);
    assert_eq!(needs.code, Some(0), "{}", needs.stderr);
    let doc = needs.json();
    let list = doc["needs"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{doc}");
    assert_eq!(list[0]["provider"], json!("aescbc"));
    assert_eq!(list[0]["key_name"], json!("key1"));
    let fingerprint = list[0]["fingerprints"][0].as_str().unwrap().to_owned();
    assert!(fingerprint.starts_with("sha256:"), "{doc}");

    // An unreadable file among the backups: refused, named, whatever the flag.
    let junk = backups.path().join("junk.db");
    std::fs::write(&junk, b"not a snapshot").unwrap();
    let out = c.apply(&[], &["rotate-key"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = text(&out);
    assert!(err.contains(&junk.display().to_string()), "{err}");
    assert!(err.contains("cannot be read"), "{err}");
    for h in &c.hosts {
        let cfg = std::fs::read_to_string(&h.config).unwrap();
        assert_eq!(key_names(&cfg), ["key2", "key1"], "the old key must stay");
    }
    let out = c.resume(&["--allow-unrestorable-backups"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains(&junk.display().to_string()));
    std::fs::remove_file(&junk).unwrap();

    // The snapshot still needs key1: the removal is refused, naming both.
    let out = c.resume(&[]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = text(&out);
    assert!(err.contains(&snap.display().to_string()), "{err}");
    assert!(
        err.contains("aescbc key1") && err.contains(&fingerprint),
        "{err}"
    );
    assert!(err.contains("--allow-unrestorable-backups"), "{err}");
    for h in &c.hosts {
        let cfg = std::fs::read_to_string(&h.config).unwrap();
        assert_eq!(key_names(&cfg), ["key2", "key1"], "the old key must stay");
    }
    // etcd itself is clean: only the backup blocks.
    assert!(err.contains("none still needs it"), "{err}");
    assert!(
        c.state_json()
            .unwrap()
            .get("unrestorable_backups")
            .is_none()
    );

    // Accepting it: the run finishes, and says and records what was given up.
    let out = c.resume(&["--allow-unrestorable-backups"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("can no longer be restored") && said.contains(&snap.display().to_string()),
        "{said}"
    );
    c.assert_rotated().await;
    let state = c.state_json().unwrap();
    let recorded = state["unrestorable_backups"].as_array().unwrap();
    assert_eq!(recorded.len(), 1, "{state}");
    let line = recorded[0].as_str().unwrap();
    assert!(
        line.contains(&snap.display().to_string()) && line.contains("aescbc key1"),
        "{line}"
    );
    let status = c.rotator(&["status"]).await;
    assert!(status.status.success(), "{}", text(&status));
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(
        shown.contains("unrestorable") && shown.contains(&snap.display().to_string()),
        "{shown}"
    );
    // Keys never show, only fingerprints.
    assert!(!said.contains(&base64_key1()) && !shown.contains(&base64_key1()));
}

fn base64_key1() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(atrest_tests::cluster::KEY1)
}

/// `rotate-kek`: a snapshot whose Secrets carry the old KEK's key_id blocks
/// retiring that KEK (exit 3, file and key_id named) until accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_retirement_waits_for_a_backup_under_the_old_key_id() {
    let backups = tempfile::tempdir().unwrap();
    let mut opts = Options::new(1);
    opts.kms = vec!["a"];
    opts.config = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms:\n          apiVersion: v2\n          name: atrest\n          endpoint: unix://{KMS_DIR}/a.sock\n          timeout: 3s\n      - identity: {}\n".to_owned();
    opts.run_flags
        .extend(["--plugin-settle".to_owned(), "1s".to_owned()]);
    opts.rotator_config_extra = format!("backups: [{}]\n", backups.path().display());
    let mut c = Cluster::start(opts).await;
    let keyring = atrest_tests::plugin::Keyring::at(&c.hosts[0].keyring);
    let old_key_id = keyring
        .list()
        .await
        .unwrap()
        .primary_kek()
        .unwrap()
        .key_id
        .clone()
        .unwrap();
    c.seed(10, 0).await;
    let snap = backups.path().join("nightly.db");
    snapshot_kit::snapshot_save(&c.etcd.etcdctl_args(), &snap);

    let out = c.apply(&[], &["rotate-kek"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = text(&out);
    assert!(
        err.contains(&snap.display().to_string())
            && err.contains(&format!("kms-v2 atrest key_id {old_key_id}")),
        "{err}"
    );
    let out = c.resume(&["--allow-unrestorable-backups"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let state = c.state_json().unwrap();
    let recorded = state["unrestorable_backups"].as_array().unwrap();
    assert_eq!(recorded.len(), 1, "{state}");
    assert!(
        recorded[0].as_str().unwrap().contains(&old_key_id),
        "{state}"
    );
}
