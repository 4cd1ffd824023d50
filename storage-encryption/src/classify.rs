//! Classifies any stored byte string without keys: plaintext (and its encoding),
//! or which provider type, key or provider name encrypted it.

use crate::format::kmsv2::KmsV2Header;
use crate::format::plaintext::PlaintextKind;
use crate::format::prefix::{self, ProviderKind};
use crate::format::{FormatError, aescbc, aesgcm, kmsv1, kmsv2, secretbox};

/// What a stored value is, as far as can be told without keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classification {
    /// No `k8s:enc:` prefix: stored in plaintext.
    Plaintext(PlaintextKind),
    /// `k8s:enc:aescbc:v1:<key_name>:`.
    AesCbc {
        /// Key name from the prefix.
        key_name: String,
    },
    /// `k8s:enc:aesgcm:v1:<key_name>:`.
    AesGcm {
        /// Key name from the prefix.
        key_name: String,
    },
    /// `k8s:enc:secretbox:v1:<key_name>:`.
    Secretbox {
        /// Key name from the prefix.
        key_name: String,
    },
    /// `k8s:enc:kms:v1:` + provider name (which may contain `:`) + `:` + payload.
    KmsV1 {
        /// Everything after `k8s:enc:kms:v1:`; match it against configured names with
        /// [`crate::format::kmsv1::match_provider`].
        rest: Vec<u8>,
        /// The shortest `name:` split after which the payload parses, as a hint for
        /// reports when no configuration is at hand.
        provider_guess: Option<String>,
    },
    /// `k8s:enc:kms:v2:<provider>:` + a valid `EncryptedObject`.
    KmsV2 {
        /// Provider name from the prefix.
        provider: String,
        /// keyID, DEK source type, annotations, sizes.
        header: KmsV2Header,
    },
    /// Starts with `k8s:enc:` but cannot be decoded: unknown provider, no name
    /// terminator, a payload of impossible size, or an invalid KMS v2 object.
    Undecodable {
        /// The provider type, when the prefix named a known one.
        kind: Option<ProviderKind>,
        /// Key or provider name when one was found.
        name: Option<String>,
        /// What is wrong (no secret content).
        reason: String,
    },
}

impl Classification {
    /// The provider type, if known (plaintext is [`ProviderKind::Identity`]).
    pub fn provider_kind(&self) -> Option<ProviderKind> {
        match self {
            Self::Plaintext(_) => Some(ProviderKind::Identity),
            Self::AesCbc { .. } => Some(ProviderKind::AesCbc),
            Self::AesGcm { .. } => Some(ProviderKind::AesGcm),
            Self::Secretbox { .. } => Some(ProviderKind::Secretbox),
            Self::KmsV1 { .. } => Some(ProviderKind::KmsV1),
            Self::KmsV2 { .. } => Some(ProviderKind::KmsV2),
            Self::Undecodable { kind, .. } => *kind,
        }
    }

    /// The key name (local providers) or provider name (KMS; for v1 the guess).
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Plaintext(_) => None,
            Self::AesCbc { key_name }
            | Self::AesGcm { key_name }
            | Self::Secretbox { key_name } => Some(key_name),
            Self::KmsV1 { provider_guess, .. } => provider_guess.as_deref(),
            Self::KmsV2 { provider, .. } => Some(provider),
            Self::Undecodable { name, .. } => name.as_deref(),
        }
    }

    /// True for anything with a `k8s:enc:` prefix.
    pub fn is_encrypted(&self) -> bool {
        !matches!(self, Self::Plaintext(_))
    }
}

/// Classifies any byte string as kube-apiserver would store it. Never fails:
/// garbage is [`Classification::Undecodable`] or [`PlaintextKind::Other`].
pub fn classify_value(value: &[u8]) -> Classification {
    let Some(after_enc) = value.strip_prefix(prefix::ENCRYPTED) else {
        return Classification::Plaintext(crate::format::plaintext::classify(value));
    };
    let keyed = [
        (ProviderKind::AesCbc, prefix::AESCBC),
        (ProviderKind::AesGcm, prefix::AESGCM),
        (ProviderKind::Secretbox, prefix::SECRETBOX),
        (ProviderKind::KmsV2, prefix::KMS_V2),
    ];
    for (kind, base) in keyed {
        let Some(rest) = value.strip_prefix(base.as_bytes()) else {
            continue;
        };
        let Some(colon) = rest.iter().position(|b| *b == b':') else {
            return undecodable(
                Some(kind),
                None,
                "the prefix has no ':' after the key or provider name".into(),
            );
        };
        let name = String::from_utf8_lossy(&rest[..colon]).into_owned();
        let payload = &rest[colon + 1..];
        if name.is_empty() {
            return undecodable(
                Some(kind),
                None,
                "empty key or provider name in the prefix".into(),
            );
        }
        let checked = match kind {
            ProviderKind::AesCbc => {
                aescbc::check_structure(payload).map(|()| Classification::AesCbc {
                    key_name: name.clone(),
                })
            }
            ProviderKind::AesGcm => {
                aesgcm::check_structure(payload).map(|()| Classification::AesGcm {
                    key_name: name.clone(),
                })
            }
            ProviderKind::Secretbox => {
                secretbox::check_structure(payload).map(|()| Classification::Secretbox {
                    key_name: name.clone(),
                })
            }
            _ => kmsv2::decode(payload).map(|object| Classification::KmsV2 {
                provider: name.clone(),
                header: KmsV2Header::of(&object),
            }),
        };
        return checked
            .unwrap_or_else(|e: FormatError| undecodable(Some(kind), Some(name), e.to_string()));
    }
    if let Some(rest) = value.strip_prefix(prefix::KMS_V1.as_bytes()) {
        let provider_guess = guess_kms_v1_provider(rest);
        if provider_guess.is_none() {
            return undecodable(
                Some(ProviderKind::KmsV1),
                None,
                "no '<provider>:' split leaves a well-formed KMS v1 payload".into(),
            );
        }
        return Classification::KmsV1 {
            rest: rest.to_vec(),
            provider_guess,
        };
    }
    let shown: String = String::from_utf8_lossy(after_enc)
        .chars()
        .take_while(|c| *c != ':')
        .take(32)
        .collect();
    undecodable(
        None,
        None,
        format!("unknown provider {shown:?} after k8s:enc:"),
    )
}

fn undecodable(kind: Option<ProviderKind>, name: Option<String>, reason: String) -> Classification {
    Classification::Undecodable { kind, name, reason }
}

/// The first `name:` split of a KMS v1 `rest` whose payload has a whole encrypted
/// DEK and some data.
fn guess_kms_v1_provider(rest: &[u8]) -> Option<String> {
    rest.iter()
        .enumerate()
        .filter(|(_, b)| **b == b':')
        .find_map(|(i, _)| {
            let name = &rest[..i];
            let parts = kmsv1::split(&rest[i + 1..]).ok()?;
            (!name.is_empty() && !parts.encrypted_dek.is_empty() && !parts.data.is_empty())
                .then(|| String::from_utf8_lossy(name).into_owned())
        })
}
