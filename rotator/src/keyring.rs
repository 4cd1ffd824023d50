//! The kms-plugin keyring, through the real `kms-plugin keyring ...` CLI.
//!
//! Each host's plugin has its own copy of one keyring file, and a `key_id`
//! depends only on what is in the file, so the rotator changes the keyring of
//! the first host with the CLI and copies that file byte for byte to the
//! others (atomically, 0600, keeping a `.prev`). Promoting on every host
//! separately could give each host a different generation.
//!
//! The listing is the `keyring` crate's [`Listing`]; the rotator reads only a
//! listing whose `format` it knows (why the rotator drives the CLI instead of
//! linking the crate: see the `keyring` crate docs).
//!
//! The CLI runs on the host that holds the keyring, through
//! [`HostFs::kms_plugin`](crate::hostfs::HostFs::kms_plugin): the local binary
//! for a local host, the host's own `kms-plugin` over SSH for a remote one.

use std::path::{Path, PathBuf};

use ::keyring::{LISTING_FORMAT, Listing};

use crate::hostfs::{HostError, HostFs};
use crate::targets::Host;

/// The CLI failed or said something unexpected.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The binary could not be started, or its host not reached.
    #[error(transparent)]
    Host(#[from] HostError),
    /// It exited non-zero.
    #[error(
        "`kms-plugin keyring {action} --keyring {keyring}` on host {host} failed ({status}): {stderr}"
    )]
    Failed {
        /// Host name.
        host: String,
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
    /// The plugin binary prints a listing format this rotator does not know.
    #[error(
        "`{bin} keyring list` prints listing format {found}, but this rotator reads {LISTING_FORMAT:?}: use the kms-plugin released with this rotator"
    )]
    UnknownFormat {
        /// The binary (and its host, when remote).
        bin: String,
        /// What it printed (escaped, shortened), or `none`.
        found: String,
    },
}

/// Runs the kms-plugin binary's keyring sub-commands on a host.
#[derive(Debug, Clone, Default)]
pub struct KeyringCli {
    add_flags: Vec<String>,
}

impl KeyringCli {
    /// No extra flags.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extra flags for `keyring add` (e.g. the PKCS#11 ones that put the new
    /// KEK in a token).
    pub fn with_add_flags(mut self, flags: Vec<String>) -> Self {
        self.add_flags = flags;
        self
    }

    fn run(
        &self,
        at: (&HostFs, &Host),
        keyring: &Path,
        action: &str,
        extra: &[String],
    ) -> Result<String, KeyringError> {
        let (fs, host) = at;
        let mut args = vec![
            "keyring".into(),
            action.into(),
            "--keyring".into(),
            keyring.as_os_str().to_owned(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        let out = fs.kms_plugin(host, &args)?;
        if !out.status.success() {
            return Err(KeyringError::Failed {
                host: host.name.clone(),
                action: action.to_owned(),
                keyring: keyring.to_owned(),
                status: out.status.to_string(),
                stderr: cli_kit::escape::escape_control(
                    String::from_utf8_lossy(&out.stderr).trim(),
                )
                .into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `keyring list --output json` of `keyring` on `host`.
    pub fn list(&self, fs: &HostFs, host: &Host, keyring: &Path) -> Result<Listing, KeyringError> {
        let text = self.run(
            (fs, host),
            keyring,
            "list",
            &["--output".into(), "json".into()],
        )?;
        parse_listing(&fs.plugin_name(host), keyring, &text)
    }

    /// `keyring add`: a new decrypt-only KEK. Returns its number.
    pub fn add(&self, fs: &HostFs, host: &Host, keyring: &Path) -> Result<String, KeyringError> {
        self.run((fs, host), keyring, "add", &self.add_flags)
    }

    /// `keyring promote --kek N`. Returns the new primary key_id.
    pub fn promote(
        &self,
        fs: &HostFs,
        host: &Host,
        keyring: &Path,
        kek: u32,
    ) -> Result<String, KeyringError> {
        self.run(
            (fs, host),
            keyring,
            "promote",
            &["--kek".into(), kek.to_string()],
        )
    }

    /// `keyring retire --kek N`.
    pub fn retire(
        &self,
        fs: &HostFs,
        host: &Host,
        keyring: &Path,
        kek: u32,
    ) -> Result<(), KeyringError> {
        self.run(
            (fs, host),
            keyring,
            "retire",
            &["--kek".into(), kek.to_string()],
        )
        .map(|_| ())
    }
}

/// Reads a listing printed by `bin`, refusing one whose `format` is not
/// [`LISTING_FORMAT`] before looking at anything else in it.
fn parse_listing(bin: &str, keyring: &Path, text: &str) -> Result<Listing, KeyringError> {
    #[derive(serde::Deserialize)]
    struct Format {
        format: Option<serde_json::Value>,
    }
    let bad_json = |e: serde_json::Error| KeyringError::BadJson {
        keyring: keyring.to_owned(),
        message: e.to_string(),
    };
    let format = serde_json::from_str::<Format>(text)
        .map_err(bad_json)?
        .format;
    if format.as_ref().and_then(|f| f.as_str()) != Some(LISTING_FORMAT) {
        let found = match format {
            None => "none (a kms-plugin older than listing formats)".to_owned(),
            // JSON text: quoted, control characters escaped.
            Some(f) => f.to_string().chars().take(80).collect(),
        };
        return Err(KeyringError::UnknownFormat {
            bin: bin.to_owned(),
            found,
        });
    }
    serde_json::from_str(text).map_err(bad_json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_listing_of_its_format() {
        let text = r#"{"format":"atrest.keyring.list/v1","generation":3,"primary":2,"key_id":"b2","keks":[
            {"kek":1,"state":"decrypt-only","created":"2026-01-01T00:00:00Z","fingerprint":"f1","key_id":"a","key_ids":["a"]},
            {"kek":2,"state":"primary","created":"2026-01-02T00:00:00Z","fingerprint":"f2","key_id":"b2","key_ids":["b1","b2"]},
            {"kek":3,"state":"decrypt-only","created":"x","fingerprint":"f3","key_id":null,"key_ids":[]}]}"#;
        let info = parse_listing("kms-plugin", Path::new("k"), text).unwrap();
        assert_eq!(info.primary_kek().unwrap().key_id.as_deref(), Some("b2"));
        assert_eq!(info.kek(3).unwrap().key_id, None);
        assert_eq!(info.kek(1).unwrap().state, ::keyring::KekState::DecryptOnly);
        assert!(info.kek(4).is_none());
    }

    #[test]
    fn refuses_a_listing_of_another_or_no_format() {
        let body = r#""generation":3,"primary":2,"keks":[{"kek":2,"state":"primary","key_id":"b","key_ids":["b"]}]"#;
        for (text, want) in [
            (format!("{{{body}}}"), "none"),
            (
                format!(r#"{{"format":"atrest.keyring.list/v2",{body}}}"#),
                "\"atrest.keyring.list/v2\"",
            ),
            (format!(r#"{{"format":7,{body}}}"#), "format 7,"),
        ] {
            let e = parse_listing("/opt/old/kms-plugin", Path::new("k"), &text).unwrap_err();
            assert!(matches!(e, KeyringError::UnknownFormat { .. }), "{e}");
            let shown = e.to_string();
            assert!(
                shown.contains(want) && shown.contains("/opt/old/kms-plugin"),
                "{shown}"
            );
        }
    }
}
