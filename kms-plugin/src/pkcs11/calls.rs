//! The threads that make token calls, so the async workers never block on a
//! token: a fixed set of threads, one per session the pool may open
//! (`--pkcs11-max-sessions`), taking calls from one queue in arrival order.
//!
//! Why not tokio's blocking pool: it keeps a thread per call in flight and
//! wakes a sleeping one for almost every call, so a token call paid two
//! thread wake-ups and the session pool's lock and wake on top (≈ 12 µs of
//! plugin CPU per call on a 2-core machine, more than the rest of the gRPC
//! path). Here a thread that finishes a call takes the next queued one
//! without sleeping; a sleeping thread is woken only when a call arrives and
//! nobody is free to take it, and each thread keeps its own session, so the
//! session pool never waits. With as many threads as the token has useful
//! concurrency (the cores, for an in-process software token; the HSM's
//! parallelism, for a network HSM) the queue absorbs bursts.
//!
//! A call waits in the queue at most the configured wait
//! (`--pkcs11-session-wait`): when no thread has taken it by then, its caller
//! gets [`Offloaded::TimedOut`] (RESOURCE_EXHAUSTED) and the call is never
//! made, also when every thread is stuck in a token that stopped answering.
//! A call that has started runs to its end. A call whose caller went away
//! (the request was cancelled) is skipped. The queue is bounded
//! ([`MAX_QUEUED`]); beyond it calls are refused at once.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Most calls queued at once (beyond the threads' own). Reached only when
/// the token stalls under load; callers are then refused at once.
pub const MAX_QUEUED: usize = 4096;

/// What became of a call handed to the token threads.
#[derive(Debug, PartialEq, Eq)]
pub enum Offloaded<T> {
    /// It ran; its result.
    Done(T),
    /// No thread took it within the wait (or the queue was full): it was
    /// not made.
    TimedOut,
    /// It panicked, or the threads are gone.
    Lost,
}

/// A queued call's state: taken by a thread, or given up by its caller;
/// whichever comes first wins.
const QUEUED: u8 = 0;
const STARTED: u8 = 1;
const CANCELLED: u8 = 2;

struct Job {
    state: Arc<AtomicU8>,
    queued: Instant,
    /// Every thread was busy (or already woken for other calls) when it
    /// arrived: it waits in the queue.
    queued_behind: bool,
    work: Box<dyn FnOnce() + Send>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    sleeping: usize,
    /// Wake-ups sent and not yet taken by a sleeping thread.
    waking: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    wait: Duration,
    /// Calls that waited in the queue (found no free thread), their total
    /// wait, and those refused for waiting too long or a full queue.
    waits: AtomicU64,
    wait_nanos: AtomicU64,
    timed_out: AtomicU64,
}

/// The token call threads (see the module docs).
pub struct CallThreads {
    shared: Arc<Shared>,
    threads: usize,
}

impl std::fmt::Debug for CallThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallThreads")
            .field("threads", &self.threads)
            .field("wait", &self.shared.wait)
            .finish_non_exhaustive()
    }
}

/// The queue's account since the start (for `/metrics` and the usage line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Calls that found every thread busy and waited in the queue
    /// (including those refused after the whole wait).
    pub waits: u64,
    /// Their total time in the queue.
    pub waited: Duration,
    /// Calls refused: not taken within the wait, or the queue was full.
    pub timed_out: u64,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gives a still-queued call up when its caller's future is dropped.
struct GiveUpOnDrop(Arc<AtomicU8>);

impl Drop for GiveUpOnDrop {
    fn drop(&mut self) {
        let _ = self
            .0
            .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl CallThreads {
    /// Starts `threads` threads (at least one); a call waits at most `wait`
    /// in the queue.
    pub fn start(threads: usize, wait: Duration) -> std::io::Result<CallThreads> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            wait,
            waits: AtomicU64::new(0),
            wait_nanos: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        });
        for i in 0..threads {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("pkcs11-call-{i}"))
                .spawn(move || shared.serve())?;
        }
        Ok(CallThreads { shared, threads })
    }

    /// How many threads make token calls.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// How long a call may wait in the queue.
    pub fn wait(&self) -> Duration {
        self.shared.wait
    }

    /// The queue's account so far.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            waits: self.shared.waits.load(Ordering::Relaxed),
            waited: Duration::from_nanos(self.shared.wait_nanos.load(Ordering::Relaxed)),
            timed_out: self.shared.timed_out.load(Ordering::Relaxed),
        }
    }

    /// Runs `call` on a token thread and waits for it without blocking the
    /// async worker.
    pub async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Offloaded<T> {
        let (tx, mut rx) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let _give_up = GiveUpOnDrop(state.clone());
        let work = Box::new(move || {
            let out = catch_unwind(AssertUnwindSafe(call)).map_or(Offloaded::Lost, Offloaded::Done);
            let _ = tx.send(out);
        });
        if !self.shared.push(state.clone(), work) {
            self.shared.timed_out.fetch_add(1, Ordering::Relaxed);
            return Offloaded::TimedOut;
        }
        match tokio::time::timeout(self.shared.wait, &mut rx).await {
            Ok(out) => out.unwrap_or(Offloaded::Lost),
            Err(_) => {
                if state
                    .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    // It waited (the whole wait) and is refused.
                    self.shared.waited(self.shared.wait);
                    self.shared.timed_out.fetch_add(1, Ordering::Relaxed);
                    return Offloaded::TimedOut;
                }
                // A thread took it: it runs to its end.
                rx.await.unwrap_or(Offloaded::Lost)
            }
        }
    }
}

impl Shared {
    /// Queues a call; `false` when the queue is full.
    fn push(&self, state: Arc<AtomicU8>, work: Box<dyn FnOnce() + Send>) -> bool {
        let queued = Instant::now();
        let wake = {
            let mut q = lock(&self.queue);
            if q.jobs.len() >= MAX_QUEUED {
                q.jobs.retain(|j| j.state.load(Ordering::Acquire) == QUEUED);
                if q.jobs.len() >= MAX_QUEUED {
                    return false;
                }
            }
            // Wake a sleeper only when the queued jobs outnumber the
            // wake-ups already on their way; otherwise a busy thread takes
            // the job when it finishes its call.
            let wake = q.sleeping > q.waking && q.jobs.len() >= q.waking;
            if wake {
                q.waking += 1;
            }
            q.jobs.push_back(Job {
                state,
                queued,
                queued_behind: !wake,
                work,
            });
            wake
        };
        if wake {
            self.ready.notify_one();
        }
        true
    }

    /// Counts a call that waited in the queue for `waited`.
    fn waited(&self, waited: Duration) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.wait_nanos.fetch_add(
            u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn serve(&self) {
        loop {
            let job = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    q.sleeping += 1;
                    q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                    q.sleeping -= 1;
                    q.waking = q.waking.saturating_sub(1);
                }
            };
            if job
                .state
                .compare_exchange(QUEUED, STARTED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                // Its caller gave up (timed out or went away).
                continue;
            }
            if job.queued_behind {
                self.waited(job.queued.elapsed());
            }
            (job.work)();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    use super::*;

    #[tokio::test]
    async fn a_call_runs_on_a_token_thread_and_returns_its_result() {
        let calls = CallThreads::start(2, Duration::from_secs(5)).unwrap();
        let name = calls
            .run(|| std::thread::current().name().map(str::to_owned))
            .await;
        assert!(
            matches!(&name, Offloaded::Done(Some(n)) if n.starts_with("pkcs11-call-")),
            "{name:?}"
        );
        for i in 0..50u64 {
            assert_eq!(calls.run(move || i * 2).await, Offloaded::Done(i * 2));
        }
    }

    /// A call holding the only thread until `release` is sent; returns
    /// once it is running.
    async fn hold(
        calls: &Arc<CallThreads>,
    ) -> (mpsc::Sender<()>, tokio::task::JoinHandle<Offloaded<bool>>) {
        let (release, stuck) = mpsc::channel::<()>();
        let (started, running) = oneshot::channel();
        let holder = {
            let calls = calls.clone();
            tokio::spawn(async move {
                calls
                    .run(move || {
                        let _ = started.send(());
                        stuck.recv().is_ok()
                    })
                    .await
            })
        };
        running.await.unwrap();
        (release, holder)
    }

    #[tokio::test]
    async fn with_every_thread_stuck_a_queued_call_times_out_and_is_never_made() {
        let calls = Arc::new(CallThreads::start(1, Duration::from_millis(100)).unwrap());
        let (release, holder) = hold(&calls).await;
        let made = Arc::new(AtomicBool::new(false));
        let flag = made.clone();
        let out = calls.run(move || flag.store(true, Ordering::SeqCst)).await;
        assert_eq!(out, Offloaded::TimedOut);
        assert_eq!(calls.stats().timed_out, 1);
        release.send(()).unwrap();
        assert_eq!(holder.await.unwrap(), Offloaded::Done(true));
        assert_eq!(calls.run(|| 7).await, Offloaded::Done(7));
        assert!(!made.load(Ordering::SeqCst), "a refused call ran");
    }

    #[tokio::test]
    async fn a_panicking_call_is_lost_and_the_thread_serves_on() {
        let calls = CallThreads::start(1, Duration::from_secs(5)).unwrap();
        let out: Offloaded<()> = calls.run(|| panic!("boom")).await;
        assert_eq!(out, Offloaded::Lost);
        assert_eq!(calls.run(|| 3).await, Offloaded::Done(3));
    }

    #[tokio::test]
    async fn a_call_whose_caller_went_away_is_skipped() {
        let calls = Arc::new(CallThreads::start(1, Duration::from_secs(5)).unwrap());
        let (release, holder) = hold(&calls).await;
        let made = Arc::new(AtomicBool::new(false));
        let flag = made.clone();
        let gone = calls.run(move || flag.store(true, Ordering::SeqCst));
        // Polled (queued), then dropped: the caller went away.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), gone)
                .await
                .is_err()
        );
        release.send(()).unwrap();
        assert_eq!(holder.await.unwrap(), Offloaded::Done(true));
        assert_eq!(calls.run(|| 1).await, Offloaded::Done(1));
        assert!(
            !made.load(Ordering::SeqCst),
            "a call of a caller that went away ran"
        );
    }
}
