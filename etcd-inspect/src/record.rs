//! The audit's output model: one [`Record`] per etcd key, and the
//! [`Finding`] vocabulary shared by every report format.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The provider type that wrote a value (`identity` for plaintext); its
/// report name is `identity|aescbc|aesgcm|secretbox|kms-v1|kms-v2`.
pub use storage_encryption::ProviderKind;

/// What the audit concluded about one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Finding {
    /// Stored the way the config's first provider (and key) would write it.
    Ok,
    /// Plaintext where the config expects encryption.
    Plaintext,
    /// Encrypted with a provider or key that is in the config but not first:
    /// readable, and rewritten by the next update.
    Stale,
    /// KMS v2 value whose keyID is not the plugin's current key_id:
    /// readable, needs a rewrite before the old KEK goes.
    KmsKeyStale,
    /// Encrypted with a provider or key the config does not have: no
    /// apiserver with this config can read it. Data at risk.
    Unreadable,
    /// Not a value kube-apiserver could have written: garbage, truncated,
    /// or an invalid encrypted envelope.
    Undecodable,
    /// `--decrypt-check`: decrypting with the config's keys (or the plugin) failed.
    DecryptFailed,
    /// A value under the scanned prefix whose key maps to no resource below
    /// the apiserver's `--etcd-prefix`: nobody can say which provider should
    /// have written it, so it was not judged. Fail closed.
    Unmapped,
}

impl Finding {
    /// Every finding, in report order.
    pub const ALL: [Finding; 8] = [
        Finding::Ok,
        Finding::Plaintext,
        Finding::Stale,
        Finding::KmsKeyStale,
        Finding::Unreadable,
        Finding::Undecodable,
        Finding::DecryptFailed,
        Finding::Unmapped,
    ];

    /// The default `--fail-on` set.
    pub const DEFAULT_FAIL_ON: [Finding; 5] = [
        Finding::Plaintext,
        Finding::Unreadable,
        Finding::Undecodable,
        Finding::DecryptFailed,
        Finding::Unmapped,
    ];

    /// The name used on the command line, in reports and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Finding::Ok => "ok",
            Finding::Plaintext => "plaintext",
            Finding::Stale => "stale",
            Finding::KmsKeyStale => "kms-key-stale",
            Finding::Unreadable => "unreadable",
            Finding::Undecodable => "undecodable",
            Finding::DecryptFailed => "decrypt-failed",
            Finding::Unmapped => "unmapped",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Finding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Finding::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Finding::ALL.iter().map(|f| f.as_str()).collect();
                format!(
                    "unknown finding {s:?} (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// Provider (and key) of a value, as stored or as expected by the config.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ProviderRef {
    /// Provider type; `null` only for an undecodable value whose prefix names
    /// no known provider.
    pub provider: Option<ProviderKind>,
    /// KMS provider name (`null` for other types).
    pub provider_name: Option<String>,
    /// Key name of aescbc/aesgcm/secretbox (`null` for other types).
    pub key_name: Option<String>,
}

impl ProviderRef {
    /// Plaintext.
    pub fn identity() -> Self {
        ProviderRef {
            provider: Some(ProviderKind::Identity),
            provider_name: None,
            key_name: None,
        }
    }

    /// A compact human label: `identity`, `aescbc/key1`, `kms-v2/my-plugin`.
    pub fn label(&self) -> String {
        let kind = self.provider.map(ProviderKind::as_str).unwrap_or("unknown");
        match (&self.provider_name, &self.key_name) {
            (Some(p), _) => format!("{kind}/{p}"),
            (None, Some(k)) => format!("{kind}/{k}"),
            (None, None) => kind.to_owned(),
        }
    }
}

/// The audit of one etcd key. Never holds the value or its plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// The etcd key (lossy UTF-8).
    pub key: String,
    /// `resource` or `resource.group` as in an EncryptionConfiguration;
    /// `null` for keys no resource owns.
    pub resource: Option<String>,
    /// Namespace of namespaced objects.
    pub namespace: Option<String>,
    /// Object name.
    pub name: Option<String>,
    /// What the value is stored with.
    #[serde(flatten)]
    pub actual: ProviderRef,
    /// KMS v2 `keyID` of the stored value.
    pub key_id: Option<String>,
    /// For plaintext: `protobuf`, `json`, `cbor` or `other`.
    pub encoding: Option<&'static str>,
    /// What the config's first provider for this resource is (`null` without `--config`).
    pub expected: Option<ProviderRef>,
    /// The verdict (`null` without `--config`, except `undecodable`).
    /// With `--config`, a key that maps to no resource is `unmapped`.
    pub finding: Option<Finding>,
    /// Why, in words, when the finding is not `ok` (never contains plaintext).
    pub detail: Option<String>,
    /// Which revision this is (`snapshot FILE --all-revisions` only; absent
    /// from the JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<RevisionInfo>,
}

/// One stored revision of a key (`--all-revisions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RevisionInfo {
    /// The etcd revision that wrote (or deleted) it.
    pub revision: i64,
    /// Position within that revision's transaction.
    pub sub: i64,
    /// The key's creation revision (0 for a tombstone).
    pub create_revision: i64,
    /// Modifications since creation (0 for a tombstone).
    pub version: i64,
    /// This revision deleted the key.
    pub tombstone: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_round_trip_their_names() {
        for f in Finding::ALL {
            assert_eq!(f.as_str().parse::<Finding>().unwrap(), f);
            assert_eq!(
                serde_json::to_value(f).unwrap(),
                serde_json::json!(f.as_str())
            );
        }
        assert!(
            "nope"
                .parse::<Finding>()
                .unwrap_err()
                .contains("kms-key-stale")
        );
    }

    #[test]
    fn provider_names_match_the_json_vocabulary() {
        for (p, s) in [
            (ProviderKind::Identity, "identity"),
            (ProviderKind::AesCbc, "aescbc"),
            (ProviderKind::AesGcm, "aesgcm"),
            (ProviderKind::Secretbox, "secretbox"),
            (ProviderKind::KmsV1, "kms-v1"),
            (ProviderKind::KmsV2, "kms-v2"),
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(s));
            assert_eq!(p.as_str(), s);
        }
    }
}
