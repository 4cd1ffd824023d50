//! Every value of `shared/vectors/apiserver-written.json` (written by kube-apiserver's
//! own code): classification, key → resource, decryption to the exact plaintext, and
//! the ok/stale judgment of kube-apiserver's read path with both configurations.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::{TestPlugin, load_vectors, read_vector_file};
use storage_encryption::{
    Classification, DEFAULT_PREFIX, EncryptedDekSourceType, EncryptionConfiguration, NoKms,
    PlaintextKind, ProviderKind, ReadFailure, judge, resource_for_key, transform_from_storage,
};

const CONFIGS: [&str; 2] = [
    "config-secrets-all-providers.yaml",
    "config-wildcard-events-exempt.yaml",
];

#[test]
fn vectors_file_has_the_documented_items() {
    let v = load_vectors();
    assert_eq!(v.items.len(), 18, "README says 18 values");
    for item in &v.items {
        assert_eq!(item.read_with.len(), 2, "{}", item.etcd_key);
    }
}

#[test]
fn every_vector_classifies_as_its_prefix_says() {
    let v = load_vectors();
    let mut seen = BTreeMap::new();
    for item in &v.items {
        let class = storage_encryption::classify_value(&item.stored);
        let key = &item.etcd_key;
        match &class {
            Classification::KmsV2 { provider, header } => {
                assert!(
                    item.stored.starts_with(b"k8s:enc:kms:v2:test-plugin:"),
                    "{key}"
                );
                assert_eq!(provider, &v.provider_name, "{key}");
                assert_eq!(header.key_id, v.key_id, "{key}");
                assert_eq!(
                    header.dek_source_type,
                    EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed,
                    "{key}"
                );
                assert!(
                    header
                        .annotations
                        .contains_key("kek.test-plugin.example.com"),
                    "{key}: {header:?}"
                );
                assert!(header.encrypted_dek_source_len > 28, "{key}");
            }
            Classification::AesCbc { key_name }
            | Classification::AesGcm { key_name }
            | Classification::Secretbox { key_name } => {
                assert_eq!(key_name, "key1", "{key}");
                let kind = class.provider_kind().unwrap();
                assert!(
                    item.stored
                        .starts_with(format!("{}key1:", kind.base_prefix()).as_bytes()),
                    "{key}"
                );
                assert!(
                    key.contains(&format!("enc-{}", kind.as_str())),
                    "{key} classified {kind}"
                );
            }
            Classification::Plaintext(PlaintextKind::Protobuf { type_meta }) => {
                let tm = type_meta.as_ref().unwrap();
                assert_eq!(tm.api_version, "v1", "{key}");
                let expected = if item.resource == "events" {
                    "Event"
                } else {
                    "Secret"
                };
                assert_eq!(tm.kind, expected, "{key}");
                assert_eq!(
                    &item.stored, &item.plaintext,
                    "{key}: identity stores plaintext as is"
                );
            }
            other => panic!("{key}: unexpected classification {other:?}"),
        }
        *seen.entry(class.provider_kind().unwrap()).or_insert(0) += 1;
    }
    for kind in [
        ProviderKind::KmsV2,
        ProviderKind::AesCbc,
        ProviderKind::AesGcm,
        ProviderKind::Secretbox,
        ProviderKind::Identity,
    ] {
        assert!(seen.contains_key(&kind), "no vector of {kind}: {seen:?}");
    }
}

#[test]
fn every_vector_key_maps_to_the_apiservers_resource() {
    for item in &load_vectors().items {
        let r = resource_for_key(item.etcd_key.as_bytes(), DEFAULT_PREFIX).unwrap();
        assert_eq!(
            (
                r.group_resource.group.as_str(),
                r.group_resource.resource.as_str()
            ),
            (item.group.as_str(), item.resource.as_str()),
            "{}",
            item.etcd_key
        );
        assert!(item.etcd_key.ends_with(&r.name), "{}", item.etcd_key);
        if let Some(ns) = &r.namespace {
            assert!(
                item.etcd_key.contains(&format!("/{ns}/")),
                "{}",
                item.etcd_key
            );
        }
    }
}

#[test]
fn every_vector_reads_and_judges_like_kube_apiserver() {
    let v = load_vectors();
    let plugin = TestPlugin {
        provider: v.provider_name.clone(),
        kek: v.kek.clone(),
    };
    let state: BTreeMap<String, String> = [(v.provider_name.clone(), v.key_id.clone())].into();
    let mut checked = 0;
    for name in CONFIGS {
        let config = EncryptionConfiguration::parse(&read_vector_file(name)).unwrap();
        for item in &v.items {
            let (_, ok, stale, error) = item.read_with.iter().find(|(c, ..)| c == name).unwrap();
            let key = &item.etcd_key;
            let resource = resource_for_key(key.as_bytes(), DEFAULT_PREFIX).unwrap();
            let matched = resource.providers(&config);

            let decrypted = transform_from_storage(
                &matched.providers,
                &item.stored,
                key.as_bytes(),
                &state,
                &plugin,
            );
            let judged = judge(&matched.providers, &item.stored, &state);
            match (&decrypted, &judged) {
                (Ok(d), Ok(j)) => {
                    assert!(
                        *ok,
                        "{name} {key}: we read it, kube-apiserver did not ({error})"
                    );
                    assert_eq!(
                        d.plaintext.expose(),
                        item.plaintext.as_slice(),
                        "{name} {key}: plaintext"
                    );
                    assert_eq!(
                        d.read.is_stale(),
                        *stale,
                        "{name} {key}: stale {:?}",
                        d.read.stale_reasons
                    );
                    assert_eq!(j, &d.read, "{name} {key}: judge agrees with decryption");
                }
                (Err(d), Err(j)) => {
                    assert!(!*ok, "{name} {key}: kube-apiserver read it, we failed: {d}");
                    assert_eq!(d, j, "{name} {key}");
                    match error.as_str() {
                        "identity transformer tried to read encrypted data" => {
                            assert_eq!(d, &ReadFailure::IdentityGotEncrypted, "{name} {key}")
                        }
                        "no matching prefix found" => {
                            assert_eq!(d, &ReadFailure::NoMatchingPrefix, "{name} {key}")
                        }
                        other => panic!("{name} {key}: unexpected apiserver error {other:?}"),
                    }
                    assert!(
                        d.to_string().contains(error.as_str()),
                        "{name} {key}: message {d}"
                    );
                }
                _ => panic!("{name} {key}: judge {judged:?} and decryption {decrypted:?} disagree"),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 36);
}

#[test]
fn kms_v2_vectors_go_stale_when_the_key_id_changes() {
    let v = load_vectors();
    let plugin = TestPlugin {
        provider: v.provider_name.clone(),
        kek: v.kek.clone(),
    };
    let rotated: BTreeMap<String, String> =
        [(v.provider_name.clone(), "test-plugin-rotated".to_string())].into();
    let config = EncryptionConfiguration::parse(&read_vector_file(CONFIGS[1])).unwrap();
    for item in v
        .items
        .iter()
        .filter(|i| i.stored.starts_with(b"k8s:enc:kms:v2:"))
    {
        let matched = resource_for_key(item.etcd_key.as_bytes(), DEFAULT_PREFIX)
            .unwrap()
            .providers(&config);
        let d = transform_from_storage(
            &matched.providers,
            &item.stored,
            item.etcd_key.as_bytes(),
            &rotated,
            &plugin,
        )
        .unwrap();
        assert!(d.read.is_stale(), "{}", item.etcd_key);
        // Unknown write state: readable, not judged stale by key_id, and flagged.
        let j = judge(&matched.providers, &item.stored, &NoKms).unwrap();
        assert!(
            !j.is_stale() && j.kms_write_state_unknown,
            "{}",
            item.etcd_key
        );
    }
}

#[test]
fn values_moved_to_another_key_fail_for_aeads_only() {
    let v = load_vectors();
    let plugin = TestPlugin {
        provider: v.provider_name.clone(),
        kek: v.kek.clone(),
    };
    let state: BTreeMap<String, String> = [(v.provider_name.clone(), v.key_id.clone())].into();
    let config = EncryptionConfiguration::parse(&read_vector_file(CONFIGS[0])).unwrap();
    let secrets = config.providers_for(&storage_encryption::GroupResource::new("", "secrets"));
    for item in v.items.iter().filter(|i| i.resource == "secrets") {
        let other_key = b"/registry/secrets/elsewhere/moved";
        let result =
            transform_from_storage(&secrets.providers, &item.stored, other_key, &state, &plugin);
        let kind = storage_encryption::classify_value(&item.stored)
            .provider_kind()
            .unwrap();
        match kind {
            ProviderKind::AesGcm | ProviderKind::KmsV2 => {
                assert!(
                    matches!(result, Err(ReadFailure::AllFailed { .. })),
                    "{}: {result:?}",
                    item.etcd_key
                )
            }
            _ => assert_eq!(
                result.unwrap().plaintext.expose(),
                item.plaintext.as_slice(),
                "{}",
                item.etcd_key
            ),
        }
    }
}
