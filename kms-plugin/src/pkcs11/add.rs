//! `kms-plugin keyring add --pkcs11-…`: put a token key in the keyring.

use std::path::Path;

use keyring::{KeyringError, Pkcs11Ref};
use thiserror::Error;

use super::{HsmError, ModuleConfig, Token};

/// Generate a new token key, or adopt one that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `--generate`: a new non-extractable AES-256 token object.
    Generate,
    /// `--adopt`: an existing AES key found by `--pkcs11-key-label`.
    Adopt,
}

/// What `add` needs besides the module.
#[derive(Debug)]
pub struct AddRequest<'a> {
    /// Token label.
    pub token: &'a str,
    /// Token serial, to pin one of several tokens sharing a label.
    pub serial: Option<&'a str>,
    /// Key label (required to adopt).
    pub key_label: Option<&'a str>,
    /// Generate or adopt.
    pub source: Source,
}

/// Why the add failed.
#[derive(Debug, Error)]
pub enum AddError {
    /// The token could not be used.
    #[error(transparent)]
    Hsm(#[from] HsmError),
    /// The request is incomplete.
    #[error("{0}")]
    Usage(&'static str),
    /// The keyring could not be edited.
    #[error("{0}{1}")]
    Keyring(KeyringError, String),
}

impl AddError {
    /// Whether the token itself refused us (missing, PIN) rather than the edit.
    pub fn is_token_trouble(&self) -> bool {
        matches!(
            self,
            AddError::Hsm(
                HsmError::TokenNotFound { .. }
                    | HsmError::PinIncorrect { .. }
                    | HsmError::PinLocked { .. }
                    | HsmError::Module { .. }
                    | HsmError::Pin(_)
            )
        )
    }
}

/// Finds or makes the key, computes its check value and adds it to the
/// keyring at `path` as a decrypt-only KEK. Returns its number. A generated
/// key that cannot be added is destroyed again.
pub fn add(path: &Path, config: &ModuleConfig, req: &AddRequest<'_>) -> Result<u32, AddError> {
    let token = Token::open(config, req.token, req.serial)?;
    let (handle, label, id, generated) = match req.source {
        Source::Generate => {
            let (h, l, i) = token.generate_key(req.key_label)?;
            (h, l, i, true)
        }
        Source::Adopt => {
            let label = req.key_label.ok_or(AddError::Usage(
                "--adopt needs --pkcs11-key-label (the key to adopt)",
            ))?;
            let (h, i) = token.find_key(label, None, true)?;
            (h, label.to_owned(), i, false)
        }
    };
    let check_value = match token.check_value(handle) {
        Ok(c) => c,
        Err(e) => {
            if generated {
                let _ = token.destroy_key(handle);
            }
            return Err(e.into());
        }
    };
    let reference = Pkcs11Ref {
        token: req.token.to_owned(),
        serial: req.serial.map(str::to_owned),
        key_label: label,
        id,
        check_value,
    };
    keyring::edit::add_pkcs11(path, reference).map_err(|e| {
        let note = if generated {
            match token.destroy_key(handle) {
                Ok(()) => " (the generated token key was destroyed again)".to_owned(),
                Err(d) => format!(" (the generated token key could not be destroyed: {d})"),
            }
        } else {
            String::new()
        };
        AddError::Keyring(e, note)
    })
}
