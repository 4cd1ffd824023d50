//! Files and commands on a control-plane host: the one place the rotator
//! reads or replaces a host's EncryptionConfiguration or keyring, and runs
//! the kms-plugin CLI there.
//!
//! A host without an `ssh:` block in the rotator config is local: its paths
//! are read with `std::fs`, written with [`crate::fsio::replace`] (the
//! `atomic-file` crate) and the plugin is the configured binary. A host with
//! one is reached with the system OpenSSH client.
//!
//! # Why the system `ssh`
//!
//! It uses what the operator already has: keys and agent, `known_hosts`,
//! `~/.ssh/config` (ProxyJump, bastions, certificates), and it is the SSH
//! implementation their security team already trusts and patches. The
//! workspace carries no SSH crate. Every call runs
//! `ssh -o BatchMode=yes -o StrictHostKeyChecking=yes` (never `accept-new`:
//! an unknown or changed host key is refused, see [`HostError::HostKeyChanged`]),
//! with `UserKnownHostsFile` / `IdentityFile` / port / user from the `ssh:`
//! block and a `ConnectTimeout`. One master connection per host per run
//! (`ControlMaster`, its socket in a private 0700 temporary directory,
//! `ControlPersist` so it outlives a killed rotator by [`MASTER_IDLE_SECS`]
//! at most) carries every command; it is closed when the [`HostFs`] is
//! dropped. A master that ended (idle, or the host went away) is started
//! again on the next call, which fails as [`HostError::Unreachable`] while
//! the host is away.
//!
//! # What runs on a remote host
//!
//! Only fixed POSIX `sh` scripts of this module (paths as properly quoted
//! arguments, never spliced into the script) and the kms-plugin binary
//! (`ssh.kmsPlugin`, else `kms-plugin` from the remote `PATH`):
//!
//! - read: `cat` of the path (absent → `None`);
//! - replace ([`REPLACE_SCRIPT`]): the content comes on ssh's **stdin**, never
//!   in argv; `umask 077`, `mktemp` in the same directory, `cat >` it,
//!   compare with the file (same content → nothing written), `chown
//!   --reference` to the existing file's owner, `chmod 600`, `sync` it, keep
//!   the old content as `<name>.prev` (0600, same owner, written the same
//!   atomic way), `mv -f -T` over the file, `sync` the directory; any failure
//!   removes the temporary files, so a host never has a partial file. Then
//!   `sha256sum` of the path is read back and compared with the local hash
//!   of what was sent ([`HostError::HashMismatch`] names host and file).
//!
//! Nothing secret is ever in argv or an error message: paths and hashes
//! only; a remote's stderr is shown escaped (our scripts and the plugin never
//! print content).
//!
//! # A host that stops answering mid-stage
//!
//! Every stage first reads every host's file: a config stage its drift
//! check, a keyring stage a pre-flight read of every keyring copy. A host
//! that is already away therefore stops the stage before anything changed
//! (exit 6, [`crate::cli::Exit::Unreachable`]), and `resume` repeats the stage
//! once it is back.
//!
//! A host lost during the writes themselves (the moments between that read
//! and its own write) leaves the hosts before it with this stage's file and
//! the rest with the previous stage's. The failed stage stays `applying` in
//! the state file; `resume` repeats it (identical content is a no-op).
//! Whether every apiserver can read everything meanwhile depends on the step:
//!
//! - config stages: yes. Consecutive files differ by one step, each proven on
//!   every host before the next: a new key or provider is added as a reader
//!   (nobody writes with it yet), then made the writer (every host reads it
//!   already), and removed only after the rewrite and the etcd gate (no value
//!   needs it);
//! - `keyring add` (a decrypt-only KEK nobody uses) and `retire` (gated like
//!   a removal): yes;
//! - `keyring promote`: yes. A plugin serving the add stage's keyring copy
//!   already answers to the key_id its decrypt-only KEK gets at the next
//!   promotion (every copy of one file derives the same one), so it decrypts
//!   what its promoted peers write while the copy is on its way; `resume`
//!   then copies the promoted keyring there.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::fsio::{self, Written};
use crate::targets::{Host, SshTarget};

/// Seconds a master connection stays after its last use (`ControlPersist`).
pub const MASTER_IDLE_SECS: u64 = 30;

/// Seconds `ssh` waits for a connection (`ConnectTimeout`).
pub const CONNECT_TIMEOUT_SECS: u64 = 10;

/// The script that replaces a file on a remote host; `$1` is the path, the
/// content comes on stdin. Prints `created`, `replaced` or `unchanged`.
pub const REPLACE_SCRIPT: &str = r#"set -u
p=$1
if [ -L "$p" ]; then p=$(readlink -f -- "$p") || exit 1; fi
d=$(dirname -- "$p"); b=$(basename -- "$p")
umask 077
t=''; q=''
trap 'rm -f -- "$t" "$q"' EXIT
trap 'exit 1' HUP INT TERM PIPE
t=$(mktemp -- "$d/.$b.XXXXXX") || exit 1
cat > "$t" || exit 1
if [ -f "$p" ] && [ "$(sha256sum < "$t")" = "$(sha256sum < "$p")" ]; then echo unchanged; exit 0; fi
if [ -e "$p" ]; then
  chown --reference="$p" -- "$t" || exit 1
  q=$(mktemp -- "$d/.$b.prev.XXXXXX") || exit 1
  cat -- "$p" > "$q" || exit 1
  chown --reference="$p" -- "$q" || exit 1
  chmod 600 -- "$q" || exit 1
  sync -- "$q" || exit 1
  mv -f -T -- "$q" "$p.prev" || exit 1
  r=replaced
else
  r=created
fi
chmod 600 -- "$t" || exit 1
sync -- "$t" || exit 1
mv -f -T -- "$t" "$p" || exit 1
sync -- "$d" || exit 1
echo "$r"
"#;

/// Reads a file on a remote host; exit 44 = absent.
const READ_SCRIPT: &str = r#"[ -e "$1" ] || exit 44
exec cat -- "$1""#;

/// The read script's exit code for an absent file.
const ABSENT: i32 = 44;

/// Prints the sha256 of a file on a remote host.
const HASH_SCRIPT: &str = r#"exec sha256sum -- "$1""#;

/// A file or command on a host failed. Names the host and the file, never
/// what is in it.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The host did not answer (ssh exit 255: connection refused, timeout,
    /// authentication failed, connection lost).
    #[error(
        "host {host} cannot be reached over ssh ({detail}); nothing more was changed: run `rotator resume` when it is back"
    )]
    Unreachable {
        /// Host name of the rotator config.
        host: String,
        /// ssh's last words (escaped).
        detail: String,
    },
    /// The host's SSH key is not the one in known_hosts.
    #[error(
        "host key for {host} changed: refused (ssh: {detail}); find out why, then fix its known_hosts entry"
    )]
    HostKeyChanged {
        /// Host name.
        host: String,
        /// ssh's message (escaped).
        detail: String,
    },
    /// A local file could not be read.
    #[error("cannot read {path} (host {host}): {source}")]
    Read {
        /// Host name.
        host: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A local file could not be written.
    #[error("host {host}: {source}")]
    Write {
        /// Host name.
        host: String,
        /// Why (names the file).
        #[source]
        source: fsio::WriteError,
    },
    /// A remote read, write or hash failed.
    #[error("{what} {path} on host {host} failed ({status}): {stderr}")]
    Remote {
        /// Host name.
        host: String,
        /// The file.
        path: PathBuf,
        /// `reading`, `replacing`, `hashing`.
        what: &'static str,
        /// Exit status.
        status: String,
        /// The remote's stderr (escaped; our scripts never print content).
        stderr: String,
    },
    /// The file read back after a remote write is not what was sent.
    #[error(
        "{path} on host {host}: the file read back has sha256 {found}, but what was written has {expected}"
    )]
    HashMismatch {
        /// Host name.
        host: String,
        /// The file.
        path: PathBuf,
        /// sha256 (hex) of what was sent.
        expected: String,
        /// What the host reports.
        found: String,
    },
    /// `ssh` could not be started.
    #[error("cannot run {program}: {source} (install openssh-client)")]
    Ssh {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The local kms-plugin binary could not be started.
    #[error("cannot run {bin}: {source} (set kmsPlugin in the rotator config or --kms-plugin)")]
    PluginSpawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The private directory for the control sockets could not be made.
    #[error("cannot make a private directory for ssh control sockets: {0}")]
    ControlDir(#[source] std::io::Error),
}

impl HostError {
    /// A host that could not be reached, or whose host key changed: exit 6.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::HostKeyChanged { .. })
    }
}

/// Files and commands on every host of one run. Holds the SSH master
/// connections; dropping it closes them.
#[derive(Debug)]
pub struct HostFs {
    local_plugin: PathBuf,
    /// Private (0700) directory of the control sockets, made on first use.
    dir: Mutex<Option<tempfile::TempDir>>,
    /// Host name → its master's control socket.
    masters: Mutex<BTreeMap<String, PathBuf>>,
}

/// The kms-plugin binary on this machine: the configured one, else
/// `kms-plugin` beside this executable, else `kms-plugin` from `PATH`.
pub fn locate_plugin(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_owned();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("kms-plugin")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("kms-plugin"))
}

/// `text` in single quotes for a POSIX shell (`'` becomes `'\''`).
fn sh_quote(text: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(text.len() + 2);
    out.push(b'\'');
    for &b in text.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    std::os::unix::ffi::OsStringExt::from_vec(out)
}

/// The remote command line `sh -c SCRIPT sh ARGS...`, every part quoted.
fn sh_command(script: &str, args: &[&OsStr]) -> OsString {
    let mut line = OsString::from("sh -c ");
    line.push(sh_quote(OsStr::new(script)));
    line.push(" sh");
    for a in args {
        line.push(" ");
        line.push(sh_quote(a));
    }
    line
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The last non-empty lines of ssh's stderr, escaped, for a message.
fn last_words(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '@'))
        .collect();
    let tail = lines[lines.len().saturating_sub(2)..].join("; ");
    let tail: String = tail.chars().take(400).collect();
    cli_kit::escape::escape_control(&tail).into_owned()
}

/// A failed ssh call (exit 255) as the error it is.
fn transport_error(host: &Host, stderr: &[u8]) -> HostError {
    let text = String::from_utf8_lossy(stderr);
    let detail = last_words(stderr);
    if text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || text.contains("Host key verification failed")
    {
        HostError::HostKeyChanged {
            host: host.name.clone(),
            detail,
        }
    } else {
        HostError::Unreachable {
            host: host.name.clone(),
            detail,
        }
    }
}

fn status_text(out: &Output) -> String {
    out.status.to_string()
}

impl HostFs {
    /// Files and commands of one run; `local_plugin` is the kms-plugin binary
    /// for local hosts (see [`locate_plugin`]).
    pub fn new(local_plugin: PathBuf) -> Self {
        Self {
            local_plugin,
            dir: Mutex::new(None),
            masters: Mutex::new(BTreeMap::new()),
        }
    }

    /// The kms-plugin binary used for local hosts.
    pub fn local_plugin(&self) -> &Path {
        &self.local_plugin
    }

    /// The kms-plugin a host runs, for messages (`kms-plugin on cp2` for a remote).
    pub fn plugin_name(&self, host: &Host) -> String {
        match &host.ssh {
            None => self.local_plugin.display().to_string(),
            Some(s) => format!(
                "{} on host {}",
                s.kms_plugin
                    .as_deref()
                    .unwrap_or(Path::new("kms-plugin"))
                    .display(),
                host.name
            ),
        }
    }

    /// The content of `path` on `host`, `None` when it does not exist.
    pub fn read(&self, host: &Host, path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, HostError> {
        let Some(ssh) = &host.ssh else {
            return match std::fs::read(path) {
                Ok(b) => Ok(Some(Zeroizing::new(b))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(HostError::Read {
                    host: host.name.clone(),
                    path: path.to_owned(),
                    source,
                }),
            };
        };
        let out = self.ssh_run(
            host,
            ssh,
            &sh_command(READ_SCRIPT, &[path.as_os_str()]),
            None,
        )?;
        let stdout = Zeroizing::new(out.stdout);
        match out.status.code() {
            Some(0) => Ok(Some(stdout)),
            Some(ABSENT) => Ok(None),
            _ => Err(HostError::Remote {
                host: host.name.clone(),
                path: path.to_owned(),
                what: "reading",
                status: out.status.to_string(),
                stderr: last_words(&out.stderr),
            }),
        }
    }

    /// Replaces `path` on `host` with `bytes`: atomically, mode 0600, the
    /// owner kept, the previous content kept as `<path>.prev`; the same
    /// content is a no-op. Remote writes are read back and their hash checked.
    pub fn replace(&self, host: &Host, path: &Path, bytes: &[u8]) -> Result<Written, HostError> {
        let Some(ssh) = &host.ssh else {
            return fsio::replace(path, bytes).map_err(|source| HostError::Write {
                host: host.name.clone(),
                source,
            });
        };
        let out = self.ssh_run(
            host,
            ssh,
            &sh_command(REPLACE_SCRIPT, &[path.as_os_str()]),
            Some(bytes),
        )?;
        if !out.status.success() {
            return Err(HostError::Remote {
                host: host.name.clone(),
                path: path.to_owned(),
                what: "replacing",
                status: status_text(&out),
                stderr: last_words(&out.stderr),
            });
        }
        let written = match String::from_utf8_lossy(&out.stdout).trim() {
            "created" => Written::Created,
            "replaced" => Written::Replaced,
            "unchanged" => Written::Unchanged,
            _ => {
                return Err(HostError::Remote {
                    host: host.name.clone(),
                    path: path.to_owned(),
                    what: "replacing",
                    status: "an unexpected answer".into(),
                    stderr: last_words(&out.stderr),
                });
            }
        };
        self.verify(host, path, &sha256_hex(bytes))?;
        Ok(written)
    }

    /// Checks that `path` on remote `host` has sha256 `expected` (hex).
    pub fn verify(&self, host: &Host, path: &Path, expected: &str) -> Result<(), HostError> {
        let found = match &host.ssh {
            None => match std::fs::read(path) {
                Ok(b) => sha256_hex(&Zeroizing::new(b)),
                Err(source) => {
                    return Err(HostError::Read {
                        host: host.name.clone(),
                        path: path.to_owned(),
                        source,
                    });
                }
            },
            Some(ssh) => {
                let out = self.ssh_run(
                    host,
                    ssh,
                    &sh_command(HASH_SCRIPT, &[path.as_os_str()]),
                    None,
                )?;
                if !out.status.success() {
                    return Err(HostError::Remote {
                        host: host.name.clone(),
                        path: path.to_owned(),
                        what: "hashing",
                        status: status_text(&out),
                        stderr: last_words(&out.stderr),
                    });
                }
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            }
        };
        if found != expected {
            return Err(HostError::HashMismatch {
                host: host.name.clone(),
                path: path.to_owned(),
                expected: expected.to_owned(),
                found: cli_kit::escape::escape_control(&found.chars().take(80).collect::<String>())
                    .into_owned(),
            });
        }
        Ok(())
    }

    /// Runs the kms-plugin with `args` on `host` (local: the configured
    /// binary; remote: `ssh.kmsPlugin`, else `kms-plugin` from the remote
    /// `PATH`) and returns its output whatever its exit status. Err only when
    /// it could not be run (or the host could not be reached: over SSH an
    /// exit status of 255 is ssh's own, so a remote program exiting 255 reads
    /// as [`HostError::Unreachable`]; the plugin's exit codes are all below 10).
    pub fn kms_plugin<I, S>(&self, host: &Host, args: I) -> Result<Output, HostError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let Some(ssh) = &host.ssh else {
            return Command::new(&self.local_plugin)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .map_err(|source| HostError::PluginSpawn {
                    bin: self.local_plugin.clone(),
                    source,
                });
        };
        let bin = ssh
            .kms_plugin
            .as_deref()
            .unwrap_or(Path::new("kms-plugin"))
            .as_os_str();
        let mut line = sh_quote(bin);
        for a in &args {
            line.push(" ");
            line.push(sh_quote(a));
        }
        self.ssh_run(host, ssh, &line, None)
    }

    /// The ssh options every call (and the master) uses.
    fn ssh_base(ssh: &SshTarget, socket: &Path) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]);
        cmd.arg("-o")
            .arg(format!("ConnectTimeout={CONNECT_TIMEOUT_SECS}"));
        cmd.args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]);
        if let Some(k) = &ssh.known_hosts_file {
            let mut o = OsString::from("UserKnownHostsFile=");
            o.push(k);
            cmd.arg("-o").arg(o);
        }
        if let Some(id) = &ssh.identity_file {
            cmd.arg("-i").arg(id);
            cmd.args(["-o", "IdentitiesOnly=yes"]);
        }
        if let Some(p) = ssh.port {
            cmd.arg("-p").arg(p.to_string());
        }
        if let Some(u) = &ssh.user {
            cmd.arg("-l").arg(u);
        }
        let mut cp = OsString::from("ControlPath=");
        cp.push(socket);
        cmd.arg("-o").arg(cp);
        cmd
    }

    /// The control socket of `host`, starting its master when there is none
    /// (or it ended: idle for [`MASTER_IDLE_SECS`], or the host went away).
    fn socket(&self, host: &Host, ssh: &SshTarget) -> Result<PathBuf, HostError> {
        let mut masters = self
            .masters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let socket = match masters.get(&host.name) {
            Some(s) => s.clone(),
            None => {
                let mut dir = self
                    .dir
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let d = match &*dir {
                    Some(d) => d.path().to_owned(),
                    None => {
                        // tempfile makes directories 0700.
                        let made = tempfile::Builder::new()
                            .prefix("rotator-ssh-")
                            .tempdir()
                            .map_err(HostError::ControlDir)?;
                        let path = made.path().to_owned();
                        *dir = Some(made);
                        path
                    }
                };
                let s = d.join(masters.len().to_string());
                masters.insert(host.name.clone(), s.clone());
                s
            }
        };
        if socket.exists() {
            return Ok(socket);
        }
        // The master authenticates, runs `true`, then stays in the background
        // (stdio on /dev/null) until MASTER_IDLE_SECS after its last client,
        // so a killed rotator leaves no connection behind for long.
        let out = Self::ssh_base(ssh, &socket)
            .args(["-o", "ControlMaster=yes", "-o"])
            .arg(format!("ControlPersist={MASTER_IDLE_SECS}"))
            .arg("--")
            .arg(&ssh.host)
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| HostError::Ssh {
                program: "ssh".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(transport_error(host, &out.stderr));
        }
        Ok(socket)
    }

    /// Runs `line` on `host` through its master, `input` on stdin.
    fn ssh_run(
        &self,
        host: &Host,
        ssh: &SshTarget,
        line: &OsStr,
        input: Option<&[u8]>,
    ) -> Result<Output, HostError> {
        let socket = self.socket(host, ssh)?;
        let mut cmd = Self::ssh_base(ssh, &socket);
        cmd.args(["-o", "ControlMaster=no", "-T"])
            .arg("--")
            .arg(&ssh.host)
            .arg(line)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| HostError::Ssh {
            program: "ssh".into(),
            source,
        })?;
        if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
            // A remote that ended early shows in its exit status below.
            let _ = stdin.write_all(bytes);
        }
        let out = child.wait_with_output().map_err(|source| HostError::Ssh {
            program: "ssh".into(),
            source,
        })?;
        if out.status.code() == Some(255) {
            return Err(transport_error(host, &out.stderr));
        }
        Ok(out)
    }
}

impl Drop for HostFs {
    fn drop(&mut self) {
        let masters = std::mem::take(
            self.masters
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for socket in masters.into_values().filter(|s| s.exists()) {
            let mut cp = OsString::from("ControlPath=");
            cp.push(&socket);
            // Ends the master through its own socket.
            let _ = Command::new("ssh")
                .arg("-o")
                .arg(cp)
                .args(["-O", "exit", "rotator-master"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(sh_quote(OsStr::new("a b")), OsString::from("'a b'"));
        assert_eq!(sh_quote(OsStr::new("it's")), OsString::from("'it'\\''s'"));
        let line = sh_command("echo \"$1\"", &[OsStr::new("/x y/'z")]);
        let out = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/x y/'z\n");
    }

    #[test]
    fn the_replace_script_is_posix_sh() {
        // Syntax only (`sh -n`); the behaviour is tested over a real sshd in
        // tests/tests/rotator_ssh.rs.
        let out = Command::new("sh")
            .args(["-n", "-c", REPLACE_SCRIPT])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn ssh_failures_are_classified() {
        let h = Host {
            name: "cp9".into(),
            encryption_config: "/e".into(),
            keyring: None,
            apiserver: crate::targets::ApiserverAccess::Kubeconfig {
                path: "/k".into(),
                context: None,
            },
            proof: Default::default(),
            ssh: None,
        };
        let e = transport_error(
            &h,
            b"@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n@@@@@\nHost key verification failed.\n",
        );
        assert!(matches!(e, HostError::HostKeyChanged { .. }), "{e}");
        assert!(e.to_string().contains("host key for cp9 changed: refused"));
        let e = transport_error(
            &h,
            b"ssh: connect to host 127.0.0.1 port 1: Connection refused\r\n",
        );
        assert!(matches!(e, HostError::Unreachable { .. }), "{e}");
        assert!(e.is_unreachable() && e.to_string().contains("Connection refused"));
        let e = transport_error(&h, b"bad\x1b[31m");
        assert!(!e.to_string().contains('\x1b'));
    }
}
