//! Benchmark drivers for atrest's real binaries. They print tables; they never
//! assert on timings (performance is judged by people reading the numbers).
//!
//! - [`kms`]: `kms-loadgen`, which drives a real `kms-plugin` process over its
//!   unix socket the way kube-apiserver does (one HTTP/2 connection, many
//!   concurrent callers) and reports latency percentiles and the plugin's CPU
//!   time per call. Start reading at [`kms::run`].
//! - [`inspect`]: `etcd-inspect-bench`, which seeds an etcd 3.4 with
//!   kube-shaped data and compares `etcd-inspect` with `etcdctl` on it.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod inspect;
pub mod kms;
