//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz). They live in the
//! library so that `tests/fuzz_smoke.rs` runs the same code on stable over the
//! vector corpus and random bytes. They `assert!` invariants on purpose: a panic
//! is how a fuzzer reports a finding. Not for any other use.

use crate::{Classification, EncryptionConfiguration, classify_value as classify};

/// Classifies arbitrary bytes and checks the result is coherent.
pub fn classify_value(data: &[u8]) {
    let class = classify(data);
    assert_eq!(
        class.is_encrypted(),
        data.starts_with(crate::format::prefix::ENCRYPTED)
    );
    if let Classification::KmsV2 { header, .. } = &class {
        assert!(!header.key_id.is_empty() && header.encrypted_dek_source_len > 0);
    }
    // Judging against providers of every type must not panic either.
    let providers = fixed_providers();
    let refs: Vec<&crate::ProviderConfig> = providers.iter().collect();
    let _ = crate::judge(&refs, data, &crate::NoKms);
    let _ = crate::resource_for_key(data, crate::DEFAULT_PREFIX);
}

/// Parses arbitrary bytes as a configuration; whatever parses must render and
/// parse back to the same model.
pub fn parse_config(data: &[u8]) {
    if let Ok(config) = EncryptionConfiguration::parse_bytes(data) {
        let rendered = config
            .render()
            .unwrap_or_else(|e| panic!("valid config does not render: {e}"));
        let back = EncryptionConfiguration::parse(&rendered)
            .unwrap_or_else(|e| panic!("rendered config does not parse: {e}"));
        assert_eq!(back, config);
    }
}

fn fixed_providers() -> Vec<crate::ProviderConfig> {
    use crate::{Key, KeysConfig, KmsApiVersion, KmsConfig, ProviderConfig, SecretBytes};
    let keys = |len| KeysConfig {
        keys: vec![Key {
            name: "k".into(),
            secret: SecretBytes::new(vec![7; len]),
        }],
    };
    let kms = |api_version| {
        ProviderConfig::Kms(KmsConfig {
            api_version,
            name: "p".into(),
            endpoint: "unix:///s".into(),
            timeout: None,
            cache_size: None,
        })
    };
    vec![
        kms(KmsApiVersion::V2),
        kms(KmsApiVersion::V1),
        ProviderConfig::AesCbc(keys(16)),
        ProviderConfig::AesGcm(keys(32)),
        ProviderConfig::Secretbox(keys(32)),
        ProviderConfig::Identity,
    ]
}
