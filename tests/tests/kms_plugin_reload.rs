//! A keyring file that turns bad under a running plugin (corrupt, rolled back,
//! unreadable, gone) is refused: the plugin keeps serving the keyring it had,
//! logs why, and counts the refusal in `/metrics`.

#![allow(clippy::unwrap_used)]

use anyhow::Result;
use atrest_tests::plugin::{
    PluginOptions, PluginProcess, WAIT, decrypt, encrypt, eventually, seed, write_atomically,
};

const RELOADS: &str = "atrest_kms_keyring_reloads_total";

async fn start() -> Result<PluginProcess> {
    PluginProcess::start(PluginOptions::new().metrics()).await
}

/// Breaks the keyring with `damage`, then checks the refusal end to end:
/// the `result` counter grows, the log names the file and says `why`, and
/// the plugin still serves the previous keyring for Status, Encrypt, Decrypt.
async fn assert_reload_refused(
    plugin: &PluginProcess,
    result: &str,
    why: &str,
    damage: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let client = plugin.client();
    let key_id = plugin.status().await?.key_id;
    let before = encrypt(&client, &seed(1)).await?;
    let refused_before = plugin.metrics().await?.sum(RELOADS, &[("result", result)]);
    let log_len = plugin.log().len();

    damage()?;

    eventually(
        WAIT,
        &format!("{RELOADS}{{result=\"{result}\"}} to increase"),
        || async {
            let now = plugin.metrics().await?.sum(RELOADS, &[("result", result)]);
            Ok((now > refused_before).then_some(()))
        },
    )
    .await
    .map_err(|e| e.context(format!("plugin log:\n{}", plugin.log())))?;

    let status = plugin.status().await?;
    assert_eq!(
        status.key_id, key_id,
        "the refused keyring changed the key_id"
    );
    assert_eq!(
        status.healthz, "ok",
        "a refused reload made the plugin unhealthy"
    );
    let after = encrypt(&client, &seed(2)).await?;
    assert_eq!(after.key_id, key_id);
    assert_eq!(
        decrypt(&client, &after.ciphertext, &after.key_id).await?,
        seed(2)
    );
    assert_eq!(
        decrypt(&client, &before.ciphertext, &before.key_id).await?,
        seed(1)
    );

    let log = plugin.log();
    let new_log = &log[log_len.min(log.len())..];
    let path = plugin.keyring().path().display().to_string();
    let line = new_log
        .lines()
        .find(|l| l.contains(&path) && l.contains(why))
        .unwrap_or_else(|| {
            panic!("no log line names {path} and says {why:?}; new log:\n{new_log}")
        });
    assert!(
        line.contains("WARN") || line.contains("ERROR"),
        "a refused reload is logged below warning: {line}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_keyring_is_refused_and_the_old_one_keeps_serving() -> Result<()> {
    let plugin = start().await?;
    let path = plugin.keyring().path().to_owned();
    assert_reload_refused(&plugin, "rejected_invalid", "not valid", || {
        write_atomically(&path, b"\x00\x13garbage that is not a keyring \xff\xfe{")
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn keyring_with_broken_key_material_is_refused() -> Result<()> {
    let plugin = start().await?;
    let path = plugin.keyring().path().to_owned();
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    // A newer generation, so only the material can be the reason for refusal.
    json["generation"] = serde_json::json!(json["generation"].as_u64().unwrap() + 1);
    json["keks"][0]["material"] = serde_json::json!("c2hvcnQ=");
    assert_reload_refused(&plugin, "rejected_invalid", "material", || {
        write_atomically(&path, &serde_json::to_vec(&json)?)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_keyring_file_is_refused() -> Result<()> {
    let plugin = start().await?;
    let path = plugin.keyring().path().to_owned();
    assert_reload_refused(&plugin, "rejected_invalid", "not valid", || {
        std::fs::File::create(&path)?; // truncates in place
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn rolled_back_keyring_is_refused_and_the_newer_one_keeps_serving() -> Result<()> {
    let plugin = start().await?;
    let path = plugin.keyring().path().to_owned();
    let older = std::fs::read(&path)?;
    let first = plugin.status().await?.key_id;
    let newer = plugin.keyring().rotate().await?;
    assert_eq!(plugin.wait_for_key_id_change(&first).await?, newer);
    assert_reload_refused(&plugin, "rejected_rollback", "generation", || {
        write_atomically(&path, &older)
    })
    .await?;
    assert_eq!(plugin.status().await?.key_id, newer);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unreadable_keyring_is_refused() -> Result<()> {
    let plugin = start().await?;
    let path = plugin.keyring().path().to_owned();
    // Root ignores chmod 000: a directory in place of the file cannot be read by anyone.
    assert_reload_refused(&plugin, "rejected_unreadable", "cannot read", || {
        std::fs::remove_file(&path)?;
        std::fs::create_dir(&path)?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_keyring_is_refused() -> Result<()> {
    let plugin = start().await?;
    let path = plugin.keyring().path().to_owned();
    assert_reload_refused(&plugin, "rejected_unreadable", "cannot read", || {
        std::fs::remove_file(&path)?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_keyring_is_accepted_again_after_a_refused_one() -> Result<()> {
    let plugin = start().await?;
    let path = plugin.keyring().path().to_owned();
    let good = std::fs::read(&path)?;
    assert_reload_refused(&plugin, "rejected_invalid", "not valid", || {
        write_atomically(&path, b"{not json")
    })
    .await?;

    write_atomically(&path, &good)?;
    let first = plugin.status().await?.key_id;
    let rotated = plugin.keyring().rotate().await?;
    assert_eq!(plugin.wait_for_key_id_change(&first).await?, rotated);
    let response = encrypt(&plugin.client(), &seed(3)).await?;
    assert_eq!(response.key_id, rotated);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_to_start_on_a_bad_keyring() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (name, content) in [
        ("garbage.json", Some(&b"garbage"[..])),
        ("missing.json", None),
    ] {
        let path = dir.path().join(name);
        if let Some(content) = content {
            std::fs::write(&path, content)?;
        }
        let mut plugin = PluginProcess::spawn(PluginOptions::new().keyring(&path)).await?;
        let status = plugin.wait().await?;
        assert_eq!(
            status.code(),
            Some(1),
            "serve on {name}: {status}; log:\n{}",
            plugin.log()
        );
        assert!(
            plugin.log().contains(&path.display().to_string()),
            "the error does not name {}; log:\n{}",
            path.display(),
            plugin.log()
        );
    }
    Ok(())
}
