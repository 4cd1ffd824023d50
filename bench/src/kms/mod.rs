//! `kms-loadgen`: load generator for the KMS v2 plugin.
//!
//! Flow ([`run`]): start the plugin in a temp dir (or attach to a running one),
//! open one gRPC channel, seal the ciphertexts Decrypt needs, run one cell per
//! (method × callers), run the restart burst, stop the plugin, and hand back a
//! [`Report`] that renders as Markdown.

mod config;
mod cpu;
mod load;
mod machine;
mod plugin;
mod report;
mod run;
mod targets;

pub use config::{Args, Config, ConfigError, PluginSource};
pub use cpu::{CpuError, CpuMeters, CpuSpent, ProcessCpu};
pub use kms_client::{ConnectError, Endpoint, EndpointError};
pub use load::{CellResult, Method};
pub use machine::Machine;
pub use plugin::{PluginError, SpawnedPlugin};
pub use report::{BurstResult, Report};
pub use run::{BenchError, run};
pub use targets::Verdict;
