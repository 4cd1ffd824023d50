//! atrest kms-plugin: a Kubernetes KMS v2 plugin.
//!
//! kube-apiserver calls it over gRPC on a unix socket to encrypt and decrypt
//! 32-byte DEK seeds under a KEK from the local keyring file. Start reading at
//! [`serve::serve`] (the daemon), [`service`] (the three RPCs), [`keyring`]
//! (the snapshot of KEKs in service; the file itself, key_ids and the
//! successor check are the `keyring` crate's), [`envelope`] (the
//! ciphertext format) and [`pkcs11`] (KEKs kept in a PKCS#11 token: the
//! `keyring add --pkcs11-…` command, the session pool, the check value and
//! reconnects).
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub use kms_client::{Endpoint, EndpointError};

pub mod backend;
pub mod cli;
pub mod envelope;
pub mod health;
pub mod http;
pub mod keyring;
pub mod metrics;
pub mod pkcs11;
pub mod probe;
pub mod reload;
pub mod run;
pub mod serve;
pub mod service;
pub mod socket;
pub mod transport;
