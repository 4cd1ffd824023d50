//! The rotator end to end: a real etcd, two kube-apiserver stand-ins over it
//! (each with its own EncryptionConfiguration file and automatic reload), a
//! few hundred Secrets and ConfigMaps, and the real `rotator` binary.
//!
//! - a local key rotation runs to the end: every value is under the new key
//!   and `etcd-inspect` finds nothing stale;
//! - the gate refuses to remove the old key while a value still needs it, and
//!   names that value; after the value is rewritten the run finishes;
//! - a run killed (SIGKILL) between a write and its proof resumes and finishes;
//! - the rewrite survives injected 409 conflicts and 429 throttling;
//! - every other operation in a lifecycle: enable (identity → aesgcm), to-kms
//!   (real kms-plugin), switch-kms, disable — each ending with every value
//!   stored the way the final config writes it.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use atrest_tests::cluster::{
    Cluster, NEW_PREFIX, OLD_PREFIX, Options, count, identity_config, key_names, rewrite_summary,
    text,
};
use atrest_tests::plugin::{PluginOptions, PluginProcess};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use storage_encryption::EncryptionConfiguration;

/// Starts etcd and one stand-in per entry of `specs`: its --reload-delay,
/// optionally `+MODE` for the host's `proof:` in the rotator config (`3s+reload`).
async fn start(specs: &[&str]) -> Cluster {
    Cluster::start(Options::specs(specs)).await
}

fn key_names_at(path: &Path) -> Vec<String> {
    key_names(&std::fs::read_to_string(path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_key_end_to_end_across_two_apiservers() {
    let mut c = start(&["0s", "1s"]).await;
    c.seed(300, 100).await;
    for (k, v) in c.values("secrets").await {
        assert!(v.starts_with(OLD_PREFIX), "{k}");
    }
    let plan = c.rotator(&["plan", "rotate-key"]).await;
    assert!(plan.status.success(), "{}", text(&plan));
    assert!(
        !String::from_utf8_lossy(&plan.stdout).contains(&STANDARD.encode([7u8; 32])),
        "plan shows a key"
    );

    let before = std::fs::read(&c.hosts[0].config).unwrap();
    let dry = c.rotator(&["apply", "--dry-run", "rotate-key"]).await;
    assert!(dry.status.success(), "{}", text(&dry));
    let shown = String::from_utf8_lossy(&dry.stdout);
    assert!(
        shown.contains("apiserver cp0: reachable; proof by config-hash")
            && shown.contains("dry run: nothing was changed"),
        "{shown}"
    );
    assert!(!c.state.exists(), "a dry run wrote the state file");
    assert_eq!(
        std::fs::read(&c.hosts[0].config).unwrap(),
        before,
        "a dry run changed a host file"
    );

    let out = c.apply(&[], &["rotate-key"]).await;
    assert!(out.status.success(), "{}", text(&out));
    c.assert_rotated().await;
    // A second apply starts a new run (the old one is finished) only when asked; resume is a no-op.
    let again = c.rotator(&["resume"]).await;
    assert!(again.status.success(), "{}", text(&again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_refuses_while_a_value_still_needs_the_old_key() {
    let mut c = start(&["0s", "0s"]).await;
    c.seed(40, 10).await;
    let victim = "/registry/secrets/default/s-7";
    let old_value = c
        .values("secrets")
        .await
        .into_iter()
        .find(|(k, _)| k == victim)
        .unwrap()
        .1;
    assert!(old_value.starts_with(OLD_PREFIX));

    // Stages 1-3: new key added, made first, everything rewritten.
    let out = c.apply(&["--stages", "3"], &["rotate-key"]).await;
    assert!(out.status.success(), "{}", text(&out));
    for (k, v) in c.values("secrets").await {
        assert!(v.starts_with(NEW_PREFIX), "{k}");
    }
    // A value under the old key appears again (an apiserver that lagged, a restored backup...).
    c.etcd.put_all(&[(victim, old_value)]);

    let out = c.resume(&[]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(victim) && err.contains("aescbc/key1"), "{err}");
    for h in &c.hosts {
        assert_eq!(
            key_names_at(&h.config),
            ["key2", "key1"],
            "the old key must stay"
        );
    }
    // Resuming again re-runs the gate: still refused.
    let out = c.resume(&[]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));

    // Rewrite that object through the API (a no-op update of a stale read re-encrypts it).
    let s: Api<Secret> = Api::namespaced(c.client(0), "default");
    let obj = s.get("s-7").await.unwrap();
    s.replace("s-7", &PostParams::default(), &obj)
        .await
        .unwrap();
    let out = c.resume(&[]).await;
    assert!(out.status.success(), "{}", text(&out));
    c.assert_rotated().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_between_write_and_proof_resumes() {
    // The second apiserver takes 3 s to apply a new file, so the run waits for its proof.
    // cp1 is proven by its reload metrics rather than the config hash.
    let mut c = start(&["0s", "3s+reload"]).await;
    c.seed(60, 20).await;
    let mut child = c.spawn_apply(&[], &["rotate-key"]);
    // Wait until stage 2's file is written everywhere and the run waits for proof.
    c.wait_for_state(&mut child, "stage 2's proof", |v| {
        v["stage"] == 1 && v["step"]["step"] == "applied"
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    let status = c.rotator(&["status"]).await;
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("stage 2/4: applied"), "{shown}");
    // A new apply refuses while this run is unfinished.
    let out = c.rotator(&["apply", "rotate-key"]).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));

    let out = c.resume(&[]).await;
    assert!(out.status.success(), "{}", text(&out));
    c.assert_rotated().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_survives_conflicts_and_throttling() {
    let mut opts = Options::specs(&["0s+config-hash", "0s+reload"]);
    opts.hosts[0] = opts.hosts[0].clone().with_extra(&[
        "--fault-conflict-every",
        "7",
        "--fault-throttle-every",
        "13",
    ]);
    opts.token = Some("a-bearer-token-for-the-stand-ins".into());
    let mut c = Cluster::start(opts).await;
    c.seed(200, 50).await;
    let out = c.apply(&["--concurrency", "8"], &["rotate-key"]).await;
    assert!(out.status.success(), "{}", text(&out));
    // The bearer token never shows in output or in the state file.
    assert!(!text(&out).contains("a-bearer-token"), "{}", text(&out));
    assert!(!String::from_utf8_lossy(&std::fs::read(&c.state).unwrap()).contains("a-bearer-token"));
    // "rewrite: N updated, G gone (404), C conflicts retried, T throttled (429), ..."
    let line = rewrite_summary(&out);
    assert!(
        count(&line, " conflicts") > 0,
        "no conflict was injected? {}",
        text(&out)
    );
    assert!(
        count(&line, " throttled") > 0,
        "no 429 was injected? {}",
        text(&out)
    );
    c.assert_rotated().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_enable_to_kms_switch_kms_disable() {
    let plugin = PluginProcess::start(PluginOptions::new()).await.unwrap();
    let endpoint = format!("unix://{}", plugin.endpoint().path().unwrap().display());
    let mut opts = Options::specs(&["0s", "0s"]);
    opts.config = identity_config();
    let mut c = Cluster::start(opts).await;
    c.seed(60, 20).await;
    c.assert_all_start_with(b"{").await;

    c.apply_ok(
        &[],
        &[
            "enable",
            "--provider",
            "aesgcm",
            "--resources",
            "secrets,configmaps",
        ],
    )
    .await;
    c.assert_all_start_with(b"k8s:enc:aesgcm:v1:key1:").await;
    let cfg =
        EncryptionConfiguration::parse_bytes(&std::fs::read(&c.hosts[0].config).unwrap()).unwrap();
    assert_eq!(
        cfg.resources[0].providers.len(),
        1,
        "identity removed after the gate"
    );

    c.apply_ok(
        &[],
        &[
            "to-kms",
            "--kms-name",
            "atrest",
            "--kms-endpoint",
            &endpoint,
        ],
    )
    .await;
    c.assert_all_start_with(b"k8s:enc:kms:v2:atrest:").await;

    // The same plugin under a second provider name stands in for a second KMS.
    c.apply_ok(
        &[],
        &[
            "switch-kms",
            "--kms-name",
            "atrest-b",
            "--kms-endpoint",
            &endpoint,
        ],
    )
    .await;
    c.assert_all_start_with(b"k8s:enc:kms:v2:atrest-b:").await;
    let text_now = String::from_utf8(std::fs::read(&c.hosts[0].config).unwrap()).unwrap();
    assert!(
        !text_now.contains("name: atrest\n"),
        "old KMS provider still configured:\n{text_now}"
    );

    c.apply_ok(&[], &["disable"]).await;
    c.assert_all_start_with(b"{").await;
    let cfg =
        EncryptionConfiguration::parse_bytes(&std::fs::read(&c.hosts[0].config).unwrap()).unwrap();
    assert_eq!(
        cfg.resources[0].providers,
        vec![storage_encryption::ProviderConfig::Identity]
    );
    // Objects are intact: read one back through the API.
    let s: Api<Secret> = Api::namespaced(c.client(1), "default");
    let got = s.get("s-5").await.unwrap();
    assert_eq!(got.data.unwrap()["k"].0, b"value-5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_killed_midway_continues_from_its_checkpoint() {
    let mut c = start(&["0s", "0s"]).await;
    let (secrets, configmaps) = (1200, 10);
    c.seed(secrets, configmaps).await;
    // A slow rewrite (rate limit), killed once the first page of 500 is checkpointed.
    let mut child = c.spawn_apply(&["--rate", "150"], &["rotate-key"]);
    c.wait_for_state(&mut child, "the rewrite checkpointed a page", |_| {
        c.secrets_rewritten() >= 500
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let status = c.rotator(&["status"]).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("continues from a saved page"),
        "{}",
        text(&status)
    );

    let out = c.resume(&[]).await;
    assert!(out.status.success(), "{}", text(&out));
    c.assert_rotated().await;
    // Continuing from the checkpoint (not from the start) counts every Secret exactly once:
    // the saved pages, then the rest. Starting over would count the first pages twice.
    let state = c.state_json().unwrap();
    assert_eq!(
        state["rewrite"]["resources"]["/v1/secrets"]["updated"], secrets as u64,
        "{}",
        state["rewrite"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_apiserver_times_out_by_name() {
    // cp1 would apply a new file only after an hour.
    let mut c = start(&["0s", "1h"]).await;
    c.seed(5, 0).await;
    let before = config_file_hash_of(&c.hosts[1].config);
    let out = c
        .rotator(&[
            "apply",
            "--poll-interval",
            "100ms",
            "--proof-timeout",
            "2s",
            "rotate-key",
        ])
        .await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("apiserver cp1 (config-hash) shows: runs config") && err.contains(&before),
        "{err}"
    );
    assert!(!err.contains("apiserver cp0"), "cp0 proved it: {err}");
    // The run stays at stage 1, written and waiting for proof: resume waits again.
    let status = c.rotator(&["status"]).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("stage 1/4: applied"),
        "{}",
        text(&status)
    );
}

fn config_file_hash_of(path: &Path) -> String {
    storage_encryption::config_file_hash(&std::fs::read(path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_whose_continue_token_expires_resumes_after_410() {
    let mut c = start(&["0s", "0s"]).await;
    let secrets = 1200;
    c.seed(secrets, 0).await;
    let mut child = c.spawn_apply(&["--rate", "200"], &["rotate-key"]);
    c.wait_for_state(&mut child, "the rewrite checkpointed a page", |_| {
        c.secrets_rewritten() >= 500
    })
    .await;
    // Compact etcd past the revision the list is pinned to: its continue token expires.
    let mut client = c.etcd.client().await;
    let rev = client
        .get("compact-me", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(rev, None).await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(410)"),
        "no 410 was seen: {}",
        text(&out)
    );
    c.assert_rotated().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_reached_through_a_kubeconfig() {
    let mut opts = Options::specs(&["0s"]);
    opts.token = Some("kubeconfig-token".into());
    let mut c = Cluster::start(opts).await;
    let kubeconfig = c.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: cp0\nclusters:\n- name: cp0\n  cluster:\n    server: {}\ncontexts:\n- name: cp0\n  context:\n    cluster: cp0\n    user: admin\nusers:\n- name: admin\n  user:\n    token: kubeconfig-token\n",
            c.hosts[0].standin.url()
        ),
    )
    .unwrap();
    let text_now = std::fs::read_to_string(&c.rotator_config).unwrap();
    let url_line = format!(
        "apiserver: {{ url: '{}', token: 'kubeconfig-token' }}",
        c.hosts[0].standin.url()
    );
    assert!(text_now.contains(&url_line), "{text_now}");
    let with_kc = text_now.replace(
        &url_line,
        &format!(
            "apiserver: {{ kubeconfig: {}, context: cp0 }}",
            kubeconfig.display()
        ),
    );
    std::fs::write(&c.rotator_config, with_kc).unwrap();
    c.seed(20, 5).await;
    // With every log on, neither the token nor object data reaches the output.
    let out = c
        .apply_cmd(&[], &["rotate-key"])
        .env("ATREST_LOG", "trace")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(all.lines().count() > 100, "trace logging is not on? {all}");
    assert!(!all.contains("kubeconfig-token"), "the token was logged");
    assert!(
        !all.contains("value-") && !all.contains("dmFsdWUt"),
        "object data was logged"
    );
    assert!(
        !all.contains(&c.generated_key()),
        "the generated key was logged"
    );
    for resource in ["secrets", "configmaps"] {
        for (k, v) in c.values(resource).await {
            assert!(v.starts_with(NEW_PREFIX), "{k}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_simultaneous_runs_one_proceeds_the_other_is_a_state_conflict() {
    // cp1 never proves a stage, so the run that proceeds waits (holding the lock).
    let mut c = start(&["0s", "1h"]).await;
    c.seed(5, 0).await;
    let mut a = c.spawn_apply(&[], &["rotate-key"]);
    let mut b = c.spawn_apply(&[], &["rotate-key"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (loser, mut winner) = loop {
        if a.try_wait().unwrap().is_some() {
            break (a, b);
        }
        if b.try_wait().unwrap().is_some() {
            break (b, a);
        }
        assert!(Instant::now() < deadline, "neither run ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = loser.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another rotator"),
        "{}",
        text(&out)
    );
    // The other one proceeds: stage 1 is written and waits for proof.
    c.wait_for_state(&mut winner, "the winner waits for stage 1's proof", |v| {
        v["stage"] == 0 && v["step"]["step"] == "applied"
    })
    .await;
    // Meanwhile a resume is refused by the lock, not by the unfinished run.
    let out = c.resume(&[]).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another rotator"),
        "{}",
        text(&out)
    );
    assert!(winner.try_wait().unwrap().is_none(), "the winner ended");
    winner.start_kill().unwrap();
    winner.wait().await.unwrap();
}
