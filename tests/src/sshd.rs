//! Kit for "hosts over SSH": real OpenSSH `sshd` processes on loopback
//! ports, each in a mount namespace of its own where a per-host temporary
//! directory is bind-mounted on `/etc/kubernetes/enc` and another on
//! `/etc/kubernetes/kms`. Over SSH each host sees its own files at the same
//! paths, as separate machines would; the stand-ins and plugins run outside
//! and read the same per-host directories at their real paths.
//!
//! Keys are made by the kit with `ssh-keygen` in the test's temporary
//! directory: one client key (its `authorized_keys` is the only one any of
//! these sshds accepts), a host key per sshd and a `known_hosts` naming each
//! `[127.0.0.1]:PORT`. The sshd config: `PermitRootLogin prohibit-password`,
//! `UsePAM no`, `StrictModes no`, `PidFile none`, keys only.
//!
//! Each host's namespace is held by a `sleep` process; sshd is started in it
//! with `nsenter`, so it can be stopped (every process of the namespace but
//! the holder is killed: the listener, its connections and their sessions)
//! and started again on the same port with the same mounts, with the same or
//! a new host key. Everything is killed on drop.
//!
//! `sshd` and `ssh-keygen` must be installed (`scripts/setup.sh` installs
//! `openssh-server` and `openssh-client`); the kit panics saying so when they
//! are missing, never skips. Needs root (mounts).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the remote hosts' EncryptionConfiguration lives (on every "machine").
pub const REMOTE_ENC_DIR: &str = "/etc/kubernetes/enc";
/// Where the remote hosts' keyrings live.
pub const REMOTE_KMS_DIR: &str = "/etc/kubernetes/kms";

const SSHD: &str = "/usr/sbin/sshd";

fn require_openssh() {
    assert!(
        Path::new(SSHD).is_file(),
        "{SSHD} is missing: install openssh-server (scripts/setup.sh does) — these tests never skip"
    );
    for tool in ["ssh", "ssh-keygen"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(
            ok,
            "`{tool}` is missing: install openssh-client (scripts/setup.sh does)"
        );
    }
}

fn keygen(path: &Path) {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "atrest-test", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen: {out:?}");
}

/// The public half of a key made by [`keygen`]: `TYPE BASE64`.
fn public_key(path: &Path) -> String {
    let text = fs::read_to_string(format!("{}.pub", path.display())).unwrap();
    let mut parts = text.split_whitespace();
    format!("{} {}", parts.next().unwrap(), parts.next().unwrap())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The client side: one key, one `known_hosts`, one `authorized_keys` for
/// every sshd started from it.
#[derive(Debug)]
pub struct SshClient {
    /// The client's private key (`identityFile:`).
    pub identity: PathBuf,
    /// The known_hosts file (`knownHostsFile:`).
    pub known_hosts: PathBuf,
    authorized_keys: PathBuf,
    dir: tempfile::TempDir,
}

impl SshClient {
    /// Makes the client key; `known_hosts` starts empty.
    pub fn new() -> Self {
        require_openssh();
        let dir = tempfile::tempdir().unwrap();
        let identity = dir.path().join("id_ed25519");
        keygen(&identity);
        let authorized_keys = dir.path().join("authorized_keys");
        fs::write(&authorized_keys, format!("{}\n", public_key(&identity))).unwrap();
        let known_hosts = dir.path().join("known_hosts");
        fs::write(&known_hosts, "").unwrap();
        SshClient {
            identity,
            known_hosts,
            authorized_keys,
            dir,
        }
    }

    /// Starts an sshd whose namespace shows `enc` at [`REMOTE_ENC_DIR`] and
    /// `kms` at [`REMOTE_KMS_DIR`], and adds its host key to `known_hosts`.
    pub fn start(&self, name: &str, enc: &Path, kms: &Path) -> Sshd {
        let dir = self.dir.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        let host_key = dir.join("host_ed25519");
        keygen(&host_key);
        let port = free_port();
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\n\
                 PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n\
                 AuthorizedKeysFile {}\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nMaxSessions 50\nLogLevel INFO\n",
                host_key.display(),
                self.authorized_keys.display()
            ),
        )
        .unwrap();
        for d in [REMOTE_ENC_DIR, REMOTE_KMS_DIR, "/run/sshd"] {
            // Mount points and sshd's privilege separation directory; empty
            // in the test's own namespace.
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {d}: {e} (run as root)"));
        }
        fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755)).unwrap();
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind \"$1\" {REMOTE_ENC_DIR} && mount --bind \"$2\" {REMOTE_KMS_DIR} && exec sleep infinity"
            ))
            .arg("sh")
            .arg(enc)
            .arg(kms)
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) is needed");
        let mut sshd = Sshd {
            name: name.to_owned(),
            port,
            enc: enc.to_owned(),
            kms: kms.to_owned(),
            config,
            host_key,
            log: dir.join("sshd.log"),
            holder,
            sshd: None,
        };
        sshd.wait_for_namespace();
        sshd.start();
        self.trust(&sshd);
        sshd
    }

    /// Adds (or replaces) `sshd`'s current host key in `known_hosts`.
    pub fn trust(&self, sshd: &Sshd) {
        let entry = format!("[127.0.0.1]:{}", sshd.port);
        let mut lines: Vec<String> = fs::read_to_string(&self.known_hosts)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with(&format!("{entry} ")))
            .map(str::to_owned)
            .collect();
        lines.push(format!("{entry} {}", public_key(&sshd.host_key)));
        fs::write(&self.known_hosts, lines.join("\n") + "\n").unwrap();
    }

    /// The `ssh:` block of the rotator config for `sshd` (`kmsPlugin` given).
    pub fn yaml(&self, sshd: &Sshd, kms_plugin: &Path) -> String {
        format!(
            "{{host: 127.0.0.1, port: {}, user: root, identityFile: {}, knownHostsFile: {}, kmsPlugin: {}}}",
            sshd.port,
            self.identity.display(),
            self.known_hosts.display(),
            kms_plugin.display()
        )
    }

    /// Runs `sh -c SCRIPT` on `sshd` over ssh (for tests to look at a host
    /// from inside).
    pub fn run(&self, sshd: &Sshd, script: &str) -> Output {
        let quoted = format!("'{}'", script.replace('\'', "'\\''"));
        Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .arg("-i")
            .arg(&self.identity)
            .args(["-p", &sshd.port.to_string(), "-l", "root", "127.0.0.1"])
            .arg(format!("sh -c {quoted}"))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Default for SshClient {
    fn default() -> Self {
        Self::new()
    }
}

/// One sshd in its own mount namespace (killed on drop).
#[derive(Debug)]
pub struct Sshd {
    /// Name (for messages).
    pub name: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The directory seen at [`REMOTE_ENC_DIR`] inside.
    pub enc: PathBuf,
    /// The directory seen at [`REMOTE_KMS_DIR`] inside.
    pub kms: PathBuf,
    config: PathBuf,
    host_key: PathBuf,
    log: PathBuf,
    holder: Child,
    sshd: Option<Child>,
}

fn mnt_ns(pid: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()
}

impl Sshd {
    fn wait_for_namespace(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let own = mnt_ns(std::process::id());
        loop {
            let pid = self.holder.id();
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" && mnt_ns(pid) != own {
                return;
            }
            if let Some(status) = self.holder.try_wait().unwrap() {
                panic!(
                    "{}: the namespace holder ended ({status}): mount --bind failed (root needed)",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no namespace after 30 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts sshd in the host's namespace and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.sshd.is_none(), "{}: sshd runs already", self.name);
        let log = fs::File::create(&self.log).unwrap();
        let mut child = Command::new("nsenter")
            .arg("--target")
            .arg(self.holder.id().to_string())
            .args(["--mount", "--", SSHD, "-D", "-e", "-f"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nsenter (util-linux) is needed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{}: sshd ended ({status}): {}",
                    self.name,
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: sshd does not listen after 30 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.sshd = Some(child);
    }

    /// Stops sshd: kills every process in the host's namespace but its
    /// holder (the listener, every connection and session), so the host is
    /// unreachable until [`start`](Self::start).
    pub fn stop(&mut self) {
        let holder = self.holder.id();
        if let Some(ns) = mnt_ns(holder) {
            // Repeat: a dying connection process may have forked.
            for _ in 0..5 {
                let mut killed = 0;
                for entry in fs::read_dir("/proc").unwrap().flatten() {
                    let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                        continue;
                    };
                    if pid != holder && mnt_ns(pid).as_ref() == Some(&ns) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        killed += 1;
                    }
                }
                if let Some(mut c) = self.sshd.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                if killed == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new host key (takes effect at the next [`start`](Self::start); the
    /// client's `known_hosts` keeps the old one unless [`SshClient::trust`]).
    pub fn new_host_key(&self) {
        keygen(&self.host_key);
    }

    /// What sshd logged.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
