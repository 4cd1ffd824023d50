//! The rotator's acceptance tests: three control-plane "hosts" over one real
//! etcd, each with its own EncryptionConfiguration file, its own keyring copies
//! and its own real kms-plugin processes, and its own kube-apiserver stand-in;
//! the real `rotator` and `etcd-inspect` binaries.
//!
//! Every host gets the same EncryptionConfiguration, so every host's plugin
//! must listen on the same socket path. Hosts 1 and 2 therefore run in their
//! own Linux mount namespace (`unshare --mount`), where their own directory is
//! bind-mounted over the shared socket directory; their stand-in joins that
//! namespace with `nsenter`. Host 0 runs in the test's namespace, so the
//! rotator's gate and `etcd-inspect` (also in this namespace) reach host 0's
//! plugins at the configured path — every keyring copy is byte-identical.
//!
//! During every run a reader lists every Secret and ConfigMap through every
//! stand-in, page by page, and checks each object's content. A value the
//! stand-in cannot decrypt (500 "unable to transform") or a wrong / missing
//! object is a data failure: none is allowed. While etcd itself is down
//! (the etcd-restart test) reads fail with 500s naming etcd or with connection
//! errors; those are outage errors, counted separately, because they say
//! nothing about whether the stored data is readable.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use atrest_tests::cluster::{
    Cluster, HostOptions, Options, aescbc_config, configmap_value, count, identity_config,
    key_names, rewrite_summary, secret_value, text,
};
use atrest_tests::plugin::Keyring;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams};

const NAMESPACES: usize = 5;

/// Three hosts under `config`, objects in 5 namespaces, rewrites 8 at a
/// time, a 90 s proof timeout; with `kms`, providers `a` and `b` on every host.
fn opts(config: String, kms: bool) -> Options {
    let mut o = Options::new(3);
    o.config = config;
    o.namespaces = NAMESPACES;
    if kms {
        o.kms = vec!["a", "b"];
    }
    o.run_flags = [
        "--concurrency",
        "8",
        "--poll-interval",
        "100ms",
        "--proof-timeout",
        "90s",
    ]
    .map(String::from)
    .to_vec();
    o
}

/// Three hosts under aescbc `key1`, no KMS.
fn local() -> Options {
    opts(aescbc_config(), false)
}

/// What the continuous reader saw.
#[derive(Debug, Default)]
struct ReadReport {
    /// Full passes (every resource through every stand-in).
    rounds: u64,
    /// Objects read and checked.
    objects: u64,
    /// Undecryptable values, wrong or missing objects: must stay empty.
    data_failures: Vec<String>,
    /// etcd unreachable (only expected while etcd is down).
    outage_errors: Vec<String>,
    /// 429s from a stand-in injecting them (retried).
    throttled: u64,
}

struct Reader {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<ReadReport>,
}

enum Failure {
    Data(String),
    Outage(String),
    Throttled,
}

fn classify(host: usize, what: &str, e: kube::Error) -> Failure {
    match e {
        kube::Error::Api(s) if s.code == 429 => Failure::Throttled,
        kube::Error::Api(s)
            if s.code == 500
                && !s.message.contains("unable to transform")
                && s.message.to_ascii_lowercase().contains("etcd") =>
        {
            Failure::Outage(format!("cp{host} {what}: {} {}", s.code, s.message))
        }
        kube::Error::Api(s) if s.code == 503 || s.code == 504 => {
            Failure::Outage(format!("cp{host} {what}: {} {}", s.code, s.message))
        }
        kube::Error::Api(s) => Failure::Data(format!("cp{host} {what}: {} {}", s.code, s.message)),
        other => Failure::Outage(format!("cp{host} {what}: {other}")),
    }
}

/// Lists every object of one kind through one stand-in, checking each.
async fn read_all<K>(
    kc: &kube::Client,
    namespaces: &[String],
    host: usize,
    expected: usize,
    check: impl Fn(&K) -> Option<String>,
) -> Result<u64, Failure>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let mut seen = 0usize;
    for ns in namespaces {
        let api: Api<K> = Api::namespaced(kc.clone(), ns);
        let mut token: Option<String> = None;
        loop {
            let mut lp = ListParams::default().limit(200);
            if let Some(t) = &token {
                lp = lp.continue_token(t);
            }
            let page = match api.list(&lp).await {
                Ok(p) => p,
                Err(e) => {
                    return Err(classify(
                        host,
                        &format!("list {}", K::plural(&Default::default())),
                        e,
                    ));
                }
            };
            for obj in &page.items {
                if let Some(problem) = check(obj) {
                    return Err(Failure::Data(format!("cp{host}: {problem}")));
                }
            }
            seen += page.items.len();
            token = page.metadata.continue_.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
    }
    if seen != expected {
        return Err(Failure::Data(format!(
            "cp{host}: listed {seen} {}, expected {expected}",
            K::plural(&Default::default())
        )));
    }
    Ok(seen as u64)
}

fn check_secret(s: &Secret) -> Option<String> {
    let name = s.metadata.name.clone().unwrap_or_default();
    let want = name
        .trim_start_matches("s-")
        .parse()
        .map(secret_value)
        .unwrap_or_default();
    let got = s
        .data
        .as_ref()
        .and_then(|d| d.get("k"))
        .map(|b| b.0.clone());
    (got.as_deref() != Some(want.as_bytes())).then(|| format!("secret {name} has wrong data"))
}

fn check_configmap(c: &ConfigMap) -> Option<String> {
    let name = c.metadata.name.clone().unwrap_or_default();
    let want = name
        .trim_start_matches("c-")
        .parse()
        .map(configmap_value)
        .unwrap_or_default();
    let got = c.data.as_ref().and_then(|d| d.get("k")).cloned();
    (got.as_deref() != Some(want.as_str())).then(|| format!("configmap {name} has wrong data"))
}

fn start_reader(c: &Cluster) -> Reader {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<kube::Client> = (0..c.hosts.len()).map(|h| c.client(h)).collect();
    let namespaces = c.namespaces();
    let (secrets, configmaps) = (c.secrets, c.configmaps);
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut report = ReadReport::default();
        let record = |report: &mut ReadReport, r: Result<u64, Failure>| match r {
            Ok(n) => report.objects += n,
            Err(Failure::Data(m)) => report.data_failures.push(m),
            Err(Failure::Outage(m)) => report.outage_errors.push(m),
            Err(Failure::Throttled) => report.throttled += 1,
        };
        // At least one full pass, even if the run is quick.
        loop {
            let last = flag.load(Ordering::SeqCst);
            for (h, kc) in clients.iter().enumerate() {
                let r = read_all::<Secret>(kc, &namespaces, h, secrets, check_secret).await;
                record(&mut report, r);
                let r =
                    read_all::<ConfigMap>(kc, &namespaces, h, configmaps, check_configmap).await;
                record(&mut report, r);
            }
            report.rounds += 1;
            if last {
                return report;
            }
            // Leave the 2 cores mostly to the run itself.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Reader { stop, task }
}

impl Reader {
    async fn finish(self) -> ReadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Stops the reader and asserts it never met an unreadable or wrong object
/// (and, with `outage_allowed == false`, no error at all).
async fn assert_reads_clean(reader: Reader, outage_allowed: bool) -> ReadReport {
    let r = reader.finish().await;
    assert!(r.rounds >= 2, "the reader made no full pass: {r:?}");
    assert!(
        r.data_failures.is_empty(),
        "{} reads failed on data (first ones: {:?}); {} rounds",
        r.data_failures.len(),
        &r.data_failures[..r.data_failures.len().min(5)],
        r.rounds
    );
    if !outage_allowed {
        assert!(
            r.outage_errors.is_empty(),
            "reads failed with no etcd outage: {:?}",
            &r.outage_errors[..r.outage_errors.len().min(5)]
        );
    }
    eprintln!(
        "reader: {} rounds, {} objects checked, {} outage errors, {} throttled",
        r.rounds,
        r.objects,
        r.outage_errors.len(),
        r.throttled
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_across_three_hosts_with_5000_objects() {
    let t0 = Instant::now();
    let mut c = Cluster::start(opts(identity_config(), true)).await;
    c.seed(2500, 2500).await;
    eprintln!("seeded in {:?}", t0.elapsed());
    let a_endpoint = c.kms_endpoint("a");
    let b_endpoint = c.kms_endpoint("b");
    c.audit("identity", None);
    let reader = start_reader(&c);

    // enable: identity → aescbc; identity is removed only in the last stage.
    c.apply_ok(
        &[],
        &[
            "enable",
            "--provider",
            "aescbc",
            "--resources",
            "secrets,configmaps",
        ],
    )
    .await;
    let cfg = c.config_text();
    assert!(!cfg.contains("identity"), "{cfg}");
    assert_bak_has(&c, &["identity", "aescbc"]);
    c.audit("aescbc", Some("key1"));
    eprintln!("enable done at {:?}", t0.elapsed());

    // rotate-key: key1 → a generated key2; key1 gone only at the end.
    c.apply_ok(&[], &["rotate-key"]).await;
    let cfg = c.config_text();
    assert!(!cfg.contains("name: key1"), "{cfg}");
    assert_bak_has(&c, &["name: key1", "name: key2"]);
    c.audit("aescbc", Some("key2"));
    eprintln!("rotate-key done at {:?}", t0.elapsed());

    // to-kms: aescbc → KMS provider `a` (each host's own plugin, same socket path).
    c.apply_ok(
        &[],
        &["to-kms", "--kms-name", "a", "--kms-endpoint", &a_endpoint],
    )
    .await;
    let cfg = c.config_text();
    assert!(!cfg.contains("aescbc"), "{cfg}");
    assert_bak_has(&c, &["aescbc", "name: a\n"]);
    c.audit("kms-v2", Some("a"));
    eprintln!("to-kms done at {:?}", t0.elapsed());

    // rotate-kek on provider a: every keyring copy gets the new KEK; the old one
    // is retired only at the end.
    let before = c.keyring_bytes();
    let old = Keyring::at(&c.hosts[0].keyring).list().await.unwrap();
    c.apply_ok(&["--plugin-settle", "2s"], &["rotate-kek"])
        .await;
    let after = c.keyring_bytes();
    assert_ne!(before, after);
    let now = Keyring::at(&c.hosts[2].keyring).list().await.unwrap();
    assert!(
        now.keks.iter().all(|k| k.kek != old.primary),
        "old KEK still in the keyring"
    );
    let new_key_id = now.primary_kek().unwrap().key_id.clone().unwrap();
    c.audit("kms-v2", Some("a"));
    assert_key_ids(&c, "a", &new_key_id).await;
    eprintln!("rotate-kek done at {:?}", t0.elapsed());

    // switch-kms: provider a → provider b (another plugin, another keyring).
    c.apply_ok(
        &[],
        &[
            "switch-kms",
            "--kms-name",
            "b",
            "--kms-endpoint",
            &b_endpoint,
        ],
    )
    .await;
    let cfg = c.config_text();
    assert!(!cfg.contains("name: a\n"), "{cfg}");
    assert_bak_has(&c, &["name: a\n", "name: b\n"]);
    c.audit("kms-v2", Some("b"));
    eprintln!("switch-kms done at {:?}", t0.elapsed());

    // disable: everything back to plaintext.
    c.apply_ok(&[], &["disable"]).await;
    let cfg = c.config_text();
    assert!(!cfg.contains("kms"), "{cfg}");
    assert_bak_has(&c, &["name: b\n", "identity"]);
    c.audit("identity", None);
    eprintln!("disable done at {:?}", t0.elapsed());

    let report = assert_reads_clean(reader, false).await;
    assert!(report.rounds >= 6, "{report:?}");
}

/// Every host's `.prev` (the file of the stage before the last, i.e. the last
/// one before the removal) still holds both the old and the new provider / key:
/// the old one was removed only by the last stage.
fn assert_bak_has(c: &Cluster, needles: &[&str]) {
    for h in &c.hosts {
        let bak = std::fs::read_to_string(h.config.with_extension("yaml.prev")).unwrap();
        for n in needles {
            assert!(
                bak.contains(n),
                "{n:?} missing from the previous stage's file:\n{bak}"
            );
        }
    }
}

/// Every stored KMS v2 value of provider `name` carries `key_id`.
async fn assert_key_ids(c: &Cluster, name: &str, key_id: &str) {
    let mut client = c.etcd.client().await;
    let prefix = format!("k8s:enc:kms:v2:{name}:");
    let mut n = 0;
    for resource in ["secrets", "configmaps"] {
        let r = client
            .get(
                format!("/registry/{resource}/"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        for kv in r.kvs() {
            let payload = kv.value().strip_prefix(prefix.as_bytes()).unwrap();
            let got = storage_encryption::format::kmsv2::decode(payload)
                .unwrap()
                .key_id;
            assert_eq!(got, key_id, "{}", String::from_utf8_lossy(kv.key()));
            n += 1;
        }
    }
    assert_eq!(n, c.secrets + c.configmaps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_stage_boundary_then_resumed() {
    let mut c = Cluster::start(local()).await;
    c.seed(500, 500).await;
    let reader = start_reader(&c);
    // One stage per run: each run ends at a stage boundary, the next resumes.
    c.apply_ok(&["--stages", "1"], &["rotate-key"]).await;
    let mut stages = 1;
    loop {
        if c.finished() {
            break;
        }
        // The old key stays until the run's last stage.
        assert!(
            key_names(&c.config_text()).contains(&"key1".to_owned()),
            "key1 removed before the end (after {stages} stages)"
        );
        c.audit_readable();
        let out = c.resume(&["--stages", "1"]).await;
        assert!(out.status.success(), "{}", text(&out));
        stages += 1;
        assert!(stages <= 10, "the run never finished");
    }
    assert_eq!(stages, 4, "rotate-key has 4 stages");
    c.assert_rotated().await;
    assert_reads_clean(reader, false).await;
}

/// The state file's current stage index (0-based), if it can be read now.
fn stage_index(c: &Cluster) -> Option<u64> {
    c.state_json()?["stage"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_as_each_stage_is_proven_then_resumed() {
    let mut c = Cluster::start(local()).await;
    c.seed(500, 500).await;
    let reader = start_reader(&c);
    let mut kills = 0;
    let mut first = true;
    loop {
        let before = stage_index(&c).unwrap_or(0);
        let mut cmd = if first {
            c.apply_cmd(&[], &["rotate-key"])
        } else {
            c.resume_cmd(&[])
        };
        first = false;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // SIGKILL the moment the state file records the stage as proven (the
        // index moves on): a crash right at the stage boundary.
        let deadline = Instant::now() + Duration::from_secs(120);
        let killed = loop {
            if stage_index(&c).is_some_and(|s| s > before) {
                child.start_kill().unwrap();
                child.wait().await.unwrap();
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                let out = child.wait_with_output().await.unwrap();
                assert!(out.status.success(), "{}", text(&out));
                break false;
            }
            assert!(Instant::now() < deadline, "stage {before} never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        if !killed || c.finished() {
            break;
        }
        kills += 1;
        // A kill can land between two hosts' writes of the next stage, so the
        // hosts' files may differ here; every one must still hold key1.
        for h in &c.hosts {
            let cfg = std::fs::read_to_string(&h.config).unwrap();
            assert!(
                key_names(&cfg).contains(&"key1".to_owned()),
                "key1 removed before the end (after {kills} kills)"
            );
        }
        c.audit_readable();
        assert!(kills <= 10, "the run never finished");
    }
    // Killed after stages 1, 2 and 3; the last run finished stage 4.
    assert_eq!(kills, 3, "rotate-key has 4 stages");
    c.assert_rotated().await;
    assert_reads_clean(reader, false).await;
}

/// Starts `apply rotate-key` with `extra` and returns the child once the
/// rewrite checkpointed at least `at` Secrets.
async fn run_until_rewritten(c: &Cluster, extra: &[&str], at: u64) -> tokio::process::Child {
    let mut child = c.spawn_apply(extra, &["rotate-key"]);
    c.wait_for_state(&mut child, &format!("the rewrite reached {at}"), |_| {
        c.secrets_rewritten() >= at
    })
    .await;
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_rewrite_then_resumed() {
    let mut c = Cluster::start(local()).await;
    c.seed(1200, 300).await;
    let reader = start_reader(&c);
    let mut child = run_until_rewritten(&c, &["--rate", "200"], 500).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert!(key_names(&c.config_text()).contains(&"key1".to_owned()));
    c.audit_readable();
    let out = c.resume(&[]).await;
    assert!(out.status.success(), "{}", text(&out));
    c.assert_rotated().await;
    assert_reads_clean(reader, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_apiserver_is_waited_for_and_named() {
    let mut o = local();
    o.hosts[1] = HostOptions::extra(&["--reload-delay", "5s"]);
    let mut c = Cluster::start(o).await;
    c.seed(300, 300).await;
    let reader = start_reader(&c);
    // A short proof timeout: the run stops (exit 4) naming cp1 only.
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
    assert!(err.contains("apiserver cp1"), "{err}");
    assert!(
        !err.contains("apiserver cp0") && !err.contains("apiserver cp2"),
        "{err}"
    );
    // A long enough timeout: the run waits for cp1, says so, and finishes.
    let out = c
        .rotator_cmd(&[
            "resume",
            "--poll-interval",
            "100ms",
            "--proof-timeout",
            "90s",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.lines()
            .any(|l| l.starts_with("rotator: waiting for apiserver cp1 (config-hash) shows: ")),
        "the run did not say it waits for cp1: {all}"
    );
    c.assert_rotated().await;
    assert_reads_clean(reader, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_through_an_apiserver_answering_409_and_429() {
    let mut o = local();
    o.hosts[2] = HostOptions::extra(&[
        "--fault-conflict-every",
        "7",
        "--fault-throttle-every",
        "11",
    ]);
    let mut c = Cluster::start(o).await;
    c.seed(500, 500).await;
    let reader = start_reader(&c);
    let out = c.apply_ok(&["--rewrite-via", "cp2"], &["rotate-key"]).await;
    let line = rewrite_summary(&out);
    assert!(count(&line, " conflicts") > 0, "{line}");
    assert!(count(&line, " throttled") > 0, "{line}");
    c.assert_rotated().await;
    // kube's client retries 429s itself, so the reader rarely sees one.
    assert_reads_clean(reader, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_mid_rewrite() {
    let mut c = Cluster::start(local()).await;
    c.seed(1200, 300).await;
    let reader = start_reader(&c);
    let child = run_until_rewritten(&c, &["--rate", "200"], 300).await;
    // etcd crashes and comes back 2 s later on the same data dir and ports.
    tokio::task::block_in_place(|| c.etcd.restart(Duration::from_secs(2)));
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let line = rewrite_summary(&out);
    assert!(
        count(&line, " transient errors") > 0,
        "the outage never reached the rewrite: {line}"
    );
    c.assert_rotated().await;
    let r = assert_reads_clean(reader, true).await;
    assert!(
        !r.outage_errors.is_empty(),
        "the reader never noticed etcd was down: {r:?}"
    );
    eprintln!(
        "outage errors while etcd was down: {:?}",
        &r.outage_errors[..r.outage_errors.len().min(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_kek_killed_at_every_stage_boundary_then_resumed() {
    // KMS provider `a` (each host's own plugin, one socket path) writes from the start.
    let config = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets, configmaps]\n    providers:\n      - kms:\n          apiVersion: v2\n          name: a\n          endpoint: unix://{KMS_DIR}/a.sock\n          timeout: 3s\n      - identity: {}\n";
    let mut c = Cluster::start(opts(config.to_owned(), true)).await;
    c.seed(500, 500).await;
    c.audit("kms-v2", Some("a"));
    let old = Keyring::at(&c.hosts[0].keyring).list().await.unwrap();
    let reader = start_reader(&c);
    let settle = ["--plugin-settle", "2s"];
    let mut args = vec!["--stages", "1"];
    args.extend_from_slice(&settle);
    c.apply_ok(&args, &["rotate-kek"]).await;
    let mut stages = 1;
    while !c.finished() {
        let now = Keyring::at(&c.hosts[0].keyring).list().await.unwrap();
        c.keyring_bytes();
        assert!(
            now.keks.iter().any(|k| k.kek == old.primary),
            "the old KEK was retired before the end (after {stages} stages)"
        );
        c.audit_readable();
        let out = c.resume(&args).await;
        assert!(out.status.success(), "{}", text(&out));
        stages += 1;
        assert!(stages <= 10, "the run never finished");
    }
    assert!(stages >= 4, "rotate-kek ran in {stages} stages");
    let now = Keyring::at(&c.hosts[1].keyring).list().await.unwrap();
    c.keyring_bytes();
    assert!(now.keks.iter().all(|k| k.kek != old.primary));
    let new_key_id = now.primary_kek().unwrap().key_id.clone().unwrap();
    c.audit("kms-v2", Some("a"));
    assert_key_ids(&c, "a", &new_key_id).await;
    assert_reads_clean(reader, false).await;
}
