//! The metrics listener: `/metrics` (Prometheus text), `/healthz`, `/readyz`;
//! every family from the contract with its fixed label set; counters move.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use anyhow::Result;
use atrest_tests::plugin::{
    Metrics, PluginOptions, PluginProcess, WAIT, decrypt, encrypt, eventually, http_get, seed,
};
use sha2::{Digest, Sha256};

const REQUESTS: &str = "atrest_kms_requests_total";

async fn start() -> Result<PluginProcess> {
    PluginProcess::start(PluginOptions::new().metrics()).await
}

fn key_id_hash(key_id: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key_id.as_bytes())))
}

fn names(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_healthz_and_readyz_answer() -> Result<()> {
    let plugin = start().await?;
    let metrics = plugin.http("/metrics").await?;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    let content_type = metrics.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain")
            || content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    for path in ["/healthz", "/readyz"] {
        let response = plugin.http(path).await?;
        assert_eq!(response.status, 200, "GET {path}: {response:?}");
    }
    let missing = plugin.http("/no-such-page").await?;
    assert_eq!(missing.status, 404);
    Ok(())
}

/// Port 0 lets the plugin pick a free port; the log names the one it bound
/// (what `scripts/bench-kms-hsm.sh` reads to find `/metrics`).
#[tokio::test(flavor = "multi_thread")]
async fn port_zero_binds_a_free_port_and_the_log_names_it() -> Result<()> {
    let plugin = PluginProcess::start(
        PluginOptions::new()
            .arg("--metrics-addr")
            .arg("127.0.0.1:0"),
    )
    .await?;
    plugin
        .wait_for_log("metrics listening addr=127.0.0.1:")
        .await?;
    let log = plugin.log();
    let addr: std::net::SocketAddr = log
        .split("metrics listening addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no bound address in the log:\n{log}"));
    assert_ne!(addr.port(), 0, "{log}");
    let metrics = http_get(addr, "/metrics").await?;
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(
        metrics.body.contains("atrest_kms_healthy"),
        "{}",
        metrics.body
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_family_has_its_fixed_label_set() -> Result<()> {
    let plugin = start().await?;
    let client = plugin.client();
    // One call of each kind and outcome, so label values exist.
    let response = encrypt(&client, &seed(1)).await?;
    decrypt(&client, &response.ciphertext, &response.key_id).await?;
    assert!(
        decrypt(&client, &response.ciphertext, "unknown")
            .await
            .is_err()
    );
    assert!(encrypt(&client, &[]).await.is_err());
    let key_id = plugin.status().await?.key_id;
    let metrics = plugin.metrics().await?;

    assert_eq!(metrics.label_names(REQUESTS), names(&["method", "outcome"]));
    let methods: BTreeSet<String> = metrics
        .matching(REQUESTS, &[])
        .map(|s| s.labels["method"].clone())
        .collect();
    assert_eq!(methods, names(&["decrypt", "encrypt", "status"]));
    for sample in metrics.matching(REQUESTS, &[]) {
        let outcome = sample.labels["outcome"].as_str();
        assert!(
            ["ok", "invalid_argument", "unknown_key_id", "internal"].contains(&outcome),
            "outcome label {outcome:?} is not from the fixed set"
        );
    }

    let buckets = "atrest_kms_request_duration_seconds_bucket";
    assert_eq!(
        metrics.label_names(buckets),
        names(&["le", "method", "outcome"])
    );
    assert!(
        metrics
            .get(
                "atrest_kms_request_duration_seconds_count",
                &[("method", "encrypt")]
            )
            .unwrap()
            >= 2.0
    );

    let info = "atrest_kms_key_id_hash_info";
    assert_eq!(metrics.label_names(info), names(&["key_id_hash"]));
    assert_eq!(
        metrics.get(info, &[("key_id_hash", &key_id_hash(&key_id))]),
        Some(1.0)
    );
    assert_eq!(
        metrics.matching(info, &[]).count(),
        1,
        "more than one current key_id hash"
    );
    assert!(
        !metrics.text.contains(&key_id),
        "the raw key_id is in /metrics (only its hash belongs there)"
    );

    let reloads = "atrest_kms_keyring_reloads_total";
    assert_eq!(metrics.label_names(reloads), names(&["result"]));
    for sample in metrics.matching(reloads, &[]) {
        let result = sample.labels["result"].as_str();
        assert!(
            result == "success" || result.starts_with("rejected_"),
            "reload result {result:?}"
        );
    }

    for gauge in ["atrest_kms_keks", "atrest_kms_healthy"] {
        assert!(metrics.label_names(gauge).is_empty(), "{gauge} has labels");
    }
    assert_eq!(metrics.get("atrest_kms_keks", &[]), Some(1.0));
    assert_eq!(metrics.get("atrest_kms_healthy", &[]), Some(1.0));
    assert_no_foreign_families(&metrics);
    Ok(())
}

/// Every family is ours: a prefix typo or a stray default registry would show here.
fn assert_no_foreign_families(metrics: &Metrics) {
    for sample in &metrics.samples {
        assert!(
            sample.name.starts_with("atrest_kms_"),
            "metric {} lacks the atrest_kms_ prefix",
            sample.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_total_counts_each_call_by_method_and_outcome() -> Result<()> {
    let plugin = start().await?;
    let client = plugin.client();
    let before = plugin.metrics().await?;
    let count = |m: &Metrics, method: &str, outcome: &str| {
        m.sum(REQUESTS, &[("method", method), ("outcome", outcome)])
    };

    let mut responses = Vec::new();
    for n in 0..5 {
        responses.push(encrypt(&client, &seed(n)).await?);
    }
    for response in &responses[..3] {
        decrypt(&client, &response.ciphertext, &response.key_id).await?;
    }
    for _ in 0..2 {
        assert!(
            decrypt(&client, &responses[0].ciphertext, "no-such-key-id")
                .await
                .is_err()
        );
    }
    assert!(
        decrypt(&client, b"garbage", &responses[0].key_id)
            .await
            .is_err()
    );
    assert!(encrypt(&client, &[]).await.is_err());
    for _ in 0..4 {
        plugin.status().await?;
    }

    let after = plugin.metrics().await?;
    let delta = |method, outcome| count(&after, method, outcome) - count(&before, method, outcome);
    assert_eq!(delta("encrypt", "ok"), 5.0);
    assert_eq!(delta("decrypt", "ok"), 3.0);
    assert_eq!(delta("decrypt", "unknown_key_id"), 2.0);
    assert_eq!(delta("decrypt", "invalid_argument"), 1.0);
    assert_eq!(delta("encrypt", "invalid_argument"), 1.0);
    assert_eq!(delta("status", "ok"), 4.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn key_id_hash_and_kek_count_follow_a_rotation() -> Result<()> {
    let plugin = start().await?;
    let first = plugin.status().await?.key_id;
    let second = plugin.keyring().rotate().await?;
    plugin.wait_for_key_id_change(&first).await?;
    let info = "atrest_kms_key_id_hash_info";
    let metrics = eventually(WAIT, "metrics to show the new key_id hash", || async {
        let m = plugin.metrics().await?;
        Ok(m.get(info, &[("key_id_hash", &key_id_hash(&second))])
            .map(|_| m))
    })
    .await?;
    assert_eq!(
        metrics.get(info, &[("key_id_hash", &key_id_hash(&first))]),
        None,
        "old hash still exposed"
    );
    assert_eq!(metrics.get("atrest_kms_keks", &[]), Some(2.0));
    assert!(metrics.sum("atrest_kms_keyring_reloads_total", &[("result", "success")]) >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_listener_refuses_a_non_loopback_address() -> Result<()> {
    let port = atrest_tests::plugin::free_loopback_addr()?.port();
    let mut plugin = PluginProcess::spawn(
        PluginOptions::new()
            .arg("--metrics-addr")
            .arg(&format!("0.0.0.0:{port}")),
    )
    .await?;
    let status = plugin.wait().await?;
    assert_eq!(
        status.code(),
        Some(2),
        "--metrics-addr 0.0.0.0: {status}; log:\n{}",
        plugin.log()
    );
    assert!(
        plugin.log().contains("--metrics-addr") || plugin.log().contains("metrics-addr"),
        "{}",
        plugin.log()
    );
    Ok(())
}
