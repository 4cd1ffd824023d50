//! Dialing a Kubernetes KMS v2 plugin the way kube-apiserver does: gRPC over
//! a unix socket (a file or a Linux abstract name), authority `localhost`, one
//! HTTP/2 connection shared by every clone of the returned channel.
//!
//! Used by the plugin's `probe`, by etcd-inspect, by the load generator and by
//! the end-to-end tests, so all of them parse endpoints the same way.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod endpoint;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::Duration;

pub use atrest_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
pub use endpoint::{Endpoint, EndpointError};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint, Uri};

/// A client of the KMS v2 service on a channel.
pub type KmsClient = KeyManagementServiceClient<Channel>;

/// Connects a blocking std stream to `endpoint`.
pub fn connect_std(endpoint: &Endpoint) -> std::io::Result<UnixStream> {
    match endpoint {
        Endpoint::Path(p) => UnixStream::connect(p),
        Endpoint::Abstract(name) => UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes())?),
    }
}

/// A gRPC channel to the plugin at `endpoint`; fails if nothing answers
/// within `timeout`.
pub async fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    let target = endpoint.clone();
    TonicEndpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            async move {
                let stream = connect_std(&target)?;
                stream.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(stream)?))
            }
        }))
        .await
}

/// [`connect`], wrapped in the generated KMS v2 client.
pub async fn connect_client(endpoint: &Endpoint, timeout: Duration) -> Result<KmsClient, tonic::transport::Error> {
    Ok(KeyManagementServiceClient::new(connect(endpoint, timeout).await?))
}
