//! Kit for driving the real `kms-plugin` binary in tests.
//!
//! - [`PluginProcess`] starts `kms-plugin serve` as a child process in a fresh
//!   temporary directory with its own keyring, on a file or abstract unix socket,
//!   with stderr captured to a file for log assertions.
//! - [`connect`] dials the plugin's gRPC service over the unix socket.
//! - [`Keyring`] runs the `kms-plugin keyring …` commands; [`cli`] runs any command.
//! - [`http_get`] and [`Metrics`] read the plugin's `/metrics`, `/healthz`, `/readyz`.
//! - [`frames`]: raw HTTP/2 frames and HPACK for hostile or unusual clients.
//!
//! Everything waits with a bound ([`eventually`]) and fails with a message that
//! says what was awaited; nothing asserts on latency.

mod cli;
mod client;
pub mod frames;
mod http;
mod process;

pub use cli::{CliOutput, KekEntry, Keyring, KeyringList, cli, cli_env};
pub use client::{
    HeldCall, KmsClient, SocketEndpoint, connect, decrypt, encrypt, hold_encrypt, seed,
};
pub use http::{HttpResponse, Metrics, Sample, http_get, http_request};
pub use process::{PluginOptions, PluginProcess, Transport, free_loopback_addr};

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

/// How long tests wait for an asynchronous effect (a reload, a startup, an exit).
/// A bound on waiting on a loaded 2-core CI machine, not a performance target.
pub const WAIT: Duration = Duration::from_secs(20);

/// Path of a binary built from this workspace, e.g. `bin_path("kms-plugin")`.
///
/// Test executables live in `target/<profile>/deps/`; the workspace's binaries
/// in `target/<profile>/`. Panics with instructions when the binary is missing,
/// because every test that needs it would fail anyway.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let mut dir = exe
        .parent()
        .expect("the test executable has a parent directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}: run `cargo build --workspace --bins` \
             (same profile as the tests) before running the tests",
            path.display()
        );
    }
    path
}

/// Polls `probe` until it returns `Ok(Some(value))`, at most `timeout`.
///
/// `Ok(None)` and `Err(_)` both mean "not yet"; the last error is reported in
/// the timeout message together with `what` was awaited.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_error {
                Some(e) => {
                    anyhow!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replaces `path` with `bytes` the way a careful tool would (temp file, fsync,
/// rename), so a watcher never sees a half-written file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("test-tmp");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
