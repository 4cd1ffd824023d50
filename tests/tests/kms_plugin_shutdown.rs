//! Graceful shutdown: on SIGTERM/SIGINT the plugin stops taking new calls,
//! finishes the ones in flight, removes its socket and exits 0.

#![allow(clippy::unwrap_used)]

use anyhow::Result;
use atrest_proto::kms::v2::EncryptRequest;
use atrest_tests::plugin::{
    PluginOptions, PluginProcess, WAIT, decrypt, encrypt, eventually, hold_encrypt, seed,
};
use nix::sys::signal::Signal;

const HELD: u64 = 8;

/// Waits until the plugin no longer accepts connections: it has begun shutting down.
async fn wait_until_not_accepting(plugin: &PluginProcess) -> Result<()> {
    eventually(WAIT, "the plugin to stop accepting connections", || async {
        Ok(plugin
            .endpoint()
            .connect_stream()
            .await
            .is_err()
            .then_some(()))
    })
    .await
}

/// Starts held calls, signals, and checks every held call still completes.
async fn calls_in_flight_complete_on(signal: Signal) -> Result<()> {
    let mut plugin = PluginProcess::start(PluginOptions::new()).await?;
    let client = plugin.client();
    let path = plugin.endpoint().path().unwrap().to_owned();

    let mut held = Vec::new();
    for n in 0..HELD {
        let mut call = hold_encrypt(
            plugin.channel(),
            EncryptRequest {
                plaintext: seed(n),
                uid: format!("held-{n}"),
            },
        );
        call.started().await?;
        held.push((n, call));
    }
    // A call issued after the held ones was answered, so the server has read
    // every held call's headers (one connection, frames in order).
    let marker = encrypt(&client, &seed(100)).await?;
    for (n, call) in &held {
        assert!(
            !call.is_finished(),
            "held call {n} ended before it was released"
        );
    }

    // And a burst of ordinary calls racing the signal.
    let mut burst = Vec::new();
    for n in 0..64u64 {
        let client = client.clone();
        burst.push(tokio::spawn(async move {
            encrypt(&client, &seed(200 + n)).await
        }));
    }

    plugin.signal(signal)?;
    wait_until_not_accepting(&plugin).await?;

    let mut completed = Vec::new();
    for (n, call) in held {
        let response = call
            .release()
            .await?
            .unwrap_or_else(|status| panic!("held call {n} failed during shutdown: {status:?}"));
        completed.push((n, response));
    }
    for task in burst {
        // Racing the signal, a call may be refused; it must not hang or crash the plugin.
        let _ = task.await?;
    }

    let status = plugin.wait().await?;
    assert_eq!(
        status.code(),
        Some(0),
        "exit after {signal}: {status}; log:\n{}",
        plugin.log()
    );
    assert!(!path.exists(), "socket file left behind");

    // The answers given while draining are real: they decrypt in a new process
    // on the same keyring.
    let after = PluginProcess::start(PluginOptions::new().keyring(plugin.keyring().path())).await?;
    for (n, response) in completed.iter().chain(std::iter::once(&(100, marker))) {
        assert_eq!(
            decrypt(&after.client(), &response.ciphertext, &response.key_id).await?,
            seed(*n)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_calls_in_flight_complete_then_exits_0() -> Result<()> {
    calls_in_flight_complete_on(Signal::SIGTERM).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_lets_calls_in_flight_complete_then_exits_0() -> Result<()> {
    calls_in_flight_complete_on(Signal::SIGINT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_held_past_the_grace_period_does_not_keep_the_plugin_alive() -> Result<()> {
    let mut plugin =
        PluginProcess::start(PluginOptions::new().arg("--grace-period").arg("1s")).await?;
    let mut call = hold_encrypt(
        plugin.channel(),
        EncryptRequest {
            plaintext: seed(1),
            uid: "stuck".into(),
        },
    );
    call.started().await?;
    encrypt(&plugin.client(), &seed(2)).await?;
    plugin.sigterm()?;
    // Never released: the plugin must give up on it after the grace period.
    let status = plugin.wait().await?;
    assert_eq!(
        status.code(),
        Some(0),
        "exit with a stuck call: {status}; log:\n{}",
        plugin.log()
    );
    assert!(
        !plugin.endpoint().path().unwrap().exists(),
        "socket file left behind"
    );
    let outcome = call.release().await?;
    assert!(
        outcome.is_err(),
        "a call cut off by shutdown reported success"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_on_an_abstract_socket_exits_0() -> Result<()> {
    let mut plugin = PluginProcess::start(
        PluginOptions::new().transport(atrest_tests::plugin::Transport::Abstract),
    )
    .await?;
    encrypt(&plugin.client(), &seed(1)).await?;
    plugin.sigterm()?;
    assert_eq!(
        plugin.wait().await?.code(),
        Some(0),
        "log:\n{}",
        plugin.log()
    );
    assert!(
        plugin.endpoint().connect_stream().await.is_err(),
        "abstract socket still answers"
    );
    Ok(())
}
