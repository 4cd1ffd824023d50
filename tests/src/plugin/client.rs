//! gRPC client side: dialling the plugin over a file or abstract unix socket,
//! and a call that is deliberately held open (for graceful-shutdown tests).

use std::fmt;
use std::future::Future as _;
use std::os::linux::net::SocketAddrExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use atrest_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
use atrest_proto::kms::v2::{DecryptRequest, ENCRYPT_METHOD, EncryptRequest, EncryptResponse};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated KMS v2 client over one shared channel (clone it freely: clones
/// share the channel's single HTTP/2 connection).
pub type KmsClient = KeyManagementServiceClient<Channel>;

/// Where a plugin listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketEndpoint {
    /// A socket file at this path.
    File(PathBuf),
    /// A Linux abstract socket with this name (no leading `@`).
    Abstract(String),
}

impl SocketEndpoint {
    /// An abstract socket name no other test (or earlier run) uses.
    pub fn unique_abstract() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        SocketEndpoint::Abstract(format!(
            "atrest-test-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// The `--listen` argument naming this endpoint.
    pub fn listen_arg(&self) -> String {
        match self {
            SocketEndpoint::File(path) => path.display().to_string(),
            SocketEndpoint::Abstract(name) => format!("unix:///@{name}"),
        }
    }

    /// The socket file, if this endpoint has one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            SocketEndpoint::File(path) => Some(path),
            SocketEndpoint::Abstract(_) => None,
        }
    }

    /// One raw connection to the endpoint.
    pub async fn connect_stream(&self) -> std::io::Result<tokio::net::UnixStream> {
        match self {
            SocketEndpoint::File(path) => tokio::net::UnixStream::connect(path).await,
            SocketEndpoint::Abstract(name) => {
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                // A unix connect does not wait on the network: blocking is brief.
                let stream = std::os::unix::net::UnixStream::connect_addr(&addr)?;
                stream.set_nonblocking(true)?;
                tokio::net::UnixStream::from_std(stream)
            }
        }
    }
}

impl fmt::Display for SocketEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.listen_arg())
    }
}

/// Opens one gRPC channel to the plugin (authority `localhost`, as the apiserver dials).
pub async fn connect(endpoint: &SocketEndpoint) -> Result<Channel> {
    let target = endpoint.clone();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(target.connect_stream().await?)) }
        }))
        .await
        .with_context(|| format!("connecting a gRPC channel to {endpoint}"))
}

/// An Encrypt call whose request headers are on the wire but whose message is
/// held back until [`HeldCall::release`]: the server sees a call in flight that
/// it cannot finish on its own.
#[derive(Debug)]
pub struct HeldCall {
    started: Option<oneshot::Receiver<()>>,
    gate: Option<oneshot::Sender<()>>,
    response: JoinHandle<Result<EncryptResponse, tonic::Status>>,
}

/// Starts a held Encrypt of `request` on `channel` (see [`HeldCall`]).
///
/// It is sent as a client-streaming call of one message to the Encrypt path:
/// on the wire that is exactly a unary call, only its body arrives later.
pub fn hold_encrypt(channel: Channel, request: EncryptRequest) -> HeldCall {
    let (started_tx, started_rx) = oneshot::channel();
    let (gate_tx, gate_rx) = oneshot::channel();
    let body = GatedMessage {
        first_poll: Some(started_tx),
        gate: Some(gate_rx),
        message: Some(request),
    };
    let response = tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
        grpc.client_streaming(
            tonic::Request::new(body),
            PathAndQuery::from_static(ENCRYPT_METHOD),
            tonic_prost::ProstCodec::<EncryptRequest, EncryptResponse>::default(),
        )
        .await
        .map(tonic::Response::into_inner)
    });
    HeldCall {
        started: Some(started_rx),
        gate: Some(gate_tx),
        response,
    }
}

impl HeldCall {
    /// Waits until the call's request headers were handed to the HTTP/2
    /// connection (its body is polled only after that).
    pub async fn started(&mut self) -> Result<()> {
        if let Some(started) = self.started.take() {
            started
                .await
                .context("held call ended before its request body was polled")?;
        }
        Ok(())
    }

    /// Whether the call has ended (it should not have, while held).
    pub fn is_finished(&self) -> bool {
        self.response.is_finished()
    }

    /// Lets the request message go and returns the call's outcome.
    pub async fn release(mut self) -> Result<Result<EncryptResponse, tonic::Status>> {
        if let Some(gate) = self.gate.take() {
            // The receiver is gone only if the call already ended; its outcome says why.
            let _ = gate.send(());
        }
        self.response.await.context("held call task panicked")
    }
}

/// A request body of one message that waits for a gate before yielding it.
struct GatedMessage {
    first_poll: Option<oneshot::Sender<()>>,
    gate: Option<oneshot::Receiver<()>>,
    message: Option<EncryptRequest>,
}

impl tokio_stream::Stream for GatedMessage {
    type Item = EncryptRequest;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<EncryptRequest>> {
        let this = self.get_mut();
        if let Some(first_poll) = this.first_poll.take() {
            let _ = first_poll.send(());
        }
        if let Some(gate) = this.gate.as_mut() {
            match Pin::new(gate).poll(cx) {
                Poll::Pending => return Poll::Pending,
                // Released, or the test dropped the gate: send the message either way.
                Poll::Ready(_) => this.gate = None,
            }
        }
        Poll::Ready(this.message.take())
    }
}

/// Encrypt `plaintext` with a fresh uid.
pub async fn encrypt(
    client: &KmsClient,
    plaintext: &[u8],
) -> Result<EncryptResponse, tonic::Status> {
    client
        .clone()
        .encrypt(EncryptRequest {
            plaintext: plaintext.to_vec(),
            uid: next_uid(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Decrypt `ciphertext` returned with `key_id` (no annotations, as this plugin writes none).
pub async fn decrypt(
    client: &KmsClient,
    ciphertext: &[u8],
    key_id: &str,
) -> Result<Vec<u8>, tonic::Status> {
    client
        .clone()
        .decrypt(DecryptRequest {
            ciphertext: ciphertext.to_vec(),
            uid: next_uid(),
            key_id: key_id.to_owned(),
            annotations: Default::default(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

/// A 32-byte DEK-seed-like plaintext, different for every `n`.
pub fn seed(n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    for i in 0..4u64 {
        out.extend_from_slice(
            &(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i << 56) ^ n).to_be_bytes(),
        );
    }
    out
}

/// A uid like the apiserver's (unique per call; for logs only).
fn next_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "atrest-test-uid-{}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
