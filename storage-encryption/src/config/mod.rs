//! EncryptionConfiguration: the file kube-apiserver reads with
//! `--encryption-provider-config`. Plain, editable data types ([`EncryptionConfiguration`]
//! and friends, ordered `Vec`s), a strict parser ([`EncryptionConfiguration::parse`]),
//! every load-time rule of kube-apiserver ([`EncryptionConfiguration::validate`]),
//! resource → providers matching ([`EncryptionConfiguration::providers_for`]) and
//! rendering back to YAML ([`EncryptionConfiguration::render`]).

mod duration;
mod matching;
mod parse;
mod render;
mod validate;

use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use duration::{DurationError, format_go_duration, parse_go_duration};
pub use matching::{MatchRule, ProviderMatch};
pub use parse::redact_parser_message;

use crate::secret::SecretBytes;

/// The default KMS call timeout when `timeout` is omitted.
pub const DEFAULT_KMS_TIMEOUT: Duration = Duration::from_secs(3);

/// The default KMS v1 DEK cache size when `cachesize` is omitted.
pub const DEFAULT_KMS_V1_CACHE_SIZE: i32 = 1000;

/// A whole EncryptionConfiguration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionConfiguration {
    /// Which `apiVersion`/`kind` pair the file uses (kept so rendering does not change it).
    pub api_version: ConfigApiVersion,
    /// Entries in file order: the first entry naming a resource wins over later wildcards.
    pub resources: Vec<ResourceConfig>,
}

/// The two accepted `apiVersion` + `kind` pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConfigApiVersion {
    /// `apiVersion: apiserver.config.k8s.io/v1`, `kind: EncryptionConfiguration`.
    #[default]
    V1,
    /// Legacy `apiVersion: v1`, `kind: EncryptionConfig`.
    LegacyV1,
}

impl ConfigApiVersion {
    /// The `apiVersion` string.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::V1 => "apiserver.config.k8s.io/v1",
            Self::LegacyV1 => "v1",
        }
    }

    /// The `kind` string.
    pub fn kind(self) -> &'static str {
        match self {
            Self::V1 => "EncryptionConfiguration",
            Self::LegacyV1 => "EncryptionConfig",
        }
    }
}

/// One item of the top-level `resources` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceConfig {
    /// Resource names as written (`secrets`, `deployments.apps`, `*.apps`, `*.`, `*.*`).
    pub resources: Vec<String>,
    /// Providers in order: the first one writes; all of them can read.
    pub providers: Vec<ProviderConfig>,
}

/// One provider item (exactly one type per item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderConfig {
    /// `kms:` (v1 or v2).
    Kms(KmsConfig),
    /// `aesgcm: { keys: [...] }`.
    AesGcm(KeysConfig),
    /// `aescbc: { keys: [...] }`.
    AesCbc(KeysConfig),
    /// `secretbox: { keys: [...] }`.
    Secretbox(KeysConfig),
    /// `identity: {}`: plaintext.
    Identity,
}

impl ProviderConfig {
    /// The YAML field name of this provider type (`kms`, `aesgcm`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Kms(_) => "kms",
            Self::AesGcm(_) => "aesgcm",
            Self::AesCbc(_) => "aescbc",
            Self::Secretbox(_) => "secretbox",
            Self::Identity => "identity",
        }
    }

    /// The keys of a keyed provider (`aesgcm`, `aescbc`, `secretbox`).
    pub fn keys(&self) -> Option<&[Key]> {
        match self {
            Self::AesGcm(k) | Self::AesCbc(k) | Self::Secretbox(k) => Some(&k.keys),
            Self::Kms(_) | Self::Identity => None,
        }
    }

    /// Mutable keys of a keyed provider (for rotation: reorder, add, remove).
    pub fn keys_mut(&mut self) -> Option<&mut Vec<Key>> {
        match self {
            Self::AesGcm(k) | Self::AesCbc(k) | Self::Secretbox(k) => Some(&mut k.keys),
            Self::Kms(_) | Self::Identity => None,
        }
    }

    /// The short description used in reports: `aescbc key1`, `kms v2 my-plugin`, `identity`.
    pub fn describe(&self) -> String {
        match self {
            Self::Kms(k) => format!("kms {} {}", k.api_version.as_str(), k.name),
            Self::Identity => "identity".into(),
            other => {
                let names: Vec<&str> = other
                    .keys()
                    .unwrap_or_default()
                    .iter()
                    .map(|k| k.name.as_str())
                    .collect();
                format!("{} {}", other.type_name(), names.join(","))
            }
        }
    }
}

/// The `keys` list of `aesgcm`, `aescbc` or `secretbox`. The first key writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeysConfig {
    /// Keys in order.
    pub keys: Vec<Key>,
}

/// One named local key. `secret` is the decoded key (the file holds base64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Operator-chosen name, stored in every value's prefix.
    pub name: String,
    /// Raw key bytes (16, 24 or 32 for AES; 32 for secretbox). `Debug` is redacted.
    pub secret: SecretBytes,
}

/// The `kms:` provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsConfig {
    /// `apiVersion` (`v1` when omitted in the file).
    pub api_version: KmsApiVersion,
    /// Provider name, stored in every value's prefix.
    pub name: String,
    /// `unix:///path` or `unix:///@abstract`.
    pub endpoint: String,
    /// Per-call timeout; `None` means the default 3 s ([`DEFAULT_KMS_TIMEOUT`]).
    pub timeout: Option<Duration>,
    /// KMS v1 DEK cache size; `None` is the default 1000. Rejected for v2.
    pub cache_size: Option<i32>,
}

impl KmsConfig {
    /// The timeout kube-apiserver applies (explicit or the default).
    pub fn effective_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_KMS_TIMEOUT)
    }
}

/// KMS API version of a `kms:` provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsApiVersion {
    /// Deprecated KMS v1 (per-object DEK, `k8s:enc:kms:v1:` prefix).
    V1,
    /// KMS v2 (`k8s:enc:kms:v2:` prefix).
    V2,
}

impl KmsApiVersion {
    /// `v1` or `v2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// One validation problem, naming the field the way kube-apiserver's field
/// paths do (`resources[0].providers[1].aescbc.keys[0].secret`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong and, where possible, what to do instead. Never contains key material.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration could not be loaded or rendered. Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not YAML of the expected shape (syntax, unknown field, wrong type).
    #[error("invalid EncryptionConfiguration YAML: {message}")]
    Yaml {
        /// The parser's message, with quoted values redacted.
        message: String,
    },
    /// The YAML is well formed but breaks one or more rules.
    #[error("invalid EncryptionConfiguration: {}", join_errors(.errors))]
    Invalid {
        /// Every problem found, in file order.
        errors: Vec<FieldError>,
    },
    /// Rendering failed (should not happen for any value of the types).
    #[error("cannot render EncryptionConfiguration: {0}")]
    Render(String),
}

impl ConfigError {
    /// The field errors (empty for YAML and render errors).
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            Self::Invalid { errors } => errors,
            _ => &[],
        }
    }
}

fn join_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl EncryptionConfiguration {
    /// Parses and validates a configuration file's text: strict (unknown fields are
    /// errors), both apiVersion forms, then every rule of [`Self::validate`].
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config = parse::parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Like [`Self::parse`] for file bytes (must be UTF-8).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::Yaml {
            message: format!("file is not UTF-8 (byte offset {})", e.valid_up_to()),
        })?;
        Self::parse(text)
    }

    /// Checks every rule kube-apiserver applies when it loads a configuration,
    /// including "resource X is masked by earlier rule Y". Use it after editing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let errors = validate::validate(self);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { errors })
        }
    }

    /// Renders the configuration as YAML in the canonical layout (field order as in the
    /// Kubernetes docs, list order kept). The text holds the keys in base64, so it is
    /// returned in a zeroizing string. Does not validate: call [`Self::validate`] first.
    pub fn render(&self) -> Result<zeroize::Zeroizing<String>, ConfigError> {
        render::render(self)
    }

    /// Every provider of every entry, with its entry index and provider index.
    pub fn all_providers(&self) -> impl Iterator<Item = (usize, usize, &ProviderConfig)> {
        self.resources.iter().enumerate().flat_map(|(i, entry)| {
            entry
                .providers
                .iter()
                .enumerate()
                .map(move |(j, p)| (i, j, p))
        })
    }
}

/// The config hash kube-apiserver reports in
/// `apiserver_encryption_config_controller_last_config_info{hash=...}`:
/// `sha256:` followed by the lowercase hex SHA-256 of the file bytes.
pub fn config_file_hash(file_bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(file_bytes)))
}

/// The hash kube-apiserver puts in metric labels for a KMS `key_id`:
/// `sha256:<hex of sha256(key_id)>`, and `""` for an empty `key_id`.
pub fn key_id_hash(key_id: &str) -> String {
    if key_id.is_empty() {
        return String::new();
    }
    config_file_hash(key_id.as_bytes())
}
