//! The offline source: the latest revision of an etcd snapshot file (or a
//! stopped member's `member/snap/db`), read with the `etcd-snapshot` bolt
//! reader and handed to the same judging pipeline as the live scan, in the
//! same [`Page`]s, in key order.
//!
//! The file is read on a blocking thread, one page of keys ahead of the
//! consumer (like the live scan), so memory holds at most two pages of
//! values plus the reader's index of keys under the prefix.

use std::path::{Path, PathBuf};

use etcd_snapshot::{Snapshot, SnapshotError};
use tokio::sync::mpsc;

use crate::etcd::{KeyValue, Page};

/// Keys per page handed to the judge (bounded by bytes too).
const PAGE_KEYS: usize = 1000;
/// Value bytes per page before it is handed over early.
const PAGE_BYTES: usize = 8 * 1024 * 1024;

/// A scan of a snapshot file's latest revision, page by page.
#[derive(Debug)]
pub struct SnapshotScan {
    rx: mpsc::Receiver<Result<Page, SnapshotError>>,
}

impl SnapshotScan {
    /// Opens `path` (meta pages, appended SHA-256) and starts reading the
    /// keys under `prefix` on a blocking thread.
    pub fn start(path: PathBuf, prefix: Vec<u8>, page_keys: usize) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let page_keys = page_keys.clamp(1, PAGE_KEYS);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = read_pages(&path, &prefix, page_keys, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        SnapshotScan { rx }
    }

    /// The next page; `None` at the end. The first page (possibly empty)
    /// carries the file's revision.
    pub async fn next_page(&mut self) -> Option<Result<Page, SnapshotError>> {
        self.rx.recv().await
    }
}

fn read_pages(
    path: &Path,
    prefix: &[u8],
    page_keys: usize,
    tx: &mpsc::Sender<Result<Page, SnapshotError>>,
) -> Result<(), SnapshotError> {
    let snap = Snapshot::open(path)?;
    let latest = snap.latest(prefix)?;
    let revision = latest.revision();
    let mut kvs = Vec::new();
    let mut bytes = 0usize;
    let mut sent_any = false;
    for kv in latest {
        let kv = kv?;
        bytes += kv.value.len();
        kvs.push(KeyValue {
            key: kv.key,
            value: kv.value,
        });
        if kvs.len() >= page_keys || bytes >= PAGE_BYTES {
            let page = Page {
                revision,
                kvs: std::mem::take(&mut kvs),
            };
            bytes = 0;
            sent_any = true;
            if tx.blocking_send(Ok(page)).is_err() {
                return Ok(()); // consumer gone
            }
        }
    }
    if !kvs.is_empty() || !sent_any {
        let _ = tx.blocking_send(Ok(Page { revision, kvs }));
    }
    Ok(())
}
