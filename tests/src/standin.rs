//! Test kit for the kube-apiserver stand-in (the `kube-apiserver-standin`
//! crate, tests only): [`StandinProcess`] runs its binary as a child process
//! on a free loopback port (it prints `listening on ADDR` first), logs to a
//! file, killed on drop; and the helpers its tests share: configs, a `kube`
//! client on it, raw etcd reads, metrics lookups.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;

use anyhow::{Context, Result, bail};

use crate::etcd::EtcdServer;
pub use crate::inspect::key;
use crate::plugin::{HttpResponse, Metrics, WAIT, bin_path, eventually, http_get, http_request};

/// A running stand-in. Killed on drop.
#[derive(Debug)]
pub struct StandinProcess {
    child: Child,
    // Kept open so the stand-in never writes to a closed pipe.
    _stdout: ChildStdout,
    addr: SocketAddr,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl StandinProcess {
    /// Starts `kube-apiserver-standin --listen 127.0.0.1:0 --etcd-endpoints ETCD ARGS…`
    /// and waits for its `listening on` line.
    pub fn start<S: AsRef<std::ffi::OsStr>>(etcd_endpoint: &str, args: &[S]) -> Result<Self> {
        Self::start_in(&[], etcd_endpoint, args)
    }

    /// Like [`start`](Self::start), through `wrapper` (e.g. `nsenter …` to
    /// join a host's mount namespace): `WRAPPER… kube-apiserver-standin …`.
    /// The wrapper must exec the stand-in, so that its pid is the stand-in's.
    pub fn start_in<S: AsRef<std::ffi::OsStr>>(
        wrapper: &[String],
        etcd_endpoint: &str,
        args: &[S],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("atrest-standin-")
            .tempdir()
            .context("creating the stand-in's temp dir")?;
        let log_path = dir.path().join("standin.log");
        let log = std::fs::File::create(&log_path).context("creating the stand-in log")?;
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin_path("kube-apiserver-standin"));
                c
            }
            None => Command::new(bin_path("kube-apiserver-standin")),
        };
        let mut child = command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--etcd-endpoints")
            .arg(etcd_endpoint)
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("KUBE_APISERVER_STANDIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawning kube-apiserver-standin")?;
        let stdout = child.stdout.take().context("stand-in stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let result = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send((result, reader.into_inner()));
        });
        let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let (line, stdout) = match rx.recv_timeout(WAIT) {
            Ok((Ok(line), stdout)) => (line, stdout),
            Ok((Err(e), _)) => bail!("reading the stand-in's stdout: {e}; log:\n{}", read_log()),
            Err(_) => {
                let _ = child.kill();
                bail!(
                    "the stand-in printed no `listening on` line within {WAIT:?}; log:\n{}",
                    read_log()
                )
            }
        };
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .with_context(|| {
                format!(
                    "the stand-in's first line is {line:?}, expected `listening on ADDR`; log:\n{}",
                    read_log()
                )
            })?;
        Ok(Self {
            child,
            _stdout: stdout,
            addr,
            log_path,
            _dir: dir,
        })
    }

    /// Sends SIGTERM and waits (bounded by [`WAIT`]) for the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(
            i32::try_from(self.child.id()).context("the stand-in's pid does not fit in i32")?,
        );
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .context("sending SIGTERM to the stand-in")?;
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                bail!("the stand-in did not exit within {WAIT:?} after SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// GET `path` (no token).
    pub async fn get(&self, path: &str) -> Result<HttpResponse> {
        http_get(self.addr, path).await
    }

    /// Any request over HTTP/1.0 (the server closes after the answer), with an
    /// optional bearer token and JSON body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Result<HttpResponse> {
        http_request(self.addr, method, path, token, body).await
    }

    /// `/metrics`, parsed (only when no `--token` is set).
    pub async fn metrics(&self) -> Result<Metrics> {
        let response = self.get("/metrics").await?;
        if response.status != 200 {
            bail!("GET /metrics: {} {}", response.status, response.body);
        }
        Metrics::parse(&response.body)
    }
}

impl Drop for StandinProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An EncryptionConfiguration: `secrets` with aescbc `keys` (name, fill byte) in order,
/// then identity; configmaps not configured (identity).
pub fn aescbc_config(keys: &[(&str, u8)]) -> String {
    let mut text = String::from(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - aescbc:\n          keys:\n",
    );
    for (name, fill) in keys {
        text.push_str(&format!(
            "            - name: {name}\n              secret: {}\n",
            key(*fill)
        ));
    }
    text.push_str("      - identity: {}\n");
    text
}

/// Writes `text` to `path` atomically.
pub fn write_config(path: &Path, text: &str) {
    crate::plugin::write_atomically(path, text.as_bytes()).expect("write the config file");
}

/// A `kube` client on the stand-in (plain HTTP), optionally with a bearer token.
pub fn client(standin: &StandinProcess, token: Option<&str>) -> kube::Client {
    let mut config = kube::Config::new(standin.url().parse().expect("stand-in URL"));
    config.default_namespace = "default".into();
    config.read_timeout = Some(std::time::Duration::from_secs(30));
    if let Some(token) = token {
        config.auth_info.token = Some(token.to_owned().into());
    }
    kube::Client::try_from(config).expect("build a kube client")
}

/// The raw etcd value and mod revision under `key`, if any.
pub async fn raw(etcd: &EtcdServer, key: &str) -> Option<(Vec<u8>, i64)> {
    let mut client = etcd.client().await;
    let response = client.get(key, None).await.expect("etcd get");
    response
        .kvs()
        .first()
        .map(|kv| (kv.value().to_vec(), kv.mod_revision()))
}

/// `sha256:<hex>` as the stand-in labels apiserver ids and key_ids.
pub fn hash(text: &str) -> String {
    storage_encryption::key_id_hash(text)
}

/// Waits until `/metrics` satisfies `check`; returns that page.
pub async fn wait_metrics(
    standin: &StandinProcess,
    what: &str,
    check: impl Fn(&Metrics) -> bool,
) -> Result<Metrics> {
    eventually(WAIT, what, || async {
        let m = standin.metrics().await?;
        Ok(check(&m).then_some(m))
    })
    .await
    .with_context(|| format!("stand-in log:\n{}", standin.log()))
}

/// The `hash` label of `apiserver_encryption_config_controller_last_config_info` (must be one).
pub fn config_hash(m: &Metrics) -> Option<String> {
    let samples: Vec<_> = m
        .matching(
            "apiserver_encryption_config_controller_last_config_info",
            &[],
        )
        .collect();
    assert!(
        samples.len() <= 1,
        "more than one config hash exposed: {}",
        m.text
    );
    samples.first().map(|s| s.labels["hash"].clone())
}

/// `apiserver_encryption_config_controller_automatic_reloads_total{status}`.
pub fn reloads(m: &Metrics, status: &str) -> f64 {
    m.sum(
        "apiserver_encryption_config_controller_automatic_reloads_total",
        &[("status", status)],
    )
}

/// A Secret `name` (namespace from the client) with one data entry `key` = `value`.
pub fn secret_object(name: &str, key: &str, value: &[u8]) -> k8s_openapi::api::core::v1::Secret {
    k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(std::collections::BTreeMap::from([(
            key.to_owned(),
            k8s_openapi::ByteString(value.to_vec()),
        )])),
        ..Default::default()
    }
}
