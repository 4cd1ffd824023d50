//! # storage-encryption
//!
//! kube-apiserver's encryption at rest, byte for byte, as a pure library (no I/O):
//! the EncryptionConfiguration file, the stored value format of every provider,
//! kube-apiserver's reading model (who reads a value, is it stale), and the etcd
//! key ↔ resource map. `etcd-inspect`, the rotator and the kube-apiserver stand-in
//! build on it. Each format is described where it is implemented (the module docs
//! of [`format`](mod@format), [`read`], [`etcd_key`], [`config`]); the tests hold
//! known answers written by kube-apiserver's own code (`testdata/vectors/` at the
//! workspace root, with a README saying how they were made).
//!
//! ## Where to start
//!
//! | task | API |
//! |---|---|
//! | load a config | [`EncryptionConfiguration::parse`] (strict; errors name the field, e.g. `resources[0].providers[1].aescbc.keys[0].secret: ...`) |
//! | edit and write it | plain pub fields (ordered `Vec`s) → [`EncryptionConfiguration::validate`] → [`EncryptionConfiguration::render`] |
//! | config hash metric | [`config_file_hash`] (`sha256:<hex>` of the file bytes), [`key_id_hash`] |
//! | providers of a resource | [`EncryptionConfiguration::providers_for`] ([`GroupResource`]) → [`ProviderMatch`] |
//! | etcd key → resource | [`resource_for_key`] → [`KeyResource`] (and [`KeyResource::providers`]); reverse: [`key_prefix_for`], [`object_key`] |
//! | what is this value? | [`classify_value`] → [`Classification`] (plaintext kind, provider, key / provider name, KMS v2 header) |
//! | who reads it, is it stale? (no keys needed) | [`judge`] → [`Read`] / [`ReadFailure`] |
//! | decrypt as kube-apiserver would | [`transform_from_storage`] (KMS seeds through your [`KmsSeeds`]) → [`Decrypted`] |
//! | encrypt as kube-apiserver would | [`transform_to_storage`] (KMS v2 through your [`KmsWriteKeys`]) |
//! | one format, low level | [`format`](mod@format): [`format::aescbc`], [`format::aesgcm`], [`format::secretbox`], [`format::kmsv1`], [`format::kmsv2`] (HKDF + AES-GCM, `EncryptedObject` validation), [`format::plaintext`] |
//!
//! ## Reading model in one paragraph
//!
//! `providers_for` (or `KeyResource::providers`) gives the ordered providers for a
//! resource (empty = no rule matched = bare identity). [`judge`] walks them like
//! kube-apiserver, checking only prefixes and payload structure; it says which
//! provider/key reads the value and every [`StaleReason`]. For KMS v2 it needs the
//! apiserver's current write `key_id` per provider ([`KmsWriteState`]: a
//! `BTreeMap<String, String>` works; [`NoKms`] when unknown, then
//! [`Read::kms_write_state_unknown`] is set). [`transform_from_storage`] does the same
//! but decrypts, moving on to the next matching provider when one fails, exactly as
//! kube-apiserver does. Audit findings map as: `Ok(read)` and not stale → ok; read by
//! identity while the first provider is not identity → plaintext; stale → stale
//! (a [`StaleReason::KmsV2KeyId`] alone → kms-key-stale); `Err` → unreadable;
//! [`Classification::Undecodable`] → undecodable.
//!
//! ## KMS without I/O
//!
//! This crate never calls a plugin. Reads ask the caller's [`KmsSeeds`] for the
//! plugin's Decrypt of `encryptedDEKSource` (async callers pre-fetch and answer from a
//! map); writes take a [`KmsV2WriteKey`] (seed, its ciphertext, `key_id`, annotations)
//! that the caller obtained from Encrypt.
//!
//! ## Secrets
//!
//! Keys live in [`SecretBytes`] / [`Seed`], plaintext in [`Plaintext`]: zeroized on
//! drop, redacted `Debug`. `EncryptionConfiguration`'s `Debug` never shows key bytes;
//! [`EncryptionConfiguration::render`] returns a zeroizing string. Error messages
//! carry no key material or plaintext.
//!
//! ## YAML
//!
//! `serde-saphyr` 2 (what kube 5 uses): it parses with `deny_unknown_fields` and
//! serializes, so one crate serves both directions.

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod classify;
pub mod config;
pub mod etcd_key;
pub mod format;
#[doc(hidden)]
pub mod fuzz_entry;
mod rand;
pub mod read;
mod resource;
mod secret;

pub use classify::{Classification, classify_value};
pub use config::{
    ConfigApiVersion, ConfigError, DEFAULT_KMS_TIMEOUT, DurationError, EncryptionConfiguration,
    FieldError, Key, KeysConfig, KmsApiVersion, KmsConfig, MatchRule, ProviderConfig,
    ProviderMatch, ResourceConfig, config_file_hash, format_go_duration, key_id_hash,
    parse_go_duration, redact_parser_message,
};
pub use etcd_key::{
    BUILTIN_RESOURCES, BuiltinResource, DEFAULT_PREFIX, KeyError, KeyKind, KeyResource,
    key_prefix_for, object_key, resource_for_key,
};
pub use format::FormatError;
pub use format::kmsv2::{EncryptedDekSourceType, EncryptedObject, KmsV2Header, KmsV2WriteKey};
pub use format::plaintext::{PlaintextKind, TypeMeta};
pub use format::prefix::ProviderKind;
pub use rand::RandomError;
pub use read::{
    AttemptError, Decrypted, FailedAttempt, KmsError, KmsSeeds, KmsV2SeedRequest, KmsWriteKeys,
    KmsWriteState, NoKms, Read, ReadFailure, Reader, StaleReason, WriteError, judge,
    transform_from_storage, transform_to_storage,
};
pub use resource::GroupResource;
pub use secret::{Plaintext, SecretBytes, Seed};
