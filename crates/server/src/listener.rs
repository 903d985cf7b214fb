//! The HTTP server under the router: accepting connections, and the
//! bounds and deadlines that keep a few thousand slow or silent sockets
//! (slowloris, slow bodies, idle keep-alives) from starving Digishare's
//! webhooks.
//!
//! hyper parses HTTP/1.1; around it this module owns:
//!
//! - **a bound on open connections**: past [`HttpLimits::max_connections`]
//!   a new connection is answered a canned `503` with `Retry-After: 1` and
//!   closed at once, without a task or a read;
//! - **per-connection deadlines**, on the socket itself ([`Deadlines`]): a
//!   connection must deliver a complete request head within
//!   [`HttpLimits::header_timeout`] of opening, or of the first byte of its
//!   next request; a keep-alive connection with no request, or a client
//!   that stops reading its answer, is closed after
//!   [`HttpLimits::idle_timeout`] without progress. While a request is
//!   being handled no connection deadline runs (its body has its own);
//! - **a total deadline on each request body** ([`DeadlineBody`]): the
//!   whole body within [`HttpLimits::body_timeout`] of the head, however
//!   slowly it trickles;
//! - **graceful shutdown**: on the signal, stop accepting, let requests in
//!   flight finish (idle connections close at once), for up to
//!   [`HttpLimits::shutdown_grace`].
//!
//! The bound on requests in flight is a router layer (`crate::app`), so
//! that health probes stay outside it.

use crate::metrics::HTTP_REFUSED;
use axum::Router;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// The HTTP edge's bounds and deadlines.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// A complete request head within this of the connection opening (or
    /// of the first byte of the next request on a kept-alive connection).
    pub header_timeout: Duration,
    /// A whole request body within this of its head.
    pub body_timeout: Duration,
    /// A connection with nothing going on for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Requests being handled at once (health probes aside); more are
    /// answered 503 at once.
    pub max_in_flight: usize,
    /// Largest request head (request line and headers), in bytes: hyper's
    /// read buffer, so also what one silent connection can make the
    /// server hold.
    pub max_header_bytes: usize,
    /// How long a shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_in_flight: 1024,
            max_header_bytes: 32 << 10,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Connections the kernel queues until they are accepted (capped by
/// `net.core.somaxconn`). A burst (a thousand sockets opened at once by
/// a slowloris, then Digishare's webhook) must not find the queue full:
/// the kernel would drop the SYN, and the client would retry only after
/// a second or more.
const ACCEPT_BACKLOG: u32 = 4096;

/// Binds `addr` for [`serve`], with a deep accept queue.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do: a restart can bind while old connections of
    // the previous process linger in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// What a connection over [`HttpLimits::max_connections`] is answered,
/// before it is closed. Digishare retries a 503.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 43\r\n\
\r\n\
{\"error\":\"too many connections; try again\"}";

/// Counts a connection or request refused at the edge, by `reason`.
fn refused(reason: &'static str) {
    metrics::counter!(HTTP_REFUSED, "reason" => reason).increment(1);
}

/// Serves `router` on `listener` within `limits` until `shutdown`
/// completes, then drains (see the module doc).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's own header timer stays off (no timer given): the deadlines
    // here cover the head, idle keep-alives and stalled writes in one
    // place. The read buffer bounds the head (431 above it).
    http.max_buf_size(limits.max_header_bytes.max(8192));
    let limits = Arc::new(limits);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset while
                    // queued: keep serving the others.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refused("connections");
            // Into the empty send buffer of a fresh socket: never blocks.
            let _ = stream.try_write(TOO_MANY_CONNECTIONS);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let clock = Arc::new(Clock::new(&limits));
        let io = TokioIo::new(Deadlines::new(stream, clock.clone()));
        let service = hyper::service::service_fn({
            let router = router.clone();
            let body_timeout = limits.body_timeout;
            move |request: hyper::Request<Incoming>| {
                clock.request_started();
                let request = request.map(|body| DeadlineBody::new(body, body_timeout));
                let router = router.clone();
                let clock = clock.clone();
                async move {
                    let response = router.oneshot(request).await;
                    clock.request_done();
                    response
                }
            }
        });
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            // Errors are the client's (reset, timed out, bad request).
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_s = limits.shutdown_grace.as_secs(),
            "connections still open after the grace period are dropped"
        );
    }
}

/// Where a connection is, for its deadline.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for (the rest of) a request head, since then.
    Head(Instant),
    /// A request is being handled: no connection deadline.
    Busy,
    /// Between requests, or writing an answer: last progress then.
    Idle(Instant),
}

/// One connection's phase, moved by its socket (bytes read or written)
/// and by its service (a request starts, its answer is ready).
struct Clock {
    phase: Mutex<Phase>,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// The connection's task, when it last found no deadline to wait for
    /// (a request was being handled): woken when the request is done, so
    /// that the idle deadline is armed even if nothing else wakes it.
    parked: Mutex<Option<std::task::Waker>>,
}

impl Clock {
    fn new(limits: &HttpLimits) -> Clock {
        Clock {
            phase: Mutex::new(Phase::Head(Instant::now())),
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            parked: Mutex::new(None),
        }
    }

    fn set(&self, f: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        *phase = f(*phase);
    }

    fn request_started(&self) {
        self.set(|_| Phase::Busy);
    }

    fn request_done(&self) {
        self.set(|_| Phase::Idle(Instant::now()));
        let parked = self.parked.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waker) = parked {
            waker.wake();
        }
    }

    /// Remembers the task to wake when a deadline starts again.
    fn park(&self, waker: &std::task::Waker) {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        if !parked.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *parked = Some(waker.clone());
        }
    }

    /// Bytes arrived: an idle connection starts a request head.
    fn read_progress(&self) {
        self.set(|phase| match phase {
            Phase::Idle(_) => Phase::Head(Instant::now()),
            other => other,
        });
    }

    /// Bytes left: an answer being written makes progress.
    fn write_progress(&self) {
        self.set(|phase| match phase {
            Phase::Idle(_) => Phase::Idle(Instant::now()),
            other => other,
        });
    }

    /// When the connection is closed unless it makes progress, and why.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        match *self.phase.lock().unwrap_or_else(|e| e.into_inner()) {
            Phase::Head(since) => Some((since + self.header_timeout, "header_timeout")),
            Phase::Busy => None,
            Phase::Idle(since) => Some((since + self.idle_timeout, "idle")),
        }
    }
}

/// A socket that fails with `TimedOut` once its connection's [`Clock`]
/// deadline passes while hyper waits on it: hyper then closes it.
struct Deadlines {
    stream: TcpStream,
    clock: Arc<Clock>,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

impl Deadlines {
    fn new(stream: TcpStream, clock: Arc<Clock>) -> Deadlines {
        Deadlines {
            stream,
            clock,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: None,
        }
    }

    /// Called when the socket is not ready: the error that closes the
    /// connection once its deadline has passed, else `None` (and the task
    /// is woken by the socket or by the timer).
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let Some((deadline, why)) = self.clock.deadline() else {
            self.clock.park(cx.waker());
            return None;
        };
        if self.armed != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        self.timer.as_mut().poll(cx).is_ready().then(|| {
            if why == "header_timeout" {
                refused(why);
            }
            std::io::Error::new(std::io::ErrorKind::TimedOut, why)
        })
    }
}

impl AsyncRead for Deadlines {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.clock.read_progress();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self
                .expired(cx)
                .map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }
}

impl AsyncWrite for Deadlines {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.clock.write_progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self
                .expired(cx)
                .map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.clock.write_progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self
                .expired(cx)
                .map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Pending => self
                .expired(cx)
                .map_or(Poll::Pending, |e| Poll::Ready(Err(e))),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A request body read past its deadline ([`HttpLimits::body_timeout`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", .0.as_secs())]
pub struct BodyTimeout(pub Duration);

/// A request body that fails with [`BodyTimeout`] once `timeout` has
/// passed since the request's head, however it trickles in. The timer is
/// only set if the body is ever not ready (most arrive with their head).
pub struct DeadlineBody<B> {
    inner: B,
    started: Instant,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// The timeout was reported: the body ends there.
    expired: bool,
}

impl<B> DeadlineBody<B> {
    pub fn new(inner: B, timeout: Duration) -> DeadlineBody<B> {
        DeadlineBody {
            inner,
            started: Instant::now(),
            timeout,
            timer: None,
            expired: false,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.started + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.expired = true;
                refused("body_timeout");
                Poll::Ready(Some(Err(Box::new(BodyTimeout(self.timeout)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `error`, or anything it wraps, is a [`BodyTimeout`].
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTimeout>() {
            return true;
        }
        current = e.source();
    }
    false
}
