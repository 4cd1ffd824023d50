//! The offline source: the latest revision of an etcd snapshot file (or a
//! stopped member's `member/snap/db`), read with the `etcd-snapshot` bolt
//! reader and handed to the same judging pipeline as the live scan, in the
//! same [`Page`]s, in key order.
//!
//! The file is read on a blocking thread, one page of keys ahead of the
//! consumer (like the live scan), so memory holds at most three pages of
//! values (one judged, one queued, one being read; each at most 1,000 keys
//! or 1 MiB plus one value) plus the reader's index of keys, which is
//! bounded by a byte budget whatever the number of keys
//! ([`etcd_snapshot::Snapshot::latest`]). Memory is flat in the key count.

use std::path::{Path, PathBuf};

use etcd_snapshot::{Snapshot, SnapshotError};
use tokio::sync::mpsc;

use crate::record::RevisionInfo;

/// Keys per page handed to the judge (bounded by bytes too).
const PAGE_KEYS: usize = 1000;
/// Value bytes per page before it is handed over early (the live scan's
/// default budget too).
const PAGE_BYTES: usize = 1024 * 1024;

/// One value read from the file.
#[derive(Clone)]
pub struct FileKv {
    /// The etcd key.
    pub key: Vec<u8>,
    /// The stored bytes (possibly plaintext: never logged).
    pub value: Vec<u8>,
    /// Which revision (`--all-revisions` only).
    pub revision: Option<RevisionInfo>,
}

impl std::fmt::Debug for FileKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKv")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("value", &format_args!("<{} bytes>", self.value.len()))
            .field("revision", &self.revision)
            .finish()
    }
}

/// A page of values from the file.
#[derive(Debug)]
pub struct FilePage {
    /// The file's revision (its newest, or its last compaction if newer).
    pub revision: i64,
    /// Latest view: live keys in key order. `--all-revisions`: every
    /// revision in revision order, tombstones included.
    pub kvs: Vec<FileKv>,
}

/// What to read from the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The latest revision of each live key (what a live scan sees).
    Latest,
    /// Every revision still stored (history since the last compaction).
    AllRevisions,
}

/// A scan of a snapshot file, page by page.
#[derive(Debug)]
pub struct SnapshotScan {
    rx: mpsc::Receiver<Result<FilePage, SnapshotError>>,
}

impl SnapshotScan {
    /// Opens `path` (meta pages, appended SHA-256) and starts reading the
    /// keys under `prefix` on a blocking thread.
    pub fn start(path: PathBuf, prefix: Vec<u8>, page_keys: usize, view: View) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let page_keys = page_keys.clamp(1, PAGE_KEYS);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = read_pages(&path, &prefix, page_keys, view, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        SnapshotScan { rx }
    }

    /// The next page; `None` at the end. The first page (possibly empty)
    /// carries the file's revision.
    pub async fn next_page(&mut self) -> Option<Result<FilePage, SnapshotError>> {
        self.rx.recv().await
    }
}

fn read_pages(
    path: &Path,
    prefix: &[u8],
    page_keys: usize,
    view: View,
    tx: &mpsc::Sender<Result<FilePage, SnapshotError>>,
) -> Result<(), SnapshotError> {
    // The appended SHA-256 is checked on its own thread while the index
    // pass runs; `latest` waits for it before the first value.
    let snap = Snapshot::open_concurrent(path)?;
    // Both views start from the latest one: it gives the file's revision.
    let latest = snap.latest(prefix)?;
    let revision = latest.revision();
    let items: Box<dyn Iterator<Item = Result<FileKv, SnapshotError>>> = match view {
        View::Latest => Box::new(latest.map(|kv| {
            kv.map(|kv| FileKv {
                key: kv.key,
                value: kv.value,
                revision: None,
            })
        })),
        View::AllRevisions => {
            drop(latest);
            Box::new(snap.revisions()?.filter_map(|r| match r {
                Ok(r) if !r.kv.key.starts_with(prefix) => None,
                Ok(r) => Some(Ok(FileKv {
                    revision: Some(RevisionInfo {
                        revision: r.main,
                        sub: r.sub,
                        create_revision: r.kv.create_revision,
                        version: r.kv.version,
                        tombstone: r.tombstone,
                    }),
                    key: r.kv.key,
                    value: r.kv.value,
                })),
                Err(e) => Some(Err(e)),
            }))
        }
    };
    let mut kvs = Vec::new();
    let mut bytes = 0usize;
    let mut sent_any = false;
    for kv in items {
        let kv = kv?;
        bytes += kv.value.len();
        kvs.push(kv);
        if kvs.len() >= page_keys || bytes >= PAGE_BYTES {
            let page = FilePage {
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
        let _ = tx.blocking_send(Ok(FilePage { revision, kvs }));
    }
    Ok(())
}
