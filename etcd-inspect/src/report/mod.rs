//! Report writers: the human table, streaming JSON, and JUnit XML.
//!
//! Every writer gets the same calls: [`Reporter::begin`] once the scan's
//! revision is known, [`Reporter::record`] for each key as it is scanned,
//! and [`Reporter::finish`] with the summary. Only JSON writes per record;
//! the table and JUnit are built from the summary, so no writer keeps
//! records in memory. Every report ends with what its values need to be
//! read back ([`needs`]): the same list `--needs` prints alone.

mod json;
mod junit;
pub mod needs;
mod table;

use std::collections::BTreeSet;
use std::io;

pub use json::JsonReporter;
pub use junit::JunitReporter;
pub use needs::NeedsReporter;
pub use table::TableReporter;

use crate::record::{Finding, Record};
use crate::summary::Summary;

/// Facts about the scan that every report states.
#[derive(Debug, Clone)]
pub struct ScanMeta {
    /// The scanned key prefix.
    pub prefix: String,
    /// The snapshot file read (`etcd-inspect snapshot FILE`); `None` for a live scan.
    pub snapshot: Option<String>,
    /// kube-apiserver's `--etcd-prefix` keys were mapped below.
    pub etcd_prefix: String,
    /// The etcd revision the whole scan read.
    pub revision: i64,
    /// The config path given with `--config`, if any.
    pub config: Option<String>,
    /// Findings that fail the run.
    pub fail_on: BTreeSet<Finding>,
    /// Whether `--decrypt-check` ran.
    pub decrypt_check: bool,
    /// `--all-revisions`: records are revisions (history), not keys.
    pub all_revisions: bool,
    /// Fingerprints of the config's keys, naming them in the needs list of
    /// every report ([`needs::needs`]); empty without `--config`.
    pub fingerprints: needs::Fingerprints,
}

impl ScanMeta {
    /// Whether values were audited against a config.
    pub fn audited(&self) -> bool {
        self.config.is_some()
    }
}

/// A report format.
pub trait Reporter {
    /// Called once, before any record.
    fn begin(&mut self, meta: &ScanMeta) -> io::Result<()>;
    /// Called for each key, in key order.
    fn record(&mut self, record: &Record) -> io::Result<()>;
    /// Called once at the end.
    fn finish(&mut self, meta: &ScanMeta, summary: &Summary) -> io::Result<()>;
}

/// Why a completed scan proves nothing (exit 2), if it does not: no key
/// under the prefix, or an audit in which no key mapped to a resource.
pub fn nothing_judged(meta: &ScanMeta, summary: &Summary) -> Option<String> {
    if summary.total() == 0 {
        let check = if meta.snapshot.is_some() {
            "check --prefix and the file"
        } else {
            "check --prefix and --endpoints"
        };
        return Some(format!(
            "no key under {} at revision {}: nothing was judged ({check})",
            meta.prefix, meta.revision
        ));
    }
    if meta.audited() && summary.judged() == 0 {
        return Some(format!(
            "none of the {} keys under {} maps to a resource below --etcd-prefix {}: nothing was judged; \
             give kube-apiserver's --etcd-prefix with --etcd-prefix",
            summary.total(),
            meta.prefix,
            meta.etcd_prefix
        ));
    }
    None
}

/// `pass`, `fail`, or `error` when nothing was judged ([`nothing_judged`]).
pub fn result_word(meta: &ScanMeta, summary: &Summary) -> &'static str {
    if nothing_judged(meta, summary).is_some() {
        "error"
    } else if summary.failing(&meta.fail_on) > 0 {
        "fail"
    } else {
        "pass"
    }
}
