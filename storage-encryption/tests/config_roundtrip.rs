//! Render → parse round trips, programmatic edits, and no key material in `Debug`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use storage_encryption::{
    ConfigApiVersion, EncryptionConfiguration, Key, KeysConfig, KmsApiVersion, KmsConfig,
    ProviderConfig, ResourceConfig, SecretBytes,
};

#[test]
fn vector_configs_render_and_parse_back_identically() {
    for name in [
        "config-secrets-all-providers.yaml",
        "config-wildcard-events-exempt.yaml",
    ] {
        let original = EncryptionConfiguration::parse(&common::read_vector_file(name)).unwrap();
        let rendered = original.render().unwrap();
        assert_eq!(
            EncryptionConfiguration::parse(&rendered).unwrap(),
            original,
            "{name}\n{}",
            &*rendered
        );
    }
}

#[test]
fn rendering_keeps_order_and_reads_like_the_docs() {
    let config = EncryptionConfiguration {
        api_version: ConfigApiVersion::LegacyV1,
        resources: vec![ResourceConfig {
            resources: vec!["secrets".into(), "*.apps".into()],
            providers: vec![
                ProviderConfig::Kms(KmsConfig {
                    api_version: KmsApiVersion::V1,
                    name: "old:plugin".into(),
                    endpoint: "unix:///run/k.sock".into(),
                    timeout: Some(Duration::from_millis(1500)),
                    cache_size: Some(-1),
                }),
                ProviderConfig::Secretbox(KeysConfig {
                    keys: vec![
                        Key {
                            name: "b".into(),
                            secret: SecretBytes::new(vec![2; 32]),
                        },
                        Key {
                            name: "a".into(),
                            secret: SecretBytes::new(vec![1; 32]),
                        },
                    ],
                }),
                ProviderConfig::Identity,
            ],
        }],
    };
    config.validate().unwrap();
    let text = config.render().unwrap();
    let expected = format!(
        "apiVersion: v1\nkind: EncryptionConfig\nresources:\n- resources:\n  - secrets\n  - \"*.apps\"\n  providers:\n  - kms:\n      apiVersion: v1\n      name: old:plugin\n      endpoint: unix:///run/k.sock\n      timeout: 1.5s\n      cachesize: -1\n  - secretbox:\n      keys:\n      - name: b\n        secret: {}\n      - name: a\n        secret: {}\n  - identity: {{}}\n",
        STANDARD.encode([2u8; 32]),
        STANDARD.encode([1u8; 32])
    );
    assert_eq!(&*text, &expected);
    assert_eq!(EncryptionConfiguration::parse(&text).unwrap(), config);
}

#[test]
fn rotation_edits_validate_and_render() {
    let mut config = EncryptionConfiguration::parse(&common::read_vector_file(
        "config-secrets-all-providers.yaml",
    ))
    .unwrap();
    // Add a second aescbc key, then promote it: the documented local key rotation.
    let keys = config.resources[0].providers[1].keys_mut().unwrap();
    keys.push(Key {
        name: "key2".into(),
        secret: SecretBytes::new(vec![9; 32]),
    });
    keys.swap(0, 1);
    // Move aescbc first, drop identity.
    let aescbc = config.resources[0].providers.remove(1);
    config.resources[0].providers.insert(0, aescbc);
    config.resources[0]
        .providers
        .retain(|p| !matches!(p, ProviderConfig::Identity));
    config.validate().unwrap();
    let back = EncryptionConfiguration::parse(&config.render().unwrap()).unwrap();
    assert_eq!(back, config);
    assert_eq!(
        back.resources[0].providers[0].describe(),
        "aescbc key2,key1"
    );

    // An edit that breaks a rule is caught by validate().
    config.resources.push(ResourceConfig {
        resources: vec!["*.*".into()],
        providers: vec![ProviderConfig::Identity],
    });
    config.resources.push(ResourceConfig {
        resources: vec!["configmaps".into()],
        providers: vec![ProviderConfig::Identity],
    });
    let err = config.validate().unwrap_err();
    assert_eq!(
        err.field_errors()[0].field,
        "resources[2].resources[0]",
        "{err}"
    );
}

#[test]
fn debug_output_never_shows_key_material() {
    let text = common::read_vector_file("config-secrets-all-providers.yaml");
    let config = EncryptionConfiguration::parse(&text).unwrap();
    let key = common::load_vectors().local_key;
    let b64 = STANDARD.encode(&key);
    assert!(text.contains(&b64), "the fixture holds the key");
    for shown in [format!("{config:?}"), format!("{config:#?}")] {
        assert!(!shown.contains(&b64), "{shown}");
        assert!(!shown.contains(&hex::encode(&key)), "{shown}");
        assert!(
            !shown.contains(&format!("{:?}", &key[..4]).trim_end_matches(']').to_string()),
            "{shown}"
        );
        assert!(!shown.contains("0, 17, 34, 51"), "{shown}");
        assert!(shown.contains("redacted 32 bytes"), "{shown}");
    }
    let seed = storage_encryption::Seed::new([0xab; 32]);
    assert_eq!(format!("{seed:?}"), "Seed(<redacted>)");
    let plain = storage_encryption::Plaintext::new(b"CANARY".to_vec());
    assert!(!format!("{plain:?}").contains("CANARY"));
}

fn arb_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,10}"
}

fn arb_keys(sizes: &'static [usize]) -> impl Strategy<Value = KeysConfig> {
    prop::collection::vec((arb_name(), prop::sample::select(sizes), any::<u8>()), 1..4).prop_map(
        |keys| KeysConfig {
            keys: keys
                .into_iter()
                .map(|(name, len, fill)| Key {
                    name,
                    secret: SecretBytes::new(vec![fill; len]),
                })
                .collect(),
        },
    )
}

fn arb_provider() -> impl Strategy<Value = ProviderConfig> {
    prop_oneof![
        Just(ProviderConfig::Identity),
        arb_keys(&[16, 24, 32]).prop_map(ProviderConfig::AesGcm),
        arb_keys(&[16, 24, 32]).prop_map(ProviderConfig::AesCbc),
        arb_keys(&[32]).prop_map(ProviderConfig::Secretbox),
        (
            arb_name(),
            proptest::option::of(1u64..100_000),
            any::<bool>()
        )
            .prop_map(|(name, ms, v2)| {
                ProviderConfig::Kms(KmsConfig {
                    api_version: if v2 {
                        KmsApiVersion::V2
                    } else {
                        KmsApiVersion::V1
                    },
                    name,
                    endpoint: "unix:///var/run/kms.sock".into(),
                    timeout: ms.map(Duration::from_millis),
                    cache_size: if v2 { None } else { Some(100) },
                })
            }),
    ]
}

proptest! {
    #[test]
    fn any_config_renders_and_parses_back(
        legacy in any::<bool>(),
        entries in prop::collection::vec((arb_name(), prop::collection::vec(arb_provider(), 1..5)), 1..4),
    ) {
        let config = EncryptionConfiguration {
            api_version: if legacy { ConfigApiVersion::LegacyV1 } else { ConfigApiVersion::V1 },
            resources: entries
                .into_iter()
                .enumerate()
                .map(|(i, (name, providers))| ResourceConfig { resources: vec![format!("{name}{i}.example.com")], providers })
                .collect(),
        };
        let text = config.render().unwrap();
        // Rendering never changes what parse sees (validation may still refuse
        // duplicate KMS v2 names; compare the unvalidated model).
        match EncryptionConfiguration::parse(&text) {
            Ok(back) => prop_assert_eq!(back, config),
            Err(e) => {
                prop_assert!(config.validate().is_err(), "parse failed but model validates: {}", e);
                prop_assert_eq!(config.validate().unwrap_err(), e);
            }
        }
    }
}
