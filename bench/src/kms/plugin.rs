//! Starting the real `kms-plugin` for a run (fresh keyring in a temp dir,
//! `serve` on a socket there) and stopping it after.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use atrest_proto::kms::v2::StatusRequest;
use atrest_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use kms_client::Endpoint;

/// How long `keyring init` may take, and how long a SIGTERM'd plugin may drain.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// A plugin process this run started; killed on drop if not stopped.
#[derive(Debug)]
pub struct SpawnedPlugin {
    child: Child,
    pid: u32,
    endpoint: Endpoint,
    log_path: PathBuf,
    // Keeps the keyring and socket dir alive until the plugin is gone.
    _dir: TempDir,
}

/// The plugin could not be started, did not become healthy, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot create a temp dir for the plugin: {0}")]
    TempDir(#[source] std::io::Error),
    #[error("cannot run {}: {source}", bin.display())]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{} keyring init` failed ({status}): {stderr}", bin.display())]
    KeyringInit {
        bin: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("`{} keyring init` did not finish within {STEP_TIMEOUT:?}", bin.display())]
    KeyringInitTimeout { bin: PathBuf },
    #[error("the plugin exited during start-up ({status}); its log ends with:\n{log_tail}")]
    ExitedEarly { status: String, log_tail: String },
    #[error(
        "the plugin did not report healthy on {endpoint} within {waited:?} (last: {last}); its log ends with:\n{log_tail}"
    )]
    NotReady {
        endpoint: String,
        waited: Duration,
        last: String,
        log_tail: String,
    },
    #[error(
        "the plugin exited with {status} after SIGTERM (expected 0); its log ends with:\n{log_tail}"
    )]
    BadExit { status: String, log_tail: String },
    #[error("the plugin did not exit within {STEP_TIMEOUT:?} of SIGTERM; killed it")]
    StopTimeout,
    #[error("cannot signal or wait for the plugin: {0}")]
    Signal(String),
}

impl SpawnedPlugin {
    /// `keyring init` then `serve --listen <tmp>/kms.sock`, and waits (up to
    /// `startup_timeout`) until Status says healthy. The plugin's stderr goes to
    /// `<tmp>/plugin.log` (a pipe nobody reads would eventually block it).
    pub async fn start(bin: &Path, startup_timeout: Duration) -> Result<Self, PluginError> {
        let dir = tempfile::Builder::new()
            .prefix("kms-loadgen-")
            .tempdir()
            .map_err(PluginError::TempDir)?;
        let keyring = dir.path().join("keyring.json");
        let socket = dir.path().join("kms.sock");
        let log_path = dir.path().join("plugin.log");

        let spawn_err = |source| PluginError::Spawn {
            bin: bin.to_path_buf(),
            source,
        };
        let init = Command::new(bin)
            .args(["keyring", "init", "--keyring"])
            .arg(&keyring)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let init = tokio::time::timeout(STEP_TIMEOUT, init)
            .await
            .map_err(|_| PluginError::KeyringInitTimeout {
                bin: bin.to_path_buf(),
            })?
            .map_err(spawn_err)?;
        if !init.status.success() {
            return Err(PluginError::KeyringInit {
                bin: bin.to_path_buf(),
                status: init.status.to_string(),
                stderr: String::from_utf8_lossy(&init.stderr).trim().to_owned(),
            });
        }

        let log = std::fs::File::create(&log_path).map_err(spawn_err)?;
        let child = Command::new(bin)
            .args(["serve", "--listen"])
            .arg(&socket)
            .arg("--keyring")
            .arg(&keyring)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        let pid = child
            .id()
            .ok_or_else(|| PluginError::Signal("the plugin has no pid right after spawn".into()))?;
        let mut plugin = SpawnedPlugin {
            child,
            pid,
            endpoint: Endpoint::Path(socket),
            log_path,
            _dir: dir,
        };
        plugin.wait_healthy(startup_timeout).await?;
        Ok(plugin)
    }

    /// The plugin's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where it listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), PluginError> {
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(PluginError::ExitedEarly {
                    status: status.to_string(),
                    log_tail: self.log_tail(),
                });
            }
            match kms_client::connect(&self.endpoint, Duration::from_secs(1)).await {
                Ok(channel) => {
                    let mut client = KeyManagementServiceClient::new(channel);
                    match client.status(StatusRequest {}).await {
                        Ok(resp) if resp.get_ref().healthz == "ok" => return Ok(()),
                        Ok(resp) => last = format!("healthz {:?}", resp.get_ref().healthz),
                        Err(status) => {
                            last = format!("Status: {:?}: {}", status.code(), status.message())
                        }
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(PluginError::NotReady {
            endpoint: self.endpoint.to_string(),
            waited: timeout,
            last,
            log_tail: self.log_tail(),
        })
    }

    /// SIGTERM, wait for a graceful exit 0; SIGKILL if it does not come.
    pub async fn stop(mut self) -> Result<(), PluginError> {
        let pid = i32::try_from(self.pid).map_err(|e| PluginError::Signal(e.to_string()))?;
        if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGTERM) {
            return Err(PluginError::Signal(format!("SIGTERM to {pid}: {e}")));
        }
        match tokio::time::timeout(STEP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(PluginError::BadExit {
                status: status.to_string(),
                log_tail: self.log_tail(),
            }),
            Ok(Err(e)) => Err(PluginError::Signal(e.to_string())),
            Err(_) => {
                // Best effort: kill_on_drop would also do it when `self` drops.
                let _ = self.child.kill().await;
                Err(PluginError::StopTimeout)
            }
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path, 20)
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            if tail.is_empty() {
                "(empty)".into()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The build profile a binary comes from: `target/<profile>/kms-plugin` → `<profile>`.
pub fn build_profile(bin: &Path) -> String {
    bin.parent()
        .and_then(Path::file_name)
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_is_the_parent_dir() {
        assert_eq!(
            build_profile(Path::new("/w/target/release/kms-plugin")),
            "release"
        );
        assert_eq!(
            build_profile(Path::new("/w/target/debug/kms-plugin")),
            "debug"
        );
        assert_eq!(build_profile(Path::new("kms-plugin")), "unknown");
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&path, 2), "c\nd");
        std::fs::write(&path, "").unwrap();
        assert_eq!(log_tail(&path, 2), "(empty)");
        assert!(log_tail(&dir.path().join("none"), 2).contains("none"));
    }

    #[tokio::test]
    async fn a_binary_that_is_not_the_plugin_is_reported() {
        // /bin/false stands in for a broken plugin binary: `keyring init` fails.
        let err = SpawnedPlugin::start(Path::new("/bin/false"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, PluginError::KeyringInit { .. }), "{err}");
        assert!(err.to_string().contains("/bin/false"), "{err}");
    }
}
