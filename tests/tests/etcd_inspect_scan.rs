//! The scan engine's cost and guarantees on a real etcd 3.4: linear in the
//! number of keys (counted, never timed), pinned to one revision, a value
//! larger than the byte budget still read, `--page-size` respected.
//!
//! The cost is what etcd 3.4 walks in its index: the `count` of every range
//! request. The real binary logs its scan counters at `ATREST_LOG=info`; the
//! engine's [`ScanStats`] expose the same numbers to library callers.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use atrest_tests::etcd::{EtcdServer, k8s_protobuf};
use etcd_client::DeleteOptions;
use etcd_inspect::etcd::EtcdConnection;
use etcd_inspect::scan::{Scan, ScanOptions, ScanStats};

/// Keys in the one big resource.
const BIG: usize = 20_000;

fn configmap(i: usize) -> (String, Vec<u8>) {
    let name = format!("cm-{i:06}");
    let raw = format!("name={name};data=small");
    (
        format!("/registry/configmaps/big/{name}"),
        k8s_protobuf("v1", "ConfigMap", raw.as_bytes()),
    )
}

/// One resource of `BIG` keys plus a few sparse ones around it.
fn seed_big(etcd: &EtcdServer) -> Vec<String> {
    let mut kvs: Vec<(String, Vec<u8>)> = (0..BIG).map(configmap).collect();
    for (i, res) in [
        "apiregistration.k8s.io/apiservices",
        "namespaces",
        "secrets",
    ]
    .iter()
    .enumerate()
    {
        for j in 0..5 {
            kvs.push((
                format!("/registry/{res}/n{j}"),
                k8s_protobuf("v1", "Thing", format!("{i}-{j}").as_bytes()),
            ));
        }
    }
    put_all_keys(etcd, kvs)
}

/// Writes `kvs` and returns their keys as a scan yields them: sorted, once each.
fn put_all_keys(etcd: &EtcdServer, kvs: Vec<(String, Vec<u8>)>) -> Vec<String> {
    etcd.put_all(&kvs);
    let mut keys: Vec<String> = kvs.into_iter().map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    keys
}

struct Run {
    code: Option<i32>,
    keys: Vec<String>,
    stats: ScanStats,
    stderr: String,
}

/// Runs the audit with `extra` flags, checks that it succeeded and read
/// every one of `keys` once, in key order, and returns its scan counters.
fn scan_every_key(etcd: &EtcdServer, keys: &[String], extra: &[&str]) -> ScanStats {
    let run = inspect(etcd, extra);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.keys, keys, "every key once, in key order");
    eprintln!("{extra:?}: {:?}", run.stats);
    run.stats
}

/// Runs the real binary with the scan counters logged.
fn inspect(etcd: &EtcdServer, extra: &[&str]) -> Run {
    let out = Command::new(atrest_tests::plugin::bin_path("etcd-inspect"))
        .args(etcd.etcdctl_args())
        .args(["--output", "json", "--fail-on", "none"])
        .args(extra)
        .env("ATREST_LOG", "etcd_inspect=info")
        .stdin(Stdio::null())
        .output()
        .expect("run etcd-inspect");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}); stderr:\n{stderr}"));
    let keys = doc["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_owned())
        .collect();
    let line = stderr
        .lines()
        .find(|l| l.contains("etcd scan finished"))
        .unwrap_or_else(|| panic!("no scan counters in stderr:\n{stderr}"));
    let field = |name: &str| -> u64 {
        let at = line
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("{name} missing in {line}"));
        line[at + name.len() + 2..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let stats = ScanStats {
        requests: field("requests"),
        keys: field("keys"),
        bytes: field("bytes"),
        range_keys: field("range_keys"),
        max_range_keys: field("max_range_keys"),
        max_page_keys: field("max_page_keys"),
    };
    Run {
        code: out.status.code(),
        keys,
        stats,
        stderr,
    }
}

#[test]
fn scan_cost_stays_linear_in_one_big_resource() {
    let etcd = EtcdServer::start();
    let keys = seed_big(&etcd);
    let n = keys.len() as u64;

    // Fixed pages of 500 keys: paging [from, end) with a limit, as before,
    // makes etcd 3.4 walk n²/(2·500) ≈ 20·n index entries here; sized
    // windows 3.85·n (4.40·n before the planner learned key positions).
    let s = scan_every_key(&etcd, &keys, &["--page-size", "500"]);
    assert_eq!(s.keys, n);
    assert!(
        s.range_keys <= 4 * n,
        "etcd walked {} index entries for {n} keys: not linear ({s:?})",
        s.range_keys
    );
    // About one request per 0.7 page, plus the crossings between sparse
    // resources and a few corrections.
    assert!(
        s.requests >= n / 500 && s.requests <= 3 * n / 500 + 40,
        "{} requests for {n} keys in pages of 500 ({s:?})",
        s.requests
    );
    assert!(s.max_page_keys <= 500, "--page-size 500 exceeded: {s:?}");

    // Pages sized by the default byte budget: the same keys, also linear.
    let s = scan_every_key(&etcd, &keys, &[]);
    // The first request counts every key once, the windows once more.
    assert!(s.range_keys <= 2 * n, "not linear: {s:?}");
}

/// Kube-shaped keys: `/registry/{secrets,configmaps}/ns-NNN/app-N-kind-xxxxx`
/// over 500 namespaces, names from kube's generated-name alphabet.
fn kube_shaped(n: usize) -> Vec<(String, Vec<u8>)> {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut below = move |m: u64| {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D) % m
    };
    (0..n)
        .map(|_| {
            let ns = below(500);
            let app = below(40);
            let suffix: String = (0..5)
                .map(|_| ALPHABET[below(27) as usize] as char)
                .collect();
            let (res, kind) = if below(10) < 4 {
                ("configmaps", "config")
            } else {
                ("secrets", "token")
            };
            let key = format!("/registry/{res}/ns-{ns:03}/app-{app}-{kind}-{suffix}");
            let value = k8s_protobuf("v1", "Thing", format!("{key};data=small").as_bytes());
            (key, value)
        })
        .collect()
}

/// Namespaces `ns-000` … `ns-499`: key space with a gap after every
/// `ns-..9` (`ns-00:` … `ns-00\xff` hold nothing). The planner learns which
/// bytes each position holds, so a window that ends a namespace decade is
/// sized from `ns-010`, not grown across the gap into the decades beyond.
#[test]
fn scan_cost_stays_low_across_namespace_gaps() {
    let etcd = EtcdServer::start();
    let keys = put_all_keys(&etcd, kube_shaped(20_000));
    let n = keys.len() as u64;
    // Pages of 500 keys: a window holds about ten namespaces of 40 keys.
    // 3.40 entries counted per key; 5.34 when windows grew across the gaps.
    let s = scan_every_key(&etcd, &keys, &["--page-size", "500"]);
    assert!(
        s.range_keys <= 4 * n,
        "etcd walked {} index entries for {n} keys ({s:?})",
        s.range_keys
    );
    assert!(s.max_page_keys <= 500, "--page-size 500 exceeded: {s:?}");
}

#[test]
fn page_size_override_is_respected() {
    let etcd = EtcdServer::start();
    let kvs: Vec<(String, Vec<u8>)> = (0..200).map(configmap).collect();
    etcd.put_all(&kvs);
    let run = inspect(&etcd, &["--page-size", "7"]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.keys.len(), 200);
    let s = run.stats;
    assert!(s.max_page_keys <= 7, "{s:?}");
    assert!(s.requests >= 200 / 7, "{s:?}");
}

#[test]
fn value_larger_than_the_page_budget_is_read() {
    let etcd = EtcdServer::start();
    // etcd's default request limit (1.5 MiB) bounds a value; the CLI reads it
    // with the default 4 MiB budget, the library below with 16 KiB.
    let big = k8s_protobuf("v1", "ConfigMap", &vec![b'x'; 1_400_000]);
    let mut kvs: Vec<(String, Vec<u8>)> = (0..50).map(configmap).collect();
    kvs.push(("/registry/configmaps/big/cm-000025x".into(), big.clone()));
    etcd.put_all(&kvs);
    let run = inspect(&etcd, &[]);
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(run.keys.len(), 51);
    assert!(
        run.keys
            .contains(&"/registry/configmaps/big/cm-000025x".to_owned())
    );
    assert!(run.stats.bytes >= big.len() as u64);

    // Through the library with a budget far below the value.
    let conn = connection(&etcd);
    let got = block_on(async move {
        let kv = conn.kv_client().await.unwrap();
        let mut scan = Scan::start(
            kv,
            conn.endpoints_display(),
            b"/registry/".to_vec(),
            ScanOptions {
                page_keys: None,
                page_bytes: 16 * 1024,
            },
        );
        let mut sizes = Vec::new();
        while let Some(page) = scan.next_page().await {
            sizes.extend(page.unwrap().kvs.into_iter().map(|kv| kv.value.len()));
        }
        sizes
    });
    assert_eq!(got.len(), 51);
    assert!(got.contains(&big.len()));
}

#[test]
fn scan_stays_pinned_to_its_first_revision() {
    let etcd = EtcdServer::start();
    let kvs: Vec<(String, Vec<u8>)> = (0..3000).map(configmap).collect();
    let rev = etcd.put_all(&kvs);
    let conn = connection(&etcd);
    let endpoint = etcd.endpoint().to_owned();
    let (revision, seen, first_page) = block_on(async move {
        let kv = conn.kv_client().await.unwrap();
        let mut scan = Scan::start(
            kv,
            conn.endpoints_display(),
            b"/registry/".to_vec(),
            ScanOptions::keys(100),
        );
        let first = scan.next_page().await.unwrap().unwrap();
        let revision = first.revision;
        let first_page = first.kvs.len();
        let mut seen: Vec<Vec<u8>> = first.kvs.into_iter().map(|kv| kv.key).collect();
        // While the scan is under way: delete keys it has not reached, add
        // new ones after its position, overwrite one.
        let mut c = etcd_client::Client::connect([endpoint], None)
            .await
            .unwrap();
        c.delete(
            "/registry/configmaps/big/cm-0020",
            Some(DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
        for i in 0..50 {
            c.put(format!("/registry/configmaps/big/new-{i:03}"), "v", None)
                .await
                .unwrap();
        }
        c.put("/registry/configmaps/big/cm-002500", "changed", None)
            .await
            .unwrap();
        while let Some(page) = scan.next_page().await {
            let page = page.unwrap();
            assert_eq!(page.revision, revision, "every page at the first revision");
            for kv in page.kvs {
                if kv.key == b"/registry/configmaps/big/cm-002500" {
                    assert_ne!(
                        kv.value, b"changed",
                        "a write after the scan began was read"
                    );
                }
                seen.push(kv.key);
            }
        }
        (revision, seen, first_page)
    });
    assert_eq!(revision, rev);
    assert!(
        first_page < 3000,
        "the scan must still be under way when writing"
    );
    let expected: Vec<Vec<u8>> = {
        let mut k: Vec<Vec<u8>> = kvs.into_iter().map(|(k, _)| k.into_bytes()).collect();
        k.sort();
        k
    };
    assert_eq!(
        seen, expected,
        "exactly the keys of the first revision, in order"
    );
}

fn connection(etcd: &EtcdServer) -> EtcdConnection {
    EtcdConnection {
        endpoints: vec![etcd.endpoint().to_owned()],
        cacert: None,
        cert: None,
        key: None,
        dial_timeout: std::time::Duration::from_secs(5),
        command_timeout: std::time::Duration::from_secs(30),
    }
}

fn block_on<T: Send + 'static>(fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(fut)
    })
    .join()
    .unwrap()
}

/// The log without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
