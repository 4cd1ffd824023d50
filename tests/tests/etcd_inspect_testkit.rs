//! The etcd test kit itself: a real etcd starts (plain and with client-cert
//! auth), takes raw bytes, and the real `etcdctl` reads them back with the
//! same flags etcd-inspect gets.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use atrest_tests::etcd::EtcdServer;

fn etcdctl_get(etcd: &EtcdServer, key: &str) -> std::process::Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(etcd.etcdctl_args())
        .args(["get", key, "--print-value-only"])
        .output()
        .expect("run etcdctl (Debian package etcd-client)")
}

#[test]
fn plain_etcd_stores_raw_bytes() {
    let etcd = EtcdServer::start();
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    let value = b"k8s\0\x00\xffraw".to_vec();
    let rev = etcd.put("/registry/secrets/default/a", &value);
    assert!(rev > 1);
    let out = etcdctl_get(&etcd, "/registry/secrets/default/a");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, [value.as_slice(), b"\n"].concat());
}

#[test]
fn tls_etcd_requires_a_client_certificate() {
    let etcd = EtcdServer::start_tls();
    assert!(etcd.endpoint().starts_with("https://127.0.0.1:"));
    etcd.put("/registry/configmaps/default/c", b"v");
    let out = etcdctl_get(&etcd, "/registry/configmaps/default/c");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"v\n");

    // Same endpoint, CA only, no client certificate: refused.
    let tls = etcd.tls().unwrap();
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", etcd.endpoint(), "--cacert"])
        .arg(&tls.ca)
        .args([
            "--command-timeout",
            "3s",
            "get",
            "/registry/configmaps/default/c",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "etcd accepted a client without a certificate"
    );
}

#[test]
fn dropping_the_server_stops_etcd() {
    let etcd = EtcdServer::start();
    let endpoint = etcd.endpoint().to_owned();
    drop(etcd);
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &endpoint,
            "--dial-timeout",
            "1s",
            "--command-timeout",
            "2s",
            "get",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
