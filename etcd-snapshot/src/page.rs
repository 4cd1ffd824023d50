//! bolt's on-disk layout (little-endian, as written by bbolt on amd64 and
//! arm64), parsed with every offset bounds-checked.
//!
//! ```text
//! page header (16 bytes): id u64 | flags u16 | count u16 | overflow u32
//! meta (after the header): magic u32 | version u32 | page_size u32 | flags u32 |
//!      root bucket (root pgid u64, sequence u64) | freelist pgid u64 |
//!      high-water mark pgid u64 | txid u64 | checksum u64 (FNV-64a of the 56 bytes before it)
//! branch element (16 bytes): pos u32 | ksize u32 | child pgid u64
//! leaf element (16 bytes):   flags u32 | pos u32 | ksize u32 | vsize u32
//!   (`pos` is relative to the element itself; flag 1 = the value is a bucket)
//! bucket value: root pgid u64 | sequence u64 [| inline page when root is 0]
//! freelist: count u16 in the header (0xffff: the count is the first u64), then pgids u64
//! ```

use crate::error::{ErrorKind, MetaProblem};

/// Size of a page header.
pub const HEADER: usize = 16;
/// Size of a branch or leaf element.
const ELEMENT: usize = 16;
/// bolt's magic number.
pub const MAGIC: u32 = 0xED0C_DAED;
/// The only bolt data format version.
pub const VERSION: u32 = 2;
/// Page flag: branch.
pub const BRANCH: u16 = 0x01;
/// Page flag: leaf.
pub const LEAF: u16 = 0x02;
/// Page flag: meta.
pub const META: u16 = 0x04;
/// Page flag: freelist.
pub const FREELIST: u16 = 0x10;
/// Leaf element flag: the value is a nested bucket.
pub const BUCKET_LEAF: u32 = 0x01;
/// Freelist pgid meaning "not written" (bbolt's NoFreelistSync, etcd's default).
pub const NO_FREELIST: u64 = u64::MAX;

pub(crate) fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

pub(crate) fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// A page header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The page's own id.
    pub id: u64,
    /// Page type flags.
    pub flags: u16,
    /// Elements on the page.
    pub count: u16,
    /// Pages that follow this one as its continuation.
    pub overflow: u32,
}

impl Header {
    /// Parses the first 16 bytes of `b`.
    pub fn parse(b: &[u8]) -> Option<Header> {
        Some(Header {
            id: u64_at(b, 0)?,
            flags: u16_at(b, 8)?,
            count: u16_at(b, 10)?,
            overflow: u32_at(b, 12)?,
        })
    }
}

/// A valid meta page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Which meta page (0 or 1).
    pub index: u8,
    /// Page size of the file.
    pub page_size: u32,
    /// Root page of the root bucket.
    pub root: u64,
    /// Freelist page ([`NO_FREELIST`] when not written).
    pub freelist: u64,
    /// High-water mark: pages `0..pgid` are in use or free; beyond are unused.
    pub pgid: u64,
    /// Transaction id of the commit that wrote this meta page.
    pub txid: u64,
}

/// FNV-1a, 64 bits (what bolt checksums meta pages with).
pub fn fnv64a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Parses and validates the meta page in `page` (a whole page with header).
pub fn parse_meta(page: &[u8], index: u8) -> Result<Meta, MetaProblem> {
    let m = page.get(HEADER..HEADER + 64).ok_or(MetaProblem::Missing)?;
    let magic = u32_at(m, 0).ok_or(MetaProblem::Missing)?;
    if magic != MAGIC {
        return Err(MetaProblem::BadMagic(magic));
    }
    let version = u32_at(m, 4).ok_or(MetaProblem::Missing)?;
    if version != VERSION {
        return Err(MetaProblem::BadVersion(version));
    }
    let checksum = u64_at(m, 56).ok_or(MetaProblem::Missing)?;
    if fnv64a(&m[..56]) != checksum {
        return Err(MetaProblem::BadChecksum);
    }
    let field = |off| u64_at(m, off).ok_or(MetaProblem::Missing);
    Ok(Meta {
        index,
        page_size: u32_at(m, 8).ok_or(MetaProblem::Missing)?,
        root: field(16)?,
        freelist: field(32)?,
        pgid: field(40)?,
        txid: field(48)?,
    })
}

/// A branch or leaf node: a page read from the file (header included,
/// overflow pages appended) or an inline bucket's page.
#[derive(Clone)]
pub struct Node {
    /// The page id (the parent bucket's page for an inline bucket).
    pub id: u64,
    /// Whether this is an inline bucket's page.
    pub inline: bool,
    /// Header and elements.
    pub data: Vec<u8>,
    /// The parsed header.
    pub header: Header,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("inline", &self.inline)
            .field("header", &self.header)
            .field("data", &format_args!("<{} bytes>", self.data.len()))
            .finish()
    }
}

/// One leaf element, borrowed from its node.
#[derive(Debug, Clone, Copy)]
pub struct LeafElem<'a> {
    /// Element flags ([`BUCKET_LEAF`]).
    pub flags: u32,
    /// The key.
    pub key: &'a [u8],
    /// The value (a bucket header for buckets).
    pub value: &'a [u8],
}

impl Node {
    /// Wraps page bytes, checking the header and that every element's
    /// header fits.
    pub fn new(id: u64, inline: bool, data: Vec<u8>) -> Result<Node, ErrorKind> {
        let bad = |what: String| ErrorKind::BadPage { page: id, what };
        let header =
            Header::parse(&data).ok_or_else(|| bad("shorter than a page header".into()))?;
        if header.flags != BRANCH && header.flags != LEAF {
            return Err(bad(format!(
                "flags 0x{:02x}: expected a branch or leaf page",
                header.flags
            )));
        }
        if inline && header.flags != LEAF {
            return Err(bad("inline bucket page is not a leaf".into()));
        }
        let elems_end = HEADER + usize::from(header.count) * ELEMENT;
        if elems_end > data.len() {
            return Err(bad(format!(
                "{} elements do not fit in {} bytes",
                header.count,
                data.len()
            )));
        }
        if header.flags == BRANCH && header.count == 0 {
            return Err(bad("branch page without elements".into()));
        }
        Ok(Node {
            id,
            inline,
            data,
            header,
        })
    }

    /// Whether this is a leaf.
    pub fn is_leaf(&self) -> bool {
        self.header.flags == LEAF
    }

    /// Number of elements.
    pub fn count(&self) -> usize {
        usize::from(self.header.count)
    }

    fn slice(&self, elem: usize, pos: u32, len: usize) -> Result<&[u8], ErrorKind> {
        let start = elem.checked_add(pos as usize);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.data.len() => Ok(&self.data[s..e]),
            _ => Err(ErrorKind::BadPage {
                page: self.id,
                what: format!(
                    "element at offset {elem} points outside the page ({} bytes)",
                    self.data.len()
                ),
            }),
        }
    }

    /// Leaf element `i` (caller checks `i < count`).
    pub fn leaf(&self, i: usize) -> Result<LeafElem<'_>, ErrorKind> {
        let off = HEADER + i * ELEMENT;
        let bad = || ErrorKind::BadPage {
            page: self.id,
            what: format!("leaf element {i} does not fit"),
        };
        let flags = u32_at(&self.data, off).ok_or_else(bad)?;
        let pos = u32_at(&self.data, off + 4).ok_or_else(bad)?;
        let ksize = u32_at(&self.data, off + 8).ok_or_else(bad)? as usize;
        let vsize = u32_at(&self.data, off + 12).ok_or_else(bad)? as usize;
        let kv = self.slice(off, pos, ksize.saturating_add(vsize))?;
        let (key, value) = kv.split_at(ksize.min(kv.len()));
        Ok(LeafElem { flags, key, value })
    }

    /// Leaf element `i`'s header: (flags, offset of its key in the page,
    /// key size, value size). The offset is not checked against the data
    /// held (a leaf read without its overflow pages holds less than it
    /// addresses); the caller checks it.
    pub fn leaf_raw(&self, i: usize) -> Result<(u32, usize, usize, usize), ErrorKind> {
        let off = HEADER + i * ELEMENT;
        let bad = || ErrorKind::BadPage {
            page: self.id,
            what: format!("leaf element {i} does not fit"),
        };
        let flags = u32_at(&self.data, off).ok_or_else(bad)?;
        let pos = u32_at(&self.data, off + 4).ok_or_else(bad)? as usize;
        let ksize = u32_at(&self.data, off + 8).ok_or_else(bad)? as usize;
        let vsize = u32_at(&self.data, off + 12).ok_or_else(bad)? as usize;
        Ok((flags, off + pos, ksize, vsize))
    }

    /// Branch element `i`: its first key and child page.
    pub fn branch(&self, i: usize) -> Result<(&[u8], u64), ErrorKind> {
        let off = HEADER + i * ELEMENT;
        let bad = || ErrorKind::BadPage {
            page: self.id,
            what: format!("branch element {i} does not fit"),
        };
        let pos = u32_at(&self.data, off).ok_or_else(bad)?;
        let ksize = u32_at(&self.data, off + 4).ok_or_else(bad)? as usize;
        let child = u64_at(&self.data, off + 8).ok_or_else(bad)?;
        Ok((self.slice(off, pos, ksize)?, child))
    }
}

/// A bucket value: its root page, or its inline page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketRoot {
    /// Stored in its own pages from this root.
    Page(u64),
    /// Stored inline in the parent's leaf (the page bytes).
    Inline(Vec<u8>),
}

/// Parses a bucket value (16-byte header, then the inline page if root is 0).
pub fn bucket_root(value: &[u8], page: u64) -> Result<BucketRoot, ErrorKind> {
    let root = u64_at(value, 0).ok_or_else(|| ErrorKind::BadPage {
        page,
        what: format!("bucket value of {} bytes is too short", value.len()),
    })?;
    if root != 0 {
        return Ok(BucketRoot::Page(root));
    }
    match value.get(HEADER..) {
        Some(inline) if inline.len() >= HEADER => Ok(BucketRoot::Inline(inline.to_vec())),
        _ => Err(ErrorKind::BadPage {
            page,
            what: "inline bucket without a page".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv64a_matches_known_values() {
        assert_eq!(fnv64a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv64a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn elements_pointing_outside_are_errors_not_panics() {
        let mut page = vec![0u8; 64];
        page[8] = LEAF as u8;
        page[10] = 1; // one element
        // pos = u32::MAX, ksize = 5
        page[HEADER + 4..HEADER + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        page[HEADER + 8..HEADER + 12].copy_from_slice(&5u32.to_le_bytes());
        let n = Node::new(3, false, page).unwrap();
        assert!(n.leaf(0).is_err());
        let mut page = vec![0u8; 20];
        page[8] = LEAF as u8;
        page[10] = 9;
        assert!(Node::new(3, false, page).is_err());
    }
}
