//! `broken-kms-plugin`: a test fixture standing for a **third-party KMS v2
//! plugin that is broken** — not a mock of atrest's kms-plugin. Its Status is
//! healthy and its Encrypt answers, but one thing a correct plugin never does
//! goes wrong (`--fault`):
//!
//! - `decrypt-fails`: Decrypt always answers `INTERNAL`;
//! - `wrong-plaintext`: Decrypt returns other bytes than were encrypted;
//! - `other-key-id`: Encrypt returns a key_id that Status never reported.
//!
//! kube-apiserver would make such a plugin its writer (Status is healthy) and
//! then fail to read what it wrote; the rotator's round-trip interlock and
//! `kms-plugin probe --roundtrip` must refuse it. It serves on a unix socket
//! path and prints `listening on PATH` once bound. Tests only.

use std::path::PathBuf;
use std::process::ExitCode;

use atrest_proto::kms::v2::key_management_service_server::{
    KeyManagementService, KeyManagementServiceServer,
};
use atrest_proto::kms::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use clap::{Parser, ValueEnum};
use tonic::{Request, Response, Status};

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Fault {
    /// Decrypt always fails.
    DecryptFails,
    /// Decrypt returns other bytes.
    WrongPlaintext,
    /// Encrypt returns a key_id Status never reported.
    OtherKeyId,
}

/// A broken third-party KMS v2 plugin (test fixture).
#[derive(Debug, Parser)]
#[command(name = "broken-kms-plugin")]
struct Args {
    /// Unix socket path to serve on (removed first if it is a stale socket).
    #[arg(long)]
    listen: PathBuf,
    /// What goes wrong.
    #[arg(long, value_enum)]
    fault: Fault,
}

const KEY_ID: &str = "broken-fixture-key-1";
const PREFIX: &[u8] = b"broken-fixture:";

struct Broken {
    fault: Fault,
}

/// The fixture's "encryption": a fixed XOR, so that Decrypt can give the
/// bytes back when its fault is elsewhere. Not a cipher.
fn scramble(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().map(|b| b ^ 0x5a).collect()
}

#[tonic::async_trait]
impl KeyManagementService for Broken {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: KEY_ID.into(),
        }))
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let plaintext = request.into_inner().plaintext;
        let mut ciphertext = PREFIX.to_vec();
        ciphertext.extend(scramble(&plaintext));
        let key_id = match self.fault {
            Fault::OtherKeyId => "broken-fixture-key-2".into(),
            _ => KEY_ID.into(),
        };
        Ok(Response::new(EncryptResponse {
            ciphertext,
            key_id,
            annotations: Default::default(),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let ciphertext = request.into_inner().ciphertext;
        let body = ciphertext
            .strip_prefix(PREFIX)
            .ok_or_else(|| Status::invalid_argument("not a ciphertext of this fixture"))?;
        match self.fault {
            Fault::DecryptFails => Err(Status::internal(
                "broken-kms-plugin: this plugin cannot decrypt (test fixture)",
            )),
            Fault::WrongPlaintext => {
                let mut wrong = scramble(body);
                if let Some(first) = wrong.first_mut() {
                    *first ^= 1;
                }
                Ok(Response::new(DecryptResponse { plaintext: wrong }))
            }
            Fault::OtherKeyId => Ok(Response::new(DecryptResponse {
                plaintext: scramble(body),
            })),
        }
    }
}

async fn serve(args: Args) -> Result<(), String> {
    if let Ok(meta) = std::fs::symlink_metadata(&args.listen) {
        use std::os::unix::fs::FileTypeExt as _;
        if meta.file_type().is_socket() {
            std::fs::remove_file(&args.listen)
                .map_err(|e| format!("remove stale {}: {e}", args.listen.display()))?;
        }
    }
    let listener = tokio::net::UnixListener::bind(&args.listen)
        .map_err(|e| format!("bind {}: {e}", args.listen.display()))?;
    println!("listening on {}", args.listen.display());
    tonic::transport::Server::builder()
        .add_service(KeyManagementServiceServer::new(Broken {
            fault: args.fault,
        }))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .map_err(|e| format!("serve: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("broken-kms-plugin: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("broken-kms-plugin: {e}");
            ExitCode::FAILURE
        }
    }
}
