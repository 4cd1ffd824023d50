//! What `kms-plugin serve` logs: its version at start, a filter from
//! `ATREST_LOG`, plain or JSON lines.

#![allow(clippy::unwrap_used)]

use anyhow::Result;
use atrest_tests::plugin::{PluginOptions, PluginProcess, encrypt, seed};

#[tokio::test(flavor = "multi_thread")]
async fn version_and_key_id_are_logged_at_start() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    let key_id = plugin.status().await?.key_id;
    plugin.wait_for_log(env!("CARGO_PKG_VERSION")).await?;
    plugin.wait_for_log(&key_id).await?;
    let log = plugin.log();
    assert!(log.contains(" INFO "), "default filter is not info:\n{log}");
    assert!(
        !log.contains("DEBUG"),
        "debug lines at the default filter:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn atrest_log_filters_the_output() -> Result<()> {
    let mut plugin = PluginProcess::start(PluginOptions::new().log("warn")).await?;
    encrypt(&plugin.client(), &seed(1)).await?;
    plugin.sigterm()?;
    assert_eq!(plugin.wait().await?.code(), Some(0));
    let log = plugin.log();
    assert!(
        !log.contains(" INFO "),
        "info lines with ATREST_LOG=warn:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn json_log_format_writes_one_json_object_per_line() -> Result<()> {
    let mut plugin =
        PluginProcess::start(PluginOptions::new().arg("--log-format").arg("json")).await?;
    encrypt(&plugin.client(), &seed(1)).await?;
    plugin.sigterm()?;
    assert_eq!(plugin.wait().await?.code(), Some(0));
    let log = plugin.log();
    let mut lines = 0;
    for line in log.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(value.get("level").is_some(), "no level: {line}");
        assert!(value.get("timestamp").is_some(), "no timestamp: {line}");
        lines += 1;
    }
    assert!(lines >= 2, "expected start and stop lines:\n{log}");
    assert!(
        log.contains(env!("CARGO_PKG_VERSION")),
        "version not logged:\n{log}"
    );
    Ok(())
}
