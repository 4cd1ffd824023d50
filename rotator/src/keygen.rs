//! New local keys: 32 random bytes from the operating system (AES-256 for
//! aescbc/aesgcm, the only size secretbox takes), held in a zeroizing type.
//! Keys are made here, never typed on a command line.

use storage_encryption::{SecretBytes, Seed};

/// The OS random source failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate a key: {0}")]
pub struct KeygenError(#[from] storage_encryption::RandomError);

/// Size of every key the rotator generates.
pub const KEY_LEN: usize = 32;

/// A fresh random 32-byte key.
pub fn random_key() -> Result<SecretBytes, KeygenError> {
    // `Seed::random` is storage-encryption's OS-backed 32-byte generator; its
    // buffer is zeroized, and so is the copy.
    let seed = Seed::random()?;
    Ok(SecretBytes::from(&seed.expose()[..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_32_random_bytes() {
        let a = random_key().unwrap();
        let b = random_key().unwrap();
        assert_eq!(a.len(), KEY_LEN);
        assert_ne!(a.expose(), b.expose());
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.expose())));
    }
}
