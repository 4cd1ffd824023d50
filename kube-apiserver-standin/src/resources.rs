//! The namespaced core/v1 resources the stand-in can serve, and the
//! discovery documents (`/api`, `/api/v1`, `/apis`, `/version`) describing them.

use serde_json::{Value, json};
use storage_encryption::GroupResource;

/// `(resource, Kind, singular)` of the namespaced core/v1 resources the stand-in knows.
/// Cluster-scoped resources are left out: the rotator's tests do not need them.
const KNOWN: &[(&str, &str, &str)] = &[
    ("secrets", "Secret", "secret"),
    ("configmaps", "ConfigMap", "configmap"),
    ("serviceaccounts", "ServiceAccount", "serviceaccount"),
    ("events", "Event", "event"),
    ("endpoints", "Endpoints", "endpoints"),
    ("limitranges", "LimitRange", "limitrange"),
    ("resourcequotas", "ResourceQuota", "resourcequota"),
    ("podtemplates", "PodTemplate", "podtemplate"),
    (
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        "persistentvolumeclaim",
    ),
    (
        "replicationcontrollers",
        "ReplicationController",
        "replicationcontroller",
    ),
    ("services", "Service", "service"),
    ("pods", "Pod", "pod"),
];

/// The verbs discovery advertises for every served resource.
pub const VERBS: [&str; 5] = ["get", "list", "update", "create", "delete"];

/// One served namespaced core/v1 resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedResource {
    /// Plural name (`secrets`).
    pub name: &'static str,
    /// Kind (`Secret`).
    pub kind: &'static str,
    /// Singular name (`secret`).
    pub singular: &'static str,
}

impl ServedResource {
    /// The known namespaced core/v1 resource called `name`.
    pub fn core_v1(name: &str) -> Option<Self> {
        KNOWN
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|&(name, kind, singular)| Self {
                name,
                kind,
                singular,
            })
    }

    /// Its group/resource (core group).
    pub fn group_resource(&self) -> GroupResource {
        GroupResource::new("", self.name)
    }
}

/// The message for a resource the stand-in cannot serve.
pub fn unknown(name: &str) -> String {
    let known: Vec<&str> = KNOWN.iter().map(|(n, _, _)| *n).collect();
    format!(
        "{name:?} is not a namespaced core/v1 resource the stand-in can serve (known: {})",
        known.join(", ")
    )
}

/// `GET /api`: APIVersions.
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

/// `GET /api/v1`: APIResourceList of the served resources.
pub fn core_v1_resources(served: &[ServedResource]) -> Value {
    let resources: Vec<Value> = served
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "singularName": r.singular,
                "namespaced": true,
                "kind": r.kind,
                "verbs": VERBS,
                "storageVersionHash": "",
            })
        })
        .collect();
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "v1",
        "resources": resources,
    })
}

/// `GET /apis`: no groups are served.
pub fn api_groups() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
}

/// `GET /api` with the aggregated-discovery Accept header (apidiscovery.k8s.io/v2).
pub fn aggregated_core(served: &[ServedResource]) -> Value {
    let resources: Vec<Value> = served
        .iter()
        .map(|r| {
            json!({
                "resource": r.name,
                "responseKind": {"group": "", "version": "v1", "kind": r.kind},
                "scope": "Namespaced",
                "singularResource": r.singular,
                "verbs": VERBS,
            })
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": [{
            "metadata": {"name": ""},
            "versions": [{"version": "v1", "resources": resources, "freshness": "Current"}],
        }],
    })
}

/// `GET /apis` with the aggregated-discovery Accept header: no groups.
pub fn aggregated_groups() -> Value {
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": [],
    })
}

/// `GET /version`. `gitVersion` says it is a stand-in.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-atrest-standin",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "none (kube-apiserver stand-in, Rust)",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}
