//! Secrets never leave the plugin: with the most verbose logging, neither a
//! canary plaintext nor the KEK bytes appear in any form in the captured log,
//! stdout, or `/metrics`.

#![allow(clippy::unwrap_used)]

use anyhow::{Result, ensure};
use atrest_tests::plugin::{PluginOptions, PluginProcess, decrypt, encrypt};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use hkdf::Hkdf;
use sha2::Sha256;

/// 32 bytes, recognisable in any encoding.
const CANARY: &[u8; 32] = b"ATREST-CANARY-SEED-0123456789ab!";

/// Every form in which `secret` could show up in text output.
fn forms(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let debug = format!("{secret:?}");
    // A Debug dump cut short still shows its first elements.
    let debug_prefix = debug.split(", ").take(8).collect::<Vec<_>>().join(", ");
    let hex_debug = format!("{secret:x?}");
    let hex_debug_prefix = hex_debug.split(", ").take(8).collect::<Vec<_>>().join(", ");
    let mut forms = vec![
        ("raw".to_owned(), secret.to_vec()),
        ("hex".into(), hex::encode(secret).into_bytes()),
        ("HEX".into(), hex::encode_upper(secret).into_bytes()),
        ("base64".into(), STANDARD.encode(secret).into_bytes()),
        (
            "base64 no pad".into(),
            STANDARD_NO_PAD.encode(secret).into_bytes(),
        ),
        ("base64url".into(), URL_SAFE.encode(secret).into_bytes()),
        (
            "base64url no pad".into(),
            URL_SAFE_NO_PAD.encode(secret).into_bytes(),
        ),
        ("Debug".into(), debug.into_bytes()),
        ("Debug prefix".into(), debug_prefix.into_bytes()),
        ("hex Debug prefix".into(), hex_debug_prefix.into_bytes()),
    ];
    // Half of the raw bytes (either half) is already a leak.
    forms.push(("raw first half".into(), secret[..secret.len() / 2].to_vec()));
    forms.push((
        "raw second half".into(),
        secret[secret.len() / 2..].to_vec(),
    ));
    forms.push((
        "hex first half".into(),
        hex::encode(&secret[..secret.len() / 2]).into_bytes(),
    ));
    forms
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The first form of `secret` found in `text`, if any.
fn find_form(secret: &[u8], text: &[u8]) -> Option<String> {
    forms(secret)
        .into_iter()
        .find(|(_, bytes)| contains(text, bytes))
        .map(|(form, _)| form)
}

fn assert_absent(what: &str, secret: &[u8], outputs: &[(&str, &[u8])]) {
    for (output, text) in outputs {
        if let Some(form) = find_form(secret, text) {
            panic!("{what} appears ({form}) in {output}");
        }
    }
}

#[test]
fn the_scanner_finds_secrets_in_every_form() {
    for (form, bytes) in forms(CANARY) {
        let text = [b"prefix ".as_slice(), &bytes, b" suffix"].concat();
        assert!(find_form(CANARY, &text).is_some(), "{form} form not found");
    }
    let quoted = format!("plaintext={:?}", CANARY.to_vec());
    assert!(find_form(CANARY, quoted.as_bytes()).is_some());
    assert!(find_form(CANARY, b"nothing to see").is_none());
}

/// The KEK bytes in the keyring file (`keks[].material`, base64), and the
/// AES key the plugin derives from each (HKDF-SHA256, see kms-plugin's keyring module).
fn key_material(keyring_file: &[u8]) -> Result<Vec<Vec<u8>>> {
    let json: serde_json::Value = serde_json::from_slice(keyring_file)?;
    let mut keys = Vec::new();
    for kek in json["keks"].as_array().into_iter().flatten() {
        let encoded = kek["material"].as_str().unwrap_or_default();
        let material = STANDARD.decode(encoded)?;
        ensure!(
            material.len() == 32,
            "KEK material is {} bytes",
            material.len()
        );
        let mut derived = vec![0u8; 32];
        Hkdf::<Sha256>::from_prk(&material)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .expand(b"atrest kms-plugin v1 kek encryption key", &mut derived)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        keys.push(material);
        keys.push(derived);
    }
    for key in keys.iter().step_by(2) {
        // The scanner finds each KEK in the file it came from (as base64).
        ensure!(
            find_form(key, keyring_file).is_some(),
            "scanner missed a KEK in its own keyring file"
        );
    }
    ensure!(
        !keys.is_empty(),
        "found no key material in the keyring file: the test would prove nothing"
    );
    Ok(keys)
}

/// Runs encrypt/decrypt of the canary (plus refusals and a rotation, which log
/// the most) with `filter`, then scans every output.
async fn canary_and_keys_stay_out_of_outputs(
    filter: &str,
    extra: &[&str],
    level_marker: &str,
) -> Result<()> {
    let mut options = PluginOptions::new().metrics().log(filter);
    for arg in extra {
        options = options.arg(arg);
    }
    let mut plugin = PluginProcess::start(options).await?;
    let client = plugin.client();

    let response = encrypt(&client, CANARY).await?;
    assert_eq!(
        decrypt(&client, &response.ciphertext, &response.key_id).await?,
        CANARY
    );
    // Refusals log reasons: make sure none of them quotes the inputs.
    let mut tampered = response.ciphertext.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(decrypt(&client, &tampered, &response.key_id).await.is_err());
    assert!(
        decrypt(&client, &response.ciphertext, "unknown")
            .await
            .is_err()
    );
    assert!(encrypt(&client, &CANARY.repeat(40)).await.is_err());
    let rotated = plugin.keyring().rotate().await?;
    assert_eq!(
        plugin.wait_for_key_id_change(&response.key_id).await?,
        rotated
    );
    let second = encrypt(&client, CANARY).await?;
    assert_eq!(
        decrypt(&client, &second.ciphertext, &second.key_id).await?,
        CANARY
    );

    let metrics = plugin.metrics().await?.text;
    let keyring = std::fs::read(plugin.keyring().path())?;
    let keys = key_material(&keyring)?;
    plugin.sigterm()?;
    plugin.wait().await?;

    let log = plugin.log_bytes();
    let stdout = std::fs::read(plugin.dir().join("plugin.stdout"))?;
    // Not vacuous: the verbose levels were on and the calls were logged.
    let log_text = String::from_utf8_lossy(&log);
    assert!(
        log_text.contains(level_marker),
        "no {level_marker} lines with {filter}; log:\n{log_text}"
    );
    assert!(
        log_text.contains(&response.key_id),
        "the calls were not logged with {filter}; log:\n{log_text}"
    );

    let outputs: [(&str, &[u8]); 3] = [
        ("the log", &log),
        ("stdout", &stdout),
        ("/metrics", metrics.as_bytes()),
    ];
    assert_absent("the canary plaintext", CANARY, &outputs);
    for (i, key) in keys.iter().enumerate() {
        assert_absent(&format!("key #{i}"), key, &outputs);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn canary_and_keys_stay_out_of_debug_logs_and_metrics() -> Result<()> {
    canary_and_keys_stay_out_of_outputs("debug", &[], "DEBUG").await
}

#[tokio::test(flavor = "multi_thread")]
async fn canary_and_keys_stay_out_of_trace_logs_and_metrics() -> Result<()> {
    canary_and_keys_stay_out_of_outputs("trace", &[], "TRACE").await
}

#[tokio::test(flavor = "multi_thread")]
async fn canary_and_keys_stay_out_of_json_trace_logs() -> Result<()> {
    canary_and_keys_stay_out_of_outputs("trace", &["--log-format", "json"], "\"level\":\"TRACE\"")
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn keyring_cli_prints_no_key_material() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keyring.json");
    let keyring = atrest_tests::plugin::Keyring::at(&path);
    let mut printed = Vec::new();
    for sub in ["init", "rotate", "add"] {
        let out = keyring.run(sub, &[]).await?;
        printed.push(format!("{}{}", out.stdout, out.stderr));
        out.success()?;
    }
    for output in ["text", "json"] {
        let out = keyring.run("list", &["--output", output]).await?;
        printed.push(format!("{}{}", out.stdout, out.stderr));
        out.success()?;
    }
    let keys = key_material(&std::fs::read(&path)?)?;
    let printed = printed.concat();
    for (i, key) in keys.iter().enumerate() {
        assert_absent(
            &format!("key #{i}"),
            key,
            &[("keyring command output", printed.as_bytes())],
        );
    }
    Ok(())
}
