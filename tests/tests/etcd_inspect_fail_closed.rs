//! etcd-inspect fails closed: an audit that judged nothing never passes.
//! Real etcd, the real binary. Cases from issue 10: an apiserver prefix other
//! than `/registry`, a key under the prefix that maps to no resource, and an
//! empty prefix.
#![allow(clippy::unwrap_used)]

use atrest_tests::etcd::{EtcdServer, k8s_protobuf, run_etcd_inspect};
use base64::Engine;
use serde_json::json;
use storage_encryption::{EncryptionConfiguration, GroupResource, NoKms, transform_to_storage};

const GCM_KEY: [u8; 32] = [7; 32];

fn config_yaml() -> String {
    let k = base64::engine::general_purpose::STANDARD.encode(GCM_KEY);
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - aesgcm: {{keys: [{{name: k1, secret: {k}}}]}}\n      - identity: {{}}\n"
    )
}

fn encrypted_secret(etcd_key: &str) -> Vec<u8> {
    let cfg = EncryptionConfiguration::parse(&config_yaml()).unwrap();
    let providers = cfg
        .providers_for(&GroupResource::new("", "secrets"))
        .providers;
    transform_to_storage(
        &providers,
        &k8s_protobuf("v1", "Secret", b"s"),
        etcd_key.as_bytes(),
        &NoKms,
    )
    .unwrap()
}

struct Setup {
    etcd: EtcdServer,
    _dir: tempfile::TempDir,
    config: String,
}

fn setup() -> Setup {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wild.yaml");
    std::fs::write(&config, config_yaml()).unwrap();
    Setup {
        etcd,
        config: config.display().to_string(),
        _dir: dir,
    }
}

fn args(s: &Setup, extra: &[&str]) -> Vec<String> {
    s.etcd
        .etcdctl_args()
        .into_iter()
        .chain(["--config".to_owned(), s.config.clone()])
        .chain(extra.iter().map(|x| x.to_string()))
        .collect()
}

/// What kube-apiserver `--etcd-prefix=/wild` writes: 15 encrypted secrets.
fn put_wild(etcd: &EtcdServer) {
    let kvs: Vec<(String, Vec<u8>)> = (0..15)
        .map(|i| {
            let k = format!("/wild/secrets/ns{}/s{i}", i % 3);
            let v = encrypted_secret(&k);
            (k, v)
        })
        .collect();
    etcd.put_all(&kvs);
}

#[test]
fn another_apiserver_prefix_is_judged_when_only_prefix_is_given() {
    let s = setup();
    put_wild(&s.etcd);
    // A plaintext secret too, so the run has something to fail on.
    s.etcd.put(
        "/wild/secrets/ns0/plain",
        k8s_protobuf("v1", "Secret", b"p"),
    );

    let run = run_etcd_inspect(args(&s, &["--prefix", "/wild", "--output", "json"]));
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["etcd_prefix"], json!("/wild"));
    assert_eq!(doc["summary"]["keys"], json!(16));
    assert_eq!(doc["summary"]["judged"], json!(16));
    assert_eq!(doc["summary"]["findings"]["ok"], json!(15));
    assert_eq!(doc["summary"]["findings"]["plaintext"], json!(1));
    assert_eq!(doc["summary"]["findings"]["unmapped"], json!(0));
    let recs = run.records();
    let r = &recs["/wild/secrets/ns1/s1"];
    assert_eq!(r["resource"], json!("secrets"));
    assert_eq!(r["namespace"], json!("ns1"));
    assert_eq!(r["finding"], json!("ok"));

    // Only the 15 encrypted ones: a clean pass, exit 0.
    let run = run_etcd_inspect(args(&s, &["--prefix", "/wild/secrets/ns1"]));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("result: PASS"), "{}", run.stdout);
}

#[test]
fn nothing_mapped_exits_2_and_names_the_flag() {
    let s = setup();
    put_wild(&s.etcd);
    // The wrong apiserver prefix given explicitly: no key maps.
    for output in ["table", "json", "junit"] {
        let run = run_etcd_inspect(args(
            &s,
            &[
                "--prefix",
                "/wild",
                "--etcd-prefix",
                "/registry",
                "--output",
                output,
            ],
        ));
        assert_eq!(
            run.code,
            Some(2),
            "{output}: {}\n{}",
            run.stdout,
            run.stderr
        );
        assert!(
            run.stderr.contains("--etcd-prefix") && run.stderr.contains("nothing was judged"),
            "{output}: {}",
            run.stderr
        );
        match output {
            "table" => {
                assert!(run.stdout.contains("unmapped"), "{}", run.stdout);
                assert!(run.stdout.contains("result: ERROR"), "{}", run.stdout);
                assert!(!run.stdout.contains("PASS"), "{}", run.stdout);
            }
            "json" => {
                let doc = run.json();
                assert_eq!(doc["summary"]["result"], json!("error"));
                assert_eq!(doc["summary"]["judged"], json!(0));
                assert_eq!(doc["summary"]["findings"]["unmapped"], json!(15));
                assert_eq!(doc["summary"]["failing"], json!(15));
            }
            _ => {
                assert!(run.stdout.contains(r#"errors="1""#), "{}", run.stdout);
                assert!(run.stdout.contains(r#"type="unmapped""#), "{}", run.stdout);
                assert!(
                    run.stdout.contains(r#"type="nothing-judged""#),
                    "{}",
                    run.stdout
                );
            }
        }
    }
}

#[test]
fn a_key_that_maps_to_no_resource_is_an_unmapped_finding() {
    let s = setup();
    let k = "/registry/secrets/ns/a";
    s.etcd.put(k, encrypted_secret(k));
    s.etcd
        .put("/registry/no-such-thing", k8s_protobuf("v1", "Thing", b"t"));

    let run = run_etcd_inspect(args(&s, &["--output", "json"]));
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    let recs = run.records();
    let r = &recs["/registry/no-such-thing"];
    assert_eq!(r["finding"], json!("unmapped"));
    assert_eq!(r["resource"], json!(null));
    assert!(r["detail"].as_str().unwrap().contains("--etcd-prefix"));
    assert_eq!(recs[k]["finding"], json!("ok"));
    let doc = run.json();
    assert_eq!(doc["summary"]["findings"]["unmapped"], json!(1));
    assert_eq!(doc["summary"]["result"], json!("fail"));

    // The table counts it and names the key.
    let run = run_etcd_inspect(args(&s, &[]));
    assert_eq!(run.code, Some(1));
    assert!(
        run.stdout.contains("unmapped: /registry/no-such-thing"),
        "{}",
        run.stdout
    );
    // Not failing when the user says so: judged one key, nothing in --fail-on.
    let run = run_etcd_inspect(args(&s, &["--fail-on", "plaintext"]));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
}

#[test]
fn an_empty_prefix_exits_2() {
    let s = setup();
    s.etcd.put("/elsewhere/x", b"v");
    for output in ["table", "json", "junit"] {
        let run = run_etcd_inspect(args(&s, &["--output", output]));
        assert_eq!(
            run.code,
            Some(2),
            "{output}: {}\n{}",
            run.stdout,
            run.stderr
        );
        assert!(
            run.stderr.contains("no key under /registry"),
            "{output}: {}",
            run.stderr
        );
    }
    // Without a config too: nothing seen is never success.
    let run = run_etcd_inspect(s.etcd.etcdctl_args());
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
}
