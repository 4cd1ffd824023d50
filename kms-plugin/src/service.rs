//! The KMS v2 gRPC service: Status, Encrypt and Decrypt over a [`KekBackend`].
//!
//! Errors from what the caller sent become gRPC statuses with a message that
//! names the problem and never the bytes. Nothing here panics on input.

use std::sync::Arc;
use std::time::Instant;

use atrest_proto::kms::v2::key_management_service_server::KeyManagementService;
use atrest_proto::kms::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::backend::{DecryptError, EncryptError, KekBackend};
use crate::health::Health;
use crate::metrics::{Method, Metrics, Outcome};
use crate::pkcs11::calls::Offloaded;

/// The version Status reports; kube-apiserver requires it never to change.
pub const VERSION: &str = "v2";

/// The longest key_id the contract allows; a longer one is refused before
/// anything else is done with it.
pub const MAX_KEY_ID_LEN: usize = 1024;

/// How many characters of a caller's value an error message or log shows.
const SHOWN_CHARS: usize = 64;

/// A caller-supplied value as errors and logs show it: escaped (no control
/// characters or terminal escapes), at most [`SHOWN_CHARS`] characters, and
/// its full length when it was cut.
pub fn shown(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(SHOWN_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().nth(SHOWN_CHARS).is_some() {
        out.push_str(&format!("…({} bytes)", value.len()));
    }
    format!("\"{out}\"")
}

/// The gRPC service.
#[derive(Debug)]
pub struct KmsService<B> {
    backend: Arc<B>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl<B> KmsService<B> {
    /// A service answering from `backend`, reporting `health`, recording into `metrics`.
    pub fn new(backend: Arc<B>, health: Arc<Health>, metrics: Arc<Metrics>) -> Self {
        KmsService {
            backend,
            health,
            metrics,
        }
    }
}

fn encrypt_status(e: &EncryptError) -> (Outcome, Status) {
    match e {
        EncryptError::EmptyPlaintext | EncryptError::PlaintextTooLong(_) => (
            Outcome::InvalidArgument,
            Status::invalid_argument(e.to_string()),
        ),
        EncryptError::Cipher => (Outcome::Internal, Status::internal(e.to_string())),
        EncryptError::Unavailable(_) => (Outcome::Internal, Status::unavailable(e.to_string())),
        EncryptError::Exhausted(_) => {
            (Outcome::Internal, Status::resource_exhausted(e.to_string()))
        }
    }
}

fn decrypt_status(e: &DecryptError, key_id: &str) -> (Outcome, Status) {
    match e {
        DecryptError::UnknownKeyId => (
            Outcome::UnknownKeyId,
            Status::failed_precondition(format!("key_id {}: {e}", shown(key_id))),
        ),
        DecryptError::Unavailable(_) => (
            Outcome::Internal,
            Status::unavailable(format!("key_id {key_id:?}: {e}")),
        ),
        DecryptError::Exhausted(_) => (
            Outcome::Internal,
            Status::resource_exhausted(format!("key_id {}: {e}", shown(key_id))),
        ),
        _ => (
            Outcome::InvalidArgument,
            Status::invalid_argument(format!("key_id {}: {e}", shown(key_id))),
        ),
    }
}

/// Runs a token KEK's call (which blocks on the token) on the token call
/// threads ([`crate::pkcs11::calls`]), so the async workers keep serving
/// meanwhile. Without a PKCS#11 configuration (never the case for a set that
/// blocks) it uses tokio's blocking pool.
async fn off_worker<T: Send + 'static>(call: impl FnOnce() -> T + Send + 'static) -> Offloaded<T> {
    match crate::pkcs11::serving::installed() {
        Some(hsm) => hsm.run(call).await,
        None => tokio::task::spawn_blocking(call)
            .await
            .map_or(Offloaded::Lost, Offloaded::Done),
    }
}

/// Why a token call was refused after waiting in the queue.
fn queue_timed_out() -> String {
    match crate::pkcs11::serving::installed() {
        Some(hsm) => hsm.busy_reason(),
        None => "the token call waited too long for a thread".to_owned(),
    }
}

#[tonic::async_trait]
impl<B: KekBackend> KeyManagementService for KmsService<B> {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        let set = self.backend.current();
        let response = StatusResponse {
            version: VERSION.to_owned(),
            healthz: self.health.healthz().as_str().to_owned(),
            key_id: set.key_id().to_owned(),
        };
        self.metrics
            .observe_call(Method::Status, Outcome::Ok, started.elapsed());
        Ok(Response::new(response))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(uid = %shown(&request.get_ref().uid), key_id))]
    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let started = Instant::now();
        let set = self.backend.current();
        let plaintext = request.into_inner().plaintext;
        let result = if set.encrypt_blocks() {
            let set = set.clone();
            match off_worker(move || set.encrypt(&plaintext)).await {
                Offloaded::Done(result) => result,
                Offloaded::TimedOut => Err(EncryptError::Exhausted(queue_timed_out())),
                Offloaded::Lost => Err(EncryptError::Cipher),
            }
        } else {
            set.encrypt(&plaintext)
        };
        match result {
            Ok(ciphertext) => {
                let key_id = set.key_id().to_owned();
                tracing::Span::current().record("key_id", key_id.as_str());
                tracing::debug!(ciphertext_len = ciphertext.len(), "encrypted");
                self.metrics
                    .observe_call(Method::Encrypt, Outcome::Ok, started.elapsed());
                Ok(Response::new(EncryptResponse {
                    ciphertext,
                    key_id,
                    annotations: Default::default(),
                }))
            }
            Err(e) => {
                let (outcome, status) = encrypt_status(&e);
                tracing::debug!(error = %e, "encrypt refused");
                self.metrics
                    .observe_call(Method::Encrypt, outcome, started.elapsed());
                Err(status)
            }
        }
    }

    #[tracing::instrument(
        level = "debug",
        skip_all,
        fields(uid = %shown(&request.get_ref().uid), key_id = %shown(&request.get_ref().key_id))
    )]
    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        // This plugin writes no annotations, so a request carrying some was not
        // produced by us (or was altered in etcd).
        let result = if req.key_id.len() > MAX_KEY_ID_LEN {
            // No key_id of ours is that long: unknown, said without echoing it.
            Err((
                Outcome::UnknownKeyId,
                Status::failed_precondition(format!(
                    "key_id is {} bytes, longer than any key_id ({MAX_KEY_ID_LEN} at most): not in this plugin's keyring",
                    req.key_id.len()
                )),
            ))
        } else if !req.annotations.is_empty() {
            Err((
                Outcome::InvalidArgument,
                Status::invalid_argument(format!(
                    "key_id {}: request carries {} annotation(s) but this plugin writes none",
                    shown(&req.key_id),
                    req.annotations.len()
                )),
            ))
        } else {
            let set = self.backend.current();
            if set.decrypt_blocks(&req.key_id) {
                let DecryptRequest {
                    key_id, ciphertext, ..
                } = req;
                let set = set.clone();
                match off_worker(move || (set.decrypt(&key_id, &ciphertext), key_id)).await {
                    Offloaded::Done((result, key_id)) => {
                        result.map_err(|e| decrypt_status(&e, &key_id))
                    }
                    Offloaded::TimedOut => Err((
                        Outcome::Internal,
                        Status::resource_exhausted(queue_timed_out()),
                    )),
                    Offloaded::Lost => Err((
                        Outcome::Internal,
                        Status::internal("decryption failed: the token call did not finish"),
                    )),
                }
            } else {
                set.decrypt(&req.key_id, &req.ciphertext)
                    .map_err(|e| decrypt_status(&e, &req.key_id))
            }
        };
        match result {
            Ok(plaintext) => {
                tracing::debug!("decrypted");
                self.metrics
                    .observe_call(Method::Decrypt, Outcome::Ok, started.elapsed());
                // The response owns a plain Vec; the zeroizing copy is wiped here.
                Ok(Response::new(DecryptResponse {
                    plaintext: plaintext.to_vec(),
                }))
            }
            Err((outcome, status)) => {
                tracing::debug!(reason = status.message(), "decrypt refused");
                self.metrics
                    .observe_call(Method::Decrypt, outcome, started.elapsed());
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_values_are_escaped_and_capped() {
        assert_eq!(shown("atrest-v1"), "\"atrest-v1\"");
        assert_eq!(shown("a\nb\u{1b}[31m"), "\"a\\nb\\u{1b}[31m\"");
        let long = "x".repeat(4 << 20);
        let s = shown(&long);
        assert!(s.len() < 100, "{s}");
        assert!(s.contains("(4194304 bytes)"), "{s}");
    }
}
