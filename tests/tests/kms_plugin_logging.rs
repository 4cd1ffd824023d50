//! What `kms-plugin serve` logs: its version at start, a filter from
//! `ATREST_LOG`, plain or JSON lines, caller values escaped in plain lines.

#![allow(clippy::unwrap_used)]

use anyhow::Result;
use atrest_proto::kms::v2::{DecryptRequest, EncryptRequest};
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

/// A caller's `uid` and `key_id` are written escaped in the plain format: a
/// `\n` cannot forge a log line and an ESC byte never reaches the terminal.
#[tokio::test(flavor = "multi_thread")]
async fn caller_supplied_uid_and_key_id_cannot_forge_log_lines() -> Result<()> {
    let mut plugin = PluginProcess::start(PluginOptions::new().log("debug")).await?;
    let uid = "u-inj\nFORGED-LINE level=ERROR\u{1b}[2J\u{1b}[31m";
    let mut client = plugin.client();
    let encrypted = client
        .encrypt(EncryptRequest {
            plaintext: seed(7),
            uid: uid.to_owned(),
        })
        .await?
        .into_inner();
    client
        .decrypt(DecryptRequest {
            ciphertext: encrypted.ciphertext.clone(),
            uid: uid.to_owned(),
            key_id: encrypted.key_id.clone(),
            annotations: Default::default(),
        })
        .await?;
    let refused = client
        .decrypt(DecryptRequest {
            ciphertext: encrypted.ciphertext,
            uid: "u-2".to_owned(),
            key_id: "k\nFORGED-KEY-LINE\u{1b}]0;title\u{7}".to_owned(),
            annotations: Default::default(),
        })
        .await;
    assert!(refused.is_err(), "an unknown key_id was accepted");
    plugin.wait_for_log("decrypt refused").await?;
    plugin.sigterm()?;
    assert_eq!(plugin.wait().await?.code(), Some(0));

    let bytes = plugin.log_bytes();
    let log = String::from_utf8_lossy(&bytes);
    assert!(!bytes.contains(&0x1b), "raw ESC in the log:\n{log}");
    assert!(!bytes.contains(&0x07), "raw BEL in the log:\n{log}");
    for line in log.lines() {
        assert!(
            !line.starts_with("FORGED"),
            "a caller value started a log line: {line:?}"
        );
    }
    // The service shows caller values quoted, escaped and capped
    // (`service::shown`); the plain formatter would escape them anyway.
    let escaped_uid = "uid=\"u-inj\\nFORGED-LINE level=ERROR\\u{1b}[2J\\u{1b}[31m\"";
    let lines_with_uid: Vec<&str> = log.lines().filter(|l| l.contains(escaped_uid)).collect();
    assert!(
        lines_with_uid.len() >= 2,
        "encrypt and decrypt should each log the escaped uid once:\n{log}"
    );
    assert!(
        log.contains("k\\nFORGED-KEY-LINE\\u{1b}]0;title\\u{7}"),
        "the refused key_id is not shown escaped:\n{log}"
    );
    Ok(())
}
