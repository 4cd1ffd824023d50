//! The load-time rules of kube-apiserver (validation of the file, then the
//! masking check it does while building transformers), on the model.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    EncryptionConfiguration, FieldError, KeysConfig, KmsApiVersion, KmsConfig, ProviderConfig,
};
use crate::resource::GroupResource;

/// Resource names kube-apiserver refuses because they have no REST storage of their own.
const NON_REST_RESOURCES: [&str; 3] = [
    "apiserveripinfo",
    "serviceipallocations",
    "servicenodeportallocations",
];

pub(super) fn validate(config: &EncryptionConfiguration) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if config.resources.is_empty() {
        errors.push(err("resources", "required: at least one resources entry"));
    }
    let mut kms_names = BTreeSet::new();
    for (i, entry) in config.resources.iter().enumerate() {
        let path = format!("resources[{i}]");
        validate_resource_names(&entry.resources, &format!("{path}.resources"), &mut errors);
        if entry.providers.is_empty() {
            errors.push(err(
                &format!("{path}.providers"),
                "required: at least one provider",
            ));
        }
        for (j, provider) in entry.providers.iter().enumerate() {
            let ppath = format!("{path}.providers[{j}]");
            match provider {
                ProviderConfig::AesGcm(keys) => {
                    validate_keys(keys, &format!("{ppath}.aesgcm"), &[16, 24, 32], &mut errors)
                }
                ProviderConfig::AesCbc(keys) => {
                    validate_keys(keys, &format!("{ppath}.aescbc"), &[16, 24, 32], &mut errors)
                }
                ProviderConfig::Secretbox(keys) => {
                    validate_keys(keys, &format!("{ppath}.secretbox"), &[32], &mut errors)
                }
                ProviderConfig::Kms(kms) => {
                    validate_kms(kms, &format!("{ppath}.kms"), &mut kms_names, &mut errors)
                }
                ProviderConfig::Identity => {}
            }
        }
    }
    check_masking(config, &mut errors);
    errors
}

fn validate_resource_names(names: &[String], path: &str, errors: &mut Vec<FieldError>) {
    if names.is_empty() {
        errors.push(err(path, "required: at least one resource name"));
        return;
    }
    for (j, name) in names.iter().enumerate() {
        let field = format!("{path}[{j}]");
        let gr = GroupResource::parse(name);
        let problem = if name.is_empty() {
            Some("resource name must not be empty".to_string())
        } else if name.chars().any(|c| c.is_uppercase()) {
            Some("resource name must be lowercase".to_string())
        } else if name == "*" {
            Some("'*' is not allowed: use '*.' for every resource of the core group or '*.*' for all resources".into())
        } else if name != "*.*" && gr.group == "*" {
            Some(
                "the form '<resource>.*' is not allowed: name the group, or use '*.*' for all resources"
                    .to_string(),
            )
        } else if gr.group == "events.k8s.io" {
            Some(
                "the events.k8s.io group is not allowed: use 'events' (core), which stores the same objects"
                    .to_string(),
            )
        } else if gr.group == "extensions" {
            Some(
                "the extensions group is not allowed: use the resource's current group (e.g. ingresses.networking.k8s.io)"
                    .to_string(),
            )
        } else if gr.group.is_empty() && NON_REST_RESOURCES.contains(&gr.resource.as_str()) {
            Some(
                "not a REST resource (e.g. serviceips, servicenodeports): it cannot be configured for encryption"
                    .to_string(),
            )
        } else {
            None
        };
        if let Some(message) = problem {
            errors.push(FieldError { field, message });
        }
    }
    if names.len() < 2 {
        return;
    }
    let parsed: Vec<GroupResource> = names.iter().map(|n| GroupResource::parse(n)).collect();
    let (mut duplicate, mut overlap) = (false, false);
    for (a, ra) in parsed.iter().enumerate() {
        for (b, rb) in parsed.iter().enumerate() {
            if a == b {
                continue;
            }
            if ra == rb {
                duplicate = true;
            } else if ra.is_any() || (ra.resource == "*" && ra.group == rb.group) {
                overlap = true;
            }
        }
    }
    if duplicate {
        errors.push(err(path, "duplicate resource names in one list"));
    }
    if overlap {
        errors.push(err(
            path,
            "overlapping resources (such as 'secrets' and '*.', or '*.*' with anything) in one list: \
             the wildcard masks the others; put specific resources in an earlier entry",
        ));
    }
}

fn validate_keys(keys: &KeysConfig, path: &str, sizes: &[usize], errors: &mut Vec<FieldError>) {
    let sizes_text = match sizes {
        [one] => format!("{one}"),
        _ => "16, 24 or 32".to_string(),
    };
    if keys.keys.is_empty() {
        errors.push(err(&format!("{path}.keys"), "required: at least one key"));
    }
    for (k, key) in keys.keys.iter().enumerate() {
        let kpath = format!("{path}.keys[{k}]");
        if key.name.is_empty() {
            errors.push(err(&format!("{kpath}.name"), "required: a key name"));
        }
        if key.secret.is_empty() {
            errors.push(err(
                &format!("{kpath}.secret"),
                &format!("required: standard base64 of a {sizes_text} byte key"),
            ));
        } else if !sizes.contains(&key.secret.len()) {
            errors.push(err(
                &format!("{kpath}.secret"),
                &format!(
                    "key is {} bytes; it must be {sizes_text} bytes",
                    key.secret.len()
                ),
            ));
        }
    }
}

fn validate_kms(
    kms: &KmsConfig,
    path: &str,
    names: &mut BTreeSet<String>,
    errors: &mut Vec<FieldError>,
) {
    let name_field = format!("{path}.name");
    if kms.name.is_empty() {
        errors.push(err(&name_field, "required: the KMS provider name"));
    } else {
        if kms.api_version == KmsApiVersion::V2 && kms.name.contains(':') {
            errors.push(err(
                &name_field,
                "a KMS v2 provider name must not contain ':'",
            ));
        }
        // kube-apiserver: v2 names are unique across all kms providers (v1 names only on reload).
        if kms.api_version == KmsApiVersion::V2 && names.contains(&kms.name) {
            errors.push(err(
                &name_field,
                "duplicate KMS provider name: KMS v2 names must be unique across all kms providers",
            ));
        }
        names.insert(kms.name.clone());
    }
    let endpoint_field = format!("{path}.endpoint");
    if kms.endpoint.is_empty() {
        errors.push(err(
            &endpoint_field,
            "required: the plugin endpoint, e.g. unix:///var/run/kms.sock",
        ));
    } else {
        match kms.endpoint.split_once("://") {
            Some(("unix", rest)) if !rest.is_empty() => {}
            Some(("unix", _)) => errors.push(err(&endpoint_field, "unix endpoint has no path")),
            Some(_) => errors.push(err(
                &endpoint_field,
                "unsupported scheme for a KMS provider: only unix is supported (unix:///path)",
            )),
            None => errors.push(err(
                &endpoint_field,
                "not a URL: use unix:///path/to/socket",
            )),
        }
    }
    if kms.timeout.is_some_and(|t| t.is_zero()) {
        errors.push(err(
            &format!("{path}.timeout"),
            "timeout must be a positive duration, e.g. 3s",
        ));
    }
    if let Some(size) = kms.cache_size {
        let field = format!("{path}.cachesize");
        if kms.api_version == KmsApiVersion::V2 {
            errors.push(err(
                &field,
                "cachesize is not supported for KMS v2: remove it",
            ));
        } else if size == 0 {
            errors.push(err(
                &field,
                "cachesize must not be 0 (positive to cache, negative to disable the cache)",
            ));
        }
    }
}

/// kube-apiserver builds a map from group/resource to transformers in file order and
/// refuses any resource an earlier `*.<group>` or `*.*` already covers.
fn check_masking(config: &EncryptionConfiguration, errors: &mut Vec<FieldError>) {
    // Every rule seen so far, with where it was written.
    let mut seen: BTreeMap<GroupResource, String> = BTreeMap::new();
    for (i, entry) in config.resources.iter().enumerate() {
        for (j, name) in entry.resources.iter().enumerate() {
            let gr = GroupResource::parse(name);
            let group_wildcard = GroupResource::new(gr.group.clone(), "*");
            let any = GroupResource::new("*", "*");
            for masker in [group_wildcard, any] {
                if let Some(at) = seen.get(&masker) {
                    errors.push(err(
                        &format!("resources[{i}].resources[{j}]"),
                        &format!(
                            "masked by the earlier wildcard rule {at}: move it to an entry before the wildcard"
                        ),
                    ));
                    break;
                }
            }
        }
        // Insert after the whole entry: names in one list do not mask each other
        // (overlaps inside a list are a separate error).
        for (j, name) in entry.resources.iter().enumerate() {
            seen.entry(GroupResource::parse(name))
                .or_insert_with(|| format!("resources[{i}].resources[{j}]"));
        }
    }
}

fn err(field: &str, message: &str) -> FieldError {
    FieldError {
        field: field.to_string(),
        message: message.to_string(),
    }
}
