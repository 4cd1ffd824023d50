//! The kms-plugin keyring, through the real `kms-plugin keyring ...` CLI.
//!
//! Each host's plugin has its own copy of one keyring file, and a `key_id`
//! depends only on what is in the file, so the rotator changes the keyring of
//! the first host with the CLI and copies that file byte for byte to the
//! others (atomically, 0600, keeping a `.bak`). Promoting on every host
//! separately could give each host a different generation.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// One KEK as `keyring list --output json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekInfo {
    /// KEK number.
    pub kek: u32,
    /// `primary` or `decrypt-only`.
    pub state: String,
    /// Its current key_id (public, not a secret); `None` for a KEK never primary.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Every key_id it ever had.
    #[serde(default)]
    pub key_ids: Vec<String>,
}

/// `keyring list --output json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringInfo {
    /// File generation (grows with each change).
    pub generation: u64,
    /// Number of the primary KEK.
    pub primary: u32,
    /// All KEKs.
    pub keks: Vec<KekInfo>,
}

impl KeyringInfo {
    /// The primary KEK's entry.
    pub fn primary_kek(&self) -> Option<&KekInfo> {
        self.keks.iter().find(|k| k.kek == self.primary)
    }

    /// A KEK by number.
    pub fn kek(&self, n: u32) -> Option<&KekInfo> {
        self.keks.iter().find(|k| k.kek == n)
    }
}

/// The CLI failed or said something unexpected.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The binary could not be started.
    #[error("cannot run {bin}: {source} (set kmsPlugin in the rotator config or --kms-plugin)")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited non-zero.
    #[error("`kms-plugin keyring {action} --keyring {keyring}` failed ({status}): {stderr}")]
    Failed {
        /// Sub-command.
        action: String,
        /// Keyring path.
        keyring: PathBuf,
        /// Exit status.
        status: String,
        /// Its stderr (the plugin never prints key material).
        stderr: String,
    },
    /// `list --output json` printed something else.
    #[error("`kms-plugin keyring list --keyring {keyring}` printed unexpected JSON: {message}")]
    BadJson {
        /// Keyring path.
        keyring: PathBuf,
        /// Parser message.
        message: String,
    },
}

/// Runs the kms-plugin binary's keyring sub-commands.
#[derive(Debug, Clone)]
pub struct KeyringCli {
    bin: PathBuf,
}

impl KeyringCli {
    /// Uses `bin`.
    pub fn new(bin: PathBuf) -> Self {
        Self { bin }
    }

    /// The binary: the configured one, else `kms-plugin` beside this
    /// executable, else `kms-plugin` from `PATH`.
    pub fn locate(configured: Option<&Path>) -> Self {
        if let Some(p) = configured {
            return Self::new(p.to_owned());
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("kms-plugin")))
            .filter(|p| p.is_file());
        Self::new(beside.unwrap_or_else(|| PathBuf::from("kms-plugin")))
    }

    /// The binary used.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    fn run(&self, keyring: &Path, action: &str, extra: &[String]) -> Result<String, KeyringError> {
        let out = Command::new(&self.bin)
            .arg("keyring")
            .arg(action)
            .arg("--keyring")
            .arg(keyring)
            .args(extra)
            .output()
            .map_err(|source| KeyringError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(KeyringError::Failed {
                action: action.to_owned(),
                keyring: keyring.to_owned(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `keyring list --output json`.
    pub fn list(&self, keyring: &Path) -> Result<KeyringInfo, KeyringError> {
        let text = self.run(keyring, "list", &["--output".into(), "json".into()])?;
        serde_json::from_str(&text).map_err(|e| KeyringError::BadJson {
            keyring: keyring.to_owned(),
            message: e.to_string(),
        })
    }

    /// `keyring add`: a new decrypt-only KEK. Returns its key_id.
    pub fn add(&self, keyring: &Path) -> Result<String, KeyringError> {
        self.run(keyring, "add", &[])
    }

    /// `keyring promote --kek N`. Returns the new primary key_id.
    pub fn promote(&self, keyring: &Path, kek: u32) -> Result<String, KeyringError> {
        self.run(keyring, "promote", &["--kek".into(), kek.to_string()])
    }

    /// `keyring retire --kek N`.
    pub fn retire(&self, keyring: &Path, kek: u32) -> Result<(), KeyringError> {
        self.run(keyring, "retire", &["--kek".into(), kek.to_string()])
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_list_json() {
        let text = r#"{"generation":3,"primary":2,"keks":[
            {"kek":1,"state":"decrypt-only","created":"2026-01-01T00:00:00Z","key_id":"a","key_ids":["a"]},
            {"kek":2,"state":"primary","created":"2026-01-02T00:00:00Z","key_id":"b2","key_ids":["b1","b2"]}]}"#;
        let info: KeyringInfo = serde_json::from_str(text).unwrap();
        assert_eq!(info.primary_kek().unwrap().key_id.as_deref(), Some("b2"));
        let fresh: KekInfo = serde_json::from_str(
            r#"{"kek":3,"state":"decrypt-only","created":"x","key_id":null,"key_ids":[]}"#,
        )
        .unwrap();
        assert_eq!(fresh.key_id, None);
        assert_eq!(info.kek(1).unwrap().state, "decrypt-only");
        assert!(info.kek(3).is_none());
    }
}
