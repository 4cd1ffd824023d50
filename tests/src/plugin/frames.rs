//! Raw HTTP/2 for tests that must put on the wire what no well-behaved gRPC
//! client would: hand-written HPACK, odd `:authority` values, floods. Only
//! what those tests need (RFC 9113 frames, RFC 7541 integers and strings).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types used by the tests.
pub mod kind {
    /// DATA.
    pub const DATA: u8 = 0x0;
    /// HEADERS.
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 0x4;
    /// GOAWAY.
    pub const GOAWAY: u8 = 0x7;
    /// CONTINUATION.
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags used by the tests.
pub mod flag {
    /// END_STREAM (DATA, HEADERS).
    pub const END_STREAM: u8 = 0x1;
    /// ACK (SETTINGS, PING).
    pub const ACK: u8 = 0x1;
    /// END_HEADERS (HEADERS, CONTINUATION).
    pub const END_HEADERS: u8 = 0x4;
}

/// HPACK integer with an `n`-bit prefix whose high bits are `first`.
pub fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// HPACK string literal, not Huffman-coded.
pub fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// Appends one frame.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A gRPC message frame body: uncompressed flag, length, message.
pub fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut body = vec![0];
    let len = u32::try_from(message.len()).expect("a test message is far below 4 GiB");
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(message);
    body
}

/// One unary gRPC call as raw HTTP/2 frames, written without HPACK state
/// (every field a literal without indexing) and with any `:authority`.
pub fn grpc_call(stream: u32, authority: &[u8], path: &str, message: &[u8]) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    hpack_int(&mut block, 0, 4, 4); // :path, literal value
    hpack_str(&mut block, path.as_bytes());
    hpack_int(&mut block, 0, 4, 1); // :authority, literal value
    hpack_str(&mut block, authority);
    for (name, value) in [
        (&b"content-type"[..], &b"application/grpc"[..]),
        (b"te", b"trailers"),
    ] {
        block.push(0);
        hpack_str(&mut block, name);
        hpack_str(&mut block, value);
    }
    let mut out = Vec::new();
    frame(&mut out, kind::HEADERS, flag::END_HEADERS, stream, &block);
    frame(
        &mut out,
        kind::DATA,
        flag::END_STREAM,
        stream,
        &grpc_message(message),
    );
    out
}

/// One frame as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Frame type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Stream id.
    pub stream: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Reads one frame, waiting at most `timeout`. `Ok(None)` at end of stream
/// (or a reset connection): the peer closed.
pub async fn read_frame(stream: &mut UnixStream, timeout: Duration) -> Result<Option<Frame>> {
    let read = async {
        let mut head = [0u8; 9];
        match stream.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e).context("reading a frame header"),
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0; len];
        stream
            .read_exact(&mut payload)
            .await
            .context("reading a frame payload")?;
        Ok(Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        }))
    };
    tokio::time::timeout(timeout, read)
        .await
        .with_context(|| format!("no frame within {timeout:?}"))?
}

/// Connects, sends the preface and an empty SETTINGS, and acknowledges the
/// server's SETTINGS: a connection ready for HEADERS.
pub async fn handshake(stream: &mut UnixStream, timeout: Duration) -> Result<()> {
    let mut hello = PREFACE.to_vec();
    frame(&mut hello, kind::SETTINGS, 0, 0, &[]);
    stream.write_all(&hello).await?;
    loop {
        let Some(f) = read_frame(stream, timeout).await? else {
            bail!("the server closed the connection during the handshake");
        };
        if f.kind == kind::SETTINGS && f.flags & flag::ACK == 0 {
            let mut ack = Vec::new();
            frame(&mut ack, kind::SETTINGS, flag::ACK, 0, &[]);
            stream.write_all(&ack).await?;
            return Ok(());
        }
    }
}
