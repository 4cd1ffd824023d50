//! # cli-kit
//!
//! What every atrest binary (`kms-plugin`, `etcd-inspect`, `rotator`,
//! `kms-loadgen`, `kube-apiserver-standin`) does the same way:
//!
//! | concern | API |
//! |---|---|
//! | logging to stderr, `ATREST_LOG` filter, plain or JSON, version at start | [`logging::init`] |
//! | the duration grammar of every flag (Go / Kubernetes style: `1m30s`, `500ms`, `1.5s`, `2h`) with a per-flag minimum | [`duration::at_least`], [`duration::parse`] |
//! | exit codes declared once per binary and shown in `--help` | [`exit_codes!`] |
//! | `tool | head` ends the tool quietly with exit 0 | [`output::print`], [`output::is_broken_pipe`] |
//! | caller- or etcd-supplied text made safe for a terminal or a log line | [`escape::escape_control`] |
//!
//! The duration grammar is the one kube-apiserver's EncryptionConfiguration uses
//! for a KMS provider's `timeout`; it lives in `storage-encryption` (which has no
//! I/O and no command-line parsing) and is wrapped here for clap.

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod duration;
pub mod escape;
pub mod exit;
pub mod logging;
pub mod output;
