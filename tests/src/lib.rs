//! Test kit for atrest's workspace-level end-to-end tests: finds the real
//! binaries, starts real processes (the kms-plugin, an etcd server) on
//! loopback / unix sockets in temporary directories, and stops them after.
//! Nothing here is a mock of an atrest component.

pub mod cluster;
pub mod etcd;
pub mod inspect;
pub mod plugin;
pub mod standin;
