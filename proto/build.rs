//! Compiles the project's own .proto files at build time (needs `protoc`,
//! Debian package `protobuf-compiler`, or the PROTOC environment variable).

use std::io::Result;

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed=kms/v2/api.proto");
    println!("cargo:rerun-if-changed=storage/encrypted_object.proto");

    // The stored EncryptedObject carries only ciphertext: plain prost messages.
    prost_build::Config::new().compile_protos(&["storage/encrypted_object.proto"], &["."])?;

    if std::env::var_os("CARGO_FEATURE_KMS_GRPC").is_some() {
        // EncryptRequest and DecryptResponse carry plaintext (DEK seeds): their
        // Debug is written by hand in src/lib.rs and redacts it.
        tonic_prost_build::configure()
            .skip_debug(["v2.EncryptRequest", "v2.DecryptResponse"])
            .compile_protos(&["kms/v2/api.proto"], &["."])?;
    }
    Ok(())
}
