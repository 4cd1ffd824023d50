//! A small client for a KMS v2 plugin (ours or any other) on a unix socket:
//! `Status` for the current `key_id`, `Decrypt` for `--decrypt-check`.
//!
//! Endpoint forms (parsed and dialed by `kms-client`): `/path`, `unix:///path`,
//! and abstract `unix:///@name`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use atrest_proto::kms::v2::key_management_service_client::KeyManagementServiceClient;
use atrest_proto::kms::v2::{DecryptRequest, StatusRequest};
use tonic::transport::Channel;
use zeroize::Zeroizing;

/// Errors talking to a KMS plugin; they name the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// The endpoint string is not one of the accepted forms.
    #[error(
        "KMS endpoint {endpoint:?} is not a unix socket (use /path, unix:///path or unix:///@name)"
    )]
    BadEndpoint {
        /// As given.
        endpoint: String,
    },
    /// Could not connect.
    #[error("cannot connect to the KMS plugin at {endpoint}: {reason}")]
    Connect {
        /// As given.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// A call failed.
    #[error("KMS plugin at {endpoint}: {method} failed: {code:?}: {message}")]
    Call {
        /// As given.
        endpoint: String,
        /// `Status` or `Decrypt`.
        method: &'static str,
        /// gRPC code.
        code: tonic::Code,
        /// The plugin's message (plugins do not put plaintext in errors).
        message: String,
    },
    /// The call did not answer in time.
    #[error("KMS plugin at {endpoint}: {method} timed out after {timeout:?}")]
    Timeout {
        /// As given.
        endpoint: String,
        /// `Status` or `Decrypt`.
        method: &'static str,
        /// The limit.
        timeout: Duration,
    },
}

impl KmsError {
    /// Whether the error says the plugin is down, hung or unreachable (no
    /// answer, a timeout, a broken connection) rather than that it looked at
    /// the request and refused it. An outage judges nothing about the data.
    pub fn is_outage(&self) -> bool {
        match self {
            KmsError::BadEndpoint { .. } => false,
            KmsError::Connect { .. } | KmsError::Timeout { .. } => true,
            KmsError::Call { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
                    | tonic::Code::ResourceExhausted
            ),
        }
    }
}

/// Parses the endpoint forms kube-apiserver and our plugin accept.
pub fn parse_endpoint(endpoint: &str) -> Result<kms_client::Endpoint, KmsError> {
    endpoint.parse().map_err(|_| KmsError::BadEndpoint {
        endpoint: endpoint.to_owned(),
    })
}

/// The plugin's answer to Status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginStatus {
    /// "v2" (or "v2beta1").
    pub version: String,
    /// "ok" when healthy.
    pub healthz: String,
    /// The key_id new writes get.
    pub key_id: String,
}

/// A connected KMS v2 client.
#[derive(Debug, Clone)]
pub struct KmsClient {
    endpoint: String,
    timeout: Duration,
    inner: KeyManagementServiceClient<Channel>,
}

static UID: AtomicU64 = AtomicU64::new(0);

impl KmsClient {
    /// Connects (eagerly, so a wrong path is reported here).
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Self, KmsError> {
        let addr = parse_endpoint(endpoint)?;
        let channel = kms_client::connect(&addr, timeout)
            .await
            .map_err(|e| KmsError::Connect {
                endpoint: endpoint.to_owned(),
                reason: e.reason,
            })?;
        Ok(KmsClient {
            endpoint: endpoint.to_owned(),
            timeout,
            inner: KeyManagementServiceClient::new(channel),
        })
    }

    /// The endpoint as given.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Calls Status.
    pub async fn status(&mut self) -> Result<PluginStatus, KmsError> {
        let (endpoint, timeout) = (self.endpoint.clone(), self.timeout);
        let call = self.inner.status(StatusRequest {});
        let resp = bounded(endpoint, timeout, "Status", call).await?;
        let r = resp.into_inner();
        Ok(PluginStatus {
            version: r.version,
            healthz: r.healthz,
            key_id: r.key_id,
        })
    }

    /// Calls Decrypt; the plaintext (a DEK seed) is zeroized on drop.
    pub async fn decrypt(
        &mut self,
        ciphertext: &[u8],
        key_id: &str,
        annotations: &HashMap<String, Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let uid = format!(
            "etcd-inspect-{}-{}",
            std::process::id(),
            UID.fetch_add(1, Ordering::Relaxed)
        );
        let req = DecryptRequest {
            ciphertext: ciphertext.to_vec(),
            uid,
            key_id: key_id.to_owned(),
            annotations: annotations.clone(),
        };
        let (endpoint, timeout) = (self.endpoint.clone(), self.timeout);
        let call = self.inner.decrypt(req);
        let resp = bounded(endpoint, timeout, "Decrypt", call).await?;
        Ok(Zeroizing::new(resp.into_inner().plaintext))
    }
}

async fn bounded<T>(
    endpoint: String,
    timeout: Duration,
    method: &'static str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<tonic::Response<T>, KmsError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(KmsError::Timeout {
            endpoint,
            method,
            timeout,
        }),
        Ok(Err(s)) => Err(KmsError::Call {
            endpoint,
            method,
            code: s.code(),
            message: s.message().to_owned(),
        }),
        Ok(Ok(r)) => Ok(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            parse_endpoint("/run/k.sock").unwrap(),
            kms_client::Endpoint::Path("/run/k.sock".into())
        );
        assert_eq!(
            parse_endpoint("unix:///run/k.sock").unwrap(),
            kms_client::Endpoint::Path("/run/k.sock".into())
        );
        assert_eq!(
            parse_endpoint("unix:///@kms").unwrap(),
            kms_client::Endpoint::Abstract("kms".into())
        );
        for bad in [
            "",
            "tcp://1.2.3.4:5",
            "unix://relative",
            "unix:///@",
            "unix:///",
            "k.sock",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
