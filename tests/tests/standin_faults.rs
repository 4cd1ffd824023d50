//! The kube-apiserver stand-in's bearer token and injected faults (409 every
//! Nth PUT, 429 + Retry-After every Nth request), over raw HTTP so that no
//! client retry hides them.
#![allow(clippy::unwrap_used)]

use atrest_tests::etcd::EtcdServer;
use atrest_tests::standin::StandinProcess;
use serde_json::Value;

const TOKEN: &str = "test-token-not-a-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_throttle_and_conflict_faults() {
    let etcd = EtcdServer::start();
    let standin = StandinProcess::start(
        etcd.endpoint(),
        &[
            "--token",
            TOKEN,
            "--fault-throttle-every",
            "3",
            "--fault-conflict-every",
            "2",
        ],
    )
    .unwrap();

    // Health needs no token and is not throttled.
    for _ in 0..4 {
        let r = standin.request("GET", "/readyz", None, None).await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    }
    // Everything else needs the token.
    let r = standin
        .request("GET", "/api/v1/secrets", None, None)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let r = standin
        .request("GET", "/metrics", Some("wrong"), None)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let status: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (status["kind"].as_str(), status["reason"].as_str()),
        (Some("Status"), Some("Unauthorized"))
    );

    // Request 1, 2 pass, 3 is throttled (counting only authenticated non-health requests).
    let body = r#"{"metadata":{"name":"s"},"data":{"k":"dg=="}}"#;
    let r = standin
        .request(
            "POST",
            "/api/v1/namespaces/ns/secrets",
            Some(TOKEN),
            Some(body),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let r = standin
        .request("GET", "/api/v1/namespaces/ns/secrets/s", Some(TOKEN), None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = standin
        .request("GET", "/api/v1/namespaces/ns/secrets/s", Some(TOKEN), None)
        .await
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    let status: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(status["reason"], "TooManyRequests");

    // PUTs: request 4 (PUT 1) passes, request 5 (PUT 2) is a Conflict, request 6 is throttled.
    let put = |body: &'static str| {
        let standin = &standin;
        async move {
            standin
                .request(
                    "PUT",
                    "/api/v1/namespaces/ns/secrets/s",
                    Some(TOKEN),
                    Some(body),
                )
                .await
                .unwrap()
        }
    };
    let r = put(body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = put(body).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let status: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(status["reason"], "Conflict");
    assert_eq!(status["details"]["name"], "s");
    let r = put(body).await;
    assert_eq!(r.status, 429);

    // Bad input gets a 400 Status, not a crash.
    let r = standin
        .request(
            "POST",
            "/api/v1/namespaces/ns/secrets",
            Some(TOKEN),
            Some("{not json"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let r = standin
        .request(
            "POST",
            "/api/v1/namespaces/ns/secrets",
            Some(TOKEN),
            Some(r#"{"kind":"ConfigMap","metadata":{"name":"x"}}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn help_names_it_a_stand_in_and_documents_every_flag() {
    let out = std::process::Command::new(atrest_tests::plugin::bin_path("kube-apiserver-standin"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("A stand-in for kube-apiserver, for tests only"),
        "{help}"
    );
    for flag in [
        "--listen",
        "--etcd-endpoints",
        "--etcd-prefix",
        "--encryption-provider-config",
        "--encryption-provider-config-automatic-reload",
        "--config-reload-interval",
        "--reload-delay",
        "--apiserver-id",
        "--kms-status-interval",
        "--token",
        "--fault-conflict-every",
        "--fault-throttle-every",
        "--resources",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn a_bad_flag_is_a_usage_error_naming_it() {
    let out = std::process::Command::new(atrest_tests::plugin::bin_path("kube-apiserver-standin"))
        .args([
            "--etcd-endpoints",
            "http://127.0.0.1:1",
            "--resources",
            "nodes",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--resources") && stderr.contains("nodes"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_it_with_exit_code_0_and_dry_runs_are_refused() {
    let etcd = EtcdServer::start();
    let mut standin = StandinProcess::start(etcd.endpoint(), &[] as &[&str]).unwrap();
    let r = standin
        .request(
            "POST",
            "/api/v1/namespaces/ns/secrets?dryRun=All",
            None,
            Some(r#"{"metadata":{"name":"s"}}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        atrest_tests::standin::raw(&etcd, "/registry/secrets/ns/s")
            .await
            .is_none()
    );
    assert_eq!(standin.terminate().unwrap().code(), Some(0));
}
