//! etcd key ↔ resource. kube-apiserver picks a value's transformer by the
//! group/resource it serves, not by the key, so a tool that starts from keys
//! needs the key layout table in reverse, quirks included.

use std::fmt;

use crate::config::{EncryptionConfiguration, ProviderMatch};
use crate::resource::GroupResource;

/// kube-apiserver's default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/registry";

/// A built-in resource: where it lives under the prefix and whether it is namespaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinResource {
    /// API group (`""` for core).
    pub group: &'static str,
    /// Plural resource name.
    pub resource: &'static str,
    /// Key path under the prefix, without slashes around it (`services/specs`).
    pub key_path: &'static str,
    /// Namespaced (`<path>/<ns>/<name>`) or cluster-scoped (`<path>/<name>`).
    pub namespaced: bool,
}

const fn b(
    group: &'static str,
    resource: &'static str,
    key_path: &'static str,
    namespaced: bool,
) -> BuiltinResource {
    BuiltinResource {
        group,
        resource,
        key_path,
        namespaced,
    }
}

/// Built-in resources kube-apiserver stores, with their key paths and scope.
/// Key paths differ from the resource name only for the quirks in the spec table.
pub const BUILTIN_RESOURCES: &[BuiltinResource] = &[
    // core
    b("", "pods", "pods", true),
    b("", "podtemplates", "podtemplates", true),
    b("", "replicationcontrollers", "controllers", true),
    b("", "services", "services/specs", true),
    b("", "endpoints", "services/endpoints", true),
    b("", "nodes", "minions", false),
    b("", "namespaces", "namespaces", false),
    b("", "persistentvolumes", "persistentvolumes", false),
    b("", "persistentvolumeclaims", "persistentvolumeclaims", true),
    b("", "configmaps", "configmaps", true),
    b("", "secrets", "secrets", true),
    b("", "serviceaccounts", "serviceaccounts", true),
    b("", "limitranges", "limitranges", true),
    b("", "resourcequotas", "resourcequotas", true),
    b("", "events", "events", true),
    // apps, batch, autoscaling, policy
    b("apps", "deployments", "deployments", true),
    b("apps", "replicasets", "replicasets", true),
    b("apps", "statefulsets", "statefulsets", true),
    b("apps", "daemonsets", "daemonsets", true),
    b("apps", "controllerrevisions", "controllerrevisions", true),
    b("batch", "jobs", "jobs", true),
    b("batch", "cronjobs", "cronjobs", true),
    b(
        "autoscaling",
        "horizontalpodautoscalers",
        "horizontalpodautoscalers",
        true,
    ),
    b(
        "policy",
        "poddisruptionbudgets",
        "poddisruptionbudgets",
        true,
    ),
    // networking
    b("networking.k8s.io", "ingresses", "ingress", true),
    b(
        "networking.k8s.io",
        "ingressclasses",
        "ingressclasses",
        false,
    ),
    b(
        "networking.k8s.io",
        "networkpolicies",
        "networkpolicies",
        true,
    ),
    b("networking.k8s.io", "ipaddresses", "ipaddresses", false),
    b("networking.k8s.io", "servicecidrs", "servicecidrs", false),
    b("discovery.k8s.io", "endpointslices", "endpointslices", true),
    // rbac
    b("rbac.authorization.k8s.io", "roles", "roles", true),
    b(
        "rbac.authorization.k8s.io",
        "rolebindings",
        "rolebindings",
        true,
    ),
    b(
        "rbac.authorization.k8s.io",
        "clusterroles",
        "clusterroles",
        false,
    ),
    b(
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        "clusterrolebindings",
        false,
    ),
    // storage
    b("storage.k8s.io", "storageclasses", "storageclasses", false),
    b(
        "storage.k8s.io",
        "volumeattachments",
        "volumeattachments",
        false,
    ),
    b("storage.k8s.io", "csidrivers", "csidrivers", false),
    b("storage.k8s.io", "csinodes", "csinodes", false),
    b(
        "storage.k8s.io",
        "csistoragecapacities",
        "csistoragecapacities",
        true,
    ),
    b(
        "storage.k8s.io",
        "volumeattributesclasses",
        "volumeattributesclasses",
        false,
    ),
    // scheduling, coordination, node
    b(
        "scheduling.k8s.io",
        "priorityclasses",
        "priorityclasses",
        false,
    ),
    b("coordination.k8s.io", "leases", "leases", true),
    b(
        "coordination.k8s.io",
        "leasecandidates",
        "leasecandidates",
        true,
    ),
    b("node.k8s.io", "runtimeclasses", "runtimeclasses", false),
    // certificates, admission, flow control
    b(
        "certificates.k8s.io",
        "certificatesigningrequests",
        "certificatesigningrequests",
        false,
    ),
    b(
        "certificates.k8s.io",
        "clustertrustbundles",
        "clustertrustbundles",
        false,
    ),
    b(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        "mutatingwebhookconfigurations",
        false,
    ),
    b(
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
        "validatingwebhookconfigurations",
        false,
    ),
    b(
        "admissionregistration.k8s.io",
        "validatingadmissionpolicies",
        "validatingadmissionpolicies",
        false,
    ),
    b(
        "admissionregistration.k8s.io",
        "validatingadmissionpolicybindings",
        "validatingadmissionpolicybindings",
        false,
    ),
    b(
        "admissionregistration.k8s.io",
        "mutatingadmissionpolicies",
        "mutatingadmissionpolicies",
        false,
    ),
    b(
        "admissionregistration.k8s.io",
        "mutatingadmissionpolicybindings",
        "mutatingadmissionpolicybindings",
        false,
    ),
    b(
        "flowcontrol.apiserver.k8s.io",
        "flowschemas",
        "flowschemas",
        false,
    ),
    b(
        "flowcontrol.apiserver.k8s.io",
        "prioritylevelconfigurations",
        "prioritylevelconfigurations",
        false,
    ),
    // dynamic resource allocation
    b("resource.k8s.io", "resourceclaims", "resourceclaims", true),
    b(
        "resource.k8s.io",
        "resourceclaimtemplates",
        "resourceclaimtemplates",
        true,
    ),
    b("resource.k8s.io", "deviceclasses", "deviceclasses", false),
    b("resource.k8s.io", "resourceslices", "resourceslices", false),
    b(
        "resource.k8s.io",
        "devicetaintrules",
        "devicetaintrules",
        false,
    ),
    // apiserver internals
    b(
        "internal.apiserver.k8s.io",
        "storageversions",
        "storageversions",
        false,
    ),
    b(
        "storagemigration.k8s.io",
        "storageversionmigrations",
        "storageversionmigrations",
        false,
    ),
    // served by the aggregated servers of kube-apiserver; their keys carry the group
    b(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "apiextensions.k8s.io/customresourcedefinitions",
        false,
    ),
    b(
        "apiregistration.k8s.io",
        "apiservices",
        "apiregistration.k8s.io/apiservices",
        false,
    ),
];

/// Keys under `ranges/` (written with the `services` configuration).
const RANGE_KEYS: [&str; 3] = ["servicenodeports", "serviceips", "secondaryserviceips"];

/// What kind of storage a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// An object of a built-in resource.
    Builtin,
    /// An object of a custom resource (`<group>/<plural>/[ns/]name`).
    Custom,
    /// A `ranges/` allocation key (`services` configuration, no REST resource).
    Range,
    /// A `masterleases/<ip>` key: only a `*.` or `*.*` rule reaches it.
    MasterLease,
}

/// The resource an etcd key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyResource {
    /// Group/resource whose configuration applies (`services` for `ranges/`).
    pub group_resource: GroupResource,
    /// Storage kind.
    pub kind: KeyKind,
    /// Namespace, for namespaced objects.
    pub namespace: Option<String>,
    /// Object name (for `ranges/` the range key, for `masterleases/` the IP).
    pub name: String,
}

impl KeyResource {
    /// The providers kube-apiserver uses for this key's storage (only wildcards for
    /// `masterleases/`).
    pub fn providers<'c>(&self, config: &'c EncryptionConfiguration) -> ProviderMatch<'c> {
        match self.kind {
            KeyKind::MasterLease => config.providers_for_wildcards(&self.group_resource.group),
            KeyKind::Builtin | KeyKind::Custom | KeyKind::Range => {
                config.providers_for(&self.group_resource)
            }
        }
    }
}

/// Why a key could not be mapped to a resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is not under the prefix (e.g. `compact_rev_key`, never encrypted).
    #[error("etcd key {key:?} is outside the prefix {prefix:?}")]
    OutsidePrefix {
        /// The key (lossy UTF-8).
        key: String,
        /// The prefix.
        prefix: String,
    },
    /// The key is not UTF-8.
    #[error("etcd key is not UTF-8: {key:?}")]
    NotUtf8 {
        /// The key (lossy UTF-8).
        key: String,
    },
    /// The first path segment is no known built-in resource and has no `.` (so no CR group).
    #[error(
        "etcd key {key:?}: unknown resource path {segment:?} (not a known built-in resource; custom resources live under <group>/<plural>/)"
    )]
    UnknownResource {
        /// The key.
        key: String,
        /// The unrecognized path segment.
        segment: String,
    },
    /// Wrong number of path segments for the resource's scope.
    #[error("etcd key {key:?}: expected {expected} after the resource path")]
    BadShape {
        /// The key.
        key: String,
        /// What was expected (`<namespace>/<name>` or `<name>`).
        expected: &'static str,
    },
}

/// Maps an etcd key to its resource, namespace and name. `prefix` is the
/// apiserver's `--etcd-prefix` ([`DEFAULT_PREFIX`] unless configured).
pub fn resource_for_key(key: &[u8], prefix: &str) -> Result<KeyResource, KeyError> {
    let text = std::str::from_utf8(key).map_err(|_| KeyError::NotUtf8 {
        key: String::from_utf8_lossy(key).into_owned(),
    })?;
    let prefix_trimmed = prefix.trim_end_matches('/');
    let rest = text
        .strip_prefix(prefix_trimmed)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| KeyError::OutsidePrefix {
            key: text.to_string(),
            prefix: prefix.to_string(),
        })?;
    let segments: Vec<&str> = rest.split('/').collect();
    let first = segments.first().copied().unwrap_or_default();
    let shape = |expected| KeyError::BadShape {
        key: text.to_string(),
        expected,
    };

    if first == "ranges" {
        return match segments.as_slice() {
            [_, name] if RANGE_KEYS.contains(name) => Ok(KeyResource {
                group_resource: GroupResource::new("", "services"),
                kind: KeyKind::Range,
                namespace: None,
                name: (*name).to_string(),
            }),
            _ => Err(KeyError::UnknownResource {
                key: text.to_string(),
                segment: rest.to_string(),
            }),
        };
    }
    if first == "masterleases" {
        return match segments.as_slice() {
            [_, ip] if !ip.is_empty() => Ok(KeyResource {
                group_resource: GroupResource::new("", "masterleases"),
                kind: KeyKind::MasterLease,
                namespace: None,
                name: (*ip).to_string(),
            }),
            _ => Err(shape("<ip>")),
        };
    }

    // Longest key path first, so services/specs wins over a plain "services".
    // "The key path's segments, then at least one more" is "the key path,
    // then a '/'": a prefix test, without splitting each of the ~60 key
    // paths for every key (this was a quarter of an audit's CPU).
    let builtin = BUILTIN_RESOURCES
        .iter()
        .filter(|r| {
            rest.strip_prefix(r.key_path)
                .is_some_and(|after| after.starts_with('/'))
        })
        .max_by_key(|r| r.key_path.len());
    let (group_resource, kind, namespaced, after) = match builtin {
        Some(r) => {
            let n = r.key_path.split('/').count();
            (
                GroupResource::new(r.group, r.resource),
                KeyKind::Builtin,
                Some(r.namespaced),
                &segments[n..],
            )
        }
        None if first.contains('.') && segments.len() >= 3 => (
            GroupResource::new(first, segments[1]),
            KeyKind::Custom,
            None,
            &segments[2..],
        ),
        None => {
            return Err(KeyError::UnknownResource {
                key: text.to_string(),
                segment: first.to_string(),
            });
        }
    };
    let (namespace, name) = match (namespaced, after) {
        (Some(true) | None, [ns, name]) if !ns.is_empty() && !name.is_empty() => {
            (Some(ns.to_string()), name.to_string())
        }
        (Some(false) | None, [name]) if !name.is_empty() => (None, name.to_string()),
        (Some(true), _) => return Err(shape("<namespace>/<name>")),
        (Some(false), _) => return Err(shape("<name>")),
        (None, _) => return Err(shape("<namespace>/<name> or <name>")),
    };
    Ok(KeyResource {
        group_resource,
        kind,
        namespace,
        name,
    })
}

/// The built-in resource entry for `gr`, if any.
pub fn builtin_resource(gr: &GroupResource) -> Option<&'static BuiltinResource> {
    // events.k8s.io events share the core events storage.
    let group = if gr.group == "events.k8s.io" && gr.resource == "events" {
        ""
    } else {
        gr.group.as_str()
    };
    BUILTIN_RESOURCES
        .iter()
        .find(|r| r.group == group && r.resource == gr.resource)
}

/// API groups served by kube-apiserver itself: resources in these groups that are
/// not in the table are assumed to be stored as `<prefix>/<resource>/`.
const BUILTIN_GROUPS: &[&str] = &[
    "",
    "apps",
    "batch",
    "autoscaling",
    "policy",
    "networking.k8s.io",
    "discovery.k8s.io",
    "rbac.authorization.k8s.io",
    "storage.k8s.io",
    "scheduling.k8s.io",
    "coordination.k8s.io",
    "node.k8s.io",
    "certificates.k8s.io",
    "admissionregistration.k8s.io",
    "flowcontrol.apiserver.k8s.io",
    "resource.k8s.io",
    "internal.apiserver.k8s.io",
    "storagemigration.k8s.io",
    "events.k8s.io",
    "authentication.k8s.io",
    "authorization.k8s.io",
];

/// The key prefix (ending in `/`) under which kube-apiserver stores objects of
/// `gr`: table entries for built-ins, `<prefix>/<resource>/` for other resources
/// of built-in groups, `<prefix>/<group>/<resource>/` for custom resources.
pub fn key_prefix_for(gr: &GroupResource, prefix: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    if let Some(r) = builtin_resource(gr) {
        return format!("{prefix}/{}/", r.key_path);
    }
    if BUILTIN_GROUPS.contains(&gr.group.as_str()) {
        format!("{prefix}/{}/", gr.resource)
    } else {
        format!("{prefix}/{}/{}/", gr.group, gr.resource)
    }
}

/// The full key of one object.
pub fn object_key(gr: &GroupResource, namespace: Option<&str>, name: &str, prefix: &str) -> String {
    match namespace {
        Some(ns) => format!("{}{ns}/{name}", key_prefix_for(gr, prefix)),
        None => format!("{}{name}", key_prefix_for(gr, prefix)),
    }
}

impl fmt::Display for KeyResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.group_resource)?;
        if let Some(ns) = &self.namespace {
            write!(f, " {ns}/{}", self.name)
        } else {
            write!(f, " {}", self.name)
        }
    }
}
