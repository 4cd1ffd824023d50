//! Keeps the keyring in service in step with its file: a directory watch
//! (atomic renames replace the file, so the directory is what we watch) with
//! a polling fallback. A file that cannot be read, is invalid, is older than
//! the one in service, is not its successor (another lineage, changed key
//! material, the primary gone: [`keyring::check_successor`]), or fails the
//! self-test is refused; the keyring in service keeps serving, and the refusal stays visible (`/readyz`,
//! `atrest_kms_keyring_file_*`) until the file is fixed.
//!
//! The file is read and parsed on a thread of its own, never on the async
//! runtime that serves gRPC: a read that blocks for ever (a FIFO, a hung
//! network filesystem) stalls only reloads. At most one read is outstanding;
//! shutdown never waits for it.
//!
//! The steps of one reload:
//! 1. [`read_candidate`] (reader thread): read, skip when unchanged, parse.
//! 2. [`Reloader::validate`]: every check a parsed candidate must pass
//!    against the keyring in service before it may replace it.
//! 3. [`Reloader::apply`]: swap, or record the refusal.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot};

use crate::backend::KekSet;
use crate::health::{Health, self_test};
use crate::keyring::{Keyring, LocalKeyring};
use crate::metrics::{Metrics, ReloadResult};
use ::keyring::{Dropped, check_successor, read_raw};

/// How long watch events are collected before one read (a write, a rename and
/// a close arrive as a burst).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A read outstanding longer than this is reported as stuck (the file is
/// probably a FIFO or on a hung filesystem).
const READ_STUCK_AFTER: Duration = Duration::from_secs(5);

/// What the reader thread found in the file.
#[derive(Debug)]
pub enum Candidate {
    /// The file could not be read (the message names the path and the OS error).
    Unreadable(String),
    /// Same bytes as the keyring in service, or as the last refused file
    /// (which of the two: the digest says).
    Unchanged([u8; 32]),
    /// The bytes do not make a keyring.
    Invalid {
        /// SHA-256 of the content.
        digest: [u8; 32],
        /// Why (positions and field names, never values).
        reason: String,
    },
    /// A parsed keyring, not yet validated against the one in service.
    Parsed(Keyring),
}

/// Reads and parses `path`, unless its digest is one of `skip`. Blocking: run
/// it off the async runtime.
pub fn read_candidate(path: &Path, skip: &[[u8; 32]]) -> Candidate {
    let raw = match read_raw(path) {
        Ok(raw) => raw,
        Err(e) => return Candidate::Unreadable(e.to_string()),
    };
    if skip.contains(&raw.digest) {
        return Candidate::Unchanged(raw.digest);
    }
    match Keyring::from_raw(path, &raw) {
        Ok(keyring) => Candidate::Parsed(keyring),
        Err(e) => Candidate::Invalid {
            digest: raw.digest,
            reason: e.to_string(),
        },
    }
}

/// A read running on its own thread.
#[derive(Debug)]
struct PendingRead {
    started: Instant,
    result: oneshot::Receiver<Candidate>,
    reported_stuck: bool,
}

/// Watches one keyring file and swaps it into a [`LocalKeyring`].
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    backend: Arc<LocalKeyring>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// The last file content we refused (digest, result, reason), so a bad
    /// file is reported once and its refusal stays visible.
    last_refused: Option<([u8; 32], ReloadResult, String)>,
    /// The last read error, so an unreadable file is reported once.
    last_read_error: Option<String>,
}

impl Reloader {
    /// A reloader for `path`, feeding `backend`.
    pub fn new(
        path: PathBuf,
        backend: Arc<LocalKeyring>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reloader {
            path,
            backend,
            health,
            metrics,
            last_refused: None,
            last_read_error: None,
        }
    }

    /// Looks at the file once, reading it on the calling thread (blocking);
    /// returns what happened, or `None` when nothing changed.
    pub fn check(&mut self) -> Option<ReloadResult> {
        self.metrics.observe_read();
        let candidate = read_candidate(&self.path, &self.skip_digests());
        self.apply(candidate)
    }

    /// Digests whose content needs no second look.
    fn skip_digests(&self) -> Vec<[u8; 32]> {
        let mut skip = vec![self.backend.snapshot().digest()];
        skip.extend(self.last_refused.as_ref().map(|(digest, _, _)| *digest));
        skip
    }

    /// Every check a parsed candidate must pass before it replaces `current`:
    /// the place for any further rule about what may follow what.
    fn validate(
        &self,
        current: &Keyring,
        next: &Keyring,
    ) -> Result<Dropped, (ReloadResult, String)> {
        if next.generation() <= current.generation() {
            return Err((
                ReloadResult::RejectedRollback,
                format!(
                    "keyring {} has generation {}, not newer than generation {} in service (rolled back, or edited without `kms-plugin keyring`)",
                    self.path.display(),
                    next.generation(),
                    current.generation()
                ),
            ));
        }
        let dropped = check_successor(current.listing(), next.listing()).map_err(|refusal| {
            (
                ReloadResult::RejectedSuccessor,
                format!(
                    "keyring {} is not a successor of the keyring in service: {refusal}",
                    self.path.display()
                ),
            )
        })?;
        self_test(next).map_err(|reason| (ReloadResult::RejectedSelfTest, reason))?;
        Ok(dropped)
    }

    /// Acts on what a read found: swap, or record and report the refusal.
    pub fn apply(&mut self, candidate: Candidate) -> Option<ReloadResult> {
        let current = self.backend.snapshot();
        let outcome = match candidate {
            Candidate::Unreadable(text) => {
                if self.last_read_error.as_deref() == Some(text.as_str()) {
                    return None;
                }
                tracing::warn!(error = %text, "keyring reload refused: the keyring in service keeps serving");
                self.file_refused(ReloadResult::RejectedUnreadable, &text);
                self.last_read_error = Some(text);
                self.metrics
                    .observe_reload(ReloadResult::RejectedUnreadable);
                return Some(ReloadResult::RejectedUnreadable);
            }
            Candidate::Unchanged(digest) => {
                self.last_read_error = None;
                if digest == current.digest() {
                    // Back to the keyring in service (after a refusal, or
                    // after an unreadable spell).
                    self.last_refused = None;
                    self.file_ok();
                } else if let Some((_, result, reason)) = &self.last_refused {
                    // Still the file refused before (say so again, in case
                    // a stalled read was reported in between).
                    self.file_refused(*result, reason);
                }
                return None;
            }
            Candidate::Invalid { digest, reason } => {
                Err((digest, ReloadResult::RejectedInvalid, reason))
            }
            Candidate::Parsed(next) => match self.validate(&current, &next) {
                Ok(dropped) => Ok((next, dropped)),
                Err((result, reason)) => Err((next.digest(), result, reason)),
            },
        };
        self.last_read_error = None;
        match outcome {
            Ok((next, dropped)) => {
                warn_dropped(&dropped, "compared with the keyring in service");
                tracing::info!(
                    key_id = next.key_id(),
                    generation = next.generation(),
                    keks = next.kek_count(),
                    previous_key_id = current.key_id(),
                    "keyring reloaded"
                );
                self.metrics.set_keyring(next.key_id(), next.kek_count());
                self.backend.replace(next);
                self.health.check(&*self.backend.snapshot());
                self.metrics.set_healthy(self.health.is_healthy());
                self.last_refused = None;
                self.file_ok();
                self.metrics.observe_reload(ReloadResult::Success);
                Some(ReloadResult::Success)
            }
            Err((digest, result, reason)) => {
                tracing::warn!(
                    reason = %reason,
                    key_id = current.key_id(),
                    "keyring reload refused: the keyring in service keeps serving"
                );
                self.file_refused(result, &reason);
                self.last_refused = Some((digest, result, reason));
                self.metrics.observe_reload(result);
                Some(result)
            }
        }
    }

    fn file_ok(&self) {
        if self.health.keyring_file_refused().is_none() {
            return;
        }
        tracing::info!(keyring = %self.path.display(), "keyring file on disk is accepted again");
        self.health.set_keyring_file_refused(None);
        self.metrics.set_file_refused(None);
    }

    fn file_refused(&self, result: ReloadResult, reason: &str) {
        self.health
            .set_keyring_file_refused(Some(format!("{}: {reason}", result.as_str())));
        self.metrics.set_file_refused(Some(result));
    }

    /// Starts a read on a thread of its own (detached: nobody joins it, so a
    /// read that never returns holds up nothing but reloads).
    fn start_read(&self) -> Option<PendingRead> {
        let (tx, rx) = oneshot::channel();
        let path = self.path.clone();
        let skip = self.skip_digests();
        self.metrics.observe_read();
        let spawned = std::thread::Builder::new()
            .name("keyring-read".into())
            .spawn(move || {
                let _ = tx.send(read_candidate(&path, &skip));
            });
        match spawned {
            Ok(_) => Some(PendingRead {
                started: Instant::now(),
                result: rx,
                reported_stuck: false,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to read the keyring; retrying at the next poll");
                None
            }
        }
    }

    /// Runs until `shutdown` resolves: reads the file on every watch event
    /// that can change its content (debounced) and every `interval`.
    pub async fn run(
        mut self,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let _watcher = watch_dir(&self.path, tx);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stuck_check = tokio::time::interval(READ_STUCK_AFTER);
        stuck_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending: Option<PendingRead> = None;
        // A trigger that came while a read was outstanding: read again after it.
        let mut again = false;
        tokio::pin!(shutdown);
        loop {
            let trigger = tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => true,
                Some(()) = rx.recv() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                    true
                }
                result = async {
                    match pending.as_mut() {
                        Some(p) => (&mut p.result).await,
                        None => std::future::pending().await,
                    }
                } => {
                    pending = None;
                    if let Ok(candidate) = result {
                        // Self-tests the candidate (token calls).
                        crate::backend::may_block(|| self.apply(candidate));
                    }
                    std::mem::take(&mut again)
                }
                _ = stuck_check.tick() => {
                    if let Some(p) = pending.as_mut() {
                        self.report_stuck(p);
                    }
                    false
                }
            };
            if trigger {
                if pending.is_some() {
                    again = true;
                } else {
                    pending = self.start_read();
                }
            }
        }
    }

    fn report_stuck(&mut self, read: &mut PendingRead) {
        let waited = read.started.elapsed();
        if read.reported_stuck || waited < READ_STUCK_AFTER {
            return;
        }
        read.reported_stuck = true;
        let text = format!(
            "reading keyring {} has not finished after {}s (a FIFO, a device, or a hung filesystem?); no reload until it does",
            self.path.display(),
            waited.as_secs()
        );
        tracing::warn!(error = %text, "keyring reload stalled: the keyring in service keeps serving");
        self.file_refused(ReloadResult::RejectedUnreadable, &text);
        self.metrics
            .observe_reload(ReloadResult::RejectedUnreadable);
        self.last_read_error = Some(text);
    }
}

/// Logs at WARN the KEKs a new keyring no longer has: ciphertexts under
/// their key_ids no longer decrypt.
pub fn warn_dropped(dropped: &Dropped, compared: &str) {
    if !dropped.is_empty() {
        tracing::warn!(
            keks = ?dropped.keks,
            key_ids = ?dropped.key_ids,
            "keyring drops decrypt-only KEKs ({compared}): ciphertexts under these key_ids no longer decrypt"
        );
    }
}

/// Whether a watch event can change what the keyring file holds: a write
/// closed, a rename, a create or a delete, of the file itself or of the
/// `..data` link through which Kubernetes swaps mounted Secrets/ConfigMaps.
/// Our own opens and reads (and everyone's) are ignored.
fn is_content_change(event: &notify::Event, names: &[OsString]) -> bool {
    let relevant_kind = matches!(
        event.kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_))
    );
    relevant_kind
        && event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| names.iter().any(|want| want == n))
        })
}

fn watch_dir(path: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut names = vec![OsString::from("..data")];
    names.extend(path.file_name().map(|n| n.to_owned()));
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && is_content_change(&event, &names)
        {
            // A full channel already has a check pending.
            let _ = tx.try_send(());
        }
    });
    match watcher.and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w)) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the keyring directory; polling only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn only_content_changes_of_the_keyring_trigger_a_read() {
        let names = [OsString::from("keyring.json"), OsString::from("..data")];
        let yes = [
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/k/keyring.json",
            ),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/k/keyring.json",
            ),
            event(EventKind::Create(CreateKind::File), "/k/keyring.json"),
            event(
                EventKind::Remove(notify::event::RemoveKind::File),
                "/k/keyring.json",
            ),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/k/..data",
            ),
        ];
        for e in &yes {
            assert!(is_content_change(e, &names), "{e:?}");
        }
        let no = [
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                "/k/keyring.json",
            ),
            event(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/k/keyring.json",
            ),
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/k/keyring.json.lock",
            ),
            event(EventKind::Create(CreateKind::File), "/k/other"),
        ];
        for e in &no {
            assert!(!is_content_change(e, &names), "{e:?}");
        }
    }
}
