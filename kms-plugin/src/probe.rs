//! `kms-plugin probe`: Status over the socket, judged by kube-apiserver's health rules.

use std::time::Duration;

use atrest_proto::kms::v2::StatusRequest;
use kms_client::Endpoint;
use thiserror::Error;
use crate::health::HEALTHY;

/// Why `probe` found the plugin not healthy.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// Could not connect.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// Where.
        endpoint: Endpoint,
        /// Why, with the underlying OS error (tonic's own message hides it).
        reason: String,
    },
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

/// An error and its sources, joined: "transport error: No such file or directory (os error 2)".
fn error_chain(error: &dyn std::error::Error) -> String {
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
    let mut client = kms_client::connect_client(endpoint, timeout)
        .await
        .map_err(|e| ProbeError::Connect { endpoint: endpoint.clone(), reason: error_chain(&e) })?;
    let call = tokio::time::timeout(timeout, client.status(StatusRequest {}));
    let status = match call.await {
        Err(_) => {
            return Err(ProbeError::Call { endpoint: endpoint.clone(), message: format!("no answer within {timeout:?}") });
        }
        Ok(Err(s)) => return Err(ProbeError::Call { endpoint: endpoint.clone(), message: s.message().to_owned() }),
        Ok(Ok(r)) => r.into_inner(),
    };
    if status.healthz != HEALTHY {
        return Err(ProbeError::Unhealthy(format!("healthz {:?}", status.healthz)));
    }
    if status.version != "v2" && status.version != "v2beta1" {
        return Err(ProbeError::Unhealthy(format!("version {:?} is not v2", status.version)));
    }
    if status.key_id.is_empty() || status.key_id.len() > 1024 {
        return Err(ProbeError::Unhealthy(format!("key_id is {} bytes (want 1..=1024)", status.key_id.len())));
    }
    Ok(ProbeReport { version: status.version, key_id: status.key_id })
}
