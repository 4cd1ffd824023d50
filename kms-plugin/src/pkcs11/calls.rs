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
//!
//! The wait is kept without a timer per call: a thread that takes a call
//! queued longer than the wait refuses it instead, and a watch thread,
//! awake only while calls wait behind busy threads, refuses the oldest ones
//! when their wait is over and no thread has come for them.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// A queued call and the channel to its caller.
trait Call: Send {
    /// Its caller still waits for it.
    fn wanted(&self) -> bool;
    /// Makes the call and answers the caller.
    fn run(self: Box<Self>);
    /// Answers the caller that the call was not made.
    fn refuse(self: Box<Self>);
}

struct Pending<F, T> {
    call: F,
    answer: oneshot::Sender<Offloaded<T>>,
}

impl<F: FnOnce() -> T + Send, T: Send> Call for Pending<F, T> {
    fn wanted(&self) -> bool {
        !self.answer.is_closed()
    }

    fn run(self: Box<Self>) {
        let Pending { call, answer } = *self;
        let out = catch_unwind(AssertUnwindSafe(call)).map_or(Offloaded::Lost, Offloaded::Done);
        let _ = answer.send(out);
    }

    fn refuse(self: Box<Self>) {
        let _ = self.answer.send(Offloaded::TimedOut);
    }
}

struct Job {
    queued: Instant,
    /// Every thread was busy (or already woken for other calls) when it
    /// arrived: it waits in the queue.
    queued_behind: bool,
    call: Box<dyn Call>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    sleeping: usize,
    /// Wake-ups sent and not yet taken by a sleeping thread.
    waking: usize,
    /// The watch thread keeps an eye on the queue (else it sleeps until a
    /// call queues behind busy threads).
    watching: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Wakes the watch thread.
    watch: Condvar,
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

impl CallThreads {
    /// Starts `threads` threads (at least one) and the watch thread; a call
    /// waits at most `wait` in the queue.
    pub fn start(threads: usize, wait: Duration) -> std::io::Result<CallThreads> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            watch: Condvar::new(),
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
        let watched = shared.clone();
        std::thread::Builder::new()
            .name("pkcs11-call-watch".to_owned())
            .spawn(move || watched.watch())?;
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
    /// async worker. Dropping the future before a thread takes the call
    /// means it is never made.
    pub async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> Offloaded<T> {
        let (answer, out) = oneshot::channel();
        if !self.shared.push(Box::new(Pending { call, answer })) {
            self.shared.timed_out.fetch_add(1, Ordering::Relaxed);
            return Offloaded::TimedOut;
        }
        out.await.unwrap_or(Offloaded::Lost)
    }
}

impl Shared {
    /// Queues a call; `false` when the queue is full.
    fn push(&self, call: Box<dyn Call>) -> bool {
        let queued = Instant::now();
        let (wake, watch) = {
            let mut q = lock(&self.queue);
            if q.jobs.len() >= MAX_QUEUED {
                q.jobs.retain(|j| j.call.wanted());
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
            // A call behind busy threads has its wait watched.
            let watch = !wake && !q.watching;
            if watch {
                q.watching = true;
            }
            q.jobs.push_back(Job {
                queued,
                queued_behind: !wake,
                call,
            });
            (wake, watch)
        };
        if wake {
            self.ready.notify_one();
        }
        if watch {
            self.watch.notify_one();
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

    /// Refuses a call that waited the whole wait.
    fn refuse(&self, job: Job) {
        self.waited(self.wait);
        self.timed_out.fetch_add(1, Ordering::Relaxed);
        job.call.refuse();
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
            if !job.call.wanted() {
                // Its caller went away.
                continue;
            }
            let waited = job.queued.elapsed();
            if waited >= self.wait {
                self.refuse(job);
                continue;
            }
            if job.queued_behind {
                self.waited(waited);
            }
            job.call.run();
        }
    }

    /// The watch thread: refuses the calls that waited the whole wait with
    /// no thread free to take them (every one stuck in a slow token).
    fn watch(&self) {
        let mut q = lock(&self.queue);
        loop {
            if !q.watching {
                q = self.watch.wait(q).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let Some(oldest) = q.jobs.front().map(|j| j.queued) else {
                // Nothing waits: sleep until a call queues behind busy
                // threads again.
                q.watching = false;
                continue;
            };
            let waited = oldest.elapsed();
            if waited >= self.wait {
                if let Some(job) = q.jobs.pop_front() {
                    drop(q);
                    if job.call.wanted() {
                        self.refuse(job);
                    }
                    q = lock(&self.queue);
                }
                continue;
            }
            q = self
                .watch
                .wait_timeout(q, self.wait - waited)
                .unwrap_or_else(|p| p.into_inner())
                .0;
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
        // Twice: the watch thread goes back to sleep after the first stall
        // and must wake for the second.
        for stall in 1..=2u64 {
            let (release, holder) = hold(&calls).await;
            let made = Arc::new(AtomicBool::new(false));
            let flag = made.clone();
            let out = tokio::time::timeout(
                Duration::from_secs(10),
                calls.run(move || flag.store(true, Ordering::SeqCst)),
            )
            .await;
            assert_eq!(out, Ok(Offloaded::TimedOut), "stall {stall}");
            assert_eq!(calls.stats().timed_out, stall);
            release.send(()).unwrap();
            assert_eq!(holder.await.unwrap(), Offloaded::Done(true));
            assert_eq!(calls.run(|| 7).await, Offloaded::Done(7));
            assert!(
                !made.load(Ordering::SeqCst),
                "a refused call ran (stall {stall})"
            );
        }
    }

    #[tokio::test]
    async fn a_call_queued_behind_a_busy_thread_runs_when_it_frees_within_the_wait() {
        let calls = Arc::new(CallThreads::start(1, Duration::from_secs(5)).unwrap());
        let (release, holder) = hold(&calls).await;
        // (The holder itself may have found the thread not yet asleep.)
        let before = calls.stats();
        let queued = {
            let calls = calls.clone();
            tokio::spawn(async move { calls.run(|| 11).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(()).unwrap();
        assert_eq!(holder.await.unwrap(), Offloaded::Done(true));
        assert_eq!(queued.await.unwrap(), Offloaded::Done(11));
        let stats = calls.stats();
        assert_eq!(stats.timed_out, 0);
        assert_eq!(stats.waits, before.waits + 1, "{before:?} {stats:?}");
        assert!(
            stats.waited >= before.waited + Duration::from_millis(40),
            "{before:?} {stats:?}"
        );
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
