//! Value prefixes: `k8s:enc:<provider>:v1:<keyName>:` and `k8s:enc:kms:v{1,2}:<providerName>:`.

/// Every encrypted value starts with this; identity refuses to read such values.
pub const ENCRYPTED: &[u8] = b"k8s:enc:";
/// aescbc values: `k8s:enc:aescbc:v1:` + key name + `:`.
pub const AESCBC: &str = "k8s:enc:aescbc:v1:";
/// aesgcm values.
pub const AESGCM: &str = "k8s:enc:aesgcm:v1:";
/// secretbox values.
pub const SECRETBOX: &str = "k8s:enc:secretbox:v1:";
/// KMS v1 values: + provider name + `:`.
pub const KMS_V1: &str = "k8s:enc:kms:v1:";
/// KMS v2 values: + provider name + `:`.
pub const KMS_V2: &str = "k8s:enc:kms:v2:";

/// The kinds of stored value formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProviderKind {
    /// Plaintext, no prefix.
    Identity,
    /// `aescbc`.
    AesCbc,
    /// `aesgcm`.
    AesGcm,
    /// `secretbox`.
    Secretbox,
    /// `kms` with `apiVersion: v1`.
    KmsV1,
    /// `kms` with `apiVersion: v2`.
    KmsV2,
}

impl ProviderKind {
    /// Stable lowercase name for reports and metrics labels: `identity`, `aescbc`,
    /// `aesgcm`, `secretbox`, `kms-v1`, `kms-v2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::AesCbc => "aescbc",
            Self::AesGcm => "aesgcm",
            Self::Secretbox => "secretbox",
            Self::KmsV1 => "kms-v1",
            Self::KmsV2 => "kms-v2",
        }
    }

    /// The fixed part of the prefix (before the key/provider name); empty for identity.
    pub fn base_prefix(self) -> &'static str {
        match self {
            Self::Identity => "",
            Self::AesCbc => AESCBC,
            Self::AesGcm => AESGCM,
            Self::Secretbox => SECRETBOX,
            Self::KmsV1 => KMS_V1,
            Self::KmsV2 => KMS_V2,
        }
    }

    /// The full prefix for a key or provider `name`: base + name + `:` (empty for identity).
    pub fn prefix(self, name: &str) -> Vec<u8> {
        if self == Self::Identity {
            return Vec::new();
        }
        let mut p = Vec::with_capacity(self.base_prefix().len() + name.len() + 1);
        p.extend_from_slice(self.base_prefix().as_bytes());
        p.extend_from_slice(name.as_bytes());
        p.push(b':');
        p
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// If `value` starts with `kind`'s prefix for `name`, the payload after it.
pub fn strip<'v>(value: &'v [u8], kind: ProviderKind, name: &str) -> Option<&'v [u8]> {
    let base = kind.base_prefix().as_bytes();
    let rest = value.strip_prefix(base)?;
    let rest = rest.strip_prefix(name.as_bytes())?;
    rest.strip_prefix(b":")
}

/// Serialized as its report name (`identity`, `aescbc`, ..., `kms-v2`).
impl serde::Serialize for ProviderKind {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}
