//! The latest view of the `key` bucket in ONE read of the bucket: an index
//! pass, an external sort, and a k-way merge that reads each winning value
//! once by its location.
//!
//! The `key` bucket is in revision order, so the newest revision of a key
//! is only known once every revision has been seen. The earlier reader made
//! one pass per 180k keys (each indexing one key slice under the budget and
//! re-reading the whole bucket, overflow pages and all), then found every
//! value again by a descent from the root; at 1M keys that was 6 passes and
//! 1M descents, and the offline audit used more CPU than etcd and the live
//! client together. Profiling showed the cost in page reads (`pread`
//! copies), key comparisons in the descents, and per-key allocations of the
//! B-tree index; not in the judging.
//!
//! Now:
//! 1. **Index pass** (one walk of the bucket): for every revision, only the
//!    revision key and field 1 (the etcd key) of its `mvccpb.KeyValue` are
//!    read; a leaf's overflow pages are never read whole: a large value's
//!    key is read with one small `pread` of its first bytes. Each entry is
//!    (key, main, sub, tombstone, file offset and length of the element),
//!    written into one arena (with an offset vector for sorting) allocated
//!    once from the byte budget. When the next entry does not fit, the run is sorted
//!    by (key, newest revision first), reduced to the newest entry per key,
//!    and spilled to a file in a private temp dir (mode 0700, under
//!    `TMPDIR`), removed when [`Latest`] is dropped: at the end, on an
//!    error, or when the consumer stops early. A file whose keys fit the
//!    budget never touches the disk.
//! 2. **Merge**: the last run (in memory) and the spilled runs (read back
//!    through 16 KiB buffers, at most [`FANIN`] at once; more runs are first
//!    merged into fewer, dropping older revisions) yield entries in key
//!    order, newest revision first; the first entry of each key wins.
//! 3. **Values**: a winning live key's value is read once, with one `pread`
//!    of exactly its element's bytes at the recorded offset (no page header,
//!    no neighbouring values); its revision key and etcd key are checked
//!    against the index entry.
//! 4. The appended SHA-256 ([`Snapshot::open_concurrent`]) is hashed on a
//!    second thread during the index pass; the view waits for it before
//!    returning, so no value leaves a file that fails it.
//!
//! Measured (1M kube-shaped keys, 1.6 GB file, shared 2-core machine): the
//! offline audit went from 24.6 s wall / 23.4 s CPU to 6.4–8.8 s / 8.5 s;
//! what is left is mostly the judging on the consumer's thread, the page
//! copies of `pread` and the hash.
//!
//! Memory: the budget (index arena and offsets), [`FANIN`] read buffers and
//! one element; disk: about keys × (key + 33 bytes) when the index spills.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::page::{HEADER, Node};
use crate::{
    BucketRoot, ErrorKind, KeyValue, Snapshot, SnapshotError, Source, decode_kv, kv_key,
    parse_revision,
};

/// Index bytes of [`Snapshot::latest`]: the key arena plus the entries,
/// about 170,000 kube-shaped keys per run (`etcd-inspect snapshot` peaks
/// under 40 MiB RSS with it).
pub const DEFAULT_INDEX_BYTES: usize = 16 * 1024 * 1024;

/// Spilled runs merged at once (each read through a 16 KiB buffer).
pub const FANIN: usize = 16;

/// Read and write buffer of one spilled run.
const RUN_BUFFER: usize = 16 * 1024;

/// Bytes of an index record's fixed part: key length u32, main i64, sub
/// i64, the element's file offset u64, its length u32, flags u8
/// (little-endian); the key follows. The same bytes in memory and in a
/// spilled run.
const REC_HEAD: usize = 33;
/// Record flag: the revision is a tombstone.
const TOMBSTONE: u8 = 1;
/// Record flag: the offset is in the inline `key` bucket's page, not the file.
const INLINE: u8 = 2;

/// Bytes an index entry costs beyond its key: its fixed part and its
/// offset in the sort order.
pub const INDEX_ENTRY_BYTES: usize = REC_HEAD + 4;

/// One index entry with its key (merge side).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    key: Vec<u8>,
    main: i64,
    sub: i64,
    /// Where the element (revision key, then value) is: a file offset, or
    /// an offset in the inline bucket's page.
    at: u64,
    /// Revision key and value bytes.
    len: u32,
    flags: u8,
}

/// Key order, and for one key the newest revision first.
fn rec_order(a: (&[u8], i64, i64), b: (&[u8], i64, i64)) -> Ordering {
    a.0.cmp(b.0).then_with(|| (b.1, b.2).cmp(&(a.1, a.2)))
}

/// What [`Latest`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatestStats {
    /// Reads of the whole `key` bucket (always 1 since the index spills to
    /// disk instead of making another pass).
    pub passes: u64,
    /// Sorted runs written to temp files (0: the index fit the budget),
    /// intermediate merges included.
    pub spilled_runs: u64,
    /// The most index entries held in memory at once.
    pub max_keys_held: u64,
    /// The most index bytes (arena and entry capacity) held at once.
    pub max_index_bytes: u64,
}

/// How [`Snapshot::latest_with_options`] indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestOptions {
    /// Index bytes in memory (see [`DEFAULT_INDEX_BYTES`]).
    pub index_bytes: usize,
    /// Where the private temp dir for spilled runs is made (default: the
    /// system's, `TMPDIR`).
    pub temp_parent: Option<PathBuf>,
}

impl Default for LatestOptions {
    fn default() -> Self {
        LatestOptions {
            index_bytes: DEFAULT_INDEX_BYTES,
            temp_parent: None,
        }
    }
}

/// The run being built: records in one arena, and their offsets (the sort
/// order), both allocated once from the budget: 8/9 for the arena, 1/9
/// for the offsets (a record is at least 32 bytes for 4 bytes of offset, so
/// the arena always fills first).
struct Run {
    arena: Vec<u8>,
    order: Vec<u32>,
}

impl Run {
    fn new(budget: usize) -> Self {
        let order = budget / 9 / 4;
        Run {
            arena: Vec::with_capacity(budget - order * 4),
            order: Vec::with_capacity(order),
        }
    }

    fn held(&self) -> usize {
        self.arena.capacity() + self.order.capacity() * 4
    }

    /// Whether a record with a key of `klen` bytes fits (an empty run takes
    /// any one record, growing past the budget for a huge key).
    fn fits(&self, klen: usize) -> bool {
        self.order.is_empty()
            || (self.arena.len() + REC_HEAD + klen <= self.arena.capacity()
                && self.order.len() < self.order.capacity())
    }

    fn push(&mut self, key: &[u8], r: (i64, i64, u64, u32, u8)) -> Result<(), ErrorKind> {
        let off = u32::try_from(self.arena.len())
            .map_err(|_| spill_err(std::io::Error::other("index run over 4 GiB")))?;
        write_rec(&mut self.arena, key, r)?;
        self.order.push(off);
        Ok(())
    }

    /// The key and revision of the record at `off`. Slicing cannot fail:
    /// `off` comes from `order`, which holds only offsets `push` wrote a
    /// whole record at (header, then exactly `len` key bytes).
    fn key_at(arena: &[u8], off: u32) -> (&[u8], i64, i64) {
        let o = off as usize;
        let h = &arena[o..o + REC_HEAD];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let mut m = [0u8; 8];
        m.copy_from_slice(&h[4..12]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&h[12..20]);
        (
            &arena[o + REC_HEAD..o + REC_HEAD + len],
            i64::from_le_bytes(m),
            i64::from_le_bytes(s),
        )
    }

    /// Sorts by key, newest first, and keeps the newest record per key.
    fn sort(&mut self) {
        let arena = &self.arena;
        self.order
            .sort_unstable_by(|a, b| rec_order(Run::key_at(arena, *a), Run::key_at(arena, *b)));
        self.order
            .dedup_by(|later, kept| Run::key_at(arena, *later).0 == Run::key_at(arena, *kept).0);
    }

    /// The record at `off`, whole (header and key).
    fn rec_bytes(&self, off: u32) -> &[u8] {
        let (key, _, _) = Run::key_at(&self.arena, off);
        &self.arena[off as usize..off as usize + REC_HEAD + key.len()]
    }

    fn clear(&mut self) {
        self.arena.clear();
        self.order.clear();
    }
}

/// A sorted run being read back.
enum RunReader {
    /// The last run, never spilled.
    Mem(Run, usize),
    /// A spilled run.
    File(BufReader<File>),
}

impl RunReader {
    fn next(&mut self) -> Result<Option<Rec>, ErrorKind> {
        match self {
            RunReader::Mem(run, pos) => {
                let Some(off) = run.order.get(*pos) else {
                    return Ok(None);
                };
                *pos += 1;
                read_rec(&mut run.rec_bytes(*off))
            }
            RunReader::File(r) => read_rec(r),
        }
    }
}

fn spill_err(e: std::io::Error) -> ErrorKind {
    ErrorKind::Spill(e)
}

fn write_rec(w: &mut impl Write, key: &[u8], r: (i64, i64, u64, u32, u8)) -> Result<(), ErrorKind> {
    let (main, sub, at, elen, flags) = r;
    let len =
        u32::try_from(key.len()).map_err(|_| spill_err(std::io::Error::other("key over 4 GiB")))?;
    let mut b = [0u8; REC_HEAD];
    b[0..4].copy_from_slice(&len.to_le_bytes());
    b[4..12].copy_from_slice(&main.to_le_bytes());
    b[12..20].copy_from_slice(&sub.to_le_bytes());
    b[20..28].copy_from_slice(&at.to_le_bytes());
    b[28..32].copy_from_slice(&elen.to_le_bytes());
    b[32] = flags;
    w.write_all(&b).map_err(spill_err)?;
    w.write_all(key).map_err(spill_err)
}

fn read_rec(r: &mut impl Read) -> Result<Option<Rec>, ErrorKind> {
    let mut b = [0u8; REC_HEAD];
    // A clean end is EOF before the first byte of a record.
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(spill_err(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(spill_err(e)),
        }
    }
    let u = |r: std::ops::Range<usize>| -> [u8; 8] {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[r]);
        a
    };
    let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let mut key = vec![0u8; len];
    r.read_exact(&mut key).map_err(spill_err)?;
    Ok(Some(Rec {
        key,
        main: i64::from_le_bytes(u(4..12)),
        sub: i64::from_le_bytes(u(12..20)),
        at: u64::from_le_bytes(u(20..28)),
        len: u32::from_le_bytes([b[28], b[29], b[30], b[31]]),
        flags: b[32],
    }))
}

/// A heap entry: the next record of run `src`.
struct Head {
    rec: Rec,
    src: usize,
}

impl PartialEq for Head {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Head {
    /// Reversed: `BinaryHeap` pops the greatest, the merge wants the first
    /// key and, for one key, the newest revision.
    fn cmp(&self, o: &Self) -> Ordering {
        rec_order(
            (&o.rec.key, o.rec.main, o.rec.sub),
            (&self.rec.key, self.rec.main, self.rec.sub),
        )
        .then_with(|| o.src.cmp(&self.src))
    }
}

/// A k-way merge of sorted runs.
struct Merge {
    runs: Vec<RunReader>,
    heap: BinaryHeap<Head>,
}

impl Merge {
    fn new(mut runs: Vec<RunReader>) -> Result<Self, ErrorKind> {
        let mut heap = BinaryHeap::with_capacity(runs.len());
        for (src, r) in runs.iter_mut().enumerate() {
            if let Some(rec) = r.next()? {
                heap.push(Head { rec, src });
            }
        }
        Ok(Merge { runs, heap })
    }

    fn next(&mut self) -> Result<Option<Rec>, ErrorKind> {
        let Some(Head { rec, src }) = self.heap.pop() else {
            return Ok(None);
        };
        if let Some(next) = self.runs[src].next()? {
            self.heap.push(Head { rec: next, src });
        }
        Ok(Some(rec))
    }
}

/// The spilled runs and their private directory.
struct Spill {
    dir: tempfile::TempDir,
    files: Vec<PathBuf>,
    made: u64,
}

impl Spill {
    fn new(parent: Option<&Path>) -> Result<Self, ErrorKind> {
        use std::os::unix::fs::PermissionsExt;
        let mut b = tempfile::Builder::new();
        b.prefix("etcd-snapshot-index.")
            .permissions(std::fs::Permissions::from_mode(0o700));
        let dir = match parent {
            Some(p) => b.tempdir_in(p),
            None => b.tempdir(),
        }
        .map_err(spill_err)?;
        Ok(Spill {
            dir,
            files: Vec::new(),
            made: 0,
        })
    }

    fn create(&mut self) -> Result<(PathBuf, BufWriter<File>), ErrorKind> {
        let path = self.dir.path().join(format!("run-{}", self.made));
        self.made += 1;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(spill_err)?;
        Ok((path, BufWriter::with_capacity(RUN_BUFFER, f)))
    }

    /// Writes a sorted run.
    fn write(&mut self, run: &Run) -> Result<(), ErrorKind> {
        let (path, mut w) = self.create()?;
        for off in &run.order {
            w.write_all(run.rec_bytes(*off)).map_err(spill_err)?;
        }
        w.flush().map_err(spill_err)?;
        self.files.push(path);
        Ok(())
    }

    fn open(path: &Path) -> Result<RunReader, ErrorKind> {
        let f = File::open(path).map_err(spill_err)?;
        Ok(RunReader::File(BufReader::with_capacity(RUN_BUFFER, f)))
    }

    /// Merges runs, [`FANIN`] at a time, until at most `FANIN - 1` are left
    /// (room for the in-memory run in the final merge); older revisions of
    /// a key are dropped on the way.
    fn reduce(&mut self) -> Result<(), ErrorKind> {
        while self.files.len() >= FANIN {
            let group: Vec<PathBuf> = self.files.drain(..FANIN).collect();
            let readers = group
                .iter()
                .map(|p| Spill::open(p))
                .collect::<Result<Vec<_>, _>>()?;
            let mut merge = Merge::new(readers)?;
            let (path, mut w) = self.create()?;
            let mut last: Option<Vec<u8>> = None;
            while let Some(r) = merge.next()? {
                if last.as_deref() == Some(r.key.as_slice()) {
                    continue;
                }
                write_rec(&mut w, &r.key, (r.main, r.sub, r.at, r.len, r.flags))?;
                last = Some(r.key);
            }
            w.flush().map_err(spill_err)?;
            drop(merge);
            for p in group {
                std::fs::remove_file(p).map_err(spill_err)?;
            }
            self.files.push(path);
        }
        Ok(())
    }
}

/// The live keys at the file's latest revision, in key order.
pub struct Latest<'a, S: Source> {
    snap: &'a Snapshot<S>,
    revision: i64,
    merge: Merge,
    last_key: Option<Vec<u8>>,
    /// The inline `key` bucket's page (a small database), whose elements
    /// have no file offset.
    inline: Option<Rc<Node>>,
    /// The element last read.
    buf: Vec<u8>,
    stats: LatestStats,
    done: bool,
    /// Dropped last: removes the spilled runs.
    _spill: Option<Spill>,
}

impl<S: Source> std::fmt::Debug for Latest<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latest")
            .field("revision", &self.revision)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<S: Source> Latest<'_, S> {
    /// The file's revision: the newest revision in the `key` bucket, or the
    /// last finished compaction when that is newer.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Passes made, runs spilled and the most entries held at once.
    pub fn stats(&self) -> LatestStats {
        self.stats
    }

    /// The value of a winning entry, read at its recorded location: one
    /// positioned read of exactly its bytes (no page header, no neighbours).
    fn value(&mut self, r: &Rec) -> Result<KeyValue, ErrorKind> {
        let changed = |what: &str| ErrorKind::BadKeyValue {
            main: r.main,
            sub: r.sub,
            reason: format!("the revision's {what} changed between two reads"),
        };
        let len = r.len as usize;
        let elem: &[u8] = if r.flags & INLINE != 0 {
            let at = usize::try_from(r.at).map_err(|_| changed("location"))?;
            self.inline
                .as_ref()
                .and_then(|n| n.data.get(at..at.checked_add(len)?))
                .ok_or_else(|| changed("location"))?
        } else {
            self.buf.resize(len, 0);
            self.snap.src.read_exact_at(&mut self.buf, r.at)?;
            &self.buf
        };
        // A live revision's key is 17 bytes (18 is a tombstone's).
        let (rev, value) = elem.split_at(17.min(elem.len()));
        if parse_revision(rev) != Some((r.main, r.sub, false)) {
            return Err(changed("location"));
        }
        let kv = decode_kv(value, r.main, r.sub)?;
        if kv.key != r.key {
            return Err(changed("key"));
        }
        Ok(kv)
    }

    fn next_kv(&mut self) -> Result<Option<KeyValue>, ErrorKind> {
        while let Some(r) = self.merge.next()? {
            if self.last_key.as_deref() == Some(r.key.as_slice()) {
                continue; // an older revision of the key just yielded
            }
            let kv = if r.flags & TOMBSTONE != 0 {
                None
            } else {
                Some(self.value(&r)?)
            };
            self.last_key = Some(r.key);
            if let Some(kv) = kv {
                return Ok(Some(kv));
            }
        }
        Ok(None)
    }
}

impl<S: Source> Iterator for Latest<'_, S> {
    type Item = Result<KeyValue, SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_kv();
        if !matches!(item, Ok(Some(_))) {
            self.done = true;
        }
        let snap = self.snap;
        item.map_err(|k| snap.err(k)).transpose()
    }
}

/// The etcd key of a revision whose value starts past the leaf's first
/// page: field 1 of the `KeyValue` when it comes first (as etcd writes it),
/// read with small positioned reads; `None` when the value must be read
/// whole.
fn key_from_file<S: Source>(
    snap: &Snapshot<S>,
    at: u64,
    vsize: usize,
    main: i64,
    sub: i64,
) -> Result<Option<Vec<u8>>, ErrorKind> {
    let bad = |reason: String| ErrorKind::BadKeyValue { main, sub, reason };
    let mut head = vec![0u8; vsize.min(16)];
    snap.src.read_exact_at(&mut head, at)?;
    let mut b = head.as_slice();
    match prost::encoding::decode_varint(&mut b) {
        Ok(0x0a) => {}
        _ => return Ok(None),
    }
    let Ok(len) = prost::encoding::decode_varint(&mut b) else {
        return Ok(None);
    };
    let start = head.len() - b.len();
    let len = usize::try_from(len)
        .ok()
        .filter(|l| start.checked_add(*l).is_some_and(|end| end <= vsize))
        .ok_or_else(|| bad("field 1: length past the end".into()))?;
    let mut key = vec![0u8; len];
    snap.src.read_exact_at(&mut key, at + start as u64)?;
    Ok(Some(key))
}

impl<S: Source> Snapshot<S> {
    /// The latest revision of every live key starting with `prefix`, in key
    /// order, and the file's revision: what a range read at the file's
    /// latest revision returns. Memory is bounded by [`DEFAULT_INDEX_BYTES`]
    /// whatever the number of keys (see [`latest_with_options`](Self::latest_with_options)).
    pub fn latest(&self, prefix: &[u8]) -> Result<Latest<'_, S>, SnapshotError> {
        self.latest_with_options(prefix, &LatestOptions::default())
    }

    /// [`latest`](Self::latest) with an index of at most about `index_bytes`.
    pub fn latest_with_budget(
        &self,
        prefix: &[u8],
        index_bytes: usize,
    ) -> Result<Latest<'_, S>, SnapshotError> {
        self.latest_with_options(
            prefix,
            &LatestOptions {
                index_bytes,
                temp_parent: None,
            },
        )
    }

    /// [`latest`](Self::latest): one read of the `key` bucket indexing
    /// (key, revision, location) under `opts.index_bytes`, spilling sorted
    /// runs to a private temp dir when the index outgrows it, then a merge
    /// in key order that reads each live key's newest value once (see the
    /// module docs of `latest.rs`). [`Latest::stats`] tells how many runs
    /// were spilled and the most entries held at once.
    pub fn latest_with_options(
        &self,
        prefix: &[u8],
        opts: &LatestOptions,
    ) -> Result<Latest<'_, S>, SnapshotError> {
        // The index pass runs while a concurrent SHA-256 check finishes;
        // nothing is returned before it did, and a file that fails it is
        // reported as such even when the pass failed too.
        let indexed = self
            .top_bucket_kind("key")
            .and_then(|(root, page)| self.index(&root, page, prefix, opts));
        self.sha_gate().map_err(|k| self.err(k))?;
        let (mut latest, revision) = indexed.map_err(|k| self.err(k))?;
        // A compaction past the last write leaves etcd at the compaction's revision.
        let mut revision = revision;
        if let Some(c) = self.mvcc_meta()?.finished_compact_rev {
            revision = revision.max(c);
        }
        latest.revision = revision;
        Ok(latest)
    }

    fn index(
        &self,
        root: &BucketRoot,
        page: u64,
        prefix: &[u8],
        opts: &LatestOptions,
    ) -> Result<(Latest<'_, S>, i64), ErrorKind> {
        // Offsets are u32; a run holds at least one record.
        let budget = opts.index_bytes.clamp(64, u32::MAX as usize / 2);
        let mut run = Run::new(budget);
        let mut spill: Option<Spill> = None;
        let mut stats = LatestStats {
            passes: 1,
            ..Default::default()
        };
        let mut revision = 0i64;
        let mut n = 0u64;
        let ps = u64::from(self.meta.page_size);
        let mut cursor = self.cursor(root, page)?;
        cursor.head_only = true;
        while let Some(i) = cursor.advance()? {
            let Some((node, _)) = cursor.stack.last() else {
                break;
            };
            let (_, rev_at, ksize, vsize) = node.leaf_raw(i)?;
            let full = if node.inline {
                node.data.len()
            } else {
                (usize::try_from(node.header.overflow).unwrap_or(usize::MAX))
                    .saturating_add(1)
                    .saturating_mul(ps as usize)
            };
            let end = rev_at.checked_add(ksize).and_then(|e| e.checked_add(vsize));
            if end.is_none_or(|e| e > full) {
                return Err(ErrorKind::BadPage {
                    page: node.id,
                    what: format!(
                        "element at offset {} points outside the page ({full} bytes)",
                        HEADER + i * 16
                    ),
                });
            }
            let index = n;
            n += 1;
            let bad_rev = |len| ErrorKind::BadRevision { index, len };
            // The revision key (17 or 18 bytes) is nearly always on the
            // first page; read it from the file otherwise.
            let mut rev_buf = [0u8; 18];
            let rev: &[u8] = match node.data.get(rev_at..rev_at + ksize) {
                Some(r) => r,
                None if ksize <= 18 => {
                    self.src
                        .read_exact_at(&mut rev_buf[..ksize], node.id * ps + rev_at as u64)?;
                    &rev_buf[..ksize]
                }
                None => return Err(bad_rev(ksize)),
            };
            let (main, sub, tombstone) = parse_revision(rev).ok_or(bad_rev(ksize))?;
            revision = revision.max(main);
            let val_at = rev_at + ksize;
            let owned;
            let key: &[u8] = match node.data.get(val_at..val_at + vsize) {
                Some(v) => {
                    kv_key(v).map_err(|reason| ErrorKind::BadKeyValue { main, sub, reason })?
                }
                None => {
                    let at = node.id * ps + val_at as u64;
                    owned = match key_from_file(self, at, vsize, main, sub)? {
                        Some(k) => k,
                        None => {
                            let mut v = vec![0u8; vsize];
                            self.src.read_exact_at(&mut v, at)?;
                            kv_key(&v)
                                .map_err(|reason| ErrorKind::BadKeyValue { main, sub, reason })?
                                .to_vec()
                        }
                    };
                    &owned
                }
            };
            if !key.starts_with(prefix) {
                continue;
            }
            let elen = u32::try_from(ksize + vsize).map_err(|_| ErrorKind::BadPage {
                page: node.id,
                what: format!("element {i} is over 4 GiB"),
            })?;
            let (at, flags) = if node.inline {
                (rev_at as u64, INLINE)
            } else {
                (node.id * ps + rev_at as u64, 0)
            };
            let flags = flags | if tombstone { TOMBSTONE } else { 0 };
            if !run.fits(key.len()) {
                let s = match &mut spill {
                    Some(s) => s,
                    None => spill.insert(Spill::new(opts.temp_parent.as_deref())?),
                };
                run.sort();
                s.write(&run)?;
                stats.spilled_runs += 1;
                run.clear();
                if s.files.len() >= 2 * FANIN {
                    let before = s.made;
                    s.reduce()?;
                    stats.spilled_runs += s.made - before;
                }
            }
            run.push(key, (main, sub, at, elen, flags))?;
            stats.max_keys_held = stats.max_keys_held.max(run.order.len() as u64);
            stats.max_index_bytes = stats.max_index_bytes.max(run.held() as u64);
        }
        run.sort();
        let mut readers = Vec::new();
        if let Some(s) = &mut spill {
            let before = s.made;
            s.reduce()?;
            stats.spilled_runs += s.made - before;
            for p in &s.files {
                readers.push(Spill::open(p)?);
            }
        }
        readers.push(RunReader::Mem(run, 0));
        let merge = Merge::new(readers)?;
        // An inline bucket (a small database) has no page of its own: its
        // entries' location is the parent's page id, and the value reads
        // below always find its node here.
        let inline = match root {
            BucketRoot::Inline(_) => Some(self.root_node(root, page)?),
            BucketRoot::Page(_) => None,
        };
        Ok((
            Latest {
                snap: self,
                revision,
                merge,
                last_key: None,
                inline,
                buf: Vec::new(),
                stats,
                done: false,
                _spill: spill,
            },
            revision,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(budget: usize, recs: &[(&[u8], i64, u8)]) -> Run {
        let mut r = Run::new(budget);
        for (k, main, flags) in recs {
            assert!(r.fits(k.len()));
            r.push(k, (*main, 0, *main as u64 * 100, 40, *flags))
                .unwrap();
        }
        r.sort();
        r
    }

    #[test]
    fn records_round_trip_through_bytes() {
        let mut b = Vec::new();
        write_rec(
            &mut b,
            b"/registry/secrets/a/b",
            (7, 2, 4096 * 9 + 40, 1234, TOMBSTONE),
        )
        .unwrap();
        write_rec(&mut b, b"", (1, 0, 0, 0, 0)).unwrap();
        let mut r = b.as_slice();
        let first = read_rec(&mut r).unwrap().unwrap();
        assert_eq!(
            first,
            Rec {
                key: b"/registry/secrets/a/b".to_vec(),
                main: 7,
                sub: 2,
                at: 4096 * 9 + 40,
                len: 1234,
                flags: TOMBSTONE,
            }
        );
        assert_eq!(read_rec(&mut r).unwrap().unwrap().main, 1);
        assert!(read_rec(&mut r).unwrap().is_none(), "clean end");
        // A record cut short is an error, not the end.
        let mut cut = &b[..REC_HEAD + 3];
        assert!(read_rec(&mut cut).is_err());
    }

    #[test]
    fn a_run_keeps_the_newest_revision_per_key_and_the_merge_is_in_key_order() {
        let a = run(
            4096,
            &[
                (b"b", 3, 0),
                (b"a", 1, 0),
                (b"b", 5, TOMBSTONE),
                (b"c", 2, 0),
            ],
        );
        let order: Vec<_> = a
            .order
            .iter()
            .map(|o| Run::key_at(&a.arena, *o))
            .map(|(k, m, _)| (k.to_vec(), m))
            .collect();
        assert_eq!(
            order,
            vec![(b"a".to_vec(), 1), (b"b".to_vec(), 5), (b"c".to_vec(), 2)]
        );
        let b = run(4096, &[(b"a", 9, 0), (b"d", 8, 0), (b"c", 1, 0)]);
        let mut m = Merge::new(vec![RunReader::Mem(a, 0), RunReader::Mem(b, 0)]).unwrap();
        let mut got = Vec::new();
        while let Some(r) = m.next().unwrap() {
            got.push((r.key, r.main));
        }
        // Every key in order; for one key the newest revision first.
        assert_eq!(
            got,
            vec![
                (b"a".to_vec(), 9),
                (b"a".to_vec(), 1),
                (b"b".to_vec(), 5),
                (b"c".to_vec(), 2),
                (b"c".to_vec(), 1),
                (b"d".to_vec(), 8),
            ]
        );
    }

    #[test]
    fn a_run_stays_within_its_budget() {
        let mut r = Run::new(1024);
        assert_eq!(r.held(), 1024);
        let mut n = 0;
        while r.fits(20) {
            r.push(&[b'k'; 20], (n, 0, 0, 0, 0)).unwrap();
            n += 1;
        }
        assert_eq!(r.held(), 1024, "no growth past the budget");
        assert!(n as usize <= 1024 / (REC_HEAD + 20));
        // An empty run takes one record whatever its size.
        let mut r = Run::new(64);
        assert!(r.fits(1000));
        r.push(&[b'k'; 1000], (1, 0, 0, 0, 0)).unwrap();
        assert!(!r.fits(1));
    }
}
