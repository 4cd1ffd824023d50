//! A real etcd server for tests: `/usr/bin/etcd` in a temporary data dir on
//! free loopback ports, optionally with client-certificate auth, killed on
//! drop. Plus helpers to put raw bytes under keys.
//!
//! ```no_run
//! let etcd = atrest_tests::etcd::EtcdServer::start();
//! etcd.put_all(&[("/registry/secrets/ns/a", b"k8s\0...".to_vec())]);
//! let args = etcd.etcdctl_args(); // --endpoints ... [--cacert --cert --key]
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions, Txn, TxnOp};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Where Debian's `etcd-server` package puts the binary.
pub const ETCD_BIN: &str = "/usr/bin/etcd";

/// How long a fresh etcd gets to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// PEM files of a test PKI: a CA, etcd's server cert, and a client cert.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate (trusted by both sides).
    pub ca: PathBuf,
    /// etcd's server certificate (SAN 127.0.0.1, localhost).
    pub server_cert: PathBuf,
    /// etcd's server key.
    pub server_key: PathBuf,
    /// Client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
}

/// A running etcd; killed (and its data dir removed) on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    endpoint: String,
    tls: Option<TlsFiles>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    // The OS picks a free port; etcd binds it a moment later. A clash is
    // possible but rare, and start() retries on an early exit.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    l.local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// Runs `fut` to completion on a fresh runtime in its own thread, so the
/// helpers work from plain `#[test]`s and from inside tokio tests alike.
fn block_on<T: Send + 'static>(fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a tokio runtime")
            .block_on(fut)
    })
    .join()
    .expect("etcd helper thread panicked")
}

impl EtcdServer {
    /// Starts a plaintext etcd on loopback.
    pub fn start() -> Self {
        Self::start_inner(false)
    }

    /// Starts etcd with TLS and client-certificate auth
    /// (`--client-cert-auth --trusted-ca-file --cert-file --key-file`).
    pub fn start_tls() -> Self {
        Self::start_inner(true)
    }

    fn start_inner(tls: bool) -> Self {
        assert!(
            Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} is missing: install etcd-server (Debian: apt-get install etcd-server); \
             these tests need a real etcd and never skip"
        );
        let mut last_err = String::new();
        for _attempt in 0..3 {
            match Self::try_start(tls) {
                Ok(s) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("etcd did not start: {last_err}");
    }

    fn try_start(tls: bool) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("atrest-etcd-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let (client_port, peer_port) = (free_port(), free_port());
        let scheme = if tls { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let tls_files = if tls {
            Some(write_pki(dir.path()))
        } else {
            None
        };

        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("etcd.log")).map_err(|e| e.to_string())?,
            ));
        if let Some(t) = &tls_files {
            cmd.arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg(format!("--cert-file={}", t.server_cert.display()))
                .arg(format!("--key-file={}", t.server_key.display()));
        }
        let child = cmd.spawn().map_err(|e| format!("spawn {ETCD_BIN}: {e}"))?;
        let mut server = EtcdServer {
            child,
            endpoint: client_url,
            tls: tls_files,
            dir,
        };
        server.wait_healthy()?;
        Ok(server)
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "etcd exited early ({status}); log:\n{}",
                    self.log()
                ));
            }
            let opts = self.connect_options();
            let ep = self.endpoint.clone();
            let ok = block_on(async move {
                let mut c = Client::connect([ep], Some(opts))
                    .await
                    .map_err(|e| e.to_string())?;
                c.get("/atrest-health-probe", None)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            });
            match ok {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "etcd not healthy after {START_TIMEOUT:?}: {e}; log:\n{}",
                        self.log()
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// The client URL (`http://127.0.0.1:PORT` or `https://...`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The PKI files when started with [`EtcdServer::start_tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// etcdctl-style connection flags: `--endpoints URL` and, with TLS,
    /// `--cacert --cert --key`. Works for `etcdctl` and `etcd-inspect`.
    pub fn etcdctl_args(&self) -> Vec<String> {
        let mut a = vec!["--endpoints".to_owned(), self.endpoint.clone()];
        if let Some(t) = &self.tls {
            for (flag, p) in [
                ("--cacert", &t.ca),
                ("--cert", &t.client_cert),
                ("--key", &t.client_key),
            ] {
                a.push(flag.to_owned());
                a.push(p.display().to_string());
            }
        }
        a
    }

    /// Client options (TLS material when needed).
    pub fn connect_options(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        if let Some(t) = &self.tls {
            let read = |p: &PathBuf| std::fs::read(p).expect("read test PKI file");
            o = o.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&t.ca)))
                    .identity(Identity::from_pem(
                        read(&t.client_cert),
                        read(&t.client_key),
                    )),
            );
        }
        o
    }

    /// A connected client (async).
    pub async fn client(&self) -> Client {
        Client::connect([self.endpoint.clone()], Some(self.connect_options()))
            .await
            .expect("connect to the test etcd")
    }

    /// Puts raw bytes under keys, in transactions of up to 100 puts; returns
    /// the revision after the last write.
    pub fn put_all<K, V>(&self, kvs: &[(K, V)]) -> i64
    where
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let owned: Vec<(Vec<u8>, Vec<u8>)> = kvs
            .iter()
            .map(|(k, v)| (k.as_ref().to_vec(), v.as_ref().to_vec()))
            .collect();
        let opts = self.connect_options();
        let ep = self.endpoint.clone();
        block_on(async move {
            let mut c = Client::connect([ep], Some(opts))
                .await
                .expect("connect to the test etcd");
            put_batches(&mut c, owned).await
        })
    }

    /// Puts one raw value.
    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> i64 {
        self.put_all(&[(key, value)])
    }

    /// Kills etcd (SIGKILL, like a crash), keeps it down for `down_for`, then
    /// starts it again with the same command line (same data dir and ports) and
    /// waits until it answers. For tests of clients surviving an etcd outage.
    pub fn restart(&mut self, down_for: Duration) {
        // The command line is read back from /proc so start() need not keep it.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.child.id()))
            .expect("read etcd's /proc/PID/cmdline (is etcd still running?)");
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .skip(1)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("open etcd.log for appending");
        self.child = Command::new(ETCD_BIN)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("restart {ETCD_BIN}: {e}"));
        if let Err(e) = self.wait_healthy() {
            panic!("etcd did not come back after a restart: {e}");
        }
    }
}

/// Puts `kvs` through `client` in transactions of up to 100 operations
/// (etcd's default `--max-txn-ops` is 128). Returns the last revision.
pub async fn put_batches(client: &mut Client, kvs: Vec<(Vec<u8>, Vec<u8>)>) -> i64 {
    let mut revision = 0;
    let mut it = kvs.into_iter().peekable();
    while it.peek().is_some() {
        let ops: Vec<TxnOp> = it
            .by_ref()
            .take(100)
            .map(|(k, v)| TxnOp::put(k, v, None))
            .collect();
        let resp = client
            .txn(Txn::new().and_then(ops))
            .await
            .expect("etcd txn put");
        revision = resp.header().map(|h| h.revision()).unwrap_or(revision);
    }
    revision
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Generates a CA, a server cert (SAN 127.0.0.1, localhost) and a client
/// cert under `dir/pki`, mode 0600 keys.
fn write_pki(dir: &Path) -> TlsFiles {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).expect("create pki dir");

    let ca_key = KeyPair::generate().expect("generate CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "atrest test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |cn: &str, sans: Vec<String>, eku: Vec<ExtendedKeyUsagePurpose>| {
        let key = KeyPair::generate().expect("generate leaf key");
        let mut p = CertificateParams::new(sans).expect("leaf params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = eku;
        let cert = p.signed_by(&key, &issuer).expect("sign leaf");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf(
        "etcd-server",
        vec!["127.0.0.1".into(), "localhost".into()],
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let (client_pem, client_key) = leaf(
        "etcd-inspect-test",
        vec![],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );

    let files = TlsFiles {
        ca: pki.join("ca.pem"),
        server_cert: pki.join("server.pem"),
        server_key: pki.join("server-key.pem"),
        client_cert: pki.join("client.pem"),
        client_key: pki.join("client-key.pem"),
    };
    write_file(&files.ca, &ca_cert.pem());
    write_file(&files.server_cert, &server_pem);
    write_file(&files.server_key, &server_key);
    write_file(&files.client_cert, &client_pem);
    write_file(&files.client_key, &client_key);
    files
}

fn write_file(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// What one run of the real `etcd-inspect` binary produced.
#[derive(Debug)]
pub struct InspectRun {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl InspectRun {
    /// Parses stdout as the `--output json` document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "etcd-inspect output is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// The JSON records keyed by etcd key.
    pub fn records(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let doc = self.json();
        doc["records"]
            .as_array()
            .expect("records array")
            .iter()
            .map(|r| (r["key"].as_str().expect("record key").to_owned(), r.clone()))
            .collect()
    }
}

/// Runs `target/<profile>/etcd-inspect` with `args` (stdin closed, stdout and
/// stderr captured; never a terminal, so no progress output).
pub fn run_etcd_inspect<I, S>(args: I) -> InspectRun
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(crate::plugin::bin_path("etcd-inspect"))
        .args(args)
        .env_remove("ATREST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run etcd-inspect");
    InspectRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A Kubernetes protobuf value as kube-apiserver stores it: `k8s\0` then a
/// `runtime.Unknown` with typeMeta, raw object bytes, and the two empty
/// string fields it always writes.
pub fn k8s_protobuf(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
        out.push(tag);
        let mut n = bytes.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(bytes);
    }
    let mut type_meta = Vec::new();
    field(&mut type_meta, 0x0a, api_version.as_bytes());
    field(&mut type_meta, 0x12, kind.as_bytes());
    let mut out = b"k8s\0".to_vec();
    field(&mut out, 0x0a, &type_meta);
    field(&mut out, 0x12, raw);
    field(&mut out, 0x1a, b"");
    field(&mut out, 0x22, b"");
    out
}
