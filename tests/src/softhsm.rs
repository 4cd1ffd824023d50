//! A SoftHSM2 token of the test's own: a token directory and a config file
//! in a temp dir, handed to child processes through `SOFTHSM2_CONF` (tests
//! never change their own environment), a user PIN in a 0400 file, and
//! `pkcs11-tool` to look at the token from outside.
//!
//! SoftHSM2 (`/usr/lib/softhsm/libsofthsm2.so`, Debian `softhsm2`) and
//! `softhsm2-util` / `pkcs11-tool` (Debian `opensc`) must be installed
//! (`scripts/setup.sh` does it): a test that needs them fails loudly when
//! they are missing.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

/// Where Debian's `softhsm2` puts the module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every test token (tests only).
pub const USER_PIN: &str = "4711-test-pin-Qz";
/// The security officer PIN of every test token (tests only).
pub const SO_PIN: &str = "5511-so-pin";

/// One SoftHSM2 token store with its config and PIN file.
#[derive(Debug)]
pub struct SoftHsm {
    dir: TempDir,
    conf: PathBuf,
    tokens: PathBuf,
    pin_file: PathBuf,
}

impl SoftHsm {
    /// A fresh store with one initialised token labelled `label`.
    pub fn new(label: &str) -> Result<Self> {
        ensure!(
            Path::new(MODULE).is_file(),
            "SoftHSM2 is not installed ({MODULE} missing): run scripts/setup.sh (apt-get install softhsm2 opensc)"
        );
        let dir = tempfile::Builder::new().prefix("atrest-hsm-").tempdir()?;
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens)?;
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )?;
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{USER_PIN}\n"))?;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o400))?;
        let hsm = SoftHsm {
            dir,
            conf,
            tokens,
            pin_file,
        };
        hsm.init_token(label)?;
        Ok(hsm)
    }

    /// Initialises one more token labelled `label` in the store.
    pub fn init_token(&self, label: &str) -> Result<()> {
        self.tool(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                SO_PIN,
                "--pin",
                USER_PIN,
            ],
        )
        .map(drop)
    }

    /// The `SOFTHSM2_CONF` pair to pass to a child process.
    pub fn env(&self) -> (&'static str, String) {
        ("SOFTHSM2_CONF", self.conf.display().to_string())
    }

    /// The config file.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The token directory (move it away to "remove" the tokens).
    pub fn tokens(&self) -> &Path {
        &self.tokens
    }

    /// The 0400 file holding [`USER_PIN`].
    pub fn pin_file(&self) -> &Path {
        &self.pin_file
    }

    /// A file holding a wrong PIN.
    pub fn wrong_pin_file(&self) -> Result<PathBuf> {
        let path = self.dir.path().join("wrong-pin");
        std::fs::write(&path, "0000-not-the-pin\n")?;
        Ok(path)
    }

    /// The `--pkcs11-module … --pkcs11-pin-file …` flags.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--pkcs11-module".into(),
            MODULE.into(),
            "--pkcs11-pin-file".into(),
            self.pin_file.display().to_string(),
        ]
    }

    /// Runs `pkcs11-tool --module MODULE ARGS…` against this store; stdout.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["--module", MODULE];
        all.extend_from_slice(args);
        self.tool("pkcs11-tool", &all)
    }

    /// The token flags line `pkcs11-tool -L` prints for the first token.
    pub fn token_flags(&self) -> Result<String> {
        let out = self.pkcs11_tool(&["-L"])?;
        out.lines()
            .find(|l| l.contains("token flags"))
            .map(str::to_owned)
            .with_context(|| format!("no token flags in `pkcs11-tool -L`: {out}"))
    }

    fn tool(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = Command::new(program)
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .with_context(|| {
                format!("running {program} (install softhsm2 and opensc: scripts/setup.sh)")
            })?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed with {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A keyring at `dir/keyring.json` whose primary KEK is a new key in `hsm`'s
/// token `atrest` (KEK 2); KEK 1, the local KEK `init` made, stays
/// decrypt-only.
pub async fn hsm_keyring(hsm: &SoftHsm, dir: &Path) -> Result<crate::plugin::Keyring> {
    let (keyring, _) = crate::plugin::Keyring::init(dir.join("keyring.json")).await?;
    let n = hsm.add_key(&keyring, &["--pkcs11-token", "atrest"]).await?;
    keyring.promote(n).await?;
    Ok(keyring)
}

impl SoftHsm {
    /// `kms-plugin keyring add --pkcs11-module … --pkcs11-pin-file … EXTRA…`
    /// with this store's config; returns the new KEK's number.
    pub async fn add_key(&self, keyring: &crate::plugin::Keyring, extra: &[&str]) -> Result<u32> {
        let out = self.run_add(keyring, extra).await?;
        let stdout = out.success()?;
        stdout
            .trim()
            .parse()
            .with_context(|| format!("`keyring add` printed {stdout:?}"))
    }

    /// The same, returning the output whatever it is.
    pub async fn run_add(
        &self,
        keyring: &crate::plugin::Keyring,
        extra: &[&str],
    ) -> Result<crate::plugin::CliOutput> {
        let mut args: Vec<String> = vec![
            "keyring".into(),
            "add".into(),
            "--keyring".into(),
            keyring.path().display().to_string(),
        ];
        args.extend(self.flags());
        args.extend(extra.iter().map(|s| s.to_string()));
        let (k, v) = self.env();
        crate::plugin::cli_env(args, &[(k, &v)]).await
    }
}

/// Options for a plugin serving `keyring` with `hsm`'s module and PIN file
/// (its `SOFTHSM2_CONF` set for the child only).
pub fn plugin_options(hsm: &SoftHsm, keyring: &Path) -> crate::plugin::PluginOptions {
    let (k, v) = hsm.env();
    let mut options = crate::plugin::PluginOptions::new()
        .keyring(keyring)
        .env(k, v);
    for flag in hsm.flags() {
        options = options.arg(&flag);
    }
    options
}
