//! Socket hygiene of `kms-plugin serve`: a stale socket is replaced, a live
//! server or a regular file at the path makes it refuse, the socket mode is
//! set explicitly, and the socket file is removed on a graceful exit.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use anyhow::Result;
use atrest_tests::plugin::{
    PluginOptions, PluginProcess, SocketEndpoint, Transport, encrypt, seed,
};

fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Spawns a plugin that must refuse to start; returns its log.
async fn assert_refuses_to_start(options: PluginOptions, why: &str) -> Result<String> {
    let mut plugin = PluginProcess::spawn(options).await?;
    let status = plugin.wait().await?;
    let log = plugin.log();
    assert_eq!(
        status.code(),
        Some(1),
        "expected exit 1 ({why}); got {status}; log:\n{log}"
    );
    assert!(log.contains(why), "the log does not say {why:?}:\n{log}");
    Ok(log)
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_file_is_replaced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kms.sock");
    // Rust's UnixListener does not unlink its file on drop: a stale socket.
    drop(std::os::unix::net::UnixListener::bind(&path)?);
    assert!(std::fs::symlink_metadata(&path)?.file_type().is_socket());

    let plugin =
        PluginProcess::start(PluginOptions::new().endpoint(SocketEndpoint::File(path.clone())))
            .await?;
    let response = encrypt(&plugin.client(), &seed(1)).await?;
    assert!(!response.ciphertext.is_empty());
    assert_eq!(mode_of(&path), 0o600);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_to_start_where_a_live_server_serves() -> Result<()> {
    let first = PluginProcess::start(PluginOptions::new()).await?;
    let log = assert_refuses_to_start(
        PluginOptions::new().endpoint(first.endpoint().clone()),
        "already serving",
    )
    .await?;
    let path = first.endpoint().path().unwrap().display().to_string();
    assert!(
        log.contains(&path),
        "the refusal does not name {path}:\n{log}"
    );
    // The refused one left the first server's socket alone.
    assert!(
        first.endpoint().path().unwrap().exists(),
        "socket removed by the refused server"
    );
    let fresh = atrest_tests::plugin::connect(first.endpoint()).await?;
    let status = atrest_tests::plugin::KmsClient::new(fresh)
        .status(atrest_proto::kms::v2::StatusRequest {})
        .await?;
    assert_eq!(status.into_inner().healthz, "ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_to_start_where_a_live_server_serves_an_abstract_socket() -> Result<()> {
    let first = PluginProcess::start(PluginOptions::new().transport(Transport::Abstract)).await?;
    assert_refuses_to_start(
        PluginOptions::new().endpoint(first.endpoint().clone()),
        "already serving",
    )
    .await?;
    assert_eq!(first.status().await?.healthz, "ok");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_to_unlink_a_regular_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kms.sock");
    std::fs::write(&path, b"not a socket: precious data")?;
    assert_refuses_to_start(
        PluginOptions::new().endpoint(SocketEndpoint::File(path.clone())),
        "not a socket",
    )
    .await?;
    assert_eq!(
        std::fs::read(&path)?,
        b"not a socket: precious data",
        "the file was changed or removed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_to_unlink_a_directory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kms.sock");
    std::fs::create_dir(&path)?;
    std::fs::write(path.join("inside"), b"x")?;
    assert_refuses_to_start(
        PluginOptions::new().endpoint(SocketEndpoint::File(path.clone())),
        "not a socket",
    )
    .await?;
    assert_eq!(std::fs::read(path.join("inside"))?, b"x");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_a_socket_in_a_missing_directory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("no-such-dir").join("kms.sock");
    assert_refuses_to_start(
        PluginOptions::new().endpoint(SocketEndpoint::File(path.clone())),
        &dir.path().join("no-such-dir").display().to_string(),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_mode_is_0600_by_default() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    assert_eq!(mode_of(plugin.endpoint().path().unwrap()), 0o600);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_mode_flag_is_honoured() -> Result<()> {
    let plugin =
        PluginProcess::start(PluginOptions::new().arg("--socket-mode").arg("0660")).await?;
    assert_eq!(mode_of(plugin.endpoint().path().unwrap()), 0o660);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_file_is_removed_after_a_graceful_exit() -> Result<()> {
    let mut plugin = PluginProcess::start(PluginOptions::new()).await?;
    let path = plugin.endpoint().path().unwrap().to_owned();
    assert!(path.exists());
    plugin.sigterm()?;
    let status = plugin.wait().await?;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exit: {status}; log:\n{}",
        plugin.log()
    );
    assert!(
        !path.exists(),
        "socket file left behind after a graceful exit"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_plugin_serves_the_same_path_and_key_id() -> Result<()> {
    let mut first = PluginProcess::start(PluginOptions::new()).await?;
    let key_id = first.status().await?.key_id;
    let response = encrypt(&first.client(), &seed(1)).await?;
    first.sigterm()?;
    assert_eq!(first.wait().await?.code(), Some(0));

    let second = PluginProcess::start(
        PluginOptions::new()
            .endpoint(first.endpoint().clone())
            .keyring(first.keyring().path()),
    )
    .await?;
    assert_eq!(
        second.status().await?.key_id,
        key_id,
        "key_id changed across a restart"
    );
    let back =
        atrest_tests::plugin::decrypt(&second.client(), &response.ciphertext, &response.key_id)
            .await?;
    assert_eq!(back, seed(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_group_flag_is_honoured() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let group = nix::unistd::Group::from_name("nogroup")?.expect("Debian has a nogroup group");
    let plugin = PluginProcess::start(
        PluginOptions::new()
            .arg("--socket-group")
            .arg("nogroup")
            .arg("--socket-mode")
            .arg("0660"),
    )
    .await?;
    let meta = std::fs::metadata(plugin.endpoint().path().unwrap())?;
    assert_eq!(meta.gid(), group.gid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_an_unknown_socket_group() -> Result<()> {
    let mut plugin = PluginProcess::spawn(
        PluginOptions::new()
            .arg("--socket-group")
            .arg("no-such-group-atrest"),
    )
    .await?;
    let status = plugin.wait().await?;
    assert!(!status.success(), "started with an unknown group");
    assert!(
        plugin.log().contains("no-such-group-atrest"),
        "the error does not name the group:\n{}",
        plugin.log()
    );
    assert!(
        !plugin.endpoint().path().unwrap().exists(),
        "a socket was left behind"
    );
    Ok(())
}
