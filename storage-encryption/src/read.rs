//! The reading model of kube-apiserver: which provider and key read a value,
//! whether the read is stale, decryption through the configured providers, and
//! writes with the first provider.
//!
//! Rules (spec "Which provider reads a value"): providers are tried in order;
//! the first whose prefix matches is used; if it fails the search goes on with
//! the next matching one; identity matches everything but refuses `k8s:enc:`
//! values, and its errors are skipped. A read is stale when it used any provider
//! but the first, any key but the first, the KMS v1 CBC fallback, or a KMS v2
//! `keyID`/DEK source type other than the current write state.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::config::{KmsApiVersion, KmsConfig, ProviderConfig};
use crate::format::kmsv2::{EncryptedDekSourceType, EncryptedObject, KmsV2WriteKey};
use crate::format::prefix::{self, ProviderKind};
use crate::format::{FormatError, aescbc, aesgcm, kmsv1, kmsv2, secretbox};
use crate::secret::{Plaintext, Seed};

/// The caller's knowledge of each KMS v2 provider's current write `key_id`
/// (kube-apiserver's write state; follows the plugin's Status after a successful Encrypt).
pub trait KmsWriteState {
    /// The `key_id` the apiserver would write with now, or `None` if unknown.
    fn current_key_id(&self, provider: &str) -> Option<String>;
}

/// Obtains data key sources from KMS plugins. Synchronous: async callers fetch
/// seeds first (e.g. one plugin Decrypt per distinct `encryptedDEKSource`) and
/// answer from a map.
pub trait KmsSeeds {
    /// The plugin's Decrypt of a KMS v2 `encryptedDEKSource` (the seed for type 1,
    /// the DEK for type 0).
    fn kms_v2_seed(&self, provider: &str, request: &KmsV2SeedRequest<'_>)
    -> Result<Seed, KmsError>;

    /// The plugin's Decrypt of a KMS v1 encrypted DEK. The default refuses (KMS v1 is deprecated).
    fn kms_v1_dek(&self, provider: &str, encrypted_dek: &[u8]) -> Result<Seed, KmsError> {
        let _ = encrypted_dek;
        Err(KmsError::new(format!(
            "no KMS v1 support for provider {provider:?}"
        )))
    }
}

/// The current KMS v2 write key per provider, obtained by the caller (plugin Encrypt of a seed).
pub trait KmsWriteKeys {
    /// The write key of KMS v2 `provider`, if the caller has one.
    fn kms_v2_write_key(&self, provider: &str) -> Option<&KmsV2WriteKey>;
}

/// What kube-apiserver would send to the plugin's Decrypt for a KMS v2 value.
#[derive(Debug, Clone, Copy)]
pub struct KmsV2SeedRequest<'a> {
    /// The ciphertext to decrypt.
    pub encrypted_dek_source: &'a [u8],
    /// The stored `keyID`.
    pub key_id: &'a str,
    /// The stored annotations.
    pub annotations: &'a HashMap<String, Vec<u8>>,
    /// How the plaintext will be used.
    pub source_type: EncryptedDekSourceType,
}

/// An error from the caller's KMS access. Its message must carry no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KMS: {0}")]
pub struct KmsError(pub String);

impl KmsError {
    /// Wraps a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// No KMS access at all: no write state, no seeds, no write keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKms;

impl KmsWriteState for NoKms {
    fn current_key_id(&self, _provider: &str) -> Option<String> {
        None
    }
}

impl KmsSeeds for NoKms {
    fn kms_v2_seed(
        &self,
        provider: &str,
        _request: &KmsV2SeedRequest<'_>,
    ) -> Result<Seed, KmsError> {
        Err(KmsError::new(format!(
            "no KMS access for provider {provider:?}"
        )))
    }
}

impl KmsWriteKeys for NoKms {
    fn kms_v2_write_key(&self, _provider: &str) -> Option<&KmsV2WriteKey> {
        None
    }
}

impl KmsWriteState for BTreeMap<String, String> {
    fn current_key_id(&self, provider: &str) -> Option<String> {
        self.get(provider).cloned()
    }
}

impl KmsWriteState for HashMap<String, String> {
    fn current_key_id(&self, provider: &str) -> Option<String> {
        self.get(provider).cloned()
    }
}

impl KmsWriteState for BTreeMap<String, KmsV2WriteKey> {
    fn current_key_id(&self, provider: &str) -> Option<String> {
        self.get(provider).map(|k| k.key_id.clone())
    }
}

impl KmsWriteState for HashMap<String, KmsV2WriteKey> {
    fn current_key_id(&self, provider: &str) -> Option<String> {
        self.get(provider).map(|k| k.key_id.clone())
    }
}

impl KmsWriteKeys for BTreeMap<String, KmsV2WriteKey> {
    fn kms_v2_write_key(&self, provider: &str) -> Option<&KmsV2WriteKey> {
        self.get(provider)
    }
}

impl KmsWriteKeys for HashMap<String, KmsV2WriteKey> {
    fn kms_v2_write_key(&self, provider: &str) -> Option<&KmsV2WriteKey> {
        self.get(provider)
    }
}

/// Which provider (and key) reads a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    /// Index in the provider list; `None` for the implicit identity of an unmatched resource.
    pub provider_index: Option<usize>,
    /// Provider type.
    pub kind: ProviderKind,
    /// Key name (local providers) or provider name (KMS); `None` for identity.
    pub name: Option<String>,
    /// Index of the key within a local provider.
    pub key_index: Option<usize>,
}

impl fmt::Display for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.as_str())?;
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        match self.provider_index {
            Some(i) => write!(f, " (provider #{})", i + 1),
            None => f.write_str(" (no matching rule)"),
        }
    }
}

/// Why a read is stale (the next write, even a no-op update, re-encrypts it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaleReason {
    /// Read by a provider other than the first.
    NotFirstProvider {
        /// Its index.
        provider_index: usize,
    },
    /// Read by a key other than the first of a local provider.
    NotFirstKey {
        /// Its index.
        key_index: usize,
    },
    /// KMS v1 data decrypted through the legacy AES-CBC fallback.
    KmsV1CbcFallback,
    /// KMS v2 `keyID` differs from the current write `key_id`.
    KmsV2KeyId {
        /// Stored `keyID`.
        stored: String,
        /// Current write `key_id`.
        current: String,
    },
    /// KMS v2 legacy `AES_GCM_KEY` DEK source (current writes use the HKDF seed).
    KmsV2LegacyDekSource,
}

impl fmt::Display for StaleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFirstProvider { provider_index } => {
                write!(
                    f,
                    "read by provider #{} (writes use provider #1)",
                    provider_index + 1
                )
            }
            Self::NotFirstKey { key_index } => {
                write!(f, "read by key #{} (writes use key #1)", key_index + 1)
            }
            Self::KmsV1CbcFallback => f.write_str("KMS v1 data in the legacy AES-CBC format"),
            Self::KmsV2KeyId { stored, current } => write!(
                f,
                "KMS v2 keyID {} differs from the current key_id {}",
                crate::config::key_id_hash(stored),
                crate::config::key_id_hash(current)
            ),
            Self::KmsV2LegacyDekSource => f.write_str("KMS v2 legacy per-object DEK (AES_GCM_KEY)"),
        }
    }
}

/// A successful read (or, from [`judge`], one that would succeed if the key is right).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Who reads it.
    pub reader: Reader,
    /// Every reason it is stale; empty when it is not.
    pub stale_reasons: Vec<StaleReason>,
    /// KMS v2 value whose provider's current write `key_id` the caller did not know,
    /// so `keyID` staleness could not be judged.
    pub kms_write_state_unknown: bool,
}

impl Read {
    /// True when the next write would re-encrypt the value.
    pub fn is_stale(&self) -> bool {
        !self.stale_reasons.is_empty()
    }
}

/// A decrypted value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decrypted {
    /// The object bytes (redacted in `Debug`).
    pub plaintext: Plaintext,
    /// Who read it and whether it is stale.
    pub read: Read,
}

/// One provider that matched the prefix but failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAttempt {
    /// The provider and key tried.
    pub reader: Reader,
    /// Why it failed.
    pub error: AttemptError,
}

/// Why a matching provider could not read a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// Bad payload, wrong key, wrong etcd key (AAD) or tampering.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The caller's KMS access failed.
    #[error(transparent)]
    Kms(#[from] KmsError),
}

/// Why no provider could read a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadFailure {
    /// No rule matched the resource (identity) but the value is encrypted;
    /// kube-apiserver: "identity transformer tried to read encrypted data".
    #[error(
        "identity transformer tried to read encrypted data (no rule of the configuration matches this resource)"
    )]
    IdentityGotEncrypted,
    /// No provider's prefix matches; kube-apiserver: "no matching prefix found".
    #[error("no matching prefix found: no configured provider or key wrote this value")]
    NoMatchingPrefix,
    /// Every provider whose prefix matched failed.
    #[error("{}", describe_attempts(.attempts))]
    AllFailed {
        /// Each failure in order.
        attempts: Vec<FailedAttempt>,
    },
}

fn describe_attempts(attempts: &[FailedAttempt]) -> String {
    let parts: Vec<String> = attempts
        .iter()
        .map(|a| format!("{}: {}", a.reader, a.error))
        .collect();
    format!("every matching provider failed: {}", parts.join("; "))
}

/// Why a write could not be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// Encryption failed (bad key size, OS random failure).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The first provider is KMS v2 and the caller has no write key for it.
    #[error(
        "no KMS v2 write key for provider {provider:?}: obtain a seed through the plugin's Encrypt first"
    )]
    NoKmsWriteKey {
        /// Provider name.
        provider: String,
    },
    /// The first provider is KMS v1 (deprecated; not written by this crate).
    #[error(
        "writing with KMS v1 provider {provider:?} is not supported (KMS v1 is deprecated: use apiVersion v2)"
    )]
    KmsV1NotSupported {
        /// Provider name.
        provider: String,
    },
    /// The first provider is a local provider without keys.
    #[error("the first provider ({kind}) has no keys")]
    NoKeys {
        /// Provider type.
        kind: ProviderKind,
    },
}

/// How far [`walk`] goes with a matching provider.
enum Mode<'a> {
    /// Structure checks only (no keys used for KMS, no decryption).
    Judge,
    /// Decrypt, with KMS seeds from the caller.
    Decrypt {
        etcd_key: &'a [u8],
        seeds: &'a dyn KmsSeeds,
    },
}

/// Decides who reads `value` and whether it is stale, without decrypting: the first
/// provider whose prefix matches and whose payload is well formed is taken to read
/// it. `providers` is what [`crate::EncryptionConfiguration::providers_for`] returns
/// (empty: no rule matched, bare identity).
pub fn judge(
    providers: &[&ProviderConfig],
    value: &[u8],
    kms: &dyn KmsWriteState,
) -> Result<Read, ReadFailure> {
    walk(providers, value, kms, &Mode::Judge).map(|(read, _)| read)
}

/// kube-apiserver's `TransformFromStorage`: decrypts `value` stored under
/// `etcd_key` (the AAD) with the providers in order and reports staleness.
pub fn transform_from_storage(
    providers: &[&ProviderConfig],
    value: &[u8],
    etcd_key: &[u8],
    kms_state: &dyn KmsWriteState,
    seeds: &dyn KmsSeeds,
) -> Result<Decrypted, ReadFailure> {
    let (read, plaintext) = walk(
        providers,
        value,
        kms_state,
        &Mode::Decrypt { etcd_key, seeds },
    )?;
    // walk returns a plaintext for every successful read in Decrypt mode.
    let plaintext = plaintext.ok_or(ReadFailure::NoMatchingPrefix)?;
    Ok(Decrypted { plaintext, read })
}

/// kube-apiserver's `TransformToStorage`: encrypts with the first provider and its
/// first key (KMS v2 with the caller's write key). No providers means identity.
pub fn transform_to_storage(
    providers: &[&ProviderConfig],
    plaintext: &[u8],
    etcd_key: &[u8],
    kms: &dyn KmsWriteKeys,
) -> Result<Vec<u8>, WriteError> {
    let Some(first) = providers.first() else {
        return Ok(plaintext.to_vec());
    };
    let (kind, keys) = match first {
        ProviderConfig::Identity => return Ok(plaintext.to_vec()),
        ProviderConfig::Kms(k) if k.api_version == KmsApiVersion::V1 => {
            return Err(WriteError::KmsV1NotSupported {
                provider: k.name.clone(),
            });
        }
        ProviderConfig::Kms(k) => {
            let write_key =
                kms.kms_v2_write_key(&k.name)
                    .ok_or_else(|| WriteError::NoKmsWriteKey {
                        provider: k.name.clone(),
                    })?;
            let mut out = ProviderKind::KmsV2.prefix(&k.name);
            out.extend_from_slice(&kmsv2::seal(write_key, plaintext, etcd_key)?);
            return Ok(out);
        }
        ProviderConfig::AesCbc(k) => (ProviderKind::AesCbc, &k.keys),
        ProviderConfig::AesGcm(k) => (ProviderKind::AesGcm, &k.keys),
        ProviderConfig::Secretbox(k) => (ProviderKind::Secretbox, &k.keys),
    };
    let key = keys.first().ok_or(WriteError::NoKeys { kind })?;
    let secret = key.secret.expose();
    let payload = match kind {
        ProviderKind::AesCbc => aescbc::encrypt(secret, plaintext)?,
        ProviderKind::AesGcm => aesgcm::seal(secret, plaintext, etcd_key)?,
        _ => secretbox::seal(secret, plaintext)?,
    };
    let mut out = kind.prefix(&key.name);
    out.extend_from_slice(&payload);
    Ok(out)
}

fn walk(
    providers: &[&ProviderConfig],
    value: &[u8],
    kms: &dyn KmsWriteState,
    mode: &Mode<'_>,
) -> Result<Found, ReadFailure> {
    let encrypted = value.starts_with(prefix::ENCRYPTED);
    let decrypting = matches!(mode, Mode::Decrypt { .. });
    if providers.is_empty() {
        if encrypted {
            return Err(ReadFailure::IdentityGotEncrypted);
        }
        return Ok(read_by_identity(None, Vec::new(), value, decrypting));
    }

    let mut attempts = Vec::new();
    for (i, provider) in providers.iter().enumerate() {
        let mut stale = Vec::new();
        if i != 0 {
            stale.push(StaleReason::NotFirstProvider { provider_index: i });
        }
        let found = match provider {
            ProviderConfig::Identity => {
                // identity's errors are skipped
                (!encrypted).then(|| read_by_identity(Some(i), stale, value, decrypting))
            }
            ProviderConfig::AesCbc(_)
            | ProviderConfig::AesGcm(_)
            | ProviderConfig::Secretbox(_) => {
                read_by_local_key(i, provider, stale, value, mode, &mut attempts)
            }
            ProviderConfig::Kms(cfg) if cfg.api_version == KmsApiVersion::V1 => {
                read_by_kms_v1(i, cfg, stale, value, mode, &mut attempts)
            }
            ProviderConfig::Kms(cfg) => {
                read_by_kms_v2(i, cfg, stale, value, kms, mode, &mut attempts)
            }
        };
        if let Some(found) = found {
            return Ok(found);
        }
    }
    if attempts.is_empty() {
        Err(ReadFailure::NoMatchingPrefix)
    } else {
        Err(ReadFailure::AllFailed { attempts })
    }
}

/// Who read a value, and its plaintext when decrypting.
type Found = (Read, Option<Plaintext>);

/// Identity reads anything that is not encrypted (`provider_index` `None`:
/// no rule matched, the bare identity of kube-apiserver).
fn read_by_identity(
    provider_index: Option<usize>,
    stale_reasons: Vec<StaleReason>,
    value: &[u8],
    decrypting: bool,
) -> Found {
    let reader = Reader {
        provider_index,
        kind: ProviderKind::Identity,
        name: None,
        key_index: None,
    };
    (
        Read {
            reader,
            stale_reasons,
            kms_write_state_unknown: false,
        },
        decrypting.then(|| Plaintext::new(value.to_vec())),
    )
}

/// aescbc, aesgcm, secretbox: each key whose name prefix matches is tried in
/// order; failures are recorded in `attempts`.
fn read_by_local_key(
    i: usize,
    provider: &ProviderConfig,
    stale: Vec<StaleReason>,
    value: &[u8],
    mode: &Mode<'_>,
    attempts: &mut Vec<FailedAttempt>,
) -> Option<Found> {
    let kind = match provider {
        ProviderConfig::AesCbc(_) => ProviderKind::AesCbc,
        ProviderConfig::AesGcm(_) => ProviderKind::AesGcm,
        _ => ProviderKind::Secretbox,
    };
    for (k, key) in provider.keys().unwrap_or_default().iter().enumerate() {
        let Some(payload) = prefix::strip(value, kind, &key.name) else {
            continue;
        };
        let reader = Reader {
            provider_index: Some(i),
            kind,
            name: Some(key.name.clone()),
            key_index: Some(k),
        };
        let secret = key.secret.expose();
        let result = match (mode, kind) {
            (Mode::Judge, ProviderKind::AesCbc) => aescbc::check_structure(payload).map(|()| None),
            (Mode::Judge, ProviderKind::AesGcm) => aesgcm::check_structure(payload).map(|()| None),
            (Mode::Judge, _) => secretbox::check_structure(payload).map(|()| None),
            (Mode::Decrypt { .. }, ProviderKind::AesCbc) => {
                aescbc::decrypt(secret, payload).map(Some)
            }
            (Mode::Decrypt { etcd_key, .. }, ProviderKind::AesGcm) => {
                aesgcm::open(secret, payload, etcd_key).map(Some)
            }
            (Mode::Decrypt { .. }, _) => secretbox::open(secret, payload).map(Some),
        };
        match result {
            Ok(plain) => {
                let mut stale_reasons = stale;
                if k != 0 {
                    stale_reasons.push(StaleReason::NotFirstKey { key_index: k });
                }
                return Some((
                    Read {
                        reader,
                        stale_reasons,
                        kms_write_state_unknown: false,
                    },
                    plain,
                ));
            }
            Err(e) => attempts.push(FailedAttempt {
                reader,
                error: e.into(),
            }),
        }
    }
    None
}

/// KMS v1 (deprecated): stale when read through the CBC fallback.
fn read_by_kms_v1(
    i: usize,
    cfg: &KmsConfig,
    mut stale: Vec<StaleReason>,
    value: &[u8],
    mode: &Mode<'_>,
    attempts: &mut Vec<FailedAttempt>,
) -> Option<Found> {
    let payload = prefix::strip(value, ProviderKind::KmsV1, &cfg.name)?;
    let reader = Reader {
        provider_index: Some(i),
        kind: ProviderKind::KmsV1,
        name: Some(cfg.name.clone()),
        key_index: None,
    };
    match read_kms_v1(&cfg.name, payload, mode) {
        Ok((plain, cbc)) => {
            if cbc {
                stale.push(StaleReason::KmsV1CbcFallback);
            }
            Some((
                Read {
                    reader,
                    stale_reasons: stale,
                    kms_write_state_unknown: false,
                },
                plain,
            ))
        }
        Err(error) => {
            attempts.push(FailedAttempt { reader, error });
            None
        }
    }
}

/// KMS v2: stale when the stored keyID differs from the apiserver's current
/// write key_id, or the DEK source type is the legacy one.
fn read_by_kms_v2(
    i: usize,
    cfg: &KmsConfig,
    mut stale: Vec<StaleReason>,
    value: &[u8],
    kms: &dyn KmsWriteState,
    mode: &Mode<'_>,
    attempts: &mut Vec<FailedAttempt>,
) -> Option<Found> {
    let payload = prefix::strip(value, ProviderKind::KmsV2, &cfg.name)?;
    let reader = Reader {
        provider_index: Some(i),
        kind: ProviderKind::KmsV2,
        name: Some(cfg.name.clone()),
        key_index: None,
    };
    match read_kms_v2(&cfg.name, payload, mode) {
        Ok((object, plain)) => {
            let mut unknown = false;
            if object.encrypted_dek_source_type
                != EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed as i32
            {
                stale.push(StaleReason::KmsV2LegacyDekSource);
            }
            match kms.current_key_id(&cfg.name) {
                Some(current) if current != object.key_id => {
                    stale.push(StaleReason::KmsV2KeyId {
                        stored: object.key_id.clone(),
                        current,
                    });
                }
                Some(_) => {}
                None => unknown = true,
            }
            Some((
                Read {
                    reader,
                    stale_reasons: stale,
                    kms_write_state_unknown: unknown,
                },
                plain,
            ))
        }
        Err(error) => {
            attempts.push(FailedAttempt { reader, error });
            None
        }
    }
}

fn read_kms_v1(
    provider: &str,
    payload: &[u8],
    mode: &Mode<'_>,
) -> Result<(Option<Plaintext>, bool), AttemptError> {
    let parts = kmsv1::split(payload)?;
    match mode {
        Mode::Judge => {
            if parts.encrypted_dek.is_empty() || parts.data.is_empty() {
                return Err(FormatError::TooShort {
                    len: payload.len(),
                    min: 3,
                }
                .into());
            }
            Ok((None, false))
        }
        Mode::Decrypt { etcd_key, seeds } => {
            let dek = seeds.kms_v1_dek(provider, parts.encrypted_dek)?;
            let (plain, cbc) = kmsv1::open(&dek, parts.data, etcd_key)?;
            Ok((Some(plain), cbc))
        }
    }
}

fn read_kms_v2(
    provider: &str,
    payload: &[u8],
    mode: &Mode<'_>,
) -> Result<(EncryptedObject, Option<Plaintext>), AttemptError> {
    let object = kmsv2::decode(payload)?;
    match mode {
        Mode::Judge => Ok((object, None)),
        Mode::Decrypt { etcd_key, seeds } => {
            let source_type = EncryptedDekSourceType::try_from(object.encrypted_dek_source_type)
                .unwrap_or(EncryptedDekSourceType::AesGcmKey);
            let request = KmsV2SeedRequest {
                encrypted_dek_source: &object.encrypted_dek_source,
                key_id: &object.key_id,
                annotations: &object.annotations,
                source_type,
            };
            let seed = seeds.kms_v2_seed(provider, &request)?;
            let plain = kmsv2::open(&seed, &object, etcd_key)?;
            Ok((object, Some(plain)))
        }
    }
}
