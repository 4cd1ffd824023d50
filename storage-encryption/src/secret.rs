//! Types that hold key material or plaintext. They zeroize on drop and their
//! `Debug` shows only a length, so a config or keyring can be logged safely.

use std::fmt;

use zeroize::Zeroizing;

/// Secret bytes: a local key (`aescbc`, `aesgcm`, `secretbox`) as decoded from
/// the configuration's base64. Zeroized on drop; `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of `bytes` (they are zeroized when this value drops).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key bytes. Callers must not log or copy them into non-zeroizing storage.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&[u8]> for SecretBytes {
    fn from(bytes: &[u8]) -> Self {
        Self::new(bytes.to_vec())
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<redacted {} bytes>)", self.0.len())
    }
}

/// A 32-byte KMS data key source as the plugin's Decrypt returns it: for KMS v2
/// `HKDF_SHA256_XNONCE_AES_GCM_SEED` the HKDF seed, for KMS v2 `AES_GCM_KEY`
/// and KMS v1 the AES-256-GCM DEK itself. Zeroized on drop; `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Seed(Zeroizing<[u8; 32]>);

impl Seed {
    /// Size of every seed and DEK kube-apiserver uses.
    pub const LEN: usize = 32;

    /// Wraps 32 bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Copies `bytes`, which must be exactly 32 long (what a plugin returned).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut out = Zeroizing::new([0u8; 32]);
        if bytes.len() != Self::LEN {
            return None;
        }
        out.copy_from_slice(bytes);
        Some(Self(out))
    }

    /// A fresh random seed from the operating system.
    pub fn random() -> Result<Self, crate::RandomError> {
        let mut out = Zeroizing::new([0u8; 32]);
        crate::rand::fill(out.as_mut_slice())?;
        Ok(Self(out))
    }

    /// The seed bytes. Callers must not log them.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Seed(<redacted>)")
    }
}

/// Decrypted object bytes. Zeroized on drop (they may be a Secret); `Debug`
/// shows only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    /// Takes ownership of `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The plaintext bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Moves the bytes out; the caller becomes responsible for them.
    pub fn into_inner(mut self) -> Vec<u8> {
        std::mem::take(&mut *self.0)
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Plaintext(<redacted {} bytes>)", self.0.len())
    }
}
