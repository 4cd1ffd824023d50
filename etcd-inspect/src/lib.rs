//! etcd-inspect: a read-only audit of what kube-apiserver stored in etcd.
//!
//! It scans a key prefix with range reads pinned to one revision, linear in
//! the number of keys and bounded in memory ([`scan`], over [`etcd`]), classifies every value and maps its key to a resource with the
//! `storage-encryption` crate, and — given an EncryptionConfiguration —
//! judges each value against the provider and key the config would write
//! ([`audit`]), optionally proving it decrypts ([`decrypt`], with KMS v2
//! seeds through the plugin, [`kms`]). Results go to a [`report`] (table,
//! streaming JSON, JUnit) and an exit code ([`run::Outcome`]).
//!
//! `etcd-inspect snapshot FILE` reads a snapshot file instead
//! ([`snapshot`], with the `etcd-snapshot` bolt reader) into the same pipeline.
//! `--history` (`--all-revisions` on a live etcd) feeds every revision still
//! stored since the last compaction the same way ([`history`], a watch).
//!
//! Start reading at [`run::run`]. The binary's flags are in [`cli`].
//! Plaintext and key material never reach a report, a log or an error.

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod audit;
pub mod cli;
pub mod decrypt;
pub mod etcd;
pub mod free_pages;
pub mod history;
pub mod kms;
pub mod progress;
pub mod record;
pub mod report;
pub mod run;
pub mod scan;
pub mod snapshot;
pub mod summary;

pub use cli::{Args, OutputFormat, Settings};
pub use record::{Finding, ProviderKind, ProviderRef, Record, RevisionInfo};
pub use run::{Outcome, RunError, run};
