//! Running the `kms-plugin` CLI (keyring commands, probe) as a child process.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use super::bin_path;
use anyhow::{Context, Result, bail};

/// What a finished CLI command printed and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl CliOutput {
    /// The exit code (None when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Stdout of a command that must have succeeded; otherwise an error with both streams.
    pub fn success(self) -> Result<String> {
        if !self.status.success() {
            bail!(
                "`{}` failed with {}\nstdout:\n{}\nstderr:\n{}",
                self.command,
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self.stdout)
    }
}

/// Runs `kms-plugin ARGS…` to completion.
pub async fn cli<I, S>(args: I) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    cli_env(args, &[]).await
}

/// Runs `kms-plugin ARGS…` to completion with extra environment variables
/// (for the child only).
pub async fn cli_env<I, S>(args: I, envs: &[(&str, &str)]) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = format!(
        "kms-plugin {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = tokio::process::Command::new(bin_path("kms-plugin"))
        .args(&args)
        .env("NO_COLOR", "1")
        // The caller's ATREST_LOG would change what stderr holds.
        .env_remove("ATREST_LOG")
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running `{command}`"))?;
    Ok(CliOutput {
        command,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// A keyring file driven through `kms-plugin keyring …`.
#[derive(Clone, Debug)]
pub struct Keyring {
    path: PathBuf,
}

/// One KEK in [`KeyringList`].
pub use keyring::KekInfo as KekEntry;
/// `keyring list --output json`: the keyring crate's one listing type.
pub use keyring::Listing as KeyringList;

impl Keyring {
    /// A handle on an existing keyring file.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// `keyring init`: creates the file; returns the handle and the first key_id.
    pub async fn init(path: impl Into<PathBuf>) -> Result<(Self, String)> {
        let keyring = Self::at(path);
        let key_id = keyring.run_key_id(&["init"]).await?;
        Ok((keyring, key_id))
    }

    /// The keyring file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `kms-plugin keyring SUBCOMMAND --keyring PATH EXTRA…` to completion.
    pub async fn run(&self, subcommand: &str, extra: &[&str]) -> Result<CliOutput> {
        let mut args: Vec<std::ffi::OsString> =
            vec!["keyring".into(), subcommand.into(), "--keyring".into()];
        args.push(self.path.clone().into_os_string());
        args.extend(extra.iter().map(Into::into));
        cli(args).await
    }

    /// Runs a command that prints one key_id line.
    async fn run_key_id(&self, args: &[&str]) -> Result<String> {
        let (subcommand, extra) = args.split_first().context("no subcommand")?;
        let stdout = self.run(subcommand, extra).await?.success()?;
        let key_id = stdout.trim_end_matches('\n');
        if key_id.is_empty() || key_id.contains('\n') {
            bail!("`keyring {subcommand}` must print exactly one key_id line, printed {stdout:?}");
        }
        Ok(key_id.to_owned())
    }

    /// `keyring rotate`: new primary KEK; returns its key_id.
    pub async fn rotate(&self) -> Result<String> {
        self.run_key_id(&["rotate"]).await
    }

    /// `keyring add`: new decrypt-only KEK; returns its number (it has no
    /// key_id until promoted).
    pub async fn add(&self) -> Result<u32> {
        let stdout = self.run("add", &[]).await?.success()?;
        stdout.trim().parse().with_context(|| {
            format!("`keyring add` must print the new KEK's number, printed {stdout:?}")
        })
    }

    /// `keyring promote --kek N`: returns the KEK's new key_id.
    pub async fn promote(&self, kek: u32) -> Result<String> {
        self.run_key_id(&["promote", "--kek", &kek.to_string()])
            .await
    }

    /// `keyring retire --kek N`.
    pub async fn retire(&self, kek: u32) -> Result<()> {
        self.run("retire", &["--kek", &kek.to_string()])
            .await?
            .success()?;
        Ok(())
    }

    /// `keyring list --output json`, parsed; its `format` must be this
    /// build's.
    pub async fn list(&self) -> Result<KeyringList> {
        let stdout = self.run("list", &["--output", "json"]).await?.success()?;
        let list: KeyringList = serde_json::from_str(&stdout)
            .with_context(|| format!("parsing `keyring list --output json` output: {stdout}"))?;
        if list.format != keyring::LISTING_FORMAT {
            bail!(
                "`keyring list --output json` printed format {:?}",
                list.format
            );
        }
        Ok(list)
    }
}
