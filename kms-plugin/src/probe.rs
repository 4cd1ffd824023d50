//! `kms-plugin probe`: Status over the socket, judged by kube-apiserver's
//! health rules; with `--roundtrip` also Encrypt + Decrypt of a random test
//! value ([`roundtrip`]), which any KMS v2 plugin (ours or another's) must
//! pass before it becomes a writer.

use std::time::{Duration, Instant};

use crate::health::HEALTHY;
use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore as _;
use atrest_proto::kms::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use kms_client::Endpoint;
use thiserror::Error;
use zeroize::Zeroizing;

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

/// What a round trip (Status, Encrypt of a random test value, Decrypt) showed.
/// Holds no plaintext: the test value lives only inside [`roundtrip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundTripReport {
    /// Status.version and Status.key_id.
    pub status: ProbeReport,
    /// Length of the ciphertext Encrypt returned.
    pub ciphertext_len: usize,
    /// How long Status took.
    pub status_time: Duration,
    /// How long Encrypt took.
    pub encrypt_time: Duration,
    /// How long Decrypt took.
    pub decrypt_time: Duration,
}

/// Why a round trip failed (after a healthy Status).
#[derive(Debug, Error)]
pub enum RoundTripError {
    /// Status failed or was unhealthy.
    #[error(transparent)]
    Status(#[from] ProbeError),
    /// The system gave no random bytes for the test value.
    #[error("the system random number generator failed")]
    Random,
    /// Encrypt or Decrypt failed or timed out.
    #[error("{call} call to {endpoint} failed: {message}")]
    Call {
        /// `Encrypt` or `Decrypt`.
        call: &'static str,
        /// Where.
        endpoint: Endpoint,
        /// The gRPC status code and message (the plugin's words; never our test value).
        message: String,
    },
    /// Encrypt answered with a key_id other than the one Status reported:
    /// kube-apiserver would not switch its write key to it.
    #[error("Encrypt returned key_id {encrypt:?} but Status reported {status:?}")]
    KeyIdMismatch {
        /// Status.key_id.
        status: String,
        /// EncryptResponse.key_id.
        encrypt: String,
    },
    /// Encrypt answered with an empty ciphertext.
    #[error("Encrypt returned an empty ciphertext")]
    EmptyCiphertext,
    /// Decrypt answered, but with other bytes than were encrypted.
    #[error(
        "Decrypt returned {got} bytes that differ from the {want} bytes encrypted: this plugin would hand kube-apiserver a wrong DEK seed"
    )]
    PlaintextMismatch {
        /// Length encrypted.
        want: usize,
        /// Length returned.
        got: usize,
    },
}

fn call_error<'a>(
    call: &'static str,
    endpoint: &'a Endpoint,
    timeout: Duration,
) -> impl Fn(CallFailure) -> RoundTripError + 'a {
    move |failure| RoundTripError::Call {
        call,
        endpoint: endpoint.clone(),
        message: match failure {
            CallFailure::Timeout => format!("no answer within {timeout:?}"),
            CallFailure::Status(s) => format!("{:?}: {}", s.code(), s.message()),
        },
    }
}

enum CallFailure {
    Timeout,
    Status(tonic::Status),
}

async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CallFailure> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(CallFailure::Timeout),
        Ok(Err(s)) => Err(CallFailure::Status(s)),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// Status (judged like [`probe`]), then Encrypt of 32 random bytes (a DEK
/// seed's size) and Decrypt of the result, as kube-apiserver does before it
/// makes a KMS provider its writer: the key_id Encrypt returns must be
/// Status's, and Decrypt must give back exactly the bytes encrypted. The test
/// value is random, zeroized after use, and never shown.
pub async fn roundtrip(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<RoundTripReport, RoundTripError> {
    let started = Instant::now();
    let status = probe(endpoint, timeout).await?;
    let status_time = started.elapsed();
    let mut plaintext = Zeroizing::new(vec![0u8; 32]);
    OsRng
        .try_fill_bytes(plaintext.as_mut_slice())
        .map_err(|_| RoundTripError::Random)?;
    let mut client = kms_client::connect_client(endpoint, timeout)
        .await
        .map_err(ProbeError::from)?;
    let uid = format!("atrest-probe-roundtrip-{}", std::process::id());
    let started = Instant::now();
    let encrypted = bounded(
        timeout,
        client.encrypt(EncryptRequest {
            plaintext: plaintext.to_vec(),
            uid: uid.clone(),
        }),
    )
    .await
    .map_err(call_error("Encrypt", endpoint, timeout))?;
    let encrypt_time = started.elapsed();
    if encrypted.key_id != status.key_id {
        return Err(RoundTripError::KeyIdMismatch {
            status: status.key_id,
            encrypt: encrypted.key_id,
        });
    }
    if encrypted.ciphertext.is_empty() {
        return Err(RoundTripError::EmptyCiphertext);
    }
    let ciphertext_len = encrypted.ciphertext.len();
    let started = Instant::now();
    let decrypted = bounded(
        timeout,
        client.decrypt(DecryptRequest {
            ciphertext: encrypted.ciphertext,
            uid,
            key_id: encrypted.key_id,
            annotations: encrypted.annotations,
        }),
    )
    .await
    .map_err(call_error("Decrypt", endpoint, timeout))?;
    let decrypt_time = started.elapsed();
    let got = Zeroizing::new(decrypted.plaintext);
    if *got != *plaintext {
        return Err(RoundTripError::PlaintextMismatch {
            want: plaintext.len(),
            got: got.len(),
        });
    }
    Ok(RoundTripReport {
        status,
        ciphertext_len,
        status_time,
        encrypt_time,
        decrypt_time,
    })
}
