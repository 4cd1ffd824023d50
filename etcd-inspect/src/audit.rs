//! Judging one stored value: classify it, map its key to a resource, and —
//! with a config — compare what it is stored with to what the config's first
//! provider would write, using `storage-encryption`'s reading model
//! ([`storage_encryption::judge`]). KMS v2 key staleness uses each plugin's
//! current `key_id` (Status, or `--kms-key-id`), fetched once up front.

use std::collections::BTreeMap;
use std::time::Duration;

use storage_encryption::format::kmsv1;
use storage_encryption::{
    Classification, EncryptionConfiguration, KeyResource, KmsApiVersion, PlaintextKind,
    ProviderConfig, ReadFailure, StaleReason, classify_value, judge, resource_for_key,
};

use crate::cli::Settings;
use crate::decrypt::{DecryptCheck, Decryptor};
use crate::kms::{KmsClient, KmsError};
use crate::record::{Finding, ProviderKind, ProviderRef, Record};

/// Why the audit could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum AuditorError {
    /// An override names no KMS v2 provider of the config.
    #[error("{flag} {name}: the config has no KMS v2 provider named {name:?}")]
    UnknownKmsProvider {
        /// The flag.
        flag: &'static str,
        /// The name given.
        name: String,
    },
    /// The plugin of a provider could not be asked.
    #[error(
        "KMS provider {provider:?}: {source}; to audit without reaching it, give its current key_id with --kms-key-id {provider}=KEY_ID, or its socket with --kms-endpoint {provider}=ENDPOINT"
    )]
    Kms {
        /// Provider name.
        provider: String,
        /// What failed.
        #[source]
        source: KmsError,
    },
    /// Status answered without a key_id.
    #[error(
        "KMS provider {provider:?} at {endpoint}: Status returned an empty key_id (healthz {healthz:?})"
    )]
    EmptyKeyId {
        /// Provider name.
        provider: String,
        /// Endpoint used.
        endpoint: String,
        /// What the plugin said about its health.
        healthz: String,
    },
}

/// Judges values; holds the config, the KMS write state and, with
/// `--decrypt-check`, the plugin clients.
#[derive(Debug)]
pub struct Auditor {
    config: Option<EncryptionConfiguration>,
    /// Apiserver prefixes tried in order to map a key (at least one).
    etcd_prefixes: Vec<String>,
    /// Current key_id per KMS v2 provider name.
    kms_key_ids: BTreeMap<String, String>,
    decryptor: Option<Decryptor>,
}

/// A KMS provider of the config, with the endpoint to use.
struct KmsTarget {
    name: String,
    endpoint: String,
    timeout: Duration,
    /// First provider of some entry: its key_id decides `ok` vs `kms-key-stale`.
    first_somewhere: bool,
}

fn kms_v2_targets(
    config: &EncryptionConfiguration,
    overrides: &BTreeMap<String, String>,
) -> Vec<KmsTarget> {
    let mut out: BTreeMap<String, KmsTarget> = BTreeMap::new();
    for entry in &config.resources {
        for (i, p) in entry.providers.iter().enumerate() {
            if let ProviderConfig::Kms(k) = p
                && k.api_version == KmsApiVersion::V2
            {
                let t = out.entry(k.name.clone()).or_insert_with(|| KmsTarget {
                    name: k.name.clone(),
                    endpoint: overrides
                        .get(&k.name)
                        .cloned()
                        .unwrap_or_else(|| k.endpoint.clone()),
                    timeout: k.effective_timeout(),
                    first_somewhere: false,
                });
                t.first_somewhere |= i == 0;
            }
        }
    }
    out.into_values().collect()
}

impl Auditor {
    /// Without a config: classification only.
    pub fn unaudited(etcd_prefix: &str) -> Self {
        Auditor {
            config: None,
            etcd_prefixes: vec![etcd_prefix.to_owned()],
            kms_key_ids: BTreeMap::new(),
            decryptor: None,
        }
    }

    /// An auditor with a known KMS write state and no plugin access
    /// (what `--kms-key-id` gives; used by tests and the benchmark).
    pub fn with_key_ids(
        config: EncryptionConfiguration,
        etcd_prefix: &str,
        kms_key_ids: BTreeMap<String, String>,
    ) -> Self {
        Auditor {
            config: Some(config),
            etcd_prefixes: vec![etcd_prefix.to_owned()],
            kms_key_ids,
            decryptor: None,
        }
    }

    /// Gets each KMS v2 provider's current key_id (`--kms-key-id`, else Status
    /// through the config's or `--kms-endpoint`'s socket) and, for
    /// `--decrypt-check`, connects to every KMS v2 plugin.
    pub async fn prepare(
        config: Option<EncryptionConfiguration>,
        settings: &Settings,
    ) -> Result<Self, AuditorError> {
        let Some(config) = config else {
            return Ok(
                Self::unaudited(&settings.etcd_prefix).with_etcd_prefixes(&settings.etcd_prefixes)
            );
        };
        let targets = kms_v2_targets(&config, &settings.kms_endpoints);
        for (flag, map) in [
            ("--kms-endpoint", &settings.kms_endpoints),
            ("--kms-key-id", &settings.kms_key_ids),
        ] {
            if let Some(name) = map.keys().find(|n| !targets.iter().any(|t| &t.name == *n)) {
                return Err(AuditorError::UnknownKmsProvider {
                    flag,
                    name: name.clone(),
                });
            }
        }
        let mut key_ids = BTreeMap::new();
        let mut clients = BTreeMap::new();
        for t in &targets {
            let given = settings.kms_key_ids.get(&t.name);
            let need_client = settings.decrypt_check || given.is_none();
            if !need_client {
                continue;
            }
            let kms_err = |source| AuditorError::Kms {
                provider: t.name.clone(),
                source,
            };
            let mut client = match KmsClient::connect(&t.endpoint, t.timeout).await {
                Ok(c) => c,
                // A provider that is never first only ever reads stale values:
                // its key_id changes no finding, so an unreachable plugin is
                // tolerated unless values must be decrypted.
                Err(e) if !t.first_somewhere && !settings.decrypt_check => {
                    tracing::warn!(provider = %t.name, error = %e, "KMS plugin unreachable; its values are stale anyway");
                    continue;
                }
                Err(e) => return Err(kms_err(e)),
            };
            if given.is_none() {
                match client.status().await {
                    Ok(s) if s.key_id.is_empty() => {
                        return Err(AuditorError::EmptyKeyId {
                            provider: t.name.clone(),
                            endpoint: t.endpoint.clone(),
                            healthz: s.healthz,
                        });
                    }
                    Ok(s) => {
                        if s.healthz != "ok" {
                            tracing::warn!(provider = %t.name, healthz = %s.healthz, "KMS plugin reports unhealthy");
                        }
                        key_ids.insert(t.name.clone(), s.key_id);
                    }
                    Err(e) if !t.first_somewhere && !settings.decrypt_check => {
                        tracing::warn!(provider = %t.name, error = %e, "KMS Status failed; its values are stale anyway");
                    }
                    Err(e) => return Err(kms_err(e)),
                }
            }
            if settings.decrypt_check {
                clients.insert(t.name.clone(), client);
            }
        }
        for (name, id) in &settings.kms_key_ids {
            key_ids.insert(name.clone(), id.clone());
        }
        let mut auditor = Self::with_key_ids(config, &settings.etcd_prefix, key_ids)
            .with_etcd_prefixes(&settings.etcd_prefixes);
        if settings.decrypt_check {
            auditor.decryptor = Some(Decryptor::new(clients));
        }
        Ok(auditor)
    }

    /// With `--decrypt-check`: the KMS plugin outage met while auditing the
    /// last value, if any. That value's record is not a verdict; the run must
    /// stop with an error (see [`crate::run::RunError::PluginOutage`]).
    pub fn plugin_outage(&self) -> Option<&crate::decrypt::PluginOutage> {
        self.decryptor.as_ref().and_then(Decryptor::outage)
    }

    /// Maps keys below each of `prefixes` in turn (the first that maps a key
    /// wins); an empty list keeps the current prefix.
    pub fn with_etcd_prefixes(mut self, prefixes: &[String]) -> Self {
        if !prefixes.is_empty() {
            self.etcd_prefixes = prefixes.to_vec();
        }
        self
    }

    /// Maps `key` to a resource below the first apiserver prefix that fits.
    pub fn map_key(&self, key: &[u8]) -> Result<KeyResource, storage_encryption::KeyError> {
        let mut first_err = None;
        for p in &self.etcd_prefixes {
            match resource_for_key(key, p) {
                Ok(m) => return Ok(m),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            // Never empty (constructors set one); map below "/" otherwise.
            None => resource_for_key(key, "/"),
        }
    }

    /// The current key_id used for each KMS v2 provider.
    pub fn kms_key_ids(&self) -> &BTreeMap<String, String> {
        &self.kms_key_ids
    }

    /// Judges one value (and decrypts it with `--decrypt-check`).
    pub async fn audit(&mut self, key: &[u8], value: &[u8]) -> Record {
        let (mut record, classification, mapped) = self.judge_value(key, value);
        let Some(decryptor) = self.decryptor.as_mut() else {
            return record;
        };
        let (Some(config), Some(mapped)) = (&self.config, mapped) else {
            return record;
        };
        // Only values that a reader accepts are worth decrypting; the others
        // already carry a failing finding.
        if !matches!(
            record.finding,
            Some(Finding::Ok | Finding::Stale | Finding::KmsKeyStale)
        ) {
            return record;
        }
        let providers = mapped.providers(config).providers;
        match decryptor
            .check(&providers, &classification, key, value, &self.kms_key_ids)
            .await
        {
            DecryptCheck::Ok => {}
            DecryptCheck::Skipped(why) => {
                let note = format!("decrypt check skipped: {why}");
                record.detail = Some(match record.detail.take() {
                    Some(d) => format!("{d}; {note}"),
                    None => note,
                });
            }
            DecryptCheck::Failed(reason) => {
                record.finding = Some(Finding::DecryptFailed);
                record.detail = Some(reason);
            }
        }
        record
    }

    /// The record of a deletion (`--all-revisions`): no value, nothing to
    /// judge, not counted as judged.
    pub fn tombstone(&self, key: &[u8], rev: crate::record::RevisionInfo) -> Record {
        let mapped = self.map_key(key).ok();
        Record {
            key: String::from_utf8_lossy(key).into_owned(),
            resource: mapped.as_ref().map(|m| m.group_resource.config_name()),
            namespace: mapped.as_ref().and_then(|m| m.namespace.clone()),
            name: mapped.map(|m| m.name),
            actual: ProviderRef {
                provider: None,
                provider_name: None,
                key_name: None,
            },
            key_id: None,
            encoding: None,
            expected: None,
            finding: None,
            detail: Some(format!("tombstone: deleted at revision {}", rev.revision)),
            revision: Some(rev),
        }
    }

    /// Classification and judgement without decrypting.
    pub fn judge_value(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> (Record, Classification, Option<KeyResource>) {
        let classification = classify_value(value);
        let mapped = self.map_key(key);
        let mut record = Record {
            key: String::from_utf8_lossy(key).into_owned(),
            resource: None,
            namespace: None,
            name: None,
            actual: actual_provider(&classification, self.config.as_ref()),
            key_id: match &classification {
                Classification::KmsV2 { header, .. } => Some(header.key_id.clone()),
                _ => None,
            },
            encoding: match &classification {
                Classification::Plaintext(kind) => Some(kind.as_str()),
                _ => None,
            },
            expected: None,
            finding: None,
            detail: None,
            revision: None,
        };
        if let Some(reason) = undecodable_reason(&classification) {
            record.finding = Some(Finding::Undecodable);
            record.detail = Some(reason);
        }
        let mapped = match mapped {
            Ok(m) => m,
            Err(e) => {
                if record.finding.is_none() {
                    if self.config.is_some() {
                        // Fail closed: a value nobody can judge is a finding.
                        record.finding = Some(Finding::Unmapped);
                        record.detail = Some(format!(
                            "not judged: {e}; if kube-apiserver runs with another --etcd-prefix, give it with --etcd-prefix"
                        ));
                    } else {
                        record.detail = Some(format!("not audited: {e}"));
                    }
                }
                return (record, classification, None);
            }
        };
        record.resource = Some(mapped.group_resource.config_name());
        record.namespace = mapped.namespace.clone();
        record.name = Some(mapped.name.clone());
        let Some(config) = &self.config else {
            return (record, classification, Some(mapped));
        };

        let providers = mapped.providers(config).providers;
        let expected = expected_provider(providers.first().copied());
        record.expected = Some(expected.clone());
        if record.finding.is_some() {
            return (record, classification, Some(mapped));
        }
        let (finding, detail) = match judge(&providers, value, &self.kms_key_ids) {
            Err(ReadFailure::AllFailed { attempts })
                if attempts
                    .iter()
                    .all(|a| matches!(a.error, storage_encryption::AttemptError::Format(_))) =>
            {
                (
                    Finding::Undecodable,
                    ReadFailure::AllFailed { attempts }.to_string(),
                )
            }
            Err(e) => (Finding::Unreadable, e.to_string()),
            Ok(read) => {
                let plaintext_read = read.reader.kind == storage_encryption::ProviderKind::Identity;
                if plaintext_read && expected.provider != Some(ProviderKind::Identity) {
                    (
                        Finding::Plaintext,
                        format!(
                            "stored in plaintext; the config writes {}",
                            expected.label()
                        ),
                    )
                } else if !read.is_stale() {
                    (Finding::Ok, String::new())
                } else {
                    let only_key_id = read
                        .stale_reasons
                        .iter()
                        .all(|r| matches!(r, StaleReason::KmsV2KeyId { .. }));
                    let reasons: Vec<String> =
                        read.stale_reasons.iter().map(ToString::to_string).collect();
                    let f = if only_key_id {
                        Finding::KmsKeyStale
                    } else {
                        Finding::Stale
                    };
                    (
                        f,
                        format!(
                            "{}; the config writes {}",
                            reasons.join("; "),
                            expected.label()
                        ),
                    )
                }
            }
        };
        record.finding = Some(finding);
        record.detail = (!detail.is_empty()).then_some(detail);
        (record, classification, Some(mapped))
    }
}

/// What the value says it is stored with.
fn actual_provider(c: &Classification, config: Option<&EncryptionConfiguration>) -> ProviderRef {
    let kind = c.provider_kind();
    let name = match c {
        // A v1 provider name may contain ':': prefer a configured name that fits.
        Classification::KmsV1 {
            rest,
            provider_guess,
        } => config
            .and_then(|cfg| {
                let names = cfg.all_providers().filter_map(|(_, _, p)| match p {
                    ProviderConfig::Kms(k) if k.api_version == KmsApiVersion::V1 => {
                        Some(k.name.as_str())
                    }
                    _ => None,
                });
                kmsv1::match_provider(rest, names).map(str::to_owned)
            })
            .or_else(|| provider_guess.clone()),
        other => other.name().map(str::to_owned),
    };
    let is_kms = matches!(kind, Some(ProviderKind::KmsV1 | ProviderKind::KmsV2));
    ProviderRef {
        provider: kind,
        provider_name: if is_kms { name.clone() } else { None },
        key_name: if is_kms { None } else { name },
    }
}

/// The config's first provider (identity when no rule matches).
fn expected_provider(first: Option<&ProviderConfig>) -> ProviderRef {
    match first {
        None | Some(ProviderConfig::Identity) => ProviderRef::identity(),
        Some(ProviderConfig::Kms(k)) => ProviderRef {
            provider: Some(if k.api_version == KmsApiVersion::V1 {
                ProviderKind::KmsV1
            } else {
                ProviderKind::KmsV2
            }),
            provider_name: Some(k.name.clone()),
            key_name: None,
        },
        Some(p) => ProviderRef {
            provider: Some(match p {
                ProviderConfig::AesCbc(_) => ProviderKind::AesCbc,
                ProviderConfig::AesGcm(_) => ProviderKind::AesGcm,
                _ => ProviderKind::Secretbox,
            }),
            provider_name: None,
            key_name: p.keys().and_then(|k| k.first()).map(|k| k.name.clone()),
        },
    }
}

/// Values kube-apiserver could not have written (or cannot decode).
fn undecodable_reason(c: &Classification) -> Option<String> {
    match c {
        Classification::Undecodable { reason, .. } => Some(reason.clone()),
        Classification::Plaintext(PlaintextKind::Other) => Some(
            "not a Kubernetes object encoding (protobuf, JSON or CBOR) and no k8s:enc: prefix"
                .into(),
        ),
        Classification::Plaintext(PlaintextKind::Protobuf { type_meta: None }) => {
            Some("k8s protobuf envelope does not decode (truncated or corrupt)".into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage_encryption::{KmsV2WriteKey, NoKms, Seed, transform_to_storage};

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn config() -> EncryptionConfiguration {
        EncryptionConfiguration::parse(&format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [events]\n    providers:\n      - identity: {{}}\n  - resources: ['*.*']\n    providers:\n      - kms: {{apiVersion: v2, name: p, endpoint: unix:///x.sock}}\n      - aesgcm: {{keys: [{{name: k1, secret: {KEY}}}]}}\n      - identity: {{}}\n"
        ))
        .unwrap()
    }

    fn auditor() -> Auditor {
        Auditor::with_key_ids(
            config(),
            "/registry",
            [("p".to_owned(), "kek-2".to_owned())].into(),
        )
    }

    fn kms_value(key: &str, key_id: &str) -> Vec<u8> {
        let cfg = config();
        let providers = cfg
            .providers_for(&storage_encryption::GroupResource::new("", "secrets"))
            .providers;
        let wk = KmsV2WriteKey {
            seed: Seed::new([1; 32]),
            encrypted_dek_source: vec![9; 40],
            key_id: key_id.into(),
            annotations: Default::default(),
        };
        let keys: BTreeMap<String, KmsV2WriteKey> = [("p".to_owned(), wk)].into();
        transform_to_storage(&providers, b"k8s\0obj", key.as_bytes(), &keys).unwrap()
    }

    fn finding(a: &Auditor, key: &str, value: &[u8]) -> Option<Finding> {
        a.judge_value(key.as_bytes(), value).0.finding
    }

    #[test]
    fn kms_key_id_decides_ok_or_kms_key_stale() {
        let a = auditor();
        let k = "/registry/secrets/ns/a";
        assert_eq!(finding(&a, k, &kms_value(k, "kek-2")), Some(Finding::Ok));
        let (r, _, _) = a.judge_value(k.as_bytes(), &kms_value(k, "kek-1"));
        assert_eq!(r.finding, Some(Finding::KmsKeyStale));
        assert_eq!(r.key_id.as_deref(), Some("kek-1"));
        assert_eq!(r.actual.provider_name.as_deref(), Some("p"));
        // The detail names key_id hashes, which are public.
        assert!(r.detail.unwrap().contains("sha256:"));
    }

    #[test]
    fn second_provider_is_stale_and_plaintext_is_plaintext() {
        let a = auditor();
        let cfg = config();
        let providers = cfg
            .providers_for(&storage_encryption::GroupResource::new("", "secrets"))
            .providers;
        let k = "/registry/secrets/ns/b";
        let gcm = transform_to_storage(&providers[1..], b"k8s\0obj", k.as_bytes(), &NoKms).unwrap();
        assert_eq!(finding(&a, k, &gcm), Some(Finding::Stale));
        let pb = b"k8s\0\x0a\x0c\x0a\x02v1\x12\x06Secret\x12\x01x\x1a\x00\x22\x00";
        assert_eq!(finding(&a, k, pb), Some(Finding::Plaintext));
        // Events are exempt (identity first).
        assert_eq!(finding(&a, "/registry/events/ns/e", pb), Some(Finding::Ok));
    }

    #[test]
    fn garbage_is_undecodable_and_unmapped_keys_are_a_finding() {
        let a = auditor();
        assert_eq!(
            finding(&a, "/registry/secrets/ns/c", b"\x00\x01garbage"),
            Some(Finding::Undecodable)
        );
        assert_eq!(
            finding(&a, "/registry/secrets/ns/c", b"k8s:enc:aesgcm:v1:k1:short"),
            Some(Finding::Undecodable)
        );
        let pb = b"k8s\0\x0a\x0c\x0a\x02v1\x12\x06Secret\x12\x01x\x1a\x00\x22\x00";
        let (r, _, mapped) = a.judge_value(b"/registry/whatever", pb);
        assert!(mapped.is_none());
        assert_eq!(r.finding, Some(Finding::Unmapped));
        assert!(r.detail.unwrap().contains("--etcd-prefix"));
        // Outside the apiserver prefix: unmapped too (never silently skipped).
        let (r, _, _) = a.judge_value(b"/wild/secrets/ns/a", pb);
        assert_eq!(r.finding, Some(Finding::Unmapped));
        // Without a config nothing is judged, so nothing is unmapped.
        let (r, _, _) = Auditor::unaudited("/registry").judge_value(b"/registry/whatever", pb);
        assert_eq!(r.finding, None);
        assert!(r.detail.unwrap().starts_with("not audited"));
    }

    #[test]
    fn without_config_only_classifies() {
        let a = Auditor::unaudited("/registry");
        let k = "/registry/secrets/ns/a";
        let (r, _, _) = a.judge_value(k.as_bytes(), &kms_value(k, "kek-1"));
        assert_eq!(r.finding, None);
        assert_eq!(r.expected, None);
        assert_eq!(r.actual.provider, Some(ProviderKind::KmsV2));
        assert_eq!(r.resource.as_deref(), Some("secrets"));
    }
}
