//! `etcd-inspect-bench`: seeds an etcd 3.4 with data shaped the way
//! kube-apiserver writes it and compares, on the same data,
//! `etcd-inspect --config ... --output json > /dev/null` with
//! `etcdctl get --prefix /registry -w json > /dev/null`.
//!
//! The data: small protobuf Secrets and ConfigMaps (`k8s\0` + a
//! `runtime.Unknown`), one value in 500 a 100 KiB ConfigMap, spread over 500
//! namespaces with kube-style generated names, stored through
//! storage-encryption's encoders with mixed providers (40% KMS v2, 20%
//! aesgcm, 20% aescbc, 10% secretbox, 10% identity). Key `i` is a pure
//! function of `i`, so growing a dataset from 200k to 1M keys keeps its
//! shape. Seeding sends transactions of 100 puts, several in flight.
//!
//! Each measured command runs under a fresh `etcd-inspect-bench measure`
//! process whose only child it is, so that process's
//! `getrusage(RUSAGE_CHILDREN)` is the command's own CPU time (user + sys)
//! and peak RSS. With `--etcd-pid`, etcd's CPU time during the run is read
//! from `/proc/PID/stat` too (the server side of the scan).
//!
//! Then, unless `--no-snapshot`, the same data as an `etcdctl snapshot save`
//! file: `etcd-inspect snapshot FILE` (offline, no etcd) against the live
//! audit above and against what a user would do without it: `etcdctl
//! snapshot restore` into a data dir, start an etcd on it, wait until it
//! answers, and run the live audit. That path's wall time is all three; its
//! CPU is the restore's, the restored etcd's (from its start) and
//! etcd-inspect's; the restored etcd's peak RSS is its `VmHWM`.
//!
//! It prints tables, and for each live etcd-inspect run the requests and the
//! index entries etcd counted per key (from etcd-inspect's `etcd scan
//! finished` log line); it asserts nothing about time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{Client, GetOptions, Txn, TxnOp};
use storage_encryption::{
    EncryptionConfiguration, GroupResource, KmsV2WriteKey, ProviderConfig, Seed,
    transform_to_storage,
};

use crate::kms::ProcessCpu;

const KMS_KEY_ID: &str = "bench-kek-1";
const LOCAL_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// Namespaces the keys are spread over.
const NAMESPACES: u64 = 500;
/// One value in this many is a 100 KiB ConfigMap.
const BIG_EVERY: u64 = 500;
/// Puts per transaction (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 100;
/// Transactions in flight while seeding.
const SEED_IN_FLIGHT: usize = 8;

/// `measure -- CMD ARGS...`: runs CMD with stdout to /dev/null and prints
/// `wall_seconds max_rss_kib exit_code user_seconds sys_seconds`.
pub fn measure(args: &[String]) -> Result<()> {
    let cmd = args
        .iter()
        .skip_while(|a| *a != "--")
        .skip(1)
        .collect::<Vec<_>>();
    let (prog, rest) = cmd.split_first().context("measure -- CMD ARGS...")?;
    let start = Instant::now();
    let status = Command::new(prog)
        .args(rest)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("run {prog}"))?;
    let wall = start.elapsed().as_secs_f64();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    println!(
        "{wall} {} {} {} {}",
        usage.max_rss(),
        status.code().unwrap_or(-1),
        secs(usage.user_time()),
        secs(usage.system_time())
    );
    Ok(())
}

/// Command-line flags of the benchmark.
#[derive(Debug)]
pub struct Flags {
    endpoints: String,
    keys: Vec<u64>,
    etcd_inspect: PathBuf,
    etcdctl: String,
    runs: u32,
    etcd_pid: Option<u32>,
    variants: Vec<Vec<String>>,
    etcd: String,
    snapshot: bool,
    etcdctl_get: bool,
    keep_snapshots: Option<PathBuf>,
}

const USAGE: &str = "flags: --endpoints URL --keys N,N,... --etcd-inspect PATH --etcdctl PATH \
     --etcd PATH --runs N --etcd-pid PID --variant 'EXTRA ETCD-INSPECT ARGS' (repeatable) \
     --no-snapshot --no-etcdctl --keep-snapshots DIR";

impl Flags {
    /// Parses the flags (see the module docs).
    pub fn parse(args: &[String]) -> Result<Self> {
        let exe_dir = std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default();
        let mut f = Flags {
            endpoints: "http://127.0.0.1:2379".into(),
            keys: vec![100_000, 200_000, 1_000_000],
            etcd_inspect: exe_dir.join("etcd-inspect"),
            etcdctl: "etcdctl".into(),
            runs: 2,
            etcd_pid: None,
            variants: Vec::new(),
            etcd: "etcd".into(),
            snapshot: true,
            etcdctl_get: true,
            keep_snapshots: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = || {
                it.next()
                    .cloned()
                    .with_context(|| format!("{a} needs a value"))
            };
            match a.as_str() {
                "--endpoints" => f.endpoints = val()?,
                "--keys" => {
                    f.keys = val()?
                        .split(',')
                        .map(|s| s.trim().replace('_', "").parse())
                        .collect::<Result<_, _>>()
                        .context("--keys")?
                }
                "--etcd-inspect" => f.etcd_inspect = val()?.into(),
                "--etcdctl" => f.etcdctl = val()?,
                "--runs" => f.runs = val()?.parse().context("--runs")?,
                "--etcd-pid" => f.etcd_pid = Some(val()?.parse().context("--etcd-pid")?),
                "--variant" => f
                    .variants
                    .push(val()?.split_whitespace().map(String::from).collect()),
                "--etcd" => f.etcd = val()?,
                "--no-snapshot" => f.snapshot = false,
                "--no-etcdctl" => f.etcdctl_get = false,
                "--keep-snapshots" => f.keep_snapshots = Some(val()?.into()),
                other => bail!("unknown flag {other} ({USAGE})"),
            }
        }
        f.keys.sort_unstable();
        f.keys.dedup();
        Ok(f)
    }
}

fn config_yaml() -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets, configmaps]\n    providers:\n      - kms: {{apiVersion: v2, name: bench-plugin, endpoint: unix:///run/bench-kms.sock}}\n      - aesgcm: {{keys: [{{name: k1, secret: {LOCAL_KEY}}}]}}\n      - aescbc: {{keys: [{{name: k1, secret: {LOCAL_KEY}}}]}}\n      - secretbox: {{keys: [{{name: k1, secret: {LOCAL_KEY}}}]}}\n      - identity: {{}}\n"
    )
}

/// A small deterministic generator (xorshift64*): reproducible data sets.
struct Rng(u64);
impl Rng {
    /// A generator for item `i` (splitmix64 of `i`, never zero).
    fn for_item(i: u64) -> Self {
        let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A protobuf object as kube-apiserver stores it in plaintext: `k8s\0`, then
/// a `runtime.Unknown` {typeMeta{apiVersion, kind}, raw, contentEncoding,
/// contentType}; `raw` is `size` bytes standing in for the object.
fn k8s_object(kind: &str, name: &str, size: usize, rng: &mut Rng) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
        out.push(tag);
        let mut n = bytes.len();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(bytes);
    }
    let mut raw = format!("name={name};data=").into_bytes();
    while raw.len() < size {
        raw.extend_from_slice(&rng.next().to_le_bytes());
    }
    let mut type_meta = Vec::new();
    field(&mut type_meta, 0x0a, b"v1");
    field(&mut type_meta, 0x12, kind.as_bytes());
    let mut out = b"k8s\0".to_vec();
    field(&mut out, 0x0a, &type_meta);
    field(&mut out, 0x12, &raw);
    field(&mut out, 0x1a, b"");
    field(&mut out, 0x22, b"");
    out
}

/// kube's generated-name alphabet (no vowels, no look-alikes).
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Key and plaintext object of item `i`.
fn item(i: u64) -> (String, &'static str, Vec<u8>) {
    let mut rng = Rng::for_item(i);
    let ns = format!("ns-{:03}", rng.below(NAMESPACES));
    let app = format!("app-{}", rng.below(40));
    let suffix: String = (0..5)
        .map(|_| NAME_ALPHABET[rng.below(NAME_ALPHABET.len() as u64) as usize] as char)
        .collect();
    let (resource, kind, name, size) = if i % BIG_EVERY == BIG_EVERY - 1 {
        (
            "configmaps",
            "ConfigMap",
            format!("{app}-bundle-{suffix}"),
            100 * 1024,
        )
    } else if rng.below(10) < 4 {
        (
            "configmaps",
            "ConfigMap",
            format!("{app}-config-{suffix}"),
            300 + rng.below(1700) as usize,
        )
    } else {
        (
            "secrets",
            "Secret",
            format!("{app}-token-{suffix}"),
            200 + rng.below(1000) as usize,
        )
    };
    let object = k8s_object(kind, &name, size, &mut rng);
    (
        format!("/registry/{resource}/{ns}/{name}"),
        resource,
        object,
    )
}

/// Puts items `from..to`, stored as kube-apiserver would with mixed providers.
async fn seed(client: &Client, from: u64, to: u64) -> Result<()> {
    let config = EncryptionConfiguration::parse(&config_yaml())?;
    let providers: BTreeMap<&str, Vec<&ProviderConfig>> = ["secrets", "configmaps"]
        .into_iter()
        .map(|r| {
            (
                r,
                config.providers_for(&GroupResource::new("", r)).providers,
            )
        })
        .collect();
    let write_key = KmsV2WriteKey {
        seed: Seed::new([7; 32]),
        encrypted_dek_source: vec![0x5a; 60],
        key_id: KMS_KEY_ID.into(),
        annotations: BTreeMap::new(),
    };
    let kms: BTreeMap<String, KmsV2WriteKey> = [("bench-plugin".to_owned(), write_key)].into();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut ops = Vec::with_capacity(TXN_OPS);
    for i in from..to {
        let (key, resource, object) = item(i);
        let list = providers
            .get(resource)
            .context("bench config lacks a resource")?;
        let pick = match Rng::for_item(i ^ 0x5555).below(10) {
            0..=3 => 0,
            4 | 5 => 1,
            6 | 7 => 2,
            8 => 3,
            _ => 4,
        };
        let value = transform_to_storage(&list[pick..], &object, key.as_bytes(), &kms)?;
        ops.push(TxnOp::put(key, value, None));
        if ops.len() == TXN_OPS || i + 1 == to {
            if in_flight.len() >= SEED_IN_FLIGHT
                && let Some(done) = in_flight.join_next().await
            {
                done??;
            }
            let mut c = client.clone();
            let batch = std::mem::take(&mut ops);
            in_flight.spawn(async move {
                c.txn(Txn::new().and_then(batch)).await?;
                anyhow::Ok(())
            });
        }
    }
    while let Some(done) = in_flight.join_next().await {
        done??;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Measured {
    wall: f64,
    rss_kib: i64,
    code: i32,
    cpu: f64,
    etcd_cpu: Option<f64>,
    /// What a live etcd-inspect scan cost etcd, from its log.
    scan: Option<ScanCost>,
}

/// The counters of etcd-inspect's `etcd scan finished` log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScanCost {
    requests: u64,
    keys: u64,
    /// Sum of etcd's `count`s: the index entries etcd 3.4 walked.
    range_keys: u64,
}

impl ScanCost {
    /// The counters in `stderr`, if a live scan logged them.
    fn parse(stderr: &str) -> Option<Self> {
        let line = stderr.lines().find(|l| l.contains("etcd scan finished"))?;
        let field = |name: &str| -> Option<u64> {
            let at = line.find(&format!(" {name}="))? + name.len() + 2;
            line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        };
        Some(ScanCost {
            requests: field("requests")?,
            keys: field("keys")?,
            range_keys: field("range_keys")?,
        })
        .filter(|c| c.keys > 0)
    }

    fn per_key(&self) -> f64 {
        self.range_keys as f64 / self.keys.max(1) as f64
    }
}

fn run_measured(cmd: &[String], etcd: Option<&ProcessCpu>) -> Result<Measured> {
    let etcd_before = etcd.map(ProcessCpu::read).transpose()?;
    let out = Command::new(std::env::current_exe()?)
        .arg("measure")
        .arg("--")
        .args(cmd)
        // etcd-inspect logs its scan counters (requests, keys etcd counted).
        .env("ATREST_LOG", "etcd_inspect=info")
        .stderr(Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    let scan = ScanCost::parse(&stderr);
    let etcd_cpu = match (etcd, etcd_before) {
        (Some(p), Some(b)) => Some(p.read()?.saturating_sub(b).as_secs_f64()),
        _ => None,
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let parts: Vec<&str> = text.split_whitespace().collect();
    if parts.len() != 5 {
        bail!(
            "measure of {} failed (its stderr is above)",
            cmd.first().map_or("", String::as_str)
        );
    }
    let user: f64 = parts[3].parse()?;
    let sys: f64 = parts[4].parse()?;
    Ok(Measured {
        wall: parts[0].parse()?,
        rss_kib: parts[1].parse()?,
        code: parts[2].parse()?,
        cpu: user + sys,
        etcd_cpu,
        scan,
    })
}

/// The run with the least wall time; peak RSS is the largest of all runs.
fn best_of(runs: u32, cmd: &[String], etcd: Option<&ProcessCpu>) -> Result<Measured> {
    let mut best: Option<Measured> = None;
    for _ in 0..runs.max(1) {
        let m = run_measured(cmd, etcd)?;
        eprintln!(
            "  {}: {:.2}s wall, {:.2}s CPU",
            cmd.first().map_or("", String::as_str),
            m.wall,
            m.cpu
        );
        best = Some(match best {
            Some(b) if b.wall <= m.wall => Measured {
                rss_kib: b.rss_kib.max(m.rss_kib),
                ..b
            },
            Some(b) => Measured {
                rss_kib: b.rss_kib.max(m.rss_kib),
                ..m
            },
            None => m,
        });
    }
    best.context("no run")
}

async fn count_keys(client: &Client) -> Result<i64> {
    let mut kv = client.kv_client();
    let resp = kv
        .get(
            "/registry/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    Ok(resp.count())
}

/// The etcd-inspect command line of an audit of `source` (the endpoint
/// flags, or `snapshot FILE`).
fn inspect_cmd(f: &Flags, source: &[String], config: &std::path::Path) -> Vec<String> {
    let mut cmd = vec![f.etcd_inspect.display().to_string()];
    cmd.extend(source.iter().cloned());
    cmd.extend([
        "--config".into(),
        config.display().to_string(),
        "--kms-key-id".into(),
        format!("bench-plugin={KMS_KEY_ID}"),
        "--output".into(),
        "json".into(),
        "--fail-on".into(),
        "none".into(),
    ]);
    cmd
}

/// One size's offline figures.
#[derive(Debug, Clone, Copy)]
struct Offline {
    keys: i64,
    /// `etcd-inspect snapshot FILE`.
    file: Measured,
    /// The live audit of the same data (from the main table).
    live: Measured,
    /// `etcdctl snapshot restore` + etcd start + live audit.
    restore: RestoreLive,
}

/// What restoring a snapshot and auditing it live cost.
#[derive(Debug, Clone, Copy)]
struct RestoreLive {
    /// From the restore's start to the audit's end.
    wall: f64,
    /// `etcdctl snapshot restore` alone.
    restore_wall: f64,
    /// Restore + start until the etcd answered.
    ready_wall: f64,
    /// restore + restored etcd (whole life) + etcd-inspect, user+sys.
    cpu: f64,
    /// etcd-inspect's peak RSS.
    inspect_rss_kib: i64,
    /// The restored etcd's peak RSS (`VmHWM`).
    etcd_rss_kib: i64,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `VmHWM` (peak RSS) of `pid`, KiB.
fn peak_rss_kib(pid: u32) -> Result<i64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// Kills the restored etcd (and removes its data dir) however the run ends.
struct Restored {
    child: std::process::Child,
    data: PathBuf,
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// What a user does without an offline reader: restore the snapshot into a
/// data dir, start an etcd on it, wait for it, and audit it live.
fn restore_and_audit(
    f: &Flags,
    snap: &std::path::Path,
    config: &std::path::Path,
    dir: &std::path::Path,
) -> Result<RestoreLive> {
    let data = dir.join("restored");
    let _ = std::fs::remove_dir_all(&data);
    let (cport, pport) = (free_port()?, free_port()?);
    let peer = format!("http://127.0.0.1:{pport}");
    let client = format!("http://127.0.0.1:{cport}");
    let start = Instant::now();
    let restore = run_measured(
        &[
            f.etcdctl.clone(),
            "snapshot".into(),
            "restore".into(),
            snap.display().to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--name".into(),
            "restored".into(),
            "--initial-cluster".into(),
            format!("restored={peer}"),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
        ],
        None,
    )?;
    if restore.code != 0 {
        bail!("etcdctl snapshot restore exited {}", restore.code);
    }
    let restore_wall = start.elapsed().as_secs_f64();
    let log = std::fs::File::create(dir.join("restored-etcd.log"))?;
    let child = Command::new(&f.etcd)
        .args(["--name", "restored", "--data-dir"])
        .arg(&data)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("restored={peer}")])
        .args(["--quota-backend-bytes", "8589934592", "--logger", "zap"])
        .args(["--log-level", "error"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {}", f.etcd))?;
    let mut restored = Restored { child, data };
    let pid = restored.child.id();
    let etcd_cpu = ProcessCpu::new(pid)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ok = Command::new(&f.etcdctl)
            .args(["--endpoints", &client, "endpoint", "health"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if ok {
            break;
        }
        if let Some(status) = restored.child.try_wait()? {
            bail!("the restored etcd exited {status} (see restored-etcd.log)");
        }
        if Instant::now() > deadline {
            bail!("the restored etcd did not answer within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready_wall = start.elapsed().as_secs_f64();
    let audit = run_measured(
        &inspect_cmd(f, &["--endpoints".into(), client], config),
        None,
    )?;
    if audit.code != 0 {
        bail!("etcd-inspect on the restored etcd exited {}", audit.code);
    }
    let wall = start.elapsed().as_secs_f64();
    let etcd_cpu = etcd_cpu.read()?.as_secs_f64();
    let etcd_rss_kib = peak_rss_kib(pid)?;
    drop(restored);
    Ok(RestoreLive {
        wall,
        restore_wall,
        ready_wall,
        cpu: restore.cpu + etcd_cpu + audit.cpu,
        inspect_rss_kib: audit.rss_kib,
        etcd_rss_kib,
    })
}

/// Seeds each size in turn and prints the comparison tables.
pub fn run(f: &Flags) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("etcd-inspect-bench-")
        .tempdir()?;
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, config_yaml())?;
    let etcd_cpu = f.etcd_pid.map(ProcessCpu::new).transpose()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(Client::connect([f.endpoints.as_str()], None))?;
    let mut seeded = 0u64;
    let mut rows: Vec<String> = Vec::new();
    // (keys, command, measured) of every live row, for the ratios.
    let mut all: Vec<(u64, String, Measured)> = Vec::new();
    let mut offline: Vec<Offline> = Vec::new();
    for &n in &f.keys {
        let t = Instant::now();
        rt.block_on(seed(&client, seeded, n))?;
        let stored = rt.block_on(count_keys(&client))?;
        eprintln!(
            "seeded {} items (total {n}, {stored} distinct keys) in {:.1}s",
            n - seeded,
            t.elapsed().as_secs_f64()
        );
        seeded = n;
        // Let etcd settle (its backend commits every 100 ms).
        std::thread::sleep(Duration::from_secs(1));

        let inspect = inspect_cmd(f, &["--endpoints".into(), f.endpoints.clone()], &config);
        let etcdctl = vec![
            f.etcdctl.clone(),
            "--endpoints".into(),
            f.endpoints.clone(),
            // Its default 5 s would cut the million-key read short.
            "--command-timeout=600s".into(),
            "get".into(),
            "--prefix".into(),
            "/registry".into(),
            "-w".into(),
            "json".into(),
        ];
        let ctl = if f.etcdctl_get {
            // One run at a million keys: it takes minutes and ~14 GiB.
            let runs = if n >= 1_000_000 { 1 } else { f.runs };
            let ctl = best_of(runs, &etcdctl, etcd_cpu.as_ref())?;
            if ctl.code != 0 {
                bail!("etcdctl exited {}", ctl.code);
            }
            Some(ctl)
        } else {
            None
        };
        let mut tools: Vec<(String, Vec<String>)> = vec![("etcd-inspect".into(), inspect.clone())];
        for v in &f.variants {
            let mut cmd = inspect.clone();
            cmd.extend(v.iter().cloned());
            tools.push((format!("etcd-inspect {}", v.join(" ")), cmd));
        }
        let mut live: Option<Measured> = None;
        for (name, cmd) in &tools {
            let m = best_of(f.runs, cmd, etcd_cpu.as_ref())?;
            if m.code != 0 {
                bail!("{name} exited {}", m.code);
            }
            live.get_or_insert(m);
            rows.push(row(stored, name, &m, ctl.map(|c| c.wall)));
            all.push((n, name.clone(), m));
        }
        if let Some(ctl) = ctl {
            rows.push(row(stored, "etcdctl", &ctl, None));
            all.push((n, "etcdctl".into(), ctl));
        }

        if f.snapshot
            && let Some(live) = live
        {
            let snap = match &f.keep_snapshots {
                Some(d) => {
                    std::fs::create_dir_all(d)?;
                    d.join(format!("bench-{n}.db"))
                }
                None => dir.path().join(format!("bench-{n}.db")),
            };
            let _ = std::fs::remove_file(&snap);
            let t = Instant::now();
            let save = Command::new(&f.etcdctl)
                .args(["--endpoints", &f.endpoints, "--command-timeout=600s"])
                .args(["snapshot", "save"])
                .arg(&snap)
                .stdout(Stdio::null())
                .status()?;
            if !save.success() {
                bail!("etcdctl snapshot save failed");
            }
            eprintln!(
                "saved {} ({} MiB) in {:.1}s",
                snap.display(),
                std::fs::metadata(&snap)?.len() >> 20,
                t.elapsed().as_secs_f64()
            );
            let cmd = inspect_cmd(f, &["snapshot".into(), snap.display().to_string()], &config);
            let file = best_of(f.runs, &cmd, None)?;
            if file.code != 0 {
                bail!("etcd-inspect snapshot exited {}", file.code);
            }
            all.push((n, "etcd-inspect snapshot".into(), file));
            let restore = restore_and_audit(f, &snap, &config, dir.path())?;
            eprintln!(
                "  restore {:.2}s, etcd ready at {:.2}s, audited at {:.2}s",
                restore.restore_wall, restore.ready_wall, restore.wall
            );
            if f.keep_snapshots.is_none() {
                let _ = std::fs::remove_file(&snap);
            }
            offline.push(Offline {
                keys: stored,
                file,
                live,
                restore,
            });
        }
    }
    println!(
        "| keys | command | wall s | CPU s (user+sys) | peak RSS MiB | etcd CPU s | wall vs etcdctl |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!("{r}");
    }
    if !offline.is_empty() {
        println!();
        println!(
            "| keys | audit of a snapshot | wall s | CPU s (all processes) | etcd-inspect peak RSS MiB | etcd peak RSS MiB | wall vs live |"
        );
        println!("|---:|---|---:|---:|---:|---:|---:|");
        let mib = |k: i64| k as f64 / 1024.0;
        for o in &offline {
            let live_cpu = o.live.cpu + o.live.etcd_cpu.unwrap_or(0.0);
            println!(
                "| {} | etcd-inspect snapshot FILE | {:.2} | {:.2} | {:.1} | — | {:.2} |",
                o.keys,
                o.file.wall,
                o.file.cpu,
                mib(o.file.rss_kib),
                o.file.wall / o.live.wall
            );
            println!(
                "| {} | live (etcd-inspect --endpoints){} | {:.2} | {:.2} | {:.1} | — | 1.00 |",
                o.keys,
                if o.live.etcd_cpu.is_some() {
                    ""
                } else {
                    ", etcd CPU not counted"
                },
                o.live.wall,
                live_cpu,
                mib(o.live.rss_kib),
            );
            println!(
                "| {} | etcdctl snapshot restore + etcd start + live | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} |",
                o.keys,
                o.restore.wall,
                o.restore.cpu,
                mib(o.restore.inspect_rss_kib),
                mib(o.restore.etcd_rss_kib),
                o.restore.wall / o.live.wall
            );
        }
    }
    // What each live scan cost etcd: the index entries etcd 3.4 walked
    // (the sum of the `count`s) per key returned, and the requests.
    println!();
    for (n, name, m) in &all {
        if let Some(c) = m.scan {
            println!(
                "{name}: {n} keys: {} requests, {:.2} counted per key",
                c.requests,
                c.per_key()
            );
        }
    }
    // The growth ratios between the two largest sizes.
    if let [.., small, large] = f.keys.as_slice() {
        println!();
        for (_, name, m) in all.iter().filter(|(n, _, _)| n == large) {
            if let Some((_, _, m0)) = all.iter().find(|(k, t, _)| k == small && t == name) {
                let etcd = match (m.etcd_cpu, m0.etcd_cpu) {
                    (Some(e), Some(e0)) if e0 > 0.0 => format!(", etcd CPU {:.2}", e / e0),
                    _ => String::new(),
                };
                println!(
                    "{name}: {large} / {small} keys: wall ratio {:.2}, CPU {:.2}{etcd}, peak RSS {:.1} → {:.1} MiB (keys ratio {:.1})",
                    m.wall / m0.wall,
                    m.cpu / m0.cpu,
                    m0.rss_kib as f64 / 1024.0,
                    m.rss_kib as f64 / 1024.0,
                    *large as f64 / *small as f64
                );
            }
        }
    }
    Ok(())
}

fn row(keys: i64, name: &str, m: &Measured, etcdctl_wall: Option<f64>) -> String {
    format!(
        "| {keys} | {name} | {:.2} | {:.2} | {:.1} | {} | {} |",
        m.wall,
        m.cpu,
        m.rss_kib as f64 / 1024.0,
        m.etcd_cpu.map_or("—".into(), |c| format!("{c:.2}")),
        etcdctl_wall.map_or("—".into(), |w| format!("{:.2}", m.wall / w)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_cost_is_read_from_the_log_line() {
        let log = "2026-12-06T13:06:15Z  INFO etcd_inspect::run: etcd scan finished \
                   requests=190 keys=100000 bytes=124594088 range_keys=453175 max_range_keys=100000";
        let c = ScanCost::parse(log).unwrap();
        assert_eq!(
            c,
            ScanCost {
                requests: 190,
                keys: 100_000,
                range_keys: 453_175
            }
        );
        assert!((c.per_key() - 4.53).abs() < 0.01);
        // The offline audit logs an empty live scan: no figure.
        assert_eq!(
            ScanCost::parse("etcd scan finished requests=0 keys=0 bytes=0 range_keys=0"),
            None
        );
        assert_eq!(ScanCost::parse("nothing"), None);
    }

    #[test]
    fn items_are_deterministic_and_kube_shaped() {
        let (k1, r1, v1) = item(12_345);
        let (k2, _, v2) = item(12_345);
        assert_eq!((&k1, &v1), (&k2, &v2));
        assert!(k1.starts_with(&format!("/registry/{r1}/ns-")));
        assert!(v1.starts_with(b"k8s\0"));
        let (_, r, big) = item(BIG_EVERY - 1);
        assert_eq!(r, "configmaps");
        assert!(big.len() > 100 * 1024);
    }
}
