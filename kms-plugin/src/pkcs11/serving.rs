//! Serving KEKs that live in a token: the process's one PKCS#11
//! configuration ([`install`], set by `serve` before the keyring loads), the
//! tokens it opened (one login each, kept for the life of the process), and
//! [`resolve`], which turns a keyring reference into a key handle after
//! verifying its check value — at start and at every reload, so a wrong or
//! replaced token key is refused before it serves. Handles are found once
//! per keyring load, never per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::object::ObjectHandle;
use keyring::Pkcs11Ref;

use super::{HsmError, ModuleConfig, Token};

/// The PKCS#11 configuration of this process and the tokens it opened.
#[derive(Debug)]
pub struct Hsm {
    config: ModuleConfig,
    tokens: Mutex<HashMap<TokenName, Arc<Token>>>,
}

/// A token's label and optional serial.
type TokenName = (String, Option<String>);

static HSM: OnceLock<Hsm> = OnceLock::new();

/// Sets the process's PKCS#11 configuration (once; later calls are ignored
/// and return `false`).
pub fn install(config: ModuleConfig) -> bool {
    HSM.set(Hsm {
        config,
        tokens: Mutex::new(HashMap::new()),
    })
    .is_ok()
}

/// The configuration, when `--pkcs11-module` was given.
pub fn installed() -> Option<&'static Hsm> {
    HSM.get()
}

/// A KEK in a token, ready to serve.
#[derive(Debug, Clone)]
pub struct TokenKey {
    /// Its token, logged in.
    pub token: Arc<Token>,
    /// The key object.
    pub handle: ObjectHandle,
}

impl Hsm {
    /// The token a reference names, opened (and logged in) on first use.
    pub fn token(&self, reference: &Pkcs11Ref) -> Result<Arc<Token>, HsmError> {
        let key = (reference.token.clone(), reference.serial.clone());
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tokens.get(&key) {
            return Ok(t.clone());
        }
        let token = Arc::new(Token::open(
            &self.config,
            &reference.token,
            reference.serial.as_deref(),
        )?);
        tokens.insert(key, token.clone());
        Ok(token)
    }

    /// Finds the key object of KEK `kek` and verifies its check value.
    pub fn resolve(&self, kek: u32, reference: &Pkcs11Ref) -> Result<TokenKey, HsmError> {
        let token = self.token(reference)?;
        let (handle, _) = token.find_key(&reference.key_label, Some(&reference.id), false)?;
        if token.check_value(handle)? != reference.check_value {
            return Err(HsmError::CheckMismatch {
                kek,
                token: reference.token.clone(),
                label: reference.key_label.clone(),
            });
        }
        Ok(TokenKey { token, handle })
    }
}
