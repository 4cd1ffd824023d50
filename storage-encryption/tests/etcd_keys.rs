//! etcd key ↔ resource, including every quirk of the key layout table.
#![allow(clippy::unwrap_used)]

use storage_encryption::{
    BUILTIN_RESOURCES, DEFAULT_PREFIX, EncryptionConfiguration, GroupResource, KeyError, KeyKind,
    MatchRule, key_prefix_for, object_key, resource_for_key,
};

fn map(key: &str) -> (String, String, Option<String>, String, KeyKind) {
    let r =
        resource_for_key(key.as_bytes(), DEFAULT_PREFIX).unwrap_or_else(|e| panic!("{key}: {e}"));
    (
        r.group_resource.group,
        r.group_resource.resource,
        r.namespace,
        r.name,
        r.kind,
    )
}

#[test]
fn quirky_key_paths_map_to_their_resources() {
    use KeyKind::*;
    let ns = |s: &str| Some(s.to_string());
    for (key, want) in [
        (
            "/registry/controllers/default/web",
            ("", "replicationcontrollers", ns("default"), "web", Builtin),
        ),
        (
            "/registry/services/endpoints/default/kubernetes",
            ("", "endpoints", ns("default"), "kubernetes", Builtin),
        ),
        (
            "/registry/services/specs/default/kubernetes",
            ("", "services", ns("default"), "kubernetes", Builtin),
        ),
        (
            "/registry/minions/node-1",
            ("", "nodes", None, "node-1", Builtin),
        ),
        (
            "/registry/ingress/default/web",
            (
                "networking.k8s.io",
                "ingresses",
                ns("default"),
                "web",
                Builtin,
            ),
        ),
        (
            "/registry/events/default/web.17a",
            ("", "events", ns("default"), "web.17a", Builtin),
        ),
        (
            "/registry/secrets/kube-system/token",
            ("", "secrets", ns("kube-system"), "token", Builtin),
        ),
        (
            "/registry/deployments/default/web",
            ("apps", "deployments", ns("default"), "web", Builtin),
        ),
        (
            "/registry/namespaces/default",
            ("", "namespaces", None, "default", Builtin),
        ),
        (
            "/registry/clusterroles/admin",
            (
                "rbac.authorization.k8s.io",
                "clusterroles",
                None,
                "admin",
                Builtin,
            ),
        ),
        (
            "/registry/priorityclasses/system-node-critical",
            (
                "scheduling.k8s.io",
                "priorityclasses",
                None,
                "system-node-critical",
                Builtin,
            ),
        ),
        (
            "/registry/ipaddresses/10.96.0.1",
            (
                "networking.k8s.io",
                "ipaddresses",
                None,
                "10.96.0.1",
                Builtin,
            ),
        ),
        (
            "/registry/apiextensions.k8s.io/customresourcedefinitions/widgets.stable.example.com",
            (
                "apiextensions.k8s.io",
                "customresourcedefinitions",
                None,
                "widgets.stable.example.com",
                Builtin,
            ),
        ),
        (
            "/registry/apiregistration.k8s.io/apiservices/v1.apps",
            (
                "apiregistration.k8s.io",
                "apiservices",
                None,
                "v1.apps",
                Builtin,
            ),
        ),
        (
            "/registry/stable.example.com/widgets/ns1/w",
            ("stable.example.com", "widgets", ns("ns1"), "w", Custom),
        ),
        (
            "/registry/stable.example.com/clusterwidgets/w",
            ("stable.example.com", "clusterwidgets", None, "w", Custom),
        ),
        (
            "/registry/ranges/servicenodeports",
            ("", "services", None, "servicenodeports", Range),
        ),
        (
            "/registry/ranges/serviceips",
            ("", "services", None, "serviceips", Range),
        ),
        (
            "/registry/ranges/secondaryserviceips",
            ("", "services", None, "secondaryserviceips", Range),
        ),
        (
            "/registry/masterleases/10.0.0.1",
            ("", "masterleases", None, "10.0.0.1", MasterLease),
        ),
    ] {
        let got = map(key);
        assert_eq!(
            (got.0.as_str(), got.1.as_str(), got.2, got.3.as_str(), got.4),
            (want.0, want.1, want.2, want.3, want.4),
            "{key}"
        );
    }
}

#[test]
fn forward_and_reverse_maps_agree_for_every_builtin() {
    for r in BUILTIN_RESOURCES {
        let gr = GroupResource::new(r.group, r.resource);
        let (ns, name) = if r.namespaced {
            (Some("ns"), "obj")
        } else {
            (None, "obj")
        };
        for prefix in [DEFAULT_PREFIX, "/custom/prefix", "/custom/prefix/"] {
            let key = object_key(&gr, ns, name, prefix);
            let back =
                resource_for_key(key.as_bytes(), prefix).unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(back.group_resource, gr, "{key}");
            assert_eq!(back.namespace.as_deref(), ns, "{key}");
            assert_eq!(back.name, name, "{key}");
        }
    }
    assert_eq!(
        key_prefix_for(&GroupResource::new("", "services"), DEFAULT_PREFIX),
        "/registry/services/specs/"
    );
    assert_eq!(
        key_prefix_for(
            &GroupResource::new("events.k8s.io", "events"),
            DEFAULT_PREFIX
        ),
        "/registry/events/"
    );
    assert_eq!(
        key_prefix_for(&GroupResource::new("apps", "newthings"), DEFAULT_PREFIX),
        "/registry/newthings/"
    );
    assert_eq!(
        key_prefix_for(&GroupResource::new("stable.example.com", "widgets"), "/r"),
        "/r/stable.example.com/widgets/"
    );
}

#[test]
fn bad_keys_are_clear_errors() {
    assert!(matches!(
        resource_for_key(b"compact_rev_key", DEFAULT_PREFIX),
        Err(KeyError::OutsidePrefix { .. })
    ));
    assert!(matches!(
        resource_for_key(b"/registryx/secrets/a/b", DEFAULT_PREFIX),
        Err(KeyError::OutsidePrefix { .. })
    ));
    assert!(matches!(
        resource_for_key(b"/registry/secrets/a/b", "/other"),
        Err(KeyError::OutsidePrefix { .. })
    ));
    assert!(matches!(
        resource_for_key(b"/registry/\xff/a", DEFAULT_PREFIX),
        Err(KeyError::NotUtf8 { .. })
    ));
    assert!(matches!(
        resource_for_key(b"/registry/nosuchthing/a/b", DEFAULT_PREFIX),
        Err(KeyError::UnknownResource { .. })
    ));
    assert!(matches!(
        resource_for_key(b"/registry/ranges/other", DEFAULT_PREFIX),
        Err(KeyError::UnknownResource { .. })
    ));
    let e = resource_for_key(b"/registry/secrets/only-a-name", DEFAULT_PREFIX).unwrap_err();
    assert!(
        e.to_string().contains("/registry/secrets/only-a-name")
            && e.to_string().contains("<namespace>/<name>"),
        "{e}"
    );
    assert!(matches!(
        resource_for_key(b"/registry/minions/ns/name", DEFAULT_PREFIX),
        Err(KeyError::BadShape { .. })
    ));
    assert!(matches!(
        resource_for_key(b"/registry/a.example/widgets/x/y/z", DEFAULT_PREFIX),
        Err(KeyError::BadShape { .. })
    ));
}

#[test]
fn key_storage_picks_providers_like_the_apiserver() {
    let config = EncryptionConfiguration::parse(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n\
         - resources: [services, masterleases]\n  providers: [{aescbc: {keys: [{name: k, secret: ABEiM0RVZneImaq7zN3u/w==}]}}]\n\
         - resources: ['*.']\n  providers: [{identity: {}}]\n",
    )
    .unwrap();
    let ranges = resource_for_key(b"/registry/ranges/servicenodeports", DEFAULT_PREFIX).unwrap();
    assert_eq!(
        ranges.providers(&config).rule,
        MatchRule::Exact(GroupResource::new("", "services"))
    );
    // masterleases: only a wildcard reaches it, even when named exactly.
    let lease = resource_for_key(b"/registry/masterleases/10.0.0.1", DEFAULT_PREFIX).unwrap();
    assert_eq!(
        lease.providers(&config).rule,
        MatchRule::GroupWildcard(String::new())
    );
}
