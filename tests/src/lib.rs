//! Test kit for atrest's workspace-level end-to-end tests: finds the real
//! binaries, starts real processes (the kms-plugin, an etcd server, the
//! kube-apiserver stand-in) on loopback / unix sockets in temporary
//! directories, and stops them after. Nothing here is a mock of an atrest
//! component.
//!
//! | module | for |
//! |---|---|
//! | [`etcd`] | a real etcd (plain or TLS), raw puts, running `etcd-inspect` |
//! | [`plugin`] | the real `kms-plugin` process, its gRPC client, keyring CLI, the one HTTP client and metrics parser |
//! | [`standin`] | the `kube-apiserver-standin` process |
//! | [`cluster`] | the rotator's hosts over one etcd: stand-ins, plugins, rotator runs, audits |
//! | [`softhsm`] | a SoftHSM2 token of the test's own (directory, config, PIN file), `pkcs11-tool` |
//! | [`sshd`] | real OpenSSH sshds, each in its own mount namespace: "hosts" reached over SSH |
//! | [`broken_kms`] | a broken third-party KMS v2 plugin (Decrypt fails, wrong bytes, other key_id): a fixture, not a mock of ours |
//! | [`inspect`] | etcd-inspect test data: keys, values written as kube-apiserver writes them |

pub mod broken_kms;
pub mod cluster;
pub mod etcd;
pub mod inspect;
pub mod plugin;
pub mod softhsm;
pub mod sshd;
pub mod standin;
