//! A newer keyring is not enough: the real plugin refuses a file that is not
//! a successor of the keyring in service (another lineage, a KEK's material
//! edited, the primary gone) at reload, and a file that is not a successor
//! of its `.prev` at start; dropping a decrypt-only KEK is accepted with a
//! WARN naming the key_ids that no longer decrypt. Also: keyring paths that
//! are not small regular files are refused at start without hanging.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use anyhow::Result;
use atrest_tests::plugin::{
    Keyring, PluginOptions, PluginProcess, WAIT, decrypt, encrypt, eventually, seed,
    write_atomically,
};

const RELOADS: &str = "atrest_kms_keyring_reloads_total";

async fn start() -> Result<PluginProcess> {
    PluginProcess::start(PluginOptions::new().metrics()).await
}

async fn reloads(plugin: &PluginProcess, result: &str) -> Result<f64> {
    Ok(plugin.metrics().await?.sum(RELOADS, &[("result", result)]))
}

/// Waits until the reload counter for `result` exceeds `before`.
async fn wait_reload(plugin: &PluginProcess, result: &str, before: f64) -> Result<()> {
    eventually(
        WAIT,
        &format!("{RELOADS}{{result=\"{result}\"}} to increase"),
        || async { Ok((reloads(plugin, result).await? > before).then_some(())) },
    )
    .await
    .map_err(|e| e.context(format!("plugin log:\n{}", plugin.log())))
}

/// Replaces the plugin's keyring with `bytes` and checks the refusal end to
/// end: `rejected_successor` counted, a WARN naming the file and `why`, the
/// key_id unchanged, old and new ciphertexts decrypting.
async fn assert_not_a_successor(plugin: &PluginProcess, bytes: &[u8], why: &str) -> Result<()> {
    let client = plugin.client();
    let key_id = plugin.status().await?.key_id;
    let before = encrypt(&client, &seed(1)).await?;
    let refused = reloads(plugin, "rejected_successor").await?;
    let log_len = plugin.log().len();

    write_atomically(plugin.keyring().path(), bytes)?;
    wait_reload(plugin, "rejected_successor", refused).await?;

    let status = plugin.status().await?;
    assert_eq!(
        status.key_id, key_id,
        "the refused keyring changed the key_id"
    );
    assert_eq!(status.healthz, "ok");
    assert_eq!(
        decrypt(&client, &before.ciphertext, &before.key_id).await?,
        seed(1),
        "an earlier ciphertext stopped decrypting"
    );
    let after = encrypt(&client, &seed(2)).await?;
    assert_eq!(after.key_id, key_id);
    assert_eq!(
        decrypt(&client, &after.ciphertext, &after.key_id).await?,
        seed(2)
    );
    let log = plugin.log();
    let new_log = &log[log_len.min(log.len())..];
    let path = plugin.keyring().path().display().to_string();
    let line = new_log
        .lines()
        .find(|l| l.contains(&path) && l.contains("not a successor") && l.contains(why))
        .unwrap_or_else(|| panic!("no log line names {path} and says {why:?}; log:\n{new_log}"));
    assert!(line.contains("WARN"), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_keyring_with_a_higher_generation_is_refused() -> Result<()> {
    let plugin = start().await?;
    let other = tempfile::tempdir()?;
    let (foreign, _) = Keyring::init(other.path().join("keyring.json")).await?;
    for _ in 0..4 {
        foreign.rotate().await?;
    }
    let ours = plugin.keyring().list().await?;
    let theirs = foreign.list().await?;
    assert!(theirs.generation > ours.generation);
    assert_not_a_successor(
        &plugin,
        &std::fs::read(foreign.path())?,
        ours.lineage.as_deref().unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn this_keyring_with_edited_material_and_a_bumped_generation_is_refused() -> Result<()> {
    let plugin = start().await?;
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(plugin.keyring().path())?)?;
    json["generation"] = serde_json::json!(json["generation"].as_u64().unwrap() + 1);
    // Valid material (32 bytes), just not this KEK's.
    json["keks"][0]["material"] = serde_json::json!("RURJVEVEIEtFSyBNQVRFUklBTCAzMiBCWVRFUyEhISE=");
    assert_not_a_successor(
        &plugin,
        &serde_json::to_vec(&json)?,
        "KEK 1 has other key material",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_without_the_primary_in_service_is_refused() -> Result<()> {
    let plugin = start().await?;
    let success = reloads(&plugin, "success").await?;
    assert_eq!(plugin.keyring().add().await?, 2);
    wait_reload(&plugin, "success", success).await?;
    // Elsewhere, KEK 2 is promoted and KEK 1 retired at once; the plugin
    // sees both edits in one file.
    let copy_dir = tempfile::tempdir()?;
    let copy = Keyring::at(copy_dir.path().join("keyring.json"));
    std::fs::copy(plugin.keyring().path(), copy.path())?;
    copy.promote(2).await?;
    copy.retire(1).await?;
    assert_not_a_successor(
        &plugin,
        &std::fs::read(copy.path())?,
        "KEK 1, the primary in service, is gone",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn retiring_a_decrypt_only_kek_is_accepted_with_a_warning_naming_its_key_ids() -> Result<()> {
    let plugin = start().await?;
    let first = plugin.status().await?.key_id;
    let old = encrypt(&plugin.client(), &seed(7)).await?;
    let second = plugin.keyring().rotate().await?;
    assert_eq!(plugin.wait_for_key_id_change(&first).await?, second);

    let success = reloads(&plugin, "success").await?;
    let log_len = plugin.log().len();
    plugin.keyring().retire(1).await?;
    wait_reload(&plugin, "success", success).await?;

    assert_eq!(plugin.status().await?.key_id, second);
    let log = plugin.log();
    let new_log = &log[log_len.min(log.len())..];
    let line = new_log
        .lines()
        .find(|l| l.contains("no longer decrypt"))
        .unwrap_or_else(|| panic!("no WARN about dropped KEKs; log:\n{new_log}"));
    assert!(line.contains("WARN") && line.contains(&first), "{line}");
    assert!(
        decrypt(&plugin.client(), &old.ciphertext, &old.key_id)
            .await
            .is_err(),
        "a ciphertext of the retired KEK still decrypts"
    );
    Ok(())
}

/// Spawns `serve` on `path` and expects it to exit 1 with every `needles` in its log.
async fn assert_start_refused(path: &Path, needles: &[&str]) -> Result<()> {
    let mut plugin = PluginProcess::spawn(PluginOptions::new().keyring(path)).await?;
    let status = plugin.wait().await?;
    let log = plugin.log();
    assert_eq!(status.code(), Some(1), "{status}; log:\n{log}");
    for needle in needles {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_refuses_a_keyring_that_is_not_a_successor_of_its_prev() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ours, _) = Keyring::init(dir.path().join("keyring.json")).await?;
    ours.rotate().await?; // keyring.json.prev: our generation 1
    let other = tempfile::tempdir()?;
    let (foreign, _) = Keyring::init(other.path().join("keyring.json")).await?;
    for _ in 0..3 {
        foreign.rotate().await?;
    }
    // The foreign file lands while the plugin is down.
    write_atomically(ours.path(), &std::fs::read(foreign.path())?)?;
    let prev = dir.path().join("keyring.json.prev");
    assert_start_refused(
        ours.path(),
        &["lineage", &prev.display().to_string(), "move"],
    )
    .await?;

    // The operator means it: with .prev moved away, the plugin starts.
    std::fs::rename(&prev, dir.path().join("old-keyring.json"))?;
    let plugin = PluginProcess::start(PluginOptions::new().keyring(ours.path())).await?;
    assert_eq!(plugin.status().await?.key_id, foreign.list().await?.key_id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_refuses_a_rolled_back_keyring() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ours, _) = Keyring::init(dir.path().join("keyring.json")).await?;
    let older = std::fs::read(ours.path())?;
    ours.rotate().await?;
    ours.rotate().await?; // .prev is generation 2
    write_atomically(ours.path(), &older)?; // generation 1 copied back by hand
    assert_start_refused(ours.path(), &["not newer", "keyring.json.prev"]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_a_fifo_or_an_oversized_keyring_without_hanging() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let fifo = dir.path().join("fifo.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    // Without a non-blocking open the plugin would wait for a writer forever.
    assert_start_refused(&fifo, &["FIFO", "not a regular file"]).await?;

    let big = dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; 2 << 20])?;
    assert_start_refused(&big, &["larger than 1048576 bytes"]).await?;

    let listed = atrest_tests::plugin::cli([
        "keyring".as_ref(),
        "list".as_ref(),
        "--keyring".as_ref(),
        fifo.as_os_str(),
    ])
    .await?;
    assert_eq!(listed.code(), Some(1), "{}", listed.stderr);
    assert!(listed.stderr.contains("FIFO"), "{}", listed.stderr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_parse_error_never_echoes_what_was_pasted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (keyring, _) = Keyring::init(dir.path().join("keyring.json")).await?;
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(keyring.path())?)?;
    let secret = json["keks"][0]["material"].as_str().unwrap().to_owned();
    for (what, broken) in [
        ("format", {
            let mut j = json.clone();
            j["format"] = serde_json::json!(secret);
            j
        }),
        ("unknown field", {
            let mut j = json.clone();
            j[secret.as_str()] = serde_json::json!(1);
            j
        }),
    ] {
        write_atomically(keyring.path(), &serde_json::to_vec(&broken)?)?;
        let out = keyring.run("list", &[]).await?;
        assert_eq!(out.code(), Some(1), "{what}: {}", out.stderr);
        assert!(out.stderr.contains("not valid"), "{what}: {}", out.stderr);
        assert!(
            !out.stderr.contains(&secret[..12]),
            "{what} echoed: {}",
            out.stderr
        );
    }
    Ok(())
}
