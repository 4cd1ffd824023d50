//! etcd-inspect's output is safe for a terminal, and its verdicts are only
//! verdicts: etcd keys, key names and KMS keyIDs that someone wrote into etcd
//! are printed escaped in the table and on stderr; a KMS plugin that hangs or
//! stops in the middle of a `--decrypt-check` scan is an error (exit 2,
//! "nothing judged past key X"), never a list of `decrypt-failed` findings.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use atrest_tests::etcd::{EtcdServer, k8s_protobuf, run_etcd_inspect};
use atrest_tests::plugin::{PluginOptions, PluginProcess, SocketEndpoint, bin_path, encrypt};
use base64::Engine;
use nix::sys::signal::Signal;
use storage_encryption::format::kmsv2::{self, KmsV2WriteKey};
use storage_encryption::{EncryptionConfiguration, GroupResource, Seed, transform_to_storage};

fn key(n: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

fn config_file(dir: &std::path::Path, body: &str) -> String {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n{body}"
        ),
    )
    .unwrap();
    path.display().to_string()
}

#[test]
fn table_and_stderr_escape_what_etcd_holds() {
    let etcd = EtcdServer::start();
    let evil_key = "/registry/secrets/default/x\u{1b}[2J\u{1b}]0;owned\u{7}\nFORGED";
    let evil_name = "k\u{1b}[31m";
    // A KMS v2 value whose keyID carries escapes (stored as is by whoever wrote etcd).
    let write_key = KmsV2WriteKey {
        seed: Seed::from_slice(&[7; 32]).unwrap(),
        encrypted_dek_source: vec![1; 40],
        key_id: "kid\u{1b}[5m\r\nFORGED-ID".to_owned(),
        annotations: BTreeMap::new(),
    };
    let kms_key = "/registry/secrets/default/kms";
    let mut kms_value = b"k8s:enc:kms:v2:p:".to_vec();
    kms_value.extend(kmsv2::seal(&write_key, b"x", kms_key.as_bytes()).unwrap());
    etcd.put_all(&[
        (
            evil_key.as_bytes().to_vec(),
            k8s_protobuf("v1", "Secret", b"plain"),
        ),
        (
            b"/registry/secrets/default/named".to_vec(),
            format!("k8s:enc:aescbc:v1:{evil_name}:{}", "A".repeat(32)).into_bytes(),
        ),
        (kms_key.as_bytes().to_vec(), kms_value),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        &format!(
            "      - kms: {{apiVersion: v2, name: p, endpoint: unix:///nonexistent.sock}}\n      - aesgcm: {{keys: [{{name: g, secret: {}}}]}}\n",
            key(1)
        ),
    );
    let run = run_etcd_inspect(etcd.etcdctl_args().into_iter().chain([
        "--config".to_owned(),
        config,
        "--kms-key-id".to_owned(),
        "p=current".to_owned(),
    ]));
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    for (stream, text) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
        assert!(!text.contains('\u{1b}'), "raw ESC on {stream}:\n{text:?}");
        assert!(!text.contains('\u{7}'), "raw BEL on {stream}:\n{text:?}");
        assert!(!text.contains('\r'), "raw CR on {stream}:\n{text:?}");
        assert!(
            !text.lines().any(|l| l.starts_with("FORGED")),
            "a stored value started a line on {stream}:\n{text}"
        );
    }
    // The escaped forms are there: the reader can still see what is stored.
    assert!(
        run.stdout
            .contains("x\\u{1b}[2J\\u{1b}]0;owned\\u{7}\\nFORGED"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("aescbc/k\\u{1b}[31m"), "{}", run.stdout);
    assert!(
        run.stdout.contains("kid\\u{1b}[5m\\r\\nFORGED-ID"),
        "{}",
        run.stdout
    );
    // JSON stays JSON (its own escaping), with the exact stored key.
    let json = run_etcd_inspect(
        etcd.etcdctl_args()
            .into_iter()
            .chain(["--output".to_owned(), "json".to_owned()]),
    );
    assert!(json.records().contains_key(evil_key), "{}", json.stdout);
}

fn unix_endpoint(e: &SocketEndpoint) -> String {
    match e {
        SocketEndpoint::File(p) => format!("unix://{}", p.display()),
        SocketEndpoint::Abstract(_) => e.listen_arg(),
    }
}

/// Sockets in /proc/net/unix bound to `path` (the listener, and one per
/// connection the kernel accepted for it, even while the plugin is stopped).
fn sockets_at(path: &std::path::Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    // /proc/net/unix shows the path a socket was bound at. The plugin binds in
    // a private directory `.k*` beside the final path and renames the socket
    // into place, so the listener and its accepted connections show
    // `<dir>/.k*/<short name>`.
    let dir = path.parent().unwrap();
    let bound_privately = |p: &std::path::Path| {
        p.parent().is_some_and(|private| {
            private.parent() == Some(dir)
                && private
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".k"))
        })
    };
    table
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(std::path::Path::new)
        .filter(|p| *p == path || bound_privately(p))
        .count()
}

/// Five aesgcm values (judged without the plugin), then five KMS v2 values
/// each with its own seed (each needs a plugin Decrypt). Returns the etcd,
/// the config path and the plugin's key_id.
async fn outage_setup(
    plugin: &PluginProcess,
    dir: &std::path::Path,
    kms_timeout: &str,
) -> (EtcdServer, String, String) {
    let etcd = EtcdServer::start();
    let config = config_file(
        dir,
        &format!(
            "      - kms: {{apiVersion: v2, name: plugin-a, endpoint: \"{}\", timeout: {kms_timeout}}}\n      - aesgcm: {{keys: [{{name: g, secret: {}}}]}}\n",
            unix_endpoint(plugin.endpoint()),
            key(1)
        ),
    );
    let parsed =
        EncryptionConfiguration::parse(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let providers = parsed
        .providers_for(&GroupResource::new("", "secrets"))
        .providers;
    let gcm_only = &providers[1..];
    let mut kvs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut key_id = String::new();
    for i in 0..5 {
        let k = format!("/registry/secrets/app/a-{i}");
        let v = transform_to_storage(
            gcm_only,
            &k8s_protobuf("v1", "Secret", b"x"),
            k.as_bytes(),
            &storage_encryption::NoKms,
        )
        .unwrap();
        kvs.push((k, v));
    }
    for i in 0..5 {
        let seed = Seed::random().unwrap();
        let resp = encrypt(&plugin.client(), seed.expose()).await.unwrap();
        key_id = resp.key_id.clone();
        let write: BTreeMap<String, KmsV2WriteKey> = [(
            "plugin-a".to_owned(),
            KmsV2WriteKey {
                seed,
                encrypted_dek_source: resp.ciphertext,
                key_id: resp.key_id,
                annotations: BTreeMap::new(),
            },
        )]
        .into();
        let k = format!("/registry/secrets/app/k-{i}");
        let v = transform_to_storage(
            &providers,
            &k8s_protobuf("v1", "Secret", b"y"),
            k.as_bytes(),
            &write,
        )
        .unwrap();
        kvs.push((k, v));
    }
    etcd.put_all(&kvs);
    (etcd, config, key_id)
}

fn spawn_inspect(etcd: &EtcdServer, config: &str, key_id: &str) -> std::process::Child {
    Command::new(bin_path("etcd-inspect"))
        .args(etcd.etcdctl_args())
        .args(["--config", config, "--decrypt-check", "--output", "json"])
        .args(["--kms-key-id", &format!("plugin-a={key_id}")])
        .env_remove("ATREST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn assert_outage(out: &std::process::Output, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{why}: {stderr}");
    assert!(
        stderr.contains("nothing judged past key /registry/secrets/app/a-4"),
        "{why}: {stderr}"
    );
    assert!(
        stderr.contains("failed at key /registry/secrets/app/k-0"),
        "{why}: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("decrypt-failed"), "{why}: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_hangs_mid_scan_is_an_error_not_findings() {
    let plugin = PluginProcess::start(PluginOptions::new()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (etcd, config, key_id) = outage_setup(&plugin, dir.path(), "1s").await;
    // Sanity: with the plugin answering, every value is judged ok.
    let ok = spawn_inspect(&etcd, &config, &key_id)
        .wait_with_output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    plugin.signal(Signal::SIGSTOP).unwrap();
    let out = spawn_inspect(&etcd, &config, &key_id)
        .wait_with_output()
        .unwrap();
    plugin.signal(Signal::SIGCONT).unwrap();
    assert_outage(&out, "SIGSTOP");
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        stderr.contains("timed out") || stderr.contains("timeout expired"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_killed_mid_scan_is_an_error_not_findings() {
    let plugin = PluginProcess::start(PluginOptions::new()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A long timeout: the failure must come from the kill, not the clock.
    let (etcd, config, key_id) = outage_setup(&plugin, dir.path(), "60s").await;
    let SocketEndpoint::File(socket) = plugin.endpoint().clone() else {
        panic!("the default transport is a socket file");
    };
    // Stopped, the plugin cannot answer, but the kernel still accepts
    // etcd-inspect's connection: wait for it, then kill the plugin.
    plugin.signal(Signal::SIGSTOP).unwrap();
    let before = sockets_at(&socket);
    let child = spawn_inspect(&etcd, &config, &key_id);
    let connected = (0..600).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        sockets_at(&socket) > before
    });
    assert!(connected, "etcd-inspect never connected to the plugin");
    plugin.signal(Signal::SIGKILL).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_outage(&out, "SIGKILL");
}
