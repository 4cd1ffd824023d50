//! The one place randomness comes from: the operating system, through the
//! `rand_core` that `aes-gcm` re-exports (no extra dependency).

use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;

/// The operating system's random source failed (e.g. `getrandom` unavailable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct RandomError(String);

/// Fills `buf` with random bytes from the OS.
pub(crate) fn fill(buf: &mut [u8]) -> Result<(), RandomError> {
    OsRng
        .try_fill_bytes(buf)
        .map_err(|e| RandomError(e.to_string()))
}

/// `N` random bytes from the OS.
pub(crate) fn bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut out = [0u8; N];
    fill(&mut out)?;
    Ok(out)
}
