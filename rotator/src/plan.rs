//! Operations and their plans: an ordered list of stages that follows the safe
//! order of spec/encryption-config.md, so that every apiserver can read every
//! stored value at every moment of a rollout:
//!
//! 1. **add as reader**: the new provider (or key) goes second; writes do not
//!    change yet, but every apiserver learns to read it;
//! 2. **make it first**: writes switch; every apiserver can already read them;
//! 3. **rewrite** every object through the API (a no-op update re-encrypts);
//! 4. **gate, then remove** the old provider or key, only after an etcd audit
//!    finds no value that still needs it.
//!
//! KEK rotation is the same shape on the plugin's keyring: add a decrypt-only
//! KEK everywhere, promote it, rewrite, gate, retire the old KEK.
//!
//! Building a plan is pure: the current config, the keyring listing and a key
//! generator go in, stages with the exact file content come out.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use storage_encryption::{
    ConfigApiVersion, EncryptionConfiguration, GroupResource, Key, KeysConfig, KmsApiVersion,
    KmsConfig, ProviderConfig, ResourceConfig, SecretBytes, config_file_hash,
};

use crate::secret::SecretText;
use ::keyring::Listing;

/// A KMS v2 provider to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsSpec {
    /// Provider name (stored in every value's prefix).
    pub name: String,
    /// `unix:///path` or `unix:///@name`.
    pub endpoint: String,
    /// Per-call timeout in seconds (default 3 s when absent).
    pub timeout_secs: Option<u64>,
}

/// The provider `enable` adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewProvider {
    /// AES-CBC with a new 32-byte key.
    Aescbc,
    /// AES-GCM with a new 32-byte key.
    Aesgcm,
    /// secretbox with a new 32-byte key.
    Secretbox,
    /// A KMS v2 plugin.
    Kms(KmsSpec),
}

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Operation {
    /// identity → provider for `resources`.
    Enable {
        /// The provider to add.
        provider: NewProvider,
        /// Resources to encrypt, as a config names them.
        resources: Vec<String>,
    },
    /// A new key for every entry whose first provider is aescbc, aesgcm or secretbox.
    RotateKey,
    /// A new KEK in the kms-plugin keyring.
    RotateKek,
    /// Local provider → KMS for every entry whose first provider is local.
    ToKms {
        /// The KMS provider to add.
        kms: KmsSpec,
    },
    /// KMS → another KMS provider for every entry whose first provider is kms.
    SwitchKms {
        /// The KMS provider to add.
        kms: KmsSpec,
    },
    /// provider → identity for every entry whose first provider encrypts.
    Disable,
}

impl Operation {
    /// The command name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Enable { .. } => "enable",
            Self::RotateKey => "rotate-key",
            Self::RotateKek => "rotate-kek",
            Self::ToKms { .. } => "to-kms",
            Self::SwitchKms { .. } => "switch-kms",
            Self::Disable => "disable",
        }
    }
}

/// A change to the plugin keyring (first host, then copied to every host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyringStep {
    /// `keyring add`: a decrypt-only KEK.
    AddKek,
    /// `keyring promote` the KEK added by this run.
    PromoteNewKek,
    /// `keyring retire` the KEK that was primary when the run started.
    RetireOldKek,
}

/// What a stage does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Action {
    /// Write this EncryptionConfiguration to every host.
    WriteConfig {
        /// The exact file (holds keys).
        content: SecretText,
        /// `sha256:<hex>` of `content`, what the config hash metric shows.
        hash: String,
    },
    /// Change the keyring and copy it to every host.
    Keyring {
        /// Which change.
        step: KeyringStep,
    },
    /// A no-op update of every object of these resources (config names; wildcards allowed).
    Rewrite {
        /// Resource names as the config spells them.
        resources: Vec<String>,
    },
}

/// The audit that must pass before a stage removes something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Gate {
    /// No value that the config in force reads may be unreadable under the
    /// config this stage writes.
    ConfigRemoval {
        /// What the stage removes, in words (`aescbc key key1`, `identity`).
        removes: Vec<String>,
    },
    /// No KMS v2 value may carry one of the old KEK's key_ids.
    KekRetire,
}

/// One stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// What it does, in words.
    pub title: String,
    /// Must pass before the action runs (re-run on every resume).
    pub gate: Option<Gate>,
    /// The action.
    pub action: Action,
}

/// A whole plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// What was asked.
    pub operation: Operation,
    /// The hosts' config file when the plan was made (`None`: no file yet).
    pub original: Option<SecretText>,
    /// Its hash.
    pub original_hash: Option<String>,
    /// The keyring when the plan was made (rotate-kek only).
    pub keyring: Option<Listing>,
    /// The stages, in order.
    pub stages: Vec<Stage>,
}

impl Plan {
    /// The config in force before stage `index` runs (the last config written
    /// by an earlier stage, else the original).
    pub fn config_before(&self, index: usize) -> Option<&SecretText> {
        self.stages[..index.min(self.stages.len())]
            .iter()
            .rev()
            .find_map(|s| match &s.action {
                Action::WriteConfig { content, .. } => Some(content),
                _ => None,
            })
            .or(self.original.as_ref())
    }
}

/// Why no plan could be made. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Nothing in the config fits the operation.
    #[error("{operation}: {message}")]
    NothingToDo {
        /// Operation name.
        operation: &'static str,
        /// Why, and what to do instead.
        message: String,
    },
    /// An argument does not fit the config.
    #[error("{operation}: {message}")]
    Conflict {
        /// Operation name.
        operation: &'static str,
        /// What conflicts.
        message: String,
    },
    /// A stage's config would not load in kube-apiserver.
    #[error("{operation}: the config for stage {stage:?} would be invalid: {source}")]
    Invalid {
        /// Operation name.
        operation: &'static str,
        /// Stage title.
        stage: String,
        /// The validation errors.
        #[source]
        source: storage_encryption::ConfigError,
    },
    /// The key generator failed.
    #[error(transparent)]
    Keygen(#[from] crate::keygen::KeygenError),
}

/// Makes a new key (tests pass a deterministic one).
pub type KeyGen<'a> = dyn FnMut() -> Result<SecretBytes, crate::keygen::KeygenError> + 'a;

/// Builds the plan for `op` from the current config (`None` when the hosts
/// have no config file yet) and, for `rotate-kek`, the keyring listing.
pub fn build(
    op: &Operation,
    current: Option<&EncryptionConfiguration>,
    keyring: Option<&Listing>,
    keygen: &mut KeyGen<'_>,
) -> Result<Plan, PlanError> {
    let name = op.name();
    let empty = EncryptionConfiguration {
        api_version: ConfigApiVersion::V1,
        resources: Vec::new(),
    };
    let base = current.cloned().unwrap_or(empty);
    let original = current
        .map(|c| c.render().map(SecretText::from))
        .transpose()
        .map_err(|source| PlanError::Invalid {
            operation: name,
            stage: "current config".into(),
            source,
        })?;
    let original_hash = original
        .as_ref()
        .map(|t| config_file_hash(t.expose().as_bytes()));
    let stages = match op {
        Operation::RotateKey => rotate_key(&base, keygen)?,
        Operation::RotateKek => rotate_kek(&base, keyring)?,
        Operation::Enable {
            provider,
            resources,
        } => enable(&base, provider, resources, keygen)?,
        Operation::ToKms { kms } => to_kms(&base, kms)?,
        Operation::SwitchKms { kms } => switch_kms(&base, kms)?,
        Operation::Disable => disable(&base)?,
    };
    Ok(Plan {
        operation: op.clone(),
        original,
        original_hash,
        keyring: if matches!(op, Operation::RotateKek) {
            keyring.cloned()
        } else {
            None
        },
        stages,
    })
}

fn write_stage(
    op: &'static str,
    title: String,
    config: &EncryptionConfiguration,
    gate: Option<Gate>,
) -> Result<Stage, PlanError> {
    let invalid = |source| PlanError::Invalid {
        operation: op,
        stage: title.clone(),
        source,
    };
    config.validate().map_err(invalid)?;
    let content = SecretText::from(config.render().map_err(invalid)?);
    let hash = config_file_hash(content.expose().as_bytes());
    Ok(Stage {
        title,
        gate,
        action: Action::WriteConfig { content, hash },
    })
}

fn is_keyed(p: &ProviderConfig) -> bool {
    p.keys().is_some()
}

fn resources_of(config: &EncryptionConfiguration, entries: &[usize]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for &i in entries {
        for r in &config.resources[i].resources {
            if seen.insert(r.clone()) {
                out.push(r.clone());
            }
        }
    }
    out
}

fn key_names(config: &EncryptionConfiguration) -> BTreeSet<String> {
    config
        .all_providers()
        .filter_map(|(_, _, p)| p.keys())
        .flatten()
        .map(|k| k.name.clone())
        .collect()
}

fn fresh_key_name(used: &mut BTreeSet<String>) -> String {
    let name = (1..)
        .map(|n| format!("key{n}"))
        .find(|n| !used.contains(n))
        .unwrap_or_else(|| "key".into());
    used.insert(name.clone());
    name
}

fn kms_names(config: &EncryptionConfiguration) -> BTreeSet<String> {
    config
        .all_providers()
        .filter_map(|(_, _, p)| match p {
            ProviderConfig::Kms(k) => Some(k.name.clone()),
            _ => None,
        })
        .collect()
}

/// KMS v2 names are unique across the file, so the n-th entry gets `name-n`.
fn kms_provider(spec: &KmsSpec, nth: usize) -> ProviderConfig {
    ProviderConfig::Kms(KmsConfig {
        api_version: KmsApiVersion::V2,
        name: if nth == 0 {
            spec.name.clone()
        } else {
            format!("{}-{}", spec.name, nth + 1)
        },
        endpoint: spec.endpoint.clone(),
        timeout: spec.timeout_secs.map(Duration::from_secs),
        cache_size: None,
    })
}

fn rewrite_stage(config: &EncryptionConfiguration, entries: &[usize]) -> Stage {
    let resources = resources_of(config, entries);
    Stage {
        title: format!(
            "rewrite every object of {} through the API",
            resources.join(", ")
        ),
        gate: None,
        action: Action::Rewrite { resources },
    }
}

/// The provider-level pattern: `new[i]` is added to entry `entries[i]` of
/// `shaped` as a reader, made first, everything is rewritten, then `finish`
/// edits each entry's providers for the last stage (behind the gate).
/// `shaped` is what the hosts have (`base`), possibly with a new entry that
/// changes no apiserver's behaviour (enable of a resource no entry names).
fn provider_swap(
    op: &'static str,
    base: &EncryptionConfiguration,
    shaped: &EncryptionConfiguration,
    entries: &[usize],
    new: &[ProviderConfig],
    finish: &dyn Fn(&[ProviderConfig], &ProviderConfig) -> Vec<ProviderConfig>,
    removes: Vec<String>,
) -> Result<Vec<Stage>, PlanError> {
    let label: Vec<String> = new
        .iter()
        .map(ProviderConfig::describe)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let label = label.join(", ");
    let mut stages = Vec::new();
    let mut readers = shaped.clone();
    for (&i, p) in entries.iter().zip(new) {
        if !readers.resources[i].providers.contains(p) {
            readers.resources[i].providers.insert(1, p.clone());
        }
    }
    if readers != *base {
        stages.push(write_stage(
            op,
            format!("add {label} as a reader (second provider) on every host"),
            &readers,
            None,
        )?);
    }
    let mut writers = readers.clone();
    for (&i, p) in entries.iter().zip(new) {
        let list = &mut writers.resources[i].providers;
        list.retain(|q| q != p);
        list.insert(0, p.clone());
    }
    stages.push(write_stage(
        op,
        format!("make {label} the first provider (it now writes) on every host"),
        &writers,
        None,
    )?);
    stages.push(rewrite_stage(&writers, entries));
    let mut last = writers.clone();
    for (&i, p) in entries.iter().zip(new) {
        last.resources[i].providers = finish(&writers.resources[i].providers, p);
    }
    let title = format!("remove {} on every host", removes.join(", "));
    stages.push(write_stage(
        op,
        title,
        &last,
        Some(Gate::ConfigRemoval { removes }),
    )?);
    Ok(stages)
}

fn rotate_key(
    base: &EncryptionConfiguration,
    keygen: &mut KeyGen<'_>,
) -> Result<Vec<Stage>, PlanError> {
    const OP: &str = "rotate-key";
    let entries: Vec<usize> = base
        .resources
        .iter()
        .enumerate()
        .filter(|(_, e)| e.providers.first().is_some_and(is_keyed))
        .map(|(i, _)| i)
        .collect();
    if entries.is_empty() {
        return Err(PlanError::NothingToDo {
            operation: OP,
            message: "no entry's first provider is aescbc, aesgcm or secretbox (use rotate-kek for a KMS plugin, enable to start encrypting)".into(),
        });
    }
    let mut used = key_names(base);
    let mut new_names = Vec::new();
    let mut old_names = Vec::new();
    let mut second = base.clone();
    for &i in &entries {
        let name = fresh_key_name(&mut used);
        let first = &mut second.resources[i].providers[0];
        let kind = first.type_name();
        let Some(keys) = first.keys_mut() else {
            continue;
        };
        for k in keys.iter() {
            old_names.push(format!("{kind} key {}", k.name));
        }
        new_names.push(format!("{kind} key {name}"));
        keys.insert(
            1,
            Key {
                name,
                secret: keygen()?,
            },
        );
    }
    let new_label = new_names.join(", ");
    let mut stages = vec![write_stage(
        OP,
        format!("add new {new_label} as the second key on every host"),
        &second,
        None,
    )?];
    let mut first = second.clone();
    for &i in &entries {
        if let Some(keys) = first.resources[i].providers[0].keys_mut() {
            let k = keys.remove(1);
            keys.insert(0, k);
        }
    }
    stages.push(write_stage(
        OP,
        format!("make {new_label} the first key (it now writes) on every host"),
        &first,
        None,
    )?);
    stages.push(rewrite_stage(&first, &entries));
    let mut last = first.clone();
    for &i in &entries {
        if let Some(keys) = last.resources[i].providers[0].keys_mut() {
            keys.truncate(1);
        }
    }
    let title = format!("remove old {} on every host", old_names.join(", "));
    stages.push(write_stage(
        OP,
        title,
        &last,
        Some(Gate::ConfigRemoval { removes: old_names }),
    )?);
    Ok(stages)
}

fn rotate_kek(
    base: &EncryptionConfiguration,
    keyring: Option<&Listing>,
) -> Result<Vec<Stage>, PlanError> {
    const OP: &str = "rotate-kek";
    let entries: Vec<usize> = base
        .resources
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.providers.first(), Some(ProviderConfig::Kms(k)) if k.api_version == KmsApiVersion::V2))
        .map(|(i, _)| i)
        .collect();
    if entries.is_empty() {
        return Err(PlanError::NothingToDo {
            operation: OP,
            message: "no entry's first provider is a KMS v2 provider (use to-kms first)".into(),
        });
    }
    let Some(info) = keyring else {
        return Err(PlanError::Conflict {
            operation: OP,
            message: "every host needs a keyring path in the rotator config".into(),
        });
    };
    let Some(old) = info.primary_kek() else {
        return Err(PlanError::Conflict {
            operation: OP,
            message: format!(
                "the keyring lists no primary KEK (primary {})",
                info.primary
            ),
        });
    };
    let old = old.kek;
    Ok(vec![
        Stage {
            title: "add a new KEK (decrypt-only) to the keyring and copy it to every host".into(),
            gate: None,
            action: Action::Keyring {
                step: KeyringStep::AddKek,
            },
        },
        Stage {
            title: "promote the new KEK to primary and copy the keyring to every host".into(),
            gate: None,
            action: Action::Keyring {
                step: KeyringStep::PromoteNewKek,
            },
        },
        rewrite_stage(base, &entries),
        Stage {
            title: format!("retire the old KEK {old} and copy the keyring to every host"),
            gate: Some(Gate::KekRetire),
            action: Action::Keyring {
                step: KeyringStep::RetireOldKek,
            },
        },
    ])
}

fn enable(
    base: &EncryptionConfiguration,
    provider: &NewProvider,
    resources: &[String],
    keygen: &mut KeyGen<'_>,
) -> Result<Vec<Stage>, PlanError> {
    const OP: &str = "enable";
    if resources.is_empty() {
        return Err(PlanError::Conflict {
            operation: OP,
            message: "name at least one resource".into(),
        });
    }
    let mut config = base.clone();
    let mut entries: Vec<usize> = Vec::new();
    let mut unnamed: Vec<(String, Vec<ProviderConfig>)> = Vec::new();
    for r in resources {
        let gr = GroupResource::parse(r);
        let found = config
            .resources
            .iter()
            .position(|e| e.resources.iter().any(|n| GroupResource::parse(n) == gr));
        match found {
            Some(i) => {
                if !matches!(
                    config.resources[i].providers.first(),
                    Some(ProviderConfig::Identity)
                ) {
                    return Err(PlanError::Conflict {
                        operation: OP,
                        message: format!(
                            "{r} is already encrypted by {} (entry {i}); use rotate-key, to-kms or switch-kms",
                            config.resources[i]
                                .providers
                                .first()
                                .map(ProviderConfig::describe)
                                .unwrap_or_default()
                        ),
                    });
                }
                if !entries.contains(&i) {
                    entries.push(i);
                }
            }
            None => {
                let m = config.providers_for(&gr);
                if let Some(first) = m.providers.first()
                    && !matches!(first, ProviderConfig::Identity)
                {
                    return Err(PlanError::Conflict {
                        operation: OP,
                        message: format!(
                            "{r} is already encrypted by {} through a wildcard rule",
                            first.describe()
                        ),
                    });
                }
                let providers: Vec<ProviderConfig> = if m.providers.is_empty() {
                    vec![ProviderConfig::Identity]
                } else {
                    m.providers.into_iter().cloned().collect()
                };
                unnamed.push((r.clone(), providers));
            }
        }
    }
    // Resources no entry names get one new entry in front (specific entries
    // must come before wildcards); their current providers are kept, so the
    // new entry changes nothing until the stages below.
    if !unnamed.is_empty() {
        let providers = unnamed[0].1.clone();
        let (same, other): (Vec<_>, Vec<_>) =
            unnamed.into_iter().partition(|(_, p)| *p == providers);
        if !other.is_empty() {
            return Err(PlanError::Conflict {
                operation: OP,
                message: format!(
                    "{} and {} are matched by different rules today; enable them in separate runs",
                    same[0].0, other[0].0
                ),
            });
        }
        entries.iter_mut().for_each(|i| *i += 1);
        config.resources.insert(
            0,
            ResourceConfig {
                resources: same.into_iter().map(|(r, _)| r).collect(),
                providers,
            },
        );
        entries.insert(0, 0);
    }
    let mut used = key_names(&config);
    let mut new = Vec::new();
    for nth in 0..entries.len() {
        new.push(match provider {
            NewProvider::Kms(spec) => {
                if kms_names(&config).contains(&spec.name) {
                    return Err(PlanError::Conflict {
                        operation: OP,
                        message: format!(
                            "the config already has a KMS provider named {:?}",
                            spec.name
                        ),
                    });
                }
                kms_provider(spec, nth)
            }
            local => {
                let keys = KeysConfig {
                    keys: vec![Key {
                        name: fresh_key_name(&mut used),
                        secret: keygen()?,
                    }],
                };
                match local {
                    NewProvider::Aescbc => ProviderConfig::AesCbc(keys),
                    NewProvider::Aesgcm => ProviderConfig::AesGcm(keys),
                    _ => ProviderConfig::Secretbox(keys),
                }
            }
        });
    }
    let finish = |list: &[ProviderConfig], _new: &ProviderConfig| -> Vec<ProviderConfig> {
        list.iter()
            .filter(|p| !matches!(p, ProviderConfig::Identity))
            .cloned()
            .collect()
    };
    provider_swap(
        OP,
        base,
        &config,
        &entries,
        &new,
        &finish,
        vec!["identity".into()],
    )
}

fn first_provider_entries(
    base: &EncryptionConfiguration,
    pred: impl Fn(&ProviderConfig) -> bool,
) -> Vec<usize> {
    base.resources
        .iter()
        .enumerate()
        .filter(|(_, e)| e.providers.first().is_some_and(&pred))
        .map(|(i, _)| i)
        .collect()
}

fn old_firsts(base: &EncryptionConfiguration, entries: &[usize]) -> Vec<String> {
    let set: BTreeSet<String> = entries
        .iter()
        .map(|&i| base.resources[i].providers[0].describe())
        .collect();
    set.into_iter().collect()
}

fn to_kms(base: &EncryptionConfiguration, spec: &KmsSpec) -> Result<Vec<Stage>, PlanError> {
    const OP: &str = "to-kms";
    let entries = first_provider_entries(base, is_keyed);
    if entries.is_empty() {
        return Err(PlanError::NothingToDo {
            operation: OP,
            message: "no entry's first provider is aescbc, aesgcm or secretbox (use enable --provider kms for plaintext resources)".into(),
        });
    }
    kms_swap(OP, base, spec, &entries)
}

fn switch_kms(base: &EncryptionConfiguration, spec: &KmsSpec) -> Result<Vec<Stage>, PlanError> {
    const OP: &str = "switch-kms";
    let entries = first_provider_entries(base, |p| matches!(p, ProviderConfig::Kms(_)));
    if entries.is_empty() {
        return Err(PlanError::NothingToDo {
            operation: OP,
            message: "no entry's first provider is a KMS provider (use to-kms)".into(),
        });
    }
    kms_swap(OP, base, spec, &entries)
}

fn kms_swap(
    op: &'static str,
    base: &EncryptionConfiguration,
    spec: &KmsSpec,
    entries: &[usize],
) -> Result<Vec<Stage>, PlanError> {
    let names = kms_names(base);
    let new: Vec<ProviderConfig> = (0..entries.len()).map(|n| kms_provider(spec, n)).collect();
    for p in &new {
        if let ProviderConfig::Kms(k) = p
            && names.contains(&k.name)
        {
            return Err(PlanError::Conflict {
                operation: op,
                message: format!(
                    "the config already has a KMS provider named {:?}; choose another --kms-name",
                    k.name
                ),
            });
        }
    }
    let removes = old_firsts(base, entries);
    let olds: Vec<ProviderConfig> = entries
        .iter()
        .map(|&i| base.resources[i].providers[0].clone())
        .collect();
    let finish = move |list: &[ProviderConfig], _new: &ProviderConfig| -> Vec<ProviderConfig> {
        list.iter().filter(|p| !olds.contains(p)).cloned().collect()
    };
    provider_swap(op, base, base, entries, &new, &finish, removes)
}

fn disable(base: &EncryptionConfiguration) -> Result<Vec<Stage>, PlanError> {
    const OP: &str = "disable";
    let entries = first_provider_entries(base, |p| !matches!(p, ProviderConfig::Identity));
    if entries.is_empty() {
        return Err(PlanError::NothingToDo {
            operation: OP,
            message: "no entry encrypts anything".into(),
        });
    }
    let mut removes: BTreeSet<String> = BTreeSet::new();
    for &i in &entries {
        for p in &base.resources[i].providers {
            if !matches!(p, ProviderConfig::Identity) {
                removes.insert(p.describe());
            }
        }
    }
    let new = vec![ProviderConfig::Identity; entries.len()];
    let finish = |_: &[ProviderConfig], _: &ProviderConfig| vec![ProviderConfig::Identity];
    provider_swap(
        OP,
        base,
        base,
        &entries,
        &new,
        &finish,
        removes.into_iter().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::keyring::{KekInfo, KekState};

    const B64: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    fn cfg(body: &str) -> EncryptionConfiguration {
        EncryptionConfiguration::parse(&format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n{body}"
        ))
        .unwrap()
    }

    fn keygen() -> impl FnMut() -> Result<SecretBytes, crate::keygen::KeygenError> {
        let mut n = 0u8;
        move || {
            n += 1;
            Ok(SecretBytes::new(vec![n; 32]))
        }
    }

    fn configs(plan: &Plan) -> Vec<EncryptionConfiguration> {
        plan.stages
            .iter()
            .filter_map(|s| match &s.action {
                Action::WriteConfig { content, hash } => {
                    assert_eq!(*hash, config_file_hash(content.expose().as_bytes()));
                    Some(EncryptionConfiguration::parse(content.expose()).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    /// What writes `resource`: provider type and first key name (or kms name).
    fn writer(c: &EncryptionConfiguration, resource: &str) -> (String, String) {
        let m = c.providers_for(&GroupResource::parse(resource));
        describe_first(m.providers.first().copied())
    }

    fn describe_first(p: Option<&ProviderConfig>) -> (String, String) {
        match p {
            None | Some(ProviderConfig::Identity) => ("identity".into(), String::new()),
            Some(ProviderConfig::Kms(k)) => ("kms".into(), k.name.clone()),
            Some(p) => (
                p.type_name().into(),
                p.keys()
                    .and_then(|k| k.first())
                    .map(|k| k.name.clone())
                    .unwrap_or_default(),
            ),
        }
    }

    /// Every (type, key/kms name) `c` can read for `resource`.
    fn readers(c: &EncryptionConfiguration, resource: &str) -> BTreeSet<(String, String)> {
        let m = c.providers_for(&GroupResource::parse(resource));
        if m.providers.is_empty() {
            return [("identity".to_string(), String::new())].into();
        }
        let mut out = BTreeSet::new();
        for p in m.providers {
            match p {
                ProviderConfig::Identity => {
                    out.insert(("identity".into(), String::new()));
                }
                ProviderConfig::Kms(k) => {
                    out.insert(("kms".into(), k.name.clone()));
                }
                p => {
                    for k in p.keys().unwrap_or_default() {
                        out.insert((p.type_name().into(), k.name.clone()));
                    }
                }
            }
        }
        out
    }

    /// The spec's rule: during a rollout half the apiservers run config i and
    /// half i+1, so each side must read what the other writes. Removal (the
    /// last config) comes after the rewrite and is checked by the gate instead.
    fn assert_safe(base: Option<&EncryptionConfiguration>, plan: &Plan, resources: &[&str]) {
        let mut all: Vec<EncryptionConfiguration> = base.cloned().into_iter().collect();
        all.extend(configs(plan));
        let last = all.len() - 1;
        for (i, pair) in all.windows(2).enumerate() {
            if i + 1 == last {
                // The removal stage: the new writer must stay readable by the old config.
                for r in resources {
                    assert!(
                        readers(&pair[0], r).contains(&writer(&pair[1], r)),
                        "removal stage: {r}"
                    );
                }
                continue;
            }
            for r in resources {
                assert!(
                    readers(&pair[1], r).contains(&writer(&pair[0], r)),
                    "stage {} cannot read old writes of {r}",
                    i + 1
                );
                assert!(
                    readers(&pair[0], r).contains(&writer(&pair[1], r)),
                    "stage {} writes what old cannot read ({r})",
                    i + 1
                );
            }
        }
        // The plan ends with the gate + removal, preceded by a rewrite.
        let n = plan.stages.len();
        assert!(plan.stages[n - 1].gate.is_some(), "last stage has no gate");
        assert!(matches!(plan.stages[n - 2].action, Action::Rewrite { .. }));
        assert!(plan.stages[..n - 1].iter().all(|s| s.gate.is_none()));
    }

    #[test]
    fn rotate_key_follows_the_spec() {
        let base = cfg(&format!(
            "- resources: [secrets]\n  providers:\n  - aescbc:\n      keys:\n      - name: key1\n        secret: {B64}\n  - identity: {{}}\n"
        ));
        let plan = build(&Operation::RotateKey, Some(&base), None, &mut keygen()).unwrap();
        assert_eq!(plan.stages.len(), 4);
        let c = configs(&plan);
        let names = |c: &EncryptionConfiguration| -> Vec<String> {
            c.resources[0].providers[0]
                .keys()
                .unwrap()
                .iter()
                .map(|k| k.name.clone())
                .collect()
        };
        assert_eq!(names(&c[0]), ["key1", "key2"]);
        assert_eq!(names(&c[1]), ["key2", "key1"]);
        assert_eq!(names(&c[2]), ["key2"]);
        // identity stays.
        assert_eq!(c[2].resources[0].providers.len(), 2);
        // The generated key is the same in every stage.
        let secret = |c: &EncryptionConfiguration, i: usize| {
            c.resources[0].providers[0].keys().unwrap()[i]
                .secret
                .clone()
        };
        assert_eq!(secret(&c[0], 1), secret(&c[1], 0));
        assert_eq!(secret(&c[1], 0), secret(&c[2], 0));
        assert_eq!(secret(&c[2], 0).expose(), &[1u8; 32][..]);
        assert!(
            matches!(&plan.stages[2].action, Action::Rewrite { resources } if resources == &["secrets"])
        );
        assert!(
            matches!(&plan.stages[3].gate, Some(Gate::ConfigRemoval { removes }) if removes == &["aescbc key key1"])
        );
        assert_safe(Some(&base), &plan, &["secrets", "configmaps"]);
        // The plan's Debug never shows key material.
        let dbg = format!("{plan:?}");
        assert!(
            !dbg.contains(B64) && !dbg.contains("AQEBAQEB"),
            "key in Debug"
        );
    }

    #[test]
    fn enable_from_no_config_and_from_identity() {
        let op = Operation::Enable {
            provider: NewProvider::Secretbox,
            resources: vec!["secrets".into(), "configmaps".into()],
        };
        let plan = build(&op, None, None, &mut keygen()).unwrap();
        assert!(plan.original.is_none());
        let c = configs(&plan);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].resources[0].resources, ["secrets", "configmaps"]);
        assert_eq!(
            describe_first(c[0].resources[0].providers.first()),
            ("identity".into(), String::new())
        );
        assert_eq!(
            describe_first(c[1].resources[0].providers.first()),
            ("secretbox".into(), "key1".into())
        );
        assert_eq!(c[2].resources[0].providers.len(), 1);
        assert_safe(None, &plan, &["secrets", "configmaps", "pods"]);

        let base = cfg("- resources: [secrets]\n  providers:\n  - identity: {}\n");
        let op = Operation::Enable {
            provider: NewProvider::Aesgcm,
            resources: vec!["secrets".into()],
        };
        let plan = build(&op, Some(&base), None, &mut keygen()).unwrap();
        assert_eq!(configs(&plan)[0].resources.len(), 1);
        assert_safe(Some(&base), &plan, &["secrets"]);
    }

    #[test]
    fn enable_refuses_what_is_already_encrypted() {
        let base = cfg(&format!(
            "- resources: ['*.*']\n  providers:\n  - aescbc:\n      keys:\n      - name: k\n        secret: {B64}\n"
        ));
        let op = Operation::Enable {
            provider: NewProvider::Aescbc,
            resources: vec!["secrets".into()],
        };
        let e = build(&op, Some(&base), None, &mut keygen())
            .unwrap_err()
            .to_string();
        assert!(e.contains("secrets") && e.contains("wildcard"), "{e}");
        let base = cfg(&format!(
            "- resources: [secrets]\n  providers:\n  - aescbc:\n      keys:\n      - name: k\n        secret: {B64}\n"
        ));
        let e = build(&op, Some(&base), None, &mut keygen())
            .unwrap_err()
            .to_string();
        assert!(e.contains("rotate-key"), "{e}");
    }

    fn kms(name: &str) -> KmsSpec {
        KmsSpec {
            name: name.into(),
            endpoint: format!("unix:///run/{name}.sock"),
            timeout_secs: Some(3),
        }
    }

    #[test]
    fn to_kms_switch_kms_and_disable() {
        let base = cfg(&format!(
            "- resources: [secrets, configmaps]\n  providers:\n  - aescbc:\n      keys:\n      - name: key1\n        secret: {B64}\n  - identity: {{}}\n"
        ));
        let plan = build(
            &Operation::ToKms { kms: kms("p1") },
            Some(&base),
            None,
            &mut keygen(),
        )
        .unwrap();
        let c = configs(&plan);
        assert_eq!(writer(&c[1], "secrets"), ("kms".into(), "p1".into()));
        assert_eq!(
            c[2].resources[0].providers.len(),
            2,
            "aescbc removed, identity kept"
        );
        assert_safe(Some(&base), &plan, &["secrets", "configmaps"]);

        let on_kms = c[2].clone();
        let plan = build(
            &Operation::SwitchKms { kms: kms("p2") },
            Some(&on_kms),
            None,
            &mut keygen(),
        )
        .unwrap();
        let c = configs(&plan);
        assert_eq!(writer(&c[1], "configmaps"), ("kms".into(), "p2".into()));
        assert!(readers(&c[2], "secrets").iter().all(|(_, n)| n != "p1"));
        assert_safe(Some(&on_kms), &plan, &["secrets", "configmaps"]);
        let e = build(
            &Operation::SwitchKms { kms: kms("p1") },
            Some(&on_kms),
            None,
            &mut keygen(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("p1"), "{e}");

        let plan = build(&Operation::Disable, Some(&base), None, &mut keygen()).unwrap();
        let c = configs(&plan);
        // identity is already a reader, so the plan starts by making it first.
        assert_eq!(c.len(), 2);
        assert_eq!(writer(&c[0], "secrets").0, "identity");
        assert_eq!(c[1].resources[0].providers, vec![ProviderConfig::Identity]);
        assert_safe(Some(&base), &plan, &["secrets"]);
        assert!(build(&Operation::Disable, Some(&c[1]), None, &mut keygen()).is_err());
    }

    #[test]
    fn rotate_kek_stages() {
        let base = cfg(
            "- resources: [secrets]\n  providers:\n  - kms:\n      apiVersion: v2\n      name: p\n      endpoint: unix:///x.sock\n  - identity: {}\n",
        );
        let info = Listing {
            format: ::keyring::LISTING_FORMAT.into(),
            lineage: None,
            generation: 1,
            primary: 1,
            key_id: "id1".into(),
            keks: vec![KekInfo {
                kek: 1,
                state: KekState::Primary,
                created: "2026-01-01T00:00:00Z".into(),
                fingerprint: "f1".into(),
                key_id: Some("id1".into()),
                key_ids: vec!["id1".into()],
                kind: "local".into(),
                pkcs11: None,
            }],
        };
        assert!(build(&Operation::RotateKek, Some(&base), None, &mut keygen()).is_err());
        let plan = build(
            &Operation::RotateKek,
            Some(&base),
            Some(&info),
            &mut keygen(),
        )
        .unwrap();
        let steps: Vec<_> = plan
            .stages
            .iter()
            .map(|s| match &s.action {
                Action::Keyring { step } => format!("{step:?}"),
                Action::Rewrite { .. } => "Rewrite".into(),
                Action::WriteConfig { .. } => "Write".into(),
            })
            .collect();
        assert_eq!(
            steps,
            ["AddKek", "PromoteNewKek", "Rewrite", "RetireOldKek"]
        );
        assert_eq!(plan.stages[3].gate, Some(Gate::KekRetire));
        let local = cfg(&format!(
            "- resources: [secrets]\n  providers:\n  - aescbc:\n      keys:\n      - name: k\n        secret: {B64}\n"
        ));
        assert!(
            build(
                &Operation::RotateKek,
                Some(&local),
                Some(&info),
                &mut keygen()
            )
            .is_err()
        );
    }

    #[test]
    fn config_before_walks_back() {
        let base = cfg(&format!(
            "- resources: [secrets]\n  providers:\n  - aescbc:\n      keys:\n      - name: key1\n        secret: {B64}\n"
        ));
        let plan = build(&Operation::RotateKey, Some(&base), None, &mut keygen()).unwrap();
        assert_eq!(plan.config_before(0), plan.original.as_ref());
        let Action::WriteConfig { content, .. } = &plan.stages[1].action else {
            panic!()
        };
        assert_eq!(plan.config_before(3), Some(content));
    }

    fn provider_strategy() -> impl proptest::strategy::Strategy<Value = ProviderConfig> {
        use proptest::prelude::*;
        let key = |n: u8| Key {
            name: format!("k{n}"),
            secret: SecretBytes::new(vec![n; 32]),
        };
        prop_oneof![
            Just(ProviderConfig::Identity),
            (1u8..4).prop_map(move |n| ProviderConfig::AesCbc(KeysConfig { keys: vec![key(n)] })),
            (1u8..4, 4u8..6).prop_map(move |(a, b)| ProviderConfig::AesGcm(KeysConfig {
                keys: vec![key(a), key(b)]
            })),
            (1u8..4)
                .prop_map(move |n| ProviderConfig::Secretbox(KeysConfig { keys: vec![key(n)] })),
            (0u8..3).prop_map(|n| ProviderConfig::Kms(KmsConfig {
                api_version: KmsApiVersion::V2,
                name: format!("old{n}"),
                endpoint: "unix:///run/old.sock".into(),
                timeout: None,
                cache_size: None,
            })),
        ]
    }

    const POOL: [&str; 4] = ["secrets", "configmaps", "deployments.apps", "*.apps"];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// For any valid config, every operation either refuses with an error or
        /// yields a plan in which each rollout step keeps every value readable.
        #[test]
        fn every_plan_of_any_config_is_safe(
            entries in proptest::collection::vec(
                (proptest::sample::subsequence(vec![0usize, 1, 2], 1..3),
                 proptest::collection::vec(provider_strategy(), 1..4)),
                1..3),
        ) {
            // Entries get disjoint resource names; `*.apps` (index 3) goes last when used.
            let mut used = BTreeSet::new();
            let mut resources = Vec::new();
            for (names, providers) in entries {
                let names: Vec<String> = names.into_iter().filter(|n| used.insert(*n)).map(|n| POOL[n].to_string()).collect();
                if !names.is_empty() {
                    resources.push(ResourceConfig { resources: names, providers });
                }
            }
            resources.push(ResourceConfig { resources: vec![POOL[3].into()], providers: vec![ProviderConfig::Identity] });
            let base = EncryptionConfiguration { api_version: ConfigApiVersion::V1, resources };
            proptest::prop_assume!(base.validate().is_ok());
            let ops = [
                Operation::RotateKey,
                Operation::Disable,
                Operation::ToKms { kms: kms("new") },
                Operation::SwitchKms { kms: kms("new") },
                Operation::Enable { provider: NewProvider::Aescbc, resources: vec!["secrets".into()] },
                Operation::Enable { provider: NewProvider::Kms(kms("new")), resources: vec!["replicasets.apps".into()] },
            ];
            for op in &ops {
                if let Ok(plan) = build(op, Some(&base), None, &mut keygen()) {
                    assert_safe(Some(&base), &plan, &["secrets", "configmaps", "deployments.apps", "replicasets.apps", "pods"]);
                }
            }
        }
    }
}
