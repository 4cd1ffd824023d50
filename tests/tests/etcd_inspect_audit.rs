//! etcd-inspect against a real etcd and a real kms-plugin: values of every
//! provider and every finding, written by storage-encryption's encoders under
//! realistic keys; the JSON report checked record by record; exit codes and
//! `--fail-on`; a wildcard config; TLS with client certificates.
#![allow(clippy::unwrap_used)]

use atrest_tests::etcd::{EtcdServer, k8s_protobuf, run_etcd_inspect};
use atrest_tests::inspect::{key, kms_write_key, unix_endpoint, write_with};
use atrest_tests::plugin::{PluginOptions, PluginProcess};
use serde_json::{Value, json};
use storage_encryption::KmsV2WriteKey;

fn secret_pb(name: &str) -> Vec<u8> {
    k8s_protobuf(
        "v1",
        "Secret",
        format!("secret {name} data: s3cr3t-CANARY").as_bytes(),
    )
}

/// One expected record.
struct Expect {
    key: &'static str,
    value: Vec<u8>,
    resource: Option<&'static str>,
    namespace: Option<&'static str>,
    name: Option<&'static str>,
    provider: Option<&'static str>,
    provider_name: Option<&'static str>,
    key_name: Option<&'static str>,
    key_id: Option<String>,
    finding: Option<&'static str>,
}

#[allow(clippy::too_many_arguments)]
fn e(
    key: &'static str,
    value: Vec<u8>,
    resource: Option<&'static str>,
    namespace: Option<&'static str>,
    name: Option<&'static str>,
    provider: (
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
    ),
    key_id: Option<String>,
    finding: Option<&'static str>,
) -> Expect {
    Expect {
        key,
        value,
        resource,
        namespace,
        name,
        provider: provider.0,
        provider_name: provider.1,
        key_name: provider.2,
        key_id,
        finding,
    }
}

fn audit_config(kms_endpoint: &str) -> String {
    format!(
        r#"apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms: {{apiVersion: v2, name: plugin-a, endpoint: "{kms_endpoint}", timeout: 3s}}
      - aesgcm: {{keys: [{{name: gcm1, secret: {k1}}}, {{name: gcm0, secret: {k0}}}]}}
      - aescbc: {{keys: [{{name: cbc1, secret: {k2}}}]}}
      - secretbox: {{keys: [{{name: sb1, secret: {k3}}}]}}
      - identity: {{}}
  - resources: [configmaps]
    providers:
      - aesgcm: {{keys: [{{name: gcm1, secret: {k1}}}]}}
      - identity: {{}}
  - resources: [services, customresourcedefinitions.apiextensions.k8s.io]
    providers:
      - aescbc: {{keys: [{{name: cbc1, secret: {k2}}}]}}
  - resources: [widgets.stable.example.com]
    providers:
      - secretbox: {{keys: [{{name: sb1, secret: {k3}}}]}}
      - identity: {{}}
"#,
        k0 = key(0),
        k1 = key(1),
        k2 = key(2),
        k3 = key(3),
    )
}

fn check_records(run: &atrest_tests::etcd::InspectRun, expects: &[Expect]) {
    let records = run.records();
    assert_eq!(
        records.len(),
        expects.len(),
        "record count; stdout:\n{}",
        run.stdout
    );
    for x in expects {
        let r = records
            .get(x.key)
            .unwrap_or_else(|| panic!("no record for {}", x.key));
        let got = json!({
            "resource": r["resource"], "namespace": r["namespace"], "name": r["name"],
            "provider": r["provider"], "provider_name": r["provider_name"], "key_name": r["key_name"],
            "key_id": r["key_id"], "finding": r["finding"],
        });
        let want = json!({
            "resource": x.resource, "namespace": x.namespace, "name": x.name,
            "provider": x.provider, "provider_name": x.provider_name, "key_name": x.key_name,
            "key_id": x.key_id, "finding": x.finding,
        });
        assert_eq!(got, want, "record for {}: {r}", x.key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_every_provider_and_finding_record_by_record() {
    let plugin = PluginProcess::start(PluginOptions::new()).await.unwrap();
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("encryption-config.yaml");
    std::fs::write(
        &config_path,
        audit_config(&unix_endpoint(plugin.endpoint())),
    )
    .unwrap();

    // A KMS v2 value written before a KEK rotation: kms-key-stale afterwards.
    let old_key = kms_write_key(&plugin).await;
    let old_key_id = old_key.key_id.clone();
    let k_rotated = "/registry/secrets/prod/api-token";
    let rotated = write_with(
        "kms: {apiVersion: v2, name: plugin-a, endpoint: unix:///x.sock}",
        k_rotated,
        &secret_pb("api-token"),
        Some(&old_key),
    );
    plugin.keyring().rotate().await.unwrap();
    let new_key_id = plugin.wait_for_key_id_change(&old_key_id).await.unwrap();
    assert_ne!(new_key_id, old_key_id);
    let current = kms_write_key(&plugin).await;
    assert_eq!(current.key_id, new_key_id);

    let kms_a = "kms: {apiVersion: v2, name: plugin-a, endpoint: unix:///x.sock}";
    let kms_b = "kms: {apiVersion: v2, name: plugin-b, endpoint: unix:///x.sock}";
    let gcm =
        |name: &str, n: u8| format!("aesgcm: {{keys: [{{name: {name}, secret: {}}}]}}", key(n));
    let cbc = format!("aescbc: {{keys: [{{name: cbc1, secret: {}}}]}}", key(2));
    let sbox = format!("secretbox: {{keys: [{{name: sb1, secret: {}}}]}}", key(3));

    let kv2 = |k: &'static str, wk: &KmsV2WriteKey, prov: &str| {
        write_with(prov, k, &secret_pb(k), Some(wk))
    };
    let loc = |k: &'static str, prov: &str, plain: Vec<u8>| write_with(prov, k, &plain, None);
    let crd_json = br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition","metadata":{"name":"widgets.stable.example.com"}}
"#
    .to_vec();
    let widget_json = |n: &str| {
        format!("{{\"apiVersion\":\"stable.example.com/v1\",\"kind\":\"Widget\",\"metadata\":{{\"name\":\"{n}\",\"namespace\":\"default\"}}}}\n").into_bytes()
    };
    let mut truncated_pb = secret_pb("t");
    truncated_pb.truncate(12);
    let mut garbage_kms = b"k8s:enc:kms:v2:plugin-a:".to_vec();
    garbage_kms.extend_from_slice(&[0xff, 0x01, 0x02, 0x03, 0x04]);

    let id = (Some("identity"), None, None);
    let expects = vec![
        // secrets: the config writes kms-v2/plugin-a.
        e(
            "/registry/secrets/prod/db-password",
            kv2("/registry/secrets/prod/db-password", &current, kms_a),
            Some("secrets"),
            Some("prod"),
            Some("db-password"),
            (Some("kms-v2"), Some("plugin-a"), None),
            Some(new_key_id.clone()),
            Some("ok"),
        ),
        e(
            k_rotated,
            rotated,
            Some("secrets"),
            Some("prod"),
            Some("api-token"),
            (Some("kms-v2"), Some("plugin-a"), None),
            Some(old_key_id.clone()),
            Some("kms-key-stale"),
        ),
        e(
            "/registry/secrets/prod/gcm-first-key",
            loc(
                "/registry/secrets/prod/gcm-first-key",
                &gcm("gcm1", 1),
                secret_pb("a"),
            ),
            Some("secrets"),
            Some("prod"),
            Some("gcm-first-key"),
            (Some("aesgcm"), None, Some("gcm1")),
            None,
            Some("stale"),
        ),
        e(
            "/registry/secrets/prod/gcm-second-key",
            loc(
                "/registry/secrets/prod/gcm-second-key",
                &gcm("gcm0", 0),
                secret_pb("b"),
            ),
            Some("secrets"),
            Some("prod"),
            Some("gcm-second-key"),
            (Some("aesgcm"), None, Some("gcm0")),
            None,
            Some("stale"),
        ),
        e(
            "/registry/secrets/prod/cbc",
            loc("/registry/secrets/prod/cbc", &cbc, secret_pb("c")),
            Some("secrets"),
            Some("prod"),
            Some("cbc"),
            (Some("aescbc"), None, Some("cbc1")),
            None,
            Some("stale"),
        ),
        e(
            "/registry/secrets/prod/sbox",
            loc("/registry/secrets/prod/sbox", &sbox, secret_pb("d")),
            Some("secrets"),
            Some("prod"),
            Some("sbox"),
            (Some("secretbox"), None, Some("sb1")),
            None,
            Some("stale"),
        ),
        e(
            "/registry/secrets/dev/plain",
            secret_pb("plain"),
            Some("secrets"),
            Some("dev"),
            Some("plain"),
            id,
            None,
            Some("plaintext"),
        ),
        e(
            "/registry/secrets/dev/removed-key",
            loc(
                "/registry/secrets/dev/removed-key",
                &gcm("gcm-retired", 9),
                secret_pb("e"),
            ),
            Some("secrets"),
            Some("dev"),
            Some("removed-key"),
            (Some("aesgcm"), None, Some("gcm-retired")),
            None,
            Some("unreadable"),
        ),
        e(
            "/registry/secrets/dev/other-plugin",
            kv2("/registry/secrets/dev/other-plugin", &current, kms_b),
            Some("secrets"),
            Some("dev"),
            Some("other-plugin"),
            (Some("kms-v2"), Some("plugin-b"), None),
            Some(new_key_id.clone()),
            Some("unreadable"),
        ),
        e(
            "/registry/secrets/dev/truncated-gcm",
            [b"k8s:enc:aesgcm:v1:gcm1:".as_slice(), &[1, 2, 3, 4, 5]].concat(),
            Some("secrets"),
            Some("dev"),
            Some("truncated-gcm"),
            (Some("aesgcm"), None, Some("gcm1")),
            None,
            Some("undecodable"),
        ),
        e(
            "/registry/secrets/dev/bad-kms-object",
            garbage_kms,
            Some("secrets"),
            Some("dev"),
            Some("bad-kms-object"),
            (Some("kms-v2"), Some("plugin-a"), None),
            None,
            Some("undecodable"),
        ),
        e(
            "/registry/secrets/dev/truncated-protobuf",
            truncated_pb,
            Some("secrets"),
            Some("dev"),
            Some("truncated-protobuf"),
            id,
            None,
            Some("undecodable"),
        ),
        e(
            "/registry/secrets/dev/unknown-provider",
            b"k8s:enc:rot13:v1:k:abc".to_vec(),
            Some("secrets"),
            Some("dev"),
            Some("unknown-provider"),
            (None, None, None),
            None,
            Some("undecodable"),
        ),
        // configmaps: aesgcm/gcm1 then identity.
        e(
            "/registry/configmaps/kube-system/cluster-info",
            loc(
                "/registry/configmaps/kube-system/cluster-info",
                &gcm("gcm1", 1),
                k8s_protobuf("v1", "ConfigMap", b"ci"),
            ),
            Some("configmaps"),
            Some("kube-system"),
            Some("cluster-info"),
            (Some("aesgcm"), None, Some("gcm1")),
            None,
            Some("ok"),
        ),
        e(
            "/registry/configmaps/default/plain",
            k8s_protobuf("v1", "ConfigMap", b"x"),
            Some("configmaps"),
            Some("default"),
            Some("plain"),
            id,
            None,
            Some("plaintext"),
        ),
        e(
            "/registry/configmaps/default/junk",
            vec![0x13, 0x37, 0x00, 0xfe, 0x99, 0x42],
            Some("configmaps"),
            Some("default"),
            Some("junk"),
            id,
            None,
            Some("undecodable"),
        ),
        // services (key path services/specs) and the CRD: aescbc only.
        e(
            "/registry/services/specs/default/web",
            loc(
                "/registry/services/specs/default/web",
                &cbc,
                k8s_protobuf("v1", "Service", b"svc"),
            ),
            Some("services"),
            Some("default"),
            Some("web"),
            (Some("aescbc"), None, Some("cbc1")),
            None,
            Some("ok"),
        ),
        e(
            "/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.stable.example.com",
            loc(
                "/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.stable.example.com",
                &cbc,
                crd_json,
            ),
            Some("customresourcedefinitions.apiextensions.k8s.io"),
            None,
            Some("widgets.stable.example.com"),
            (Some("aescbc"), None, Some("cbc1")),
            None,
            Some("ok"),
        ),
        // events: no rule, identity is what the apiserver writes.
        e(
            "/registry/events/default/web.17a0000000000000",
            k8s_protobuf("v1", "Event", b"ev"),
            Some("events"),
            Some("default"),
            Some("web.17a0000000000000"),
            id,
            None,
            Some("ok"),
        ),
        // a custom resource: secretbox first, identity second.
        e(
            "/registry/stable.example.com/widgets/default/w1",
            loc(
                "/registry/stable.example.com/widgets/default/w1",
                &sbox,
                widget_json("w1"),
            ),
            Some("widgets.stable.example.com"),
            Some("default"),
            Some("w1"),
            (Some("secretbox"), None, Some("sb1")),
            None,
            Some("ok"),
        ),
        e(
            "/registry/stable.example.com/widgets/default/w2",
            widget_json("w2"),
            Some("widgets.stable.example.com"),
            Some("default"),
            Some("w2"),
            id,
            None,
            Some("plaintext"),
        ),
        // a key that maps to no resource: not judged, so a finding (fail closed).
        e(
            "/registry/not-a-resource",
            k8s_protobuf("v1", "Thing", b"t"),
            None,
            None,
            None,
            id,
            None,
            Some("unmapped"),
        ),
    ];
    let kvs: Vec<(&str, &[u8])> = expects
        .iter()
        .map(|x| (x.key, x.value.as_slice()))
        .collect();
    etcd.put_all(&kvs);
    // Outside the scanned prefix: never reported.
    etcd.put("/other/secrets/x/y", b"plain");

    let mut base: Vec<String> = etcd.etcdctl_args();
    base.extend([
        "--config".into(),
        config_path.display().to_string(),
        "--page-size".into(),
        "4".into(),
    ]);
    let args = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };

    let run = run_etcd_inspect(args(&["--output", "json"]));
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    check_records(&run, &expects);
    assert!(
        !run.stdout.contains("CANARY"),
        "plaintext leaked into the report"
    );
    let doc = run.json();
    let summary = &doc["summary"];
    assert_eq!(summary["keys"], json!(expects.len()));
    for f in [
        "ok",
        "plaintext",
        "stale",
        "kms-key-stale",
        "unreadable",
        "undecodable",
        "unmapped",
    ] {
        let n = expects.iter().filter(|x| x.finding == Some(f)).count();
        assert_eq!(summary["findings"][f], json!(n), "summary count of {f}");
    }
    let failing = expects
        .iter()
        .filter(|x| {
            matches!(
                x.finding,
                Some("plaintext" | "unreadable" | "undecodable" | "unmapped")
            )
        })
        .count();
    assert_eq!(summary["failing"], json!(failing));
    assert_eq!(summary["result"], json!("fail"));
    // The summary rows add up to the records.
    let rows_total: u64 = summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(rows_total, expects.len() as u64);
    // Records come in key order and the revision is that of the last write.
    let keys: Vec<&str> = doc["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    // Expected provider is stated per record.
    let rec = &run.records()["/registry/secrets/prod/cbc"];
    assert_eq!(
        rec["expected"],
        json!({"provider": "kms-v2", "provider_name": "plugin-a", "key_name": null})
    );

    // --fail-on picks which findings fail.
    let code = |extra: &[&str]| {
        let r = run_etcd_inspect(args(extra));
        (r.code, r.stderr)
    };
    assert_eq!(code(&["--fail-on", "none"]).0, Some(0));
    assert_eq!(code(&["--fail-on", "stale"]).0, Some(1));
    assert_eq!(code(&["--fail-on", "kms-key-stale"]).0, Some(1));
    assert_eq!(
        code(&["--fail-on", "decrypt-failed"]).0,
        Some(0),
        "no decrypt check ran"
    );
    // Only clean data under this prefix: exit 0 with the default --fail-on.
    assert_eq!(code(&["--prefix", "/registry/events/"]).0, Some(0));
    assert_eq!(code(&["--prefix", "/registry/services/"]).0, Some(0));
    // A prefix with one plaintext secret fails by default, passes when only stale fails.
    assert_eq!(
        code(&["--prefix", "/registry/secrets/dev/plain"]).0,
        Some(1)
    );
    assert_eq!(
        code(&[
            "--prefix",
            "/registry/secrets/prod/",
            "--fail-on",
            "plaintext"
        ])
        .0,
        Some(0)
    );
    assert_eq!(
        code(&["--prefix", "/registry/secrets/prod/", "--fail-on", "stale"]).0,
        Some(1)
    );

    // The plugin's current key_id can be given instead of asking Status.
    let r = run_etcd_inspect(args(&[
        "--output",
        "json",
        "--kms-key-id",
        &format!("plugin-a={old_key_id}"),
    ]));
    let recs = r.records();
    assert_eq!(recs[k_rotated]["finding"], json!("ok"));
    assert_eq!(
        recs["/registry/secrets/prod/db-password"]["finding"],
        json!("kms-key-stale")
    );

    // JUnit: one failing test case per failing row.
    let r = run_etcd_inspect(args(&["--output", "junit"]));
    assert_eq!(r.code, Some(1));
    assert!(r.stdout.starts_with("<?xml"), "{}", r.stdout);
    assert!(
        r.stdout.contains(r#"<failure type="plaintext""#),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("/registry/secrets/dev/plain"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("CANARY"));

    // Usage and connection errors exit 2 and name the problem.
    let (c, err) = code(&["--fail-on", "bogus"]);
    assert_eq!(c, Some(2));
    assert!(err.contains("bogus"), "{err}");
    let (c, err) = code(&["--kms-endpoint", "nope=unix:///x.sock"]);
    assert_eq!(c, Some(2));
    assert!(err.contains("nope"), "{err}");
    let r = run_etcd_inspect([
        "--endpoints",
        "http://127.0.0.1:1",
        "--dial-timeout",
        "1s",
        "--command-timeout",
        "2s",
    ]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("127.0.0.1:1"), "{}", r.stderr);
    // An unreachable plugin is a clear error (exit 2), not a wrong verdict.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, audit_config("unix:///nonexistent/kms.sock")).unwrap();
    let r = run_etcd_inspect(
        etcd.etcdctl_args()
            .into_iter()
            .chain(["--config".into(), bad.display().to_string()]),
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("plugin-a") && r.stderr.contains("--kms-key-id"),
        "{}",
        r.stderr
    );
    // A broken config names the file and the field.
    std::fs::write(&bad, "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - aesgcm: {keys: [{name: k, secret: notbase64!}]}\n").unwrap();
    let r = run_etcd_inspect(
        etcd.etcdctl_args()
            .into_iter()
            .chain(["--config".into(), bad.display().to_string()]),
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(
        r.stderr.contains("bad.yaml") && r.stderr.contains("secret"),
        "{}",
        r.stderr
    );
}

#[test]
fn wildcard_config_with_events_exempt_first() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wildcard.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [events]\n    providers:\n      - identity: {{}}\n  - resources: ['*.*']\n    providers:\n      - aesgcm: {{keys: [{{name: k1, secret: {}}}]}}\n      - identity: {{}}\n",
            key(7)
        ),
    )
    .unwrap();
    let gcm = format!("aesgcm: {{keys: [{{name: k1, secret: {}}}]}}", key(7));
    let w = |k: &'static str, plain: Vec<u8>| write_with(&gcm, k, &plain, None);
    let id = (Some("identity"), None, None);
    let g = (Some("aesgcm"), None, Some("k1"));
    let expects = vec![
        e(
            "/registry/events/default/a.1",
            k8s_protobuf("v1", "Event", b"e"),
            Some("events"),
            Some("default"),
            Some("a.1"),
            id,
            None,
            Some("ok"),
        ),
        e(
            "/registry/events/default/b.2",
            w(
                "/registry/events/default/b.2",
                k8s_protobuf("v1", "Event", b"e"),
            ),
            Some("events"),
            Some("default"),
            Some("b.2"),
            g,
            None,
            Some("unreadable"),
        ),
        e(
            "/registry/secrets/default/s",
            w("/registry/secrets/default/s", secret_pb("s")),
            Some("secrets"),
            Some("default"),
            Some("s"),
            g,
            None,
            Some("ok"),
        ),
        e(
            "/registry/secrets/default/p",
            secret_pb("p"),
            Some("secrets"),
            Some("default"),
            Some("p"),
            id,
            None,
            Some("plaintext"),
        ),
        e(
            "/registry/deployments/default/d",
            w(
                "/registry/deployments/default/d",
                k8s_protobuf("apps/v1", "Deployment", b"d"),
            ),
            Some("deployments.apps"),
            Some("default"),
            Some("d"),
            g,
            None,
            Some("ok"),
        ),
        e(
            "/registry/stable.example.com/widgets/ns1/w",
            w(
                "/registry/stable.example.com/widgets/ns1/w",
                b"{\"kind\":\"Widget\"}\n".to_vec(),
            ),
            Some("widgets.stable.example.com"),
            Some("ns1"),
            Some("w"),
            g,
            None,
            Some("ok"),
        ),
        e(
            "/registry/stable.example.com/widgets/ns1/plain",
            b"{\"kind\":\"Widget\"}\n".to_vec(),
            Some("widgets.stable.example.com"),
            Some("ns1"),
            Some("plain"),
            id,
            None,
            Some("plaintext"),
        ),
        // Only a *.* (or *.) rule reaches master leases.
        e(
            "/registry/masterleases/10.0.0.1",
            w(
                "/registry/masterleases/10.0.0.1",
                k8s_protobuf("v1", "Endpoints", b"m"),
            ),
            Some("masterleases"),
            None,
            Some("10.0.0.1"),
            g,
            None,
            Some("ok"),
        ),
    ];
    let kvs: Vec<(&str, &[u8])> = expects
        .iter()
        .map(|x| (x.key, x.value.as_slice()))
        .collect();
    etcd.put_all(&kvs);
    let run = run_etcd_inspect(etcd.etcdctl_args().into_iter().chain([
        "--config".into(),
        config.display().to_string(),
        "--output".into(),
        "json".into(),
    ]));
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    check_records(&run, &expects);
    let recs = run.records();
    assert_eq!(
        recs["/registry/events/default/a.1"]["expected"]["provider"],
        json!("identity")
    );
    assert_eq!(
        recs["/registry/deployments/default/d"]["expected"]["key_name"],
        json!("k1")
    );
}

#[test]
fn tls_with_client_certificates() {
    let etcd = EtcdServer::start_tls();
    etcd.put_all(&[
        ("/registry/secrets/default/a", secret_pb("a")),
        (
            "/registry/configmaps/default/b",
            k8s_protobuf("v1", "ConfigMap", b"b"),
        ),
    ]);
    let tls = etcd.tls().unwrap();
    let run = run_etcd_inspect(
        etcd.etcdctl_args()
            .into_iter()
            .chain(["--output".into(), "json".into()]),
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let recs = run.records();
    assert_eq!(recs.len(), 2);
    assert_eq!(
        recs["/registry/secrets/default/a"]["provider"],
        json!("identity")
    );
    // Without a config nothing is judged.
    assert_eq!(recs["/registry/secrets/default/a"]["finding"], Value::Null);

    // Same endpoint without the client certificate: refused by etcd, exit 2.
    let run = run_etcd_inspect([
        "--endpoints".to_owned(),
        etcd.endpoint().to_owned(),
        "--cacert".to_owned(),
        tls.ca.display().to_string(),
        "--command-timeout".to_owned(),
        "3s".to_owned(),
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stdout);
    assert!(run.stderr.contains(etcd.endpoint()), "{}", run.stderr);
    // A bare host:port gets https:// when TLS files are given.
    let run = run_etcd_inspect([
        "--endpoints".to_owned(),
        etcd.endpoint().trim_start_matches("https://").to_owned(),
        "--cacert".to_owned(),
        tls.ca.display().to_string(),
        "--cert".to_owned(),
        tls.client_cert.display().to_string(),
        "--key".to_owned(),
        tls.client_key.display().to_string(),
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("2 keys under /registry"),
        "{}",
        run.stdout
    );
}
