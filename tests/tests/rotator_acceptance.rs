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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use atrest_tests::etcd::{EtcdServer, run_etcd_inspect};
use atrest_tests::plugin::{Keyring, bin_path};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

const NAMESPACES: usize = 5;
const FAST: &[&str] = &["--poll-interval", "100ms", "--proof-timeout", "90s"];

fn identity_config() -> String {
    "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets, configmaps]\n    providers:\n      - identity: {}\n".to_owned()
}

fn aescbc_config() -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets, configmaps]\n    providers:\n      - aescbc:\n          keys:\n            - name: key1\n              secret: {}\n      - identity: {{}}\n",
        STANDARD.encode([7u8; 32])
    )
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc {
    child: Child,
    what: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stand-in started directly or inside a host's mount namespace.
struct Standin {
    _proc: Proc,
    url: String,
    // Kept open so the stand-in never writes to a closed pipe.
    _stdout: std::process::ChildStdout,
}

struct Host {
    config: PathBuf,
    keyring_a: PathBuf,
    // Held so they are killed when the cluster is dropped.
    _plugins: Vec<Proc>,
    standin: Standin,
}

struct Cluster {
    etcd: EtcdServer,
    hosts: Vec<Host>,
    rotator_config: PathBuf,
    state: PathBuf,
    /// The shared socket directory; `a.sock` and `b.sock` are the two KMS providers.
    kms_dir: PathBuf,
    secrets: usize,
    configmaps: usize,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first (they hold the namespaces), then the shared directory.
        self.hosts.clear();
        let _ = std::fs::remove_dir_all(&self.kms_dir);
    }
}

fn require(tool: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`{tool}` (util-linux) is needed to give each host its own mount namespace; \
         install util-linux and run as root — these tests never skip"
    );
}

/// Waits until something listens on the unix socket `path`.
fn wait_for_socket(path: &Path, p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{} exited early: {status}", p.what);
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened on {}",
            p.what,
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_standin(prefix: &[String], args: &[String], log: PathBuf, what: &str) -> Standin {
    let (program, rest) = match prefix.split_first() {
        Some((p, rest)) => (PathBuf::from(p), rest.to_vec()),
        None => (bin_path("kube-apiserver-standin"), Vec::new()),
    };
    let mut cmd = Command::new(program);
    cmd.args(rest);
    if !prefix.is_empty() {
        cmd.arg(bin_path("kube-apiserver-standin"));
    }
    let mut child = cmd
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("KUBE_APISERVER_STANDIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| {
            panic!(
                "{what}: first line {line:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    Standin {
        url: format!("http://{addr}"),
        _proc: Proc {
            child,
            what: what.to_owned(),
        },
        _stdout: reader.into_inner(),
    }
}

fn plugin_args(kms_dir: &Path, sock: &str, keyring: &Path) -> Vec<String> {
    vec![
        bin_path("kms-plugin").display().to_string(),
        "serve".into(),
        "--listen".into(),
        kms_dir.join(sock).display().to_string(),
        "--keyring".into(),
        keyring.display().to_string(),
        "--reload-interval".into(),
        "200ms".into(),
    ]
}

fn spawn_plugin(program: &str, args: &[String], log: &Path, what: &str) -> Proc {
    let child = Command::new(program)
        .args(args)
        .env_remove("ATREST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    Proc {
        child,
        what: what.to_owned(),
    }
}

/// Cluster options.
struct Opts<'a> {
    /// Every host's first EncryptionConfiguration; `{KMS_DIR}` stands for the
    /// shared socket directory.
    config: String,
    kms: bool,
    /// Extra stand-in flags per host.
    extra: [&'a [&'a str]; 3],
}

impl Opts<'_> {
    fn local() -> Self {
        Opts {
            config: aescbc_config(),
            kms: false,
            extra: [&[], &[], &[]],
        }
    }
}

async fn start(opts: Opts<'_>) -> Cluster {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let kms_dir = PathBuf::from(format!(
        "/run/atrest-test-kms-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    if opts.kms {
        require("unshare");
        require("nsenter");
        std::fs::create_dir_all(&kms_dir)
            .unwrap_or_else(|e| panic!("create {}: {e} (run as root)", kms_dir.display()));
    }
    let (mut keyring_a0, mut keyring_b0) = (PathBuf::new(), PathBuf::new());
    if opts.kms {
        keyring_a0 = dir.path().join("keyring-a.json");
        keyring_b0 = dir.path().join("keyring-b.json");
        Keyring::init(&keyring_a0).await.unwrap();
        Keyring::init(&keyring_b0).await.unwrap();
    }
    let mut hosts = Vec::new();
    let mut yaml = String::new();
    for i in 0..3 {
        let hdir = dir.path().join(format!("cp{i}"));
        let kms_here = hdir.join("kms");
        std::fs::create_dir_all(&kms_here).unwrap();
        let config = hdir.join("encryption-config.yaml");
        let text = opts.config.replace("{KMS_DIR}", kms_dir.to_str().unwrap());
        std::fs::write(&config, text).unwrap();
        let keyring_a = hdir.join("keyring-a.json");
        let mut plugins = Vec::new();
        let mut prefix = Vec::new();
        if opts.kms {
            let keyring_b = hdir.join("keyring-b.json");
            std::fs::copy(&keyring_a0, &keyring_a).unwrap();
            std::fs::copy(&keyring_b0, &keyring_b).unwrap();
            let a = plugin_args(&kms_dir, "a.sock", &keyring_a);
            let b = plugin_args(&kms_dir, "b.sock", &keyring_b);
            // Where this host's sockets appear in the test's namespace.
            let seen_at = if i == 0 { kms_dir.clone() } else { kms_here };
            let mut pa = if i == 0 {
                spawn_plugin(&a[0], &a[1..], &hdir.join("plugin-a.log"), "plugin a cp0")
            } else {
                let script = format!(
                    "mount --bind '{}' '{}' && exec \"$@\"",
                    seen_at.display(),
                    kms_dir.display()
                );
                let mut args: Vec<String> = [
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    &script,
                    "sh",
                ]
                .map(String::from)
                .to_vec();
                args.extend(a);
                spawn_plugin(
                    "unshare",
                    &args,
                    &hdir.join("plugin-a.log"),
                    &format!("plugin a cp{i}"),
                )
            };
            wait_for_socket(&seen_at.join("a.sock"), &mut pa);
            if i > 0 {
                prefix = vec![
                    "nsenter".to_owned(),
                    "--target".to_owned(),
                    pa.child.id().to_string(),
                    "--mount".to_owned(),
                    "--".to_owned(),
                ];
            }
            let mut args = prefix.clone();
            args.extend(b);
            let mut pb = spawn_plugin(
                &args[0],
                &args[1..],
                &hdir.join("plugin-b.log"),
                &format!("plugin b cp{i}"),
            );
            wait_for_socket(&seen_at.join("b.sock"), &mut pb);
            plugins.push(pa);
            plugins.push(pb);
        }
        let mut args: Vec<String> = [
            "--etcd-endpoints",
            etcd.endpoint(),
            "--encryption-provider-config",
            config.to_str().unwrap(),
            "--encryption-provider-config-automatic-reload",
            "--config-reload-interval",
            "200ms",
            "--kms-status-interval",
            "200ms",
            "--apiserver-id",
            &format!("cp{i}"),
            "--resources",
            "secrets,configmaps",
        ]
        .map(String::from)
        .to_vec();
        args.extend(opts.extra[i].iter().map(|a| a.to_string()));
        let standin = spawn_standin(
            &prefix,
            &args,
            hdir.join("standin.log"),
            &format!("stand-in cp{i}"),
        );
        yaml.push_str(&format!(
            "  - name: cp{i}\n    encryptionConfig: {}\n    keyring: {}\n    apiserver: {{ url: '{}' }}\n",
            config.display(),
            keyring_a.display(),
            standin.url
        ));
        hosts.push(Host {
            config,
            keyring_a,
            _plugins: plugins,
            standin,
        });
    }
    let rotator_config = dir.path().join("rotator.yaml");
    std::fs::write(
        &rotator_config,
        format!(
            "hosts:\n{yaml}etcd:\n  endpoints: [{}]\nkmsPlugin: {}\n",
            etcd.endpoint(),
            bin_path("kms-plugin").display()
        ),
    )
    .unwrap();
    Cluster {
        etcd,
        hosts,
        state: dir.path().join("state.json"),
        rotator_config,
        kms_dir,
        secrets: 0,
        configmaps: 0,
        _dir: dir,
    }
}

fn client(url: &str) -> kube::Client {
    let mut config = kube::Config::new(url.parse().unwrap());
    config.default_namespace = "default".into();
    config.read_timeout = Some(Duration::from_secs(30));
    kube::Client::try_from(config).unwrap()
}

fn ns_of(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

/// Creates Secrets `s-I` (data k = "secret-I") and ConfigMaps `c-I` (k = "cm-I")
/// through host 0's stand-in, 8 requests at a time.
async fn seed(c: &mut Cluster, secrets: usize, configmaps: usize) {
    let kc = client(&c.hosts[0].standin.url);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8 {
        let kc = kc.clone();
        tasks.spawn(async move {
            for i in (w..secrets).step_by(8) {
                let api: Api<Secret> = Api::namespaced(kc.clone(), &ns_of(i));
                let obj = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("s-{i}")),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        "k".to_owned(),
                        ByteString(format!("secret-{i}").into_bytes()),
                    )])),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &obj).await.unwrap();
            }
            for i in (w..configmaps).step_by(8) {
                let api: Api<ConfigMap> = Api::namespaced(kc.clone(), &ns_of(i));
                let obj = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(format!("c-{i}")),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([("k".to_owned(), format!("cm-{i}"))])),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &obj).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    c.secrets = secrets;
    c.configmaps = configmaps;
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
    for ns in 0..NAMESPACES {
        let api: Api<K> = Api::namespaced(kc.clone(), &ns_of(ns));
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
    let want = format!("secret-{}", name.trim_start_matches("s-"));
    let got = s
        .data
        .as_ref()
        .and_then(|d| d.get("k"))
        .map(|b| b.0.clone());
    (got.as_deref() != Some(want.as_bytes())).then(|| format!("secret {name} has wrong data"))
}

fn check_configmap(c: &ConfigMap) -> Option<String> {
    let name = c.metadata.name.clone().unwrap_or_default();
    let want = format!("cm-{}", name.trim_start_matches("c-"));
    let got = c.data.as_ref().and_then(|d| d.get("k")).cloned();
    (got.as_deref() != Some(want.as_str())).then(|| format!("configmap {name} has wrong data"))
}

fn start_reader(c: &Cluster) -> Reader {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<kube::Client> = c.hosts.iter().map(|h| client(&h.standin.url)).collect();
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
                let r = read_all::<Secret>(kc, h, secrets, check_secret).await;
                record(&mut report, r);
                let r = read_all::<ConfigMap>(kc, h, configmaps, check_configmap).await;
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

fn rotator_cmd(c: &Cluster, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin_path("rotator"));
    cmd.arg("--config")
        .arg(&c.rotator_config)
        .arg("--state")
        .arg(&c.state)
        .args(args)
        .env("ATREST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

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

async fn apply_ok(c: &Cluster, extra: &[&str], op: &[&str]) -> Output {
    let mut args = vec!["apply", "--concurrency", "8"];
    args.extend_from_slice(FAST);
    args.extend_from_slice(extra);
    args.extend_from_slice(op);
    let out = rotator(c, &args).await;
    assert!(out.status.success(), "{op:?}: {}", text(&out));
    out
}

async fn resume(c: &Cluster, extra: &[&str]) -> Output {
    let mut args = vec!["resume", "--concurrency", "8"];
    args.extend_from_slice(FAST);
    args.extend_from_slice(extra);
    rotator(c, &args).await
}

fn config_text(c: &Cluster) -> String {
    let first = std::fs::read_to_string(&c.hosts[0].config).unwrap();
    for h in &c.hosts {
        assert_eq!(
            std::fs::read_to_string(&h.config).unwrap(),
            first,
            "hosts' configs differ"
        );
    }
    first
}

/// The real `etcd-inspect --output json --decrypt-check` against host 0's
/// config: nothing stale, plaintext-where-encrypted, unreadable or failing to
/// decrypt; every value written by `provider` (its `provider` field, e.g.
/// `aescbc`, `kms`, `identity`) with `name` (key or KMS provider name) when given.
fn audit(c: &Cluster, provider: &str, name: Option<&str>) {
    let mut args = c.etcd.etcdctl_args();
    args.extend(
        [
            "--config",
            c.hosts[0].config.to_str().unwrap(),
            "--decrypt-check",
            "--output",
            "json",
            "--prefix",
            "/registry/",
        ]
        .map(String::from),
    );
    let mut fail_on = "stale,unreadable,undecodable,decrypt-failed".to_owned();
    if provider != "identity" {
        fail_on.push_str(",plaintext");
    }
    args.extend(["--fail-on".to_owned(), fail_on]);
    let run = run_etcd_inspect(&args);
    assert_eq!(
        run.code,
        Some(0),
        "etcd-inspect found problems:\n{}\n{}",
        &run.stdout[..run.stdout.len().min(4000)],
        run.stderr
    );
    let records = run.records();
    let ours: Vec<_> = records
        .iter()
        .filter(|(k, _)| {
            k.starts_with("/registry/secrets/") || k.starts_with("/registry/configmaps/")
        })
        .collect();
    assert_eq!(ours.len(), c.secrets + c.configmaps, "objects in etcd");
    for (k, r) in ours {
        assert_eq!(r["provider"], provider, "{k}: {r}");
        if let Some(n) = name {
            let got = if provider == "kms-v2" {
                &r["provider_name"]
            } else {
                &r["key_name"]
            };
            assert_eq!(got, n, "{k}: {r}");
        }
        assert!(
            r["finding"].is_null() || r["finding"] == "ok" || r["finding"] == "none",
            "{k}: {r}"
        );
    }
}

fn keyring_bytes(c: &Cluster) -> Vec<u8> {
    let first = std::fs::read(&c.hosts[0].keyring_a).unwrap();
    for h in &c.hosts {
        assert_eq!(
            std::fs::read(&h.keyring_a).unwrap(),
            first,
            "keyring copies differ"
        );
    }
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_across_three_hosts_with_5000_objects() {
    let t0 = Instant::now();
    let mut c = start(Opts {
        config: identity_config(),
        kms: true,
        extra: [&[], &[], &[]],
    })
    .await;
    seed(&mut c, 2500, 2500).await;
    eprintln!("seeded in {:?}", t0.elapsed());
    let a_endpoint = format!("unix://{}", c.kms_dir.join("a.sock").display());
    let b_endpoint = format!("unix://{}", c.kms_dir.join("b.sock").display());
    audit(&c, "identity", None);
    let reader = start_reader(&c);

    // enable: identity → aescbc; identity is removed only in the last stage.
    apply_ok(
        &c,
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
    let cfg = config_text(&c);
    assert!(!cfg.contains("identity"), "{cfg}");
    assert_bak_has(&c, &["identity", "aescbc"]);
    audit(&c, "aescbc", Some("key1"));
    eprintln!("enable done at {:?}", t0.elapsed());

    // rotate-key: key1 → a generated key2; key1 gone only at the end.
    apply_ok(&c, &[], &["rotate-key"]).await;
    let cfg = config_text(&c);
    assert!(!cfg.contains("name: key1"), "{cfg}");
    assert_bak_has(&c, &["name: key1", "name: key2"]);
    audit(&c, "aescbc", Some("key2"));
    eprintln!("rotate-key done at {:?}", t0.elapsed());

    // to-kms: aescbc → KMS provider `a` (each host's own plugin, same socket path).
    apply_ok(
        &c,
        &[],
        &["to-kms", "--kms-name", "a", "--kms-endpoint", &a_endpoint],
    )
    .await;
    let cfg = config_text(&c);
    assert!(!cfg.contains("aescbc"), "{cfg}");
    assert_bak_has(&c, &["aescbc", "name: a\n"]);
    audit(&c, "kms-v2", Some("a"));
    eprintln!("to-kms done at {:?}", t0.elapsed());

    // rotate-kek on provider a: every keyring copy gets the new KEK; the old one
    // is retired only at the end.
    let before = keyring_bytes(&c);
    let old = Keyring::at(&c.hosts[0].keyring_a).list().await.unwrap();
    apply_ok(&c, &["--plugin-settle", "2s"], &["rotate-kek"]).await;
    let after = keyring_bytes(&c);
    assert_ne!(before, after);
    let now = Keyring::at(&c.hosts[2].keyring_a).list().await.unwrap();
    assert!(
        now.keks.iter().all(|k| k.kek != old.primary),
        "old KEK still in the keyring"
    );
    let new_key_id = now.primary_kek().unwrap().key_id.clone().unwrap();
    audit(&c, "kms-v2", Some("a"));
    assert_key_ids(&c, "a", &new_key_id).await;
    eprintln!("rotate-kek done at {:?}", t0.elapsed());

    // switch-kms: provider a → provider b (another plugin, another keyring).
    apply_ok(
        &c,
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
    let cfg = config_text(&c);
    assert!(!cfg.contains("name: a\n"), "{cfg}");
    assert_bak_has(&c, &["name: a\n", "name: b\n"]);
    audit(&c, "kms-v2", Some("b"));
    eprintln!("switch-kms done at {:?}", t0.elapsed());

    // disable: everything back to plaintext.
    apply_ok(&c, &[], &["disable"]).await;
    let cfg = config_text(&c);
    assert!(!cfg.contains("kms"), "{cfg}");
    assert_bak_has(&c, &["name: b\n", "identity"]);
    audit(&c, "identity", None);
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

/// `rotator status --output json` says the run is finished.
fn finished(c: &Cluster) -> bool {
    let out = Command::new(bin_path("rotator"))
        .arg("--state")
        .arg(&c.state)
        .args(["status", "--output", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["finished"] == true
}

fn key_names(cfg: &str) -> Vec<String> {
    let parsed = storage_encryption::EncryptionConfiguration::parse_bytes(cfg.as_bytes()).unwrap();
    parsed.resources[0].providers[0]
        .keys()
        .unwrap()
        .iter()
        .map(|k| k.name.clone())
        .collect()
}

/// The end of a rotate-key from key1: key2 only, audit clean, run finished.
fn assert_rotated(c: &Cluster) {
    assert_eq!(key_names(&config_text(c)), ["key2"]);
    audit(c, "aescbc", Some("key2"));
    assert!(finished(c), "the run is not finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_stage_boundary_then_resumed() {
    let mut c = start(Opts::local()).await;
    seed(&mut c, 500, 500).await;
    let reader = start_reader(&c);
    // One stage per run: each run ends at a stage boundary, the next resumes.
    apply_ok(&c, &["--stages", "1"], &["rotate-key"]).await;
    let mut stages = 1;
    loop {
        if finished(&c) {
            break;
        }
        // The old key stays until the run's last stage.
        assert!(
            key_names(&config_text(&c)).contains(&"key1".to_owned()),
            "key1 removed before the end (after {stages} stages)"
        );
        audit_readable(&c);
        let out = resume(&c, &["--stages", "1"]).await;
        assert!(out.status.success(), "{}", text(&out));
        stages += 1;
        assert!(stages <= 10, "the run never finished");
    }
    assert_eq!(stages, 4, "rotate-key has 4 stages");
    assert_rotated(&c);
    assert_reads_clean(reader, false).await;
}

/// The state file's current stage index (0-based), if it can be read now.
fn stage_index(c: &Cluster) -> Option<u64> {
    let bytes = std::fs::read(&c.state).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["stage"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_as_each_stage_is_proven_then_resumed() {
    let mut c = start(Opts::local()).await;
    seed(&mut c, 500, 500).await;
    let reader = start_reader(&c);
    let mut kills = 0;
    let mut first = true;
    loop {
        let before = stage_index(&c).unwrap_or(0);
        let mut args = vec![if first { "apply" } else { "resume" }];
        args.extend_from_slice(FAST);
        if first {
            args.push("rotate-key");
        }
        first = false;
        let mut child = rotator_cmd(&c, &args)
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
        if !killed || finished(&c) {
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
        audit_readable(&c);
        assert!(kills <= 10, "the run never finished");
    }
    // Killed after stages 1, 2 and 3; the last run finished stage 4.
    assert_eq!(kills, 3, "rotate-key has 4 stages");
    assert_rotated(&c);
    assert_reads_clean(reader, false).await;
}

/// Mid-run: nothing unreadable or undecodable under the config in force
/// (stale values are expected before the rewrite ends).
fn audit_readable(c: &Cluster) {
    let mut args = c.etcd.etcdctl_args();
    args.extend(
        [
            "--config",
            c.hosts[0].config.to_str().unwrap(),
            "--decrypt-check",
            "--output",
            "json",
            "--fail-on",
            "plaintext,unreadable,undecodable,decrypt-failed",
        ]
        .map(String::from),
    );
    let run = run_etcd_inspect(&args);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
}

/// Starts `apply rotate-key` with `extra` and returns the child once the
/// rewrite checkpointed at least `at` Secrets.
async fn run_until_rewritten(c: &Cluster, extra: &[&str], at: u64) -> tokio::process::Child {
    let mut args = vec!["apply"];
    args.extend_from_slice(FAST);
    args.extend_from_slice(extra);
    args.push("rotate-key");
    let mut child = rotator_cmd(c, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(bytes) = std::fs::read(&c.state)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && v["rewrite"]["resources"]["/v1/secrets"]["updated"]
                .as_u64()
                .unwrap_or(0)
                >= at
        {
            return child;
        }
        assert!(Instant::now() < deadline, "the rewrite never reached {at}");
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().await.unwrap();
            panic!("the run ended early ({status}): {}", text(&out));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_rewrite_then_resumed() {
    let mut c = start(Opts::local()).await;
    seed(&mut c, 1200, 300).await;
    let reader = start_reader(&c);
    let mut child = run_until_rewritten(&c, &["--rate", "200"], 500).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert!(key_names(&config_text(&c)).contains(&"key1".to_owned()));
    audit_readable(&c);
    let out = resume(&c, &[]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_rotated(&c);
    assert_reads_clean(reader, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_apiserver_is_waited_for_and_named() {
    let mut c = start(Opts {
        config: aescbc_config(),
        kms: false,
        extra: [&[], &["--reload-delay", "5s"], &[]],
    })
    .await;
    seed(&mut c, 300, 300).await;
    let reader = start_reader(&c);
    // A short proof timeout: the run stops (exit 4) naming cp1 only.
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
    assert!(err.contains("apiserver cp1"), "{err}");
    assert!(
        !err.contains("apiserver cp0") && !err.contains("apiserver cp2"),
        "{err}"
    );
    // A long enough timeout: the run waits for cp1, says so, and finishes.
    let out = rotator_cmd(
        &c,
        &[
            "resume",
            "--poll-interval",
            "100ms",
            "--proof-timeout",
            "90s",
        ],
    )
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
    assert_rotated(&c);
    assert_reads_clean(reader, false).await;
}

/// The rotator's `rewrite: N updated, … retried, …` summary line.
fn rewrite_summary(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.starts_with("rewrite: "))
        .unwrap_or_else(|| panic!("no rewrite summary: {}", text(out)))
        .to_owned()
}

/// The number just before `word` in a rewrite summary line.
fn count(line: &str, word: &str) -> u64 {
    line[..line.find(word).unwrap()]
        .trim_end()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_through_an_apiserver_answering_409_and_429() {
    let mut c = start(Opts {
        config: aescbc_config(),
        kms: false,
        extra: [
            &[],
            &[],
            &[
                "--fault-conflict-every",
                "7",
                "--fault-throttle-every",
                "11",
            ],
        ],
    })
    .await;
    seed(&mut c, 500, 500).await;
    let reader = start_reader(&c);
    let out = apply_ok(&c, &["--rewrite-via", "cp2"], &["rotate-key"]).await;
    let line = rewrite_summary(&out);
    assert!(count(&line, " conflicts") > 0, "{line}");
    assert!(count(&line, " throttled") > 0, "{line}");
    assert_rotated(&c);
    // kube's client retries 429s itself, so the reader rarely sees one.
    assert_reads_clean(reader, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_mid_rewrite() {
    let mut c = start(Opts::local()).await;
    seed(&mut c, 1200, 300).await;
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
    assert_rotated(&c);
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
    let mut c = start(Opts {
        config: config.to_owned(),
        kms: true,
        extra: [&[], &[], &[]],
    })
    .await;
    seed(&mut c, 500, 500).await;
    audit(&c, "kms-v2", Some("a"));
    let old = Keyring::at(&c.hosts[0].keyring_a).list().await.unwrap();
    let reader = start_reader(&c);
    let settle = ["--plugin-settle", "2s"];
    let mut args = vec!["--stages", "1"];
    args.extend_from_slice(&settle);
    apply_ok(&c, &args, &["rotate-kek"]).await;
    let mut stages = 1;
    while !finished(&c) {
        let now = Keyring::at(&c.hosts[0].keyring_a).list().await.unwrap();
        keyring_bytes(&c);
        assert!(
            now.keks.iter().any(|k| k.kek == old.primary),
            "the old KEK was retired before the end (after {stages} stages)"
        );
        audit_readable(&c);
        let out = resume(&c, &args).await;
        assert!(out.status.success(), "{}", text(&out));
        stages += 1;
        assert!(stages <= 10, "the run never finished");
    }
    assert!(stages >= 4, "rotate-kek ran in {stages} stages");
    let now = Keyring::at(&c.hosts[1].keyring_a).list().await.unwrap();
    keyring_bytes(&c);
    assert!(now.keks.iter().all(|k| k.kek != old.primary));
    let new_key_id = now.primary_kek().unwrap().key_id.clone().unwrap();
    audit(&c, "kms-v2", Some("a"));
    assert_key_ids(&c, "a", &new_key_id).await;
    assert_reads_clean(reader, false).await;
}
