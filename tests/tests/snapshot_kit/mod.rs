//! Shared by the etcd snapshot tests: a dataset with history (overwrites,
//! deletes, a compaction, values larger than a page), `etcdctl snapshot
//! save`, `etcdctl get` as the ground truth, and a member etcd whose data dir
//! the test owns so its `member/snap/db` can be read after a clean stop.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atrest_tests::etcd::{ETCD_BIN, EtcdServer};
use base64::Engine;

/// One key as `etcdctl get -w json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetKv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
}

fn etcdctl(args: &[String]) -> std::process::Output {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(args)
        .output()
        .expect("run etcdctl (Debian package etcd-client)");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `etcdctl get --from-key '' -w json`: every key at the current revision,
/// and that revision.
pub fn etcdctl_get_all(endpoint_args: &[String]) -> (i64, Vec<GetKv>) {
    let mut args = endpoint_args.to_vec();
    args.extend(["get", "--from-key", "", "-w", "json"].map(String::from));
    let out = etcdctl(&args);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap()
    };
    let kvs = doc["kvs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|kv| GetKv {
                    key: b64(&kv["key"]),
                    value: b64(&kv["value"]),
                    create_revision: kv["create_revision"].as_i64().unwrap(),
                    mod_revision: kv["mod_revision"].as_i64().unwrap(),
                    version: kv["version"].as_i64().unwrap(),
                })
                .collect()
        })
        .unwrap_or_default();
    (doc["header"]["revision"].as_i64().unwrap(), kvs)
}

/// `etcdctl snapshot save PATH`.
pub fn snapshot_save(endpoint_args: &[String], path: &Path) {
    let mut args = endpoint_args.to_vec();
    args.extend(["snapshot".into(), "save".into(), path.display().to_string()]);
    etcdctl(&args);
}

fn value(i: usize, round: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i.wrapping_mul(31) ^ round.wrapping_mul(7) ^ j) as u8)
        .collect()
}

/// Writes a dataset with history through a real client: 300 keys, some
/// overwritten, some deleted (tombstones), one re-created, a physical
/// compaction in the middle, writes after it, and a few values larger than a
/// page (overflow pages). Returns the compaction revision.
pub fn write_history(etcd: &EtcdServer) -> i64 {
    let mut kvs: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| {
            let k = format!("/registry/secrets/ns{}/s{i:03}", i % 7);
            (k, value(i, 0, 100 + i % 50))
        })
        .collect();
    kvs.push(("/registry/configmaps/big/one".into(), value(1, 0, 20_000)));
    etcd.put_all(&kvs);
    // Overwrites: several revisions of the same keys.
    for round in 1..=3 {
        let over: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| (kvs[i].0.clone(), value(i, round, 120)))
            .collect();
        etcd.put_all(&over);
    }
    let keys: Vec<String> = kvs.iter().map(|(k, _)| k.clone()).collect();
    let ep = etcd.endpoint().to_owned();
    let opts = etcd.connect_options();
    let big = value(2, 1, 70_000);
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut c = etcd_client::Client::connect([ep], Some(opts))
                    .await
                    .unwrap();
                for k in &keys[100..120] {
                    c.delete(k.as_str(), None).await.unwrap();
                }
                // Deleted, then created again: a new create_revision.
                c.put(keys[100].as_str(), b"again".to_vec(), None)
                    .await
                    .unwrap();
                let rev = c
                    .put("/registry/events/ns/e1", b"ev".to_vec(), None)
                    .await
                    .unwrap()
                    .header()
                    .unwrap()
                    .revision();
                c.compact(
                    rev,
                    Some(etcd_client::CompactionOptions::new().with_physical()),
                )
                .await
                .unwrap();
                // After the compaction: history that a later compaction would drop.
                for k in &keys[120..130] {
                    c.delete(k.as_str(), None).await.unwrap();
                }
                for k in &keys[0..10] {
                    c.put(k.as_str(), b"after-compaction".to_vec(), None)
                        .await
                        .unwrap();
                }
                c.put("/registry/configmaps/big/two", big, None)
                    .await
                    .unwrap();
                rev
            })
    })
    .join()
    .unwrap()
}

/// An etcd whose data dir the test owns; `stop()` ends it cleanly (SIGTERM)
/// so `member/snap/db` holds every write.
pub struct MemberEtcd {
    child: Option<Child>,
    pub endpoint_args: Vec<String>,
    pub data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl MemberEtcd {
    pub fn start() -> Self {
        assert!(
            Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} is missing: these tests need a real etcd"
        );
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let port = |_: ()| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (cp, pp) = (port(()), port(()));
        let client = format!("http://127.0.0.1:{cp}");
        let peer = format!("http://127.0.0.1:{pp}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let child = Command::new(ETCD_BIN)
            .arg("--name=member")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=member={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let endpoint_args = vec!["--endpoints".to_owned(), client];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut a = endpoint_args.clone();
            a.extend(["endpoint", "health"].map(String::from));
            let ok = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(&a)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "member etcd did not become healthy: {}",
                std::fs::read_to_string(dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        MemberEtcd {
            child: Some(child),
            endpoint_args,
            data_dir,
            _dir: dir,
        }
    }

    pub fn put(&self, key: &str, value: &str) {
        let mut a = self.endpoint_args.clone();
        a.extend(["put".to_owned(), key.to_owned(), value.to_owned()]);
        etcdctl(&a);
    }

    pub fn del(&self, key: &str) {
        let mut a = self.endpoint_args.clone();
        a.extend(["del".to_owned(), key.to_owned()]);
        etcdctl(&a);
    }

    /// Stops etcd with SIGTERM and waits; returns `member/snap/db`.
    pub fn stop(&mut self) -> PathBuf {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            c.wait().unwrap();
        }
        self.data_dir.join("member/snap/db")
    }
}

impl Drop for MemberEtcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
