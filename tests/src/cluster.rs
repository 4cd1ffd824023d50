//! Kit for the rotator's end-to-end tests: control-plane "hosts" over one
//! real etcd, each with its own EncryptionConfiguration file and its own
//! kube-apiserver stand-in (and, with KMS, its own real kms-plugins and
//! keyring copies), a rotator config naming them, and the real `rotator`
//! and `etcd-inspect` binaries.
//!
//! With KMS every host gets the same EncryptionConfiguration, so every host's
//! plugin must listen on the same socket path. Hosts after the first run in
//! their own Linux mount namespace (`unshare --mount`), where their own
//! directory is bind-mounted over the shared socket directory; their other
//! plugins and their stand-in join that namespace with `nsenter`. Host 0 runs
//! in the test's namespace, so the rotator's gate and `etcd-inspect` (also in
//! this namespace) reach host 0's plugins at the configured path — every
//! keyring copy is byte-identical.
//!
//! Objects are Secrets `s-I` (data `k` = [`secret_value`]) and ConfigMaps
//! `c-I` (data `k` = [`configmap_value`]), spread over
//! [`Options::namespaces`] namespaces ([`Cluster::namespace_of`]).
//!
//! A host with [`HostOptions::ssh`] is remote: its files live in its own
//! directories, which its own real sshd ([`crate::sshd`]) shows at
//! `/etc/kubernetes/enc` and `/etc/kubernetes/kms`; the rotator config names
//! those paths and an `ssh:` block, while the host's stand-in and plugins read
//! the same directories at their real paths.
//!
//! Helpers panic with a message naming what failed: they are test assertions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use etcd_client::GetOptions;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use storage_encryption::EncryptionConfiguration;

use crate::etcd::{EtcdServer, run_etcd_inspect};
use crate::plugin::{Keyring, PluginOptions, PluginProcess, SocketEndpoint, bin_path};
use crate::sshd::{REMOTE_ENC_DIR, REMOTE_KMS_DIR, SshClient, Sshd};
use crate::standin::{StandinProcess, secret_object};

/// The first key of [`aescbc_config`]: 32 bytes of 7.
pub const KEY1: [u8; 32] = [7; 32];
/// Values under [`aescbc_config`]'s key.
pub const OLD_PREFIX: &[u8] = b"k8s:enc:aescbc:v1:key1:";
/// Values under the key a rotate-key from [`aescbc_config`] generates.
pub const NEW_PREFIX: &[u8] = b"k8s:enc:aescbc:v1:key2:";

/// Secrets and ConfigMaps in plaintext.
pub fn identity_config() -> String {
    "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets, configmaps]\n    providers:\n      - identity: {}\n".to_owned()
}

/// Secrets and ConfigMaps under aescbc `key1` ([`KEY1`]), identity to read.
pub fn aescbc_config() -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets, configmaps]\n    providers:\n      - aescbc:\n          keys:\n            - name: key1\n              secret: {}\n      - identity: {{}}\n",
        STANDARD.encode(KEY1)
    )
}

/// The data of Secret `s-I`.
pub fn secret_value(i: usize) -> String {
    format!("value-{i}")
}

/// The data of ConfigMap `c-I`.
pub fn configmap_value(i: usize) -> String {
    format!("v-{i}")
}

/// How one host's stand-in differs from the others.
#[derive(Clone, Debug, Default)]
pub struct HostOptions {
    /// `--reload-delay` (a slow apiserver).
    pub reload_delay: Option<String>,
    /// `proof:` of the host in the rotator config (default: not written, auto).
    pub proof: Option<String>,
    /// More stand-in flags (fault injection).
    pub extra: Vec<String>,
    /// The rotator reaches this host's files over SSH (its own sshd).
    pub ssh: bool,
}

impl HostOptions {
    /// `DELAY` or `DELAY+PROOF`, e.g. `3s+reload`.
    pub fn spec(spec: &str) -> Self {
        let (delay, proof) = match spec.split_once('+') {
            Some((d, p)) => (d, Some(p.to_owned())),
            None => (spec, None),
        };
        HostOptions {
            reload_delay: Some(delay.to_owned()),
            proof,
            extra: Vec::new(),
            ssh: false,
        }
    }

    /// These stand-in flags.
    pub fn extra(args: &[&str]) -> Self {
        HostOptions {
            extra: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Adds stand-in flags.
    pub fn with_extra(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }
}

/// How to build a [`Cluster`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Every host's first EncryptionConfiguration; `{KMS_DIR}` stands for the
    /// shared socket directory.
    pub config: String,
    /// One entry per host.
    pub hosts: Vec<HostOptions>,
    /// KMS providers: one plugin per name and host, listening on
    /// `{KMS_DIR}/NAME.sock`, each host with its own copy of `keyring-NAME.json`.
    /// The first one's keyring is the host's `keyring:` in the rotator config.
    pub kms: Vec<&'static str>,
    /// Every stand-in requires this bearer token; the rotator config carries it.
    pub token: Option<String>,
    /// Objects are spread over this many namespaces (1: `default`).
    pub namespaces: usize,
    /// Flags every `apply` and `resume` of [`Cluster::apply`] / [`Cluster::resume`] get.
    pub run_flags: Vec<String>,
    /// Extra `serve` flags of every plugin (e.g. the PKCS#11 ones).
    pub plugin_args: Vec<String>,
    /// Environment of every plugin and every rotator run only (e.g.
    /// `SOFTHSM2_CONF`); the test's own environment is never changed.
    pub env: Vec<(String, String)>,
    /// YAML appended to the rotator config (e.g. a `kek:` block).
    pub rotator_config_extra: String,
}

impl Options {
    /// `hosts` hosts under [`aescbc_config`], no KMS, no token, `default`
    /// namespace, polling every 100 ms with a 60 s proof timeout.
    pub fn new(hosts: usize) -> Self {
        Options {
            config: aescbc_config(),
            hosts: vec![HostOptions::default(); hosts],
            kms: Vec::new(),
            token: None,
            namespaces: 1,
            run_flags: ["--poll-interval", "100ms", "--proof-timeout", "60s"]
                .map(String::from)
                .to_vec(),
            plugin_args: Vec::new(),
            env: Vec::new(),
            rotator_config_extra: String::new(),
        }
    }

    /// One host per spec of [`HostOptions::spec`].
    pub fn specs(specs: &[&str]) -> Self {
        let mut o = Self::new(specs.len());
        o.hosts = specs.iter().map(|s| HostOptions::spec(s)).collect();
        o
    }
}

/// One control-plane host.
#[derive(Debug)]
pub struct Host {
    /// `cpI`.
    pub name: String,
    /// Its EncryptionConfiguration file.
    pub config: PathBuf,
    /// Its copy of the first KMS provider's keyring (exists only with KMS).
    pub keyring: PathBuf,
    /// Its plugins, one per KMS provider (killed on drop).
    pub plugins: Vec<PluginProcess>,
    /// Its apiserver.
    pub standin: StandinProcess,
    /// Its sshd, when the rotator reaches it over SSH.
    pub sshd: Option<Sshd>,
}

/// Hosts over one etcd, a rotator config and a state file path.
#[derive(Debug)]
pub struct Cluster {
    /// The etcd every stand-in stores in.
    pub etcd: EtcdServer,
    /// The hosts, in the rotator config's order.
    pub hosts: Vec<Host>,
    /// The rotator config.
    pub rotator_config: PathBuf,
    /// The rotator's state file.
    pub state: PathBuf,
    /// The stand-ins' bearer token.
    pub token: Option<String>,
    /// The SSH client keys and known_hosts, when some host is remote.
    pub ssh: Option<SshClient>,
    /// Secrets seeded.
    pub secrets: usize,
    /// ConfigMaps seeded.
    pub configmaps: usize,
    namespaces: usize,
    run_flags: Vec<String>,
    /// Environment of every rotator run.
    env: Vec<(String, String)>,
    /// The shared socket directory (with KMS).
    kms_dir: Option<PathBuf>,
    /// Everything else lives here.
    pub dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first (they hold the namespaces), then the shared directory.
        self.hosts.clear();
        if let Some(d) = &self.kms_dir {
            let _ = std::fs::remove_dir_all(d);
        }
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

/// Starts one host's plugins: host 0 directly, the others in a mount
/// namespace of their own. Returns them and the wrapper that joins the
/// host's namespace (empty for host 0).
async fn start_plugins(
    i: usize,
    names: &[&str],
    kms_dir: &Path,
    host_dir: &Path,
    keyrings: &[PathBuf],
    opts: &Options,
) -> (Vec<PluginProcess>, Vec<String>) {
    // Where this host's sockets appear in the test's namespace.
    let seen_at = if i == 0 {
        kms_dir.to_owned()
    } else {
        host_dir.join("kms")
    };
    std::fs::create_dir_all(&seen_at).unwrap();
    let mut wrapper: Vec<String> = Vec::new();
    if i > 0 {
        let script = format!(
            "mount --bind '{}' '{}' && exec \"$@\"",
            seen_at.display(),
            kms_dir.display()
        );
        wrapper = [
            "unshare",
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
    }
    let mut plugins = Vec::new();
    for (name, keyring) in names.iter().zip(keyrings) {
        let sock = format!("{name}.sock");
        let mut options = PluginOptions::new()
            .keyring(keyring)
            .endpoint(SocketEndpoint::File(kms_dir.join(&sock)))
            .reached_at(SocketEndpoint::File(seen_at.join(&sock)))
            .wrapped_in(&wrapper)
            .arg("--reload-interval")
            .arg("200ms");
        for a in &opts.plugin_args {
            options = options.arg(a);
        }
        for (k, v) in &opts.env {
            options = options.env(k, v.clone());
        }
        let plugin = PluginProcess::start(options)
            .await
            .unwrap_or_else(|e| panic!("plugin {name} of cp{i}: {e:#}"));
        if i > 0 && plugins.is_empty() {
            // The first plugin made the namespace; the rest of the host joins it.
            wrapper = [
                "nsenter".to_owned(),
                "--target".to_owned(),
                plugin.pid().as_raw().to_string(),
                "--mount".to_owned(),
                "--".to_owned(),
            ]
            .to_vec();
        }
        plugins.push(plugin);
    }
    (plugins, wrapper)
}

impl Cluster {
    /// Starts etcd, every host's plugins and stand-in, and writes the rotator config.
    pub async fn start(opts: Options) -> Cluster {
        let etcd = EtcdServer::start();
        let dir = tempfile::tempdir().unwrap();
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let kms_dir = PathBuf::from(format!(
            "/run/atrest-test-kms-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let kms = !opts.kms.is_empty();
        // Each provider's keyring, copied to every host.
        let mut keyrings0 = Vec::new();
        if kms {
            require("unshare");
            require("nsenter");
            std::fs::create_dir_all(&kms_dir)
                .unwrap_or_else(|e| panic!("create {}: {e} (run as root)", kms_dir.display()));
            for name in &opts.kms {
                let path = dir.path().join(format!("keyring-{name}.json"));
                Keyring::init(&path).await.unwrap();
                keyrings0.push(path);
            }
        }
        let mut hosts = Vec::new();
        let mut yaml = String::new();
        let ssh = opts.hosts.iter().any(|h| h.ssh).then(SshClient::new);
        for (i, h) in opts.hosts.iter().enumerate() {
            let name = format!("cp{i}");
            let host_dir = dir.path().join(&name);
            std::fs::create_dir_all(&host_dir).unwrap();
            // A remote host's files: in the folders its sshd shows at
            // /etc/kubernetes/{enc,kms}.
            let (enc_dir, kms_files) = if h.ssh {
                (host_dir.join("etc-enc"), host_dir.join("etc-kms"))
            } else {
                (host_dir.clone(), host_dir.clone())
            };
            std::fs::create_dir_all(&enc_dir).unwrap();
            std::fs::create_dir_all(&kms_files).unwrap();
            let config = enc_dir.join("encryption-config.yaml");
            let text = opts.config.replace("{KMS_DIR}", kms_dir.to_str().unwrap());
            std::fs::write(&config, text).unwrap();
            let keyrings: Vec<PathBuf> = opts
                .kms
                .iter()
                .map(|n| kms_files.join(format!("keyring-{n}.json")))
                .collect();
            for (from, to) in keyrings0.iter().zip(&keyrings) {
                std::fs::copy(from, to).unwrap();
            }
            let (plugins, wrapper) = if kms {
                start_plugins(i, &opts.kms, &kms_dir, &host_dir, &keyrings, &opts).await
            } else {
                (Vec::new(), Vec::new())
            };
            let mut args: Vec<String> = [
                "--encryption-provider-config",
                config.to_str().unwrap(),
                "--encryption-provider-config-automatic-reload",
                "--config-reload-interval",
                "200ms",
                "--kms-status-interval",
                "200ms",
                "--apiserver-id",
                &name,
                "--resources",
                "secrets,configmaps",
            ]
            .map(String::from)
            .to_vec();
            if let Some(d) = &h.reload_delay {
                args.extend(["--reload-delay".to_owned(), d.clone()]);
            }
            if let Some(t) = &opts.token {
                args.extend(["--token".to_owned(), t.clone()]);
            }
            args.extend(h.extra.iter().cloned());
            let standin = StandinProcess::start_in(&wrapper, etcd.endpoint(), &args)
                .unwrap_or_else(|e| panic!("stand-in {name}: {e:#}"));
            let keyring_name = format!("keyring-{}.json", opts.kms.first().copied().unwrap_or("a"));
            let keyring = kms_files.join(&keyring_name);
            let proof = h
                .proof
                .as_ref()
                .map(|p| format!("    proof: {p}\n"))
                .unwrap_or_default();
            let auth = opts
                .token
                .as_ref()
                .map(|t| format!(", token: '{t}'"))
                .unwrap_or_default();
            let sshd = match (&ssh, h.ssh) {
                (Some(client), true) => Some(client.start(&name, &enc_dir, &kms_files)),
                _ => None,
            };
            match &sshd {
                None => yaml.push_str(&format!(
                    "  - name: {name}\n{proof}    encryptionConfig: {}\n    keyring: {}\n    apiserver: {{ url: '{}'{auth} }}\n",
                    config.display(),
                    keyring.display(),
                    standin.url()
                )),
                Some(d) => yaml.push_str(&format!(
                    "  - name: {name}\n{proof}    encryptionConfig: {REMOTE_ENC_DIR}/encryption-config.yaml\n    keyring: {REMOTE_KMS_DIR}/{keyring_name}\n    ssh: {}\n    apiserver: {{ url: '{}'{auth} }}\n",
                    ssh.as_ref().unwrap().yaml(d, &bin_path("kms-plugin")),
                    standin.url()
                )),
            }
            hosts.push(Host {
                name,
                config,
                keyring,
                plugins,
                standin,
                sshd,
            });
        }
        let rotator_config = dir.path().join("rotator.yaml");
        std::fs::write(
            &rotator_config,
            format!(
                "hosts:\n{yaml}etcd:\n  endpoints: [{}]\nkmsPlugin: {}\n{}",
                etcd.endpoint(),
                bin_path("kms-plugin").display(),
                opts.rotator_config_extra
            ),
        )
        .unwrap();
        Cluster {
            etcd,
            hosts,
            state: dir.path().join("state.json"),
            rotator_config,
            token: opts.token,
            ssh,
            secrets: 0,
            configmaps: 0,
            namespaces: opts.namespaces.max(1),
            run_flags: opts.run_flags,
            env: opts.env,
            kms_dir: kms.then_some(kms_dir),
            dir,
        }
    }

    /// `unix://` endpoint of KMS provider `name` (the same path on every host).
    pub fn kms_endpoint(&self, name: &str) -> String {
        let dir = self.kms_dir.as_ref().expect("a cluster started with KMS");
        format!("unix://{}", dir.join(format!("{name}.sock")).display())
    }

    /// The namespace of object I.
    pub fn namespace_of(&self, i: usize) -> String {
        if self.namespaces == 1 {
            "default".to_owned()
        } else {
            format!("ns-{}", i % self.namespaces)
        }
    }

    /// The namespaces objects are in.
    pub fn namespaces(&self) -> Vec<String> {
        (0..self.namespaces).map(|i| self.namespace_of(i)).collect()
    }

    /// A `kube` client on host `i`'s stand-in (with the token, if any).
    pub fn client(&self, i: usize) -> kube::Client {
        crate::standin::client(&self.hosts[i].standin, self.token.as_deref())
    }

    /// Creates Secrets `s-I` and ConfigMaps `c-I` through host 0's stand-in,
    /// 8 requests at a time.
    pub async fn seed(&mut self, secrets: usize, configmaps: usize) {
        let kc = self.client(0);
        let namespaces = self.namespaces();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..8 {
            let (kc, namespaces) = (kc.clone(), namespaces.clone());
            tasks.spawn(async move {
                let ns = |i: usize| namespaces[i % namespaces.len()].clone();
                for i in (w..secrets).step_by(8) {
                    let api: Api<Secret> = Api::namespaced(kc.clone(), &ns(i));
                    let obj = secret_object(&format!("s-{i}"), "k", secret_value(i).as_bytes());
                    api.create(&PostParams::default(), &obj).await.unwrap();
                }
                for i in (w..configmaps).step_by(8) {
                    let api: Api<ConfigMap> = Api::namespaced(kc.clone(), &ns(i));
                    let obj = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(format!("c-{i}")),
                            ..Default::default()
                        },
                        data: Some(BTreeMap::from([("k".to_owned(), configmap_value(i))])),
                        ..Default::default()
                    };
                    api.create(&PostParams::default(), &obj).await.unwrap();
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        self.secrets += secrets;
        self.configmaps += configmaps;
    }

    /// `rotator --config … --state … ARGS` (killed when dropped, `ATREST_LOG=warn`).
    pub fn rotator_cmd(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin_path("rotator"));
        cmd.arg("--config")
            .arg(&self.rotator_config)
            .arg("--state")
            .arg(&self.state)
            .args(args)
            .env("ATREST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `rotator ARGS` to its end.
    pub async fn rotator(&self, args: &[&str]) -> Output {
        self.rotator_cmd(args).output().await.unwrap()
    }

    fn with_run_flags<'a>(&'a self, command: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![command];
        args.extend(self.run_flags.iter().map(String::as_str));
        args.extend_from_slice(extra);
        args
    }

    /// `rotator apply RUN_FLAGS EXTRA OP`.
    pub async fn apply(&self, extra: &[&str], op: &[&str]) -> Output {
        let mut args = self.with_run_flags("apply", extra);
        args.extend_from_slice(op);
        self.rotator(&args).await
    }

    /// [`apply`](Self::apply) that must succeed and leave every host the same file.
    pub async fn apply_ok(&self, extra: &[&str], op: &[&str]) -> Output {
        let out = self.apply(extra, op).await;
        assert!(out.status.success(), "{op:?}: {}", text(&out));
        self.config_text();
        out
    }

    /// The command `rotator apply RUN_FLAGS EXTRA OP`, not started.
    pub fn apply_cmd(&self, extra: &[&str], op: &[&str]) -> tokio::process::Command {
        let mut args = self.with_run_flags("apply", extra);
        args.extend_from_slice(op);
        self.rotator_cmd(&args)
    }

    /// Spawns `rotator apply RUN_FLAGS EXTRA OP` with its output captured.
    pub fn spawn_apply(&self, extra: &[&str], op: &[&str]) -> tokio::process::Child {
        self.apply_cmd(extra, op)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The command `rotator resume RUN_FLAGS EXTRA`, not started.
    pub fn resume_cmd(&self, extra: &[&str]) -> tokio::process::Command {
        let args = self.with_run_flags("resume", extra);
        self.rotator_cmd(&args)
    }

    /// `rotator resume RUN_FLAGS EXTRA`.
    pub async fn resume(&self, extra: &[&str]) -> Output {
        self.resume_cmd(extra).output().await.unwrap()
    }

    /// The state file as JSON, if it can be read now.
    pub fn state_json(&self) -> Option<serde_json::Value> {
        let bytes = std::fs::read(&self.state).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Rewritten Secrets in the state file's checkpoint.
    pub fn secrets_rewritten(&self) -> u64 {
        self.state_json()
            .and_then(|v| v["rewrite"]["resources"]["/v1/secrets"]["updated"].as_u64())
            .unwrap_or(0)
    }

    /// Waits (at most 120 s) until the state file satisfies `done`, while
    /// `child` runs; panics naming `what` when it ends first or time runs out.
    pub async fn wait_for_state(
        &self,
        child: &mut tokio::process::Child,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self.state_json().is_some_and(|v| done(&v)) {
                return;
            }
            assert!(Instant::now() < deadline, "never: {what}");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the run ended ({status}) before: {what}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `rotator status --output json` says the run is finished.
    pub fn finished(&self) -> bool {
        let out = Command::new(bin_path("rotator"))
            .arg("--state")
            .arg(&self.state)
            .args(["status", "--output", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["finished"] == true
    }

    /// The file `path_of` names on every host, which must be the same everywhere.
    fn same_on_every_host(&self, what: &str, path_of: impl Fn(&Host) -> &Path) -> Vec<u8> {
        let first = std::fs::read(path_of(&self.hosts[0])).unwrap();
        for h in &self.hosts {
            assert!(
                std::fs::read(path_of(h)).unwrap() == first,
                "{what} of cp0 and {} differ",
                h.name
            );
        }
        first
    }

    /// The hosts' EncryptionConfiguration, which must be the same everywhere.
    pub fn config_text(&self) -> String {
        String::from_utf8(self.same_on_every_host("configs", |h| &h.config)).unwrap()
    }

    /// The hosts' keyring (first KMS provider), which must be the same everywhere.
    pub fn keyring_bytes(&self) -> Vec<u8> {
        self.same_on_every_host("keyring copies", |h| &h.keyring)
    }

    /// Every value under `/registry/<resource>/`.
    pub async fn values(&self, resource: &str) -> Vec<(String, Vec<u8>)> {
        let mut client = self.etcd.client().await;
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

    /// Every seeded Secret and ConfigMap is stored starting with `prefix`.
    pub async fn assert_all_start_with(&self, prefix: &[u8]) {
        let mut seen = 0;
        for resource in ["secrets", "configmaps"] {
            for (k, v) in self.values(resource).await {
                assert!(
                    v.starts_with(prefix),
                    "{k}: expected {:?}, got {:?}",
                    String::from_utf8_lossy(prefix),
                    String::from_utf8_lossy(&v[..v.len().min(30)])
                );
                seen += 1;
            }
        }
        assert_eq!(seen, self.secrets + self.configmaps);
    }

    /// The real `etcd-inspect --output json --decrypt-check` against host 0's
    /// config: nothing stale, plaintext-where-encrypted, unreadable or failing
    /// to decrypt; every value written by `provider` (its `provider` field,
    /// e.g. `aescbc`, `kms-v2`, `identity`) with `name` (key or KMS provider
    /// name) when given.
    pub fn audit(&self, provider: &str, name: Option<&str>) {
        let mut args = self.etcd.etcdctl_args();
        args.extend(
            [
                "--config",
                self.hosts[0].config.to_str().unwrap(),
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
        assert_eq!(
            ours.len(),
            self.secrets + self.configmaps,
            "objects in etcd"
        );
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

    /// Mid-run: nothing unreadable or undecodable under the config in force
    /// (stale values are expected before the rewrite ends).
    pub fn audit_readable(&self) {
        let mut args = self.etcd.etcdctl_args();
        args.extend(
            [
                "--config",
                self.hosts[0].config.to_str().unwrap(),
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

    /// The key a finished rotate-key generated, from its state file.
    pub fn generated_key(&self) -> String {
        let state = self.state_json().expect("a readable state file");
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
        assert_ne!(key, STANDARD.encode(KEY1));
        key
    }

    /// The end state of a finished rotate-key from [`aescbc_config`]: every
    /// host has the new key only (0600, the previous stage's file as `.prev`),
    /// every value is under it, the real audit finds nothing, the run is
    /// finished, and no status output shows the generated key.
    pub async fn assert_rotated(&self) {
        let cfg = self.config_text();
        assert_eq!(key_names(&cfg), ["key2"]);
        for h in &self.hosts {
            assert_eq!(mode(&h.config), 0o600, "{}", h.config.display());
            let bak = h.config.with_file_name("encryption-config.yaml.prev");
            assert_eq!(mode(&bak), 0o600);
            assert_eq!(
                key_names(&std::fs::read_to_string(&bak).unwrap()),
                ["key2", "key1"],
                "the backup is the previous stage's file"
            );
        }
        for (resource, n) in [("secrets", self.secrets), ("configmaps", self.configmaps)] {
            assert_eq!(self.values(resource).await.len(), n, "{resource}");
        }
        self.assert_all_start_with(NEW_PREFIX).await;
        self.audit("aescbc", Some("key2"));
        assert_eq!(mode(&self.state), 0o600, "the state file holds keys");
        assert!(self.finished(), "the run is not finished");
        let status = Command::new(bin_path("rotator"))
            .arg("--state")
            .arg(&self.state)
            .args(["status", "--output", "json"])
            .output()
            .unwrap();
        assert!(!text(&status).contains(&self.generated_key()));
    }
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Key names of the first provider of the first resource entry of a config.
pub fn key_names(cfg: &str) -> Vec<String> {
    let parsed = EncryptionConfiguration::parse_bytes(cfg.as_bytes()).unwrap();
    parsed.resources[0].providers[0]
        .keys()
        .unwrap()
        .iter()
        .map(|k| k.name.clone())
        .collect()
}

/// Permission bits of `path`.
pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The rotator's `rewrite: N updated, … retried, …` summary line.
pub fn rewrite_summary(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.starts_with("rewrite: "))
        .unwrap_or_else(|| panic!("no rewrite summary: {}", text(out)))
        .to_owned()
}

/// The number just before `word` in a rewrite summary line.
pub fn count(line: &str, word: &str) -> u64 {
    line[..line.find(word).unwrap()]
        .trim_end()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
