//! Strict YAML → model. Shape errors (unknown fields, wrong types) come from
//! serde with `deny_unknown_fields`; conversion errors (missing fields, bad
//! base64, not exactly one provider type) are collected with their field path.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::duration::parse_go_duration;
use super::{
    ConfigApiVersion, ConfigError, EncryptionConfiguration, FieldError, Key, KeysConfig,
    KmsApiVersion, KmsConfig, ProviderConfig, ResourceConfig,
};
use crate::secret::SecretBytes;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    resources: Option<Vec<RawResource>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    resources: Option<Vec<String>>,
    providers: Option<Vec<RawProvider>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kms: Option<RawKms>,
    aesgcm: Option<RawKeys>,
    aescbc: Option<RawKeys>,
    secretbox: Option<RawKeys>,
    identity: Option<RawIdentity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    keys: Option<Vec<RawKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Option<String>,
    secret: Option<RawSecret>,
}

/// The base64 text of a key; wiped when dropped.
struct RawSecret(Zeroizing<String>);

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self(Zeroizing::new(s)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawKms {
    api_version: Option<String>,
    name: Option<String>,
    endpoint: Option<String>,
    timeout: Option<String>,
    cachesize: Option<i32>,
}

pub(super) fn parse(text: &str) -> Result<EncryptionConfiguration, ConfigError> {
    let options = serde_saphyr::options! { with_snippet: false };
    let raw: RawConfig =
        serde_saphyr::from_str_with_options(text, options).map_err(|e| ConfigError::Yaml {
            message: redact_parser_message(&e.without_snippet().to_string()),
        })?;
    let mut errors = Vec::new();

    let api_version = match (raw.api_version.as_deref(), raw.kind.as_deref()) {
        (Some("apiserver.config.k8s.io/v1"), Some("EncryptionConfiguration")) => {
            ConfigApiVersion::V1
        }
        (Some("v1"), Some("EncryptionConfig")) => ConfigApiVersion::LegacyV1,
        (None, _) => {
            errors.push(err("apiVersion", "required: apiserver.config.k8s.io/v1"));
            ConfigApiVersion::V1
        }
        (_, None) => {
            errors.push(err("kind", "required: EncryptionConfiguration"));
            ConfigApiVersion::V1
        }
        (Some(v), Some(_)) => {
            let (field, msg) = match v {
                "apiserver.config.k8s.io/v1" => ("kind", "must be EncryptionConfiguration"),
                "v1" => (
                    "kind",
                    "must be EncryptionConfig (with the legacy apiVersion v1)",
                ),
                _ => (
                    "apiVersion",
                    "not supported: use apiserver.config.k8s.io/v1",
                ),
            };
            errors.push(err(field, msg));
            ConfigApiVersion::V1
        }
    };

    let mut resources = Vec::new();
    for (i, entry) in raw.resources.unwrap_or_default().into_iter().enumerate() {
        let path = format!("resources[{i}]");
        let mut providers = Vec::new();
        for (j, p) in entry.providers.unwrap_or_default().into_iter().enumerate() {
            if let Some(p) = convert_provider(p, &format!("{path}.providers[{j}]"), &mut errors) {
                providers.push(p);
            }
        }
        resources.push(ResourceConfig {
            resources: entry.resources.unwrap_or_default(),
            providers,
        });
    }

    if errors.is_empty() {
        Ok(EncryptionConfiguration {
            api_version,
            resources,
        })
    } else {
        Err(ConfigError::Invalid { errors })
    }
}

fn convert_provider(
    p: RawProvider,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<ProviderConfig> {
    let present: Vec<&str> = [
        ("kms", p.kms.is_some()),
        ("aesgcm", p.aesgcm.is_some()),
        ("aescbc", p.aescbc.is_some()),
        ("secretbox", p.secretbox.is_some()),
        ("identity", p.identity.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    match present.len() {
        0 => {
            errors.push(err(
                path,
                "no provider given: expected one of kms, aesgcm, aescbc, secretbox, identity \
                 (write `identity: {}`, not `identity:`)",
            ));
            return None;
        }
        1 => {}
        _ => {
            errors.push(err(
                path,
                &format!(
                    "more than one provider type ({}) in one item: put each provider in its own list item",
                    present.join(", ")
                ),
            ));
            return None;
        }
    }
    if let Some(kms) = p.kms {
        return convert_kms(kms, &format!("{path}.kms"), errors).map(ProviderConfig::Kms);
    }
    if let Some(keys) = p.aesgcm {
        return Some(ProviderConfig::AesGcm(convert_keys(
            keys,
            &format!("{path}.aesgcm"),
            errors,
        )));
    }
    if let Some(keys) = p.aescbc {
        return Some(ProviderConfig::AesCbc(convert_keys(
            keys,
            &format!("{path}.aescbc"),
            errors,
        )));
    }
    if let Some(keys) = p.secretbox {
        return Some(ProviderConfig::Secretbox(convert_keys(
            keys,
            &format!("{path}.secretbox"),
            errors,
        )));
    }
    Some(ProviderConfig::Identity)
}

fn convert_keys(raw: RawKeys, path: &str, errors: &mut Vec<FieldError>) -> KeysConfig {
    let mut keys = Vec::new();
    for (k, key) in raw.keys.unwrap_or_default().into_iter().enumerate() {
        let kpath = format!("{path}.keys[{k}]");
        let name = key.name.unwrap_or_default();
        // Missing name/secret are reported by validation on the model; a missing or
        // undecodable secret becomes an empty key so that check names it once.
        let secret = match key.secret {
            None => SecretBytes::new(Vec::new()),
            Some(text) => match STANDARD.decode(text.0.trim().as_bytes()) {
                Ok(bytes) => SecretBytes::new(bytes),
                Err(_) => {
                    errors.push(err(
                        &format!("{kpath}.secret"),
                        "not valid standard (padded) base64; generate one with `head -c 32 /dev/urandom | base64`",
                    ));
                    continue;
                }
            },
        };
        keys.push(Key { name, secret });
    }
    KeysConfig { keys }
}

fn convert_kms(raw: RawKms, path: &str, errors: &mut Vec<FieldError>) -> Option<KmsConfig> {
    let api_version = match raw.api_version.as_deref() {
        None | Some("v1") => KmsApiVersion::V1,
        Some("v2") => KmsApiVersion::V2,
        Some(_) => {
            errors.push(err(
                &format!("{path}.apiVersion"),
                "unsupported KMS API version: use v2 (or v1, deprecated)",
            ));
            return None;
        }
    };
    let timeout = match raw.timeout.as_deref() {
        None => None,
        Some(text) => match parse_go_duration(text) {
            Ok(d) => Some(d),
            Err(msg) => {
                errors.push(err(
                    &format!("{path}.timeout"),
                    &format!("{msg}: must be a positive duration such as 3s"),
                ));
                return None;
            }
        },
    };
    Some(KmsConfig {
        api_version,
        name: raw.name.unwrap_or_default(),
        endpoint: raw.endpoint.unwrap_or_default(),
        timeout,
        cache_size: raw.cachesize,
    })
}

fn err(field: &str, message: &str) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: message.to_string(),
    }
}

/// Replaces the content of every `"..."` and `` `...` `` in a YAML/serde
/// parser message with `<redacted>`: serde's `invalid type: string "..."` would
/// echo a value, and `` unknown field `...` `` the name of a field as written,
/// which is a key when someone typed `secret:KEY` without a space. The line and
/// column stay, so the message still says where to look. Use it on every parser
/// message about a file that may hold secrets.
pub fn redact_parser_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            None if c == '"' || c == '`' => {
                open = Some(c);
                out.push(c);
            }
            None => out.push(c),
            Some(q) if c == q => {
                out.push_str("<redacted>");
                out.push(c);
                open = None;
            }
            Some(_) => {}
        }
    }
    if open.is_some() {
        out.push_str("<redacted>");
    }
    out
}
