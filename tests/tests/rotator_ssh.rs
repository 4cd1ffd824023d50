//! The rotator reaching control-plane hosts over SSH: real OpenSSH sshds on
//! loopback ports, each in its own mount namespace where the host's own
//! folders are `/etc/kubernetes/enc` and `/etc/kubernetes/kms`
//! (`atrest_tests::sshd`), real kube-apiserver stand-ins and kms-plugins
//! reading those folders, one real etcd, the real `rotator` binary.
//!
//! - `rotate-key` and `rotate-kek` across three remote hosts, audited clean;
//! - one local host and two remote ones;
//! - an sshd stopped mid-run (during the wait after `keyring add`): the
//!   promote stage stops with exit 6 naming the host before changing
//!   anything, every apiserver still reads every value (also one written
//!   meanwhile), and `resume` finishes once it is back;
//! - a changed host key: refused (exit 6), nothing written; trusted again,
//!   the run goes through;
//! - the remote replace of `rotator::hostfs` through a real sshd: 0600,
//!   owner kept, `.prev` kept, no-op on identical content, temporary files
//!   gone after a failure, the read-back hash checked, unreachable named.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use atrest_tests::cluster::{Cluster, Options, mode, text};
use atrest_tests::plugin::Keyring;
use atrest_tests::sshd::{REMOTE_ENC_DIR, SshClient, Sshd};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, PostParams};
use rotator::hostfs::{HostError, HostFs};
use rotator::targets::{ApiserverAccess, Host, ProofMode, SshTarget};

const PROVIDER: &str = "atrest";

fn kms_options(hosts: usize) -> Options {
    let mut opts = Options::new(hosts);
    opts.kms = vec!["a"];
    opts.config = format!(
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms:\n          apiVersion: v2\n          name: {PROVIDER}\n          endpoint: unix://{{KMS_DIR}}/a.sock\n          timeout: 3s\n      - identity: {{}}\n"
    );
    opts
}

fn remote(mut opts: Options, which: &[usize]) -> Options {
    for &i in which {
        opts.hosts[i].ssh = true;
    }
    opts
}

/// No temporary file of a remote write is left in `dir`.
fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.'),
            "left behind in {}: {name}",
            dir.display()
        );
    }
}

/// Every Secret through every stand-in: each apiserver reads every value.
async fn every_apiserver_reads_every_secret(c: &Cluster, want: usize) {
    for (i, h) in c.hosts.iter().enumerate() {
        let api: Api<Secret> = Api::namespaced(c.client(i), "default");
        let list = api
            .list(&ListParams::default())
            .await
            .unwrap_or_else(|e| panic!("{} cannot list Secrets: {e}", h.name));
        assert_eq!(list.items.len(), want, "{}", h.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_key_across_three_hosts_over_ssh() {
    let mut c = Cluster::start(remote(Options::new(3), &[0, 1, 2])).await;
    let cfg = std::fs::read_to_string(&c.rotator_config).unwrap();
    assert_eq!(cfg.matches("ssh: {host: 127.0.0.1").count(), 3, "{cfg}");
    assert!(!cfg.contains(c.dir.path().join("cp1/etc-enc").to_str().unwrap()));
    c.seed(60, 20).await;
    c.apply_ok(&[], &["rotate-key"]).await;
    c.assert_rotated().await;
    for h in &c.hosts {
        no_temp_files(h.config.parent().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_local_and_remote_hosts() {
    let mut c = Cluster::start(remote(Options::new(3), &[1, 2])).await;
    let cfg = std::fs::read_to_string(&c.rotator_config).unwrap();
    assert_eq!(cfg.matches("ssh: {").count(), 2, "{cfg}");
    c.seed(40, 10).await;
    c.apply_ok(&[], &["rotate-key"]).await;
    c.assert_rotated().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_kek_across_three_hosts_over_ssh() {
    let mut opts = remote(kms_options(3), &[0, 1, 2]);
    opts.run_flags
        .extend(["--plugin-settle".to_owned(), "2s".to_owned()]);
    let mut c = Cluster::start(opts).await;
    let old = Keyring::at(&c.hosts[0].keyring).list().await.unwrap();
    let old_key_id = old.primary_kek().unwrap().key_id.clone().unwrap();
    c.seed(40, 0).await;
    c.apply_ok(&[], &["rotate-kek"]).await;
    c.keyring_bytes();
    let now = Keyring::at(&c.hosts[2].keyring).list().await.unwrap();
    assert!(now.keks.iter().all(|k| k.kek != old.primary));
    let new_key_id = now.primary_kek().unwrap().key_id.clone().unwrap();
    assert_ne!(new_key_id, old_key_id);
    for h in &c.hosts {
        assert_eq!(mode(&h.keyring), 0o600);
        assert_eq!(
            h.plugins[0].status().await.unwrap().key_id,
            new_key_id,
            "{}'s plugin serves the new KEK",
            h.name
        );
        no_temp_files(h.keyring.parent().unwrap());
    }
    c.audit("kms-v2", Some(PROVIDER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_lost_mid_run_stops_the_stage_and_resume_finishes() {
    let mut opts = remote(kms_options(3), &[0, 1, 2]);
    // The stop happens while the rotator waits after the first stage.
    opts.run_flags
        .extend(["--plugin-settle".to_owned(), "5s".to_owned()]);
    let mut c = Cluster::start(opts).await;
    c.seed(30, 0).await;

    let mut child = c.spawn_apply(&[], &["rotate-kek"]);
    c.wait_for_state(&mut child, "stage 1 (keyring add) applied", |v| {
        v["stage"] == 0 && v["step"]["step"] == "applied"
    })
    .await;
    let added = std::fs::read(&c.hosts[0].keyring).unwrap();
    // cp2 goes away: stage 2 (promote) finds it gone before changing anything.
    c.hosts[2].sshd.as_mut().unwrap().stop();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host cp2 cannot be reached") && err.contains("rotator resume"),
        "{err}"
    );
    let state = c.state_json().unwrap();
    assert_eq!(state["stage"], 1, "{state}");
    // Every copy is still the add stage's keyring.
    assert_eq!(c.keyring_bytes(), added);
    for h in &c.hosts {
        no_temp_files(h.keyring.parent().unwrap());
    }
    // Every apiserver reads every value, also one written now.
    let api: Api<Secret> = Api::namespaced(c.client(0), "default");
    let obj = atrest_tests::standin::secret_object("meanwhile", "k", b"v");
    api.create(&PostParams::default(), &obj).await.unwrap();
    c.secrets += 1;
    every_apiserver_reads_every_secret(&c, 31).await;
    c.audit_readable();
    // Still away: resume stops the same way.
    let out = c.resume(&[]).await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));

    // Back: resume finishes the run.
    c.hosts[2].sshd.as_mut().unwrap().start();
    let out = c.resume(&[]).await;
    assert!(out.status.success(), "{}", text(&out));
    c.keyring_bytes();
    assert!(c.finished());
    every_apiserver_reads_every_secret(&c, 31).await;
    c.audit("kms-v2", Some(PROVIDER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_is_refused_and_nothing_is_written() {
    let mut c = Cluster::start(remote(Options::new(2), &[0, 1])).await;
    c.seed(10, 0).await;
    let before: Vec<Vec<u8>> = c
        .hosts
        .iter()
        .map(|h| std::fs::read(&h.config).unwrap())
        .collect();
    {
        let d = c.hosts[1].sshd.as_mut().unwrap();
        d.stop();
        d.new_host_key();
        d.start();
    }
    let out = c.apply(&[], &["rotate-key"]).await;
    assert_eq!(out.status.code(), Some(6), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("host key for cp1 changed: refused"), "{err}");
    assert!(!c.state.exists(), "a refused run wrote its state file");
    for (h, b) in c.hosts.iter().zip(&before) {
        assert_eq!(&std::fs::read(&h.config).unwrap(), b, "{} changed", h.name);
        assert!(!h.config.with_extension("yaml.prev").exists());
    }
    // Once the operator trusts the new key, the run goes through.
    c.ssh
        .as_ref()
        .unwrap()
        .trust(c.hosts[1].sshd.as_ref().unwrap());
    c.apply_ok(&[], &["rotate-key"]).await;
    c.assert_rotated().await;
}

/// One remote "machine" for the HostFs tests.
struct Machine {
    client: SshClient,
    sshd: Sshd,
    enc: tempfile::TempDir,
    _kms: tempfile::TempDir,
    host: Host,
}

fn machine() -> Machine {
    let client = SshClient::new();
    let (enc, kms) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sshd = client.start("m", enc.path(), kms.path());
    let host = Host {
        name: "m1".into(),
        encryption_config: PathBuf::from(REMOTE_ENC_DIR).join("enc.yaml"),
        keyring: None,
        apiserver: ApiserverAccess::Kubeconfig {
            path: "/nonexistent".into(),
            context: None,
        },
        proof: ProofMode::Auto,
        ssh: Some(SshTarget {
            host: "127.0.0.1".into(),
            port: Some(sshd.port),
            user: Some("root".into()),
            identity_file: Some(client.identity.clone()),
            known_hosts_file: Some(client.known_hosts.clone()),
            kms_plugin: Some(atrest_tests::plugin::bin_path("kms-plugin")),
        }),
    };
    Machine {
        client,
        sshd,
        enc,
        _kms: kms,
        host,
    }
}

#[test]
fn remote_replace_is_atomic_0600_keeps_owner_and_prev() {
    let m = machine();
    let fs = HostFs::new("kms-plugin".into());
    let remote = m.host.encryption_config.clone();
    let local = m.enc.path().join("enc.yaml");
    assert!(fs.read(&m.host, &remote).unwrap().is_none());

    use rotator::fsio::Written;
    assert_eq!(
        fs.replace(&m.host, &remote, b"one").unwrap(),
        Written::Created
    );
    assert_eq!(std::fs::read(&local).unwrap(), b"one");
    assert_eq!(mode(&local), 0o600);
    assert_eq!(
        fs.read(&m.host, &remote).unwrap().unwrap().as_slice(),
        b"one"
    );

    // A file of another owner, group-readable: the owner stays, the mode becomes 0600.
    std::os::unix::fs::chown(&local, Some(1234), Some(2345)).unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        fs.replace(&m.host, &remote, b"two").unwrap(),
        Written::Replaced
    );
    let prev = m.enc.path().join("enc.yaml.prev");
    for f in [&local, &prev] {
        let md = std::fs::metadata(f).unwrap();
        assert_eq!((md.uid(), md.gid()), (1234, 2345), "{}", f.display());
        assert_eq!(md.permissions().mode() & 0o777, 0o600, "{}", f.display());
    }
    assert_eq!(std::fs::read(&local).unwrap(), b"two");
    assert_eq!(std::fs::read(&prev).unwrap(), b"one");

    // The same content again: nothing written, the backup keeps the older file.
    assert_eq!(
        fs.replace(&m.host, &remote, b"two").unwrap(),
        Written::Unchanged
    );
    assert_eq!(std::fs::read(&prev).unwrap(), b"one");
    // Binary content and a path with a space and a quote go through unharmed.
    let odd = PathBuf::from(REMOTE_ENC_DIR).join("it's a file");
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    assert_eq!(fs.replace(&m.host, &odd, &bytes).unwrap(), Written::Created);
    assert_eq!(
        std::fs::read(m.enc.path().join("it's a file")).unwrap(),
        bytes
    );
    no_temp_files(m.enc.path());

    // The read-back check: a hash that is not the file's is an error naming host and file.
    let e = fs.verify(&m.host, &remote, &"0".repeat(64)).unwrap_err();
    assert!(matches!(e, HostError::HashMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains("m1") && e.to_string().contains("enc.yaml"),
        "{e}"
    );
}

#[test]
fn a_failed_remote_replace_leaves_no_temp_file_and_the_file_as_it_was() {
    let m = machine();
    let fs = HostFs::new("kms-plugin".into());
    let remote = m.host.encryption_config.clone();
    let local = m.enc.path().join("enc.yaml");
    fs.replace(&m.host, &remote, b"one").unwrap();
    // The backup cannot be written (a directory is in its way).
    std::fs::create_dir(m.enc.path().join("enc.yaml.prev")).unwrap();
    std::fs::write(m.enc.path().join("enc.yaml.prev/x"), "x").unwrap();
    let e = fs.replace(&m.host, &remote, b"secret-two").unwrap_err();
    assert!(matches!(e, HostError::Remote { .. }), "{e}");
    let shown = e.to_string();
    assert!(
        shown.contains("m1") && shown.contains("enc.yaml"),
        "{shown}"
    );
    assert!(!shown.contains("secret-two"), "{shown}");
    assert_eq!(std::fs::read(&local).unwrap(), b"one");
    no_temp_files(m.enc.path());
    // The target itself is a directory: refused, nothing left.
    std::fs::create_dir(m.enc.path().join("d")).unwrap();
    let e = fs
        .replace(&m.host, &PathBuf::from(REMOTE_ENC_DIR).join("d"), b"x")
        .unwrap_err();
    assert!(matches!(e, HostError::Remote { .. }), "{e}");
    no_temp_files(m.enc.path());
    // A folder that does not exist on the host.
    let e = fs
        .replace(&m.host, Path::new("/nonexistent-dir/enc.yaml"), b"x")
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent-dir/enc.yaml"), "{e}");
}

#[test]
fn the_plugin_runs_on_the_host_and_an_unreachable_host_is_named() {
    let mut m = machine();
    let fs = HostFs::new("kms-plugin".into());
    let out = fs.kms_plugin(&m.host, ["--version"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("kms-plugin"));
    // The session really is in the host's namespace.
    let seen = m.client.run(&m.sshd, &format!("ls {REMOTE_ENC_DIR}"));
    assert!(seen.status.success(), "{seen:?}");
    m.sshd.stop();
    let e = fs.read(&m.host, &m.host.encryption_config).unwrap_err();
    assert!(matches!(e, HostError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("host m1 cannot be reached"), "{e}");
    m.sshd.start();
    // Back: the next call connects again.
    assert!(
        fs.read(&m.host, &m.host.encryption_config)
            .unwrap()
            .is_none()
    );
}
