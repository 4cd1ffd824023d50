//! Group/resource names as EncryptionConfiguration writes them
//! (`secrets`, `configmaps.`, `deployments.apps`, `*.apps`, `*.`, `*.*`).

use std::fmt;

/// A Kubernetes group and resource. `group` is empty for the core group;
/// `resource` is `*` for a wildcard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupResource {
    /// API group, `""` for core.
    pub group: String,
    /// Plural lowercase resource name, or `*`.
    pub resource: String,
}

impl GroupResource {
    /// Builds a group/resource.
    pub fn new(group: impl Into<String>, resource: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            resource: resource.into(),
        }
    }

    /// Parses a config resource name the way kube-apiserver does: text before
    /// the first `.` is the resource, the rest the group (`secrets` and
    /// `secrets.` are core).
    pub fn parse(name: &str) -> Self {
        match name.split_once('.') {
            Some((resource, group)) => Self::new(group, resource),
            None => Self::new("", name),
        }
    }

    /// `*.*`: every resource of every group.
    pub fn is_any(&self) -> bool {
        self.group == "*" && self.resource == "*"
    }

    /// `*.<group>` (including `*.` for core).
    pub fn is_group_wildcard(&self) -> bool {
        self.resource == "*" && self.group != "*"
    }

    /// The name as a config would spell it: `secrets`, `deployments.apps`,
    /// `*.` for every core resource, `*.*` for everything.
    pub fn config_name(&self) -> String {
        match (self.group.as_str(), self.resource.as_str()) {
            ("", "*") => "*.".to_string(),
            ("", r) => r.to_string(),
            (g, r) => format!("{r}.{g}"),
        }
    }
}

impl fmt::Display for GroupResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.config_name())
    }
}
