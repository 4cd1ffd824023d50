//! The gRPC transport's defences against hostile or broken clients.
//!
//! - [`limits`]: message size and HTTP/2 limits fitted to the KMS v2 contract
//!   (a ciphertext and a key_id are at most 1 KiB, annotations at most
//!   32 KiB), a bounded number of concurrent streams per connection, HTTP/2
//!   keepalive pings that close half-open connections.
//! - [`Incoming`]: the accept loop. When the process is out of file
//!   descriptors (EMFILE/ENFILE) it backs off and logs instead of spinning.
//! - [`Conn`]: one accepted connection; closed after [`Limits::idle_timeout`]
//!   without a call in flight. What the client sends goes through
//!   [`authority::Shim`], which lets any `:authority` through to h2. What it
//!   answers waits one scheduler turn before the first write after a flush,
//!   so the responses of calls that are ready go out in one `writev`.
//! - [`CallTracker`]: a layer counting calls in flight (from the request
//!   headers on, so a call whose body has not arrived counts too), which lets
//!   shutdown stop at once when only idle connections are left.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::codegen::http;
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

pub mod authority;

/// The transport's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest gRPC message decoded or encoded. The largest valid request
    /// (Decrypt: 1 KiB ciphertext + 1 KiB key_id + 32 KiB annotations + uid)
    /// fits with room; tonic's default is 4 MiB.
    pub max_message: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS advertised to each connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list: u32,
    /// Initial HTTP/2 flow-control window per stream (bytes a client may
    /// send before we read them).
    pub stream_window: u32,
    /// Initial HTTP/2 flow-control window per connection.
    pub connection_window: u32,
    /// Send an HTTP/2 PING after this long without a frame from the client.
    pub keepalive_interval: Duration,
    /// Close the connection when a PING is not answered within this.
    pub keepalive_timeout: Duration,
    /// Close a connection that has had no call in flight for this long.
    pub idle_timeout: Duration,
    /// Longest a call may take (a client that never sends its body).
    pub call_timeout: Duration,
}

/// The limits `serve` uses (the idle timeout is `--idle-timeout`'s default).
pub fn limits() -> Limits {
    Limits {
        max_message: 64 * 1024,
        max_concurrent_streams: 128,
        max_header_list: 16 * 1024,
        stream_window: 64 * 1024,
        connection_window: 1024 * 1024,
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
        call_timeout: Duration::from_secs(30),
    }
}

/// Shared counters: open connections and calls in flight.
#[derive(Debug, Default)]
pub struct Tracker {
    connections: AtomicI64,
    in_flight: AtomicUsize,
}

impl Tracker {
    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Connections open now.
    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Acquire)
    }
}

/// Per-connection activity, shared by the connection and its calls.
#[derive(Debug)]
pub struct ConnActivity {
    epoch: Instant,
    /// Milliseconds since `epoch` when the last call started or ended.
    last_active_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl ConnActivity {
    fn new() -> Self {
        ConnActivity {
            epoch: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.store(ms, Ordering::Release);
    }

    /// When the connection may be closed as idle, or `None` while a call is in flight.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Acquire));
        Some(self.epoch + last + idle)
    }
}

/// One accepted connection.
#[derive(Debug)]
pub struct Conn {
    stream: UnixStream,
    shim: authority::Shim,
    activity: Arc<ConnActivity>,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
    idle_timer: Pin<Box<Sleep>>,
    /// The first write since the last flush has waited its turn (see
    /// [`Conn::wait_one_turn`]).
    waited_turn: bool,
}

impl Conn {
    fn new(
        stream: UnixStream,
        tracker: Arc<Tracker>,
        metrics: Arc<Metrics>,
        idle_timeout: Duration,
    ) -> Self {
        let open = tracker.connections.fetch_add(1, Ordering::AcqRel) + 1;
        metrics.set_connections(open);
        Conn {
            stream,
            shim: authority::Shim::new(),
            activity: Arc::new(ConnActivity::new()),
            tracker,
            metrics,
            idle_timeout,
            idle_timer: Box::pin(tokio::time::sleep(idle_timeout)),
            waited_turn: false,
        }
    }

    /// Whether this write waits one turn of the scheduler first: the first
    /// write after a flush does (the connection task wakes itself and
    /// returns `Pending`, which puts it behind the tasks already runnable),
    /// the rest until the next flush do not.
    ///
    /// Why: each call's response is produced by its own task, which wakes the
    /// connection task; tokio runs a task woken that way next (its LIFO
    /// slot), so h2 wrote every response with a `writev` of its own — one
    /// syscall, and one wake-up of the client, per call. Waiting one turn
    /// lets the other calls that are ready finish first, and h2 writes their
    /// responses together: at 16 callers about 7 responses per `writev`, 2–6 µs
    /// less plugin CPU per call in interleaved runs (README, kms-plugin
    /// benchmarks). A response waits at most for the tasks that were already
    /// runnable.
    fn wait_one_turn(&mut self, cx: &mut Context<'_>) -> bool {
        if self.waited_turn {
            return false;
        }
        self.waited_turn = true;
        cx.waker().wake_by_ref();
        true
    }

    /// Whether the idle timer says the connection should close now (and
    /// re-arms it otherwise, registering `cx` for the next deadline).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.idle_timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            match self.activity.idle_deadline(self.idle_timeout) {
                Some(deadline) if deadline <= Instant::now() => return true,
                Some(deadline) => self.idle_timer.as_mut().reset(deadline.into()),
                // Busy: look again one idle period from now.
                None => self
                    .idle_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.idle_timeout),
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let open = self.tracker.connections.fetch_sub(1, Ordering::AcqRel) - 1;
        self.metrics.set_connections(open);
    }
}

impl Connected for Conn {
    type ConnectInfo = Arc<ConnActivity>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.activity.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.shim.poll_read(&mut this.stream, cx, buf) {
            Poll::Pending => {
                if self.idle_expired(cx) {
                    tracing::debug!("closing a connection idle for the idle timeout");
                    // End of stream: the HTTP/2 connection closes.
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                }
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.wait_one_turn(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = ready!(Pin::new(&mut self.stream).poll_flush(cx));
        self.waited_turn = false;
        Poll::Ready(flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.wait_one_turn(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Shortest and longest pause after an accept failed for lack of resources.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this period while accepts keep failing.
const BACKOFF_LOG_EVERY: Duration = Duration::from_secs(10);

/// The accept loop as a stream of connections.
#[derive(Debug)]
pub struct Incoming {
    listener: UnixListener,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
    backoff: Option<Pin<Box<Sleep>>>,
    delay: Duration,
    failures: u64,
    last_log: Option<Instant>,
}

impl Incoming {
    /// Accepts from `listener`, counting into `tracker` and `metrics`.
    pub fn new(
        listener: UnixListener,
        tracker: Arc<Tracker>,
        metrics: Arc<Metrics>,
        limits: &Limits,
    ) -> Self {
        Incoming {
            listener,
            tracker,
            metrics,
            idle_timeout: limits.idle_timeout,
            backoff: None,
            delay: BACKOFF_MIN,
            failures: 0,
            last_log: None,
        }
    }

    fn out_of_resources(&mut self, error: &io::Error) {
        self.failures += 1;
        self.metrics.observe_accept_backoff();
        if self
            .last_log
            .is_none_or(|at| at.elapsed() >= BACKOFF_LOG_EVERY)
        {
            tracing::warn!(
                error = %error,
                failed_accepts = self.failures,
                retry_in = ?self.delay,
                open_connections = self.tracker.connections(),
                "cannot accept connections: out of file descriptors or memory; backing off"
            );
            self.last_log = Some(Instant::now());
        }
        self.backoff = Some(Box::pin(tokio::time::sleep(self.delay)));
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }
}

/// Errors that say "no resources now", which retrying at once cannot fix.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno) if [
            nix::errno::Errno::EMFILE as i32,
            nix::errno::Errno::ENFILE as i32,
            nix::errno::Errno::ENOBUFS as i32,
            nix::errno::Errno::ENOMEM as i32,
        ].contains(&libc_errno)
    )
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(sleep) = self.backoff.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                self.backoff = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) => {
                    if self.failures > 0 {
                        tracing::info!(
                            failed_accepts = self.failures,
                            "accepting connections again"
                        );
                        self.failures = 0;
                        self.last_log = None;
                    }
                    self.delay = BACKOFF_MIN;
                    let conn = Conn::new(
                        stream,
                        self.tracker.clone(),
                        self.metrics.clone(),
                        self.idle_timeout,
                    );
                    return Poll::Ready(Some(Ok(conn)));
                }
                Err(e) if is_resource_exhaustion(&e) => self.out_of_resources(&e),
                // Per-connection failures (the peer gave up): the server skips them.
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

/// A tower layer counting calls in flight, per connection and in total.
#[derive(Debug, Clone)]
pub struct CallTracker {
    tracker: Arc<Tracker>,
}

impl CallTracker {
    /// Counts into `tracker`.
    pub fn new(tracker: Arc<Tracker>) -> Self {
        CallTracker { tracker }
    }
}

impl<S> tower::Layer<S> for CallTracker {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Tracked {
            inner,
            tracker: self.tracker.clone(),
        }
    }
}

/// The service [`CallTracker`] wraps.
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
    tracker: Arc<Tracker>,
}

/// Counts one call in flight until dropped.
#[derive(Debug)]
struct InFlight {
    tracker: Arc<Tracker>,
    conn: Option<Arc<ConnActivity>>,
}

impl InFlight {
    fn new(tracker: Arc<Tracker>, conn: Option<Arc<ConnActivity>>) -> Self {
        tracker.in_flight.fetch_add(1, Ordering::AcqRel);
        if let Some(c) = &conn {
            c.in_flight.fetch_add(1, Ordering::AcqRel);
            c.touch();
        }
        InFlight { tracker, conn }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            c.touch();
            c.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        self.tracker.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, B> tower::Service<http::Request<B>> for Tracked<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let conn = request.extensions().get::<Arc<ConnActivity>>().cloned();
        let guard = InFlight::new(self.tracker.clone(), conn);
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            drop(guard);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_resource_exhaustion_backs_off() {
        for errno in [
            nix::errno::Errno::EMFILE,
            nix::errno::Errno::ENFILE,
            nix::errno::Errno::ENOBUFS,
            nix::errno::Errno::ENOMEM,
        ] {
            assert!(is_resource_exhaustion(&io::Error::from(errno)), "{errno}");
        }
        for errno in [nix::errno::Errno::ECONNABORTED, nix::errno::Errno::EINTR] {
            assert!(!is_resource_exhaustion(&io::Error::from(errno)), "{errno}");
        }
    }

    /// Counts the wake-ups of a task.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn the_first_write_after_a_flush_waits_one_turn_and_loses_nothing() {
        let (ours, mut peer) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(
            ours,
            Arc::new(Tracker::default()),
            Arc::new(Metrics::new()),
            Duration::from_secs(60),
        );
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut conn = Pin::new(&mut conn);

        // The first write yields: the task is woken to run again after the
        // tasks already runnable, and nothing is written yet.
        assert!(conn.as_mut().poll_write(&mut cx, b"one").is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // Then it and every write until the flush go straight through.
        assert!(matches!(
            conn.as_mut().poll_write(&mut cx, b"one"),
            Poll::Ready(Ok(3))
        ));
        let bufs = [io::IoSlice::new(b"tw"), io::IoSlice::new(b"o")];
        assert!(matches!(
            conn.as_mut().poll_write_vectored(&mut cx, &bufs),
            Poll::Ready(Ok(3))
        ));
        assert!(matches!(
            conn.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        // After a flush the next first write waits again, vectored or not.
        let bufs = [io::IoSlice::new(b"three")];
        assert!(
            conn.as_mut()
                .poll_write_vectored(&mut cx, &bufs)
                .is_pending()
        );
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert!(matches!(
            conn.as_mut().poll_write_vectored(&mut cx, &bufs),
            Poll::Ready(Ok(5))
        ));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);

        let mut got = [0u8; 11];
        tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"onetwothree");
    }

    #[test]
    fn a_connection_is_idle_only_without_calls_in_flight() {
        let activity = ConnActivity::new();
        let idle = Duration::from_secs(300);
        let first = activity.idle_deadline(idle).unwrap();
        assert!(first <= Instant::now() + idle);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        assert_eq!(activity.idle_deadline(idle), None);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        std::thread::sleep(Duration::from_millis(5));
        activity.touch();
        assert!(activity.idle_deadline(idle).unwrap() > first);
    }
}
