//! Keeps the keyring in service in step with its file: a directory watch
//! (atomic renames replace the file, so the directory is what we watch) with
//! a polling fallback. A file that cannot be read, is invalid, is older than
//! the one in service, is not its successor (another lineage, changed key
//! material, the primary gone: [`keyring::check_successor`]), or fails the
//! self-test is refused; the keyring in service keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::backend::KekSet;
use crate::health::{Health, self_test};
use crate::keyring::{Keyring, LocalKeyring};
use crate::metrics::{Metrics, ReloadResult};
use ::keyring::{Dropped, check_successor, read_raw};

/// Watches one keyring file and swaps it into a [`LocalKeyring`].
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    backend: Arc<LocalKeyring>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// The last file content we refused, so a bad file is reported once.
    last_refused: Option<[u8; 32]>,
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

    /// Looks at the file once; returns what happened, or `None` when nothing changed.
    pub fn check(&mut self) -> Option<ReloadResult> {
        let raw = match read_raw(&self.path) {
            Ok(raw) => raw,
            Err(e) => {
                let text = e.to_string();
                if self.last_read_error.as_deref() == Some(text.as_str()) {
                    return None;
                }
                tracing::warn!(error = %text, "keyring reload refused: the keyring in service keeps serving");
                self.last_read_error = Some(text);
                return Some(self.refused(ReloadResult::RejectedUnreadable));
            }
        };
        self.last_read_error = None;
        let current = self.backend.snapshot();
        if raw.digest == current.digest() || Some(raw.digest) == self.last_refused {
            return None;
        }
        let outcome = match Keyring::from_raw(&self.path, &raw) {
            Err(e) => Err((ReloadResult::RejectedInvalid, e.to_string())),
            Ok(next) if next.generation() <= current.generation() => Err((
                ReloadResult::RejectedRollback,
                format!(
                    "keyring {} has generation {}, not newer than generation {} in service (rolled back, or edited without `kms-plugin keyring`)",
                    self.path.display(),
                    next.generation(),
                    current.generation()
                ),
            )),
            Ok(next) => match check_successor(current.listing(), next.listing()) {
                Err(refusal) => Err((
                    ReloadResult::RejectedSuccessor,
                    format!(
                        "keyring {} is not a successor of the keyring in service: {refusal}",
                        self.path.display()
                    ),
                )),
                Ok(dropped) => match self_test(&next) {
                    Err(reason) => Err((ReloadResult::RejectedSelfTest, reason)),
                    Ok(()) => Ok((next, dropped)),
                },
            },
        };
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
                self.metrics.observe_reload(ReloadResult::Success);
                Some(ReloadResult::Success)
            }
            Err((result, reason)) => {
                tracing::warn!(
                    reason = %reason,
                    key_id = current.key_id(),
                    "keyring reload refused: the keyring in service keeps serving"
                );
                self.last_refused = Some(raw.digest);
                Some(self.refused(result))
            }
        }
    }

    fn refused(&self, result: ReloadResult) -> ReloadResult {
        self.metrics.observe_reload(result);
        result
    }

    /// Runs until `shutdown` resolves: checks on every change event in the
    /// file's directory and every `interval`.
    pub async fn run(
        mut self,
        interval: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let _watcher = watch_dir(&self.path, tx);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
                Some(()) = rx.recv() => {
                    // Let a burst of events (temp file, rename) settle.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while rx.try_recv().is_ok() {}
                }
            }
            self.check();
        }
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

fn watch_dir(path: &Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
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
