//! Binding the listening socket safely.
//!
//! A socket file is replaced only when it is a socket nobody answers on; a
//! live server, a hung listener (checked with a non-blocking connect, so it
//! never hangs us) or any other kind of file makes us refuse. The socket is
//! bound in a private directory beside the target, gets its group and mode
//! there, and is renamed into place without replacing anything: no step acts
//! on a path someone else could swap for a symlink. A socket directory that
//! others may write to without the sticky bit is refused. The file is removed
//! on exit, but only if it is still ours.

use std::fs;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group};
use thiserror::Error;

use kms_client::Endpoint;

/// Why the socket could not be set up.
#[derive(Debug, Error)]
pub enum SocketError {
    /// Another process answers on the endpoint.
    #[error("refusing to start: a server is already serving on {0}")]
    AlreadyServing(Endpoint),
    /// The path exists and is not a socket: we never delete such a file.
    #[error(
        "refusing to start: {0} exists and is not a socket; it was left untouched (remove it or pick another path)"
    )]
    NotASocket(PathBuf),
    /// A listener holds the socket path but accepts no connection.
    #[error(
        "refusing to start: a process listens on {0} but does not accept connections (its backlog is full: hung or overloaded); stop it, or remove the socket if it is dead"
    )]
    NotAccepting(PathBuf),
    /// The socket's directory is writable by others and not sticky.
    #[error(
        "refusing to start: socket directory {0} is writable by others without the sticky bit, so anyone could replace the socket; make it 0755 (or 1777)"
    )]
    UnsafeDirectory(PathBuf),
    /// Something appeared at the path while we were binding.
    #[error(
        "refusing to start: something was created at {0} while the socket was being set up (another process races for this path); it was left untouched"
    )]
    Raced(PathBuf),
    /// The socket's directory is missing.
    #[error("cannot listen on {path}: directory {dir} does not exist")]
    NoDirectory {
        /// The socket path.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
    },
    /// `--socket-group` names no group.
    #[error("socket group {0:?} does not exist")]
    UnknownGroup(String),
    /// Any other OS error, with what we were doing.
    #[error("{what} {endpoint}: {source}")]
    Io {
        /// What failed.
        what: &'static str,
        /// Where.
        endpoint: String,
        /// The OS error.
        source: io::Error,
    },
}

/// Who may connect to a socket file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits, e.g. 0o600.
    pub mode: u32,
    /// Group owning the socket (name or numeric id), if not the default.
    pub group: Option<String>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: 0o600,
            group: None,
        }
    }
}

/// A bound listener; removes its socket file on drop if it is still ours.
#[derive(Debug)]
pub struct BoundSocket {
    listener: Option<UnixListener>,
    cleanup: Option<(PathBuf, u64, u64)>,
}

impl BoundSocket {
    /// Hands the listener over (non-blocking, for tokio); cleanup stays here.
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Some((path, dev, ino)) = &self.cleanup {
            // Only remove the socket we created, not one a successor bound.
            if let Ok(meta) = fs::symlink_metadata(path)
                && meta.dev() == *dev
                && meta.ino() == *ino
                && meta.file_type().is_socket()
            {
                let _ = fs::remove_file(path);
            }
        }
    }
}

fn io_err<'a>(
    what: &'static str,
    endpoint: &'a Endpoint,
) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        what,
        endpoint: endpoint.to_string(),
        source,
    }
}

/// Binds `endpoint` following the hygiene rules above.
pub fn bind(endpoint: &Endpoint, access: &SocketAccess) -> Result<BoundSocket, SocketError> {
    match endpoint {
        Endpoint::Abstract(name) => {
            let addr = SocketAddr::from_abstract_name(name.as_bytes())
                .map_err(io_err("invalid address", endpoint))?;
            let listener = UnixListener::bind_addr(&addr).map_err(|e| {
                if e.kind() == io::ErrorKind::AddrInUse {
                    SocketError::AlreadyServing(endpoint.clone())
                } else {
                    io_err("cannot listen on", endpoint)(e)
                }
            })?;
            listener
                .set_nonblocking(true)
                .map_err(io_err("cannot configure", endpoint))?;
            Ok(BoundSocket {
                listener: Some(listener),
                cleanup: None,
            })
        }
        Endpoint::Path(path) => bind_path(endpoint, path, access),
    }
}

fn bind_path(
    endpoint: &Endpoint,
    path: &Path,
    access: &SocketAccess,
) -> Result<BoundSocket, SocketError> {
    let gid = match &access.group {
        None => None,
        Some(g) => Some(resolve_group(g)?),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir_meta = match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => meta,
        _ => {
            return Err(SocketError::NoDirectory {
                path: path.to_owned(),
                dir: dir.to_owned(),
            });
        }
    };
    // In a directory anyone may write to (without the sticky bit), anyone can
    // rename our files away and put their own in place: nothing we set there
    // stays ours.
    if dir_meta.mode() & 0o002 != 0 && dir_meta.mode() & 0o1000 == 0 {
        return Err(SocketError::UnsafeDirectory(dir.to_owned()));
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match probe_listener(path) {
            Probe::Answers => return Err(SocketError::AlreadyServing(endpoint.clone())),
            Probe::Backlogged => return Err(SocketError::NotAccepting(path.to_owned())),
            Probe::Stale => {
                tracing::info!(socket = %path.display(), "removing stale socket left by an earlier run");
                fs::remove_file(path).map_err(io_err("cannot remove stale socket", endpoint))?;
            }
            Probe::Failed(e) => return Err(io_err("cannot check existing socket", endpoint)(e)),
        },
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect", endpoint)(e)),
    }
    // Bind, set group and mode in a private directory (mode 0700, ours) next
    // to the target, on the same filesystem, then rename into place: nothing
    // here acts on a path someone else can swap for a symlink.
    let private = tempfile::Builder::new()
        .prefix(".k")
        .tempdir_in(dir)
        .map_err(io_err("cannot create a private directory beside", endpoint))?;
    let staged = private.path().join("s");
    // Bind with a umask that leaves the socket private until its mode is set.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(&staged);
    nix::sys::stat::umask(old_umask);
    let listener = bound.map_err(io_err("cannot listen on", endpoint))?;
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(&staged, None, Some(gid.as_raw()))
            .map_err(io_err("cannot set group of", endpoint))?;
    }
    // `staged` lies in our own 0700 directory: no one else can replace it.
    fs::set_permissions(&staged, fs::Permissions::from_mode(access.mode))
        .map_err(io_err("cannot set mode of", endpoint))?;
    let meta = fs::symlink_metadata(&staged).map_err(io_err("cannot inspect", endpoint))?;
    // Never replace what appeared at the path since we looked.
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &staged,
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|errno| match errno {
        nix::errno::Errno::EEXIST => SocketError::Raced(path.to_owned()),
        other => io_err("cannot move the socket into place at", endpoint)(other.into()),
    })?;
    let socket = BoundSocket {
        listener: Some(listener),
        cleanup: Some((path.to_owned(), meta.dev(), meta.ino())),
    };
    drop(private);
    if let Some(l) = &socket.listener {
        l.set_nonblocking(true)
            .map_err(io_err("cannot configure", endpoint))?;
    }
    Ok(socket)
}

/// What a connect to an existing socket file found.
enum Probe {
    /// A server accepted the connection.
    Answers,
    /// A listener holds the path but its backlog is full (hung, or overloaded).
    Backlogged,
    /// Nobody listens: a socket left behind by an earlier run.
    Stale,
    /// Anything else.
    Failed(io::Error),
}

/// Connects without blocking: a listener whose backlog is full makes a
/// blocking connect wait for ever, a non-blocking one says so at once.
fn probe_listener(path: &Path) -> Probe {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd;
    let addr = match UnixAddr::new(path) {
        Ok(a) => a,
        Err(e) => return Probe::Failed(e.into()),
    };
    let fd = match socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(e) => return Probe::Failed(e.into()),
    };
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Probe::Answers,
        Err(nix::errno::Errno::ECONNREFUSED) => Probe::Stale,
        Err(nix::errno::Errno::EAGAIN) => Probe::Backlogged,
        Err(e) => Probe::Failed(e.into()),
    }
}

fn resolve_group(group: &str) -> Result<Gid, SocketError> {
    if let Ok(id) = group.parse::<u32>() {
        return Ok(Gid::from_raw(id));
    }
    match Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        _ => Err(SocketError::UnknownGroup(group.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_live_one_and_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let ep = Endpoint::Path(path.clone());

        // Stale: bound then closed without unlinking.
        drop(UnixListener::bind(&path).unwrap());
        let mut s = bind(&ep, &SocketAccess::default()).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Live: the first listener still holds the path.
        let err = bind(&ep, &SocketAccess::default()).unwrap_err();
        assert!(matches!(err, SocketError::AlreadyServing(_)), "{err}");

        drop(s.take_listener());
        drop(s);
        assert!(!path.exists(), "socket not removed on drop");

        fs::write(&path, b"precious").unwrap();
        let err = bind(&ep, &SocketAccess::default()).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket(_)), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn mode_and_group_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let access = SocketAccess {
            mode: 0o660,
            group: Some("0".into()),
        };
        let _s = bind(&Endpoint::Path(path.clone()), &access).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), 0);
        let err = bind(
            &Endpoint::Path(dir.path().join("other.sock")),
            &SocketAccess {
                mode: 0o600,
                group: Some("no-such-group-atrest".into()),
            },
        )
        .unwrap_err();
        assert!(matches!(err, SocketError::UnknownGroup(_)), "{err}");
    }

    #[test]
    fn abstract_sockets_refuse_a_second_server() {
        let ep = Endpoint::Abstract(format!("atrest-test-{}", std::process::id()));
        let _first = bind(&ep, &SocketAccess::default()).unwrap();
        assert!(matches!(
            bind(&ep, &SocketAccess::default()),
            Err(SocketError::AlreadyServing(_))
        ));
        assert!(kms_client::connect_std(&ep).is_ok());
    }
}
