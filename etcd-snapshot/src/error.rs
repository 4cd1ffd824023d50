//! What can be wrong with a file. Messages name the file and the page or
//! offset, never a key's value.

use std::path::PathBuf;

/// A snapshot file that cannot be read, with the file's name.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct SnapshotError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub kind: ErrorKind,
}

/// What is wrong with a file.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// Reading failed.
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    /// Zero bytes.
    #[error("empty file (zero bytes): not an etcd snapshot")]
    Empty,
    /// Shorter than two meta pages.
    #[error("{len} bytes is too short for a bolt database (truncated, or not an etcd snapshot)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Neither meta page is valid; says why for each.
    #[error("no valid meta page: meta page 0: {meta0}; meta page 1: {meta1}")]
    NoValidMeta {
        /// Why meta page 0 was refused.
        meta0: MetaProblem,
        /// Why meta page 1 was refused (or that it could not be found).
        meta1: MetaProblem,
    },
    /// The page size in the meta page is not one bolt uses.
    #[error("page size {0} in the meta page is not a power of two between 512 and 1 MiB")]
    BadPageSize(u32),
    /// The file length does not fit the page size.
    #[error(
        "database length {len} bytes is not a multiple of the page size {page_size} (torn or truncated file)"
    )]
    NotPageMultiple {
        /// Length without the appended SHA-256.
        len: u64,
        /// Page size.
        page_size: u32,
    },
    /// The meta page's high-water mark is beyond the file's end.
    #[error(
        "truncated: the meta page says {pages} pages of {page_size} bytes are in use but the file \
         holds {held} (a torn or cut file, or a wrong page size in the meta page)"
    )]
    Truncated {
        /// Pages in use (high-water mark).
        pages: u64,
        /// Pages in the file.
        held: u64,
        /// The page size the meta page gives.
        page_size: u32,
    },
    /// The appended SHA-256 does not match the database bytes.
    #[error(
        "the SHA-256 appended by `etcdctl snapshot save` does not match the database (corrupt or torn snapshot)"
    )]
    Sha256Mismatch,
    /// A page id outside the pages in use.
    #[error("page {page} referenced from {from} is out of range (pages in use: {pages})")]
    PageOutOfRange {
        /// The page id.
        page: u64,
        /// Where it was referenced (`page N`, `meta`...).
        from: String,
        /// Pages in use.
        pages: u64,
    },
    /// A page whose header or elements do not fit.
    #[error("page {page}: {what}")]
    BadPage {
        /// The page id.
        page: u64,
        /// What is wrong.
        what: String,
    },
    /// A page reached twice while walking a tree.
    #[error("page {page} is reached twice while walking the tree (cycle or shared page)")]
    Cycle {
        /// The page id.
        page: u64,
    },
    /// The tree is deeper than any real bolt file.
    #[error("tree deeper than {0} levels at page {1} (cycle or corrupt branch)")]
    TooDeep(usize, u64),
    /// A bucket etcd always has is missing.
    #[error("no `{0}` bucket: not an etcd database")]
    NoBucket(&'static str),
    /// A key in the `key` bucket is not a revision.
    #[error("`key` bucket: entry {index} is {len} bytes, not a revision (17 or 18 bytes)")]
    BadRevision {
        /// Index of the entry in the bucket.
        index: u64,
        /// Its length.
        len: usize,
    },
    /// A value in the `key` bucket is not an `mvccpb.KeyValue`.
    #[error("`key` bucket: the value at revision {main}_{sub} is not an mvccpb.KeyValue: {reason}")]
    BadKeyValue {
        /// Main revision.
        main: i64,
        /// Sub revision.
        sub: i64,
        /// The decoder's reason (names fields, never bytes).
        reason: String,
    },
    /// The latest view's index could not be spilled to or read back from
    /// its private temp dir (under `TMPDIR`).
    #[error("cannot write or read the temporary index of the latest view (under TMPDIR): {0}")]
    Spill(std::io::Error),
    /// A value in the `meta` bucket has the wrong length.
    #[error("`meta` bucket: {name} is {len} bytes, expected {expected}")]
    BadMetaValue {
        /// The entry.
        name: &'static str,
        /// Its length.
        len: usize,
        /// The expected length.
        expected: usize,
    },
}

/// Why one meta page was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaProblem {
    /// Not bolt's magic number.
    #[error("bad magic 0x{0:08x} (not a bolt database)")]
    BadMagic(u32),
    /// A bolt format version this reader does not know.
    #[error("unsupported bolt version {0} (expected 2)")]
    BadVersion(u32),
    /// The FNV-64a checksum does not match.
    #[error("checksum mismatch (torn write or corrupt meta page)")]
    BadChecksum,
    /// Meta page 1 states another page size than meta page 0.
    #[error("page size {0} differs from meta page 0's {1}")]
    PageSizeMismatch(u32, u32),
    /// Not enough bytes for the page.
    #[error("missing (file too short)")]
    Missing,
}
