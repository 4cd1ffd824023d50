//! Rewrite benchmark: N Secrets through one kube-apiserver stand-in (real etcd,
//! aescbc), rewritten with the rotator's rewrite engine at concurrency 1, 4
//! and 16. Before each round a new key is put first in the stand-in's config,
//! so every object is stale and each PUT really re-encrypts and writes to etcd.
//! Prints objects/s and the peak RSS of the rewrite (this process).
//!
//! ```text
//! cargo build --release -p kube-apiserver-standin
//! cargo run --release -p atrest-bench --bin rotator-rewrite-bench -- [OBJECTS] [STANDIN_BIN]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rotator::apiserver::Apiserver;
use rotator::rewrite::{self, RewriteSettings};
use rotator::state::Checkpoint;
use rotator::targets::{ApiserverAccess, Host, ProofMode};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(keys: &[u8]) -> String {
    let mut s = String::from(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - aescbc:\n      keys:\n",
    );
    for k in keys {
        s.push_str(&format!(
            "      - name: k{k}\n        secret: {}\n",
            STANDARD.encode([*k; 32])
        ));
    }
    s
}

fn write(path: &Path, text: &str) {
    rotator::fsio::replace(path, text.as_bytes()).unwrap();
}

/// Peak RSS (VmHWM) in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resets VmHWM to the current RSS (Linux `clear_refs` value 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .map(|a| a.parse().expect("OBJECTS is a number"))
        .unwrap_or(2000);
    let standin_bin = args.get(2).map(PathBuf::from).unwrap_or_else(|| {
        // Beside this binary (target/<profile>/).
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().join("kube-apiserver-standin")
    });
    assert!(
        standin_bin.is_file(),
        "{} not found: build it first (see the doc comment)",
        standin_bin.display()
    );
    assert!(
        Path::new("/usr/bin/etcd").is_file(),
        "/usr/bin/etcd is missing (Debian package etcd-server)"
    );

    let dir = tempfile::tempdir().unwrap();
    let (client_port, peer_port) = (free_port(), free_port());
    let etcd_url = format!("http://127.0.0.1:{client_port}");
    let _etcd = Kill(
        Command::new("/usr/bin/etcd")
            .args(["--data-dir", dir.path().join("etcd").to_str().unwrap()])
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd"),
    );
    let cfg_path = dir.path().join("enc.yaml");
    write(&cfg_path, &config(&[1]));
    let mut standin = Command::new(&standin_bin)
        .args(["--listen", "127.0.0.1:0", "--etcd-endpoints", &etcd_url])
        .args(["--encryption-provider-config", cfg_path.to_str().unwrap()])
        .args([
            "--encryption-provider-config-automatic-reload",
            "--config-reload-interval",
            "100ms",
        ])
        .args(["--resources", "secrets"])
        .env("ATREST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the stand-in");
    let mut line = String::new();
    BufReader::new(standin.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _standin = Kill(standin);
    let url = format!(
        "http://{}",
        line.trim()
            .strip_prefix("listening on ")
            .expect("listening on ADDR")
    );
    let host = Host {
        name: "bench".into(),
        encryption_config: cfg_path.clone(),
        keyring: None,
        apiserver: ApiserverAccess::Url {
            url,
            token: None,
            ca_file: None,
        },
        proof: ProofMode::ConfigHash,
        ssh: None,
    };
    let api = Apiserver::connect(&host).await.unwrap();
    // Wait for etcd + stand-in.
    let start = Instant::now();
    while api.get_ok("/api/v1/secrets?limit=1").await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the stand-in never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Seed N Secrets, 16 at a time.
    let seed_start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let api = api.clone();
        set.spawn(async move {
            let body = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": format!("s-{i}"), "namespace": "bench"},
                "data": {"k": STANDARD.encode(vec![7u8; 512])}});
            let r = api
                .request(
                    http::Method::POST,
                    "/api/v1/namespaces/bench/secrets",
                    Some(serde_json::to_vec(&body).unwrap()),
                )
                .await
                .unwrap();
            assert!(
                r.status == 201 || r.status == 200,
                "create: HTTP {}",
                r.status
            );
        });
        if set.len() >= 16 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    println!(
        "seeded {n} Secrets (512-byte values) in {:.1}s",
        seed_start.elapsed().as_secs_f64()
    );

    let targets = rewrite::discover(&api, &["secrets".to_string()])
        .await
        .unwrap();
    println!("\n| concurrency | objects | seconds | objects/s | peak RSS MiB |");
    println!("|---:|---:|---:|---:|---:|");
    for (round, concurrency) in [1usize, 4, 16].into_iter().enumerate() {
        // A new first key makes every stored value stale.
        let first = round as u8 + 2;
        let keys: Vec<u8> = std::iter::once(first).chain((1..first).rev()).collect();
        let text = config(&keys);
        write(&cfg_path, &text);
        let hash = storage_encryption::config_file_hash(text.as_bytes());
        loop {
            let m = api.metrics().await.unwrap();
            if rotator::metrics::config_hash(&m, &hash) == rotator::metrics::Observation::Proven {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        reset_peak();
        let mut checkpoint = Checkpoint::default();
        let settings = RewriteSettings {
            concurrency,
            ..RewriteSettings::default()
        };
        let t = Instant::now();
        let summary = rewrite::run(&api, &targets, &mut checkpoint, settings, &mut |_| Ok(()))
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(summary.updated as usize, n);
        println!(
            "| {concurrency} | {n} | {secs:.2} | {:.0} | {:.1} |",
            n as f64 / secs,
            peak_rss_mib()
        );
    }
}
