//! Benchmark (not a test): seeds an etcd with realistic Secrets (1–4 KiB,
//! mixed providers, written with storage-encryption's encoders) and compares,
//! on the same data, `etcd-inspect --config ... --output json > /dev/null`
//! with `etcdctl get --prefix /registry -w json > /dev/null`: wall time and
//! peak RSS, printed as a table. `scripts/bench-inspect.sh` starts etcd and
//! runs this in release mode.
//!
//! ```text
//! etcd-inspect-bench --endpoints http://127.0.0.1:2379 --keys 100000,200000
//! ```
//!
//! Then the same data as an `etcdctl snapshot save` file: `etcd-inspect
//! snapshot FILE` against the live audit and against `etcdctl snapshot
//! restore` + the live audit (what a user would do without it; the time to
//! start an etcd on the restored dir is not counted).
//!
//! Peak RSS: each measured command runs under a fresh `etcd-inspect-bench
//! measure` process whose only child it is, so that process's
//! `getrusage(RUSAGE_CHILDREN).ru_maxrss` is that command's peak.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use etcd_client::{Client, Txn, TxnOp};
use storage_encryption::{
    EncryptionConfiguration, GroupResource, KmsV2WriteKey, Seed, transform_to_storage,
};

const KMS_KEY_ID: &str = "bench-kek-1";
const LOCAL_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some("measure") {
        measure(&args[1..])
    } else {
        bench(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcd-inspect-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `measure -- CMD ARGS...`: runs CMD with stdout to /dev/null and prints
/// `wall_seconds max_rss_kib exit_code`.
fn measure(args: &[String]) -> Result<()> {
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
    println!("{wall} {} {}", usage.max_rss(), status.code().unwrap_or(-1));
    Ok(())
}

struct Flags {
    endpoints: String,
    keys: Vec<u64>,
    etcd_inspect: PathBuf,
    etcdctl: String,
    runs: u32,
}

fn parse_flags(args: &[String]) -> Result<Flags> {
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let mut f = Flags {
        endpoints: "http://127.0.0.1:2379".into(),
        keys: vec![100_000, 200_000],
        etcd_inspect: exe_dir.join("etcd-inspect"),
        etcdctl: "etcdctl".into(),
        runs: 2,
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
                    .map(|s| s.trim().parse())
                    .collect::<Result<_, _>>()
                    .context("--keys")?
            }
            "--etcd-inspect" => f.etcd_inspect = val()?.into(),
            "--etcdctl" => f.etcdctl = val()?,
            "--runs" => f.runs = val()?.parse().context("--runs")?,
            other => bail!(
                "unknown flag {other} (flags: --endpoints --keys --etcd-inspect --etcdctl --runs)"
            ),
        }
    }
    f.keys.sort_unstable();
    Ok(f)
}

fn config_yaml() -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms: {{apiVersion: v2, name: bench-plugin, endpoint: unix:///run/bench-kms.sock}}\n      - aesgcm: {{keys: [{{name: k1, secret: {LOCAL_KEY}}}]}}\n      - aescbc: {{keys: [{{name: k1, secret: {LOCAL_KEY}}}]}}\n      - secretbox: {{keys: [{{name: k1, secret: {LOCAL_KEY}}}]}}\n      - identity: {{}}\n"
    )
}

/// A small deterministic generator (xorshift64*): reproducible data sets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A protobuf Secret as kube-apiserver stores it in plaintext, `size` bytes of data.
fn secret_object(name: &str, size: usize, rng: &mut Rng) -> Vec<u8> {
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
    field(&mut type_meta, 0x12, b"Secret");
    let mut out = b"k8s\0".to_vec();
    field(&mut out, 0x0a, &type_meta);
    field(&mut out, 0x12, &raw);
    field(&mut out, 0x1a, b"");
    field(&mut out, 0x22, b"");
    out
}

async fn seed(client: &mut Client, from: u64, to: u64) -> Result<()> {
    let config = EncryptionConfiguration::parse(&config_yaml())?;
    let providers = config
        .providers_for(&GroupResource::new("", "secrets"))
        .providers;
    let write_key = KmsV2WriteKey {
        seed: Seed::new([7; 32]),
        encrypted_dek_source: vec![0x5a; 60],
        key_id: KMS_KEY_ID.into(),
        annotations: BTreeMap::new(),
    };
    let kms: BTreeMap<String, KmsV2WriteKey> = [("bench-plugin".to_owned(), write_key)].into();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ from.max(1));
    let mut ops = Vec::with_capacity(100);
    for i in from..to {
        let ns = format!("team-{}", i % 50);
        let name = format!("secret-{i:07}");
        let key = format!("/registry/secrets/{ns}/{name}");
        let size = 1024 + (rng.next() % 3072) as usize;
        let object = secret_object(&name, size, &mut rng);
        // Mixed providers: 40% KMS v2, then aesgcm, aescbc, secretbox, identity.
        let pick = match rng.next() % 10 {
            0..=3 => 0,
            4 | 5 => 1,
            6 | 7 => 2,
            8 => 3,
            _ => 4,
        };
        let value = transform_to_storage(&providers[pick..], &object, key.as_bytes(), &kms)?;
        ops.push(TxnOp::put(key, value, None));
        if ops.len() == 100 {
            client
                .txn(Txn::new().and_then(std::mem::take(&mut ops)))
                .await?;
        }
    }
    if !ops.is_empty() {
        client.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

struct Measured {
    wall: f64,
    rss_kib: i64,
    code: i32,
}

fn run_measured(cmd: &[String]) -> Result<Measured> {
    let out = Command::new(std::env::current_exe()?)
        .arg("measure")
        .arg("--")
        .args(cmd)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let parts: Vec<&str> = text.split_whitespace().collect();
    if parts.len() != 3 {
        bail!(
            "measure of {cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Measured {
        wall: parts[0].parse()?,
        rss_kib: parts[1].parse()?,
        code: parts[2].parse()?,
    })
}

fn best_of(runs: u32, cmd: &[String]) -> Result<Measured> {
    let mut best: Option<Measured> = None;
    for _ in 0..runs.max(1) {
        let m = run_measured(cmd)?;
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

fn bench(args: &[String]) -> Result<()> {
    let f = parse_flags(args)?;
    let dir = std::env::temp_dir().join(format!("etcd-inspect-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.yaml");
    std::fs::write(&config, config_yaml())?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut client = rt.block_on(Client::connect([f.endpoints.as_str()], None))?;
    let mut seeded = 0u64;
    println!(
        "| keys | etcd-inspect s | etcdctl s | ratio | etcd-inspect peak RSS MiB | etcdctl peak RSS MiB | etcd-inspect exit |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut offline_rows = Vec::new();
    for &n in &f.keys {
        let t = Instant::now();
        rt.block_on(seed(&mut client, seeded, n))?;
        eprintln!(
            "seeded {} keys (total {n}) in {:.1}s",
            n - seeded,
            t.elapsed().as_secs_f64()
        );
        seeded = n;
        let inspect = vec![
            f.etcd_inspect.display().to_string(),
            "--endpoints".into(),
            f.endpoints.clone(),
            "--config".into(),
            config.display().to_string(),
            "--kms-key-id".into(),
            format!("bench-plugin={KMS_KEY_ID}"),
            "--output".into(),
            "json".into(),
        ];
        let etcdctl = vec![
            f.etcdctl.clone(),
            "--endpoints".into(),
            f.endpoints.clone(),
            "get".into(),
            "--prefix".into(),
            "/registry".into(),
            "-w".into(),
            "json".into(),
        ];
        let a = best_of(f.runs, &inspect)?;
        let b = best_of(f.runs, &etcdctl)?;
        if b.code != 0 {
            bail!("etcdctl exited {}", b.code);
        }
        println!(
            "| {n} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {} |",
            a.wall,
            b.wall,
            a.wall / b.wall,
            a.rss_kib as f64 / 1024.0,
            b.rss_kib as f64 / 1024.0,
            a.code
        );
        // Offline: the same data as an `etcdctl snapshot save` file, audited
        // directly, against what a user would do otherwise: restore it into
        // a data dir (then start an etcd on it and scan live, whose scan
        // time is the live column above).
        let snap = dir.join(format!("snap-{n}.db"));
        let save = Command::new(&f.etcdctl)
            .args(["--endpoints", &f.endpoints, "snapshot", "save"])
            .arg(&snap)
            .stdout(Stdio::null())
            .status()?;
        if !save.success() {
            bail!("etcdctl snapshot save failed");
        }
        let mut offline = inspect.clone();
        offline.splice(1..3, ["snapshot".to_owned(), snap.display().to_string()]);
        let c = best_of(f.runs, &offline)?;
        let restored = dir.join(format!("restore-{n}"));
        let restore = run_measured(&[
            f.etcdctl.clone(),
            "snapshot".into(),
            "restore".into(),
            snap.display().to_string(),
            "--data-dir".into(),
            restored.display().to_string(),
        ])?;
        let _ = std::fs::remove_dir_all(&restored);
        let _ = std::fs::remove_file(&snap);
        offline_rows.push(format!(
            "| {n} | {:.2} | {:.1} | {} | {:.2} | {:.2} | {:.2} |",
            c.wall,
            c.rss_kib as f64 / 1024.0,
            c.code,
            a.wall,
            restore.wall,
            restore.wall + a.wall
        ));
    }
    println!();
    println!(
        "| keys | snapshot audit s | snapshot audit peak RSS MiB | exit | live audit s | etcdctl snapshot restore s | restore + live s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in offline_rows {
        println!("{r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
