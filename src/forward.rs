//! One proxied connection, from accepted socket to access-log line.
//!
//! `serve` runs in its own task: it picks a backend with the listener's pool, connects
//! (retrying other backends up to `connect_attempts`, each attempt bounded by
//! `connect_timeout`), relays bytes both ways with [`relay`] until both directions are done,
//! and writes one log line with the close reason. The snapshot it was handed at accept time
//! is kept for the whole connection, so a reload only affects new connections.
//!
//! The copy loops are the hot path: [`relay_tcp`] for passthrough (TCP to TCP, splice(2)
//! for bulk bytes on Linux) and [`relay`] for terminate (TLS streams on both sides). Both
//! are readiness-driven: while a connection is idle it holds no buffer or pipe (an idle
//! watch costs two sockets and a small task); a buffer or pipe is borrowed from a per-thread
//! pool only once a socket is readable, and returned as soon as those bytes are written.
//! Nothing in the loops touches metrics, logs or configuration; byte counts are read once at
//! the end.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::balance::Backend;
use crate::connect::{connect, ConnectError};
use crate::listener::ListenerState;

// === Close reasons ===

/// Why a proxied connection ended: the `end` field of the access log (SPEC §3, Logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client finished first (EOF), and the backend then finished too.
    ClientClosed,
    /// The backend finished first (EOF), and the client then finished too.
    BackendClosed,
    /// No byte in either direction for `idle_timeout`.
    IdleTimeout,
    /// Still open when the drain deadline passed (shutdown, or a removed backend).
    Drained,
    /// No backend could be connected to.
    ConnectFailed,
    /// A socket error such as a reset.
    Error,
}

impl End {
    /// The ends of a connection that reached a backend, in the order of
    /// `ListenerMetrics::closed`.
    pub const PROXIED: [Self; 5] = [
        Self::ClientClosed,
        Self::BackendClosed,
        Self::IdleTimeout,
        Self::Drained,
        Self::Error,
    ];

    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::BackendClosed => "backend_closed",
            Self::IdleTimeout => "idle_timeout",
            Self::Drained => "drained",
            Self::ConnectFailed => "connect_failed",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === Socket options ===

/// Keepalive and user-timeout settings: a peer that vanished under a quiet watch is noticed
/// within about a minute instead of the kernel's default two hours (SPEC §3).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets NODELAY, keepalive and TCP_USER_TIMEOUT; a failure is logged and the connection goes
/// on, since none of these is needed for correctness. Listening sockets get the options once,
/// and Linux copies them to every accepted socket; backend sockets get them before connect.
pub(crate) fn tune(sock: SockRef<'_>, role: &'static str) {
    if let Err(e) = sock.set_tcp_nodelay(true) {
        tracing::debug!(role, error = %e, "cannot set TCP_NODELAY");
    }
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(role, error = %e, "cannot set TCP keepalive");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!(role, error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

// === One connection ===

/// Serves one accepted passthrough connection to completion.
pub(crate) async fn serve(client: TcpStream, client_addr: SocketAddr, state: Arc<ListenerState>) {
    let started = Instant::now();
    // The client socket inherited NODELAY, keepalive and TCP_USER_TIMEOUT from the
    // listening socket (listener::bind): no syscalls for them per connection.
    // Boxed: connecting needs more state than relaying (88 bytes more), and a task is as
    // large as its largest state for its whole life. This allocation is freed once connected.
    let connected = Box::pin(async {
        tokio::select! {
            r = connect(&state.pool, client_addr, &state.cfg.name, |_, tcp| async move { Ok(tcp) }) => r,
            () = state.drain.cancelled() => Err(ConnectError::Draining),
        }
    })
    .await;
    let (backend_stream, guard) = match connected {
        Ok(c) => c,
        Err(e) => {
            log_connect_failed(&state, client_addr, started, &e);
            return;
        }
    };
    let drain = drained(&state.drain, &guard.backend().drain);
    let r = relay_tcp(client, backend_stream, state.cfg.idle_timeout, drain).await;
    log_close(&state, client_addr, guard.backend(), started, &r);
}

/// Completes when the connection must end: its listener or its backend is drained.
pub(crate) fn drained<'a>(
    listener: &'a CancellationToken,
    backend: &'a CancellationToken,
) -> Drained<'a> {
    Drained {
        listener: listener.cancelled(),
        backend: backend.cancelled(),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`drained`]: two waits side by side, no larger than they are.
    pub(crate) struct Drained<'a> {
        #[pin]
        listener: WaitForCancellationFuture<'a>,
        #[pin]
        backend: WaitForCancellationFuture<'a>,
    }
}

impl Future for Drained<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.listener.poll(cx).is_ready() || this.backend.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// The access-log line of a client that never reached a backend, and its counter.
pub(crate) fn log_connect_failed(
    state: &ListenerState,
    client: SocketAddr,
    started: Instant,
    error: &ConnectError,
) {
    match error.cause() {
        Some(crate::metrics::CAUSE_CLIENT) => state.metrics.connect_client.inc(),
        Some(_) => state.metrics.connect_local.inc(),
        None => state.metrics.rejected_no_backend.inc(),
    }
    tracing::info!(
        target: "apilb::access",
        listener = %state.cfg.name,
        client = %client,
        backend = "-",
        duration_ms = duration_ms(started),
        bytes_up = 0u64,
        bytes_down = 0u64,
        end = %End::ConnectFailed,
        error = %error,
        "connection closed"
    );
}

/// The access-log line of a proxied connection, and its byte counters.
pub(crate) fn log_close(
    state: &ListenerState,
    client: SocketAddr,
    backend: &Backend,
    started: Instant,
    r: &Relayed,
) {
    backend.metrics.bytes_up.inc_by(r.up);
    backend.metrics.bytes_down.inc_by(r.down);
    state
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    if let Some(i) = End::PROXIED.iter().position(|e| *e == r.end) {
        state.metrics.closed[i].inc();
    }
    let error = r.error.as_ref().map(ToString::to_string);
    tracing::info!(
        target: "apilb::access",
        listener = %state.cfg.name,
        client = %client,
        backend = %backend.name,
        duration_ms = duration_ms(started),
        bytes_up = r.up,
        bytes_down = r.down,
        end = %r.end,
        error = error.as_deref(),
        "connection closed"
    );
}

fn duration_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

// === The copy loops ===

/// What a relay saw.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes from client to backend.
    pub up: u64,
    /// Bytes from backend to client.
    pub down: u64,
    /// Why it ended.
    pub end: End,
    /// The socket error, when `end` is [`End::Error`].
    pub error: Option<io::Error>,
}

/// Whether TCP-to-TCP relays may use splice(2) (Linux). On by default; tests turn it off to
/// exercise the buffer copy.
static SPLICE: AtomicBool = AtomicBool::new(true);

/// Pipes kept in the calling thread's splice pool: above zero once a relay on this thread has
/// moved bytes with splice(2) (for tests and diagnostics; 0 off Linux).
pub fn pooled_pipes() -> usize {
    #[cfg(target_os = "linux")]
    {
        splice::pooled()
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// Chooses whether TCP-to-TCP relays started from now on may switch to zero-copy splice for
/// bulk transfers (default) or always copy through a buffer.
pub fn set_splice(enabled: bool) {
    SPLICE.store(enabled, Ordering::Relaxed);
}

/// Relays bytes both ways between two TCP sockets (passthrough) until both directions
/// reached EOF, an error occurs, nothing moved for `idle`, or `drain` completes.
///
/// This is the hot path, written as one poll function over plain state rather than nested
/// futures, because its state is most of what an idle connection costs: the whole future is
/// a few hundred bytes, and holds no buffer or pipe while nothing is in flight. Each
/// direction copies small reads through a pooled buffer (a read shorter than the buffer
/// means the socket is drained, so the next message costs two syscalls, not three) and
/// switches to splice(2) through a pooled pipe once a read fills the buffer, so bulk bytes
/// never enter user space; a short splice switches it back.
///
/// Half-close is propagated: EOF from one side shuts down writing towards the other, and the
/// other direction keeps flowing.
pub fn relay_tcp<D: Future<Output = ()>>(
    client: TcpStream,
    backend: TcpStream,
    idle: Duration,
    drain: D,
) -> RelayTcp<D> {
    let start = Instant::now();
    let splice = SPLICE.load(Ordering::Relaxed);
    RelayTcp {
        client,
        backend,
        up: Flow::new(splice),
        down: Flow::new(splice),
        clock: Clock { start, last_ms: 0 },
        first_eof: None,
        idle,
        idle_sleep: tokio::time::sleep_until(tokio::time::Instant::from_std(start) + idle),
        drain: Watched::new(drain),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`relay_tcp`]: a plain struct rather than an `async fn`, whose
    /// arguments and locals the compiler would both keep.
    pub struct RelayTcp<D> {
        client: TcpStream,
        backend: TcpStream,
        up: Flow,
        down: Flow,
        clock: Clock,
        first_eof: Option<End>,
        idle: Duration,
        #[pin]
        idle_sleep: tokio::time::Sleep,
        #[pin]
        drain: Watched<D>,
    }
}

impl<D: Future<Output = ()>> Future for RelayTcp<D> {
    type Output = Relayed;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Relayed> {
        let mut this = self.project();
        let end = 'end: {
            for flow_up in [true, false] {
                let (flow, other, from, to, eof) = if flow_up {
                    let (f, o) = (&mut *this.up, &*this.down);
                    (f, o.done, &*this.client, &*this.backend, End::ClientClosed)
                } else {
                    let (f, o) = (&mut *this.down, &*this.up);
                    (f, o.done, &*this.backend, &*this.client, End::BackendClosed)
                };
                if flow.done {
                    continue;
                }
                // When the other direction is done too, both sockets are closed next, which
                // sends the FIN without a shutdown call of its own.
                match flow.poll(cx, from, to, !other, this.clock) {
                    Poll::Ready(Ok(())) => {
                        flow.done = true;
                        this.first_eof.get_or_insert(eof);
                    }
                    Poll::Ready(Err(e)) => break 'end (End::Error, Some(e)),
                    Poll::Pending => {}
                }
            }
            if this.up.done && this.down.done {
                break 'end (this.first_eof.unwrap_or(End::ClientClosed), None);
            }
            // Activity only stores a timestamp; the timer re-arms from it when it fires.
            while this.idle_sleep.as_mut().poll(cx).is_ready() {
                let next = this.clock.last() + *this.idle;
                if next <= tokio::time::Instant::now() {
                    break 'end (End::IdleTimeout, None);
                }
                this.idle_sleep.as_mut().reset(next);
            }
            if this.drain.as_mut().poll(cx).is_ready() {
                break 'end (End::Drained, None);
            }
            return Poll::Pending;
        };
        Poll::Ready(Relayed {
            up: this.up.bytes,
            down: this.down.bytes,
            end: end.0,
            error: end.1,
        })
    }
}

pin_project_lite::pin_project! {
    /// A relay's drain future, polled only when it asked to be: on the first poll and after
    /// it woke the task. Polling a cancellation wait takes two mutexes that every connection
    /// of the listener (or backend) shares, and a relay is polled on every readiness event;
    /// this keeps the data path free of shared locks, at one small allocation per connection.
    struct Watched<D> {
        #[pin]
        inner: D,
        wake: Arc<DrainWake>,
        armed: bool,
    }
}

/// The waker a [`Watched`] future gives its inner future: notes that it fired, then wakes
/// the task.
#[derive(Default)]
struct DrainWake {
    fired: AtomicBool,
    task: atomic_waker::AtomicWaker,
}

impl std::task::Wake for DrainWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<D> Watched<D> {
    fn new(inner: D) -> Self {
        Self {
            inner,
            wake: Arc::default(),
            armed: false,
        }
    }
}

impl<D: Future<Output = ()>> Future for Watched<D> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // Register before looking at `fired`: a wake between the two is then not lost.
        this.wake.task.register(cx.waker());
        if *this.armed && !this.wake.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        *this.armed = true;
        let waker = std::task::Waker::from(this.wake.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

/// When a relay last read anything, in milliseconds since it started.
struct Clock {
    start: Instant,
    last_ms: u64,
}

impl Clock {
    fn stamp(&mut self) {
        self.last_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
    }

    fn last(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.start) + Duration::from_millis(self.last_ms)
    }
}

/// Bytes read but not yet written by one direction of [`relay_tcp`].
enum Held {
    Nothing,
    #[cfg(target_os = "linux")]
    Pipe {
        pipe: splice::Pipe,
        len: usize,
    },
    Buf {
        buf: Box<[u8]>,
        off: usize,
        len: usize,
    },
}

/// One direction of [`relay_tcp`].
struct Flow {
    held: Held,
    /// Allowed to splice at all.
    splice: bool,
    /// Moving bulk bytes: splice instead of copying.
    bulk: bool,
    /// EOF was read and passed on.
    done: bool,
    bytes: u64,
}

/// A splice that moves less than this switches its direction back to copying: small
/// messages are cheaper through a buffer (see [`relay_tcp`]).
#[cfg(target_os = "linux")]
const SMALL_SPLICE: usize = 4096;

impl Flow {
    fn new(splice: bool) -> Self {
        Self {
            held: Held::Nothing,
            splice,
            bulk: false,
            done: false,
            bytes: 0,
        }
    }

    /// Moves bytes from `from` to `to` until `from` would block (Pending) or reached EOF and
    /// `to` was shut down for writing if `pass_eof` (Ready(Ok)).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        pass_eof: bool,
        clock: &mut Clock,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.flush(cx, to))?;
            ready!(from.poll_read_ready(cx))?;
            #[cfg(target_os = "linux")]
            if self.bulk {
                // Out of descriptors for a pipe: this round goes through a buffer.
                if let Ok(pipe) = splice::take() {
                    match from.try_io(Interest::READABLE, || splice::fill(from, &pipe)) {
                        Ok(0) => {
                            splice::put(pipe);
                            return eof_reached(to, pass_eof);
                        }
                        Ok(len) => {
                            clock.stamp();
                            self.bulk = len >= SMALL_SPLICE;
                            self.held = Held::Pipe { pipe, len };
                        }
                        Err(e) => {
                            splice::put(pipe);
                            if !retry(&e) {
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
                    continue;
                }
                self.bulk = false;
            }
            let mut buf = BufPool::take();
            match read_draining(from, &mut buf) {
                Ok(0) => {
                    BufPool::put(buf);
                    return eof_reached(to, pass_eof);
                }
                Ok(got) => {
                    clock.stamp();
                    self.bulk = self.splice && got == buf.len();
                    self.held = Held::Buf {
                        buf,
                        off: 0,
                        len: got,
                    };
                }
                Err(e) => {
                    BufPool::put(buf);
                    if !retry(&e) {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }

    /// Writes what is held to `to`, then returns the buffer or pipe to its pool.
    fn flush(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<io::Result<()>> {
        let Self { held, bytes, .. } = self;
        match held {
            Held::Nothing => return Poll::Ready(Ok(())),
            #[cfg(target_os = "linux")]
            Held::Pipe { pipe, len } => {
                while *len > 0 {
                    ready!(to.poll_write_ready(cx))?;
                    // On an error the pipe still holds bytes: it is dropped, not pooled.
                    match to.try_io(Interest::WRITABLE, || splice::drain(pipe, to, *len)) {
                        Ok(k) => {
                            *len -= k;
                            *bytes += k as u64;
                        }
                        Err(e) if retry(&e) => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
            Held::Buf { buf, off, len } => {
                while *off < *len {
                    ready!(to.poll_write_ready(cx))?;
                    match to.try_write(&buf[*off..*len]) {
                        Ok(k) => {
                            *off += k;
                            *bytes += k as u64;
                        }
                        Err(e) if retry(&e) => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
        }
        match std::mem::replace(held, Held::Nothing) {
            #[cfg(target_os = "linux")]
            Held::Pipe { pipe, .. } => splice::put(pipe),
            Held::Buf { buf, .. } => BufPool::put(buf),
            Held::Nothing => {}
        }
        Poll::Ready(Ok(()))
    }
}

/// One read from a socket tokio saw readable. A read shorter than `buf` leaves the socket
/// drained, so tokio is told to forget the readiness (by answering WouldBlock inside
/// `try_io`, with the bytes kept aside): the next poll then waits for the next event instead
/// of spending a syscall on a read that would fail.
fn read_draining(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    let r = from.try_io(Interest::READABLE, || {
        got = rustix::io::read(from, &mut *buf)?;
        if got > 0 && got < buf.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match r {
        _ if got > 0 => Ok(got),
        Ok(()) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Errors after which the same call is simply tried again.
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// A direction's end: passes EOF on when asked. The peer may already be gone; its own
/// direction reports that.
fn eof_reached(to: &TcpStream, pass_eof: bool) -> Poll<io::Result<()>> {
    if pass_eof {
        let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
    }
    Poll::Ready(Ok(()))
}

/// Relays bytes both ways between any two byte streams (terminate: TLS on both sides) with
/// the same ends as [`relay_tcp`]: both EOFs, an error, `idle` without a byte, or `drain`.
/// EOF from one side shuts down writing towards the other (for TLS: close_notify), and the
/// other direction keeps flowing.
pub async fn relay<CR, CW, BR, BW>(
    mut client_r: CR,
    mut client_w: CW,
    mut backend_r: BR,
    mut backend_w: BW,
    idle: Duration,
    drain: impl Future<Output = ()>,
) -> Relayed
where
    CR: AsyncRead + Unpin,
    BR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    BW: AsyncWrite + Unpin,
{
    let start = Instant::now();
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    // Milliseconds since `start` of the last read; the idle timer re-arms from it when it
    // fires, so activity costs one relaxed store and no timer reset.
    let last_ms = AtomicU64::new(0);

    let mut up = pin!(pump(
        &mut client_r,
        &mut backend_w,
        &up_bytes,
        &last_ms,
        start
    ));
    let mut down = pin!(pump(
        &mut backend_r,
        &mut client_w,
        &down_bytes,
        &last_ms,
        start
    ));
    let mut up_done = false;
    let mut down_done = false;
    let mut first_eof: Option<End> = None;
    let idle_sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(start) + idle);
    let mut idle_sleep = pin!(idle_sleep);
    let mut drain = pin!(Watched::new(drain));

    let (end, error) = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => {
                    up_done = true;
                    first_eof.get_or_insert(End::ClientClosed);
                    if down_done { break (first_eof.unwrap_or(End::ClientClosed), None); }
                }
                Err(e) => break (End::Error, Some(e)),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => {
                    down_done = true;
                    first_eof.get_or_insert(End::BackendClosed);
                    if up_done { break (first_eof.unwrap_or(End::BackendClosed), None); }
                }
                Err(e) => break (End::Error, Some(e)),
            },
            () = &mut idle_sleep => {
                let last = tokio::time::Instant::from_std(start)
                    + Duration::from_millis(last_ms.load(Ordering::Relaxed));
                let next = last + idle;
                if next <= tokio::time::Instant::now() {
                    break (End::IdleTimeout, None);
                }
                idle_sleep.as_mut().reset(next);
            },
            () = &mut drain => break (End::Drained, None),
        }
    };
    Relayed {
        up: up_bytes.load(Ordering::Relaxed),
        down: down_bytes.load(Ordering::Relaxed),
        end,
        error,
    }
}

/// Copies `from` to `to` until EOF on `from`, then shuts down writing on `to`.
///
/// A TLS stream cannot say it is readable without reading (rustls may already hold
/// decrypted bytes), so the wait is a one-byte read into the future itself; only then is a
/// pooled buffer taken for the rest of what is ready. An idle terminate connection holds no
/// relay buffer either.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    bytes: &AtomicU64,
    last_ms: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    loop {
        let mut first = [0u8; 1];
        if from.read(&mut first).await? == 0 {
            // The peer may already be gone; its own direction reports that.
            let _ = to.shutdown().await;
            return Ok(());
        }
        stamp(last_ms, start);
        let mut buf = BufPool::take();
        buf[0] = first[0];
        // Whatever else is ready now, without waiting: an error or EOF here shows again on
        // the next read, after these bytes are written.
        let more = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf[1..]);
            match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(rb.filled().len()),
                Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(0),
            }
        })
        .await;
        let n = 1 + more;
        // A TLS writer holds records until flushed.
        let written = async {
            to.write_all(&buf[..n]).await?;
            to.flush().await
        }
        .await;
        BufPool::put(buf);
        written?;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn stamp(last_ms: &AtomicU64, start: Instant) {
    last_ms.store(
        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

// === Zero copy ===

#[cfg(target_os = "linux")]
mod splice {
    //! splice(2) from socket to pipe to socket, through pipes from a per-thread pool. A pipe
    //! is taken only for one round of bytes and goes back as soon as it is empty again, so an
    //! idle connection holds no pipe (and no descriptors beyond its two sockets).

    use std::cell::RefCell;
    use std::io;
    use std::os::fd::OwnedFd;

    use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
    use tokio::net::TcpStream;

    /// Bytes moved per splice call: the default pipe capacity.
    const CHUNK: usize = 64 * 1024;
    /// Pipes kept per worker thread between uses (two descriptors each).
    const KEEP: usize = 16;

    pub(super) struct Pipe {
        r: OwnedFd,
        w: OwnedFd,
    }

    thread_local! {
        static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    /// Pipes in this thread's pool.
    pub(super) fn pooled() -> usize {
        PIPES.with(|p| p.borrow().len())
    }

    pub(super) fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        Ok(Pipe { r, w })
    }

    /// Returns an empty pipe to the pool.
    pub(super) fn put(p: Pipe) {
        PIPES.with(|pipes| {
            let mut pipes = pipes.borrow_mut();
            if pipes.len() < KEEP {
                pipes.push(p);
            }
        });
    }

    fn flags() -> SpliceFlags {
        SpliceFlags::NONBLOCK | SpliceFlags::MOVE
    }

    /// Moves up to a pipe's worth from the socket into the (empty) pipe.
    pub(super) fn fill(from: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
        Ok(splice(from, None, &pipe.w, None, CHUNK, flags())?)
    }

    /// Moves up to `len` bytes from the pipe into the socket.
    pub(super) fn drain(pipe: &Pipe, to: &TcpStream, len: usize) -> io::Result<usize> {
        Ok(splice(&pipe.r, None, to, None, len, flags())?)
    }
}

// === Buffers ===

/// Size of one relay buffer: large enough that bulk transfers move in few syscalls.
const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per worker thread between uses; beyond that they are freed, so a burst does
/// not pin memory forever.
const POOL_KEEP: usize = 32;

thread_local! {
    static BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A per-thread free list of relay buffers. A task may move threads between take and put;
/// that only moves a buffer from one thread's list to another's.
struct BufPool;

impl BufPool {
    fn take() -> Box<[u8]> {
        BUFS.with(|b| b.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
    }

    fn put(buf: Box<[u8]>) {
        BUFS.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < POOL_KEEP {
                b.push(buf);
            }
        });
    }
}

/// A TCP socket under a TLS stream, read ahead through a pooled buffer.
///
/// rustls reads at most 4 KiB per call, so a bulk TLS transfer over a bare socket costs a
/// syscall per 4 KiB. This reads up to a whole pooled buffer at once and hands it out in the
/// pieces asked for; the buffer goes back to the pool as soon as it is empty, so an idle
/// connection holds none. Writes go straight to the socket.
pub(crate) struct ReadAhead {
    io: TcpStream,
    ahead: Option<(Box<[u8]>, usize, usize)>,
}

impl ReadAhead {
    pub(crate) fn new(io: TcpStream) -> Self {
        Self { io, ahead: None }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some((buf, off, len)) = &mut this.ahead {
                let n = (*len - *off).min(out.remaining());
                out.put_slice(&buf[*off..*off + n]);
                *off += n;
                if *off == *len {
                    if let Some((buf, ..)) = this.ahead.take() {
                        BufPool::put(buf);
                    }
                }
                return Poll::Ready(Ok(()));
            }
            ready!(this.io.poll_read_ready(cx))?;
            let mut buf = BufPool::take();
            match read_draining(&this.io, &mut buf) {
                Ok(0) => {
                    BufPool::put(buf);
                    return Poll::Ready(Ok(()));
                }
                Ok(len) => this.ahead = Some((buf, 0, len)),
                Err(e) => {
                    BufPool::put(buf);
                    if !retry(&e) {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    /// A drain ends a relay at once, whether it comes while bytes flow or while the
    /// connection is idle, and whichever of the two tokens fires.
    #[tokio::test]
    async fn drain_ends_a_relay_busy_or_idle() {
        for (busy, backend_token) in [(false, false), (false, true), (true, false), (true, true)] {
            let (mut client, gw_client) = pair().await;
            let (gw_backend, mut backend) = pair().await;
            let (listener, per_backend) = (
                tokio_util::sync::CancellationToken::new(),
                tokio_util::sync::CancellationToken::new(),
            );
            let (l, b) = (listener.clone(), per_backend.clone());
            let relay = tokio::spawn(async move {
                super::relay_tcp(
                    gw_client,
                    gw_backend,
                    Duration::from_secs(30),
                    super::drained(&l, &b),
                )
                .await
            });
            client.write_all(b"ping").await.expect("write");
            let mut m = [0u8; 4];
            backend.read_exact(&mut m).await.expect("relayed");
            // Busy: a writer keeps bytes flowing while the token fires. Idle: both ends
            // stay open and quiet.
            let mut tasks = Vec::new();
            let mut quiet = None;
            if busy {
                tasks.push(tokio::spawn(async move {
                    while client.write_all(&[7u8; 1024]).await.is_ok() {}
                }));
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while backend.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                }));
            } else {
                quiet = Some((client, backend));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if backend_token {
                per_backend.cancel()
            } else {
                listener.cancel()
            }
            let r = tokio::time::timeout(Duration::from_secs(2), relay)
                .await
                .expect("relay ended after the drain")
                .expect("join");
            assert_eq!(
                r.end,
                super::End::Drained,
                "busy {busy}, backend token {backend_token}"
            );
            for t in tasks {
                t.abort();
            }
            drop(quiet);
        }
    }

    /// The direction switches between copying and splicing as the traffic changes: a bulk
    /// upload (spliced), small messages both ways (copied), a bulk download, then half-closes;
    /// every byte arrives in order and the counts and the end are right.
    #[tokio::test]
    async fn bulk_small_bulk_and_half_close_through_relay_tcp() {
        const BULK: usize = 4 << 20;
        let (client, gw_client) = pair().await;
        let (gw_backend, backend) = pair().await;
        let relay = tokio::spawn(super::relay_tcp(
            gw_client,
            gw_backend,
            Duration::from_secs(30),
            std::future::pending::<()>(),
        ));
        let (mut cr, mut cw) = client.into_split();
        let (mut br, mut bw) = backend.into_split();
        let big: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
        let mut got = vec![0u8; BULK];

        let (w, r) = tokio::join!(cw.write_all(&big), br.read_exact(&mut got));
        w.expect("upload");
        r.expect("upload arrives");
        assert!(got == big, "upload corrupted");
        assert!(super::pooled_pipes() > 0, "the bulk upload was not spliced");

        for k in 0..100u8 {
            let msg = [k; 100];
            cw.write_all(&msg).await.expect("request");
            let mut m = [0u8; 100];
            br.read_exact(&mut m).await.expect("request arrives");
            assert_eq!(m, msg);
            bw.write_all(&[k ^ 0xff; 100]).await.expect("answer");
            cr.read_exact(&mut m).await.expect("answer arrives");
            assert_eq!(m, [k ^ 0xff; 100]);
        }

        let (w, r) = tokio::join!(bw.write_all(&big), cr.read_exact(&mut got));
        w.expect("download");
        r.expect("download arrives");
        assert!(got == big, "download corrupted");

        // Client finishes first: the backend sees EOF and can still answer.
        cw.shutdown().await.expect("client FIN");
        let mut rest = Vec::new();
        br.read_to_end(&mut rest).await.expect("backend EOF");
        assert!(rest.is_empty());
        bw.write_all(b"bye").await.expect("after half-close");
        bw.shutdown().await.expect("backend FIN");
        cr.read_to_end(&mut rest).await.expect("client EOF");
        assert_eq!(rest, b"bye");

        let r = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("relay ended")
            .expect("join");
        assert_eq!(r.end, super::End::ClientClosed);
        assert_eq!(r.up, (BULK + 100 * 100) as u64);
        assert_eq!(r.down, (BULK + 100 * 100 + 3) as u64);
    }

    /// An idle proxied connection costs its task, and the task is mostly this future: guard
    /// its size (512 bytes when written) so a change to the loop cannot quietly double the
    /// memory of every idle watch (README "Performance": 1.8 KiB RSS per idle connection).
    #[tokio::test]
    async fn an_idle_relay_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let a = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(tokio::net::TcpStream::connect(a), l.accept());
        let (t1, t2) = (
            tokio_util::sync::CancellationToken::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        let relay = super::relay_tcp(
            c.expect("connect"),
            s.expect("accept").0,
            std::time::Duration::from_secs(1),
            super::drained(&t1, &t2),
        );
        let size = std::mem::size_of_val(&relay);
        assert!(size <= 640, "the relay future grew to {size} bytes");
    }
}
