//! Every value of `testdata/vectors/apiserver-written.json` (written by kube-apiserver's
//! own code), one test per vector: classification, key → resource, decryption to the exact
//! plaintext, the ok/stale judgment of kube-apiserver's read path with both configurations,
//! and (where they apply) key_id staleness and moving the value to another etcd key.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Item, TestPlugin, Vectors, load_vectors, read_vector_file};
use storage_encryption::{
    Classification, DEFAULT_PREFIX, EncryptedDekSourceType, EncryptionConfiguration, NoKms,
    PlaintextKind, ProviderKind, ReadFailure, judge, resource_for_key, transform_from_storage,
};

const CONFIGS: [&str; 2] = [
    "config-secrets-all-providers.yaml",
    "config-wildcard-events-exempt.yaml",
];

/// One `#[test]` per vector, named after it, so a failure names the vector;
/// `VECTOR_KEYS` lists them for [`a_test_exists_for_every_vector_and_no_other`].
macro_rules! vector_tests {
    ($($test:ident => $key:literal,)+) => {
        const VECTOR_KEYS: &[&str] = &[$($key),+];
        $(
            #[test]
            fn $test() {
                check_vector($key);
            }
        )+
    };
}

vector_tests! {
    crd_widgets => "/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.stable.example.com",
    configmap_config_0 => "/registry/configmaps/vectors/config-0",
    configmap_config_1 => "/registry/configmaps/vectors/config-1",
    event_web_0 => "/registry/events/vectors/web-0.17a0000000000000",
    secret_aescbc_0 => "/registry/secrets/enc-aescbc/secret-0",
    secret_aescbc_1 => "/registry/secrets/enc-aescbc/secret-1",
    secret_aesgcm_0 => "/registry/secrets/enc-aesgcm/secret-0",
    secret_aesgcm_1 => "/registry/secrets/enc-aesgcm/secret-1",
    secret_identity_0 => "/registry/secrets/enc-identity/secret-0",
    secret_identity_1 => "/registry/secrets/enc-identity/secret-1",
    secret_kms_0 => "/registry/secrets/enc-kms/secret-0",
    secret_kms_1 => "/registry/secrets/enc-kms/secret-1",
    secret_secretbox_0 => "/registry/secrets/enc-secretbox/secret-0",
    secret_secretbox_1 => "/registry/secrets/enc-secretbox/secret-1",
    secret_vectors_0 => "/registry/secrets/vectors/secret-0",
    service_svc_0 => "/registry/services/specs/vectors/svc-0",
    widget_0 => "/registry/stable.example.com/widgets/vectors/widget-0",
    widget_1 => "/registry/stable.example.com/widgets/vectors/widget-1",
}

#[test]
fn a_test_exists_for_every_vector_and_no_other() {
    let v = load_vectors();
    let in_file: BTreeSet<&str> = v.items.iter().map(|i| i.etcd_key.as_str()).collect();
    let generated: BTreeSet<&str> = VECTOR_KEYS.iter().copied().collect();
    assert_eq!(
        generated.len(),
        VECTOR_KEYS.len(),
        "a vector is listed twice"
    );
    assert_eq!(
        in_file.len(),
        v.items.len(),
        "a vector key appears twice in the file"
    );
    assert_eq!(
        generated, in_file,
        "vector_tests! must list exactly the file's vectors"
    );
}

#[test]
fn vectors_file_has_the_documented_items() {
    let v = load_vectors();
    assert_eq!(v.items.len(), 18, "README says 18 values");
}

#[test]
fn vectors_cover_every_provider() {
    let v = load_vectors();
    let seen: BTreeSet<ProviderKind> = v
        .items
        .iter()
        .map(|i| {
            storage_encryption::classify_value(&i.stored)
                .provider_kind()
                .unwrap()
        })
        .collect();
    for kind in [
        ProviderKind::KmsV2,
        ProviderKind::AesCbc,
        ProviderKind::AesGcm,
        ProviderKind::Secretbox,
        ProviderKind::Identity,
    ] {
        assert!(seen.contains(&kind), "no vector of {kind}: {seen:?}");
    }
}

/// Every check that applies to the vector stored under `key`.
fn check_vector(key: &str) {
    let v = load_vectors();
    let item = v
        .items
        .iter()
        .find(|i| i.etcd_key == key)
        .unwrap_or_else(|| panic!("{key}: not in apiserver-written.json"));
    assert_eq!(item.read_with.len(), 2, "{key}: one verdict per config");
    classifies_as_its_prefix_says(&v, item);
    maps_to_the_apiservers_resource(item);
    reads_and_judges_like_kube_apiserver(&v, item);
    if item.stored.starts_with(b"k8s:enc:kms:v2:") {
        goes_stale_when_the_key_id_changes(&v, item);
    }
    if item.resource == "secrets" {
        moved_to_another_key_fails_for_aeads_only(&v, item);
    }
}

fn plugin(v: &Vectors) -> TestPlugin {
    TestPlugin {
        provider: v.provider_name.clone(),
        kek: v.kek.clone(),
    }
}

fn classifies_as_its_prefix_says(v: &Vectors, item: &Item) {
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
}

fn maps_to_the_apiservers_resource(item: &Item) {
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

fn reads_and_judges_like_kube_apiserver(v: &Vectors, item: &Item) {
    let plugin = plugin(v);
    let state: BTreeMap<String, String> = [(v.provider_name.clone(), v.key_id.clone())].into();
    for name in CONFIGS {
        let config = EncryptionConfiguration::parse(&read_vector_file(name)).unwrap();
        let (_, ok, stale, error) = item
            .read_with
            .iter()
            .find(|(c, ..)| c == name)
            .unwrap_or_else(|| panic!("{}: no verdict for {name}", item.etcd_key));
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
    }
}

fn goes_stale_when_the_key_id_changes(v: &Vectors, item: &Item) {
    let plugin = plugin(v);
    let rotated: BTreeMap<String, String> =
        [(v.provider_name.clone(), "test-plugin-rotated".to_string())].into();
    let config = EncryptionConfiguration::parse(&read_vector_file(CONFIGS[1])).unwrap();
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

fn moved_to_another_key_fails_for_aeads_only(v: &Vectors, item: &Item) {
    let plugin = plugin(v);
    let state: BTreeMap<String, String> = [(v.provider_name.clone(), v.key_id.clone())].into();
    let config = EncryptionConfiguration::parse(&read_vector_file(CONFIGS[0])).unwrap();
    let secrets = config.providers_for(&storage_encryption::GroupResource::new("", "secrets"));
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
