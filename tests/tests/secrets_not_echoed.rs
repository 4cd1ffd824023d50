//! A key or token typed in the wrong place of a config file is never printed
//! back: the real `etcd-inspect` and `rotator` report positions and field
//! paths only (the YAML parser's quoted names and values are redacted).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

use atrest_tests::plugin::bin_path;

const KEY: &str = "c2VjcmV0LWtleS1tYXRlcmlhbC0zMi1ieXRlcyEhISE=";
const TOKEN: &str = "tok-sekrit-0123456789";

fn run(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin_path(bin))
        .args(args)
        .env_remove("ATREST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn encryption_config(provider: &str) -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - {provider}\n      - identity: {{}}\n"
    )
}

fn bad_encryption_configs() -> Vec<String> {
    vec![
        encryption_config(&format!("aesgcm: {{keys: [{{name: g1, secret:{KEY}}}]}}")),
        encryption_config(&format!("{KEY}: {{}}")),
        format!("apiVersion: apiserver.config.k8s.io/v1\nkind: {KEY}\nresources: []\n"),
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [{KEY}]\n    providers:\n      - identity: {{}}\n"
        ),
    ]
}

#[test]
fn etcd_inspect_does_not_echo_a_misplaced_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    for text in bad_encryption_configs() {
        std::fs::write(&path, &text).unwrap();
        let (code, out) = run(
            "etcd-inspect",
            &[
                "--endpoints",
                "http://127.0.0.1:1",
                "--config",
                path.to_str().unwrap(),
            ],
        );
        assert_eq!(code, Some(2), "{out}");
        assert!(!out.contains(&KEY[..12]), "the key is echoed:\n{out}");
        assert!(
            out.contains("line ") || out.contains("resources[") || out.contains("kind"),
            "no position or field path:\n{out}"
        );
    }
}

#[test]
fn rotator_does_not_echo_a_token_or_a_misplaced_key() {
    let dir = tempfile::tempdir().unwrap();
    let enc = dir.path().join("enc.yaml");
    let rotator_config = dir.path().join("rotator.yaml");
    let targets = |apiserver: &str| {
        format!(
            "hosts:\n  - name: cp1\n    encryptionConfig: {}\n    apiserver: {apiserver}\netcd: {{endpoints: [http://127.0.0.1:1]}}\n",
            enc.display()
        )
    };
    std::fs::write(
        &enc,
        encryption_config(&format!("aescbc: {{keys: [{{name: k1, secret: {KEY}}}]}}")),
    )
    .unwrap();
    // The token typed without a space after the colon, and in a wrong field.
    for apiserver in [
        format!("{{url: 'https://127.0.0.1:6443', token:{TOKEN}}}"),
        format!("{{url: 'https://127.0.0.1:6443', {TOKEN}: 1}}"),
        format!("{{url: 'https://127.0.0.1:6443', token: [{TOKEN}]}}"),
    ] {
        std::fs::write(&rotator_config, targets(&apiserver)).unwrap();
        let (code, out) = run(
            "rotator",
            &["-c", rotator_config.to_str().unwrap(), "plan", "rotate-key"],
        );
        assert_eq!(code, Some(2), "{out}");
        assert!(!out.contains("sekrit"), "the token is echoed:\n{out}");
        assert!(out.contains("line "), "no position:\n{out}");
    }
    // A host's EncryptionConfiguration with a misplaced key.
    std::fs::write(
        &rotator_config,
        targets(&format!(
            "{{url: 'https://127.0.0.1:6443', token: {TOKEN}}}"
        )),
    )
    .unwrap();
    for text in bad_encryption_configs() {
        std::fs::write(&enc, &text).unwrap();
        let (code, out) = run(
            "rotator",
            &["-c", rotator_config.to_str().unwrap(), "plan", "rotate-key"],
        );
        assert_eq!(code, Some(2), "{out}");
        assert!(!out.contains(&KEY[..12]), "the key is echoed:\n{out}");
        assert!(!out.contains("sekrit"), "the token is echoed:\n{out}");
    }
}
