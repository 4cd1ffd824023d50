//! `kms-plugin probe`: exit 0 only when a server answers Status healthy,
//! exit 1 with a reason otherwise, exit 2 on a usage error.

#![allow(clippy::unwrap_used)]

use anyhow::Result;
use atrest_tests::plugin::{PluginOptions, PluginProcess, Transport, cli};

#[tokio::test(flavor = "multi_thread")]
async fn probe_exits_0_against_a_healthy_file_socket_server() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    let out = cli(["probe", "--listen", &plugin.endpoint().listen_arg()]).await?;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.starts_with("healthy"), "{out:?}");
    // A liveness probe's output is kept by kubelet: the verdict, no log lines.
    assert_eq!(out.stderr, "", "a healthy probe wrote to stderr: {out:?}");
    // The unix:// URL form names the same socket.
    let url = format!("unix://{}", plugin.endpoint().path().unwrap().display());
    let out = cli(["probe", "--listen", &url]).await?;
    assert_eq!(out.code(), Some(0), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_exits_0_against_a_healthy_abstract_socket_server() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new().transport(Transport::Abstract)).await?;
    let out = cli([
        "probe",
        "--listen",
        &plugin.endpoint().listen_arg(),
        "--timeout",
        "3s",
    ])
    .await?;
    assert_eq!(out.code(), Some(0), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_exits_1_with_a_reason_when_nothing_listens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("nothing.sock");
    let out = cli([
        "probe",
        "--listen",
        &path.display().to_string(),
        "--timeout",
        "2s",
    ])
    .await?;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&path.display().to_string()),
        "the reason does not name the socket: {out:?}"
    );
    assert!(
        out.stderr.contains("No such file or directory"),
        "the reason does not say why: {out:?}"
    );

    // A stale socket (file, no server) and a regular file are unreachable too.
    drop(std::os::unix::net::UnixListener::bind(&path)?);
    let out = cli([
        "probe",
        "--listen",
        &path.display().to_string(),
        "--timeout",
        "2s",
    ])
    .await?;
    assert_eq!(out.code(), Some(1), "stale socket: {out:?}");
    assert!(
        out.stderr.contains("Connection refused"),
        "the reason does not say why: {out:?}"
    );

    let file = dir.path().join("regular-file");
    std::fs::write(&file, b"not a socket")?;
    let out = cli([
        "probe",
        "--listen",
        &file.display().to_string(),
        "--timeout",
        "2s",
    ])
    .await?;
    assert_eq!(out.code(), Some(1), "regular file: {out:?}");
    assert!(
        out.stderr.contains(&file.display().to_string()),
        "the reason does not name the path: {out:?}"
    );

    let out = cli([
        "probe",
        "--listen",
        "unix:///@atrest-test-nobody-listens-here",
        "--timeout",
        "2s",
    ])
    .await?;
    assert_eq!(out.code(), Some(1), "abstract: {out:?}");
    assert!(!out.stderr.trim().is_empty(), "no reason given: {out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_exits_1_after_the_server_stopped() -> Result<()> {
    let mut plugin = PluginProcess::start(PluginOptions::new()).await?;
    let listen = plugin.endpoint().listen_arg();
    assert_eq!(cli(["probe", "--listen", &listen]).await?.code(), Some(0));
    plugin.sigterm()?;
    plugin.wait().await?;
    let out = cli(["probe", "--listen", &listen, "--timeout", "2s"]).await?;
    assert_eq!(out.code(), Some(1), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_exits_2_on_a_usage_error() -> Result<()> {
    for args in [
        vec!["probe", "--no-such-flag"],
        vec!["probe", "--listen", "tcp://127.0.0.1:1"],
        vec!["probe", "--listen", "/x.sock", "--timeout", "soon"],
    ] {
        let out = cli(&args).await?;
        assert_eq!(out.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.trim().is_empty(), "{args:?}: no message");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_roundtrip_passes_against_the_real_plugin_and_never_prints_the_value() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    let listen = plugin.endpoint().listen_arg();
    let status = plugin.status().await?;
    let out = cli(["probe", "--listen", &listen, "--roundtrip"]).await?;
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!("key_id {}", status.key_id))
            && out.stdout.contains("roundtrip: ok")
            && out.stdout.contains("68-byte ciphertext"),
        "{out:?}"
    );
    let out = cli([
        "probe",
        "--listen",
        &listen,
        "--roundtrip",
        "--output",
        "json",
    ])
    .await?;
    assert_eq!(out.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(v["healthy"], true, "{v}");
    assert_eq!(v["key_id"], status.key_id.as_str(), "{v}");
    assert_eq!(v["roundtrip"]["ok"], true, "{v}");
    assert_eq!(v["roundtrip"]["ciphertext_bytes"], 68, "{v}");
    for t in ["status_ms", "encrypt_ms", "decrypt_ms"] {
        assert!(v["roundtrip"][t].as_f64().is_some(), "{t}: {v}");
    }
    // The output holds the names above and nothing else: no field could carry the value.
    let keys: Vec<&str> = v["roundtrip"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "ciphertext_bytes",
            "decrypt_ms",
            "encrypt_ms",
            "ok",
            "status_ms"
        ]
    );
    // Without --roundtrip, JSON says so.
    let out = cli(["probe", "--listen", &listen, "--output", "json"]).await?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert!(v["roundtrip"].is_null(), "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_roundtrip_fails_against_a_broken_third_party_plugin() -> Result<()> {
    use atrest_tests::broken_kms::BrokenKms;
    let dir = tempfile::tempdir()?;
    for (fault, words) in [
        ("decrypt-fails", "Decrypt call to"),
        ("wrong-plaintext", "differ from the 32 bytes encrypted"),
        (
            "other-key-id",
            "Encrypt returned key_id \"broken-fixture-key-2\" but Status reported \"broken-fixture-key-1\"",
        ),
    ] {
        let socket = dir.path().join(format!("{fault}.sock"));
        let broken = BrokenKms::start(&socket, fault)?;
        // Status alone is healthy: only the round trip shows the fault.
        let out = cli(["probe", "--listen", &broken.endpoint()]).await?;
        assert_eq!(out.code(), Some(0), "{fault}: {out:?}");
        let out = cli(["probe", "--listen", &broken.endpoint(), "--roundtrip"]).await?;
        assert_eq!(out.code(), Some(1), "{fault}: {out:?}");
        assert!(
            out.stderr.contains("round trip failed") && out.stderr.contains(words),
            "{fault}: {out:?}"
        );
        assert!(out.stdout.is_empty(), "{fault}: {out:?}");
        if fault == "decrypt-fails" {
            assert!(
                out.stderr.contains("cannot decrypt"),
                "the plugin's reason: {out:?}"
            );
        }
    }
    Ok(())
}
