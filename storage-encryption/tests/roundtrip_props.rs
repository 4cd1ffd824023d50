//! Encode → decode round trips of every provider through the public reading and
//! writing model, and the staleness rules on values our own encoders wrote.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use storage_encryption::format::{aescbc, aesgcm, kmsv1, kmsv2, secretbox};
use storage_encryption::{
    Classification, EncryptedDekSourceType, Key, KeysConfig, KmsApiVersion, KmsConfig,
    KmsV2WriteKey, NoKms, ProviderConfig, ProviderKind, ReadFailure, SecretBytes, Seed,
    StaleReason, classify_value, judge, transform_from_storage, transform_to_storage,
};

const KEK: [u8; 32] = [0x42; 32];

fn plugin() -> common::TestPlugin {
    common::TestPlugin {
        provider: "p".into(),
        kek: KEK.to_vec(),
    }
}

fn write_keys(seed: Seed, key_id: &str) -> BTreeMap<String, KmsV2WriteKey> {
    let encrypted = plugin().encrypt_seed(&seed, key_id);
    let annotations = [("kek.test-plugin.example.com".to_string(), b"x".to_vec())].into();
    [(
        "p".to_string(),
        KmsV2WriteKey {
            seed,
            encrypted_dek_source: encrypted,
            key_id: key_id.into(),
            annotations,
        },
    )]
    .into()
}

fn keyed(kind: ProviderKind, names_and_keys: &[(&str, Vec<u8>)]) -> ProviderConfig {
    let keys = KeysConfig {
        keys: names_and_keys
            .iter()
            .map(|(n, k)| Key {
                name: (*n).into(),
                secret: SecretBytes::new(k.clone()),
            })
            .collect(),
    };
    match kind {
        ProviderKind::AesCbc => ProviderConfig::AesCbc(keys),
        ProviderKind::AesGcm => ProviderConfig::AesGcm(keys),
        _ => ProviderConfig::Secretbox(keys),
    }
}

fn kms_v2(name: &str) -> ProviderConfig {
    ProviderConfig::Kms(KmsConfig {
        api_version: KmsApiVersion::V2,
        name: name.into(),
        endpoint: "unix:///s".into(),
        timeout: None,
        cache_size: None,
    })
}

fn arb_key_len(kind: ProviderKind) -> BoxedStrategy<usize> {
    if kind == ProviderKind::Secretbox {
        Just(32).boxed()
    } else {
        prop::sample::select(vec![16, 24, 32]).boxed()
    }
}

fn arb_keyed() -> impl Strategy<Value = (ProviderKind, Vec<u8>)> {
    prop::sample::select(vec![
        ProviderKind::AesCbc,
        ProviderKind::AesGcm,
        ProviderKind::Secretbox,
    ])
    .prop_flat_map(|kind| {
        (
            Just(kind),
            arb_key_len(kind).prop_flat_map(|n| prop::collection::vec(any::<u8>(), n)),
        )
    })
}

proptest! {
    #[test]
    fn local_providers_round_trip(
        (kind, key) in arb_keyed(),
        plaintext in prop::collection::vec(any::<u8>(), 0..600),
        name in "[a-z0-9]{1,12}",
        etcd_key in "/registry/secrets/[a-z]{1,8}/[a-z]{1,8}",
    ) {
        let provider = keyed(kind, &[(name.as_str(), key)]);
        let providers = [&provider];
        let stored = transform_to_storage(&providers, &plaintext, etcd_key.as_bytes(), &NoKms).unwrap();
        let class = classify_value(&stored);
        prop_assert_eq!(class.provider_kind(), Some(kind));
        prop_assert_eq!(class.name(), Some(name.as_str()));
        let read = transform_from_storage(&providers, &stored, etcd_key.as_bytes(), &NoKms, &NoKms).unwrap();
        prop_assert_eq!(read.plaintext.expose(), plaintext.as_slice());
        prop_assert!(!read.read.is_stale());
        prop_assert_eq!(judge(&providers, &stored, &NoKms).unwrap(), read.read);
    }

    #[test]
    fn kms_v2_round_trips_and_stales_on_key_id(
        seed in any::<[u8; 32]>(),
        plaintext in prop::collection::vec(any::<u8>(), 0..600),
        etcd_key in "/registry/[a-z.]{1,12}/[a-z]{1,8}",
    ) {
        let keys = write_keys(Seed::new(seed), "kid-1");
        let provider = kms_v2("p");
        let providers = [&provider];
        let stored = transform_to_storage(&providers, &plaintext, etcd_key.as_bytes(), &keys).unwrap();
        match classify_value(&stored) {
            Classification::KmsV2 { provider, header } => {
                prop_assert_eq!(provider, "p");
                prop_assert_eq!(header.key_id, "kid-1");
                prop_assert_eq!(header.dek_source_type, EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed);
            }
            other => prop_assert!(false, "{:?}", other),
        }
        let read = transform_from_storage(&providers, &stored, etcd_key.as_bytes(), &keys, &plugin()).unwrap();
        prop_assert_eq!(read.plaintext.expose(), plaintext.as_slice());
        prop_assert!(!read.read.is_stale());
        let rotated: BTreeMap<String, String> = [("p".to_string(), "kid-2".to_string())].into();
        let read = transform_from_storage(&providers, &stored, etcd_key.as_bytes(), &rotated, &plugin()).unwrap();
        prop_assert_eq!(read.read.stale_reasons, vec![StaleReason::KmsV2KeyId { stored: "kid-1".into(), current: "kid-2".into() }]);
    }

    #[test]
    fn format_level_round_trips(
        key in any::<[u8; 32]>(),
        plaintext in prop::collection::vec(any::<u8>(), 0..300),
        aad in prop::collection::vec(any::<u8>(), 0..64),
        enc_dek in prop::collection::vec(any::<u8>(), 1..300),
    ) {
        let cbc = aescbc::decrypt(&key, &aescbc::encrypt(&key, &plaintext).unwrap()).unwrap();
        prop_assert_eq!(cbc.expose(), plaintext.as_slice());
        let gcm = aesgcm::open(&key, &aesgcm::seal(&key, &plaintext, &aad).unwrap(), &aad).unwrap();
        prop_assert_eq!(gcm.expose(), plaintext.as_slice());
        let sb = secretbox::open(&key, &secretbox::seal(&key, &plaintext).unwrap()).unwrap();
        prop_assert_eq!(sb.expose(), plaintext.as_slice());
        let seed = Seed::new(key);
        let data = kmsv2::seal_data(&seed, &plaintext, &aad).unwrap();
        let v2 = kmsv2::open_data(&seed, EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed, &data, &aad).unwrap();
        prop_assert_eq!(v2.expose(), plaintext.as_slice());
        let v1 = kmsv1::seal(&seed, &enc_dek, &plaintext, &aad).unwrap();
        let parts = kmsv1::split(&v1).unwrap();
        prop_assert_eq!(parts.encrypted_dek, enc_dek.as_slice());
        let (plain, cbc) = kmsv1::open(&seed, parts.data, &aad).unwrap();
        prop_assert_eq!((plain.expose(), cbc), (plaintext.as_slice(), false));
    }
}

#[test]
fn staleness_follows_provider_and_key_order() {
    let etcd_key = b"/registry/secrets/ns/s";
    let (k1, k2) = (vec![1u8; 32], vec![2u8; 32]);
    let old = keyed(ProviderKind::AesGcm, &[("old", k1.clone())]);
    let both = keyed(
        ProviderKind::AesGcm,
        &[("new", k2.clone()), ("old", k1.clone())],
    );
    let stored = transform_to_storage(&[&old], b"data", etcd_key, &NoKms).unwrap();

    // Rotation step 1: the new key second; reads with the first key are not stale.
    let step1 = keyed(
        ProviderKind::AesGcm,
        &[("old", k1.clone()), ("new", k2.clone())],
    );
    let read = transform_from_storage(&[&step1], &stored, etcd_key, &NoKms, &NoKms).unwrap();
    assert!(!read.read.is_stale());
    // Step 3: the new key first; the old value is stale (read by key #2).
    let read = transform_from_storage(&[&both], &stored, etcd_key, &NoKms, &NoKms).unwrap();
    assert_eq!(
        read.read.stale_reasons,
        vec![StaleReason::NotFirstKey { key_index: 1 }]
    );
    assert_eq!(read.read.reader.name.as_deref(), Some("old"));
    // A rewrite uses the first key and is no longer stale.
    let rewritten =
        transform_to_storage(&[&both], read.plaintext.expose(), etcd_key, &NoKms).unwrap();
    assert_eq!(classify_value(&rewritten).name(), Some("new"));
    assert!(
        !transform_from_storage(&[&both], &rewritten, etcd_key, &NoKms, &NoKms)
            .unwrap()
            .read
            .is_stale()
    );

    // Switch local → KMS: kms first, old provider second.
    let kms = kms_v2("p");
    let keys = write_keys(Seed::new([3; 32]), "kid");
    let read = transform_from_storage(&[&kms, &old], &stored, etcd_key, &keys, &plugin()).unwrap();
    assert_eq!(
        read.read.stale_reasons,
        vec![StaleReason::NotFirstProvider { provider_index: 1 }]
    );

    // Identity in first position reads plaintext without staleness; after a provider it is stale.
    let id = ProviderConfig::Identity;
    assert!(!judge(&[&id, &old], b"plain", &NoKms).unwrap().is_stale());
    assert_eq!(
        judge(&[&old, &id], b"plain", &NoKms).unwrap().stale_reasons,
        vec![StaleReason::NotFirstProvider { provider_index: 1 }]
    );
    // Key removed from the config: unreadable, data at risk.
    let only_new = keyed(ProviderKind::AesGcm, &[("new", k2)]);
    assert_eq!(
        judge(&[&only_new, &id], &stored, &NoKms),
        Err(ReadFailure::NoMatchingPrefix)
    );
}

#[test]
fn a_failing_matching_provider_does_not_end_the_search() {
    let etcd_key = b"/registry/secrets/ns/s";
    // Two providers with a key of the same name but different bytes: the first fails to
    // authenticate, the second reads it (stale because it is not the first).
    let wrong = keyed(ProviderKind::AesGcm, &[("k", vec![1; 32])]);
    let right = keyed(ProviderKind::AesGcm, &[("k", vec![2; 32])]);
    let stored = transform_to_storage(&[&right], b"data", etcd_key, &NoKms).unwrap();
    let read =
        transform_from_storage(&[&wrong, &right], &stored, etcd_key, &NoKms, &NoKms).unwrap();
    assert_eq!(read.plaintext.expose(), b"data");
    assert_eq!(read.read.reader.provider_index, Some(1));
    match transform_from_storage(&[&wrong], &stored, etcd_key, &NoKms, &NoKms) {
        Err(ReadFailure::AllFailed { attempts }) => {
            assert_eq!(attempts.len(), 1);
            assert!(
                attempts[0]
                    .error
                    .to_string()
                    .contains("authentication failed")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn legacy_kms_v2_type_0_is_stale_even_under_the_current_key_id() {
    let dek = Seed::new([5; 32]);
    let etcd_key = b"/registry/secrets/ns/s";
    let object = kmsv2::EncryptedObject {
        encrypted_data: aesgcm::seal(dek.expose(), b"old", etcd_key).unwrap(),
        key_id: "kid".into(),
        encrypted_dek_source: plugin().encrypt_seed(&dek, "kid"),
        annotations: Default::default(),
        encrypted_dek_source_type: 0,
    };
    let mut stored = b"k8s:enc:kms:v2:p:".to_vec();
    stored.extend_from_slice(&kmsv2::encode(&object).unwrap());
    let state: BTreeMap<String, String> = [("p".to_string(), "kid".to_string())].into();
    let kms = kms_v2("p");
    let read = transform_from_storage(&[&kms], &stored, etcd_key, &state, &plugin()).unwrap();
    assert_eq!(read.plaintext.expose(), b"old");
    assert_eq!(
        read.read.stale_reasons,
        vec![StaleReason::KmsV2LegacyDekSource]
    );
}

#[test]
fn writes_need_a_kms_write_key_and_refuse_kms_v1() {
    let kms = kms_v2("p");
    let err = transform_to_storage(&[&kms], b"x", b"/k", &NoKms).unwrap_err();
    assert!(
        err.to_string()
            .contains("no KMS v2 write key for provider \"p\""),
        "{err}"
    );
    let v1 = ProviderConfig::Kms(KmsConfig {
        api_version: KmsApiVersion::V1,
        name: "p".into(),
        endpoint: "unix:///s".into(),
        timeout: None,
        cache_size: None,
    });
    assert!(transform_to_storage(&[&v1], b"x", b"/k", &NoKms).is_err());
    // No providers (unmatched resource) and identity write plaintext as is.
    assert_eq!(
        transform_to_storage(&[], b"x", b"/k", &NoKms).unwrap(),
        b"x"
    );
    assert_eq!(
        transform_to_storage(&[&ProviderConfig::Identity], b"x", b"/k", &NoKms).unwrap(),
        b"x"
    );
}
