//! Any `:authority` on the unix socket: a small HTTP/2 frame shim between
//! the accepted socket and the h2 server, client→server direction only.
//!
//! # Why
//!
//! grpc-python, grpc-java, grpc-swift and other non-Go gRPC stacks send the
//! unix socket path, percent-encoded (`%2Frun%2Fkms.sock`), as the HTTP/2
//! `:authority` pseudo-header. The `h2` crate parses `:authority` into
//! `http::uri::Authority`, which refuses a `%` (or `/`) in the host, and
//! resets the stream with PROTOCOL_ERROR before tonic sees the call. h2 0.4
//! has no option to relax this (hyperium/h2#487, "Do not require authority
//! for UNIX domain sockets", is open and unmerged; hyperium/h2#442 and
//! hyperium/hyper#3750 were closed without a change), and a patched fork of
//! h2 is not something this project wants to carry. The plugin does not route
//! on the authority: a unix socket peer is fully identified by the socket.
//!
//! # What it does
//!
//! - The 24-byte connection preface and every frame other than HEADERS and
//!   CONTINUATION pass through untouched: bytes are read from the socket into
//!   one buffer and copied once into h2's read buffer (what a `BufReader`
//!   would do).
//! - A header block (HEADERS + its CONTINUATION frames) is collected and
//!   decoded with an HPACK decoder ([`hpack`]) that tracks the client's
//!   dynamic table (4096 bytes at most: h2's default
//!   SETTINGS_HEADER_TABLE_SIZE, which this server never changes).
//! - Until a connection sends its first authority h2 would refuse, its
//!   blocks are handed on *as sent* (the HPACK bytes unchanged, padding
//!   dropped): h2's decoder follows the client's dynamic table exactly as
//!   without the shim, and indexed fields stay cheap for it. kube-apiserver
//!   (grpc-go) never needs a rewrite, so it only pays the decode here.
//! - From a connection's first refused authority on, every block is
//!   re-encoded: every field as a *literal without indexing* with a literal
//!   name, so h2's decoder never adds to or reads from its dynamic table
//!   again (what it holds from before is never referenced) and stays
//!   consistent whatever the client indexes. Dynamic table size updates are
//!   then consumed here and not forwarded.
//! - A `:authority` that `http::uri::Authority` does not accept (exactly the
//!   check h2 makes: percent signs, slashes, an empty value, non-ASCII) is
//!   replaced by `localhost`. A valid authority is kept as sent. Nothing else
//!   changes: header names and values, their order, the stream id, END_STREAM
//!   and the PRIORITY fields are kept; padding is dropped (PADDED cleared).
//!   h2 then validates every field as it always does (names, values,
//!   pseudo-headers, MAX_HEADER_LIST_SIZE, …).
//! - The re-encoded block is split into HEADERS + CONTINUATION frames of at
//!   most [`MAX_FRAME`] bytes (16,384: h2's default SETTINGS_MAX_FRAME_SIZE
//!   and the smallest a server may have), so it is always acceptable.
//! - "Never indexed" fields become "without indexing": the only reader is the
//!   in-process h2 decoder, which does not distinguish them (h2 0.4 keeps no
//!   such mark on decoded fields).
//!
//! # Limits
//!
//! A connection is closed, with a WARN log line naming the reason (never a
//! header value), when one of its frames is larger than [`MAX_FRAME`] (as h2
//! would), a header block is larger than [`MAX_BLOCK`] bytes,
//! spans more than [`MAX_BLOCK_FRAMES`] frames (a CONTINUATION flood),
//! decodes to more than [`MAX_DECODED`] bytes, is not valid HPACK, has
//! padding longer than its frame, or is interrupted by another frame. All of
//! these are connection errors in RFC 9113 too (or larger than anything h2
//! would accept: its header list limit is 16 KiB). Other protocol errors are
//! left to h2, which sees the frames unchanged.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::ReadBuf;
use tokio::net::UnixStream;
use tonic::codegen::http;

mod hpack;

/// Largest header block (HEADERS + CONTINUATION payloads, as received).
pub const MAX_BLOCK: usize = 64 * 1024;
/// Most frames one header block may span.
pub const MAX_BLOCK_FRAMES: usize = 32;
/// Largest decoded header list (RFC 7541 sizes: name + value + 32 per field).
pub const MAX_DECODED: usize = 64 * 1024;
/// The server's HPACK dynamic table size: h2's default, never changed by serve.
const HEADER_TABLE_SIZE: usize = 4096;
/// The server's SETTINGS_MAX_FRAME_SIZE: h2's default (16,384, the protocol's
/// minimum), never changed by serve. The largest frame a client may send and
/// the most payload per frame the shim emits.
pub const MAX_FRAME: usize = 16_384;
/// The client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;
/// Most of a re-encoding buffer kept between header blocks.
const SCRATCH_KEPT: usize = 4096;
/// What an unparsable authority becomes.
const REPLACEMENT: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why the shim closed a connection.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    /// A HEADERS or CONTINUATION frame larger than the server's
    /// SETTINGS_MAX_FRAME_SIZE (h2 refuses such a frame too).
    #[error("header frame larger than {MAX_FRAME} bytes")]
    FrameTooLarge,
    /// The header block is larger than [`MAX_BLOCK`].
    #[error("header block larger than {MAX_BLOCK} bytes")]
    BlockTooLarge,
    /// The header block spans more than [`MAX_BLOCK_FRAMES`] frames.
    #[error("header block spread over more than {MAX_BLOCK_FRAMES} frames")]
    TooManyFrames,
    /// The decoded header list is larger than [`MAX_DECODED`].
    #[error("decoded header list larger than {MAX_DECODED} bytes")]
    DecodedTooLarge,
    /// The HPACK decoder refused the block.
    #[error("header block is not valid HPACK: {0}")]
    Hpack(hpack::HpackError),
    /// Pad length or priority fields longer than the HEADERS frame.
    #[error("HEADERS frame on stream {0} shorter than its padding and priority fields")]
    BadPadding(u32),
    /// A frame other than CONTINUATION on the same stream while a header block is open.
    #[error(
        "frame of type {kind:#04x} on stream {stream} while the header block of stream {open} is open"
    )]
    Interrupted {
        /// Type of the interrupting frame.
        kind: u8,
        /// Its stream.
        stream: u32,
        /// The stream whose header block was open.
        open: u32,
    },
}

/// A header block being collected.
#[derive(Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    frames: usize,
}

/// The client→server byte stream of one connection, with header blocks
/// rewritten as described in the [module docs](self).
pub struct Shim {
    /// Bytes read from the socket, not yet handed on.
    input: BytesMut,
    /// Rewritten header frames, handed on before anything in `input`.
    output: BytesMut,
    /// Bytes at the front of `input` to hand on untouched.
    pass: usize,
    block: Option<OpenBlock>,
    blocks: Blocks,
    eof: bool,
    failed: bool,
}

impl std::fmt::Debug for Shim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No header bytes: they may carry a caller's credentials.
        f.debug_struct("Shim")
            .field("buffered", &self.input.len())
            .field("pending", &self.output.len())
            .field("pass", &self.pass)
            .field("block_open", &self.block.is_some())
            .field("rewriting", &self.blocks.rewriting)
            .field("eof", &self.eof)
            .finish()
    }
}

impl Default for Shim {
    fn default() -> Self {
        Self::new()
    }
}

impl Shim {
    /// A shim for a new connection (expecting the client preface).
    pub fn new() -> Self {
        Shim {
            input: BytesMut::new(),
            output: BytesMut::new(),
            pass: PREFACE_LEN,
            block: None,
            blocks: Blocks {
                decoder: hpack::Decoder::new(HEADER_TABLE_SIZE),
                rewriting: false,
                scratch: Vec::new(),
            },
            eof: false,
            failed: false,
        }
    }

    /// Reads from `stream` into `buf` through the shim. End of stream after
    /// a refusal (which is logged and returned once as an error).
    pub fn poll_read(
        &mut self,
        stream: &mut UnixStream,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Hand on as much as is ready (several frames at once, as a plain
        // read would), and read the socket only when nothing is.
        let mut handed = false;
        loop {
            if self.failed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match self.produce(buf.remaining(), |bytes| buf.put_slice(bytes)) {
                Ok(0) if handed => return Poll::Ready(Ok(())),
                Ok(0) => {}
                Ok(_) => {
                    handed = true;
                    continue;
                }
                Err(refusal) => {
                    self.failed = true;
                    tracing::warn!(reason = %refusal, "closing a connection: refused its HTTP/2 header block");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, refusal)));
                }
            }
            if self.eof {
                // End of stream; an incomplete frame held here is dropped,
                // as h2 would drop it.
                return Poll::Ready(Ok(()));
            }
            self.input.reserve(READ_CHUNK);
            // tokio's own read: a read that does not fill the buffer marks
            // the socket drained, so the next poll waits for epoll instead
            // of paying a `recvfrom` that only says EAGAIN.
            if ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *stream),
                cx,
                &mut self.input
            ))? == 0
            {
                self.eof = true;
            }
        }
    }

    /// Adds bytes received from the client.
    #[cfg(test)]
    fn push(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// Hands at most `room` bytes that are ready to `put`, parsing as
    /// needed. Returns how many were handed on; 0 means more input is needed.
    fn produce(&mut self, room: usize, mut put: impl FnMut(&[u8])) -> Result<usize, Refusal> {
        if room == 0 {
            return Ok(0);
        }
        loop {
            if !self.output.is_empty() {
                let n = room.min(self.output.len());
                put(&self.output[..n]);
                self.output.advance(n);
                return Ok(n);
            }
            if self.pass > 0 {
                let n = room.min(self.pass).min(self.input.len());
                if n > 0 {
                    put(&self.input[..n]);
                    self.input.advance(n);
                    self.pass -= n;
                }
                return Ok(n);
            }
            if !self.parse_frame()? {
                return Ok(0);
            }
        }
    }

    /// Looks at the frame at the front of `input`: a frame to pass on sets
    /// `pass`; a HEADERS or CONTINUATION frame is taken into the open block.
    /// Returns false when the frame is not complete yet.
    fn parse_frame(&mut self) -> Result<bool, Refusal> {
        let Some(head) = self.input.get(..FRAME_HEADER) else {
            return Ok(false);
        };
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let kind = head[3];
        let flags = head[4];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;

        if (kind == HEADERS || kind == CONTINUATION) && len > MAX_FRAME {
            return Err(Refusal::FrameTooLarge);
        }
        if let Some(block) = &self.block {
            if kind != CONTINUATION || stream != block.stream {
                return Err(Refusal::Interrupted {
                    kind,
                    stream,
                    open: block.stream,
                });
            }
            if block.fragment.len() + len > MAX_BLOCK {
                return Err(Refusal::BlockTooLarge);
            }
            if block.frames >= MAX_BLOCK_FRAMES {
                return Err(Refusal::TooManyFrames);
            }
        } else if kind != HEADERS {
            // Anything else, including a CONTINUATION without a HEADERS
            // (h2 refuses it), goes on unchanged.
            self.pass = FRAME_HEADER + len;
            return Ok(true);
        }
        let Some(payload) = self.input.get(FRAME_HEADER..FRAME_HEADER + len) else {
            return Ok(false);
        };

        let block = match self.block.take() {
            Some(mut block) => {
                block.fragment.extend_from_slice(payload);
                block.frames += 1;
                block
            }
            None => {
                let mut rest = payload;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    let (&n, tail) = rest.split_first().ok_or(Refusal::BadPadding(stream))?;
                    pad = usize::from(n);
                    rest = tail;
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    let fields = rest.get(..5).ok_or(Refusal::BadPadding(stream))?;
                    let mut p = [0; 5];
                    p.copy_from_slice(fields);
                    priority = Some(p);
                    rest = &rest[5..];
                }
                let fragment = rest
                    .get(
                        ..rest
                            .len()
                            .checked_sub(pad)
                            .ok_or(Refusal::BadPadding(stream))?,
                    )
                    .ok_or(Refusal::BadPadding(stream))?;
                let block = OpenBlock {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: Vec::new(),
                    frames: 1,
                };
                if flags & END_HEADERS != 0 {
                    // The usual case, a block in one frame: no copy of it.
                    self.blocks.finish(&mut self.output, &block, fragment)?;
                    self.input.advance(FRAME_HEADER + len);
                    return Ok(true);
                }
                OpenBlock {
                    fragment: fragment.to_vec(),
                    ..block
                }
            }
        };
        self.input.advance(FRAME_HEADER + len);
        if flags & END_HEADERS != 0 {
            self.blocks
                .finish(&mut self.output, &block, &block.fragment)?;
        } else {
            self.block = Some(block);
        }
        Ok(true)
    }
}

/// A connection's header block state: the client's HPACK table, whether its
/// blocks are re-encoded, and a buffer the re-encoding reuses.
struct Blocks {
    decoder: hpack::Decoder,
    /// Blocks are re-encoded from now on (an authority was replaced).
    rewriting: bool,
    /// The current block re-encoded (kept between blocks: no allocation per
    /// request).
    scratch: Vec<u8>,
}

impl Blocks {
    /// Decodes a complete header block and queues it: as sent while the
    /// connection has not needed a rewrite, re-encoded from its first
    /// refused authority on (`rewriting` is then set for good). The
    /// re-encoding is built either way (a field may turn out to need it only
    /// after others were decoded); it is a copy of a few hundred bytes.
    fn finish(
        &mut self,
        output: &mut BytesMut,
        block: &OpenBlock,
        fragment: &[u8],
    ) -> Result<(), Refusal> {
        let encoded = &mut self.scratch;
        encoded.clear();
        let mut decoded = 0usize;
        let mut replaced = false;
        self.decoder
            .decode(fragment, |name, value| {
                decoded = decoded.saturating_add(name.len() + value.len() + 32);
                if decoded > MAX_DECODED {
                    // Keep decoding (the table must stay in step) but stop
                    // growing; the block is refused below.
                    return;
                }
                let value =
                    if name == b":authority" && http::uri::Authority::try_from(value).is_err() {
                        replaced = true;
                        REPLACEMENT
                    } else {
                        value
                    };
                encode_literal(encoded, name, value);
            })
            .map_err(Refusal::Hpack)?;
        if decoded > MAX_DECODED {
            return Err(Refusal::DecodedTooLarge);
        }
        self.rewriting |= replaced;
        queue_frames(
            output,
            block,
            if self.rewriting { encoded } else { fragment },
        );
        // A rare large block does not keep its buffer for the connection's life.
        encoded.shrink_to(SCRATCH_KEPT);
        Ok(())
    }
}

/// Queues `encoded` as HEADERS + CONTINUATION frames for `block`'s stream.
fn queue_frames(output: &mut BytesMut, block: &OpenBlock, encoded: &[u8]) {
    let priority: &[u8] = match &block.priority {
        Some(p) => p,
        None => &[],
    };
    let first_len = encoded.len().min(MAX_FRAME - priority.len());
    let (first, mut rest) = encoded.split_at(first_len);
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    output.reserve(encoded.len() + priority.len() + FRAME_HEADER * 2);
    put_frame_header(
        output,
        priority.len() + first.len(),
        HEADERS,
        flags,
        block.stream,
    );
    output.extend_from_slice(priority);
    output.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        let flags = if tail.is_empty() { END_HEADERS } else { 0 };
        put_frame_header(output, chunk.len(), CONTINUATION, flags, block.stream);
        output.extend_from_slice(chunk);
        rest = tail;
    }
}

fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    // `len` is at most MAX_FRAME (16,384): it fits the 24-bit length field.
    let len = len.to_be_bytes();
    let n = len.len();
    out.extend_from_slice(&[len[n - 3], len[n - 2], len[n - 1], kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// HPACK integer (RFC 7541 §5.1) with an `n`-bit prefix under `high` bits.
pub(crate) fn encode_int(out: &mut Vec<u8>, high: u8, n: u32, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        // value < max < 256: fits.
        out.push(high | value as u8);
        return;
    }
    out.push(high | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// A literal header field without indexing, new name, both strings raw
/// (RFC 7541 §6.2.2).
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    encode_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame_header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    /// Everything the shim hands on for `input`, fed in pieces of `chunk` bytes.
    fn run(shim: &mut Shim, input: &[u8], chunk: usize) -> Result<Vec<u8>, Refusal> {
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            shim.push(piece);
            while shim.produce(1000, |b| out.extend_from_slice(b))? > 0 {}
        }
        Ok(out)
    }

    /// Splits handed-on bytes into frames (after the preface).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE_LEN], PREFACE);
        let mut rest = &bytes[PREFACE_LEN..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            out.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        out
    }

    /// The server's view: a decoder whose dynamic table holds nothing, so
    /// any reliance on it by the shim's output fails.
    fn server_decode(fragment: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut d = loona_hpack::Decoder::new();
        d.set_max_table_size(0);
        d.decode(fragment).unwrap()
    }

    fn client_block(enc: &mut loona_hpack::Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/v2.KeyManagementService/Status"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ])
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        encode_int(out, 0, 7, s.len());
        out.extend_from_slice(s);
    }

    /// The first call's block adds :path, :authority, content-type and te
    /// to the dynamic table (literal with incremental indexing); the second
    /// call's block is nothing but references (static and dynamic).
    fn indexing_blocks(authority: &[u8]) -> [Vec<u8>; 2] {
        let mut first = vec![0x83, 0x86]; // :method POST, :scheme http
        first.push(0x44); // :path (static name 4), indexed
        string(&mut first, b"/v2.KeyManagementService/Status");
        first.push(0x41); // :authority (static name 1), indexed
        string(&mut first, authority);
        first.push(0x40 | 31); // content-type (static name 31), indexed
        string(&mut first, b"application/grpc");
        first.push(0x40); // new name, indexed
        string(&mut first, b"te");
        string(&mut first, b"trailers");
        // Dynamic table now: 62 te, 63 content-type, 64 :authority, 65 :path.
        let second = vec![0x83, 0x86, 0x80 | 65, 0x80 | 64, 0x80 | 63, 0x80 | 62];
        [first, second]
    }

    #[test]
    fn a_percent_encoded_authority_becomes_localhost_and_the_table_stays_in_step() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        for (stream, block) in [1, 3]
            .into_iter()
            .zip(indexing_blocks(b"%2Frun%2Fkms.sock"))
        {
            input.extend(frame(HEADERS, END_HEADERS, stream, &block));
            input.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\0"));
        }
        for chunk in [1, 7, 100, input.len()] {
            let out = run(&mut Shim::new(), &input, chunk).unwrap();
            let f = frames(&out);
            assert_eq!(f.len(), 5);
            assert_eq!((f[0].0, f[0].3.as_slice()), (0x4, &[][..]));
            for (i, stream) in [(1, 1), (3, 3)] {
                assert_eq!((f[i].0, f[i].1, f[i].2), (HEADERS, END_HEADERS, stream));
                let headers = server_decode(&f[i].3);
                assert_eq!(headers.len(), 6);
                assert_eq!(headers[0], (b":method".to_vec(), b"POST".to_vec()));
                assert_eq!(headers[2].1, b"/v2.KeyManagementService/Status");
                assert_eq!(headers[3], (b":authority".to_vec(), b"localhost".to_vec()));
                assert_eq!(headers[4].1, b"application/grpc");
                assert_eq!(headers[5], (b"te".to_vec(), b"trailers".to_vec()));
                assert_eq!(
                    (f[i + 1].0, f[i + 1].3.as_slice()),
                    (0x0, &b"\0\0\0\0\0"[..])
                );
            }
        }
    }

    #[test]
    fn blocks_pass_as_sent_until_the_first_refused_authority_then_all_are_literals() {
        let [first, second] = indexing_blocks(b"localhost");
        // Client table after `first`: 62 te, 63 content-type,
        // 64 :authority localhost, 65 :path.
        let mut third = vec![0x83, 0x86, 0x80 | 65, 0x41];
        string(&mut third, b"%2Frun%2Fkms.sock");
        // Now 62 :authority %2F…, 63 te, 64 content-type,
        // 65 :authority localhost, 66 :path.
        third.extend([0x80 | 64, 0x80 | 63]);
        // A valid authority again, but through the client's table as the
        // server never saw it: it must be re-encoded too.
        let fourth = vec![0x83, 0x86, 0x80 | 66, 0x80 | 65, 0x80 | 64, 0x80 | 63];
        let blocks = [&first, &second, &third, &fourth];
        let mut input = PREFACE.to_vec();
        for (stream, block) in [1, 3, 5, 7].into_iter().zip(blocks) {
            input.extend(frame(HEADERS, END_HEADERS, stream, block));
        }
        for chunk in [1, 9, input.len()] {
            let f = frames(&run(&mut Shim::new(), &input, chunk).unwrap());
            assert_eq!(f.len(), 4);
            assert_eq!(f[0].3, first, "passed as sent");
            assert_eq!(f[1].3, second, "passed as sent");
            // Literal without indexing, literal name: 0x00.
            assert_eq!(f[2].3[0], 0);
            assert_eq!(f[3].3[0], 0);
            // One decoder with a full table, as h2's: it must follow.
            let mut server = loona_hpack::Decoder::new();
            for (i, authority) in [&b"localhost"[..], b"localhost", b"localhost", b"localhost"]
                .into_iter()
                .enumerate()
            {
                let headers = server.decode(&f[i].3).unwrap();
                assert_eq!(headers.len(), 6, "block {i}");
                assert_eq!(headers[2].1, b"/v2.KeyManagementService/Status");
                assert_eq!(headers[3], (b":authority".to_vec(), authority.to_vec()));
                assert_eq!(headers[4].1, b"application/grpc");
                assert_eq!(headers[5], (b"te".to_vec(), b"trailers".to_vec()));
            }
        }
    }

    #[test]
    fn table_size_updates_are_followed_and_not_forwarded() {
        let [first, second] = indexing_blocks(b"%2Fs");
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        // Size 0 evicts everything, then back to 4096: the references in
        // `second` now point past the table.
        let mut cleared = vec![0x20, 0x3f, 0xe1, 0x1f];
        cleared.extend(&second);
        input.extend(frame(HEADERS, END_HEADERS, 3, &cleared));
        assert!(matches!(
            run(&mut Shim::new(), &input, 50),
            Err(Refusal::Hpack(_))
        ));
        // An update alone at the start of a block is consumed.
        let mut input = PREFACE.to_vec();
        let mut block = vec![0x3f, 0xe1, 0x1f]; // 4096
        block.extend(&first);
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let f = frames(&run(&mut Shim::new(), &input, 50).unwrap());
        assert_eq!(server_decode(&f[0].3)[3].1, b"localhost");
        assert!(
            f[0].3.iter().take(1).all(|&b| b == 0),
            "starts with a literal"
        );
    }

    #[test]
    fn a_valid_authority_is_kept_and_other_frames_pass_unchanged() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        let ping = frame(0x6, 0, 0, b"12345678");
        input.extend(&ping);
        input.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &client_block(&mut enc, b"localhost:443"),
        ));
        input.extend(&ping);
        let out = run(&mut Shim::new(), &input, 3).unwrap();
        let f = frames(&out);
        assert_eq!(f[0], (0x6, 0, 0, b"12345678".to_vec()));
        assert_eq!((f[1].0, f[1].1), (HEADERS, END_HEADERS | END_STREAM));
        assert_eq!(server_decode(&f[1].3)[3].1, b"localhost:443");
        assert_eq!(f[2], f[0]);
    }

    #[test]
    fn empty_and_binary_authorities_are_replaced() {
        for authority in [&b""[..], b"/run/kms.sock", b"\xff\x00", b"a b"] {
            let mut enc = loona_hpack::Encoder::new();
            let mut input = PREFACE.to_vec();
            input.extend(frame(
                HEADERS,
                END_HEADERS,
                1,
                &client_block(&mut enc, authority),
            ));
            let out = run(&mut Shim::new(), &input, 5).unwrap();
            assert_eq!(server_decode(&frames(&out)[0].3)[3].1, b"localhost");
        }
    }

    #[test]
    fn padding_priority_and_continuation_are_handled() {
        let mut enc = loona_hpack::Encoder::new();
        let block = client_block(&mut enc, b"%2Fx");
        let (a, b) = block.split_at(10);
        let mut payload = vec![3]; // pad length
        payload.extend([0x80, 0, 0, 0, 15]); // exclusive dependency on 0, weight 16
        payload.extend(a);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let f = frames(&run(&mut Shim::new(), &input, 4).unwrap());
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].0, f[0].1, f[0].2),
            (HEADERS, PRIORITY | END_STREAM | END_HEADERS, 5)
        );
        assert_eq!(&f[0].3[..5], &[0x80, 0, 0, 0, 15]);
        assert_eq!(server_decode(&f[0].3[5..])[3].1, b"localhost");
    }

    #[test]
    fn a_block_larger_than_a_frame_is_split_into_continuations() {
        let big = vec![b'v'; 15_000];
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"%2Fs"),
            (b"x-a", &big),
            (b"x-b", &big),
        ]);
        let mut input = PREFACE.to_vec();
        // As the client split it: two frames.
        let (a, b) = block.split_at(block.len() / 2);
        input.extend(frame(HEADERS, 0, 1, a));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let f = frames(&run(&mut Shim::new(), &input, 4096).unwrap());
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|f| f.3.len() <= MAX_FRAME));
        assert_eq!(
            (f[0].0, f[0].1, f[1].0, f[1].1),
            (HEADERS, 0, CONTINUATION, END_HEADERS)
        );
        let joined: Vec<u8> = f.iter().flat_map(|f| f.3.clone()).collect();
        let headers = server_decode(&joined);
        assert_eq!(headers[1].1, b"localhost");
        assert_eq!(headers[2].1, big);
    }

    #[test]
    fn hostile_blocks_close_the_connection() {
        let start = || {
            let mut v = PREFACE.to_vec();
            v.extend(frame(0x4, 0, 0, &[]));
            v
        };
        // Not HPACK: an index past both tables.
        let mut input = start();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]));
        assert!(matches!(
            run(&mut Shim::new(), &input, 9),
            Err(Refusal::Hpack(_))
        ));
        // A table size update above the advertised 4096.
        let mut input = start();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe2, 0x1f, 0x82]));
        assert!(matches!(
            run(&mut Shim::new(), &input, 9),
            Err(Refusal::Hpack(_))
        ));
        // Oversized block in one frame, and spread over continuations.
        let mut input = start();
        input.extend(frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_FRAME + 1]));
        assert_eq!(
            run(&mut Shim::new(), &input, 1 << 20),
            Err(Refusal::FrameTooLarge)
        );
        let mut input = start();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..5 {
            input.extend(frame(CONTINUATION, 0, 1, &vec![0x82; 16_000]));
        }
        assert_eq!(
            run(&mut Shim::new(), &input, 1 << 20),
            Err(Refusal::BlockTooLarge)
        );
        // A flood of empty CONTINUATION frames.
        let mut input = start();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..1000 {
            input.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        assert_eq!(
            run(&mut Shim::new(), &input, 1 << 20),
            Err(Refusal::TooManyFrames)
        );
        // Indexed references that decode to far more than they weigh.
        let mut input = start();
        let mut block = vec![0x40, 1, b'x', 0x7f, 0xa1, 0x1e]; // x: 4000 bytes, indexed
        block.extend(vec![b'v'; 4000]);
        block.extend(vec![0x80 | 62; 100]); // 100 references to it
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        assert_eq!(
            run(&mut Shim::new(), &input, 1 << 20),
            Err(Refusal::DecodedTooLarge)
        );
        // Padding longer than the frame; another frame inside a block.
        let mut input = start();
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]));
        assert_eq!(
            run(&mut Shim::new(), &input, 3),
            Err(Refusal::BadPadding(1))
        );
        let mut input = start();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"data"));
        assert!(matches!(
            run(&mut Shim::new(), &input, 3),
            Err(Refusal::Interrupted { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random frames and random HPACK never panic the shim.
        #[test]
        fn random_input_never_panics(
            frames_in in proptest::collection::vec(
                (prop_oneof![Just(HEADERS), Just(CONTINUATION), Just(0u8), any::<u8>()],
                 any::<u8>(), 0u32..4, proptest::collection::vec(any::<u8>(), 0..64)),
                0..12),
            chunk in 1usize..40,
        ) {
            let mut input = PREFACE.to_vec();
            for (kind, flags, stream, payload) in &frames_in {
                input.extend(frame(*kind, *flags, *stream, payload));
            }
            let _ = run(&mut Shim::new(), &input, chunk);
        }

        /// A valid block with random bytes flipped never panics either.
        #[test]
        fn mutated_blocks_never_panic(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let [mut first, mut second] = indexing_blocks(b"%2Frun%2Fkms.sock");
            for (at, byte) in flips {
                let block = if at % 2 == 0 { &mut first } else { &mut second };
                let i = (at / 2) % block.len();
                block[i] ^= byte;
            }
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, &first));
            input.extend(frame(HEADERS, END_HEADERS, 3, &second));
            let _ = run(&mut Shim::new(), &input, 64);
        }
    }
}
