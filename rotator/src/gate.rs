//! The last gate: before anything is removed (an old key, a provider, a KEK),
//! an etcd audit with etcd-inspect's library must find no stored value that
//! still needs it. Otherwise the rotator stops and shows which keys do.
//!
//! - Config removal: every value is judged twice with etcd-inspect's
//!   [`Auditor`], against the config in force and the config about to be
//!   written; a value readable now (`ok`, `stale`, `kms-key-stale`,
//!   `plaintext`) but `unreadable` or `undecodable` afterwards blocks.
//! - KEK retirement: a KMS v2 value whose `keyID` is one of the old KEK's
//!   key_ids blocks.
//!
//! The kept backups of the config's `backups:` list (snapshot files, or
//! directories of them) are read the same way, in-process with
//! etcd-inspect's snapshot reader at each file's latest revision, and judged
//! by the same rule: a backup that still needs what is removed would not
//! restore, so it blocks too, named with what it needs (etcd-inspect's needs
//! list: provider, key name and fingerprint, or KMS key_id) — unless the run
//! allows unrestorable backups (`--allow-unrestorable-backups`, recorded in
//! the state file). A backup that cannot be read (missing, torn, not a
//! snapshot) always blocks: what it needs is unknown.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_inspect::audit::Auditor;
use etcd_inspect::etcd::{EtcdConnection, EtcdError};
use etcd_inspect::report::needs::{self, Fingerprints, Need};
use etcd_inspect::scan::{Scan, ScanOptions};
use etcd_inspect::snapshot::{SnapshotScan, View};
use etcd_inspect::summary::Summary;
use etcd_inspect::{Finding, Record};
use storage_encryption::EncryptionConfiguration;

use crate::targets::EtcdTarget;

/// The audit could not run.
#[derive(Debug, thiserror::Error)]
#[error("etcd audit gate: {0}")]
pub struct GateError(#[from] EtcdError);

/// Keys per row shown as examples.
const SAMPLES: usize = 5;

/// One group of blocking values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    /// How many.
    pub count: u64,
    /// The first few etcd keys.
    pub sample_keys: Vec<String>,
}

/// A kept backup that still needs what is being removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupNeed {
    /// The snapshot file.
    pub path: PathBuf,
    /// Its revision.
    pub revision: i64,
    /// What its blocking values need (etcd-inspect's needs list).
    pub needs: Vec<Need>,
}

impl BackupNeed {
    /// One line: the file and each key it needs.
    pub fn describe(&self) -> String {
        let needs: Vec<String> = self
            .needs
            .iter()
            .map(|n| format!("{} ({} values)", n.label(), n.values))
            .collect();
        format!(
            "backup {} (revision {}) needs {}",
            self.path.display(),
            self.revision,
            needs.join("; ")
        )
    }
}

/// What the audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GateReport {
    /// Keys scanned.
    pub scanned: u64,
    /// Etcd revision of the scan.
    pub revision: i64,
    /// Blocking values by (resource, stored with).
    pub blocking: BTreeMap<(String, String), Row>,
    /// Backup files read (after expanding directories).
    pub backups_read: usize,
    /// Kept backups that still need what is being removed.
    pub backups: Vec<BackupNeed>,
    /// Backups that could not be read, and why: they always block.
    pub broken_backups: Vec<(PathBuf, String)>,
}

impl GateReport {
    /// Number of values that still need what is being removed.
    pub fn blocking_count(&self) -> u64 {
        self.blocking.values().map(|r| r.count).sum()
    }

    /// Nothing blocks: not etcd, not a backup.
    pub fn passed(&self) -> bool {
        self.passed_allowing_backups() && self.backups.is_empty()
    }

    /// Nothing blocks if backups may become unrestorable
    /// (`--allow-unrestorable-backups`); an unreadable backup still blocks.
    pub fn passed_allowing_backups(&self) -> bool {
        self.blocking.is_empty() && self.broken_backups.is_empty()
    }

    fn add_labelled(&mut self, r: &Record, label: String) {
        let row = self
            .blocking
            .entry((
                r.resource.as_deref().unwrap_or("(no resource)").to_owned(),
                label,
            ))
            .or_default();
        row.count += 1;
        if row.sample_keys.len() < SAMPLES {
            row.sample_keys.push(r.key.clone());
        }
    }
}

fn stored_label(r: &Record) -> String {
    match &r.key_id {
        Some(id) if r.actual.provider == Some(etcd_inspect::ProviderKind::KmsV2) => {
            format!("{} key_id {id}", r.actual.label())
        }
        _ => r.actual.label(),
    }
}

impl fmt::Display for GateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::new();
        self.render(&mut text)?;
        f.write_str(text.trim_end())
    }
}

impl GateReport {
    fn render(&self, f: &mut impl fmt::Write) -> fmt::Result {
        let backups = if self.backups_read == 0 {
            String::new()
        } else {
            format!(
                "; {} backups read, {} still need it",
                self.backups_read,
                self.backups.len()
            )
        };
        if self.passed() {
            return write!(
                f,
                "etcd audit at revision {}: {} keys, none still needs it{backups}",
                self.revision, self.scanned
            );
        }
        if self.blocking.is_empty() {
            writeln!(
                f,
                "etcd audit at revision {}: {} keys, none still needs it{backups}",
                self.revision, self.scanned
            )?;
        } else {
            writeln!(
                f,
                "etcd audit at revision {}: {} of {} keys still need it{backups}:",
                self.revision,
                self.blocking_count(),
                self.scanned
            )?;
        }
        for ((resource, stored), row) in &self.blocking {
            writeln!(
                f,
                "  {resource} stored with {stored}: {} (e.g. {})",
                row.count,
                row.sample_keys.join(", ")
            )?;
        }
        for b in &self.backups {
            writeln!(f, "  {}", b.describe())?;
        }
        for (path, why) in &self.broken_backups {
            writeln!(
                f,
                "  backup {} cannot be read ({why}): what it needs is unknown",
                path.display()
            )?;
        }
        if !self.blocking.is_empty() {
            writeln!(
                f,
                "rewrite them (resume the run, or update them), then run the rotator again"
            )?;
        }
        if !self.backups.is_empty() {
            writeln!(
                f,
                "a backup that needs a removed key cannot be restored: take a new backup and \
                 retire the old ones (remove them from backups:), or resume with \
                 --allow-unrestorable-backups to accept that"
            )?;
        }
        if !self.broken_backups.is_empty() {
            writeln!(
                f,
                "fix or remove the unreadable backups from backups: (--allow-unrestorable-backups does not cover them)"
            )?;
        }
        Ok(())
    }
}

fn connection(etcd: &EtcdTarget) -> EtcdConnection {
    EtcdConnection {
        endpoints: etcd.endpoints.clone(),
        cacert: etcd.cacert.clone(),
        cert: etcd.cert.clone(),
        key: etcd.key.clone(),
        dial_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(30),
    }
}

async fn scan(
    etcd: &EtcdTarget,
    judge: &impl Fn(&[u8], &[u8]) -> Option<Record>,
) -> Result<GateReport, GateError> {
    scan_labelled(etcd, judge, stored_label).await
}

/// [`scan`], with rows named by `label`.
async fn scan_labelled(
    etcd: &EtcdTarget,
    judge: &impl Fn(&[u8], &[u8]) -> Option<Record>,
    label: impl Fn(&Record) -> String,
) -> Result<GateReport, GateError> {
    let conn = connection(etcd);
    let kv = conn.kv_client().await?;
    let mut scan = Scan::start(
        kv,
        conn.endpoints_display(),
        etcd.prefix.as_bytes().to_vec(),
        ScanOptions::default(),
    );
    let mut report = GateReport::default();
    while let Some(page) = scan.next_page().await {
        let page = page?;
        report.revision = page.revision;
        for kv in &page.kvs {
            report.scanned += 1;
            if let Some(r) = judge(&kv.key, &kv.value) {
                report.add_labelled(&r, label(&r));
            }
        }
    }
    Ok(report)
}

/// The snapshot files of `backups:`: files as given, directories expanded
/// to the regular files in them (not recursive), in name order. A path that
/// cannot be listed is returned as broken.
fn backup_files(backups: &[PathBuf]) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
    let (mut files, mut broken) = (Vec::new(), Vec::new());
    for b in backups {
        if !b.is_dir() {
            files.push(b.clone());
            continue;
        }
        match std::fs::read_dir(b) {
            Ok(entries) => {
                let mut found: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .collect();
                found.sort();
                files.extend(found);
            }
            Err(e) => broken.push((b.clone(), format!("cannot list the directory: {e}"))),
        }
    }
    (files, broken)
}

/// What one backup's values that `judge` blocks need (empty: nothing).
async fn backup_needs(
    path: &Path,
    prefix: &str,
    judge: &impl Fn(&[u8], &[u8]) -> Option<Record>,
    fingerprints: &Fingerprints,
) -> Result<(i64, Vec<Need>), String> {
    if !path.is_file() {
        return Err("not a readable file".into());
    }
    let mut scan = SnapshotScan::start(
        path.to_owned(),
        prefix.as_bytes().to_vec(),
        1000,
        View::Latest,
    );
    let mut blocking = Summary::default();
    let mut revision = 0;
    while let Some(page) = scan.next_page().await {
        // The error names the file and what is wrong with it.
        let page = page.map_err(|e| e.to_string())?;
        revision = page.revision;
        for kv in &page.kvs {
            if let Some(r) = judge(&kv.key, &kv.value) {
                blocking.add(&r);
            }
        }
    }
    Ok((revision, needs::needs(&blocking, fingerprints)))
}

/// Judges etcd, then every backup, with the same rule.
async fn etcd_and_backups(
    etcd: &EtcdTarget,
    backups: &[PathBuf],
    judge: impl Fn(&[u8], &[u8]) -> Option<Record>,
    fingerprints: &Fingerprints,
) -> Result<GateReport, GateError> {
    let mut report = scan(etcd, &judge).await?;
    let (files, broken) = backup_files(backups);
    report.broken_backups = broken;
    report.backups_read = files.len();
    for path in files {
        match backup_needs(&path, &etcd.prefix, &judge, fingerprints).await {
            Ok((_, needs)) if needs.is_empty() => {}
            Ok((revision, needs)) => report.backups.push(BackupNeed {
                path,
                revision,
                needs,
            }),
            Err(why) => report.broken_backups.push((path, why)),
        }
    }
    Ok(report)
}

/// Values readable under `before` that `after` could not read, in etcd and
/// in the kept `backups`.
pub async fn config_removal(
    etcd: &EtcdTarget,
    backups: &[PathBuf],
    before: &EncryptionConfiguration,
    after: &EncryptionConfiguration,
) -> Result<GateReport, GateError> {
    let now = Auditor::with_key_ids(before.clone(), &etcd.prefix, BTreeMap::new());
    let next = Auditor::with_key_ids(after.clone(), &etcd.prefix, BTreeMap::new());
    let judge = |key: &[u8], value: &[u8]| {
        let (r_now, _, _) = now.judge_value(key, value);
        let readable_now = matches!(
            r_now.finding,
            Some(Finding::Ok | Finding::Stale | Finding::KmsKeyStale | Finding::Plaintext)
        );
        if !readable_now {
            return None;
        }
        let (r_next, _, _) = next.judge_value(key, value);
        matches!(
            r_next.finding,
            Some(Finding::Unreadable | Finding::Undecodable)
        )
        .then_some(r_now)
    };
    let fingerprints = needs::config_fingerprints(Some(before));
    etcd_and_backups(etcd, backups, judge, &fingerprints).await
}

/// KMS v2 values whose keyID is one of `old_key_ids`, in etcd and in the
/// kept `backups`.
pub async fn kek_retire(
    etcd: &EtcdTarget,
    backups: &[PathBuf],
    old_key_ids: &[String],
) -> Result<GateReport, GateError> {
    let auditor = Auditor::unaudited(&etcd.prefix);
    let judge = |key: &[u8], value: &[u8]| {
        let (r, _, _) = auditor.judge_value(key, value);
        r.key_id
            .as_ref()
            .is_some_and(|id| old_key_ids.contains(id))
            .then_some(r)
    };
    etcd_and_backups(etcd, backups, judge, &Fingerprints::new()).await
}

/// Before a new run: values the config in force would not write as they are
/// (`stale`: another provider or key of the config; `plaintext` where it
/// encrypts; `unreadable` or `undecodable` under it), grouped by resource
/// and how they are stored. Non-empty means the last change was not
/// migrated (or something else wrote to etcd): a new rotation on top of it
/// could strand those values.
pub async fn not_migrated(
    etcd: &EtcdTarget,
    config: &EncryptionConfiguration,
) -> Result<GateReport, GateError> {
    let auditor = Auditor::with_key_ids(config.clone(), &etcd.prefix, BTreeMap::new());
    let judge = |key: &[u8], value: &[u8]| {
        let (r, _, _) = auditor.judge_value(key, value);
        matches!(
            r.finding,
            Some(Finding::Stale | Finding::Plaintext | Finding::Unreadable | Finding::Undecodable)
        )
        .then_some(r)
    };
    let label = |r: &Record| {
        let finding = r.finding.map(|f| f.as_str()).unwrap_or_default();
        format!("{} ({finding})", r.actual.label())
    };
    scan_labelled(etcd, &judge, label).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_directories_expand_to_their_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("snaps");
        std::fs::create_dir_all(d.join("nested")).unwrap();
        for name in ["b.db", "a.db"] {
            std::fs::write(d.join(name), b"x").unwrap();
        }
        std::fs::write(d.join("nested/c.db"), b"x").unwrap();
        let single = dir.path().join("one.db");
        let missing = dir.path().join("gone.db");
        let (files, broken) = backup_files(&[d.clone(), single.clone(), missing.clone()]);
        // Not recursive; a missing file is kept, to be refused by name when read.
        assert_eq!(files, [d.join("a.db"), d.join("b.db"), single, missing]);
        assert!(broken.is_empty());
    }

    #[test]
    fn a_report_names_each_backup_and_what_it_needs() {
        let report = GateReport {
            scanned: 3,
            revision: 9,
            backups_read: 2,
            backups: vec![BackupNeed {
                path: "/b/old.db".into(),
                revision: 7,
                needs: vec![Need {
                    provider: etcd_inspect::ProviderKind::AesCbc,
                    provider_name: None,
                    key_name: Some("key1".into()),
                    key_id: None,
                    fingerprints: vec!["sha256:00".into()],
                    values: 4,
                }],
            }],
            broken_backups: vec![("/b/torn.db".into(), "truncated".into())],
            ..GateReport::default()
        };
        assert!(!report.passed() && !report.passed_allowing_backups());
        let text = report.to_string();
        assert!(
            text.contains("backup /b/old.db (revision 7) needs aescbc key1 sha256:00 (4 values)"),
            "{text}"
        );
        assert!(
            text.contains("/b/torn.db cannot be read (truncated)"),
            "{text}"
        );
        let allowed = GateReport {
            broken_backups: Vec::new(),
            ..report
        };
        assert!(!allowed.passed() && allowed.passed_allowing_backups());
    }
}
