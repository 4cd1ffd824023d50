//! An HPACK decoder (RFC 7541) for the `:authority` shim: the client's
//! dynamic table, integers, raw and Huffman-coded strings (Huffman decoding
//! by [`httlib_huffman`]).
//!
//! Why not a complete HPACK crate: `loona-hpack` (and `hpack`, whose code it
//! continues) rebuilds a hash-map Huffman table for every Huffman-coded
//! string — measured at 0.35 ms per string (release, on the shared test
//! machine under load), and every gRPC call from h2 or grpc-go carries at
//! least one (`:path`) — and
//! `httlib-hpack` indexes past the end of a truncated integer (a panic on
//! hostile input). The decoding rules are short; the Huffman code is not,
//! and comes from a crate. The tests check this decoder against
//! `loona-hpack`'s.
//!
//! Strictness follows h2's decoder: integers of at most 5 octets, a table
//! size update only before the first field of a block and never above the
//! size the server advertised, indices within the tables.

use std::borrow::Cow;
use std::collections::VecDeque;

/// Why a header block is not valid HPACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside an integer or a string.
    #[error("truncated field")]
    Truncated,
    /// An integer longer than 5 octets.
    #[error("integer too long")]
    IntegerTooLong,
    /// Index 0, or past the static and dynamic tables.
    #[error("index outside the tables")]
    BadIndex,
    /// A Huffman-coded string that does not decode.
    #[error("invalid Huffman code")]
    Huffman,
    /// A dynamic table size update after a field, or above the limit.
    #[error("invalid dynamic table size update")]
    SizeUpdate,
}

/// RFC 7541 Appendix A.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// A decoded name or value: borrowed from the block when sent raw.
type Text<'b> = Cow<'b, [u8]>;

/// Size of a table entry (RFC 7541 §4.1).
fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

/// The decoding side of one connection's HPACK context.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// SETTINGS_HEADER_TABLE_SIZE: what a size update may ask for at most.
    limit: usize,
}

impl Decoder {
    /// A decoder whose table may grow to `limit` bytes (also its initial size).
    pub fn new(limit: usize) -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// Decodes `block`, calling `field` with each name and value in order.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut pos = 0;
        let mut fields_seen = false;
        while let Some(&first) = block.get(pos) {
            if first & 0x80 != 0 {
                // Indexed field.
                let index = integer(block, &mut pos, 7)?;
                let (name, value) = self.get(index)?;
                field(name, value);
                fields_seen = true;
            } else if first & 0x40 != 0 {
                // Literal with incremental indexing.
                let (name, value) = self.literal(block, &mut pos, 6)?;
                field(&name, &value);
                self.insert(name.into_owned(), value.into_owned());
                fields_seen = true;
            } else if first & 0x20 != 0 {
                // Dynamic table size update.
                let size = integer(block, &mut pos, 5)?;
                if fields_seen || size > self.limit {
                    return Err(HpackError::SizeUpdate);
                }
                self.max_size = size;
                self.evict_to(size);
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                let (name, value) = self.literal(block, &mut pos, 4)?;
                field(&name, &value);
                fields_seen = true;
            }
        }
        Ok(())
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex),
            1..=61 => Ok(STATIC[index - 1]),
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .ok_or(HpackError::BadIndex),
        }
    }

    fn literal<'b>(
        &self,
        block: &'b [u8],
        pos: &mut usize,
        prefix: u32,
    ) -> Result<(Text<'b>, Text<'b>), HpackError> {
        let index = integer(block, pos, prefix)?;
        let name = match index {
            0 => string(block, pos)?,
            1..=61 => Cow::Borrowed(STATIC[index - 1].0),
            _ => Cow::Owned(self.get(index)?.0.to_vec()),
        };
        let value = string(block, pos)?;
        Ok((name, value))
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = entry_size(&name, &value);
        if size > self.max_size {
            // An entry larger than the table empties it (RFC 7541 §4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.size += size;
        self.table.push_front((name, value));
    }

    fn evict_to(&mut self, target: usize) {
        while self.size > target {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= entry_size(&n, &v),
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

/// Reads an integer with an `prefix`-bit prefix at `*pos` (RFC 7541 §5.1).
fn integer(block: &[u8], pos: &mut usize, prefix: u32) -> Result<usize, HpackError> {
    let mask = (1usize << prefix) - 1;
    let first = *block.get(*pos).ok_or(HpackError::Truncated)?;
    *pos += 1;
    let mut value = usize::from(first) & mask;
    if value < mask {
        return Ok(value);
    }
    // At most 4 continuation octets (28 bits), as h2 and loona allow.
    for shift in [0, 7, 14, 21] {
        let b = *block.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        value += (usize::from(b) & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(HpackError::IntegerTooLong)
}

/// Reads a string literal at `*pos` (RFC 7541 §5.2).
fn string<'b>(block: &'b [u8], pos: &mut usize) -> Result<Text<'b>, HpackError> {
    let huffman = block.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(block, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
    let raw = block.get(*pos..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if !huffman {
        return Ok(Cow::Borrowed(raw));
    }
    // Huffman codes are at least 5 bits: at most 8 symbols per 5 octets.
    let mut out = Vec::with_capacity(raw.len() * 8 / 5 + 1);
    httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FiveBits)
        .map_err(|_| HpackError::Huffman)?;
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn ours(d: &mut Decoder, block: &[u8]) -> Result<Fields, HpackError> {
        let mut out = Vec::new();
        d.decode(block, |n, v| out.push((n.to_vec(), v.to_vec())))?;
        Ok(out)
    }

    fn huffman(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        httlib_huffman::encode(s, &mut out).unwrap();
        out
    }

    /// One field with a new name, in one of the three literal
    /// representations, strings raw or Huffman-coded.
    fn put_field(out: &mut Vec<u8>, kind: u8, name: &[u8], value: &[u8], huff: bool) {
        out.push([0x40, 0x00, 0x10][usize::from(kind % 3)]);
        for s in [name, value] {
            let (h, bytes) = if huff {
                (0x80, huffman(s))
            } else {
                (0, s.to_vec())
            };
            crate::transport::authority::encode_int(out, h, 7, bytes.len());
            out.extend(bytes);
        }
    }

    #[test]
    fn the_static_table_matches_rfc_7541_as_loona_has_it() {
        let mut loona = loona_hpack::Decoder::new();
        for index in 1..=61u8 {
            let block = [0x80 | index];
            assert_eq!(
                ours(&mut Decoder::new(4096), &block).unwrap(),
                loona.decode(&block).unwrap(),
                "index {index}"
            );
        }
    }

    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        // Appendix C.4: three requests on one connection, Huffman-coded.
        let blocks = [
            &hex::decode("828684418cf1e3c2e5f23a6ba0ab90f4ff").unwrap()[..],
            &hex::decode("828684be5886a8eb10649cbf").unwrap(),
            &hex::decode("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf").unwrap(),
        ];
        let mut d = Decoder::new(4096);
        let got: Vec<_> = blocks.iter().map(|b| ours(&mut d, b).unwrap()).collect();
        let text = |v: &Fields| {
            v.iter()
                .map(|(n, v)| {
                    format!(
                        "{}: {}",
                        String::from_utf8_lossy(n),
                        String::from_utf8_lossy(v)
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            text(&got[0]),
            [
                ":method: GET",
                ":scheme: http",
                ":path: /",
                ":authority: www.example.com"
            ]
        );
        assert_eq!(text(&got[1])[4], "cache-control: no-cache");
        assert_eq!(text(&got[2])[3], ":authority: www.example.com");
        assert_eq!(text(&got[2])[4], "custom-key: custom-value");
        assert_eq!(d.size, 164);
    }

    #[test]
    fn bad_input_is_an_error() {
        let cases: [(&[u8], HpackError); 7] = [
            (&[0x80], HpackError::BadIndex),
            (&[0xbe], HpackError::BadIndex),
            (&[0xff], HpackError::Truncated),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
                HpackError::IntegerTooLong,
            ),
            (&[0x44, 0x05, b'a'], HpackError::Truncated),
            (&[0x82, 0x20], HpackError::SizeUpdate),
            (&[0x3f, 0xe2, 0x1f], HpackError::SizeUpdate),
        ];
        for (block, error) in cases {
            assert_eq!(
                ours(&mut Decoder::new(4096), block),
                Err(error),
                "{block:?}"
            );
        }
        // EOS inside a string.
        assert_eq!(
            ours(
                &mut Decoder::new(4096),
                &[0x04, 0x84, 0xff, 0xff, 0xff, 0xff]
            ),
            Err(HpackError::Huffman)
        );
    }

    #[test]
    fn eviction_follows_the_table_size() {
        let mut d = Decoder::new(4096);
        let mut block = vec![0x20]; // size 0 first: nothing is kept
        put_field(&mut block, 0, b"a", b"b", false);
        ours(&mut d, &block).unwrap();
        assert!(d.table.is_empty());
        let mut block = vec![0x3f, 0x21]; // size 64: one 34-byte entry fits
        put_field(&mut block, 0, b"a", b"b", false);
        put_field(&mut block, 0, b"c", b"d", true);
        assert_eq!(ours(&mut d, &block).unwrap().len(), 2);
        assert_eq!(
            ours(&mut d, &[0xbe]).unwrap(),
            [(b"c".to_vec(), b"d".to_vec())]
        );
        assert_eq!(ours(&mut d, &[0xbf]), Err(HpackError::BadIndex));
    }

    proptest! {
        // loona's Huffman decoding is slow in debug builds: few cases.
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random fields in random representations decode as loona decodes them.
        #[test]
        fn agrees_with_loona(
            fields in proptest::collection::vec(
                (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40),
                 proptest::collection::vec(any::<u8>(), 0..100), any::<bool>(), 0usize..70),
                1..20),
        ) {
            let mut ours_d = Decoder::new(4096);
            let mut loona = loona_hpack::Decoder::new();
            let mut block = Vec::new();
            for (kind, name, value, huff, index) in &fields {
                if *index > 0 && *index < 62 + ours_d.table.len() && kind % 4 == 3 {
                    crate::transport::authority::encode_int(&mut block, 0x80, 7, *index);
                } else {
                    put_field(&mut block, *kind, name, value, *huff);
                }
                // Decode block by block so the dynamic table is exercised.
                let a = ours(&mut ours_d, &block);
                let b = loona.decode(&block);
                prop_assert!(a.is_ok());
                prop_assert_eq!(a.ok(), b.ok());
                block.clear();
            }
        }

        /// Random bytes: an error or fields, never a panic.
        #[test]
        fn random_bytes_never_panic(block in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ours(&mut Decoder::new(4096), &block);
        }
    }
}
