//! `--needs`: what the scanned values need to be read back — for a backup
//! catalogue, so a key is never retired while a kept backup needs it.
//! One line per provider and key (KMS v2: provider name and key_id; KMS v1:
//! provider name; aescbc/aesgcm/secretbox: key name and a fingerprint of the
//! key from `--config`, never the key itself), with a value count.

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

fn config_fingerprints(
    config: Option<&EncryptionConfiguration>,
) -> BTreeMap<(ProviderKind, String), BTreeSet<String>> {
    let mut out: BTreeMap<(ProviderKind, String), BTreeSet<String>> = BTreeMap::new();
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

/// Collects needs from records; prints them at the end.
#[derive(Debug)]
pub struct NeedsReporter<W: Write> {
    out: W,
    format: OutputFormat,
    fingerprints: BTreeMap<(ProviderKind, String), BTreeSet<String>>,
    needs: BTreeMap<NeedKey, u64>,
}

impl<W: Write> NeedsReporter<W> {
    /// Writes to `out` as a table (`table`, `junit`) or JSON.
    pub fn new(out: W, format: OutputFormat, config: Option<&EncryptionConfiguration>) -> Self {
        NeedsReporter {
            out,
            format,
            fingerprints: config_fingerprints(config),
            needs: BTreeMap::new(),
        }
    }

    /// The needs so far, in a stable order.
    pub fn needs(&self) -> Vec<Need> {
        self.needs
            .iter()
            .map(|((provider, provider_name, key_name, key_id), n)| Need {
                provider: *provider,
                provider_name: provider_name.clone(),
                key_name: key_name.clone(),
                key_id: key_id.clone(),
                fingerprints: key_name
                    .as_ref()
                    .and_then(|k| self.fingerprints.get(&(*provider, k.clone())))
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
                values: *n,
            })
            .collect()
    }
}

impl<W: Write> Reporter for NeedsReporter<W> {
    fn begin(&mut self, _meta: &ScanMeta) -> io::Result<()> {
        Ok(())
    }

    fn record(&mut self, r: &Record) -> io::Result<()> {
        // An undecodable value cannot be read with any key.
        if r.finding == Some(Finding::Undecodable) {
            return Ok(());
        }
        match r.actual.provider {
            None | Some(ProviderKind::Identity) => {}
            Some(kind) => {
                let key = (
                    kind,
                    r.actual.provider_name.clone(),
                    r.actual.key_name.clone(),
                    r.key_id.clone(),
                );
                *self.needs.entry(key).or_default() += 1;
            }
        }
        Ok(())
    }

    fn finish(&mut self, meta: &ScanMeta, summary: &Summary) -> io::Result<()> {
        let needs = self.needs();
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
        if needs.is_empty() {
            writeln!(out, "  no key (every value is plaintext)")?;
        }
        for n in &needs {
            let name = n
                .provider_name
                .as_deref()
                .or(n.key_name.as_deref())
                .unwrap_or("-");
            let what = match (&n.key_id, n.provider) {
                (Some(id), _) => format!("key_id {id}"),
                (None, ProviderKind::KmsV1) => "(the plugin's key)".to_owned(),
                (None, _) if n.fingerprints.is_empty() => {
                    "fingerprint unknown: key not in --config".to_owned()
                }
                (None, _) => n.fingerprints.join(","),
            };
            // Names and key_ids come from what etcd holds: escaped for the terminal.
            writeln!(
                out,
                "  {:<9} {}  {}  ({} values)",
                n.provider.as_str(),
                escape_control(name),
                escape_control(&what),
                n.values
            )?;
        }
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
