//! # rotator
//!
//! Plans and applies encryption-at-rest changes across every control-plane
//! host of a self-managed Kubernetes cluster, without ever leaving a stored
//! value that some apiserver cannot read: enable encryption, rotate a local
//! key, rotate the kms-plugin's KEK, switch local → KMS, switch KMS → KMS,
//! disable.
//!
//! ## Where to start
//!
//! | task | module |
//! |---|---|
//! | the rotator's own config (hosts, apiservers, etcd) | [`targets`] |
//! | operations → stages (pure, the safe order of the spec) | [`plan`] |
//! | `rotator plan` output (secrets redacted) | [`render`] |
//! | the resumable state file (holds keys: mode 0600) | [`state`] |
//! | running the stages, resuming after a kill | [`apply`] |
//! | `rotator status` | [`status`] |
//! | atomic 0600 writes with a `.prev` (the `atomic-file` crate) | [`fsio`] |
//! | proof that every apiserver runs a stage (metrics, readiness) | [`metrics`], [`apiserver`], [`proof`] |
//! | rewrite of every object through the API | [`rewrite`] |
//! | the etcd audit gate before a removal (etcd-inspect's library) | [`gate`] |
//! | the kms-plugin keyring CLI | [`keyring`] |
//! | files and commands on a host, local or over SSH | [`hostfs`] |
//! | `rotator check`, the interlocks of `apply` (drift, not-migrated values, KMS round trip, config watch) | [`check`] |
//! | flags, exit codes | [`cli`] |
//!
//! Keys are generated here ([`keygen`]), never typed on a command line, and
//! live only in zeroizing types with redacted `Debug` ([`secret`]).

#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod apiserver;
pub mod apply;
pub mod check;
pub mod cli;
pub mod fsio;
pub mod gate;
pub mod hostfs;
pub mod keygen;
pub mod keyring;
pub mod metrics;
pub mod plan;
pub mod proof;
pub mod render;
pub mod rewrite;
pub mod secret;
pub mod state;
pub mod status;
pub mod targets;
