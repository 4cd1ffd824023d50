//! The human report: a table of resource × stored provider/key × finding
//! with key counts, then totals and the verdict. Written at the end, from
//! the summary only. Every text that comes from etcd (keys, resources, key
//! names, KMS keyIDs) is written with its control characters escaped, so a
//! value someone wrote into etcd cannot drive the reader's terminal.

use std::io::{self, Write};

use cli_kit::escape::escape_control;

use super::{Reporter, ScanMeta};
use crate::record::{Finding, Record};
use crate::summary::Summary;

/// Prints the summary table.
#[derive(Debug)]
pub struct TableReporter<W: Write> {
    out: W,
}

impl<W: Write> TableReporter<W> {
    /// Writes to `out`.
    pub fn new(out: W) -> Self {
        TableReporter { out }
    }
}

impl<W: Write> Reporter for TableReporter<W> {
    fn begin(&mut self, _meta: &ScanMeta) -> io::Result<()> {
        Ok(())
    }

    fn record(&mut self, _record: &Record) -> io::Result<()> {
        Ok(())
    }

    fn finish(&mut self, meta: &ScanMeta, summary: &Summary) -> io::Result<()> {
        let out = &mut self.out;
        match &meta.config {
            Some(c) => writeln!(
                out,
                "{} {} under {} at revision {}, audited against {}{}",
                summary.total(),
                if meta.all_revisions {
                    "revisions"
                } else {
                    "keys"
                },
                escape_control(&meta.prefix),
                meta.revision,
                escape_control(c),
                if meta.decrypt_check {
                    " (with decrypt check)"
                } else {
                    ""
                }
            )?,
            None => writeln!(
                out,
                "{} keys under {} at revision {} (no --config: classified, not audited)",
                summary.total(),
                escape_control(&meta.prefix),
                meta.revision
            )?,
        }
        if summary.total() == 0 {
            if let Some(why) = super::nothing_judged(meta, summary) {
                writeln!(out, "\nresult: ERROR ({why})")?;
            }
            return out.flush();
        }
        writeln!(out)?;

        let header = [
            "RESOURCE",
            "STORED WITH",
            "KMS KEY ID",
            "EXPECTED",
            "FINDING",
            "KEYS",
        ];
        let mut rows: Vec<[String; 6]> = Vec::new();
        let esc = |text: &str| escape_control(text).into_owned();
        for (k, s) in summary.rows() {
            rows.push([
                k.resource
                    .as_deref()
                    .map(esc)
                    .unwrap_or_else(|| "(no resource)".into()),
                esc(&k.actual.label()),
                k.key_id.as_deref().map(esc).unwrap_or_else(|| "-".into()),
                k.expected
                    .as_ref()
                    .map(|e| esc(&e.label()))
                    .unwrap_or_else(|| "-".into()),
                k.finding
                    .map(|f| f.as_str().to_owned())
                    .unwrap_or_else(|| "-".into()),
                s.count.to_string(),
            ]);
        }
        let mut widths = header.map(str::len);
        for r in &rows {
            for (w, cell) in widths.iter_mut().zip(r.iter()) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 6]| {
            let mut s = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i == 5 {
                    s.push_str(&format!("{cell:>w$}"));
                } else {
                    s.push_str(&format!("{cell:<w$}  "));
                }
            }
            s
        };
        writeln!(out, "{}", line(header))?;
        for r in &rows {
            writeln!(out, "{}", line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]))?;
        }

        writeln!(out)?;
        writeln!(
            out,
            "needed to read these values back (keep these keys while a backup holds them):"
        )?;
        super::needs::write_lines(out, &super::needs::needs(summary, &meta.fingerprints))?;
        writeln!(out)?;
        if !summary.by_finding().is_empty() {
            let counts: Vec<String> = Finding::ALL
                .iter()
                .filter_map(|f| summary.by_finding().get(f).map(|n| format!("{f} {n}")))
                .collect();
            writeln!(out, "findings: {}", counts.join(", "))?;
        }
        let nothing_judged = super::nothing_judged(meta, summary);
        let failing = summary.failing(&meta.fail_on);
        let fail_on: Vec<&str> = meta.fail_on.iter().map(|f| f.as_str()).collect();
        let fail_on = if fail_on.is_empty() {
            vec!["none"]
        } else {
            fail_on
        };
        if failing > 0 {
            writeln!(
                out,
                "result: FAIL ({failing} keys with a finding in --fail-on {})",
                fail_on.join(",")
            )?;
            // Point at concrete keys so the reader can act without re-running in JSON.
            for (k, s) in summary.rows() {
                if let Some(f) = k.finding.filter(|f| meta.fail_on.contains(f)) {
                    for key in &s.sample_keys {
                        writeln!(out, "  {f}: {}", escape_control(key))?;
                    }
                    if s.count > s.sample_keys.len() as u64 {
                        writeln!(
                            out,
                            "  {f}: ... and {} more",
                            s.count - s.sample_keys.len() as u64
                        )?;
                    }
                }
            }
        } else if nothing_judged.is_none() {
            writeln!(
                out,
                "result: PASS (no finding in --fail-on {})",
                fail_on.join(",")
            )?;
        }
        if let Some(why) = nothing_judged {
            writeln!(out, "result: ERROR ({why})")?;
        }
        if meta.all_revisions && failing > 0 {
            writeln!(
                out,
                "\nOld revisions keep these values on disk and in every backup taken since: \
                 compact (etcdctl compact), defragment every member (etcdctl defrag), \
                 take a new backup and retire the old ones."
            )?;
        }
        out.flush()
    }
}
