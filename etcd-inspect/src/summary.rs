//! Counts by resource × provider/key × finding. Its size depends on how many
//! distinct combinations exist, never on the number of keys.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::record::{Finding, ProviderRef, Record};

/// How many failing keys each row remembers as examples (JUnit, table).
pub const SAMPLE_KEYS: usize = 5;

/// One row of the summary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RowKey {
    /// Resource (`null`: keys no resource owns).
    pub resource: Option<String>,
    /// Stored provider and key.
    #[serde(flatten)]
    pub actual: ProviderRef,
    /// KMS v2 keyID.
    pub key_id: Option<String>,
    /// The config's first provider for the resource (`null` without `--config`).
    pub expected: Option<ProviderRef>,
    /// Verdict (`null` without `--config`).
    pub finding: Option<Finding>,
}

/// Counts and a few example keys of one row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RowStats {
    /// Keys in this row.
    pub count: u64,
    /// The first few keys (in key order).
    pub sample_keys: Vec<String>,
}

/// The whole summary.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    rows: BTreeMap<RowKey, RowStats>,
    total: u64,
    judged: u64,
    by_finding: BTreeMap<Finding, u64>,
}

impl Summary {
    /// Adds one record.
    pub fn add(&mut self, r: &Record) {
        self.total += 1;
        // Judged: mapped to a resource and compared with the config's
        // providers (`expected` is only set then).
        if r.expected.is_some() {
            self.judged += 1;
        }
        if let Some(f) = r.finding {
            *self.by_finding.entry(f).or_default() += 1;
        }
        let key = RowKey {
            resource: r.resource.clone(),
            actual: r.actual.clone(),
            key_id: r.key_id.clone(),
            expected: r.expected.clone(),
            finding: r.finding,
        };
        let stats = self.rows.entry(key).or_default();
        stats.count += 1;
        if stats.sample_keys.len() < SAMPLE_KEYS {
            stats.sample_keys.push(r.key.clone());
        }
    }

    /// Number of keys seen.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Rows in a stable order (resource, provider, key, finding).
    pub fn rows(&self) -> impl Iterator<Item = (&RowKey, &RowStats)> {
        self.rows.iter()
    }

    /// Keys judged against a config (mapped to a resource). An audit with
    /// keys but none judged proves nothing and fails closed.
    pub fn judged(&self) -> u64 {
        self.judged
    }

    /// Keys per finding.
    pub fn by_finding(&self) -> &BTreeMap<Finding, u64> {
        &self.by_finding
    }

    /// Keys whose finding is in `fail_on`.
    pub fn failing(&self, fail_on: &BTreeSet<Finding>) -> u64 {
        self.by_finding
            .iter()
            .filter(|(f, _)| fail_on.contains(f))
            .map(|(_, n)| n)
            .sum()
    }
}
