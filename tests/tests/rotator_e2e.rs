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

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use atrest_tests::etcd::EtcdServer;
use atrest_tests::plugin::bin_path;
use atrest_tests::standin::StandinProcess;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use etcd_client::GetOptions;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use storage_encryption::EncryptionConfiguration;

const OLD_PREFIX: &[u8] = b"k8s:enc:aescbc:v1:key1:";
const NEW_PREFIX: &[u8] = b"k8s:enc:aescbc:v1:key2:";

fn initial_config() -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets, configmaps]\n    providers:\n      - aescbc:\n          keys:\n            - name: key1\n              secret: {}\n      - identity: {{}}\n",
        STANDARD.encode([7u8; 32])
    )
}

struct Cluster {
    etcd: EtcdServer,
    standins: Vec<StandinProcess>,
    configs: Vec<PathBuf>,
    rotator_config: PathBuf,
    state: PathBuf,
    token: Option<String>,
    dir: tempfile::TempDir,
}

/// Starts etcd and one stand-in per entry of `delays`: its --reload-delay,
/// optionally `+MODE` for the host's `proof:` in the rotator config (`3s+reload`).
fn start(delays: &[&str]) -> Cluster {
    start_with(delays, &initial_config(), &[], None)
}

/// Like [`start`] with a given first config and extra flags for the first stand-in.
/// With `token`, every stand-in requires it and the rotator config carries it.
fn start_with(delays: &[&str], config: &str, first_extra: &[&str], token: Option<&str>) -> Cluster {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut standins = Vec::new();
    let mut configs = Vec::new();
    let mut hosts = String::new();
    for (i, spec) in delays.iter().enumerate() {
        let (delay, proof) = spec.split_once('+').unwrap_or((spec, "auto"));
        let host_dir = dir.path().join(format!("cp{i}"));
        std::fs::create_dir(&host_dir).unwrap();
        let path = host_dir.join("encryption-config.yaml");
        std::fs::write(&path, config).unwrap();
        let mut args: Vec<String> = if i == 0 {
            first_extra.iter().map(|a| a.to_string()).collect()
        } else {
            Vec::new()
        };
        args.extend(
            [
                "--encryption-provider-config",
                path.to_str().unwrap(),
                "--encryption-provider-config-automatic-reload",
                "--config-reload-interval",
                "200ms",
                "--reload-delay",
                delay,
                "--apiserver-id",
                format!("cp{i}").as_str(),
                "--resources",
                "secrets,configmaps",
            ]
            .map(String::from),
        );
        if let Some(t) = token {
            args.extend(["--token".to_string(), t.to_string()]);
        }
        let standin = StandinProcess::start(etcd.endpoint(), &args).unwrap();
        let auth = token.map(|t| format!(", token: '{t}'")).unwrap_or_default();
        hosts.push_str(&format!(
            "  - name: cp{i}\n    proof: {proof}\n    encryptionConfig: {}\n    apiserver: {{ url: '{}'{auth} }}\n",
            path.display(),
            standin.url()
        ));
        standins.push(standin);
        configs.push(path);
    }
    let rotator_config = dir.path().join("rotator.yaml");
    std::fs::write(
        &rotator_config,
        format!("hosts:\n{hosts}etcd:\n  endpoints: [{}]\n", etcd.endpoint()),
    )
    .unwrap();
    let state = dir.path().join("state.json");
    Cluster {
        etcd,
        standins,
        configs,
        rotator_config,
        state,
        token: token.map(str::to_owned),
        dir,
    }
}

fn client(c: &Cluster, i: usize) -> kube::Client {
    let mut config = kube::Config::new(c.standins[i].url().parse().unwrap());
    config.default_namespace = "default".into();
    if let Some(t) = &c.token {
        config.auth_info.token = Some(t.clone().into());
    }
    kube::Client::try_from(config).unwrap()
}

async fn seed(c: &Cluster, secrets: usize, configmaps: usize) {
    let kc = client(c, 0);
    let s: Api<Secret> = Api::namespaced(kc.clone(), "default");
    for i in 0..secrets {
        let obj = Secret {
            metadata: ObjectMeta {
                name: Some(format!("s-{i}")),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "k".to_owned(),
                ByteString(format!("value-{i}").into_bytes()),
            )])),
            ..Default::default()
        };
        s.create(&PostParams::default(), &obj).await.unwrap();
    }
    let cm: Api<ConfigMap> = Api::namespaced(kc, "default");
    for i in 0..configmaps {
        let obj = ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("c-{i}")),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("k".to_owned(), format!("v-{i}"))])),
            ..Default::default()
        };
        cm.create(&PostParams::default(), &obj).await.unwrap();
    }
}

fn rotator_cmd(c: &Cluster, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin_path("rotator"));
    cmd.arg("--config")
        .arg(&c.rotator_config)
        .arg("--state")
        .arg(&c.state)
        .args(args)
        .env("ATREST_LOG", "warn")
        .kill_on_drop(true);
    cmd
}

const FAST: &[&str] = &["--poll-interval", "100ms", "--proof-timeout", "60s"];

async fn rotator(c: &Cluster, args: &[&str]) -> Output {
    rotator_cmd(c, args).output().await.unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every value under `/registry/<resource>/`.
async fn values(etcd: &EtcdServer, resource: &str) -> Vec<(String, Vec<u8>)> {
    let mut client = etcd.client().await;
    let r = client
        .get(
            format!("/registry/{resource}/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

fn key_names(path: &Path) -> Vec<String> {
    let c = EncryptionConfiguration::parse_bytes(&std::fs::read(path).unwrap()).unwrap();
    c.resources[0].providers[0]
        .keys()
        .unwrap()
        .iter()
        .map(|k| k.name.clone())
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The end state of a finished rotate-key: new key only, everywhere.
async fn assert_rotated(c: &Cluster, secrets: usize, configmaps: usize) {
    let first = std::fs::read(&c.configs[0]).unwrap();
    for p in &c.configs {
        assert_eq!(std::fs::read(p).unwrap(), first, "hosts differ");
        assert_eq!(key_names(p), ["key2"], "{}", p.display());
        assert_eq!(mode(p), 0o600);
        let bak = p.with_file_name("encryption-config.yaml.prev");
        assert_eq!(mode(&bak), 0o600);
        assert_eq!(
            key_names(&bak),
            ["key2", "key1"],
            "the backup is the previous stage's file"
        );
    }
    for (resource, n) in [("secrets", secrets), ("configmaps", configmaps)] {
        let vals = values(&c.etcd, resource).await;
        assert_eq!(vals.len(), n, "{resource}");
        for (k, v) in &vals {
            assert!(
                v.starts_with(NEW_PREFIX),
                "{k} is not under the new key: {:?}",
                &v[..v.len().min(30)]
            );
        }
    }
    // The real audit CLI agrees: nothing stale, plaintext or unreadable.
    let out = std::process::Command::new(bin_path("etcd-inspect"))
        .args(["--endpoints", c.etcd.endpoint(), "--config"])
        .arg(&c.configs[0])
        .args(["--fail-on", "plaintext,stale,unreadable,undecodable"])
        .output()
        .unwrap();
    assert!(out.status.success(), "etcd-inspect: {}", text(&out));
    assert_eq!(mode(&c.state), 0o600, "the state file holds keys");
    let status = std::process::Command::new(bin_path("rotator"))
        .arg("--state")
        .arg(&c.state)
        .args(["status", "--output", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["finished"], true, "{v}");
    // The state file holds the generated key; no output ever shows it.
    let new_key = generated_key(c);
    assert!(!text(&status).contains(&new_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_key_end_to_end_across_two_apiservers() {
    let c = start(&["0s", "1s"]);
    seed(&c, 300, 100).await;
    for (k, v) in values(&c.etcd, "secrets").await {
        assert!(v.starts_with(OLD_PREFIX), "{k}");
    }
    let plan = rotator(&c, &["plan", "rotate-key"]).await;
    assert!(plan.status.success(), "{}", text(&plan));
    assert!(
        !String::from_utf8_lossy(&plan.stdout).contains(&STANDARD.encode([7u8; 32])),
        "plan shows a key"
    );

    let before = std::fs::read(&c.configs[0]).unwrap();
    let dry = rotator(&c, &["apply", "--dry-run", "rotate-key"]).await;
    assert!(dry.status.success(), "{}", text(&dry));
    let shown = String::from_utf8_lossy(&dry.stdout);
    assert!(
        shown.contains("apiserver cp0: reachable; proof by config-hash")
            && shown.contains("dry run: nothing was changed"),
        "{shown}"
    );
    assert!(!c.state.exists(), "a dry run wrote the state file");
    assert_eq!(
        std::fs::read(&c.configs[0]).unwrap(),
        before,
        "a dry run changed a host file"
    );

    let mut args = vec!["apply"];
    args.extend_from_slice(FAST);
    args.push("rotate-key");
    let out = rotator(&c, &args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_rotated(&c, 300, 100).await;
    // A second apply starts a new run (the old one is finished) only when asked; resume is a no-op.
    let again = rotator(&c, &["resume"]).await;
    assert!(again.status.success(), "{}", text(&again));
    drop(c.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_refuses_while_a_value_still_needs_the_old_key() {
    let c = start(&["0s", "0s"]);
    seed(&c, 40, 10).await;
    let victim = "/registry/secrets/default/s-7";
    let old_value = values(&c.etcd, "secrets")
        .await
        .into_iter()
        .find(|(k, _)| k == victim)
        .unwrap()
        .1;
    assert!(old_value.starts_with(OLD_PREFIX));

    // Stages 1-3: new key added, made first, everything rewritten.
    let mut args = vec!["apply", "--stages", "3"];
    args.extend_from_slice(FAST);
    args.push("rotate-key");
    let out = rotator(&c, &args).await;
    assert!(out.status.success(), "{}", text(&out));
    for (k, v) in values(&c.etcd, "secrets").await {
        assert!(v.starts_with(NEW_PREFIX), "{k}");
    }
    // A value under the old key appears again (an apiserver that lagged, a restored backup...).
    c.etcd.put_all(&[(victim, old_value)]);

    let mut args = vec!["resume"];
    args.extend_from_slice(FAST);
    let out = rotator(&c, &args).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(victim) && err.contains("aescbc/key1"), "{err}");
    for p in &c.configs {
        assert_eq!(key_names(p), ["key2", "key1"], "the old key must stay");
    }
    // Resuming again re-runs the gate: still refused.
    let out = rotator(&c, &args).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));

    // Rewrite that object through the API (a no-op update of a stale read re-encrypts it).
    let s: Api<Secret> = Api::namespaced(client(&c, 0), "default");
    let obj = s.get("s-7").await.unwrap();
    s.replace("s-7", &PostParams::default(), &obj)
        .await
        .unwrap();
    let out = rotator(&c, &args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_rotated(&c, 40, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_between_write_and_proof_resumes() {
    // The second apiserver takes 3 s to apply a new file, so the run waits for its proof.
    // cp1 is proven by its reload metrics rather than the config hash.
    let c = start(&["0s", "3s+reload"]);
    seed(&c, 60, 20).await;
    let mut args = vec!["apply"];
    args.extend_from_slice(FAST);
    args.push("rotate-key");
    let mut child = rotator_cmd(&c, &args).spawn().unwrap();
    // Wait until stage 2's file is written everywhere and the run waits for proof.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(bytes) = std::fs::read(&c.state)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && v["stage"] == 1
            && v["step"]["step"] == "applied"
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run never reached stage 2's proof"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    let status = rotator(&c, &["status"]).await;
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("stage 2/4: applied"), "{shown}");
    // A new apply refuses while this run is unfinished.
    let out = rotator(&c, &["apply", "rotate-key"]).await;
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));

    let mut args = vec!["resume"];
    args.extend_from_slice(FAST);
    let out = rotator(&c, &args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_rotated(&c, 60, 20).await;
}

fn rewrite_counts(stderr: &str) -> (u64, u64) {
    // "rewrite: N updated, G gone (404), C conflicts retried, T throttled (429), ..."
    let line = stderr
        .lines()
        .find(|l| l.starts_with("rewrite: "))
        .unwrap_or_else(|| panic!("no rewrite summary in {stderr}"));
    let num = |word: &str| -> u64 {
        let before = &line[..line.find(word).unwrap()];
        before
            .trim_end()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num(" conflicts"), num(" throttled"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_survives_conflicts_and_throttling() {
    let c = start_with(
        &["0s+config-hash", "0s+reload"],
        &initial_config(),
        &[
            "--fault-conflict-every",
            "7",
            "--fault-throttle-every",
            "13",
        ],
        Some("a-bearer-token-for-the-stand-ins"),
    );
    seed(&c, 200, 50).await;
    let mut args = vec!["apply", "--concurrency", "8"];
    args.extend_from_slice(FAST);
    args.push("rotate-key");
    let out = rotator(&c, &args).await;
    assert!(out.status.success(), "{}", text(&out));
    // The bearer token never shows in output or in the state file.
    assert!(!text(&out).contains("a-bearer-token"), "{}", text(&out));
    assert!(!String::from_utf8_lossy(&std::fs::read(&c.state).unwrap()).contains("a-bearer-token"));
    let (conflicts, throttled) = rewrite_counts(&String::from_utf8_lossy(&out.stderr));
    assert!(conflicts > 0, "no conflict was injected? {}", text(&out));
    assert!(throttled > 0, "no 429 was injected? {}", text(&out));
    assert_rotated(&c, 200, 50).await;
}

/// Every value of secrets and configmaps starts with `prefix`.
async fn assert_all_start_with(c: &Cluster, prefix: &[u8], n: usize) {
    let mut seen = 0;
    for resource in ["secrets", "configmaps"] {
        for (k, v) in values(&c.etcd, resource).await {
            assert!(
                v.starts_with(prefix),
                "{k}: expected {:?}, got {:?}",
                String::from_utf8_lossy(prefix),
                String::from_utf8_lossy(&v[..v.len().min(30)])
            );
            seen += 1;
        }
    }
    assert_eq!(seen, n);
}

async fn apply_ok(c: &Cluster, op: &[&str]) -> Output {
    // Each operation is a new run: the finished state file of the previous one is replaced.
    let mut args = vec!["apply"];
    args.extend_from_slice(FAST);
    args.extend_from_slice(op);
    let out = rotator(c, &args).await;
    assert!(out.status.success(), "{op:?}: {}", text(&out));
    let first = std::fs::read(&c.configs[0]).unwrap();
    assert!(
        c.configs.iter().all(|p| std::fs::read(p).unwrap() == first),
        "hosts differ after {op:?}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_enable_to_kms_switch_kms_disable() {
    let identity = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets, configmaps]\n    providers:\n      - identity: {}\n";
    let plugin =
        atrest_tests::plugin::PluginProcess::start(atrest_tests::plugin::PluginOptions::new())
            .await
            .unwrap();
    let endpoint = format!("unix://{}", plugin.endpoint().path().unwrap().display());
    let c = start_with(&["0s", "0s"], identity, &[], None);
    seed(&c, 60, 20).await;
    assert_all_start_with(&c, b"{", 80).await;

    apply_ok(
        &c,
        &[
            "enable",
            "--provider",
            "aesgcm",
            "--resources",
            "secrets,configmaps",
        ],
    )
    .await;
    assert_all_start_with(&c, b"k8s:enc:aesgcm:v1:key1:", 80).await;
    let cfg = EncryptionConfiguration::parse_bytes(&std::fs::read(&c.configs[0]).unwrap()).unwrap();
    assert_eq!(
        cfg.resources[0].providers.len(),
        1,
        "identity removed after the gate"
    );

    apply_ok(
        &c,
        &[
            "to-kms",
            "--kms-name",
            "atrest",
            "--kms-endpoint",
            &endpoint,
        ],
    )
    .await;
    assert_all_start_with(&c, b"k8s:enc:kms:v2:atrest:", 80).await;

    // The same plugin under a second provider name stands in for a second KMS.
    apply_ok(
        &c,
        &[
            "switch-kms",
            "--kms-name",
            "atrest-b",
            "--kms-endpoint",
            &endpoint,
        ],
    )
    .await;
    assert_all_start_with(&c, b"k8s:enc:kms:v2:atrest-b:", 80).await;
    let text_now = String::from_utf8(std::fs::read(&c.configs[0]).unwrap()).unwrap();
    assert!(
        !text_now.contains("name: atrest\n"),
        "old KMS provider still configured:\n{text_now}"
    );

    apply_ok(&c, &["disable"]).await;
    assert_all_start_with(&c, b"{", 80).await;
    let cfg = EncryptionConfiguration::parse_bytes(&std::fs::read(&c.configs[0]).unwrap()).unwrap();
    assert_eq!(
        cfg.resources[0].providers,
        vec![storage_encryption::ProviderConfig::Identity]
    );
    // Objects are intact: read one back through the API.
    let s: Api<Secret> = Api::namespaced(client(&c, 1), "default");
    let got = s.get("s-5").await.unwrap();
    assert_eq!(got.data.unwrap()["k"].0, b"value-5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_killed_midway_continues_from_its_checkpoint() {
    let c = start(&["0s", "0s"]);
    let (secrets, configmaps) = (1200, 10);
    seed(&c, secrets, configmaps).await;
    // A slow rewrite (rate limit), killed once the first page of 500 is checkpointed.
    let mut args = vec!["apply", "--rate", "150"];
    args.extend_from_slice(FAST);
    args.push("rotate-key");
    let mut child = rotator_cmd(&c, &args).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(bytes) = std::fs::read(&c.state)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && v["rewrite"]["resources"]["/v1/secrets"]["updated"]
                .as_u64()
                .unwrap_or(0)
                >= 500
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rewrite never checkpointed a page"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let status = rotator(&c, &["status"]).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("continues from a saved page"),
        "{}",
        text(&status)
    );

    let mut args = vec!["resume"];
    args.extend_from_slice(FAST);
    let out = rotator(&c, &args).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_rotated(&c, secrets, configmaps).await;
    // Continuing from the checkpoint (not from the start) counts every Secret exactly once:
    // the saved pages, then the rest. Starting over would count the first pages twice.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&c.state).unwrap()).unwrap();
    assert_eq!(
        state["rewrite"]["resources"]["/v1/secrets"]["updated"], secrets as u64,
        "{}",
        state["rewrite"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_apiserver_times_out_by_name() {
    // cp1 would apply a new file only after an hour.
    let c = start(&["0s", "1h"]);
    seed(&c, 5, 0).await;
    let before = config_file_hash_of(&c.configs[1]);
    let out = rotator(
        &c,
        &[
            "apply",
            "--poll-interval",
            "100ms",
            "--proof-timeout",
            "2s",
            "rotate-key",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("apiserver cp1 (config-hash) shows: runs config") && err.contains(&before),
        "{err}"
    );
    assert!(!err.contains("apiserver cp0"), "cp0 proved it: {err}");
    // The run stays at stage 1, written and waiting for proof: resume waits again.
    let status = rotator(&c, &["status"]).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("stage 1/4: applied"),
        "{}",
        text(&status)
    );
}

/// The key a finished rotate-key generated, from its state file.
fn generated_key(c: &Cluster) -> String {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&c.state).unwrap()).unwrap();
    let last = state["plan"]["stages"][3]["action"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = last
        .lines()
        .find(|l| l.trim_start().starts_with("secret:"))
        .unwrap()
        .trim()
        .trim_start_matches("secret:")
        .trim()
        .to_owned();
    assert_eq!(STANDARD.decode(&key).unwrap().len(), 32);
    assert_ne!(key, STANDARD.encode([7u8; 32]));
    key
}

fn config_file_hash_of(path: &Path) -> String {
    storage_encryption::config_file_hash(&std::fs::read(path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_whose_continue_token_expires_resumes_after_410() {
    let c = start(&["0s", "0s"]);
    let secrets = 1200;
    seed(&c, secrets, 0).await;
    let mut args = vec!["apply", "--rate", "200"];
    args.extend_from_slice(FAST);
    args.push("rotate-key");
    let child = rotator_cmd(&c, &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(bytes) = std::fs::read(&c.state)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && v["rewrite"]["resources"]["/v1/secrets"]["updated"]
                .as_u64()
                .unwrap_or(0)
                >= 500
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rewrite never checkpointed a page"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    assert_rotated(&c, secrets, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_reached_through_a_kubeconfig() {
    let c = start_with(&["0s"], &initial_config(), &[], Some("kubeconfig-token"));
    let kubeconfig = c.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: cp0\nclusters:\n- name: cp0\n  cluster:\n    server: {}\ncontexts:\n- name: cp0\n  context:\n    cluster: cp0\n    user: admin\nusers:\n- name: admin\n  user:\n    token: kubeconfig-token\n",
            c.standins[0].url()
        ),
    )
    .unwrap();
    let text_now = std::fs::read_to_string(&c.rotator_config).unwrap();
    let url_line = format!(
        "apiserver: {{ url: '{}', token: 'kubeconfig-token' }}",
        c.standins[0].url()
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
    seed(&c, 20, 5).await;
    let mut args = vec!["apply"];
    args.extend_from_slice(FAST);
    args.push("rotate-key");
    // With every log on, neither the token nor object data reaches the output.
    let out = rotator_cmd(&c, &args)
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
        !all.contains(&generated_key(&c)),
        "the generated key was logged"
    );
    for resource in ["secrets", "configmaps"] {
        for (k, v) in values(&c.etcd, resource).await {
            assert!(v.starts_with(NEW_PREFIX), "{k}");
        }
    }
}
