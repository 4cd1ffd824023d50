//! Dialing a Kubernetes KMS v2 plugin the way kube-apiserver does: gRPC over
//! a unix socket (a file or a Linux abstract name), authority `localhost`, one
//! HTTP/2 connection shared by every clone of the returned channel.
//!
//! Used by the plugin's `probe`, by etcd-inspect, by the load generator and by
//! the end-to-end tests, so all of them parse endpoints the same way.
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod endpoint;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::Duration;

pub use atrest_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
pub use endpoint::{Endpoint, EndpointError};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

/// Could not reach the plugin. The reason includes the OS error, which
/// tonic's own message leaves out ("transport error").
#[derive(Debug, Error)]
#[error("cannot connect to the KMS plugin at {endpoint}: {reason}")]
pub struct ConnectError {
    /// Where.
    pub endpoint: Endpoint,
    /// Why, with every underlying cause.
    pub reason: String,
}

/// An error and its sources, joined: "transport error: No such file or directory (os error 2)".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// A client of the KMS v2 service on a channel.
pub type KmsClient = KeyManagementServiceClient<Channel>;

/// Connects a blocking std stream to `endpoint`.
pub fn connect_std(endpoint: &Endpoint) -> std::io::Result<UnixStream> {
    match endpoint {
        Endpoint::Path(p) => UnixStream::connect(p),
        Endpoint::Abstract(name) => {
            UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)
        }
    }
}

/// A gRPC channel to the plugin at `endpoint`; fails if nothing answers
/// within `timeout`, and bounds every call on it by `timeout` too (as
/// kube-apiserver applies a provider's `timeout` to each call).
pub async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Channel, ConnectError> {
    let target = endpoint.clone();
    TonicEndpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move {
                let stream = connect_std(&target)?;
                stream.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(stream)?))
            }
        }))
        .await
        .map_err(|e| ConnectError {
            endpoint: endpoint.clone(),
            reason: error_chain(&e),
        })
}

/// [`connect`], wrapped in the generated KMS v2 client.
pub async fn connect_client(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<KmsClient, ConnectError> {
    Ok(KeyManagementServiceClient::new(
        connect(endpoint, timeout).await?,
    ))
}
