//! atrest's one way to write a file and one way to read a small file.
//!
//! Every file the project writes holds keys or decides which keys are used
//! (keyrings, EncryptionConfigurations, the rotator's state file), so every
//! write goes through [`write`]:
//!
//! 1. symlinks at the path are followed: the **target** is replaced, the link
//!    stays a link (editing through a link must not swap the link for a file);
//! 2. the new content goes to a temporary file `.<name>.tmp-<pid>-<n>` in the
//!    target's own directory (so the rename cannot cross file systems),
//!    created exclusively, with the mode set explicitly (not left to the
//!    umask) and the owner and group of the file it replaces;
//! 3. the temporary file is fsynced, renamed over the target (or linked, for
//!    [`Existing::Refuse`], which never overwrites), and the directory is
//!    fsynced, so after a crash a reader finds the old file or the new one;
//! 4. with [`Options::backup`], the previous content is kept as `<name>.prev`
//!    (the project's one backup name), written the same way and always 0600;
//! 5. on every failure path the temporary files are removed;
//! 6. the old content read for the comparison and the backup is held in
//!    zeroizing memory.
//!
//! Writing the content a file already has does nothing ([`Written::Unchanged`]),
//! so a resumed step never replaces a good `.prev` with a copy of the new file.
//!
//! [`read_bounded`] is the read side for files a daemon re-reads on its own
//! (the plugin's keyring): it opens without blocking, refuses anything that is
//! not a regular file (a FIFO would hang the reader, a device never ends) and
//! refuses a file larger than the cap before reading it.
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![warn(missing_docs)]

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;
use zeroize::Zeroizing;

/// The suffix of the backup [`write`] keeps with [`Options::backup`].
pub const BACKUP_SUFFIX: &str = ".prev";

/// Mode of every file that holds keys, and of every backup.
pub const SECRET_MODE: u32 = 0o600;

/// Largest old file [`write`] reads for its comparison and backup.
const MAX_OLD_LEN: u64 = 64 * 1024 * 1024;

/// A write that failed. The old file is untouched and no temporary file is
/// left behind. Never holds file content.
#[derive(Debug, Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    /// The file asked for.
    pub path: PathBuf,
    /// Why (for [`Existing::Refuse`] on an existing file: `AlreadyExists`).
    #[source]
    pub source: io::Error,
}

impl WriteError {
    /// True when [`Existing::Refuse`] found a file already there.
    pub fn is_already_exists(&self) -> bool {
        self.source.kind() == io::ErrorKind::AlreadyExists
    }
}

/// What [`write`] does when the file exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Fail with `AlreadyExists`; never overwrite (even a file created
    /// between the check and the write).
    Refuse,
    /// Replace it.
    Replace,
}

/// How [`write`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Mode of the new file, set explicitly.
    pub mode: u32,
    /// Refuse or replace an existing file.
    pub existing: Existing,
    /// Keep the replaced content as `<name>.prev` (mode 0600).
    pub backup: bool,
}

impl Options {
    /// A key-bearing file: 0600, replaced, the previous content kept as `.prev`.
    pub const fn secret_with_backup() -> Self {
        Options {
            mode: SECRET_MODE,
            existing: Existing::Replace,
            backup: true,
        }
    }

    /// A key-bearing file rewritten often (a state file): 0600, no backup.
    pub const fn secret() -> Self {
        Options {
            mode: SECRET_MODE,
            existing: Existing::Replace,
            backup: false,
        }
    }

    /// A new key-bearing file that must not exist yet: 0600.
    pub const fn secret_new() -> Self {
        Options {
            mode: SECRET_MODE,
            existing: Existing::Refuse,
            backup: false,
        }
    }
}

/// What [`write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// There was no file; it was created.
    Created,
    /// The file was replaced (the old content is at `.prev` when asked).
    Replaced,
    /// The file already had this content; nothing was written.
    Unchanged,
}

/// The backup path of `path`: `<path>.prev`.
pub fn backup_path(path: &Path) -> PathBuf {
    with_suffix(path, BACKUP_SUFFIX)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Where a write to `path` lands: `path` itself, or the file its symlinks
/// lead to. A dangling link is an error (the target's directory may not be
/// what the operator thinks).
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("it is a symlink whose target cannot be resolved ({e})"),
            )
        }),
        _ => Ok(path.to_owned()),
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary file that is removed when dropped, unless kept.
struct Temp {
    path: PathBuf,
    armed: bool,
}

impl Temp {
    fn new(dir: &Path, name: &std::ffi::OsStr, what: &str) -> Self {
        let mut tmp: OsString = ".".into();
        tmp.push(name);
        tmp.push(format!(
            ".{what}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        Temp {
            path: dir.join(tmp),
            armed: true,
        }
    }

    /// Creates it exclusively with `bytes`, `mode` and `owner`, fsynced.
    fn fill(&self, bytes: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(SECRET_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)?;
        fault("fill")?;
        if let Some((uid, gid)) = owner {
            let m = f.metadata()?;
            if (m.uid(), m.gid()) != (uid, gid) {
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
            }
        }
        // After chown (which may clear set-id bits), and whatever the umask.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        fault("sync")?;
        f.sync_all()
    }

    /// The file stays (it was renamed or linked into place).
    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` to `path` atomically; see the crate docs for the steps.
pub fn write(path: &Path, bytes: &[u8], options: &Options) -> Result<Written, WriteError> {
    let err = |source| WriteError {
        path: path.to_owned(),
        source,
    };
    let target = resolve(path).map_err(err)?;
    let name = target
        .file_name()
        .ok_or_else(|| err(io::Error::other("the path names no file")))?
        .to_owned();
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };

    // The file being replaced: its content (for the no-op and the backup)
    // and its owner. Anything but a regular file has neither.
    let old = match fs::symlink_metadata(&target) {
        Ok(m) if m.file_type().is_file() => {
            if options.existing == Existing::Refuse {
                return Err(err(io::ErrorKind::AlreadyExists.into()));
            }
            let content = read_bounded(&target, MAX_OLD_LEN).map_err(|e| err(e.into_io()))?;
            Some((content, (m.uid(), m.gid())))
        }
        Ok(_) if options.existing == Existing::Refuse => {
            return Err(err(io::ErrorKind::AlreadyExists.into()));
        }
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(err(e)),
    };
    if let Some((content, _)) = &old
        && content.as_slice() == bytes
    {
        return Ok(Written::Unchanged);
    }
    let owner = old.as_ref().map(|(_, owner)| *owner);

    let tmp = Temp::new(&dir, &name, "tmp");
    tmp.fill(bytes, options.mode, owner).map_err(err)?;

    if options.backup
        && let Some((content, owner)) = &old
    {
        let prev = Temp::new(&dir, &name, "prev.tmp");
        prev.fill(content, SECRET_MODE, Some(*owner)).map_err(err)?;
        fault("backup").map_err(err)?;
        fs::rename(&prev.path, backup_path(&target)).map_err(err)?;
        prev.keep();
    }

    let written = match options.existing {
        Existing::Refuse => {
            // link(2) never replaces: a file created meanwhile makes it fail.
            fs::hard_link(&tmp.path, &target).map_err(err)?;
            // The temp name goes (dropping the armed guard removes it).
            drop(tmp);
            Written::Created
        }
        Existing::Replace => {
            fault("rename").map_err(err)?;
            fs::rename(&tmp.path, &target).map_err(err)?;
            tmp.keep();
            if old.is_some() {
                Written::Replaced
            } else {
                Written::Created
            }
        }
    };
    fault("sync_dir").map_err(err)?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(written)
}

/// Why [`read_bounded`] refused or failed. Never holds file content.
#[derive(Debug, Error)]
pub enum ReadError {
    /// Opening, inspecting or reading failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A FIFO, device, directory or socket.
    #[error("cannot read {path}: it is a {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// Larger than the caller allows.
    #[error("cannot read {path}: it is larger than {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The cap.
        limit: u64,
    },
}

impl ReadError {
    fn into_io(self) -> io::Error {
        match self {
            ReadError::Io { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

fn kind_of(file_type: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Reads a whole regular file of at most `limit` bytes into zeroizing memory.
///
/// Symlinks are followed (a Kubernetes Secret or ConfigMap volume presents
/// every file through links); what they lead to must be a regular file. The
/// open never blocks (`O_NONBLOCK`: a FIFO is refused, not waited on), the
/// type and size are judged on the opened file (`fstat`), and at most
/// `limit + 1` bytes are ever read, so a file that grows meanwhile is refused
/// too.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Zeroizing<Vec<u8>>, ReadError> {
    let io_err = |source| ReadError::Io {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular {
            path: path.to_owned(),
            kind: kind_of(meta.file_type()),
        });
    }
    let too_large = || ReadError::TooLarge {
        path: path.to_owned(),
        limit,
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    // Capacity for the whole file up front: a reallocation would leave an
    // unzeroized copy behind.
    let cap = usize::try_from(meta.len()).map_err(|_| too_large())?;
    let mut out = Zeroizing::new(Vec::with_capacity(cap.saturating_add(1)));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(io_err)?;
    if out.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(out)
}

/// Test-only fault injection: makes the step named in `ATOMIC_FILE_FAULT`
/// of the current thread fail, to prove every failure path cleans up.
#[cfg(test)]
fn fault(step: &'static str) -> io::Result<()> {
    FAULT.with(|f| {
        if f.get() == Some(step) {
            Err(io::Error::other(format!("injected fault at {step}")))
        } else {
            Ok(())
        }
    })
}

#[cfg(not(test))]
#[inline(always)]
fn fault(_step: &'static str) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
thread_local! {
    static FAULT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_with_a_0600_backup_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keyring.json");
        let o = Options::secret_with_backup();
        assert_eq!(write(&p, b"one", &o).unwrap(), Written::Created);
        assert!(!backup_path(&p).exists());
        // A hand-made 0644 file: the new file and its backup are both 0600.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(write(&p, b"two", &o).unwrap(), Written::Replaced);
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read(backup_path(&p)).unwrap(), b"one");
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(&backup_path(&p)), 0o600);
        // Same content: nothing written, the backup keeps the older file.
        assert_eq!(write(&p, b"two", &o).unwrap(), Written::Unchanged);
        assert_eq!(fs::read(backup_path(&p)).unwrap(), b"one");
        assert_eq!(names(dir.path()), ["keyring.json", "keyring.json.prev"]);
    }

    #[test]
    fn the_mode_is_explicit_not_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        let o = Options {
            mode: 0o640,
            ..Options::secret()
        };
        write(&p, b"x", &o).unwrap();
        assert_eq!(mode(&p), 0o640);
        assert_eq!(names(dir.path()), ["config.yaml"], "no backup asked");
    }

    #[test]
    fn refuse_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        assert_eq!(
            write(&p, b"one", &Options::secret_new()).unwrap(),
            Written::Created
        );
        let e = write(&p, b"two", &Options::secret_new()).unwrap_err();
        assert!(e.is_already_exists(), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(names(dir.path()), ["k"]);
    }

    #[test]
    fn refuse_counts_any_entry_as_existing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::create_dir(&p).unwrap();
        let e = write(&p, b"two", &Options::secret_new()).unwrap_err();
        assert!(e.is_already_exists(), "{e}");
        assert_eq!(names(dir.path()), ["k"]);
    }

    #[test]
    fn a_rename_into_a_directory_fails_and_removes_the_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("inside"), b"x").unwrap();
        let e = write(&p, b"new", &Options::secret_with_backup()).unwrap_err();
        assert!(e.to_string().contains("state.json"), "{e}");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn every_failure_step_removes_the_temps_and_keeps_the_old_file() {
        for step in ["fill", "sync", "backup", "rename", "sync_dir"] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("keyring.json");
            write(&p, b"old", &Options::secret()).unwrap();
            FAULT.with(|f| f.set(Some(step)));
            let r = write(&p, b"new", &Options::secret_with_backup());
            FAULT.with(|f| f.set(None));
            assert!(r.is_err(), "{step}");
            let left = names(dir.path());
            assert!(left.iter().all(|n| !n.contains(".tmp")), "{step}: {left:?}");
            if step != "sync_dir" {
                assert_eq!(fs::read(&p).unwrap(), b"old", "{step}");
            }
        }
    }

    #[test]
    fn a_symlink_is_followed_and_stays_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let real_dir = dir.path().join("real");
        fs::create_dir(&real_dir).unwrap();
        let real = real_dir.join("keyring.json");
        write(&real, b"one", &Options::secret()).unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        write(&link, b"two", &Options::secret_with_backup()).unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&real).unwrap(), b"two");
        assert_eq!(fs::read(backup_path(&real)).unwrap(), b"one");
        assert!(!backup_path(&link).exists(), "backup belongs to the target");
        // A dangling link is refused, not replaced by a file.
        let dangling = dir.path().join("dangling.json");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let e = write(&dangling, b"x", &Options::secret()).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn the_owner_of_the_replaced_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write(&p, b"one", &Options::secret()).unwrap();
        let me = fs::metadata(&p).unwrap();
        // As root, hand the file to another user first; otherwise it is ours.
        let want = if me.uid() == 0 {
            std::os::unix::fs::chown(&p, Some(4242), Some(4343)).unwrap();
            (4242, 4343)
        } else {
            (me.uid(), me.gid())
        };
        write(&p, b"two", &Options::secret_with_backup()).unwrap();
        for f in [&p, &backup_path(&p)] {
            let m = fs::metadata(f).unwrap();
            assert_eq!((m.uid(), m.gid()), want, "{}", f.display());
        }
    }

    #[test]
    fn bounded_read_refuses_special_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"12345").unwrap();
        assert_eq!(read_bounded(&p, 5).unwrap().as_slice(), b"12345");
        let e = read_bounded(&p, 4).unwrap_err();
        assert!(matches!(e, ReadError::TooLarge { limit: 4, .. }), "{e}");

        let e = read_bounded(dir.path(), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");

        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        // Would block forever without O_NONBLOCK (no writer).
        let e = read_bounded(&fifo, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");

        let e = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");

        let e = read_bounded(&dir.path().join("missing"), 1).unwrap_err();
        assert!(matches!(e, ReadError::Io { .. }), "{e}");
    }
}
