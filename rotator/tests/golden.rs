//! Golden tests: `rotator plan` output for every operation (with a
//! deterministic key generator, so file hashes are stable) and `--help`.
//! `UPDATE_GOLDEN=1 cargo test -p rotator --test golden` rewrites the files.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use keyring::{KekInfo, KekState, Listing};
use rotator::plan::{KmsSpec, NewProvider, Operation, build};
use rotator::render::render_plan;
use rotator::targets::Targets;
use storage_encryption::{EncryptionConfiguration, SecretBytes};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "{name} differs from its golden file; if the change is intended, rerun with UPDATE_GOLDEN=1"
    );
}

const TARGETS: &str = "
hosts:
  - name: cp1
    encryptionConfig: /etc/kubernetes/enc/config.yaml
    keyring: /etc/kubernetes/kms/keyring
    apiserver: { url: 'https://10.0.0.1:6443', token: not-shown-anywhere }
  - name: cp2
    encryptionConfig: /srv/cp2/etc/kubernetes/enc/config.yaml
    keyring: /srv/cp2/etc/kubernetes/kms/keyring
    apiserver: { url: 'https://10.0.0.2:6443', token: not-shown-anywhere }
etcd:
  endpoints: [https://10.0.0.1:2379]
";

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn targets() -> Targets {
    Targets::parse(
        TARGETS,
        Path::new("rotator.yaml"),
        Path::new("/etc/rotator"),
    )
    .unwrap()
}

fn cfg(body: &str) -> EncryptionConfiguration {
    EncryptionConfiguration::parse(&format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n{body}"
    ))
    .unwrap()
}

fn local() -> EncryptionConfiguration {
    cfg(&format!(
        "- resources: [secrets, configmaps]\n  providers:\n  - aescbc:\n      keys:\n      - name: key1\n        secret: {KEY}\n  - identity: {{}}\n"
    ))
}

fn on_kms() -> EncryptionConfiguration {
    cfg(
        "- resources: [secrets]\n  providers:\n  - kms:\n      apiVersion: v2\n      name: atrest\n      endpoint: unix:///var/run/kmsplugin/socket.sock\n      timeout: 3s\n  - identity: {}\n",
    )
}

fn plan_text(
    op: Operation,
    current: Option<EncryptionConfiguration>,
    keyring: Option<Listing>,
) -> String {
    let mut n = 0u8;
    let mut keygen = || {
        n += 1;
        Ok(SecretBytes::new(vec![0x40 + n; 32]))
    };
    let plan = build(&op, current.as_ref(), keyring.as_ref(), &mut keygen).unwrap();
    let text = render_plan(&plan, &targets());
    // Redaction: neither the old nor the generated keys, nor the token, show.
    assert!(
        !text.contains(KEY) && !text.contains("QUFBQUFB") && !text.contains("not-shown"),
        "{text}"
    );
    text
}

fn kms(name: &str) -> KmsSpec {
    KmsSpec {
        name: name.into(),
        endpoint: format!("unix:///var/run/{name}/socket.sock"),
        timeout_secs: Some(3),
    }
}

#[test]
fn plan_rotate_key() {
    check(
        "plan-rotate-key.txt",
        &plan_text(Operation::RotateKey, Some(local()), None),
    );
}

#[test]
fn plan_enable_without_config() {
    let op = Operation::Enable {
        provider: NewProvider::Aescbc,
        resources: vec!["secrets".into()],
    };
    check("plan-enable.txt", &plan_text(op, None, None));
}

#[test]
fn plan_to_kms() {
    check(
        "plan-to-kms.txt",
        &plan_text(Operation::ToKms { kms: kms("atrest") }, Some(local()), None),
    );
}

#[test]
fn plan_switch_kms() {
    check(
        "plan-switch-kms.txt",
        &plan_text(
            Operation::SwitchKms {
                kms: kms("atrest-b"),
            },
            Some(on_kms()),
            None,
        ),
    );
}

#[test]
fn plan_disable() {
    check(
        "plan-disable.txt",
        &plan_text(Operation::Disable, Some(local()), None),
    );
}

#[test]
fn plan_rotate_kek() {
    let kek = |kek: u32, state, key_id: &str| KekInfo {
        kek,
        state,
        created: "2026-01-01T00:00:00Z".into(),
        fingerprint: format!("fingerprint-{kek}"),
        key_id: Some(key_id.into()),
        key_ids: vec![key_id.into()],
        kind: "local".into(),
        pkcs11: None,
    };
    let info = Listing {
        format: keyring::LISTING_FORMAT.into(),
        lineage: None,
        generation: 4,
        primary: 2,
        key_id: "atrest-kek-2-g3".into(),
        keks: vec![
            kek(1, KekState::DecryptOnly, "atrest-kek-1-g1"),
            kek(2, KekState::Primary, "atrest-kek-2-g3"),
        ],
    };
    check(
        "plan-rotate-kek.txt",
        &plan_text(Operation::RotateKek, Some(on_kms()), Some(info)),
    );
}

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rotator"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_texts() {
    check("help.txt", &help(&["--help"]));
    check("help-apply.txt", &help(&["apply", "--help"]));
    check("help-enable.txt", &help(&["plan", "enable", "--help"]));
}

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("rotator.yaml");
    std::fs::write(&cfg, "hosts: []\netcd: {endpoints: [x]}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rotator"))
        .args(["--config", cfg.to_str().unwrap(), "plan", "rotate-key"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rotator.yaml") && err.contains("hosts"),
        "{err}"
    );
    // status without a state file: exit 5.
    let out = Command::new(env!("CARGO_BIN_EXE_rotator"))
        .args([
            "--state",
            dir.path().join("none.json").to_str().unwrap(),
            "status",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
