//! KEK rotation while the real plugin serves: `keyring rotate|add|promote|retire`
//! change the file, the plugin reloads it, Status moves to the new key_id and
//! everything encrypted before stays readable (until its KEK is retired).

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use atrest_tests::plugin::{
    PluginOptions, PluginProcess, WAIT, decrypt, encrypt, eventually, seed,
};
use tonic::Code;

async fn start() -> Result<PluginProcess> {
    PluginProcess::start(PluginOptions::new().metrics()).await
}

/// Waits until the plugin reports a successful keyring reload beyond `before`.
async fn wait_for_successful_reload(plugin: &PluginProcess, before: f64) -> Result<()> {
    eventually(
        WAIT,
        "keyring_reloads_total{result=\"success\"} to increase",
        || async {
            let now = plugin
                .metrics()
                .await?
                .sum("atrest_kms_keyring_reloads_total", &[("result", "success")]);
            Ok((now > before).then_some(()))
        },
    )
    .await
}

async fn successful_reloads(plugin: &PluginProcess) -> Result<f64> {
    Ok(plugin
        .metrics()
        .await?
        .sum("atrest_kms_keyring_reloads_total", &[("result", "success")]))
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_while_serving_moves_status_to_the_new_key_id() -> Result<()> {
    let plugin = start().await?;
    let first = plugin.status().await?.key_id;
    assert_eq!(
        plugin
            .keyring()
            .list()
            .await?
            .primary_kek()
            .unwrap()
            .key_id
            .as_deref(),
        Some(first.as_str())
    );

    let printed = plugin.keyring().rotate().await?;
    assert_ne!(printed, first, "rotate printed the old key_id");
    let now = plugin.wait_for_key_id_change(&first).await?;
    assert_eq!(
        now, printed,
        "Status moved to a key_id other than the one rotate printed"
    );

    let list = plugin.keyring().list().await?;
    assert_eq!(list.keks.len(), 2);
    assert_eq!(
        list.primary_kek().unwrap().key_id.as_deref(),
        Some(printed.as_str())
    );
    assert_eq!(list.keks.iter().filter(|k| k.state == "primary").count(), 1);
    assert!(
        list.keks
            .iter()
            .any(|k| k.state == "decrypt-only" && k.key_ids.contains(&first))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ciphertexts_from_before_a_rotation_still_decrypt() -> Result<()> {
    let plugin = start().await?;
    let client = plugin.client();
    let mut old = Vec::new();
    for n in 0..8 {
        old.push((n, encrypt(&client, &seed(n)).await?));
    }
    let first = old[0].1.key_id.clone();
    plugin.keyring().rotate().await?;
    plugin.wait_for_key_id_change(&first).await?;
    for (n, response) in &old {
        assert_eq!(
            decrypt(&client, &response.ciphertext, &response.key_id).await?,
            seed(*n)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_after_a_rotation_carries_the_new_key_id() -> Result<()> {
    let plugin = start().await?;
    let client = plugin.client();
    let first = plugin.status().await?.key_id;
    let printed = plugin.keyring().rotate().await?;
    plugin.wait_for_key_id_change(&first).await?;
    for n in 0..8 {
        let response = encrypt(&client, &seed(n)).await?;
        assert_eq!(response.key_id, printed);
        assert_eq!(response.key_id, plugin.status().await?.key_id);
        assert_eq!(
            decrypt(&client, &response.ciphertext, &response.key_id).await?,
            seed(n)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn promoting_the_old_kek_again_gives_a_never_seen_key_id() -> Result<()> {
    let plugin = start().await?;
    let client = plugin.client();
    let keyring = plugin.keyring();
    let under_first = encrypt(&client, &seed(1)).await?;
    let second = keyring.rotate().await?;
    plugin.wait_for_key_id_change(&under_first.key_id).await?;
    let under_second = encrypt(&client, &seed(2)).await?;

    let mut seen: HashSet<String> = keyring.list().await?.all_key_ids().into_iter().collect();
    seen.insert(under_first.key_id.clone());
    seen.insert(second.clone());

    let third = keyring.promote(1).await?;
    assert!(!seen.contains(&third), "promote reused key_id {third}");
    assert_eq!(plugin.wait_for_key_id_change(&second).await?, third);

    let list = keyring.list().await?;
    assert_eq!(list.primary, 1, "KEK 1 is primary again");
    let kek1 = list.primary_kek().unwrap();
    assert_eq!(kek1.key_id.as_deref(), Some(third.as_str()));
    assert!(kek1.key_ids.contains(&under_first.key_id) && kek1.key_ids.contains(&third));

    assert_eq!(
        decrypt(&client, &under_first.ciphertext, &under_first.key_id).await?,
        seed(1)
    );
    assert_eq!(
        decrypt(&client, &under_second.ciphertext, &under_second.key_id).await?,
        seed(2)
    );
    let under_third = encrypt(&client, &seed(3)).await?;
    assert_eq!(under_third.key_id, third);
    assert_eq!(
        decrypt(&client, &under_third.ciphertext, &third).await?,
        seed(3)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn status_key_id_never_flips_back_during_a_rotation() -> Result<()> {
    let plugin = Arc::new(start().await?);
    let first = plugin.status().await?.key_id;
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (plugin, done) = (plugin.clone(), done.clone());
        tokio::spawn(async move {
            let mut observed = Vec::new();
            while !done.load(Ordering::Relaxed) {
                observed.push(plugin.status().await.map(|s| s.key_id));
            }
            observed
        })
    };
    let second = plugin.keyring().rotate().await?;
    plugin.wait_for_key_id_change(&first).await?;
    // Keep watching a little after the switch: a flip-back would show up here.
    for _ in 0..200 {
        assert_eq!(plugin.status().await?.key_id, second);
    }
    done.store(true, Ordering::Relaxed);
    let observed: Vec<String> = watcher.await?.into_iter().collect::<Result<_>>()?;
    let switch = observed
        .iter()
        .position(|k| *k == second)
        .unwrap_or(observed.len());
    assert!(
        observed[..switch].iter().all(|k| *k == first),
        "unexpected key_id before the switch"
    );
    assert!(
        observed[switch..].iter().all(|k| *k == second),
        "key_id flipped back after the switch"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_added_kek_is_decrypt_only_until_promoted() -> Result<()> {
    let plugin = start().await?;
    let keyring = plugin.keyring();
    let first = plugin.status().await?.key_id;
    let reloads = successful_reloads(&plugin).await?;
    let added = keyring.add().await?;
    wait_for_successful_reload(&plugin, reloads).await?;
    assert_eq!(
        plugin.status().await?.key_id,
        first,
        "adding a staged KEK changed the write key_id"
    );
    assert_eq!(encrypt(&plugin.client(), &seed(1)).await?.key_id, first);
    let list = keyring.list().await?;
    assert_eq!(list.keks.len(), 2);
    assert_eq!(list.keks[1].kek, added);
    assert_eq!(list.keks[1].state, "decrypt-only");
    assert_eq!(
        list.keks[1].key_id, None,
        "a never-promoted KEK has a key_id"
    );
    assert_eq!(list.primary, list.keks[0].kek);
    let metrics = plugin.metrics().await?;
    assert_eq!(metrics.get("atrest_kms_keks", &[]), Some(2.0));

    let promoted = keyring.promote(added).await?;
    assert_eq!(plugin.wait_for_key_id_change(&first).await?, promoted);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retiring_a_kek_makes_its_key_ids_unknown() -> Result<()> {
    let plugin = start().await?;
    let client = plugin.client();
    let keyring = plugin.keyring();
    let old = encrypt(&client, &seed(1)).await?;
    keyring.rotate().await?;
    plugin.wait_for_key_id_change(&old.key_id).await?;
    let reloads = successful_reloads(&plugin).await?;
    keyring.retire(1).await?;
    wait_for_successful_reload(&plugin, reloads).await?;

    let refused = decrypt(&client, &old.ciphertext, &old.key_id).await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(Code::FailedPrecondition)
    );
    let new = encrypt(&client, &seed(2)).await?;
    assert_eq!(
        decrypt(&client, &new.ciphertext, &new.key_id).await?,
        seed(2)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retiring_the_primary_kek_is_refused() -> Result<()> {
    let plugin = start().await?;
    let before = std::fs::read(plugin.keyring().path())?;
    let out = plugin.keyring().run("retire", &["--kek", "1"]).await?;
    assert_eq!(out.code(), Some(1), "retire of the primary: {out:?}");
    assert!(
        !out.stderr.trim().is_empty(),
        "retire of the primary gave no reason"
    );
    assert_eq!(
        std::fs::read(plugin.keyring().path())?,
        before,
        "keyring changed"
    );
    assert!(plugin.status().await?.healthz == "ok");
    Ok(())
}

/// Two hosts during the rotator's promote stage: one plugin already serves the
/// promoted keyring copy, the other still the copy from the add stage. What
/// the promoted one writes must decrypt on the other, or that host's
/// apiserver cannot read its peers' new writes until the copy reaches it.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_on_the_pre_promote_copy_reads_what_a_promoted_peer_writes() -> Result<()> {
    let behind = start().await?;
    let reloads = successful_reloads(&behind).await?;
    let added = behind.keyring().add().await?;
    wait_for_successful_reload(&behind, reloads).await?;

    // The peer host: a byte-for-byte copy of the add stage's keyring, then promoted.
    let peer_dir = tempfile::tempdir()?;
    let peer_keyring = peer_dir.path().join("keyring.json");
    atrest_tests::plugin::write_atomically(
        &peer_keyring,
        &std::fs::read(behind.keyring().path())?,
    )?;
    let ahead = PluginProcess::start(PluginOptions::new().metrics().keyring(&peer_keyring)).await?;
    let before = ahead.status().await?.key_id;
    let promoted = ahead.keyring().promote(added).await?;
    assert_eq!(ahead.wait_for_key_id_change(&before).await?, promoted);

    let written = encrypt(&ahead.client(), &seed(7)).await?;
    assert_eq!(written.key_id, promoted);
    assert_eq!(
        decrypt(&behind.client(), &written.ciphertext, &written.key_id).await?,
        seed(7),
        "the plugin still on the pre-promote copy cannot read the promoted peer's write"
    );
    // It still writes under its own primary until its copy is promoted too.
    assert_eq!(behind.status().await?.key_id, before);

    // Only the next promotion is answered early: a key_id one epoch further is unknown.
    let further = ahead.keyring().promote(1).await?;
    ahead.wait_for_key_id_change(&promoted).await?;
    let again = ahead.keyring().promote(added).await?;
    assert_eq!(ahead.wait_for_key_id_change(&further).await?, again);
    let later = encrypt(&ahead.client(), &seed(8)).await?;
    let refused = decrypt(&behind.client(), &later.ciphertext, &later.key_id)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    Ok(())
}
