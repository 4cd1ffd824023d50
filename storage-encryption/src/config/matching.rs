//! Which providers kube-apiserver uses for a group/resource.

use super::{EncryptionConfiguration, ProviderConfig};
use crate::resource::GroupResource;

/// Which rule of the configuration selected the providers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchRule {
    /// The resource is named exactly (its providers from every entry naming it, in order).
    Exact(GroupResource),
    /// `*.<group>` (`*.` for core); holds the group.
    GroupWildcard(String),
    /// `*.*`.
    AnyWildcard,
    /// Nothing matches: kube-apiserver stores the resource in plaintext (identity).
    Unmatched,
}

impl MatchRule {
    /// The rule as the config spells it (`secrets`, `*.apps`, `*.*`), or `None` when unmatched.
    pub fn config_name(&self) -> Option<String> {
        match self {
            Self::Exact(gr) => Some(gr.config_name()),
            Self::GroupWildcard(g) => Some(GroupResource::new(g.clone(), "*").config_name()),
            Self::AnyWildcard => Some("*.*".into()),
            Self::Unmatched => None,
        }
    }
}

/// The providers for one resource, in the order kube-apiserver tries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderMatch<'a> {
    /// The rule that matched.
    pub rule: MatchRule,
    /// Providers in order; empty exactly when `rule` is [`MatchRule::Unmatched`]
    /// (kube-apiserver then uses the bare identity transformer).
    pub providers: Vec<&'a ProviderConfig>,
}

impl EncryptionConfiguration {
    /// The providers kube-apiserver uses for `gr`: exact group/resource (providers of
    /// every entry naming it, appended in order), then `*.<group>`, then `*.*`;
    /// otherwise none (identity).
    pub fn providers_for(&self, gr: &GroupResource) -> ProviderMatch<'_> {
        let exact = self.collect(gr);
        if !exact.is_empty() {
            return ProviderMatch {
                rule: MatchRule::Exact(gr.clone()),
                providers: exact,
            };
        }
        self.providers_for_wildcards(&gr.group)
    }

    /// Like [`Self::providers_for`] for storage that only wildcard rules reach
    /// (`/registry/masterleases/`): `*.<group>`, then `*.*`.
    pub fn providers_for_wildcards(&self, group: &str) -> ProviderMatch<'_> {
        let group_rule = self.collect(&GroupResource::new(group, "*"));
        if !group_rule.is_empty() {
            return ProviderMatch {
                rule: MatchRule::GroupWildcard(group.to_string()),
                providers: group_rule,
            };
        }
        let any = self.collect(&GroupResource::new("*", "*"));
        if !any.is_empty() {
            return ProviderMatch {
                rule: MatchRule::AnyWildcard,
                providers: any,
            };
        }
        ProviderMatch {
            rule: MatchRule::Unmatched,
            providers: Vec::new(),
        }
    }

    fn collect(&self, wanted: &GroupResource) -> Vec<&ProviderConfig> {
        self.resources
            .iter()
            .filter(|entry| {
                entry
                    .resources
                    .iter()
                    .any(|name| GroupResource::parse(name) == *wanted)
            })
            .flat_map(|entry| entry.providers.iter())
            .collect()
    }
}
