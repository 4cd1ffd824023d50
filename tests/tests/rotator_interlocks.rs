//! The interlocks of `rotator apply`, with real stand-ins over a real etcd:
//!
//! - values the current config did not write (the last change was not
//!   migrated) → a new run is refused (exit 3) naming counts per resource;
//!   `--force` proceeds and the state file records what it overrode;
//! - a config edited by hand during the rewrite → the rewrite stops (exit 7)
//!   naming host and hashes; restored, `resume` finishes;
//! - a KMS provider whose Decrypt fails (a broken third-party plugin, the
//!   `broken-kms-plugin` fixture) → refused (exit 8) before it becomes the
//!   writer: nothing of that stage is written.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use atrest_tests::broken_kms::BrokenKms;
use atrest_tests::cluster::{Cluster, KEY1, OLD_PREFIX, Options, key_names, text};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use storage_encryption::{EncryptionConfiguration, ProviderConfig};

/// Secrets and ConfigMaps under aescbc `key2` (9s), `key1` still readable.
fn key2_first_config() -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets, configmaps]\n    providers:\n      - aescbc:\n          keys:\n            - name: key2\n              secret: {}\n            - name: key1\n              secret: {}\n      - identity: {{}}\n",
        STANDARD.encode([9u8; 32]),
        STANDARD.encode(KEY1)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_not_migrated_refuse_a_new_run_unless_forced_and_recorded() {
    let mut c = Cluster::start(Options::new(2)).await;
    c.seed(30, 10).await;
    // Someone put key2 first on every host by hand and never rewrote anything:
    // every value is still under key1.
    for h in &c.hosts {
        std::fs::write(&h.config, key2_first_config()).unwrap();
    }
    // Wait until both apiservers run it (check passes), so that only etcd is the reason.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = c.rotator(&["check"]).await;
        if out.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", text(&out));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = std::fs::read(&c.hosts[0].config).unwrap();

    let out = c.apply(&[], &["rotate-key"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not migrated: 30 secrets stored with aescbc/key1 (stale)")
            && err.contains("not migrated: 10 configmaps stored with aescbc/key1 (stale)")
            && err.contains("--force"),
        "{err}"
    );
    assert!(!c.state.exists(), "a refused run wrote a state file");
    for h in &c.hosts {
        assert_eq!(
            std::fs::read(&h.config).unwrap(),
            before,
            "a refused run wrote"
        );
    }
    for (k, v) in c.values("secrets").await {
        assert!(v.starts_with(OLD_PREFIX), "{k}");
    }

    // --force: the run proceeds, rewrites everything, and the state file says what it overrode.
    let out = c.apply(&["--force"], &["rotate-key"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this run was started with --force over: not migrated: 10 configmaps"),
        "{err}"
    );
    let state = c.state_json().unwrap();
    let forced: Vec<String> = state["forced"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        forced,
        [
            "not migrated: 10 configmaps stored with aescbc/key1 (stale)",
            "not migrated: 30 secrets stored with aescbc/key1 (stale)"
        ]
    );
    let status = c.rotator(&["status"]).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("started with --force over:"),
        "{}",
        text(&status)
    );
    let names = key_names(&c.config_text());
    assert_eq!(names.len(), 1, "{names:?}");
    let expected = format!("k8s:enc:aescbc:v1:{}:", names[0]);
    c.assert_all_start_with(expected.as_bytes()).await;
    c.audit("aescbc", Some(&names[0]));

    // Everything migrated now: the next run needs no force.
    let out = c.apply(&[], &["rotate-key"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(c.state_json().unwrap().get("forced").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_edited_during_the_rewrite_stops_it_and_resume_finishes_after_restore() {
    let mut c = Cluster::start(Options::new(2)).await;
    let secrets = 1000;
    c.seed(secrets, 0).await;
    let mut child = c.spawn_apply(&["--rate", "150"], &["rotate-key"]);
    c.wait_for_state(&mut child, "the rewrite checkpointed a page", |_| {
        c.secrets_rewritten() >= 100
    })
    .await;
    // Someone edits cp1's config while the rewrite runs.
    let stage_file = std::fs::read(&c.hosts[1].config).unwrap();
    let mut edited = stage_file.clone();
    edited.extend_from_slice(b"# someone else was here\n");
    std::fs::write(&c.hosts[1].config, &edited).unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("on host cp1 changed during the rewrite")
            && err.contains(&storage_encryption::config_file_hash(&edited))
            && err.contains(&storage_encryption::config_file_hash(&stage_file))
            && err.contains("rotator resume"),
        "{err}"
    );
    let done = c.secrets_rewritten();
    assert!(done < secrets as u64, "the rewrite did not stop: {done}");

    // Resume while the file is still edited: refused again, nothing rewritten.
    let out = c.resume(&[]).await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));

    // The operator looks, restores the file; resume proves the stage again and finishes.
    std::fs::write(&c.hosts[1].config, &stage_file).unwrap();
    let out = c.resume(&[]).await;
    assert!(out.status.success(), "{}", text(&out));
    c.assert_rotated().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kms_provider_whose_decrypt_fails_never_becomes_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let broken = BrokenKms::start(&dir.path().join("broken.sock"), "decrypt-fails").unwrap();
    let mut c = Cluster::start(Options::new(2)).await;
    c.seed(20, 5).await;
    let out = c
        .apply(
            &[],
            &[
                "to-kms",
                "--kms-name",
                "thirdparty",
                "--kms-endpoint",
                &broken.endpoint(),
            ],
        )
        .await;
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stage 2 refused before any write: KMS provider thirdparty")
            && err.contains("cp0: round trip failed: Decrypt call to")
            && err.contains("cp1: round trip failed: Decrypt call to")
            && err.contains("cannot decrypt"),
        "{err}"
    );
    // Stage 1 (the provider added as a reader) ran; stage 2 wrote nothing.
    let cfg = EncryptionConfiguration::parse_bytes(c.config_text().as_bytes()).unwrap();
    let first = &cfg.resources[0].providers[0];
    assert!(matches!(first, ProviderConfig::AesCbc(_)), "{first:?}");
    assert!(
        cfg.resources[0]
            .providers
            .iter()
            .any(|p| matches!(p, ProviderConfig::Kms(k) if k.name == "thirdparty")),
        "stage 1 added it as a reader"
    );
    let status = c.rotator(&["status", "--output", "json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["stage"], 2, "{v}");
    assert_eq!(v["step"], "pending", "{v}");
    c.assert_all_start_with(OLD_PREFIX).await;
    // Resuming asks again, and refuses again.
    let out = c.resume(&[]).await;
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    assert!(matches!(
        EncryptionConfiguration::parse_bytes(c.config_text().as_bytes())
            .unwrap()
            .resources[0]
            .providers[0],
        ProviderConfig::AesCbc(_)
    ));
}
