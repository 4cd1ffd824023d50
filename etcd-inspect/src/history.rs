//! `--history` on a live etcd: every revision still stored under the prefix
//! (history since the last compaction, tombstones included), handed to the
//! judge in the same [`FilePage`]s and [`RevisionInfo`] records as
//! `snapshot FILE --all-revisions`, so both are judged and reported by the
//! same code.
//!
//! # How the history is read
//!
//! 1. A one-key read gives the current revision `R`; the history is read up
//!    to `R` and no further, so writes during the scan do not make it longer.
//! 2. A watch from revision 1 tells the compaction revision `C`: etcd
//!    cancels it with `compact_revision` set (a Range at revision 1 fails
//!    with "required revision has been compacted", which names no revision).
//!    Without a compaction the watch simply runs from revision 1.
//! 3. After a compaction, the values etcd kept at `C` (the latest revision
//!    of each key at or before `C`) are read with the range scan pinned at
//!    `C` ([`Scan::start_at`], key order), then a watch from `C + 1` streams
//!    every later revision, puts and deletes (tombstones), in revision order.
//! 4. The watch covers the whole key space and drops keys outside the prefix
//!    itself: the transaction at `R` wrote some key, so the watch is known to
//!    be complete when the response holding revision `R` arrives. (A watch of
//!    the prefix alone cannot tell "nothing more under the prefix" from "not
//!    there yet", and etcd 3.4's progress requests answer with the current
//!    revision before an unsynced watcher's events, so they cannot either.)
//!    The watch is fragmented (etcd splits a response above its request
//!    size limit, 1.5 MiB by default; a revision ends with the last
//!    fragment), so a response is bounded whatever the transactions hold.
//!
//! Memory: one watch response plus two pages of records, whatever the
//! number of keys or revisions. A compaction during the scan cancels the
//! watch (or fails the pinned range): the run exits 2, nothing is passed.
//!
//! # Why a watch and not ranges at old revisions (measured)
//!
//! Range can only read the state at a revision. Walking back each key
//! (`Range key @ mod_revision - 1` until it was created before `C`) costs
//! one request per stored revision and never sees keys deleted since `C`
//! (their plaintext is still stored); ranges of the whole prefix at every
//! revision cost keys × revisions. The watch streams each stored revision
//! once. On 20,000 keys × 3 revisions (60,000 revisions of 1 KiB values in
//! transactions of 100 puts; debug build on a shared 2-core machine,
//! `cargo run -p etcd-inspect --example history_cost`): the watch read all
//! 60,000 revisions in 4.8 s, the per-key range walk in 48.3 s (40,000
//! requests after the scan), so `--history` uses the watch. The whole
//! `etcd-inspect --history --output json` run over them: 16–18 s (judging
//! every revision, debug build), peak RSS 29 MiB; over 60,000 keys × 3
//! (180,000 revisions): 47 s, 30 MiB — flat in the number of revisions.
//!
//! Each record's [`RevisionInfo::sub`] is the event's position within its
//! transaction; for the values read at `C` it is 0 (a range does not say).

use etcd_client::{EventType, GetOptions, KvClient, WatchClient, WatchOptions};
use tokio::sync::mpsc;

use crate::etcd::EtcdError;
use crate::record::RevisionInfo;
use crate::scan::{Scan, ScanOptions};
use crate::snapshot::{FileKv, FilePage};

/// Records per page handed to the judge.
const PAGE_KEYS: usize = 1000;
/// Value bytes per page before it is handed over early.
const PAGE_BYTES: usize = 8 * 1024 * 1024;

/// What the history scan read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// The last compaction revision (0: never compacted).
    pub compact_revision: i64,
    /// Values read at the compaction revision.
    pub kept_at_compaction: u64,
    /// Watch events read (all keys, before the prefix filter).
    pub events: u64,
}

/// A scan of the history under a prefix, page by page.
#[derive(Debug)]
pub struct HistoryScan {
    rx: mpsc::Receiver<Result<FilePage, EtcdError>>,
    task: tokio::task::JoinHandle<()>,
    stats: tokio::sync::watch::Receiver<HistoryStats>,
}

impl HistoryScan {
    /// Starts reading; `endpoints` is only used in error messages and
    /// `options` sizes the pinned range scan at the compaction revision.
    pub fn start(
        kv: KvClient,
        watch: WatchClient,
        endpoints: String,
        prefix: Vec<u8>,
        options: ScanOptions,
    ) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let (stats_tx, stats) = tokio::sync::watch::channel(HistoryStats::default());
        let reader = Reader {
            kv,
            watch,
            endpoints,
            prefix,
            options,
            tx,
            stats: stats_tx,
            page: Vec::new(),
            page_bytes: 0,
            revision: 0,
            sent_any: false,
        };
        let task = tokio::spawn(reader.run());
        HistoryScan { rx, task, stats }
    }

    /// The next page; `None` at the end. Every page carries the revision
    /// the history was read up to.
    pub async fn next_page(&mut self) -> Option<Result<FilePage, EtcdError>> {
        self.rx.recv().await
    }

    /// What was read so far.
    pub fn stats(&self) -> HistoryStats {
        *self.stats.borrow()
    }
}

impl Drop for HistoryScan {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Reader {
    kv: KvClient,
    watch: WatchClient,
    endpoints: String,
    prefix: Vec<u8>,
    options: ScanOptions,
    tx: mpsc::Sender<Result<FilePage, EtcdError>>,
    stats: tokio::sync::watch::Sender<HistoryStats>,
    page: Vec<FileKv>,
    page_bytes: usize,
    revision: i64,
    sent_any: bool,
}

/// How a watch from a revision ended.
enum Streamed {
    /// Every revision up to the scan's was read.
    Done,
    /// etcd refused the start revision: compacted at this revision.
    Compacted(i64),
}

impl Reader {
    async fn run(mut self) {
        if let Err(e) = self.read().await {
            let _ = self.tx.send(Err(e)).await;
        }
    }

    fn watch_error(&self, from: i64, reason: impl Into<String>) -> EtcdError {
        EtcdError::Watch {
            endpoints: self.endpoints.clone(),
            from,
            reason: reason.into(),
        }
    }

    async fn read(&mut self) -> Result<(), EtcdError> {
        // The revision the history is read up to.
        let resp = self
            .kv
            .get(self.prefix.clone(), Some(GetOptions::new().with_limit(1)))
            .await
            .map_err(|source| EtcdError::Range {
                endpoints: self.endpoints.clone(),
                from: String::from_utf8_lossy(&self.prefix).into_owned(),
                revision: 0,
                source,
            })?;
        self.revision = resp.header().ok_or(EtcdError::NoHeader)?.revision();

        if let Streamed::Compacted(c) = self.stream_from(1).await? {
            self.stats.send_modify(|s| s.compact_revision = c);
            self.kept_at(c).await?;
            if c < self.revision
                && let Streamed::Compacted(again) = self.stream_from(c + 1).await?
            {
                return Err(self.watch_error(
                    c + 1,
                    format!("etcd was compacted at revision {again} during the scan"),
                ));
            }
        }
        self.flush(true).await;
        Ok(())
    }

    /// The values etcd kept at the compaction revision `c`.
    async fn kept_at(&mut self, c: i64) -> Result<(), EtcdError> {
        let mut scan = Scan::start_at(
            self.kv.clone(),
            self.endpoints.clone(),
            self.prefix.clone(),
            self.options,
            c,
        );
        while let Some(page) = scan.next_page().await {
            let page = page?;
            self.stats
                .send_modify(|s| s.kept_at_compaction += page.kvs.len() as u64);
            for kv in page.kvs {
                let info = RevisionInfo {
                    revision: kv.mod_revision,
                    sub: 0,
                    create_revision: kv.create_revision,
                    version: kv.version,
                    tombstone: false,
                };
                if !self.push(kv.key, kv.value, info).await {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Streams watch events of the whole key space from `from` until the
    /// response holding revision `self.revision`. A compaction reported
    /// before any event is etcd refusing `from`; after one, the history was
    /// cut short (an error).
    async fn stream_from(&mut self, from: i64) -> Result<Streamed, EtcdError> {
        let opts = WatchOptions::new()
            .with_all_keys()
            .with_fragment()
            .with_start_revision(from);
        let mut stream = self
            .watch
            .watch(vec![0], Some(opts))
            .await
            .map_err(|e| self.watch_error(from, e.to_string()))?;
        let mut sub_of = (0i64, 0i64); // (revision, next sub)
        let mut any_event = false;
        loop {
            let resp = stream
                .message()
                .await
                .map_err(|e| self.watch_error(from, e.to_string()))?
                .ok_or_else(|| self.watch_error(from, "the stream ended"))?;
            if resp.compact_revision() > 0 {
                if !any_event {
                    return Ok(Streamed::Compacted(resp.compact_revision()));
                }
                return Err(self.watch_error(
                    from,
                    format!(
                        "etcd was compacted at revision {} during the scan",
                        resp.compact_revision()
                    ),
                ));
            }
            if resp.canceled() {
                return Err(self.watch_error(from, resp.cancel_reason().to_owned()));
            }
            // Revision 1 is etcd's empty start: no transaction, no event.
            // (Checked after the creation, so a compaction is still seen.)
            if resp.created() && self.revision < from.max(2) {
                return Ok(Streamed::Done);
            }
            let n = resp.events().len() as u64;
            self.stats.send_modify(|s| s.events += n);
            let mut done = false;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let rev = kv.mod_revision();
                if rev >= self.revision {
                    done = true;
                }
                if rev > self.revision {
                    break;
                }
                let sub = if sub_of.0 == rev { sub_of.1 } else { 0 };
                sub_of = (rev, sub + 1);
                if !kv.key().starts_with(&self.prefix) {
                    continue;
                }
                let tombstone = ev.event_type() == EventType::Delete;
                let info = RevisionInfo {
                    revision: rev,
                    sub,
                    create_revision: kv.create_revision(),
                    version: kv.version(),
                    tombstone,
                };
                if !self
                    .push(kv.key().to_vec(), kv.value().to_vec(), info)
                    .await
                {
                    return Ok(Streamed::Done);
                }
            }
            any_event |= n > 0;
            // A revision's events may span fragments: stop after its last.
            if done && !resp.0.fragment {
                return Ok(Streamed::Done);
            }
        }
    }

    /// Adds a record to the page; false when the consumer is gone.
    async fn push(&mut self, key: Vec<u8>, value: Vec<u8>, info: RevisionInfo) -> bool {
        self.page_bytes += value.len();
        self.page.push(FileKv {
            key,
            value,
            revision: Some(info),
        });
        if self.page.len() >= PAGE_KEYS || self.page_bytes >= PAGE_BYTES {
            return self.flush(false).await;
        }
        true
    }

    /// Sends the page (at the end also an empty one, so the revision is
    /// known); false when the consumer is gone.
    async fn flush(&mut self, last: bool) -> bool {
        if self.page.is_empty() && (!last || self.sent_any) {
            return true;
        }
        self.sent_any = true;
        self.page_bytes = 0;
        let page = FilePage {
            revision: self.revision,
            kvs: std::mem::take(&mut self.page),
        };
        self.tx.send(Ok(page)).await.is_ok()
    }
}
