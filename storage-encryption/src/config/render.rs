//! Model → YAML, in the layout the Kubernetes docs use.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use zeroize::Zeroizing;

use super::duration::format_go_duration;
use super::{ConfigError, EncryptionConfiguration, KeysConfig, ProviderConfig};
use crate::secret::SecretBytes;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutConfig<'a> {
    api_version: &'static str,
    kind: &'static str,
    resources: Vec<OutResource<'a>>,
}

#[derive(Serialize)]
struct OutResource<'a> {
    resources: &'a [String],
    providers: Vec<OutProvider<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum OutProvider<'a> {
    Kms(OutKms<'a>),
    Aesgcm(OutKeys<'a>),
    Aescbc(OutKeys<'a>),
    Secretbox(OutKeys<'a>),
    Identity(OutIdentity),
}

#[derive(Serialize)]
struct OutIdentity {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutKms<'a> {
    api_version: &'static str,
    name: &'a str,
    endpoint: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cachesize: Option<i32>,
}

#[derive(Serialize)]
struct OutKeys<'a> {
    keys: Vec<OutKey<'a>>,
}

#[derive(Serialize)]
struct OutKey<'a> {
    name: &'a str,
    secret: OutSecret<'a>,
}

/// Encodes to base64 only while serializing, into a buffer that is wiped.
struct OutSecret<'a>(&'a SecretBytes);

impl Serialize for OutSecret<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(STANDARD.encode(self.0.expose()));
        s.serialize_str(&text)
    }
}

fn keys(k: &KeysConfig) -> OutKeys<'_> {
    OutKeys {
        keys: k
            .keys
            .iter()
            .map(|key| OutKey {
                name: &key.name,
                secret: OutSecret(&key.secret),
            })
            .collect(),
    }
}

pub(super) fn render(config: &EncryptionConfiguration) -> Result<Zeroizing<String>, ConfigError> {
    let out = OutConfig {
        api_version: config.api_version.api_version(),
        kind: config.api_version.kind(),
        resources: config
            .resources
            .iter()
            .map(|entry| OutResource {
                resources: &entry.resources,
                providers: entry
                    .providers
                    .iter()
                    .map(|p| match p {
                        ProviderConfig::Kms(k) => OutProvider::Kms(OutKms {
                            api_version: k.api_version.as_str(),
                            name: &k.name,
                            endpoint: &k.endpoint,
                            timeout: k.timeout.map(format_go_duration),
                            cachesize: k.cache_size,
                        }),
                        ProviderConfig::AesGcm(k) => OutProvider::Aesgcm(keys(k)),
                        ProviderConfig::AesCbc(k) => OutProvider::Aescbc(keys(k)),
                        ProviderConfig::Secretbox(k) => OutProvider::Secretbox(keys(k)),
                        ProviderConfig::Identity => OutProvider::Identity(OutIdentity {}),
                    })
                    .collect(),
            })
            .collect(),
    };
    let mut text = Zeroizing::new(String::new());
    serde_saphyr::to_fmt_writer(&mut *text, &out)
        .map_err(|e| ConfigError::Render(super::parse::redact_parser_message(&e.to_string())))?;
    Ok(text)
}
