//! The plugin against hostile or broken clients and files (issue 7): a FIFO
//! or a huge keyring, a self-feeding watcher, a refused file that must stay
//! visible, clients that never read, descriptor exhaustion, idle connections
//! at shutdown, a hung listener on the socket path, a symlink race on the
//! socket directory. Every test drives the real `kms-plugin` binary.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use atrest_proto::kms::v2::{DecryptRequest, StatusRequest};
use atrest_tests::plugin::frames::{PREFACE, frame, grpc_call};
use atrest_tests::plugin::{
    PluginOptions, PluginProcess, SocketEndpoint, WAIT, connect, eventually, http_get,
    write_atomically,
};
use tokio::io::AsyncWriteExt;

const READS: &str = "atrest_kms_keyring_reads_total";

/// Status on a fresh connection, bounded: a plugin that stopped serving fails
/// here instead of hanging the test.
async fn status_on_new_connection(plugin: &PluginProcess) -> Result<String> {
    let call = async {
        let channel = connect(plugin.endpoint()).await?;
        let status = atrest_tests::plugin::KmsClient::new(channel)
            .status(StatusRequest {})
            .await
            .context("Status")?
            .into_inner();
        Ok::<_, anyhow::Error>(status.healthz)
    };
    tokio::time::timeout(WAIT, call)
        .await
        .with_context(|| format!("Status did not answer within {WAIT:?}"))?
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ").context("no ) in /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// /proc/PID/stat counts CPU time in USER_HZ ticks, 100 per second on Linux.
fn clock_ticks_per_second() -> u64 {
    100
}

/// Resident memory of `pid` in KiB.
fn rss_kib(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

// ---------------------------------------------------------------- item 3

/// A FIFO at the keyring path blocks any read of it for ever. The read runs
/// off the runtime: Status, /healthz and SIGTERM still work, and the stalled
/// read is reported.
#[tokio::test]
async fn a_fifo_at_the_keyring_path_blocks_nothing_but_reloads() -> Result<()> {
    let mut plugin = PluginProcess::start(
        PluginOptions::new()
            .metrics()
            .arg("--worker-threads")
            .arg("1")
            .arg("--reload-interval")
            .arg("1s"),
    )
    .await?;
    let key_id = plugin.status().await?.key_id;
    let keyring = plugin.keyring().path().to_owned();
    let fifo = keyring.with_extension("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    std::fs::rename(&fifo, &keyring)?;

    // The FIFO is refused (the read opens without blocking and takes regular
    // files only); were a read ever stuck, it would be reported as "has not
    // finished". (Bounded as a whole: a plugin stuck on the FIFO accepts the
    // HTTP connection and never answers.)
    let reported = eventually(WAIT, "/readyz to report the FIFO refused", || async {
        let r = http_get(plugin.metrics_addr(), "/readyz").await?;
        Ok((r.status == 503
            && (r.body.contains("not a regular file") || r.body.contains("has not finished")))
        .then_some(r))
    });
    tokio::time::timeout(WAIT + Duration::from_secs(5), reported)
        .await
        .context("the metrics listener stopped answering")?
        .with_context(|| plugin.log())?;
    for _ in 0..5 {
        assert_eq!(status_on_new_connection(&plugin).await?, "ok");
        assert_eq!(plugin.status().await?.key_id, key_id);
    }
    let healthz = http_get(plugin.metrics_addr(), "/healthz").await?;
    assert_eq!(healthz.status, 200, "{}", healthz.body);
    let m = plugin.metrics().await?;
    assert_eq!(m.get("atrest_kms_keyring_file_ok", &[]), Some(0.0), "gauge");

    plugin.sigterm()?;
    let status = plugin.wait().await?;
    assert!(status.success(), "exit {status}; log:\n{}", plugin.log());
    assert!(
        !plugin.endpoint().path().unwrap().exists(),
        "socket left behind"
    );
    Ok(())
}

/// A 50 MB file at the keyring path is read and refused on the side; calls
/// keep being answered on the single worker thread while it is re-read.
#[tokio::test]
async fn a_huge_keyring_file_does_not_starve_calls() -> Result<()> {
    let plugin = PluginProcess::start(
        PluginOptions::new()
            .metrics()
            .arg("--worker-threads")
            .arg("1")
            .arg("--reload-interval")
            .arg("1s"),
    )
    .await?;
    let keyring = plugin.keyring().path().to_owned();
    let mut huge = b"{\"format\":\"".to_vec();
    huge.resize(50 << 20, b'a');
    huge.extend_from_slice(b"\"}");
    write_atomically(&keyring, &huge)?;
    let before = plugin.metrics().await?.get(READS, &[]).unwrap_or(0.0);
    // Calls while the plugin reads the file a few times (each bounded by WAIT,
    // a bound on waiting, not a latency target).
    let mut answered = 0;
    loop {
        assert_eq!(status_on_new_connection(&plugin).await?, "ok");
        answered += 1;
        let reads = plugin.metrics().await?.get(READS, &[]).unwrap_or(0.0);
        if reads >= before + 3.0 && answered >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Refused before it is read: larger than the 1 MiB a keyring may have.
    eventually(
        WAIT,
        "the huge file to be refused as unreadable",
        || async {
            let m = plugin.metrics().await?;
            Ok((m.sum(
                "atrest_kms_keyring_reloads_total",
                &[("result", "rejected_unreadable")],
            ) >= 1.0)
                .then_some(()))
        },
    )
    .await
    .with_context(|| plugin.log())?;
    Ok(())
}

// ---------------------------------------------------------------- item 4

/// An idle plugin reads its keyring once per poll, not on its own reads'
/// watch events.
#[tokio::test]
async fn an_idle_plugin_reads_its_keyring_only_as_often_as_it_polls() -> Result<()> {
    let plugin = PluginProcess::start(
        PluginOptions::new()
            .metrics()
            .arg("--reload-interval")
            .arg("2s"),
    )
    .await?;
    let before = plugin.metrics().await?.get(READS, &[]).context(READS)?;
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let after = plugin.metrics().await?.get(READS, &[]).context(READS)?;
    // 10 s / 2 s = 5 polls, plus one at each edge of the window.
    assert!(
        after - before <= 7.0,
        "{} keyring reads in {window:?} with a 2 s poll",
        after - before
    );
    assert!(after - before >= 1.0, "the poll stopped reading");

    // The watch still sees a real change at once (well before the next polls
    // would add up): a rotation is picked up.
    let old = plugin.status().await?.key_id;
    plugin.keyring().rotate().await?;
    plugin.wait_for_key_id_change(&old).await?;
    Ok(())
}

// ---------------------------------------------------------------- item 2

/// While the file on disk is refused, Status stays "ok" (the keyring in
/// service serves correctly), but /readyz, /healthz's text and the gauges
/// say the file is refused and why; fixing the file clears them.
#[tokio::test]
async fn a_refused_keyring_file_is_visible_until_fixed() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new().metrics()).await?;
    let keyring = plugin.keyring().path().to_owned();
    let good = std::fs::read(&keyring)?;
    let readyz = plugin.http("/readyz").await?;
    assert_eq!((readyz.status, readyz.body.as_str()), (200, "ok\n"));
    let m = plugin.metrics().await?;
    assert_eq!(m.get("atrest_kms_keyring_file_ok", &[]), Some(1.0));

    write_atomically(&keyring, b"{ not json")?;
    eventually(WAIT, "the gauge to show the refusal", || async {
        let m = plugin.metrics().await?;
        Ok((m.get("atrest_kms_keyring_file_ok", &[]) == Some(0.0)).then_some(m))
    })
    .await
    .with_context(|| plugin.log())
    .map(|m| {
        assert_eq!(
            m.get(
                "atrest_kms_keyring_file_rejected",
                &[("reason", "rejected_invalid")]
            ),
            Some(1.0)
        );
        assert_eq!(
            m.get(
                "atrest_kms_keyring_file_rejected",
                &[("reason", "rejected_rollback")]
            ),
            Some(0.0)
        );
    })?;
    let readyz = plugin.http("/readyz").await?;
    assert_eq!(readyz.status, 503, "{}", readyz.body);
    assert!(
        readyz.body.contains("keyring file on disk refused")
            && readyz.body.contains("rejected_invalid")
            && readyz.body.contains("JSON syntax error"),
        "{}",
        readyz.body
    );
    let healthz = plugin.http("/healthz").await?;
    assert_eq!(healthz.status, 200, "{}", healthz.body);
    assert!(
        healthz.body.contains("keyring file on disk refused"),
        "{}",
        healthz.body
    );
    assert_eq!(plugin.status().await?.healthz, "ok");

    // The good file back: nothing refused any more.
    write_atomically(&keyring, &good)?;
    eventually(WAIT, "/readyz to be ok again", || async {
        let r = plugin.http("/readyz").await?;
        Ok((r.status == 200).then_some(()))
    })
    .await
    .with_context(|| plugin.log())?;
    let m = plugin.metrics().await?;
    assert_eq!(m.get("atrest_kms_keyring_file_ok", &[]), Some(1.0));
    assert_eq!(
        m.sum("atrest_kms_keyring_file_rejected", &[]),
        0.0,
        "a reason is still set"
    );
    Ok(())
}

// ---------------------------------------------------------------- item 5

/// Clients that open many streams and never read a byte of the answers:
/// the plugin's memory stays bounded, and other callers are served.
#[tokio::test]
async fn clients_that_never_read_cannot_grow_the_plugin() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    let pid = plugin.pid().as_raw();
    let baseline = rss_kib(pid)?;
    let path = plugin.endpoint().path().unwrap().to_owned();

    const CONNECTIONS: usize = 20;
    const CALLS: u32 = 3000;
    let mut hostile = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut s = tokio::net::UnixStream::connect(&path).await?;
        let mut bytes = PREFACE.to_vec();
        frame(&mut bytes, 0x4, 0, 0, &[]); // SETTINGS
        for i in 0..CALLS {
            bytes.extend(grpc_call(
                1 + 2 * i,
                b"localhost",
                "/v2.KeyManagementService/Status",
                &[],
            ));
        }
        // Writes until the plugin stops reading (or closes): never read.
        let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(&bytes)).await;
        hostile.push(s);
    }
    let mut peak = 0;
    for _ in 0..10 {
        assert_eq!(status_on_new_connection(&plugin).await?, "ok");
        peak = peak.max(rss_kib(pid)?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "RSS: baseline {baseline} KiB, peak with {CONNECTIONS} x {CALLS} unread calls {peak} KiB"
    );
    assert!(
        peak < baseline + 64 * 1024,
        "plugin grew from {baseline} KiB to {peak} KiB"
    );

    // An oversized key_id is refused first, and never echoed whole.
    let client = plugin.client();
    for (len, code) in [
        (2000, tonic::Code::FailedPrecondition),
        (200_000, tonic::Code::OutOfRange),
    ] {
        let err = client
            .clone()
            .decrypt(DecryptRequest {
                ciphertext: vec![1; 68],
                uid: "u".into(),
                key_id: "\u{1}".repeat(len),
                annotations: Default::default(),
            })
            .await
            .unwrap_err();
        assert!(
            err.message().len() < 200,
            "{len}-byte key_id: {} byte message",
            err.message().len()
        );
        assert!(
            err.code() == code || err.code() == tonic::Code::ResourceExhausted,
            "{len}-byte key_id: {err:?}"
        );
    }
    drop(hostile);
    assert_eq!(plugin.status().await?.healthz, "ok");
    Ok(())
}

// ---------------------------------------------------------------- item 6

/// Out of file descriptors, the accept loop backs off and logs instead of
/// spinning; a connection it already had keeps being served; once
/// descriptors are free again, new connections are accepted.
#[tokio::test]
async fn out_of_descriptors_the_plugin_backs_off_instead_of_spinning() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new().metrics()).await?;
    let pid = plugin.pid().as_raw();
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--nofile=48:48")
        .output()
        .context("running prlimit (util-linux)")?;
    if !out.status.success() {
        bail!("prlimit failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let path = plugin.endpoint().path().unwrap().to_owned();
    let mut held = Vec::new();
    for _ in 0..100 {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    plugin
        .wait_for_log("cannot accept connections")
        .await
        .context("no log about the failing accepts")?;
    let ticks = clock_ticks_per_second();
    let before = cpu_ticks(pid)?;
    let window = Duration::from_secs(3);
    let mut answered = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < window {
        assert_eq!(plugin.status().await?.healthz, "ok");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let used = cpu_ticks(pid)? - before;
    println!(
        "plugin CPU over {window:?} out of descriptors: {used} ticks ({ticks}/s), {answered} Status calls answered"
    );
    // A spinning accept loop burns the whole window (3 s of CPU); backing off
    // costs next to nothing.
    assert!(
        used * 1000 / ticks < 1000,
        "plugin used {used} ticks of CPU in {window:?}: spinning"
    );
    drop(held);
    eventually(WAIT, "a new connection to be served again", || async {
        Ok(Some(status_on_new_connection(&plugin).await?))
    })
    .await?;
    Ok(())
}

/// SIGTERM with only idle connections open exits without waiting out the
/// grace period, and does not claim calls were in flight.
#[tokio::test]
async fn sigterm_with_only_idle_connections_exits_promptly() -> Result<()> {
    let mut plugin =
        PluginProcess::start(PluginOptions::new().arg("--grace-period").arg("120s")).await?;
    // Idle connections: the kit's channel, one more, and one whose client
    // said hello and then never reads (it will never answer the PING that a
    // graceful HTTP/2 shutdown waits for).
    let _other = connect(plugin.endpoint()).await?;
    let _ = plugin.status().await?;
    let mut silent = tokio::net::UnixStream::connect(plugin.endpoint().path().unwrap()).await?;
    let mut hello = PREFACE.to_vec();
    frame(&mut hello, 0x4, 0, 0, &[]);
    silent.write_all(&hello).await?;
    let _ = plugin.status().await?;
    plugin.sigterm()?;
    // `wait` gives up after WAIT (20 s), far below the 120 s grace period.
    let status = plugin.wait().await?;
    assert!(status.success(), "exit {status}; log:\n{}", plugin.log());
    let log = plugin.log();
    assert!(!log.contains("still in flight"), "{log}");
    Ok(())
}

// ---------------------------------------------------------------- item 7

/// A listener that holds the socket path but never accepts (its backlog
/// full) makes `serve` refuse at once, saying what it found.
#[tokio::test]
async fn a_hung_listener_on_the_socket_path_is_refused_not_waited_for() -> Result<()> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect as nix_connect, listen,
        socket,
    };
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("kms.sock");
    let listener = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(&path)?;
    bind(listener.as_raw_fd(), &addr)?;
    listen(&listener, Backlog::new(1)?)?;
    let mut clients = Vec::new();
    loop {
        let c = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        match nix_connect(c.as_raw_fd(), &addr) {
            Ok(()) => clients.push(c),
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => bail!("filling the backlog: {e}"),
        }
        if clients.len() > 1000 {
            bail!("the backlog never filled");
        }
    }
    let mut plugin =
        PluginProcess::spawn(PluginOptions::new().endpoint(SocketEndpoint::File(path.clone())))
            .await?;
    let status = plugin.wait().await?;
    assert_eq!(status.code(), Some(1), "log:\n{}", plugin.log());
    let log = plugin.log();
    assert!(
        log.contains("does not accept connections") && log.contains(&path.display().to_string()),
        "{log}"
    );
    assert!(path.exists(), "the hung listener's socket was removed");
    drop(clients);
    drop(listener);
    Ok(())
}

// ---------------------------------------------------------------- item 13

/// Starts the plugin once on `socket` with mode 0666; returns when it has
/// bound its socket or has exited.
async fn start_once(socket: &Path, keyring: &Path) -> Result<()> {
    let mut plugin = PluginProcess::spawn(
        PluginOptions::new()
            .keyring(keyring)
            .endpoint(SocketEndpoint::File(socket.to_owned()))
            .arg("--socket-mode")
            .arg("0666"),
    )
    .await?;
    let deadline = std::time::Instant::now() + WAIT;
    while plugin.try_exit_status()?.is_none() && !plugin.log().contains("kms-plugin serving") {
        if std::time::Instant::now() > deadline {
            bail!(
                "the plugin neither bound its socket nor exited within {WAIT:?}; log:\n{}",
                plugin.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(plugin);
    Ok(())
}

/// A racer in a shared (sticky, world-writable) directory replaces the
/// plugin's socket with a symlink to a victim file the moment it appears,
/// while the plugin starts again and again: the victim's mode never changes
/// (the mode is set where no one else can reach, then renamed into place).
#[tokio::test]
async fn the_socket_mode_never_follows_a_symlink_swapped_in_during_startup() -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let keyring_dir = tempfile::tempdir()?;
    let keyring = keyring_dir.path().join("keyring.json");
    atrest_tests::plugin::Keyring::init(&keyring).await?;
    let victim = keyring_dir.path().join("victim");
    std::fs::File::create(&victim)?.write_all(b"precious")?;
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600))?;

    let shared = tempfile::tempdir()?;
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o1777))?;
    let socket = shared.path().join("kms.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let racer = {
        let (stop, socket, victim) = (stop.clone(), socket.clone(), victim.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u32;
            while !stop.load(Ordering::Relaxed) {
                match std::fs::symlink_metadata(&socket) {
                    Ok(m) if m.file_type().is_socket() => {
                        let _ = std::fs::remove_file(&socket);
                        let _ = std::os::unix::fs::symlink(&victim, &socket);
                        swaps += 1;
                    }
                    Ok(m) if m.file_type().is_symlink() => {
                        // Leave the link a moment, then clear the way for the next start.
                        std::thread::sleep(Duration::from_millis(20));
                        let _ = std::fs::remove_file(&socket);
                    }
                    _ => std::hint::spin_loop(),
                }
            }
            swaps
        })
    };
    for _ in 0..15 {
        start_once(&socket, &keyring).await?;
        let mode = std::fs::metadata(&victim)?.permissions().mode() & 0o7777;
        assert_eq!(
            mode, 0o600,
            "the victim's mode was changed through a symlink"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = racer.join().unwrap();
    assert!(swaps > 0, "the racer never saw a socket to swap");
    assert_eq!(std::fs::read(&victim)?, b"precious");
    Ok(())
}

/// A socket directory others may write to, without the sticky bit, is refused.
#[tokio::test]
async fn a_world_writable_socket_directory_without_sticky_bit_is_refused() -> Result<()> {
    let shared = tempfile::tempdir()?;
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o777))?;
    let socket = shared.path().join("kms.sock");
    let mut plugin =
        PluginProcess::spawn(PluginOptions::new().endpoint(SocketEndpoint::File(socket.clone())))
            .await?;
    let status = plugin.wait().await?;
    assert_eq!(status.code(), Some(1), "log:\n{}", plugin.log());
    assert!(
        plugin
            .log()
            .contains("writable by others without the sticky bit"),
        "{}",
        plugin.log()
    );
    assert!(!socket.exists());
    Ok(())
}

/// Connections with no call in flight for `--idle-timeout` are closed (also
/// one whose client never reads); a connection with a call in flight is not.
#[tokio::test]
async fn idle_connections_are_closed_busy_ones_are_not() -> Result<()> {
    const CONNECTIONS: &str = "atrest_kms_connections";
    let plugin = PluginProcess::start(
        PluginOptions::new()
            .metrics()
            .arg("--idle-timeout")
            .arg("2s"),
    )
    .await?;
    let mut idle = Vec::new();
    for _ in 0..3 {
        let channel = connect(plugin.endpoint()).await?;
        atrest_tests::plugin::KmsClient::new(channel.clone())
            .status(StatusRequest {})
            .await?;
        idle.push(channel);
    }
    let mut silent = tokio::net::UnixStream::connect(plugin.endpoint().path().unwrap()).await?;
    let mut hello = PREFACE.to_vec();
    frame(&mut hello, 0x4, 0, 0, &[]);
    silent.write_all(&hello).await?;
    eventually(WAIT, "the kit's + 3 + 1 connections to be open", || async {
        let open = plugin.metrics().await?.get(CONNECTIONS, &[]).unwrap_or(0.0);
        Ok((open >= 5.0).then_some(()))
    })
    .await?;

    // A call held in flight on a connection of its own.
    let busy = connect(plugin.endpoint()).await?;
    let mut held = atrest_tests::plugin::hold_encrypt(
        busy,
        atrest_proto::kms::v2::EncryptRequest {
            plaintext: vec![7; 32],
            uid: "held".into(),
        },
    );
    held.started().await?;

    eventually(WAIT, "every idle connection to be closed", || async {
        let open = plugin
            .metrics()
            .await?
            .get(CONNECTIONS, &[])
            .unwrap_or(-1.0);
        Ok((open == 1.0).then_some(()))
    })
    .await
    .with_context(|| plugin.log())?;
    assert!(!held.is_finished(), "the held call's connection was closed");
    let response = held.release().await?.context("the held call failed")?;
    assert!(!response.ciphertext.is_empty());
    // Closed idle channels reconnect on their next call.
    assert_eq!(plugin.status().await?.healthz, "ok");
    Ok(())
}
