//! `--output json`: one JSON document written as the scan goes:
//!
//! ```text
//! {"prefix":"/registry","revision":42,"config":"enc.yaml","records":[
//! {"key":"/registry/secrets/ns/a",...},
//! ...
//! ],
//! "needs":[{"provider":"aesgcm","key_name":"k1","fingerprints":["sha256:..."],...}],
//! "summary":{...}}
//! ```
//!
//! Each record is on its own line, so `grep`/line tools work too, while the
//! whole output stays one valid document for `jq`.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::json;

use super::{Reporter, ScanMeta, result_word};
use crate::record::{Finding, Record};
use crate::summary::{RowKey, RowStats, Summary};

/// Streams records as JSON.
#[derive(Debug)]
pub struct JsonReporter<W: Write> {
    out: W,
    first: bool,
}

impl<W: Write> JsonReporter<W> {
    /// Writes to `out`.
    pub fn new(out: W) -> Self {
        JsonReporter { out, first: true }
    }
}

#[derive(Serialize)]
struct Row<'a> {
    #[serde(flatten)]
    key: &'a RowKey,
    #[serde(flatten)]
    stats: &'a RowStats,
}

impl<W: Write> Reporter for JsonReporter<W> {
    fn begin(&mut self, meta: &ScanMeta) -> io::Result<()> {
        let head = json!({
            "prefix": meta.prefix,
            "etcd_prefix": meta.etcd_prefix,
            "snapshot": meta.snapshot,
            "revision": meta.revision,
            "config": meta.config,
            "decrypt_check": meta.decrypt_check,
        });
        let mut head = head;
        if meta.all_revisions {
            head["all_revisions"] = json!(true);
        }
        let head = serde_json::to_string(&head)?;
        // Re-open the object to append the streaming array.
        let head = head.strip_suffix('}').unwrap_or(&head);
        write!(self.out, "{head},\"records\":[")?;
        Ok(())
    }

    fn record(&mut self, record: &Record) -> io::Result<()> {
        self.out
            .write_all(if self.first { b"\n" } else { b",\n" })?;
        self.first = false;
        serde_json::to_writer(&mut self.out, record)?;
        Ok(())
    }

    fn finish(&mut self, meta: &ScanMeta, summary: &Summary) -> io::Result<()> {
        let findings: serde_json::Map<String, serde_json::Value> = Finding::ALL
            .iter()
            .map(|f| {
                (
                    f.as_str().to_owned(),
                    json!(summary.by_finding().get(f).copied().unwrap_or(0)),
                )
            })
            .collect();
        let rows: Vec<Row<'_>> = summary
            .rows()
            .map(|(key, stats)| Row { key, stats })
            .collect();
        let s = json!({
            "keys": summary.total(),
            "judged": summary.judged(),
            "findings": findings,
            "fail_on": meta.fail_on.iter().map(|f| f.as_str()).collect::<Vec<_>>(),
            "failing": summary.failing(&meta.fail_on),
            "result": result_word(meta, summary),
            "error": super::nothing_judged(meta, summary),
            "rows": rows,
        });
        let needs = super::needs::needs(summary, &meta.fingerprints);
        write!(self.out, "\n],\n\"needs\":")?;
        serde_json::to_writer(&mut self.out, &needs)?;
        write!(self.out, ",\n\"summary\":")?;
        serde_json::to_writer(&mut self.out, &s)?;
        self.out.write_all(b"}\n")?;
        self.out.flush()
    }
}
