//! Benchmark drivers for atrest's real binaries. They print tables; they never
//! assert on timings (performance is judged by people reading the numbers).
//!
//! - [`kms`]: `kms-loadgen`, which drives a real `kms-plugin` process over its
//!   unix socket the way kube-apiserver does (one HTTP/2 connection, many
//!   concurrent callers) and reports latency percentiles and the plugin's CPU
//!   time per call. Start reading at [`kms::run`].
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod kms;
