//! `snapshot FILE --free-pages`: look in the file's freed and unused pages
//! for the byte shapes of Kubernetes objects stored unencrypted — the
//! `k8s\0` protobuf envelope, and JSON objects with a `"kind"` — and report
//! how many, of which kinds, in which pages. Never their contents: a kind
//! is printed only when it looks like a type name (`Secret`, `ConfigMap`).
//!
//! bolt writes copy-on-write: every transaction frees the pages it
//! replaced, so old values (the plaintext before encryption was turned on,
//! or values under a retired key) survive in freed pages until the space is
//! reused or the member is defragmented; `etcdctl snapshot save` copies them.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use etcd_snapshot::{FreeKind, Snapshot, SnapshotError};
use serde::Serialize;

use crate::cli::OutputFormat;

/// Pages read at a time (a match may span the pages of one run).
const CHUNK_PAGES: u64 = 64;

/// What the free pages hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FreePagesReport {
    /// The file.
    pub snapshot: String,
    /// Page size.
    pub page_size: u32,
    /// Freed pages (freelist or reached by no bucket).
    pub freed_pages: u64,
    /// Pages past the high-water mark.
    pub unused_pages: u64,
    /// Unencrypted Kubernetes object shapes found.
    pub remnants: u64,
    /// Of them, `k8s\0` protobuf envelopes.
    pub protobuf: u64,
    /// Of them, JSON objects with a `"kind"`.
    pub json: u64,
    /// Count per recognisable kind (`unknown` otherwise).
    pub kinds: BTreeMap<String, u64>,
    /// Page ids holding a remnant (where it starts), as ranges `[first, last]`.
    pub pages: Vec<[u64; 2]>,
}

impl FreePagesReport {
    /// 1 when a remnant was found, else 0.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.remnants > 0)
    }
}

/// Scans the free pages of `path`.
pub fn scan(path: &Path) -> Result<FreePagesReport, SnapshotError> {
    let snap = Snapshot::open(path)?;
    let ps = u64::from(snap.meta().page_size);
    let mut report = FreePagesReport {
        snapshot: path.display().to_string(),
        page_size: snap.meta().page_size,
        ..Default::default()
    };
    let mut hit_pages: Vec<u64> = Vec::new();
    for range in snap.free_pages()? {
        match range.kind {
            FreeKind::Freed => report.freed_pages += range.len,
            FreeKind::Unused => report.unused_pages += range.len,
        }
        let mut first = range.start;
        let end = range.start + range.len;
        while first < end {
            let n = (end - first).min(CHUNK_PAGES);
            let mut buf = Vec::with_capacity((n * ps) as usize);
            for id in first..first + n {
                buf.extend_from_slice(&snap.raw_page(id)?);
            }
            for (offset, shape) in find_shapes(&buf) {
                report.remnants += 1;
                let kind = match shape {
                    Shape::Protobuf(k) => {
                        report.protobuf += 1;
                        k
                    }
                    Shape::Json(k) => {
                        report.json += 1;
                        k
                    }
                };
                *report
                    .kinds
                    .entry(kind.unwrap_or_else(|| "unknown".into()))
                    .or_default() += 1;
                let page = first + offset as u64 / ps;
                if hit_pages.last() != Some(&page) {
                    hit_pages.push(page);
                }
            }
            first += n;
        }
    }
    for p in hit_pages {
        match report.pages.last_mut() {
            Some(r) if r[1] + 1 == p || r[1] == p => r[1] = p,
            _ => report.pages.push([p, p]),
        }
    }
    Ok(report)
}

enum Shape {
    Protobuf(Option<String>),
    Json(Option<String>),
}

/// A type name: ASCII letters and digits, starting with an upper-case letter.
fn type_name(b: &[u8]) -> Option<String> {
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_uppercase()
        && b.iter().all(u8::is_ascii_alphanumeric);
    ok.then(|| String::from_utf8_lossy(b).into_owned())
}

/// `k8s\0` then runtime.Unknown { typeMeta (1) { apiVersion (1), kind (2) } }.
fn protobuf_kind(after: &[u8]) -> Option<String> {
    let (&tag, rest) = after.split_first()?;
    if tag != 0x0a {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let tm = rest.get(..usize::from(len))?;
    let mut i = 0usize;
    while i + 1 < tm.len() {
        let (t, l) = (tm[i], usize::from(tm[i + 1]));
        let v = tm.get(i + 2..i + 2 + l)?;
        if t == 0x12 {
            return type_name(v);
        }
        i += 2 + l;
    }
    None
}

fn find_shapes(buf: &[u8]) -> Vec<(usize, Shape)> {
    const PB: &[u8] = b"k8s\0";
    const JS: &[u8] = b"\"kind\":\"";
    let mut out = Vec::new();
    let mut i = 0usize;
    while i + 4 <= buf.len() {
        if buf[i..].starts_with(PB) {
            out.push((i, Shape::Protobuf(protobuf_kind(&buf[i + 4..]))));
            i += PB.len();
            continue;
        }
        if buf[i..].starts_with(JS) {
            let rest = &buf[i + JS.len()..];
            let end = rest.iter().take(64).position(|&c| c == b'"');
            let kind = end.and_then(|e| type_name(&rest[..e]));
            // A JSON object's "kind" (apiVersion or metadata nearby).
            let window = &buf[i.saturating_sub(512)..(i + 512).min(buf.len())];
            let objectish = window.windows(12).any(|w| w == b"\"apiVersion\"")
                || window.windows(10).any(|w| w == b"\"metadata\"");
            if kind.is_some() && objectish {
                out.push((i, Shape::Json(kind)));
            }
            i += JS.len();
            continue;
        }
        i += 1;
    }
    out
}

/// Writes the report as text or JSON (JUnit gets the text).
pub fn write(
    report: &FreePagesReport,
    format: OutputFormat,
    mut out: impl Write,
) -> io::Result<()> {
    if format == OutputFormat::Json {
        serde_json::to_writer(&mut out, report)?;
        out.write_all(b"\n")?;
        return out.flush();
    }
    writeln!(
        out,
        "{}: {} freed and {} unused pages of {} bytes scanned",
        report.snapshot, report.freed_pages, report.unused_pages, report.page_size
    )?;
    if report.remnants == 0 {
        writeln!(
            out,
            "result: PASS (no unencrypted Kubernetes object in free pages)"
        )?;
        return out.flush();
    }
    let kinds: Vec<String> = report
        .kinds
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let pages: Vec<String> = report
        .pages
        .iter()
        .map(|[a, b]| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    writeln!(
        out,
        "{} unencrypted Kubernetes objects in free pages ({} protobuf, {} JSON): {}",
        report.remnants,
        report.protobuf,
        report.json,
        kinds.join(", ")
    )?;
    writeln!(out, "pages: {}", pages.join(","))?;
    writeln!(
        out,
        "result: FAIL (old values remain on disk: defragment every member with etcdctl defrag, \
         take a new backup and retire this one)"
    )?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_kinds() {
        let mut b = vec![0u8; 10];
        b.extend_from_slice(b"k8s\0\x0a\x0c\x0a\x02v1\x12\x06Secret\x12\x01x");
        b.extend_from_slice(b"junk{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"data\":{}}");
        b.extend_from_slice(b"k8s\0\xff");
        b.extend_from_slice(b"{\"kind\":\"not a type\"}");
        let found = find_shapes(&b);
        let kinds: Vec<Option<String>> = found
            .into_iter()
            .map(|(_, s)| match s {
                Shape::Protobuf(k) | Shape::Json(k) => k,
            })
            .collect();
        assert_eq!(
            kinds,
            [Some("Secret".into()), Some("ConfigMap".into()), None]
        );
    }
}
