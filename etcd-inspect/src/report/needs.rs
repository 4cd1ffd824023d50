//! `--needs`: what the scanned values need to be read back — for a backup
//! catalogue, so a key is never retired while a kept backup needs it.
//! One line per provider and key (KMS v2: provider name and key_id; KMS v1:
//! provider name; aescbc/aesgcm/secretbox: key name and a fingerprint of the
//! key from `--config`, never the key itself), with a value count.
//!
//! The list is derived from the [`Summary`] (its rows already count values
//! by stored provider, key and key_id), so every report — table, JSON,
//! JUnit, live or snapshot — carries the same list as `--needs`.

use cli_kit::escape::escape_control;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};

use serde::Serialize;
use sha2::{Digest, Sha256};
use storage_encryption::{EncryptionConfiguration, ProviderConfig};

use super::{Reporter, ScanMeta, nothing_judged};
use crate::cli::OutputFormat;
use crate::record::{Finding, ProviderKind, Record};
use crate::summary::Summary;

/// A key (or KMS key_id) that some values need.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Need {
    /// Provider type.
    pub provider: ProviderKind,
    /// KMS provider name.
    pub provider_name: Option<String>,
    /// Key name (aescbc, aesgcm, secretbox).
    pub key_name: Option<String>,
    /// KMS v2 key_id.
    pub key_id: Option<String>,
    /// `sha256:<32 hex>` fingerprints of the config's keys of this type and
    /// name (several when the config has the same name with different keys);
    /// empty when the config has no such key or without `--config`.
    pub fingerprints: Vec<String>,
    /// Values that need it.
    pub values: u64,
}

/// Fingerprint of a key: SHA-256 over a domain tag, the provider type and
/// the key bytes, first 16 bytes in hex. Identifies the key; reveals nothing.
pub fn key_fingerprint(kind: ProviderKind, secret: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"atrest key fingerprint v1\0");
    h.update(kind.as_str().as_bytes());
    h.update([0]);
    h.update(secret);
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// `sha256:` fingerprints of a config's aescbc/aesgcm/secretbox keys, by
/// provider type and key name: what every report's needs list names a key
/// with (see [`ScanMeta::fingerprints`]).
pub type Fingerprints = BTreeMap<(ProviderKind, String), BTreeSet<String>>;

/// The fingerprints of every aescbc/aesgcm/secretbox key in `config`.
pub fn config_fingerprints(config: Option<&EncryptionConfiguration>) -> Fingerprints {
    let mut out: Fingerprints = BTreeMap::new();
    let Some(config) = config else {
        return out;
    };
    for (_, _, p) in config.all_providers() {
        let kind = match p {
            ProviderConfig::AesCbc(_) => ProviderKind::AesCbc,
            ProviderConfig::AesGcm(_) => ProviderKind::AesGcm,
            ProviderConfig::Secretbox(_) => ProviderKind::Secretbox,
            _ => continue,
        };
        for k in p.keys().unwrap_or_default() {
            out.entry((kind, k.name.clone()))
                .or_default()
                .insert(key_fingerprint(kind, k.secret.expose()));
        }
    }
    out
}

/// Provider, KMS provider name, key name, KMS v2 key_id.
type NeedKey = (ProviderKind, Option<String>, Option<String>, Option<String>);

/// What the values counted in `summary` need to be read back, in a stable
/// order: one entry per provider and key. Plaintext needs nothing, and an
/// undecodable value cannot be read with any key. The one implementation
/// behind `--needs` and the needs list of every report.
pub fn needs(summary: &Summary, fingerprints: &Fingerprints) -> Vec<Need> {
    let mut by_key: BTreeMap<NeedKey, u64> = BTreeMap::new();
    for (row, stats) in summary.rows() {
        if row.finding == Some(Finding::Undecodable) {
            continue;
        }
        match row.actual.provider {
            None | Some(ProviderKind::Identity) => {}
            Some(kind) => {
                let key = (
                    kind,
                    row.actual.provider_name.clone(),
                    row.actual.key_name.clone(),
                    row.key_id.clone(),
                );
                *by_key.entry(key).or_default() += stats.count;
            }
        }
    }
    by_key
        .into_iter()
        .map(|((provider, provider_name, key_name, key_id), n)| Need {
            fingerprints: key_name
                .as_ref()
                .and_then(|k| fingerprints.get(&(provider, k.clone())))
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default(),
            provider,
            provider_name,
            key_name,
            key_id,
            values: n,
        })
        .collect()
}

/// Writes the needs as indented lines (`  aesgcm    k1  sha256:..  (3 values)`),
/// the same in `--needs` and in the table report.
pub fn write_lines(out: &mut impl Write, needs: &[Need]) -> io::Result<()> {
    if needs.is_empty() {
        writeln!(out, "  no key (every value is plaintext)")?;
    }
    for n in needs {
        let name = n
            .provider_name
            .as_deref()
            .or(n.key_name.as_deref())
            .unwrap_or("-");
        // Names and key_ids come from what etcd holds: escaped for the terminal.
        writeln!(
            out,
            "  {:<9} {}  {}  ({} values)",
            n.provider.as_str(),
            escape_control(name),
            escape_control(&n.what()),
            n.values
        )?;
    }
    Ok(())
}

impl Need {
    /// What identifies the key: the KMS v2 key_id, the KMS v1 plugin's key,
    /// or the fingerprints of the config's key of this name.
    pub fn what(&self) -> String {
        match (&self.key_id, self.provider) {
            (Some(id), _) => format!("key_id {id}"),
            (None, ProviderKind::KmsV1) => "(the plugin's key)".to_owned(),
            (None, _) if self.fingerprints.is_empty() => {
                "fingerprint unknown: key not in --config".to_owned()
            }
            (None, _) => self.fingerprints.join(","),
        }
    }

    /// A one-line label: `aesgcm k1 sha256:…`, `kms-v2 my-plugin key_id …`.
    pub fn label(&self) -> String {
        let name = self
            .provider_name
            .as_deref()
            .or(self.key_name.as_deref())
            .unwrap_or("-");
        format!("{} {name} {}", self.provider.as_str(), self.what())
    }
}

/// `--needs`: prints only the needs list.
#[derive(Debug)]
pub struct NeedsReporter<W: Write> {
    out: W,
    format: OutputFormat,
}

impl<W: Write> NeedsReporter<W> {
    /// Writes to `out` as a table (`table`, `junit`) or JSON.
    pub fn new(out: W, format: OutputFormat) -> Self {
        NeedsReporter { out, format }
    }
}

impl<W: Write> Reporter for NeedsReporter<W> {
    fn begin(&mut self, _meta: &ScanMeta) -> io::Result<()> {
        Ok(())
    }

    fn record(&mut self, _r: &Record) -> io::Result<()> {
        Ok(())
    }

    fn finish(&mut self, meta: &ScanMeta, summary: &Summary) -> io::Result<()> {
        let needs = needs(summary, &meta.fingerprints);
        let error = nothing_judged(meta, summary);
        if self.format == OutputFormat::Json {
            let doc = serde_json::json!({
                "prefix": meta.prefix,
                "snapshot": meta.snapshot,
                "revision": meta.revision,
                "keys": summary.total(),
                "needs": needs,
                "error": error,
            });
            serde_json::to_writer(&mut self.out, &doc)?;
            self.out.write_all(b"\n")?;
            return self.out.flush();
        }
        let out = &mut self.out;
        let source = meta
            .snapshot
            .as_ref()
            .map(|s| format!(" of {s}"))
            .unwrap_or_default();
        writeln!(
            out,
            "{} keys under {} at revision {}{source} need:",
            summary.total(),
            escape_control(&meta.prefix),
            meta.revision
        )?;
        write_lines(out, &needs)?;
        if let Some(why) = error {
            writeln!(out, "error: {why}")?;
        }
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_stable_and_never_the_key() {
        let k = [7u8; 32];
        let f = key_fingerprint(ProviderKind::AesGcm, &k);
        assert_eq!(f, key_fingerprint(ProviderKind::AesGcm, &k));
        assert_ne!(f, key_fingerprint(ProviderKind::AesCbc, &k));
        assert_eq!(f.len(), "sha256:".len() + 32);
        assert!(!f.contains("0707070707"));
    }
}
