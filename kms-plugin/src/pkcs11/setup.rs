//! `serve --pkcs11-…`: the flags' validated form, and the start: install
//! the configuration and open every token the keyring names, so a missing
//! token or a refused PIN stops the start with its own exit code (3) before
//! anything is served. A refused PIN is not retried.

use std::path::Path;

use keyring::{KekMaterial, KeyringFile};

use super::{HsmError, MAX_SESSIONS, ModuleConfig, Pin, serving};
use crate::cli::{FlagError, Pkcs11ServeArgs};

/// The validated flags; `None` when no module is configured.
pub fn from_args(args: &Pkcs11ServeArgs) -> Result<Option<ModuleConfig>, FlagError> {
    let Some(module) = args.module.pkcs11_module.clone() else {
        if args.module.pkcs11_pin_file.is_some() {
            return Err(FlagError {
                flag: "--pkcs11-pin-file",
                reason: "needs --pkcs11-module (or ATREST_PKCS11_MODULE)".into(),
            });
        }
        return Ok(None);
    };
    if args
        .pkcs11_max_sessions
        .is_some_and(|n| n == 0 || n > MAX_SESSIONS)
    {
        return Err(FlagError {
            flag: "--pkcs11-max-sessions",
            reason: "must be between 1 and 1024".into(),
        });
    }
    let session_wait = args.pkcs11_session_wait;
    let pin = Pin::resolve(args.module.pkcs11_pin_file.as_deref()).map_err(|e| FlagError {
        flag: "--pkcs11-pin-file",
        reason: e.to_string(),
    })?;
    Ok(Some(ModuleConfig {
        module,
        pin,
        max_sessions: args.pkcs11_max_sessions,
        session_wait,
    }))
}

/// Installs `config` and logs in to every token the keyring at `path`
/// names. A keyring that cannot be read here is left for the load to
/// report.
pub fn start(config: ModuleConfig, path: &Path) -> Result<(), HsmError> {
    let module = config.module.clone();
    serving::install(config);
    let Some(hsm) = serving::installed() else {
        return Ok(());
    };
    let Ok(raw) = keyring::read_raw(path) else {
        return Ok(());
    };
    let Ok(file) = KeyringFile::parse(path, &raw.bytes) else {
        return Ok(());
    };
    for kek in file.keks() {
        if let KekMaterial::Pkcs11(reference) = kek.material() {
            let token = hsm.token(reference)?;
            tracing::info!(
                module = %module.display(),
                token = %reference.token,
                kek = kek.number,
                max_sessions = token.max_sessions(),
                sessions_by = token.max_sessions_reason(),
                "PKCS#11 token logged in"
            );
        }
    }
    if file
        .keks()
        .iter()
        .any(|k| matches!(k.material(), KekMaterial::Pkcs11(_)))
    {
        hsm.start_calls()?;
    }
    Ok(())
}
