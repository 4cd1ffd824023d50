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

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use etcd_inspect::Finding;
use etcd_inspect::audit::Auditor;
use etcd_inspect::etcd::{EtcdConnection, EtcdError};
use etcd_inspect::scan::{Scan, ScanOptions};
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

/// What the audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GateReport {
    /// Keys scanned.
    pub scanned: u64,
    /// Etcd revision of the scan.
    pub revision: i64,
    /// Blocking values by (resource, stored with).
    pub blocking: BTreeMap<(String, String), Row>,
}

impl GateReport {
    /// Number of values that still need what is being removed.
    pub fn blocking_count(&self) -> u64 {
        self.blocking.values().map(|r| r.count).sum()
    }

    /// Nothing blocks.
    pub fn passed(&self) -> bool {
        self.blocking.is_empty()
    }

    fn add(&mut self, resource: Option<&str>, stored: String, key: &str) {
        let row = self
            .blocking
            .entry((resource.unwrap_or("(no resource)").to_owned(), stored))
            .or_default();
        row.count += 1;
        if row.sample_keys.len() < SAMPLES {
            row.sample_keys.push(key.to_owned());
        }
    }
}

impl fmt::Display for GateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed() {
            return write!(
                f,
                "etcd audit at revision {}: {} keys, none still needs it",
                self.revision, self.scanned
            );
        }
        writeln!(
            f,
            "etcd audit at revision {}: {} of {} keys still need it:",
            self.revision,
            self.blocking_count(),
            self.scanned
        )?;
        for ((resource, stored), row) in &self.blocking {
            writeln!(
                f,
                "  {resource} stored with {stored}: {} (e.g. {})",
                row.count,
                row.sample_keys.join(", ")
            )?;
        }
        write!(
            f,
            "rewrite them (resume the run, or update them), then run the rotator again"
        )
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
    mut judge: impl FnMut(&[u8], &[u8], &mut GateReport),
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
            judge(&kv.key, &kv.value, &mut report);
        }
    }
    Ok(report)
}

/// Values readable under `before` that `after` could not read.
pub async fn config_removal(
    etcd: &EtcdTarget,
    before: &EncryptionConfiguration,
    after: &EncryptionConfiguration,
) -> Result<GateReport, GateError> {
    let now = Auditor::with_key_ids(before.clone(), &etcd.prefix, BTreeMap::new());
    let next = Auditor::with_key_ids(after.clone(), &etcd.prefix, BTreeMap::new());
    scan(etcd, |key, value, report| {
        let (r_now, _, _) = now.judge_value(key, value);
        let readable_now = matches!(
            r_now.finding,
            Some(Finding::Ok | Finding::Stale | Finding::KmsKeyStale | Finding::Plaintext)
        );
        if !readable_now {
            return;
        }
        let (r_next, _, _) = next.judge_value(key, value);
        if matches!(
            r_next.finding,
            Some(Finding::Unreadable | Finding::Undecodable)
        ) {
            report.add(r_now.resource.as_deref(), r_now.actual.label(), &r_now.key);
        }
    })
    .await
}

/// KMS v2 values whose keyID is one of `old_key_ids`.
pub async fn kek_retire(
    etcd: &EtcdTarget,
    old_key_ids: &[String],
) -> Result<GateReport, GateError> {
    let auditor = Auditor::unaudited(&etcd.prefix);
    scan(etcd, |key, value, report| {
        let (r, _, _) = auditor.judge_value(key, value);
        if let Some(id) = &r.key_id
            && old_key_ids.contains(id)
        {
            report.add(
                r.resource.as_deref(),
                format!("{} key_id {id}", r.actual.label()),
                &r.key,
            );
        }
    })
    .await
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
    scan(etcd, |key, value, report| {
        let (r, _, _) = auditor.judge_value(key, value);
        if let Some(
            f @ (Finding::Stale | Finding::Plaintext | Finding::Unreadable | Finding::Undecodable),
        ) = r.finding
        {
            report.add(
                r.resource.as_deref(),
                format!("{} ({})", r.actual.label(), f.as_str()),
                &r.key,
            );
        }
    })
    .await
}
