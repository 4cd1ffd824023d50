//! A read-only reader of etcd's bolt database: an `etcdctl snapshot save`
//! file or a stopped member's `member/snap/db`, without an etcd.
//!
//! What it reads (see [`page`] for the layout):
//! - the two meta pages, each checked with its FNV-64a checksum; the valid
//!   one with the higher txid wins, as in bbolt;
//! - the B+tree of branch and leaf pages (with overflow pages), nested and
//!   inline buckets;
//! - etcd's `key` bucket: keys are revisions (`main` 8 bytes BE, `_`, `sub`
//!   8 bytes BE, plus `t` for a tombstone), values `mvccpb.KeyValue`
//!   ([`Revisions`] in revision order, [`Snapshot::latest`] in key order);
//! - the `meta` bucket's compaction marks and consistent index ([`MvccMeta`]);
//! - free pages: the freelist's ids, pages no bucket reaches, and pages past
//!   the high-water mark ([`Snapshot::free_pages`]).
//!
//! The SHA-256 that `etcdctl snapshot save` appends is checked when present
//! (a file whose length is 32 bytes past a multiple of 512 has one; a
//! member's db has none).
//!
//! Reads are positioned reads of pages (no mmap, no `unsafe`): memory is
//! a few pages, the upper branch pages (at most 4 MiB) and, for
//! [`Snapshot::latest`], an index of (key, revision, value location)
//! bounded by a byte budget: one read of the `key` bucket, sorted runs
//! spilled to a private temp dir when the index outgrows the budget, then a
//! merge in key order (see [`Latest`]; the design and why: `latest.rs`).
//! Every page id and offset is
//! bounds-checked and tree walks carry a cycle guard: a corrupt file is an
//! [`SnapshotError`] naming the file and what is wrong, never a panic.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod error;
mod latest;
pub mod page;

use std::cell::RefCell;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sha2::{Digest, Sha256};

pub use error::{ErrorKind, MetaProblem, SnapshotError};
pub use latest::{
    DEFAULT_INDEX_BYTES, FANIN, INDEX_ENTRY_BYTES, Latest, LatestOptions, LatestStats,
};
use page::{BucketRoot, HEADER, Meta, Node};

/// The deepest tree accepted (a real bolt tree of a few TiB is < 10 levels).
const MAX_DEPTH: usize = 64;
/// Bytes of branch pages kept in memory for lookups: the upper levels of
/// the tree (a 1M-key `key` bucket has ~2,500 branch pages of 4 KiB; the
/// first ones read, the top levels, stay).
const BRANCH_CACHE_BYTES: usize = 4 * 1024 * 1024;

/// Where the bytes come from: a file, or memory (fuzzing and tests).
pub trait Source {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; fails when the range is past the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// A file opened read-only.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

impl Source for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).ok();
        let src = start
            .and_then(|s| Some((s, s.checked_add(buf.len())?)))
            .and_then(|(s, e)| self.get(s..e));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// Whether the file carried `etcdctl snapshot save`'s SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// The appended SHA-256 matched the database bytes.
    Sha256Verified,
    /// No SHA-256 appended (a member's `member/snap/db`); only the meta
    /// checksum vouches for the file.
    NoSha256,
}

/// An opened, validated bolt file.
#[derive(Debug)]
pub struct Snapshot<S: Source = FileSource> {
    src: S,
    path: PathBuf,
    meta: Meta,
    /// Database length (without the appended SHA-256).
    db_len: u64,
    integrity: Integrity,
    /// Branch pages already read (bounded by [`BRANCH_CACHE_BYTES`]).
    branches: std::cell::RefCell<std::collections::HashMap<u64, Rc<Node>>>,
    /// The appended SHA-256's check when it runs on its own thread.
    sha: RefCell<ShaCheck>,
}

/// Where the SHA-256 check of a [`Snapshot::open_concurrent`] file stands.
#[derive(Debug)]
enum ShaCheck {
    /// Checked (or nothing to check).
    Done,
    /// Hashing on its own thread; `stop` ends it early when the snapshot
    /// is dropped.
    Running {
        thread: std::thread::JoinHandle<Result<(), ErrorKind>>,
        stop: Arc<AtomicBool>,
    },
    /// Failed: the message, and whether it was a mismatch.
    Failed(String, bool),
}

impl<S: Source> Drop for Snapshot<S> {
    fn drop(&mut self) {
        if let ShaCheck::Running { stop, .. } = &*self.sha.borrow() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Hashes the database bytes and compares with the appended SHA-256;
/// stops early (with an error nobody reads) when `stop` is set.
fn sha256_check(src: &impl Source, db_len: u64, stop: &AtomicBool) -> Result<(), ErrorKind> {
    let mut want = [0u8; 32];
    src.read_exact_at(&mut want, db_len)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < db_len {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ErrorKind::Io(std::io::Error::other("stopped")));
        }
        let n = (db_len - off).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    if h.finalize().as_slice() != want {
        return Err(ErrorKind::Sha256Mismatch);
    }
    Ok(())
}

/// One revision of a key, as stored in the `key` bucket.
#[derive(Clone, PartialEq, Eq)]
pub struct Revision {
    /// Main revision (the etcd revision of the transaction).
    pub main: i64,
    /// Sub revision (position within the transaction).
    pub sub: i64,
    /// Whether this revision deleted the key.
    pub tombstone: bool,
    /// The stored `mvccpb.KeyValue`.
    pub kv: KeyValue,
}

impl std::fmt::Debug for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revision")
            .field("main", &self.main)
            .field("sub", &self.sub)
            .field("tombstone", &self.tombstone)
            .field("kv", &self.kv)
            .finish()
    }
}

/// etcd's `mvccpb.KeyValue` (api/mvccpb/kv.proto), decoded with prost.
#[derive(Clone, PartialEq, Eq, prost::Message)]
#[prost(skip_debug)]
pub struct KeyValue {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Revision of the last creation of the key.
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    /// Revision of the last modification.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// Number of modifications since creation.
    #[prost(int64, tag = "4")]
    pub version: i64,
    /// The value (possibly plaintext: never logged; `Debug` shows its length).
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// Lease id (0: none).
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

impl std::fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .field("version", &self.version)
            .field("value", &format_args!("<{} bytes>", self.value.len()))
            .field("lease", &self.lease)
            .finish()
    }
}

/// The `meta` bucket's MVCC marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MvccMeta {
    /// `scheduledCompactRev`: the last compaction asked for.
    pub scheduled_compact_rev: Option<i64>,
    /// `finishedCompactRev`: the last compaction done.
    pub finished_compact_rev: Option<i64>,
    /// `consistent_index`: the last raft entry applied.
    pub consistent_index: Option<u64>,
}

/// Why a page is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeKind {
    /// Listed in the freelist page, or reached by no bucket below the
    /// high-water mark: freed by a past transaction, old data may remain.
    Freed,
    /// Past the high-water mark (a member's preallocated space).
    Unused,
}

/// A run of free pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeRange {
    /// First page id.
    pub start: u64,
    /// Number of pages.
    pub len: u64,
    /// Why they are free.
    pub kind: FreeKind,
}

impl Snapshot<FileSource> {
    /// Opens and validates `path` (meta pages, length, appended SHA-256).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SnapshotError> {
        let (source, path) = FileSource::open(path)?;
        Snapshot::from_source(source, path)
    }

    /// [`open`](Snapshot::open), but the appended SHA-256 is checked on its
    /// own thread (a second `pread` stream over the file) while the caller
    /// starts reading: on two cores the hash costs no wall time. Every
    /// method that returns data waits for the check first (the latest
    /// view: after its index pass, before the first value), so a file whose
    /// SHA-256 does not match still yields nothing but that error; an error
    /// found while reading a file whose SHA-256 does not match is reported
    /// as the mismatch.
    pub fn open_concurrent(path: impl AsRef<Path>) -> Result<Self, SnapshotError> {
        let (source, path) = FileSource::open(path)?;
        let hashing = FileSource {
            file: source.file.try_clone().map_err(|e| SnapshotError {
                path: path.clone(),
                kind: e.into(),
            })?,
            len: source.len,
        };
        let s = Snapshot::from_source_unhashed(source, path)?;
        if s.integrity == Integrity::Sha256Verified {
            let stop = Arc::new(AtomicBool::new(false));
            let db_len = s.db_len;
            let flag = Arc::clone(&stop);
            let thread = std::thread::Builder::new()
                .name("snapshot-sha256".into())
                .spawn(move || sha256_check(&hashing, db_len, &flag))
                .map_err(|e| s.err(e.into()))?;
            *s.sha.borrow_mut() = ShaCheck::Running { thread, stop };
        }
        Ok(s)
    }
}

impl FileSource {
    /// Opens `path` for reading; refuses what is not a regular file.
    fn open(path: impl AsRef<Path>) -> Result<(FileSource, PathBuf), SnapshotError> {
        let path = path.as_ref().to_owned();
        let err = |kind: ErrorKind| SnapshotError {
            path: path.clone(),
            kind,
        };
        let file = File::open(&path).map_err(|e| err(e.into()))?;
        let md = file.metadata().map_err(|e| err(e.into()))?;
        if !md.is_file() {
            return Err(err(ErrorKind::Io(std::io::Error::other(
                "not a regular file",
            ))));
        }
        Ok((
            FileSource {
                file,
                len: md.len(),
            },
            path,
        ))
    }
}

impl<S: Source> Snapshot<S> {
    /// Validates a snapshot held by `src` (meta pages, length, appended
    /// SHA-256); `path` names it in errors.
    pub fn from_source(src: S, path: PathBuf) -> Result<Self, SnapshotError> {
        let s = Self::from_source_unhashed(src, path)?;
        if s.integrity == Integrity::Sha256Verified {
            sha256_check(&s.src, s.db_len, &AtomicBool::new(false)).map_err(|k| s.err(k))?;
        }
        Ok(s)
    }

    /// Validates the meta pages and length; the SHA-256 is left to the caller.
    fn from_source_unhashed(src: S, path: PathBuf) -> Result<Self, SnapshotError> {
        match Self::validate(&src) {
            Ok((meta, db_len, integrity)) => Ok(Snapshot {
                src,
                path,
                meta,
                db_len,
                integrity,
                branches: Default::default(),
                sha: RefCell::new(ShaCheck::Done),
            }),
            Err(kind) => Err(SnapshotError { path, kind }),
        }
    }

    /// Waits for a SHA-256 check running on its own thread
    /// ([`Snapshot::open_concurrent`]); every method that returns data from
    /// the file calls it first, so nothing is returned from a file whose
    /// SHA-256 does not match. A no-op for [`Snapshot::open`].
    fn sha_gate(&self) -> Result<(), ErrorKind> {
        let mut sha = self.sha.borrow_mut();
        match std::mem::replace(&mut *sha, ShaCheck::Done) {
            ShaCheck::Done => Ok(()),
            ShaCheck::Running { thread, .. } => {
                let r = thread.join().unwrap_or_else(|_| {
                    Err(ErrorKind::Io(std::io::Error::other(
                        "the SHA-256 thread stopped",
                    )))
                });
                if let Err(e) = &r {
                    *sha = ShaCheck::Failed(e.to_string(), matches!(e, ErrorKind::Sha256Mismatch));
                }
                r
            }
            ShaCheck::Failed(msg, mismatch) => {
                let e = if mismatch {
                    ErrorKind::Sha256Mismatch
                } else {
                    ErrorKind::Io(std::io::Error::other(msg.clone()))
                };
                *sha = ShaCheck::Failed(msg, mismatch);
                Err(e)
            }
        }
    }

    fn validate(src: &S) -> Result<(Meta, u64, Integrity), ErrorKind> {
        let len = src.len();
        if len == 0 {
            return Err(ErrorKind::Empty);
        }
        if len < 1024 {
            return Err(ErrorKind::TooShort { len });
        }
        let read = |off: u64, n: usize| -> Option<Vec<u8>> {
            let mut b = vec![0u8; n];
            src.read_exact_at(&mut b, off).ok().map(|()| b)
        };
        let meta_len = HEADER + 64;
        let meta0 = read(0, meta_len)
            .ok_or(MetaProblem::Missing)
            .and_then(|p| page::parse_meta(&p, 0));
        // Meta page 1 sits one page further; when meta 0 is unreadable the
        // page size is unknown, so try the sizes bolt uses.
        let meta1 = match &meta0 {
            Ok(m) => read(u64::from(m.page_size), meta_len)
                .ok_or(MetaProblem::Missing)
                .and_then(|p| page::parse_meta(&p, 1)),
            Err(_) => {
                let mut found = Err(MetaProblem::Missing);
                for size in [4096u32, 8192, 16384, 32768, 65536, 2048, 1024, 512] {
                    match read(u64::from(size), meta_len).map(|p| page::parse_meta(&p, 1)) {
                        Some(Ok(m)) if m.page_size == size => {
                            found = Ok(m);
                            break;
                        }
                        Some(Err(e)) if size == 4096 => found = Err(e),
                        _ => {}
                    }
                }
                found
            }
        };
        // A meta page whose page size disagrees with where meta 1 was found
        // is not trusted.
        let meta1 = match (&meta0, meta1) {
            (Ok(m0), Ok(m1)) if m1.page_size != m0.page_size => {
                Err(MetaProblem::PageSizeMismatch(m1.page_size, m0.page_size))
            }
            (_, m1) => m1,
        };
        let meta = match (meta0, meta1) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Ok(a), Err(_)) => a,
            (Err(_), Ok(b)) => b,
            (Err(meta0), Err(meta1)) => return Err(ErrorKind::NoValidMeta { meta0, meta1 }),
        };
        let ps = meta.page_size;
        if !ps.is_power_of_two() || !(512..=1 << 20).contains(&ps) {
            return Err(ErrorKind::BadPageSize(ps));
        }
        let has_sha = len % 512 == 32;
        let db_len = if has_sha { len - 32 } else { len };
        if db_len % u64::from(ps) != 0 {
            return Err(ErrorKind::NotPageMultiple {
                len: db_len,
                page_size: ps,
            });
        }
        let held = db_len / u64::from(ps);
        if meta.pgid > held || meta.pgid < 2 {
            return Err(ErrorKind::Truncated {
                pages: meta.pgid,
                held,
                page_size: ps,
            });
        }
        let integrity = if has_sha {
            Integrity::Sha256Verified
        } else {
            Integrity::NoSha256
        };
        Ok((meta, db_len, integrity))
    }

    /// The file's name as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The meta page in use.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Whether an appended SHA-256 was verified (for
    /// [`open_concurrent`](Snapshot::open_concurrent): whether the file
    /// carries one, verified before any method returns data).
    pub fn integrity(&self) -> Integrity {
        self.integrity
    }

    /// Pages held by the file (in use, free, and unused).
    pub fn pages_held(&self) -> u64 {
        self.db_len / u64::from(self.meta.page_size)
    }

    fn err(&self, kind: ErrorKind) -> SnapshotError {
        SnapshotError {
            path: self.path.clone(),
            kind,
        }
    }

    /// Reads the raw bytes of page `id` (one page, no overflow) — for
    /// scanning free pages. Never returns bytes past the database.
    pub fn raw_page(&self, id: u64) -> Result<Vec<u8>, SnapshotError> {
        self.sha_gate().map_err(|k| self.err(k))?;
        if id >= self.pages_held() {
            return Err(self.err(ErrorKind::PageOutOfRange {
                page: id,
                from: "the caller".into(),
                pages: self.pages_held(),
            }));
        }
        let ps = self.meta.page_size as usize;
        let mut b = vec![0u8; ps];
        self.src
            .read_exact_at(&mut b, id * ps as u64)
            .map_err(|e| self.err(e.into()))?;
        Ok(b)
    }

    /// Reads page `id` with its overflow pages; checks its header.
    fn read_pages(&self, id: u64, from: PageRef) -> Result<(page::Header, Vec<u8>), ErrorKind> {
        let pages = self.meta.pgid;
        let oor = || ErrorKind::PageOutOfRange {
            page: id,
            from: from.to_string(),
            pages,
        };
        if id < 2 || id >= pages {
            return Err(oor());
        }
        let ps = u64::from(self.meta.page_size);
        // One read for the page; a second only when it has overflow pages.
        let mut data = vec![0u8; ps as usize];
        self.src.read_exact_at(&mut data, id * ps)?;
        let h = page::Header::parse(&data).ok_or_else(oor)?;
        if h.id != id {
            return Err(ErrorKind::BadPage {
                page: id,
                what: format!(
                    "header says page {} (wrong page size, or a corrupt reference from {from})",
                    h.id
                ),
            });
        }
        let n = u64::from(h.overflow) + 1;
        if id.checked_add(n).is_none_or(|end| end > pages) {
            return Err(ErrorKind::BadPage {
                page: id,
                what: format!("{} overflow pages run past the last page", h.overflow),
            });
        }
        if n > 1 {
            data.resize((n * ps) as usize, 0);
            self.src
                .read_exact_at(&mut data[ps as usize..], (id + 1) * ps)?;
        }
        Ok((h, data))
    }

    fn node(&self, id: u64, from: PageRef) -> Result<Rc<Node>, ErrorKind> {
        if let Some(n) = self.branches.borrow().get(&id) {
            return Ok(Rc::clone(n));
        }
        let (_, data) = self.read_pages(id, from)?;
        let node = Rc::new(Node::new(id, false, data)?);
        // Branch pages are few and read once per lookup: keep them.
        let mut cache = self.branches.borrow_mut();
        let max_pages = BRANCH_CACHE_BYTES / self.meta.page_size.max(1) as usize;
        if !node.is_leaf()
            && node.data.len() == self.meta.page_size as usize
            && cache.len() < max_pages
        {
            cache.insert(id, Rc::clone(&node));
        }
        Ok(node)
    }

    /// [`node`](Self::node), but a leaf with overflow pages is read
    /// without them when its element headers fit its first page: the
    /// caller reads what it needs of a large value from the file.
    fn node_head(&self, id: u64, from: PageRef) -> Result<Rc<Node>, ErrorKind> {
        if let Some(n) = self.branches.borrow().get(&id) {
            return Ok(Rc::clone(n));
        }
        let pages = self.meta.pgid;
        if id < 2 || id >= pages {
            return Err(ErrorKind::PageOutOfRange {
                page: id,
                from: from.to_string(),
                pages,
            });
        }
        let ps = u64::from(self.meta.page_size);
        let mut data = vec![0u8; ps as usize];
        self.src.read_exact_at(&mut data, id * ps)?;
        match page::Header::parse(&data) {
            Some(h)
                if h.id == id
                    && h.flags == page::LEAF
                    && h.overflow > 0
                    && id
                        .checked_add(u64::from(h.overflow) + 1)
                        .is_some_and(|e| e <= pages) =>
            {
                match Node::new(id, false, data) {
                    Ok(n) => Ok(Rc::new(n)),
                    // Element headers past the first page: read it whole.
                    Err(_) => self.node(id, from),
                }
            }
            // Everything else (and every error) as a whole read does it.
            _ => self.node(id, from),
        }
    }

    fn root_node(&self, root: &BucketRoot, parent: u64) -> Result<Rc<Node>, ErrorKind> {
        match root {
            BucketRoot::Page(id) => self.node(*id, PageRef::Bucket(parent)),
            BucketRoot::Inline(data) => Ok(Rc::new(Node::new(parent, true, data.clone())?)),
        }
    }

    /// A cursor over a bucket's entries in key order.
    fn cursor(&self, root: &BucketRoot, parent: u64) -> Result<Cursor<'_, S>, ErrorKind> {
        let node = self.root_node(root, parent)?;
        let mut seen = PageSet::new(self.meta.pgid);
        if !node.inline {
            seen.insert(node.id)?;
        }
        Ok(Cursor {
            snap: self,
            stack: vec![(node, 0)],
            seen,
            head_only: false,
        })
    }

    /// Finds `name` as a bucket in the bucket rooted at `root`.
    fn find_bucket(
        &self,
        root: &BucketRoot,
        parent: u64,
        name: &[u8],
    ) -> Result<Option<(BucketRoot, u64)>, ErrorKind> {
        match self.get(root, parent, name)? {
            Some((flags, value, page)) if flags & page::BUCKET_LEAF != 0 => {
                Ok(Some((page::bucket_root(&value, page)?, page)))
            }
            _ => Ok(None),
        }
    }

    /// Looks `key` up by descending the tree: (flags, value, leaf page).
    fn get(
        &self,
        root: &BucketRoot,
        parent: u64,
        key: &[u8],
    ) -> Result<Option<(u32, Vec<u8>, u64)>, ErrorKind> {
        let mut node = self.root_node(root, parent)?;
        for _ in 0..MAX_DEPTH {
            if node.is_leaf() {
                for i in 0..node.count() {
                    let e = node.leaf(i)?;
                    if e.key == key {
                        return Ok(Some((e.flags, e.value.to_vec(), node.id)));
                    }
                }
                return Ok(None);
            }
            // The last child whose first key is <= key (else the first).
            let mut child = node.branch(0)?.1;
            for i in 1..node.count() {
                let (k, c) = node.branch(i)?;
                if k > key {
                    break;
                }
                child = c;
            }
            node = self.node(child, PageRef::Branch(node.id))?;
        }
        Err(ErrorKind::TooDeep(MAX_DEPTH, node.id))
    }

    fn top_bucket(&self, name: &'static str) -> Result<(BucketRoot, u64), SnapshotError> {
        self.top_bucket_kind(name).map_err(|k| self.err(k))
    }

    fn top_bucket_kind(&self, name: &'static str) -> Result<(BucketRoot, u64), ErrorKind> {
        let root = BucketRoot::Page(self.meta.root);
        self.find_bucket(&root, self.meta.root, name.as_bytes())?
            .ok_or(ErrorKind::NoBucket(name))
    }

    /// The `meta` bucket's compaction marks and consistent index.
    pub fn mvcc_meta(&self) -> Result<MvccMeta, SnapshotError> {
        self.sha_gate().map_err(|k| self.err(k))?;
        let (meta, page) = self.top_bucket("meta")?;
        let get = |name: &'static str| {
            self.get(&meta, page, name.as_bytes())
                .map(|v| v.map(|(_, v, _)| v))
                .map_err(|k| self.err(k))
        };
        let rev = |name: &'static str| -> Result<Option<i64>, SnapshotError> {
            match get(name)? {
                None => Ok(None),
                Some(v) => match parse_revision(&v) {
                    Some((main, _, _)) => Ok(Some(main)),
                    None => Err(self.err(ErrorKind::BadMetaValue {
                        name,
                        len: v.len(),
                        expected: 17,
                    })),
                },
            }
        };
        let consistent_index = match get("consistent_index")? {
            None => None,
            Some(v) => Some(u64::from_be_bytes(v.as_slice().try_into().map_err(
                |_| {
                    self.err(ErrorKind::BadMetaValue {
                        name: "consistent_index",
                        len: v.len(),
                        expected: 8,
                    })
                },
            )?)),
        };
        Ok(MvccMeta {
            scheduled_compact_rev: rev("scheduledCompactRev")?,
            finished_compact_rev: rev("finishedCompactRev")?,
            consistent_index,
        })
    }

    /// Every revision in the `key` bucket, in revision order.
    pub fn revisions(&self) -> Result<Revisions<'_, S>, SnapshotError> {
        self.sha_gate().map_err(|k| self.err(k))?;
        let (root, page) = self.top_bucket("key")?;
        let cursor = self.cursor(&root, page).map_err(|k| self.err(k))?;
        Ok(Revisions {
            cursor,
            index: 0,
            done: false,
        })
    }

    /// Free pages: listed in the freelist, reached by no bucket, or past the
    /// high-water mark. Walks every bucket once (memory: one bit per page).
    pub fn free_pages(&self) -> Result<Vec<FreeRange>, SnapshotError> {
        self.sha_gate().map_err(|k| self.err(k))?;
        let e = |k| self.err(k);
        let mut used = PageSet::new(self.meta.pgid);
        used.insert(0).map_err(e)?;
        used.insert(1).map_err(e)?;
        // Walk every bucket, nested ones too; a page reached twice is a cycle.
        let mut buckets = vec![(BucketRoot::Page(self.meta.root), self.meta.root)];
        while let Some((root, parent)) = buckets.pop() {
            if let BucketRoot::Page(id) = root {
                self.mark_tree(id, &mut used, &mut buckets, 0).map_err(e)?;
            } else {
                let node = self.root_node(&root, parent).map_err(e)?;
                collect_buckets(&node, &mut buckets).map_err(e)?;
            }
        }
        let mut listed = Vec::new();
        if self.meta.freelist != page::NO_FREELIST {
            let (h, data) = self
                .read_pages(self.meta.freelist, PageRef::Meta)
                .map_err(e)?;
            if h.flags != page::FREELIST {
                return Err(e(ErrorKind::BadPage {
                    page: self.meta.freelist,
                    what: format!("flags 0x{:02x}: expected the freelist", h.flags),
                }));
            }
            for p in self.meta.freelist..=self.meta.freelist + u64::from(h.overflow) {
                used.insert(p).map_err(e)?;
            }
            let (count, start) = if h.count == 0xffff {
                let n = page::u64_at(&data, HEADER).unwrap_or(0);
                (n, HEADER + 8)
            } else {
                (u64::from(h.count), HEADER)
            };
            for i in 0..count {
                let off = usize::try_from(i)
                    .ok()
                    .and_then(|i| i.checked_mul(8))
                    .and_then(|o| o.checked_add(start));
                let id = off.and_then(|o| page::u64_at(&data, o)).ok_or_else(|| {
                    e(ErrorKind::BadPage {
                        page: self.meta.freelist,
                        what: format!("freelist of {count} ids does not fit its pages"),
                    })
                })?;
                if id < 2 || id >= self.meta.pgid {
                    return Err(e(ErrorKind::PageOutOfRange {
                        page: id,
                        from: "the freelist".into(),
                        pages: self.meta.pgid,
                    }));
                }
                listed.push(id);
            }
        }
        let mut out: Vec<FreeRange> = Vec::new();
        let mut push = |id: u64, kind: FreeKind| match out.last_mut() {
            Some(r) if r.kind == kind && r.start + r.len == id => r.len += 1,
            _ => out.push(FreeRange {
                start: id,
                len: 1,
                kind,
            }),
        };
        for id in 2..self.meta.pgid {
            if !used.contains(id) {
                push(id, FreeKind::Freed);
            }
        }
        // Listed ids are also unreached (a page in use is never listed).
        for id in listed {
            if used.contains(id) {
                return Err(e(ErrorKind::BadPage {
                    page: id,
                    what: "listed in the freelist but in use by a bucket".into(),
                }));
            }
        }
        for id in self.meta.pgid..self.pages_held() {
            push(id, FreeKind::Unused);
        }
        Ok(out)
    }

    fn mark_tree(
        &self,
        id: u64,
        used: &mut PageSet,
        buckets: &mut Vec<(BucketRoot, u64)>,
        depth: usize,
    ) -> Result<(), ErrorKind> {
        if depth >= MAX_DEPTH {
            return Err(ErrorKind::TooDeep(MAX_DEPTH, id));
        }
        let (h, data) = self.read_pages(id, PageRef::Tree)?;
        for p in id..=id + u64::from(h.overflow) {
            used.insert(p)?;
        }
        let node = Node::new(id, false, data)?;
        if node.is_leaf() {
            return collect_buckets(&node, buckets);
        }
        for i in 0..node.count() {
            let (_, child) = node.branch(i)?;
            self.mark_tree(child, used, buckets, depth + 1)?;
        }
        Ok(())
    }
}

fn collect_buckets(node: &Node, buckets: &mut Vec<(BucketRoot, u64)>) -> Result<(), ErrorKind> {
    for i in 0..node.count() {
        let e = node.leaf(i)?;
        if e.flags & page::BUCKET_LEAF != 0 {
            buckets.push((page::bucket_root(e.value, node.id)?, node.id));
        }
    }
    Ok(())
}

/// Parses a revision key: (main, sub, tombstone).
pub fn parse_revision(k: &[u8]) -> Option<(i64, i64, bool)> {
    let tombstone = match k.len() {
        17 => false,
        18 if k[17] == b't' => true,
        _ => return None,
    };
    if k[8] != b'_' {
        return None;
    }
    let main = i64::from_be_bytes(k[..8].try_into().ok()?);
    let sub = i64::from_be_bytes(k[9..17].try_into().ok()?);
    Some((main, sub, tombstone))
}

/// Where a page id came from (named in errors; formatted only then).
#[derive(Debug, Clone, Copy)]
enum PageRef {
    Meta,
    Branch(u64),
    Bucket(u64),
    Tree,
}

impl std::fmt::Display for PageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PageRef::Meta => f.write_str("the meta page"),
            PageRef::Branch(p) => write!(f, "branch page {p}"),
            PageRef::Bucket(p) => write!(f, "a bucket on page {p}"),
            PageRef::Tree => f.write_str("a bucket tree"),
        }
    }
}

/// One bit per page id.
#[derive(Debug)]
struct PageSet {
    bits: Vec<u64>,
    pages: u64,
}

impl PageSet {
    fn new(pages: u64) -> Self {
        PageSet {
            bits: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    fn contains(&self, id: u64) -> bool {
        id < self.pages && self.bits[(id / 64) as usize] & (1 << (id % 64)) != 0
    }

    /// Marks `id`; a page marked twice is a cycle.
    fn insert(&mut self, id: u64) -> Result<(), ErrorKind> {
        if id >= self.pages {
            return Err(ErrorKind::PageOutOfRange {
                page: id,
                from: "a bucket tree".into(),
                pages: self.pages,
            });
        }
        if self.contains(id) {
            return Err(ErrorKind::Cycle { page: id });
        }
        self.bits[(id / 64) as usize] |= 1 << (id % 64);
        Ok(())
    }
}

/// A leaf entry: (flags, key, value).
type Entry = (u32, Vec<u8>, Vec<u8>);

/// Walks one bucket's tree in key order.
struct Cursor<'a, S: Source> {
    snap: &'a Snapshot<S>,
    stack: Vec<(Rc<Node>, usize)>,
    seen: PageSet,
    /// Leaves with overflow pages are read without them (their elements
    /// are read from the file as needed): the latest view's index pass.
    head_only: bool,
}

/// The `key` field (1) of an encoded `mvccpb.KeyValue`, borrowed.
fn kv_key(buf: &[u8]) -> Result<&[u8], String> {
    let mut b = buf;
    let mut key: &[u8] = &[];
    while !b.is_empty() {
        let tag = prost::encoding::decode_varint(&mut b).map_err(|e| e.to_string())?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                prost::encoding::decode_varint(&mut b).map_err(|e| e.to_string())?;
            }
            2 => {
                let len = prost::encoding::decode_varint(&mut b).map_err(|e| e.to_string())?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| *l <= b.len())
                    .ok_or_else(|| format!("field {field}: length past the end"))?;
                if field == 1 {
                    key = &b[..len];
                }
                b = &b[len..];
            }
            1 if b.len() >= 8 => b = &b[8..],
            5 if b.len() >= 4 => b = &b[4..],
            _ => return Err(format!("field {field}: wire type {wire} not expected")),
        }
    }
    Ok(key)
}

impl<S: Source> Cursor<'_, S> {
    /// Walks to the next leaf element: on `Some(i)` the node on top of the
    /// stack is a leaf and `i` its element (one walk for both ways of
    /// reading entries below).
    fn advance(&mut self) -> Result<Option<usize>, ErrorKind> {
        loop {
            let depth = self.stack.len();
            let Some((node, idx)) = self.stack.last_mut() else {
                return Ok(None);
            };
            if *idx >= node.count() {
                self.stack.pop();
                continue;
            }
            let i = *idx;
            *idx += 1;
            if node.is_leaf() {
                return Ok(Some(i));
            }
            let parent = node.id;
            let (_, child) = node.branch(i)?;
            if depth >= MAX_DEPTH {
                return Err(ErrorKind::TooDeep(MAX_DEPTH, child));
            }
            self.seen.insert(child)?;
            let from = PageRef::Branch(parent);
            let child = if self.head_only {
                self.snap.node_head(child, from)?
            } else {
                self.snap.node(child, from)?
            };
            self.stack.push((child, 0));
        }
    }

    /// The next leaf element, borrowed from its page.
    fn next_leaf(&mut self) -> Result<Option<page::LeafElem<'_>>, ErrorKind> {
        let Some(i) = self.advance()? else {
            return Ok(None);
        };
        match self.stack.last() {
            Some((node, _)) => node.leaf(i).map(Some),
            // `advance` returned with a leaf on top of the stack.
            None => Ok(None),
        }
    }

    /// The next leaf entry: (flags, key, value).
    fn next_entry(&mut self) -> Result<Option<Entry>, ErrorKind> {
        Ok(self
            .next_leaf()?
            .map(|e| (e.flags, e.key.to_vec(), e.value.to_vec())))
    }
}

/// Every revision of the `key` bucket, in revision order.
pub struct Revisions<'a, S: Source> {
    cursor: Cursor<'a, S>,
    index: u64,
    done: bool,
}

impl<S: Source> std::fmt::Debug for Revisions<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revisions")
            .field("index", &self.index)
            .finish()
    }
}

impl<S: Source> Iterator for Revisions<'_, S> {
    type Item = Result<Revision, SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_revision();
        if !matches!(item, Ok(Some(_))) {
            self.done = true;
        }
        let snap = self.cursor.snap;
        item.map_err(|k| snap.err(k)).transpose()
    }
}

impl<S: Source> Revisions<'_, S> {
    fn next_revision(&mut self) -> Result<Option<Revision>, ErrorKind> {
        let Some((_, key, value)) = self.cursor.next_entry()? else {
            return Ok(None);
        };
        let index = self.index;
        self.index += 1;
        let (main, sub, tombstone) = parse_revision(&key).ok_or(ErrorKind::BadRevision {
            index,
            len: key.len(),
        })?;
        let kv = decode_kv(&value, main, sub)?;
        Ok(Some(Revision {
            main,
            sub,
            tombstone,
            kv,
        }))
    }
}

fn decode_kv(value: &[u8], main: i64, sub: i64) -> Result<KeyValue, ErrorKind> {
    <KeyValue as prost::Message>::decode(value).map_err(|e| ErrorKind::BadKeyValue {
        main,
        sub,
        reason: e.to_string(),
    })
}

/// Reads a whole file into memory and opens it (for small files, fuzzing).
pub fn open_bytes(name: &str, bytes: Vec<u8>) -> Result<Snapshot<Vec<u8>>, SnapshotError> {
    Snapshot::from_source(bytes, PathBuf::from(name))
}

/// Everything the fuzz target exercises on `data`: open, read the meta
/// bucket, every revision, the latest view (one pass and several) and the
/// free pages. Returns normally on any input (errors are expected; panics
/// are bugs).
pub fn fuzz_entry(data: &[u8]) {
    let Ok(s) = open_bytes("fuzz-input", data.to_vec()) else {
        return;
    };
    let _ = s.mvcc_meta();
    if let Ok(revs) = s.revisions() {
        for r in revs.take(100_000) {
            if r.is_err() {
                break;
            }
        }
    }
    // The default index, and a small one (spilled runs and a merge).
    for budget in [DEFAULT_INDEX_BYTES, 16 * 1024] {
        if let Ok(latest) = s.latest_with_budget(b"", budget) {
            for kv in latest.take(100_000) {
                if kv.is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.free_pages();
}

/// Reads `path` fully (helper for tests that mutate a real snapshot).
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_keys() {
        let mut k = Vec::new();
        k.extend_from_slice(&5i64.to_be_bytes());
        k.push(b'_');
        k.extend_from_slice(&2i64.to_be_bytes());
        assert_eq!(parse_revision(&k), Some((5, 2, false)));
        k.push(b't');
        assert_eq!(parse_revision(&k), Some((5, 2, true)));
        k[17] = b'x';
        assert_eq!(parse_revision(&k), None);
        assert_eq!(parse_revision(b"short"), None);
    }

    #[test]
    fn small_inputs_are_clear_errors() {
        let e = open_bytes("x.db", vec![]).unwrap_err();
        assert!(e.to_string().starts_with("x.db: empty file"), "{e}");
        let e = open_bytes("x.db", vec![0; 100]).unwrap_err();
        assert!(e.to_string().contains("too short"), "{e}");
        let e = open_bytes("x.db", vec![0x41; 16384]).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
    }

    #[test]
    fn debug_hides_values() {
        let kv = KeyValue {
            key: b"/registry/secrets/a/b".to_vec(),
            value: b"CANARY".to_vec(),
            ..Default::default()
        };
        let r = Revision {
            main: 1,
            sub: 0,
            tombstone: false,
            kv,
        };
        assert!(!format!("{r:?}").contains("CANARY"));
    }
}
