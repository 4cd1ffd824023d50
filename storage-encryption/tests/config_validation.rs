//! One test per EncryptionConfiguration rule: each checks that the error names the field.
#![allow(clippy::unwrap_used)]

use storage_encryption::{ConfigError, EncryptionConfiguration, GroupResource, MatchRule};

const K32: &str = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=";
const K16: &str = "ABEiM0RVZneImaq7zN3u/w==";

fn config(resources_yaml: &str) -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n{resources_yaml}"
    )
}

fn entry(resources: &str, provider: &str) -> String {
    format!("  - resources: {resources}\n    providers:\n      - {provider}\n")
}

fn kms(extra: &str) -> String {
    format!("kms: {{apiVersion: v2, name: p1, endpoint: 'unix:///run/kms.sock'{extra}}}")
}

/// Parses `text` expecting a validation error at `field` whose message contains `needle`.
#[track_caller]
fn rejects(text: &str, field: &str, needle: &str) {
    match EncryptionConfiguration::parse(text) {
        Err(ConfigError::Invalid { errors }) => {
            assert!(
                errors
                    .iter()
                    .any(|e| e.field == field && e.message.contains(needle)),
                "want {field}: ...{needle}..., got {errors:?}"
            );
            let shown = ConfigError::Invalid { errors }.to_string();
            assert!(shown.contains(&format!("{field}: ")), "{shown}");
        }
        other => panic!("want a validation error at {field}, got {other:?}\n{text}"),
    }
}

#[track_caller]
fn accepts(text: &str) -> EncryptionConfiguration {
    EncryptionConfiguration::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn both_api_versions_are_accepted_and_others_rejected() {
    let body = entry("[secrets]", "identity: {}");
    let v1 = accepts(&config(&body));
    assert_eq!(v1.api_version, storage_encryption::ConfigApiVersion::V1);
    let legacy = accepts(&format!(
        "apiVersion: v1\nkind: EncryptionConfig\nresources:\n{body}"
    ));
    assert_eq!(
        legacy.api_version,
        storage_encryption::ConfigApiVersion::LegacyV1
    );
    rejects(
        &format!(
            "apiVersion: apiserver.config.k8s.io/v2\nkind: EncryptionConfiguration\nresources:\n{body}"
        ),
        "apiVersion",
        "not supported",
    );
    rejects(
        &format!("apiVersion: v1\nkind: EncryptionConfiguration\nresources:\n{body}"),
        "kind",
        "EncryptionConfig",
    );
    rejects(
        &format!("kind: EncryptionConfiguration\nresources:\n{body}"),
        "apiVersion",
        "required",
    );
    rejects(
        &format!("apiVersion: apiserver.config.k8s.io/v1\nresources:\n{body}"),
        "kind",
        "required",
    );
}

#[test]
fn unknown_fields_are_errors() {
    for text in [
        config(&entry("[secrets]", "identity: {}")).replace("kind:", "extra: 1\nkind:"),
        config(&entry("[secrets]", "identity: {bogus: 1}")),
        config(&entry("[secrets]", &kms(", cacheSize: 5"))),
        config(&entry(
            "[secrets]",
            &format!("aescbc: {{keys: [{{name: k, secret: {K32}, sekret: x}}]}}"),
        )),
    ] {
        match EncryptionConfiguration::parse(&text) {
            Err(ConfigError::Yaml { message }) => {
                assert!(message.contains("unknown field"), "{message}")
            }
            other => panic!("{other:?}\n{text}"),
        }
    }
}

#[test]
fn resources_list_is_required() {
    rejects(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n",
        "resources",
        "at least one",
    );
    rejects(
        &config(&entry("[]", "identity: {}")),
        "resources[0].resources",
        "at least one",
    );
    rejects(
        &config("  - resources: [secrets]\n    providers: []\n"),
        "resources[0].providers",
        "at least one",
    );
}

#[test]
fn each_provider_item_has_exactly_one_type() {
    rejects(
        &config(&entry(
            "[secrets]",
            &format!("identity: {{}}\n        aescbc: {{keys: [{{name: k, secret: {K32}}}]}}"),
        )),
        "resources[0].providers[0]",
        "more than one provider type (aescbc, identity)",
    );
    rejects(
        &config(&entry("[secrets]", "identity:")),
        "resources[0].providers[0]",
        "no provider given",
    );
}

#[test]
fn keys_need_name_and_secret_of_the_right_size() {
    for p in ["aescbc", "aesgcm", "secretbox"] {
        let base = format!("resources[0].providers[0].{p}");
        rejects(
            &config(&entry("[secrets]", &format!("{p}: {{keys: []}}"))),
            &format!("{base}.keys"),
            "at least one key",
        );
        rejects(
            &config(&entry(
                "[secrets]",
                &format!("{p}: {{keys: [{{secret: {K32}}}]}}"),
            )),
            &format!("{base}.keys[0].name"),
            "required",
        );
        rejects(
            &config(&entry(
                "[secrets]",
                &format!("{p}: {{keys: [{{name: k}}]}}"),
            )),
            &format!("{base}.keys[0].secret"),
            "required",
        );
        rejects(
            &config(&entry(
                "[secrets]",
                &format!(
                    "{p}: {{keys: [{{name: k, secret: {K32}}}, {{name: k2, secret: 'not base64!'}}]}}"
                ),
            )),
            &format!("{base}.keys[1].secret"),
            "base64",
        );
        rejects(
            &config(&entry(
                "[secrets]",
                &format!("{p}: {{keys: [{{name: k, secret: 'AAAAAAAAAAAAAA=='}}]}}"),
            )),
            &format!("{base}.keys[0].secret"),
            "key is 10 bytes",
        );
    }
    // 16 bytes: fine for AES, not for secretbox.
    accepts(&config(&entry(
        "[secrets]",
        &format!("aesgcm: {{keys: [{{name: k, secret: {K16}}}]}}"),
    )));
    accepts(&config(&entry(
        "[secrets]",
        &format!("aescbc: {{keys: [{{name: k, secret: {K16}}}]}}"),
    )));
    rejects(
        &config(&entry(
            "[secrets]",
            &format!("secretbox: {{keys: [{{name: k, secret: {K16}}}]}}"),
        )),
        "resources[0].providers[0].secretbox.keys[0].secret",
        "it must be 32 bytes",
    );
}

#[test]
fn bad_secret_errors_do_not_echo_the_secret() {
    let text = config(&entry(
        "[secrets]",
        "aescbc: {keys: [{name: k, secret: 'SUPERSECRETVALUE!!'}]}",
    ));
    let err = EncryptionConfiguration::parse(&text).unwrap_err();
    assert!(!err.to_string().contains("SUPERSECRET"), "{err}");
    let text = config(&entry("[secrets]", "aescbc: {keys: \"SUPERSECRETVALUE\"}"));
    let err = EncryptionConfiguration::parse(&text).unwrap_err();
    assert!(!err.to_string().contains("SUPERSECRET"), "{err}");
}

#[test]
fn kms_api_version_must_be_v1_or_v2() {
    rejects(
        &config(&entry(
            "[secrets]",
            "kms: {apiVersion: v3, name: p, endpoint: 'unix:///s'}",
        )),
        "resources[0].providers[0].kms.apiVersion",
        "unsupported KMS API version",
    );
    let c = accepts(&config(&entry(
        "[secrets]",
        "kms: {name: p, endpoint: 'unix:///s'}",
    )));
    match &c.resources[0].providers[0] {
        storage_encryption::ProviderConfig::Kms(k) => {
            assert_eq!(k.api_version, storage_encryption::KmsApiVersion::V1)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn kms_name_is_required_without_colon_for_v2_and_unique() {
    let f = "resources[0].providers[0].kms.name";
    rejects(
        &config(&entry(
            "[secrets]",
            "kms: {apiVersion: v2, endpoint: 'unix:///s'}",
        )),
        f,
        "required",
    );
    rejects(
        &config(&entry(
            "[secrets]",
            "kms: {apiVersion: v2, name: 'a:b', endpoint: 'unix:///s'}",
        )),
        f,
        "must not contain ':'",
    );
    accepts(&config(&entry(
        "[secrets]",
        "kms: {apiVersion: v1, name: 'a:b', endpoint: 'unix:///s'}",
    )));
    let twice = config(&format!(
        "{}{}",
        entry("[secrets]", &kms("")),
        entry("[configmaps]", &kms(""))
    ));
    rejects(
        &twice,
        "resources[1].providers[0].kms.name",
        "duplicate KMS provider name",
    );
}

#[test]
fn kms_timeout_must_be_positive() {
    let f = "resources[0].providers[0].kms.timeout";
    rejects(
        &config(&entry("[secrets]", &kms(", timeout: 0s"))),
        f,
        "positive",
    );
    rejects(
        &config(&entry("[secrets]", &kms(", timeout: -3s"))),
        f,
        "negative",
    );
    rejects(
        &config(&entry("[secrets]", &kms(", timeout: '3'"))),
        f,
        "missing unit",
    );
    let c = accepts(&config(&entry("[secrets]", &kms(", timeout: 1m30s"))));
    match &c.resources[0].providers[0] {
        storage_encryption::ProviderConfig::Kms(k) => {
            assert_eq!(k.effective_timeout(), std::time::Duration::from_secs(90))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn kms_endpoint_must_be_unix() {
    let f = "resources[0].providers[0].kms.endpoint";
    rejects(
        &config(&entry("[secrets]", "kms: {apiVersion: v2, name: p}")),
        f,
        "required",
    );
    rejects(
        &config(&entry(
            "[secrets]",
            "kms: {apiVersion: v2, name: p, endpoint: 'tcp://127.0.0.1:1'}",
        )),
        f,
        "only unix",
    );
    rejects(
        &config(&entry(
            "[secrets]",
            "kms: {apiVersion: v2, name: p, endpoint: '/run/kms.sock'}",
        )),
        f,
        "not a URL",
    );
    accepts(&config(&entry(
        "[secrets]",
        "kms: {apiVersion: v2, name: p, endpoint: 'unix:///@abstract'}",
    )));
}

#[test]
fn kms_cachesize_only_for_v1_and_not_zero() {
    let f = "resources[0].providers[0].kms.cachesize";
    rejects(
        &config(&entry("[secrets]", &kms(", cachesize: 100"))),
        f,
        "not supported for KMS v2",
    );
    rejects(
        &config(&entry(
            "[secrets]",
            "kms: {name: p, endpoint: 'unix:///s', cachesize: 0}",
        )),
        f,
        "must not be 0",
    );
    accepts(&config(&entry(
        "[secrets]",
        "kms: {name: p, endpoint: 'unix:///s', cachesize: -1}",
    )));
}

#[test]
fn resource_names_follow_the_apiservers_rules() {
    let f = "resources[0].resources[0]";
    for (name, needle) in [
        ("Secrets", "lowercase"),
        ("'*'", "use '*.'"),
        ("'pods.*'", "'<resource>.*'"),
        ("events.events.k8s.io", "events.k8s.io"),
        ("'*.events.k8s.io'", "events.k8s.io"),
        ("ingresses.extensions", "extensions"),
        ("'*.extensions'", "extensions"),
        ("serviceipallocations", "not a REST resource"),
        ("servicenodeportallocations", "not a REST resource"),
        ("apiserveripinfo", "not a REST resource"),
        ("''", "must not be empty"),
    ] {
        rejects(
            &config(&entry(&format!("[{name}]"), "identity: {}")),
            f,
            needle,
        );
    }
    accepts(&config(&entry(
        "[secrets, 'configmaps.', deployments.apps, 'pandas.awesome.bears.example']",
        "identity: {}",
    )));
}

#[test]
fn one_list_may_not_repeat_or_overlap() {
    let f = "resources[0].resources";
    rejects(
        &config(&entry("[secrets, secrets]", "identity: {}")),
        f,
        "duplicate",
    );
    rejects(
        &config(&entry("[secrets, 'secrets.']", "identity: {}")),
        f,
        "duplicate",
    );
    rejects(
        &config(&entry("['*.*', secrets]", "identity: {}")),
        f,
        "overlapping",
    );
    rejects(
        &config(&entry("['*.apps', deployments.apps]", "identity: {}")),
        f,
        "overlapping",
    );
    rejects(
        &config(&entry("[secrets, '*.']", "identity: {}")),
        f,
        "overlapping",
    );
    accepts(&config(&entry(
        "['*.apps', '*.batch', secrets]",
        "identity: {}",
    )));
}

#[test]
fn entries_masked_by_earlier_wildcards_are_load_errors() {
    for (first, later) in [
        ("'*.*'", "secrets"),
        ("'*.'", "configmaps"),
        ("'*.apps'", "deployments.apps"),
        ("'*.*'", "'*.apps'"),
        ("'*.apps'", "'*.apps'"),
    ] {
        let text = config(&format!(
            "{}{}",
            entry(&format!("[{first}]"), "identity: {}"),
            entry(&format!("[{later}]"), "identity: {}")
        ));
        // The message points at the masking rule by position, not by what it says.
        rejects(
            &text,
            "resources[1].resources[0]",
            "masked by the earlier wildcard rule resources[0].resources[0]",
        );
    }
    // Specific first, wildcard later: fine.
    accepts(&config(&format!(
        "{}{}",
        entry("[secrets]", "identity: {}"),
        entry("['*.*']", "identity: {}")
    )));
}

#[test]
fn matching_is_exact_then_group_wildcard_then_any_then_identity() {
    let text = config(&format!(
        "{}{}{}{}{}",
        entry(
            "[secrets]",
            &format!("aescbc: {{keys: [{{name: a, secret: {K32}}}]}}")
        ),
        entry(
            "[secrets, deployments.apps]",
            &format!("aesgcm: {{keys: [{{name: b, secret: {K32}}}]}}")
        ),
        entry(
            "['*.apps']",
            &format!("secretbox: {{keys: [{{name: c, secret: {K32}}}]}}")
        ),
        entry("['*.']", "identity: {}"),
        entry("['*.*']", &kms("")),
    ));
    let c = accepts(&text);
    let m = c.providers_for(&GroupResource::parse("secrets"));
    assert_eq!(m.rule, MatchRule::Exact(GroupResource::new("", "secrets")));
    let names: Vec<String> = m.providers.iter().map(|p| p.describe()).collect();
    assert_eq!(
        names,
        ["aescbc a", "aesgcm b"],
        "same exact resource in two entries appends providers"
    );
    let m = c.providers_for(&GroupResource::parse("statefulsets.apps"));
    assert_eq!(
        (m.rule.config_name().unwrap(), m.providers[0].describe()),
        ("*.apps".to_string(), "secretbox c".to_string())
    );
    let m = c.providers_for(&GroupResource::parse("deployments.apps"));
    assert_eq!(m.providers[0].describe(), "aesgcm b");
    let m = c.providers_for(&GroupResource::parse("configmaps"));
    assert_eq!(
        (m.rule.config_name().unwrap(), m.providers[0].describe()),
        ("*.".to_string(), "identity".to_string())
    );
    let m = c.providers_for(&GroupResource::parse("widgets.stable.example.com"));
    assert_eq!(
        (m.rule, m.providers[0].describe()),
        (MatchRule::AnyWildcard, "kms v2 p1".to_string())
    );

    let only_secrets = accepts(&config(&entry("[secrets]", "identity: {}")));
    let m = only_secrets.providers_for(&GroupResource::parse("configmaps"));
    assert_eq!(m.rule, MatchRule::Unmatched);
    assert!(m.providers.is_empty());
}

#[test]
fn config_file_hash_is_the_apiserver_metric_format() {
    // sha256("") is well known.
    assert_eq!(
        storage_encryption::config_file_hash(b""),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(storage_encryption::key_id_hash(""), "");
    assert!(storage_encryption::key_id_hash("k").starts_with("sha256:"));
}

/// Errors name the field path or the line and column, never a value and never
/// an unknown field's name as written: a key pasted in the wrong place (or a
/// `secret:KEY` without a space, which YAML reads as a field name) must not be
/// printed by whoever reports the error.
#[test]
fn errors_never_echo_what_was_written() {
    const KEY: &str = "c2VjcmV0LWtleS1tYXRlcmlhbC0zMi1ieXRlcyEhISE=";
    let head = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\n";
    let cases = [
        // An unknown field named after the key (no space after the colon).
        format!(
            "{head}resources:\n  - resources: [secrets]\n    providers:\n      - aesgcm: {{keys: [{{name: g1, secret:{KEY}}}]}}\n"
        ),
        // An unknown provider key.
        format!(
            "{head}resources:\n  - resources: [secrets]\n    providers:\n      - {KEY}: {{}}\n"
        ),
        // Wrong type carrying the key.
        format!(
            "{head}resources:\n  - resources: [secrets]\n    providers:\n      - identity: \"{KEY}\"\n"
        ),
        format!(
            "{head}resources:\n  - resources: [secrets]\n    providers:\n      - kms: {{apiVersion: v2, name: a, endpoint: unix:///x, cachesize: {KEY}}}\n"
        ),
        // The key pasted into kind / apiVersion.
        format!("apiVersion: apiserver.config.k8s.io/v1\nkind: {KEY}\nresources: []\n"),
        format!("apiVersion: {KEY}\nkind: EncryptionConfiguration\nresources: []\n"),
        // ... into a resource name, a KMS name, endpoint, apiVersion, timeout.
        format!(
            "{head}resources:\n  - resources: [{KEY}]\n    providers:\n      - identity: {{}}\n"
        ),
        format!(
            "{head}resources:\n  - resources: [secrets.{KEY}]\n    providers:\n      - identity: {{}}\n"
        ),
        format!(
            "{head}resources:\n  - resources: [secrets]\n    providers:\n      - kms: {{apiVersion: v2, name: \"a:{KEY}\", endpoint: unix:///x}}\n"
        ),
        format!(
            "{head}resources:\n  - resources: [secrets]\n    providers:\n      - kms: {{apiVersion: v2, name: a, endpoint: \"{KEY}\"}}\n"
        ),
        format!(
            "{head}resources:\n  - resources: [secrets]\n    providers:\n      - kms: {{apiVersion: v2, name: a, endpoint: \"x{KEY}://y\"}}\n"
        ),
        format!(
            "{head}resources:\n  - resources: [secrets]\n    providers:\n      - kms: {{apiVersion: \"{KEY}\", name: a, endpoint: unix:///x}}\n"
        ),
        format!(
            "{head}resources:\n  - resources: [secrets]\n    providers:\n      - kms: {{apiVersion: v2, name: a, endpoint: unix:///x, timeout: \"{KEY}\"}}\n"
        ),
        // A resource masked by a wildcard.
        format!(
            "{head}resources:\n  - resources: ['*.*']\n    providers:\n      - identity: {{}}\n  - resources: [{}]\n    providers:\n      - identity: {{}}\n",
            KEY.to_lowercase().replace(['=', '+', '/'], "")
        ),
    ];
    let needles = [
        KEY.to_string(),
        KEY[..12].to_string(),
        KEY.to_lowercase()[..12].to_string(),
    ];
    for (n, text) in cases.iter().enumerate() {
        let e = match EncryptionConfiguration::parse(text) {
            Ok(c) => c.validate().unwrap_err(),
            Err(e) => e,
        };
        let message = e.to_string();
        for needle in &needles {
            assert!(
                !message.contains(needle.as_str()),
                "case {n}: the error echoes what was written: {message}"
            );
        }
        assert!(
            message.contains("line ")
                || message.contains("resources")
                || message.contains("kind")
                || message.contains("apiVersion"),
            "case {n}: the error says neither where nor which field: {message}"
        );
    }
}
