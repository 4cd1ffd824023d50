//! What every binary does the same way (the `cli-kit` crate), checked on the
//! real binaries: exit codes listed in `--help`, interval flags below their
//! minimum refused as usage errors naming the flag, and a reader that goes
//! away (`etcd-inspect --output json | head -1`) ending the tool quietly with 0.
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::process::{Command, Stdio};

use atrest_tests::etcd::EtcdServer;
use atrest_tests::plugin::bin_path;

fn run(bin: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin_path(bin))
        .args(args)
        .env_remove("ATREST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_binary_lists_its_exit_codes_in_help() {
    for (bin, codes) in [
        ("kms-plugin", &["0", "1", "2", "3"][..]),
        ("etcd-inspect", &["0", "1", "2"]),
        ("rotator", &["0", "1", "2", "3", "4", "5", "6", "7", "8"]),
    ] {
        let (code, stdout, stderr) = run(bin, &["--help"]);
        assert_eq!(code, Some(0), "{bin}: {stderr}");
        let block = stdout
            .split_once("Exit codes:\n")
            .unwrap_or_else(|| panic!("{bin} --help has no exit codes:\n{stdout}"))
            .1;
        let listed: Vec<&str> = block
            .lines()
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.strip_prefix("  "))
            .filter_map(|l| l.split_once("  ").map(|(c, _)| c))
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(listed, codes, "{bin}:\n{block}");
    }
}

#[test]
fn intervals_below_their_minimum_are_usage_errors_naming_the_flag() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "kms-plugin",
            &[
                "serve",
                "--keyring",
                "/nonexistent/k.json",
                "--self-test-interval",
                "1ns",
            ],
            "--self-test-interval",
        ),
        (
            "kms-plugin",
            &[
                "serve",
                "--keyring",
                "/nonexistent/k.json",
                "--reload-interval",
                "1ms",
            ],
            "--reload-interval",
        ),
        (
            "kms-plugin",
            &[
                "serve",
                "--keyring",
                "/nonexistent/k.json",
                "--grace-period",
                "0",
            ],
            "--grace-period",
        ),
        ("kms-plugin", &["probe", "--timeout", "1us"], "--timeout"),
        ("etcd-inspect", &["--dial-timeout", "1ns"], "--dial-timeout"),
        (
            "etcd-inspect",
            &["--command-timeout", "10ms"],
            "--command-timeout",
        ),
        (
            "rotator",
            &["apply", "rotate-key", "--poll-interval", "1ns"],
            "--poll-interval",
        ),
        (
            "rotator",
            &["apply", "rotate-key", "--proof-timeout", "100ms"],
            "--proof-timeout",
        ),
        (
            "kube-apiserver-standin",
            &[
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--kms-status-interval",
                "1ns",
            ],
            "--kms-status-interval",
        ),
        (
            "kube-apiserver-standin",
            &[
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--config-reload-interval",
                "0",
            ],
            "--config-reload-interval",
        ),
    ];
    for (bin, args, flag) in cases {
        let (code, _, stderr) = run(bin, args);
        assert_eq!(code, Some(2), "{bin} {args:?}: {stderr}");
        assert!(stderr.contains(flag), "{bin} {args:?}: {stderr}");
        assert!(stderr.contains("at least"), "{bin} {args:?}: {stderr}");
    }
}

#[test]
fn durations_use_the_go_grammar_everywhere() {
    // 1m30s and 1.5s are Go forms the old per-binary parsers did not all take.
    let (code, _, stderr) = run(
        "etcd-inspect",
        &[
            "--endpoints",
            "http://127.0.0.1:1",
            "--dial-timeout",
            "1.5s",
            "--command-timeout",
            "1m30s",
        ],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("127.0.0.1:1"),
        "an etcd error, not a usage error: {stderr}"
    );
}

/// A data set whose JSON report is far larger than a pipe's buffer.
fn etcd_with_many_keys() -> EtcdServer {
    let etcd = EtcdServer::start();
    let kvs: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|i| {
            (
                format!("/registry/configmaps/default/c-{i:05}"),
                b"k8s\0plain".to_vec(),
            )
        })
        .collect();
    etcd.put_all(&kvs);
    etcd
}

#[test]
fn etcd_inspect_into_head_exits_0_quietly() {
    let etcd = etcd_with_many_keys();
    let inspect = bin_path("etcd-inspect");
    let script = format!(
        "set -o pipefail; '{}' {} --output json | head -1 > /dev/null",
        inspect.display(),
        etcd.etcdctl_args().join(" ")
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env_remove("ATREST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
    assert!(stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn etcd_inspect_with_its_reader_gone_exits_0_quietly() {
    let etcd = etcd_with_many_keys();
    for output in ["json", "table", "junit"] {
        let mut child = Command::new(bin_path("etcd-inspect"))
            .args(etcd.etcdctl_args())
            .args(["--output", output])
            .env_remove("ATREST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the report is written: every write fails with EPIPE.
        drop(child.stdout.take());
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{output}: {stderr}");
        assert!(stderr.trim().is_empty(), "{output}: {stderr}");
    }
}
