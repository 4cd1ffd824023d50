//! `kms-plugin probe`: Status over the socket, judged by kube-apiserver's health rules.

use std::time::Duration;

use crate::health::HEALTHY;
use atrest_proto::kms::v2::StatusRequest;
use kms_client::Endpoint;
use thiserror::Error;

/// Why `probe` found the plugin not healthy.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// Could not connect.
    #[error(transparent)]
    Connect(#[from] kms_client::ConnectError),
    /// Status failed or timed out.
    #[error("Status call to {endpoint} failed: {message}")]
    Call {
        /// Where.
        endpoint: Endpoint,
        /// The gRPC status message.
        message: String,
    },
    /// Status answered, but not healthy.
    #[error("unhealthy: {0}")]
    Unhealthy(String),
}

/// What a healthy plugin reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// Status.version.
    pub version: String,
    /// Status.key_id.
    pub key_id: String,
}

/// Calls Status and applies kube-apiserver's health rules.
pub async fn probe(endpoint: &Endpoint, timeout: Duration) -> Result<ProbeReport, ProbeError> {
    let mut client = kms_client::connect_client(endpoint, timeout).await?;
    let call = tokio::time::timeout(timeout, client.status(StatusRequest {}));
    let status = match call.await {
        Err(_) => {
            return Err(ProbeError::Call {
                endpoint: endpoint.clone(),
                message: format!("no answer within {timeout:?}"),
            });
        }
        Ok(Err(s)) => {
            return Err(ProbeError::Call {
                endpoint: endpoint.clone(),
                message: s.message().to_owned(),
            });
        }
        Ok(Ok(r)) => r.into_inner(),
    };
    if status.healthz != HEALTHY {
        return Err(ProbeError::Unhealthy(format!(
            "healthz {:?}",
            status.healthz
        )));
    }
    if status.version != "v2" && status.version != "v2beta1" {
        return Err(ProbeError::Unhealthy(format!(
            "version {:?} is not v2",
            status.version
        )));
    }
    if status.key_id.is_empty() || status.key_id.len() > 1024 {
        return Err(ProbeError::Unhealthy(format!(
            "key_id is {} bytes (want 1..=1024)",
            status.key_id.len()
        )));
    }
    Ok(ProbeReport {
        version: status.version,
        key_id: status.key_id,
    })
}
