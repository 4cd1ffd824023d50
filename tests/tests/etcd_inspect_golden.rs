//! Golden tests of etcd-inspect's human output: the summary table (and the
//! JUnit report) of a fixed data set in a real etcd, and `--help`.
//! `UPDATE_GOLDEN=1 cargo nextest run -p atrest-tests -E 'binary(/etcd_inspect_golden/)'`
//! rewrites the files in etcd-inspect/tests/golden/.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use atrest_tests::etcd::{EtcdServer, InspectRun, k8s_protobuf, run_etcd_inspect};
use atrest_tests::inspect::{key, write_with};

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../etcd-inspect/tests/golden"
    ))
    .join(name)
}

fn check_golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs (UPDATE_GOLDEN=1 rewrites it)\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

/// Replaces what differs between runs: the revision and the temp config path.
fn normalize(run: &InspectRun, config: &str) -> String {
    let mut out = run.stdout.replace(config, "<CONFIG>");
    for marker in ["at revision ", "name=\"revision\" value=\""] {
        let mut from = 0;
        while let Some(i) = out[from..].find(marker) {
            let start = from + i + marker.len();
            let digits = out[start..]
                .chars()
                .take_while(char::is_ascii_digit)
                .count();
            out.replace_range(start..start + digits, "<REV>");
            from = start;
        }
    }
    out
}

#[test]
fn summary_table_and_junit_are_stable() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("golden-config.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - aesgcm: {{keys: [{{name: key2, secret: {k2}}}, {{name: key1, secret: {k1}}}]}}\n      - aescbc: {{keys: [{{name: old, secret: {k3}}}]}}\n      - identity: {{}}\n  - resources: [configmaps, widgets.stable.example.com]\n    providers:\n      - secretbox: {{keys: [{{name: sb, secret: {k4}}}]}}\n",
            k1 = key(1),
            k2 = key(2),
            k3 = key(3),
            k4 = key(4)
        ),
    )
    .unwrap();
    let gcm2 = format!("aesgcm: {{keys: [{{name: key2, secret: {}}}]}}", key(2));
    let gcm1 = format!("aesgcm: {{keys: [{{name: key1, secret: {}}}]}}", key(1));
    let cbc = format!("aescbc: {{keys: [{{name: old, secret: {}}}]}}", key(3));
    let gone = format!("aescbc: {{keys: [{{name: gone, secret: {}}}]}}", key(5));
    let sb = format!("secretbox: {{keys: [{{name: sb, secret: {}}}]}}", key(4));
    let pb = |kind: &str| k8s_protobuf("v1", kind, b"object");
    let mut kvs: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..7 {
        let k = format!("/registry/secrets/ns{}/s{i}", i % 3);
        kvs.push((k.clone(), write_with(&gcm2, &k, &pb("Secret"), None)));
    }
    for i in 0..3 {
        let k = format!("/registry/secrets/legacy/s{i}");
        kvs.push((k.clone(), write_with(&gcm1, &k, &pb("Secret"), None)));
    }
    kvs.push((
        "/registry/secrets/legacy/cbc".into(),
        write_with(&cbc, "/registry/secrets/legacy/cbc", &pb("Secret"), None),
    ));
    kvs.push((
        "/registry/secrets/legacy/lost".into(),
        write_with(&gone, "/registry/secrets/legacy/lost", &pb("Secret"), None),
    ));
    kvs.push(("/registry/secrets/dev/plain".into(), pb("Secret")));
    for i in 0..4 {
        let k = format!("/registry/configmaps/kube-system/c{i}");
        kvs.push((k.clone(), write_with(&sb, &k, &pb("ConfigMap"), None)));
    }
    kvs.push(("/registry/configmaps/default/plain".into(), pb("ConfigMap")));
    kvs.push((
        "/registry/configmaps/default/junk".into(),
        vec![0xde, 0xad, 0xbe, 0xef],
    ));
    kvs.push((
        "/registry/stable.example.com/widgets/default/w".into(),
        write_with(
            &sb,
            "/registry/stable.example.com/widgets/default/w",
            b"{\"kind\":\"Widget\"}\n",
            None,
        ),
    ));
    kvs.push(("/registry/events/default/e.1".into(), pb("Event")));
    kvs.push(("/registry/services/specs/default/web".into(), pb("Service")));
    etcd.put_all(&kvs);

    let config_s = config.display().to_string();
    let base: Vec<String> = etcd
        .etcdctl_args()
        .into_iter()
        .chain(["--config".into(), config_s.clone()])
        .collect();

    let table = run_etcd_inspect(&base);
    assert_eq!(table.code, Some(1), "{}", table.stderr);
    assert_eq!(table.stderr, "", "nothing on stderr off a terminal");
    check_golden("summary.txt", &normalize(&table, &config_s));

    let junit = run_etcd_inspect(
        base.iter()
            .cloned()
            .chain(["--output".to_owned(), "junit".to_owned()]),
    );
    assert_eq!(junit.code, Some(1), "{}", junit.stderr);
    check_golden("junit.xml", &normalize(&junit, &config_s));

    let pass = run_etcd_inspect(
        base.iter()
            .cloned()
            .chain(["--fail-on".to_owned(), "none".to_owned()]),
    );
    assert_eq!(pass.code, Some(0));
    check_golden("summary-pass.txt", &normalize(&pass, &config_s));
}

#[test]
fn help_is_stable() {
    let run = run_etcd_inspect(["--help"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    check_golden("help.txt", &run.stdout);
    // The exit codes are documented in --help.
    assert!(run.stdout.contains("Exit codes:"));
    for finding in [
        "ok",
        "plaintext",
        "stale",
        "kms-key-stale",
        "unreadable",
        "undecodable",
        "decrypt-failed",
    ] {
        assert!(
            run.stdout.contains(&format!("  {finding} ")),
            "{finding} undocumented"
        );
    }
}
