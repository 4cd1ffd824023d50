//! The protobuf contracts atrest speaks, compiled from `proto/` at build time.
//!
//! - [`kms::v2`] (feature `kms-grpc`): the KMS v2 gRPC API kube-apiserver calls,
//!   with client and server stubs. Types that carry plaintext have a redacting `Debug`.
//! - [`stored::kmsv2`]: the `EncryptedObject` kube-apiserver stores in etcd after
//!   the `k8s:enc:kms:v2:<provider>:` prefix.

#![warn(missing_docs)]

/// The KMS v2 gRPC API (package `v2`).
#[cfg(feature = "kms-grpc")]
pub mod kms {
    #[allow(missing_docs, clippy::all, missing_debug_implementations)]
    pub mod v2 {
        tonic::include_proto!("v2");

        use std::fmt;

        impl fmt::Debug for EncryptRequest {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("EncryptRequest")
                    .field(
                        "plaintext",
                        &format_args!("<redacted {} bytes>", self.plaintext.len()),
                    )
                    .field("uid", &self.uid)
                    .finish()
            }
        }

        impl fmt::Debug for DecryptResponse {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("DecryptResponse")
                    .field(
                        "plaintext",
                        &format_args!("<redacted {} bytes>", self.plaintext.len()),
                    )
                    .finish()
            }
        }

        /// Full gRPC method paths, as kube-apiserver calls them.
        pub const STATUS_METHOD: &str = "/v2.KeyManagementService/Status";
        /// See [`STATUS_METHOD`].
        pub const ENCRYPT_METHOD: &str = "/v2.KeyManagementService/Encrypt";
        /// See [`STATUS_METHOD`].
        pub const DECRYPT_METHOD: &str = "/v2.KeyManagementService/Decrypt";
    }
}

/// What kube-apiserver stores in etcd.
pub mod stored {
    /// The KMS v2 `EncryptedObject` (field numbers from the apiserver source).
    #[allow(missing_docs, clippy::all)]
    pub mod kmsv2 {
        include!(concat!(env!("OUT_DIR"), "/atrest.stored.kmsv2.rs"));
    }
}

#[cfg(all(test, feature = "kms-grpc"))]
mod tests {
    use super::kms::v2::{DecryptResponse, EncryptRequest};

    #[test]
    fn plaintext_carrying_messages_redact_debug() {
        let canary = b"CANARY-PLAINTEXT-0123456789".to_vec();
        let req = EncryptRequest {
            plaintext: canary.clone(),
            uid: "u-1".into(),
        };
        let resp = DecryptResponse { plaintext: canary };
        for shown in [format!("{req:?}"), format!("{resp:?}"), format!("{req:#?}")] {
            assert!(!shown.contains("CANARY"), "{shown}");
            assert!(!shown.contains("67, 65, 78"), "{shown}");
            assert!(shown.contains("redacted 27 bytes"), "{shown}");
        }
    }
}
