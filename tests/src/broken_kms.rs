//! The `broken-kms-plugin` fixture (kube-apiserver-standin crate, tests
//! only): a third-party KMS v2 plugin whose Status is healthy but whose
//! Decrypt fails, returns other bytes, or whose Encrypt returns a key_id
//! Status never reported. Not a mock of atrest's kms-plugin. Killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::plugin::bin_path;

/// A running fixture.
#[derive(Debug)]
pub struct BrokenKms {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    socket: PathBuf,
}

impl BrokenKms {
    /// Starts `broken-kms-plugin --listen SOCKET --fault FAULT` (`decrypt-fails`,
    /// `wrong-plaintext`, `other-key-id`) and waits until it listens.
    pub fn start(socket: &Path, fault: &str) -> Result<Self> {
        let mut child = Command::new(bin_path("broken-kms-plugin"))
            .arg("--listen")
            .arg(socket)
            .args(["--fault", fault])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning broken-kms-plugin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("fixture stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if !line.starts_with("listening on ") {
            let _ = child.kill();
            bail!("broken-kms-plugin did not start: {line:?}");
        }
        Ok(BrokenKms {
            child,
            _stdout: stdout,
            socket: socket.to_owned(),
        })
    }

    /// `unix://SOCKET`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for BrokenKms {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
