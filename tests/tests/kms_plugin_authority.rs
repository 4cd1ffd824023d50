//! Any `:authority` on the unix socket (issue 7, item 18): grpc-python and
//! other non-Go stacks send the percent-encoded socket path, which h2 alone
//! refuses. Every test drives the real `kms-plugin` binary over its socket.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result, bail, ensure};
use atrest_proto::kms::v2::{
    DECRYPT_METHOD, DecryptRequest, DecryptResponse, ENCRYPT_METHOD, EncryptRequest,
    EncryptResponse, STATUS_METHOD, StatusRequest, StatusResponse,
};
use atrest_tests::plugin::frames::{
    Frame, PREFACE, flag, frame, grpc_call, grpc_message, handshake, hpack_int, hpack_str, kind,
    read_frame,
};
use atrest_tests::plugin::{PluginOptions, PluginProcess, WAIT};
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The venv `scripts/setup.sh` installs grpcio into.
fn grpc_python() -> PathBuf {
    let venv = std::env::var_os("ATREST_GRPC_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("atrest/grpc-venv"))
        })
        .expect("HOME or XDG_CACHE_HOME or ATREST_GRPC_VENV is set");
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "grpc-python is missing: no {} (run scripts/setup.sh, which installs grpcio there)",
        python.display()
    );
    python
}

/// Calls the plugin with grpc-python's own defaults (no authority override):
/// one channel, methods and hex requests read from stdin, one answer per line.
const CLIENT: &str = r#"
import sys, grpc
channel = grpc.insecure_channel("unix:" + sys.argv[1])
print("grpcio", grpc.__version__, flush=True)
for line in sys.stdin:
    method, request = line.split()
    call = channel.unary_unary(method)
    try:
        answer = call(bytes.fromhex(request.strip("-")), timeout=20)
        print("ok", answer.hex() or "-", flush=True)
    except grpc.RpcError as e:
        print("error", e.code().name, repr(e.details()), flush=True)
"#;

/// grpc-python as a child process speaking one channel.
struct PythonClient {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl PythonClient {
    async fn start(plugin: &PluginProcess) -> Result<(Self, String)> {
        let script = plugin.dir().join("grpc_client.py");
        std::fs::write(&script, CLIENT)?;
        let socket = plugin.endpoint().path().context("a file socket")?;
        let mut child = tokio::process::Command::new(grpc_python())
            .arg(&script)
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting grpc-python")?;
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let version = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .context("grpc-python did not start")??
            .context("grpc-python exited at once")?;
        Ok((
            PythonClient {
                child,
                stdin,
                lines,
            },
            version,
        ))
    }

    async fn call<R: Message + Default>(
        &mut self,
        method: &str,
        request: impl Message,
    ) -> Result<R> {
        let hex = hex::encode(request.encode_to_vec());
        let line = format!("{method} -{hex}\n");
        self.stdin.write_all(line.as_bytes()).await?;
        let answer = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .with_context(|| format!("{method}: no answer within {WAIT:?}"))??
            .with_context(|| format!("{method}: grpc-python exited"))?;
        let Some(hex) = answer.strip_prefix("ok ") else {
            bail!("{method} through grpc-python failed: {answer}");
        };
        Ok(R::decode(&*hex::decode(hex.trim_start_matches('-'))?)?)
    }
}

/// grpc-python ≥ 1.57 sends `:authority` = the percent-encoded socket path.
/// With its defaults, Status, Encrypt and Decrypt all work, several times on
/// one connection (so later calls refer to HPACK table entries of earlier ones).
#[tokio::test]
async fn grpc_python_with_its_default_authority_is_served() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    let (mut client, version) = PythonClient::start(&plugin).await?;
    let (major, minor) = version
        .strip_prefix("grpcio ")
        .and_then(|v| {
            let mut parts = v.split('.');
            Some((
                parts.next()?.parse::<u32>().ok()?,
                parts.next()?.parse::<u32>().ok()?,
            ))
        })
        .with_context(|| format!("unexpected version line {version:?}"))?;
    ensure!(
        (major, minor) >= (1, 57),
        "{version}: older grpc-python sends `localhost`, which proves nothing here; run scripts/setup.sh"
    );

    for round in 0..3 {
        let status: StatusResponse = client.call(STATUS_METHOD, StatusRequest {}).await?;
        assert_eq!(status.healthz, "ok");
        let plaintext = format!("secret number {round}").into_bytes();
        let encrypted: EncryptResponse = client
            .call(
                ENCRYPT_METHOD,
                EncryptRequest {
                    plaintext: plaintext.clone(),
                    uid: format!("python-{round}"),
                },
            )
            .await?;
        assert_eq!(encrypted.key_id, status.key_id);
        let decrypted: DecryptResponse = client
            .call(
                DECRYPT_METHOD,
                DecryptRequest {
                    ciphertext: encrypted.ciphertext,
                    uid: format!("python-{round}"),
                    key_id: encrypted.key_id,
                    annotations: encrypted.annotations,
                },
            )
            .await?;
        assert_eq!(decrypted.plaintext, plaintext);
    }
    drop(client.stdin);
    let _ = client.child.wait().await;
    Ok(())
}

/// What the server answered on one stream.
#[derive(Debug, Default)]
struct Answer {
    headers: Vec<(String, String)>,
    data: Vec<u8>,
    ended: bool,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads frames until every stream in `streams` has ended (or the server
/// closed), decoding the server's HPACK.
async fn answers(conn: &mut UnixStream, streams: &[u32]) -> Result<HashMap<u32, Answer>> {
    let mut decoder = loona_hpack::Decoder::new();
    let mut out: HashMap<u32, Answer> = HashMap::new();
    while !streams.iter().all(|s| out.get(s).is_some_and(|a| a.ended)) {
        let Some(Frame {
            kind: k,
            flags,
            stream,
            payload,
        }) = read_frame(conn, WAIT).await?
        else {
            bail!("the server closed the connection; answers so far: {out:?}");
        };
        match k {
            kind::HEADERS => {
                ensure!(
                    flags & flag::END_HEADERS != 0,
                    "test expects one-frame blocks"
                );
                let answer = out.entry(stream).or_default();
                for (n, v) in decoder
                    .decode(&payload)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?
                {
                    answer
                        .headers
                        .push((String::from_utf8(n)?, String::from_utf8(v)?));
                }
                answer.ended |= flags & flag::END_STREAM != 0;
            }
            kind::DATA => {
                let answer = out.entry(stream).or_default();
                answer.data.extend(&payload);
                answer.ended |= flags & flag::END_STREAM != 0;
            }
            kind::RST_STREAM => bail!("stream {stream} reset: {payload:?}"),
            kind::GOAWAY => bail!("GOAWAY: {payload:?}"),
            _ => {}
        }
    }
    Ok(out)
}

fn status_message(answer: &Answer) -> Result<StatusResponse> {
    ensure!(answer.header(":status") == Some("200"), "{answer:?}");
    ensure!(answer.header("grpc-status") == Some("0"), "{answer:?}");
    ensure!(answer.data.len() >= 5, "no gRPC message: {answer:?}");
    Ok(StatusResponse::decode(&answer.data[5..])?)
}

/// Hand-written HPACK: the first call adds a `%2F…` authority and a custom
/// header to the dynamic table (literal with incremental indexing), the
/// second call names them only by their dynamic-table index. Both answered.
#[tokio::test]
async fn hand_crafted_frames_with_a_percent_encoded_authority_get_answers() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    let mut conn = plugin.endpoint().connect_stream().await?;
    handshake(&mut conn, WAIT).await?;

    let mut first = vec![0x83, 0x86]; // :method POST, :scheme http
    hpack_int(&mut first, 0x40, 6, 4); // :path, indexed → dynamic 65 after this block
    hpack_str(&mut first, STATUS_METHOD.as_bytes());
    hpack_int(&mut first, 0x40, 6, 1); // :authority, indexed → dynamic 64
    hpack_str(&mut first, b"%2Frun%2Fatrest%2Fkms.sock");
    hpack_int(&mut first, 0x40, 6, 31); // content-type, indexed → dynamic 63
    hpack_str(&mut first, b"application/grpc");
    first.push(0x40); // new name, indexed → dynamic 62
    hpack_str(&mut first, b"te");
    hpack_str(&mut first, b"trailers");
    let second = [0x83, 0x86, 0x80 | 65, 0x80 | 64, 0x80 | 63, 0x80 | 62];

    let mut bytes = Vec::new();
    let body = grpc_message(&StatusRequest {}.encode_to_vec());
    for (stream, block) in [(1, &first[..]), (3, &second[..])] {
        frame(&mut bytes, kind::HEADERS, flag::END_HEADERS, stream, block);
        frame(&mut bytes, kind::DATA, flag::END_STREAM, stream, &body);
    }
    conn.write_all(&bytes).await?;
    let answers = answers(&mut conn, &[1, 3]).await?;
    for stream in [1, 3] {
        let status =
            status_message(&answers[&stream]).with_context(|| format!("stream {stream}"))?;
        assert_eq!(status.healthz, "ok");
    }
    Ok(())
}

/// Authorities h2 alone refuses — a path, percent signs, empty, non-ASCII —
/// are all served, and a valid one still is.
#[tokio::test]
async fn any_authority_is_served() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    let mut conn = plugin.endpoint().connect_stream().await?;
    handshake(&mut conn, WAIT).await?;
    let authorities: [&[u8]; 6] = [
        b"%2Frun%2Fkms.sock",
        b"/run/kms.sock",
        b"",
        "kms-\u{e9}.sock".as_bytes(),
        b"a b",
        b"localhost:1234",
    ];
    let mut bytes = Vec::new();
    let mut streams = Vec::new();
    for (i, authority) in authorities.iter().enumerate() {
        let stream = 1 + 2 * u32::try_from(i)?;
        streams.push(stream);
        bytes.extend(grpc_call(
            stream,
            authority,
            STATUS_METHOD,
            &StatusRequest {}.encode_to_vec(),
        ));
    }
    conn.write_all(&bytes).await?;
    let answers = answers(&mut conn, &streams).await?;
    for (stream, authority) in streams.iter().zip(authorities) {
        let status = status_message(&answers[stream])
            .with_context(|| format!("authority {:?}", String::from_utf8_lossy(authority)))?;
        assert_eq!(status.healthz, "ok");
    }
    Ok(())
}

/// Whether the server closed `conn` (EOF, reset, or GOAWAY) within [`WAIT`].
async fn closed(conn: &mut UnixStream) -> Result<bool> {
    loop {
        match read_frame(conn, WAIT).await {
            Ok(None) => return Ok(true),
            Ok(Some(f)) if f.kind == kind::GOAWAY => return Ok(true),
            Ok(Some(_)) => {}
            Err(e) if e.to_string().contains("no frame within") => return Ok(false),
            // A broken pipe or reset while reading: closed too.
            Err(_) => return Ok(true),
        }
    }
}

/// A hostile connection: preface, SETTINGS, then `attack`.
async fn hostile(plugin: &PluginProcess, attack: &[u8]) -> Result<UnixStream> {
    let mut conn = plugin.endpoint().connect_stream().await?;
    let mut bytes = PREFACE.to_vec();
    frame(&mut bytes, kind::SETTINGS, 0, 0, &[]);
    bytes.extend_from_slice(attack);
    // The server may close before reading it all: a failed write is fine.
    let _ = conn.write_all(&bytes).await;
    Ok(conn)
}

/// Malformed HPACK, an oversized header block, a CONTINUATION flood: each
/// such connection is closed, with a log line; a client already connected
/// and new clients keep being served.
#[tokio::test]
async fn hostile_header_blocks_close_only_their_connection() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    let bystander = plugin.client();
    assert_eq!(
        bystander
            .clone()
            .status(StatusRequest {})
            .await?
            .into_inner()
            .healthz,
        "ok"
    );

    let mut attacks: Vec<(&str, Vec<u8>)> = Vec::new();
    let mut bad_index = Vec::new();
    frame(
        &mut bad_index,
        kind::HEADERS,
        flag::END_HEADERS,
        1,
        &[0x83, 0xff, 0x7f],
    );
    attacks.push(("an index past both HPACK tables", bad_index));
    let mut truncated = Vec::new();
    frame(
        &mut truncated,
        kind::HEADERS,
        flag::END_HEADERS,
        1,
        &[0x83, 0x44, 0x7f],
    );
    attacks.push(("a string longer than its block", truncated));
    let mut oversized = Vec::new();
    frame(&mut oversized, kind::HEADERS, 0, 1, &[0x83]);
    for _ in 0..5 {
        frame(&mut oversized, kind::CONTINUATION, 0, 1, &[0x82; 16_000]);
    }
    attacks.push(("an 80 KB header block", oversized));
    let mut flood = Vec::new();
    frame(&mut flood, kind::HEADERS, 0, 1, &[0x83]);
    for _ in 0..10_000 {
        frame(&mut flood, kind::CONTINUATION, 0, 1, &[]);
    }
    attacks.push(("a CONTINUATION flood", flood));
    let mut amplified = vec![0x40, 1, b'x', 0x7f, 0xa1, 0x1e]; // x: 4,000 bytes, indexed
    amplified.extend(vec![b'v'; 4000]);
    amplified.extend(vec![0x80 | 62; 1000]); // 1,000 references to it: 4 MB
    let mut bomb = Vec::new();
    frame(&mut bomb, kind::HEADERS, flag::END_HEADERS, 1, &amplified);
    attacks.push(("an HPACK decompression bomb", bomb));

    for (what, attack) in &attacks {
        let mut conn = hostile(&plugin, attack).await?;
        assert!(closed(&mut conn).await?, "{what}: connection left open");
        assert_eq!(
            bystander
                .clone()
                .status(StatusRequest {})
                .await?
                .into_inner()
                .healthz,
            "ok",
            "after {what}"
        );
    }
    plugin
        .wait_for_log("refused its HTTP/2 header block")
        .await?;
    let log = plugin.log();
    for reason in [
        "larger than 65536 bytes",
        "more than 32 frames",
        "not valid HPACK",
        "decoded header list larger",
    ] {
        assert!(log.contains(reason), "no log line with {reason:?}:\n{log}");
    }
    assert!(!log.contains("panicked"), "{log}");
    Ok(())
}

/// A fuzz-style run through the shim into the real server: a valid call
/// with random bytes flipped, random frames, many times. No panic; every
/// connection is closed or served; the plugin serves others throughout.
#[tokio::test]
async fn mutated_frames_never_break_the_plugin() -> Result<()> {
    let plugin = PluginProcess::start(PluginOptions::new()).await?;
    let pid = plugin.pid();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*: reproducible, no dependency.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let valid = {
        let mut first = vec![0x83, 0x86];
        hpack_int(&mut first, 0x40, 6, 4);
        hpack_str(&mut first, STATUS_METHOD.as_bytes());
        hpack_int(&mut first, 0x40, 6, 1);
        hpack_str(&mut first, b"%2Frun%2Fkms.sock");
        hpack_int(&mut first, 0x40, 6, 31);
        hpack_str(&mut first, b"application/grpc");
        let mut bytes = Vec::new();
        let body = grpc_message(&[]);
        frame(&mut bytes, kind::HEADERS, flag::END_HEADERS, 1, &first);
        frame(&mut bytes, kind::DATA, flag::END_STREAM, 1, &body);
        frame(
            &mut bytes,
            kind::HEADERS,
            flag::END_HEADERS,
            3,
            &[0x83, 0x86, 0xc0, 0xbf, 0xbe],
        );
        frame(&mut bytes, kind::DATA, flag::END_STREAM, 3, &body);
        bytes
    };
    const ROUNDS: usize = 200;
    let mut served = 0;
    for round in 0..ROUNDS {
        let attack = if round % 3 == 2 {
            // Random frames of the interesting types.
            let mut bytes = Vec::new();
            for _ in 0..(next() % 8) {
                let k = [kind::HEADERS, kind::CONTINUATION, kind::DATA, 0x8][next() as usize % 4];
                let len = (next() % 40) as usize;
                let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                frame(&mut bytes, k, next() as u8, (next() % 4) as u32, &payload);
            }
            bytes
        } else {
            let mut bytes = valid.clone();
            for _ in 0..(1 + next() % 4) {
                let at = next() as usize % bytes.len();
                bytes[at] ^= (next() % 255 + 1) as u8;
            }
            bytes
        };
        let mut conn = hostile(&plugin, &attack).await?;
        // Closed, or answered and then idle: either is fine; hanging the
        // plugin is not, which the Status below checks.
        let mut answered = false;
        loop {
            match read_frame(&mut conn, std::time::Duration::from_millis(100)).await {
                Ok(Some(f)) if f.kind == kind::HEADERS || f.kind == kind::DATA => answered = true,
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        served += usize::from(answered);
        if round % 50 == 49 {
            assert_eq!(plugin.status().await?.healthz, "ok", "after round {round}");
        }
    }
    println!("{served} of {ROUNDS} mutated connections got an answer on some stream");
    assert!(nix::sys::signal::kill(pid, None).is_ok(), "the plugin died");
    assert_eq!(plugin.status().await?.healthz, "ok");
    assert!(!plugin.log().contains("panicked"), "{}", plugin.log());
    Ok(())
}
