//! `kms-loadgen` as a child process against the real `kms-plugin` (found
//! beside it in target/<profile>/, as in normal use). Tiny cells: these tests
//! check that the tool works and reports, never how fast anything is.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kms-loadgen"))
        .args(args)
        .env("ATREST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn short_run_against_the_real_plugin_prints_every_row() {
    let out = loadgen(&[
        "--duration",
        "200ms",
        "--warmup",
        "50ms",
        "--callers",
        "1,4",
        "--burst-calls",
        "300",
        "--burst-callers",
        "30",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "kms-loadgen failed ({}); if kms-plugin is missing, run `cargo build --workspace --bins` first.\nstderr:\n{stderr}\nstdout:\n{stdout}",
        out.status
    );
    for method in ["Status", "Encrypt", "Decrypt"] {
        for callers in [1, 4] {
            let row = format!("| {method} | {callers} | ");
            let line = stdout.lines().find(|l| l.starts_with(&row));
            let line = line.unwrap_or_else(|| panic!("no row {row:?} in:\n{stdout}"));
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // | method | callers | calls | errors | ops/s | p50 | p99 | p999 | cpu | target |
            assert!(
                cells[3].parse::<u64>().unwrap() > 0,
                "no calls made: {line}"
            );
            assert_eq!(cells[4], "0", "errors in {line}");
        }
    }
    assert!(stdout.contains("build profile **"), "{stdout}");
    assert!(
        stdout.contains("burst (apiserver restart): 300 Decrypt calls"),
        "{stdout}"
    );
    assert!(stdout.contains("errors 0"), "{stdout}");
}

#[test]
fn a_plugin_that_cannot_start_is_an_error() {
    let out = loadgen(&["--plugin-bin", "/bin/false", "--duration", "100ms"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("keyring init"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = loadgen(&["--callers", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--callers"),
        "{}",
        text(&out.stderr)
    );
    let out = loadgen(&["--listen", "/run/x.sock"]);
    assert_eq!(out.status.code(), Some(2), "--listen without --plugin-pid");
}
