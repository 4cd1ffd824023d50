//! Binding the listening socket safely.
//!
//! A socket file is replaced only when it is a socket nobody answers on; a
//! live server or any other kind of file makes us refuse. The mode is set
//! explicitly and the file is removed on exit, but only if it is still ours.

use std::fs;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
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
    if let Some(dir) = path.parent()
        && !dir.is_dir()
    {
        return Err(SocketError::NoDirectory {
            path: path.to_owned(),
            dir: dir.to_owned(),
        });
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::AlreadyServing(endpoint.clone())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing stale socket left by an earlier run");
                fs::remove_file(path).map_err(io_err("cannot remove stale socket", endpoint))?;
            }
            Err(e) => return Err(io_err("cannot check existing socket", endpoint)(e)),
        },
        Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot inspect", endpoint)(e)),
    }
    // Bind with a umask that leaves the socket private until its mode is set.
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old_umask);
    let listener = bound.map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            SocketError::AlreadyServing(endpoint.clone())
        } else {
            io_err("cannot listen on", endpoint)(e)
        }
    })?;
    let meta = fs::symlink_metadata(path).map_err(io_err("cannot inspect", endpoint))?;
    let socket = BoundSocket {
        listener: Some(listener),
        cleanup: Some((path.to_owned(), meta.dev(), meta.ino())),
    };
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid.as_raw()))
            .map_err(io_err("cannot set group of", endpoint))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(access.mode))
        .map_err(io_err("cannot set mode of", endpoint))?;
    if let Some(l) = &socket.listener {
        l.set_nonblocking(true)
            .map_err(io_err("cannot configure", endpoint))?;
    }
    Ok(socket)
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
