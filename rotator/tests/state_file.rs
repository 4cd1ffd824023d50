//! The real `rotator` binary against state files it cannot trust and a run
//! lock held by someone else: every one is a state conflict (exit 5), never
//! "finished" (exit 0) nor a runtime failure (exit 1).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::fcntl::{Flock, FlockArg};
use rotator::plan::{NewProvider, Operation, build};
use rotator::state::State;
use storage_encryption::{EncryptionConfiguration, SecretBytes};

const IDENTITY: &str = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n  - identity: {}\n";

/// A folder with one host's config and a rotator config whose apiserver is
/// never reached (every case here stops before).
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("enc.yaml"), IDENTITY).unwrap();
    let config = dir.path().join("rotator.yaml");
    std::fs::write(
        &config,
        "hosts:\n  - name: cp1\n    encryptionConfig: enc.yaml\n    apiserver: { url: 'http://127.0.0.1:9' }\netcd: { endpoints: ['http://127.0.0.1:9'] }\n",
    )
    .unwrap();
    let state = dir.path().join("state.json");
    Setup { dir, config, state }
}

fn rotator(s: &Setup, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rotator"))
        .arg("--config")
        .arg(&s.config)
        .arg("--state")
        .arg(&s.state)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A real state of an `enable` run (3 stages) at `stage`.
fn write_state(path: &Path, stage: usize) -> usize {
    let cfg = EncryptionConfiguration::parse(IDENTITY).unwrap();
    let plan = build(
        &Operation::Enable {
            provider: NewProvider::Aescbc,
            resources: vec!["secrets".into()],
        },
        Some(&cfg),
        None,
        &mut || Ok(SecretBytes::new(vec![7; 32])),
    )
    .unwrap();
    let n = plan.stages.len();
    let mut state = State::new(plan, vec!["cp1".into()]);
    state.stage = stage;
    state.save(path).unwrap();
    n
}

fn assert_conflict(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(5), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(needle), "{needle:?} not in {}", text(o));
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("finished"),
        "{}",
        text(o)
    );
}

#[test]
fn a_corrupt_state_file_is_a_state_conflict() {
    let s = setup();
    for bad in [
        &b"{ not json"[..],
        b"",
        b"{\"version\": 1, \"stage\": \"x\"}",
    ] {
        std::fs::write(&s.state, bad).unwrap();
        for args in [
            &["status"][..],
            &["status", "--output", "json"],
            &["resume"],
            &["apply", "rotate-key"],
        ] {
            assert_conflict(&rotator(&s, args), "state.json");
        }
    }
}

#[test]
fn a_stage_past_the_end_is_refused_not_finished() {
    let s = setup();
    let n = write_state(&s.state, 0);
    write_state(&s.state, n + 1);
    for args in [
        &["status"][..],
        &["status", "--output", "json"],
        &["resume"],
    ] {
        assert_conflict(&rotator(&s, args), "past the end");
    }
    // apply must not set it aside as a finished run either.
    assert_conflict(&rotator(&s, &["apply", "rotate-key"]), "past the end");
    // At the end exactly: a finished run.
    write_state(&s.state, n);
    let out = rotator(&s, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("finished"));
}

#[test]
fn a_held_run_lock_refuses_before_anything_else() {
    let s = setup();
    write_state(&s.state, 0);
    let lock = s.dir.path().join("state.json.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .unwrap();
    let held = Flock::lock(file, FlockArg::LockExclusiveNonblock).unwrap();
    // An unfinished run exists, but the lock is what apply reports first:
    // its check comes before the unfinished-run check.
    for args in [&["resume"][..], &["apply", "rotate-key"]] {
        assert_conflict(&rotator(&s, args), "another rotator");
    }
    drop(held);
    // Released (the file stays, holding nothing): apply now sees the unfinished run.
    let out = rotator(&s, &["apply", "rotate-key"]);
    assert_conflict(&out, "unfinished");
    assert!(!text(&out).contains("another rotator"), "{}", text(&out));
}
