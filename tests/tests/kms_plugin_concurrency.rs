//! Encrypt and Status under concurrent load on one shared channel while the
//! keyring rotates repeatedly: no call fails, every Encrypt's key_id is one that
//! Status reported, and every ciphertext decrypts under the key_id it came with.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use atrest_proto::kms::v2::EncryptResponse;
use atrest_tests::plugin::{PluginOptions, PluginProcess, decrypt, encrypt, seed};

const TASKS: u64 = 16;
const ROTATIONS: usize = 10;

#[derive(Default)]
struct Seen {
    status_key_ids: Vec<String>,
    encrypted: Vec<(u64, EncryptResponse)>,
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_and_status_under_load_during_rotations_stay_consistent() -> Result<()> {
    let plugin = Arc::new(PluginProcess::start(PluginOptions::new()).await?);
    let stop = Arc::new(AtomicBool::new(false));

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (client, stop) = (plugin.client(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let status = client
                    .clone()
                    .status(atrest_proto::kms::v2::StatusRequest {})
                    .await;
                let status =
                    status.with_context(|| format!("task {task}: Status call {n} failed"))?;
                seen.status_key_ids.push(status.into_inner().key_id);
                let plaintext_id = task << 32 | n;
                let response = encrypt(&client, &seed(plaintext_id))
                    .await
                    .with_context(|| format!("task {task}: Encrypt call {n} failed"))?;
                seen.encrypted.push((plaintext_id, response));
                n += 1;
            }
            anyhow::Ok(seen)
        }));
    }

    // Each rotation waits until Status shows it, so every key_id is reported
    // by Status for a while (and the load tasks sample it).
    let mut rotated_to = Vec::new();
    let mut current = plugin.status().await?.key_id;
    let mut main_status_key_ids = vec![current.clone()];
    for _ in 0..ROTATIONS {
        let printed = plugin.keyring().rotate().await?;
        current = plugin.wait_for_key_id_change(&current).await?;
        assert_eq!(
            current, printed,
            "Status moved to a key_id rotate did not print"
        );
        main_status_key_ids.push(current.clone());
        rotated_to.push(printed);
    }
    stop.store(true, Ordering::Relaxed);

    let mut status_key_ids: HashSet<String> = main_status_key_ids.into_iter().collect();
    let mut encrypted = Vec::new();
    for task in tasks {
        let seen = task.await??;
        status_key_ids.extend(seen.status_key_ids);
        encrypted.extend(seen.encrypted);
    }
    assert!(
        encrypted.len() as u64 >= TASKS,
        "the load tasks made {} calls",
        encrypted.len()
    );

    let client = plugin.client();
    let mut encrypt_key_ids = HashSet::new();
    for (plaintext_id, response) in &encrypted {
        assert!(
            status_key_ids.contains(&response.key_id),
            "Encrypt returned key_id {} that Status never reported",
            response.key_id
        );
        encrypt_key_ids.insert(response.key_id.clone());
        let back = decrypt(&client, &response.ciphertext, &response.key_id)
            .await
            .with_context(|| {
                format!(
                    "decrypting a ciphertext returned with key_id {}",
                    response.key_id
                )
            })?;
        assert_eq!(
            back,
            seed(*plaintext_id),
            "round trip changed the plaintext"
        );
    }
    // The load really spanned rotations (each lasts at least a reload).
    assert!(
        encrypt_key_ids.len() >= 2,
        "all {} Encrypts saw one key_id",
        encrypted.len()
    );
    assert_eq!(
        rotated_to.iter().collect::<HashSet<_>>().len(),
        ROTATIONS,
        "rotate printed a key_id twice"
    );
    Ok(())
}
