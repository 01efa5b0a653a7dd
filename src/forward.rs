//! One proxied connection, from accepted socket to access-log line.
//!
//! `serve` runs in its own task: it picks a backend with the listener's pool, connects
//! (retrying other backends up to `connect_attempts`, each attempt bounded by
//! `connect_timeout`), relays bytes both ways with [`relay`] until both directions are done,
//! and writes one log line with the close reason. The snapshot it was handed at accept time
//! is kept for the whole connection, so a reload only affects new connections.
//!
//! [`relay`] is the hot path and the only copy loop in the crate. It is readiness-driven:
//! while a connection is idle it holds no buffer at all (an idle watch costs two sockets and a
//! task); a buffer is borrowed from a per-thread pool only once a socket is readable, and
//! returned as soon as those bytes are written. Nothing in the loop touches metrics, logs or
//! configuration; byte counts are plain atomics read once at the end.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::balance::{ActiveGuard, Backend, Pool};
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
/// on, since none of these is needed for correctness.
pub(crate) fn tune_socket(stream: &TcpStream, role: &'static str) {
    tune(SockRef::from(stream), role);
}

/// [`tune_socket`] for any socket: listening sockets get the options once, and Linux copies
/// them to every accepted socket.
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
    let connected = tokio::select! {
        r = connect(&state.pool, client_addr, &state.cfg.name, |_, tcp| async move { Ok(tcp) }) => r,
        () = state.drain.cancelled() => Err(None),
    };
    let (backend_stream, guard) = match connected {
        Ok(c) => c,
        Err(last_error) => {
            log_connect_failed(&state, client_addr, started, last_error.as_deref());
            return;
        }
    };
    let (cr, cw) = client.into_split();
    let (br, bw) = backend_stream.into_split();
    let drain = drained(&state.drain, &guard.backend().drain);
    let r = relay(cr, cw, br, bw, state.cfg.idle_timeout, drain).await;
    log_close(&state, client_addr, guard.backend(), started, &r);
}

/// Completes when the connection must end: its listener or its backend is drained.
pub(crate) async fn drained(listener: &CancellationToken, backend: &CancellationToken) {
    tokio::select! {
        () = listener.cancelled() => {}
        () = backend.cancelled() => {}
    }
}

/// The access-log line of a client that never reached a backend, and its counter.
pub(crate) fn log_connect_failed(
    state: &ListenerState,
    client: SocketAddr,
    started: Instant,
    error: Option<&str>,
) {
    state.metrics.rejected_no_backend.inc();
    tracing::info!(
        target: "apilb::access",
        listener = %state.cfg.name,
        client = %client,
        backend = "-",
        duration_ms = duration_ms(started),
        bytes_up = 0u64,
        bytes_down = 0u64,
        end = %End::ConnectFailed,
        error = error.unwrap_or("shutting down"),
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

/// Tries distinct backends in the pool's order until one accepts the connect and `finish`
/// (nothing for passthrough, the backend TLS handshake for terminate) succeeds, each attempt
/// within `connect_timeout`.
///
/// Every failure counts against its backend (metrics and passive health); the error of the
/// last attempt is returned for the access log.
pub(crate) async fn connect<T, F, Fut>(
    pool: &Pool,
    client: SocketAddr,
    listener: &str,
    finish: F,
) -> Result<(T, ActiveGuard), Option<String>>
where
    F: Fn(Arc<Backend>, TcpStream) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let attempts = pool.cfg.connect_attempts.get() as usize;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error = None;
    while tried.len() < attempts {
        let Some(i) = pool.pick(&tried) else { break };
        tried.push(i);
        let backend = &pool.backends[i];
        // Counted as active from the pick on, so concurrent picks by least-conn see it.
        let guard = ActiveGuard::new(backend.clone());
        let attempt = async {
            let tcp = TcpStream::connect(backend.addr)
                .await
                .map_err(|e| e.to_string())?;
            tune_socket(&tcp, "backend");
            finish(backend.clone(), tcp).await
        };
        let err = match tokio::time::timeout(pool.cfg.connect_timeout, attempt).await {
            Ok(Ok(stream)) => {
                backend.metrics.connections.inc();
                return Ok((stream, guard));
            }
            Ok(Err(e)) => e,
            Err(_) => format!(
                "timeout after {}",
                humantime::format_duration(pool.cfg.connect_timeout)
            ),
        };
        backend.metrics.connect_errors.inc();
        // Passive health: a failed connect counts like a failed check (a success does not
        // count as a pass: an accepting socket says little about a hung apiserver).
        crate::health::record(pool, backend, false, &format!("connect failed: {err}"));
        tracing::debug!(listener, client = %client, backend = %backend.name, error = %err, "backend connect failed, trying another");
        last_error = Some(format!(
            "connect to {} ({}): {err}",
            backend.name, backend.addr
        ));
    }
    Err(last_error.or_else(|| Some("no healthy backend (when_all_down = \"reject\")".into())))
}

// === The copy loop ===

/// What [`relay`] saw.
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

/// The read side of one end of a relayed connection: reads into a buffer from the per-thread
/// pool, holding it only while bytes are in flight.
///
/// A plain TCP socket waits for readiness before it takes a buffer and gives the buffer back
/// if the readiness was spurious, so an idle connection (a quiet watch) holds none. A TLS
/// stream cannot tell without reading (rustls may already hold decrypted bytes), so it reads
/// into a buffer at once; its connection carries rustls's own buffers anyway.
pub trait RelayRead: AsyncRead + Unpin + Send {
    /// The TCP socket behind this reader, when bytes may be spliced out of it.
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }

    /// The next bytes: a pooled buffer and how many bytes it holds; 0 means EOF.
    fn read_pooled(
        &mut self,
    ) -> impl std::future::Future<Output = io::Result<(Box<[u8]>, usize)>> + Send {
        async move {
            let mut buf = BufPool::take();
            match self.read(&mut buf).await {
                Ok(n) => Ok((buf, n)),
                Err(e) => {
                    BufPool::put(buf);
                    Err(e)
                }
            }
        }
    }
}

impl RelayRead for OwnedReadHalf {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }

    async fn read_pooled(&mut self) -> io::Result<(Box<[u8]>, usize)> {
        loop {
            self.readable().await?;
            let mut buf = BufPool::take();
            match self.try_read(&mut buf) {
                Ok(n) => return Ok((buf, n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => BufPool::put(buf),
                Err(e) => {
                    BufPool::put(buf);
                    return Err(e);
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> RelayRead for tokio::io::ReadHalf<T> {}

/// The write side of one end of a relayed connection.
pub trait RelayWrite: AsyncWrite + Unpin + Send {
    /// The TCP socket behind this writer, when bytes may be spliced into it.
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl RelayWrite for OwnedWriteHalf {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> RelayWrite for tokio::io::WriteHalf<T> {}

/// Whether TCP-to-TCP relays use splice(2) (Linux). On by default; tests turn it off to
/// exercise the copy path that TLS and other platforms use.
static SPLICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

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

/// Chooses zero-copy splice (default) or the buffer copy for TCP-to-TCP relays started from
/// now on.
pub fn set_splice(enabled: bool) {
    SPLICE.store(enabled, Ordering::Relaxed);
}

/// Relays bytes both ways between a client and a backend until both directions reached
/// EOF, an error occurs, nothing moved for `idle`, or `drain` completes. This is the one
/// copy loop: passthrough passes TCP halves, terminate passes TLS halves.
///
/// Half-close is propagated: EOF from one side shuts down writing towards the other (for
/// TLS: close_notify), and the other direction keeps flowing.
pub async fn relay<CR, CW, BR, BW>(
    mut client_r: CR,
    mut client_w: CW,
    mut backend_r: BR,
    mut backend_w: BW,
    idle: Duration,
    drain: impl std::future::Future<Output = ()>,
) -> Relayed
where
    CR: RelayRead,
    BR: RelayRead,
    CW: RelayWrite,
    BW: RelayWrite,
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
    let mut drain = pin!(drain);

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

/// Copies `from` to `to` until EOF on `from`, then shuts down writing on `to`: with
/// splice(2) through a pooled pipe when both are TCP sockets on Linux (the bytes never enter
/// user space), else through pooled buffers.
async fn pump<R: RelayRead, W: RelayWrite>(
    from: &mut R,
    to: &mut W,
    bytes: &AtomicU64,
    last_ms: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if SPLICE.load(Ordering::Relaxed) {
        if let (Some(f), Some(t)) = (from.tcp(), to.tcp()) {
            return splice::pump(f, t, bytes, last_ms, start).await;
        }
    }
    loop {
        let (buf, n) = from.read_pooled().await?;
        if n == 0 {
            BufPool::put(buf);
            // The peer may already be gone; its own direction reports that.
            let _ = to.shutdown().await;
            return Ok(());
        }
        stamp(last_ms, start);
        // A TLS writer holds records until flushed; for TCP the flush is free.
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
    //! splice(2) from socket to pipe to socket. A pipe is taken from a per-thread pool only
    //! once the source is readable and goes back as soon as it is empty again, so an idle
    //! connection holds no pipe (and no descriptors beyond its two sockets).

    use std::cell::RefCell;
    use std::io;
    use std::net::Shutdown;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Bytes moved per splice call: the default pipe capacity.
    const CHUNK: usize = 64 * 1024;
    /// Pipes kept per worker thread between uses (two descriptors each).
    const KEEP: usize = 16;

    struct Pipe {
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

    fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        Ok(Pipe { r, w })
    }

    /// Returns an empty pipe to the pool (a pipe that may hold bytes is dropped instead).
    fn put(p: Pipe) {
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

    pub(super) async fn pump(
        from: &TcpStream,
        to: &TcpStream,
        bytes: &AtomicU64,
        last_ms: &AtomicU64,
        start: Instant,
    ) -> io::Result<()> {
        loop {
            from.readable().await?;
            let Ok(pipe) = take() else {
                // Out of descriptors for a pipe: move this round through a buffer instead.
                if copy_round(from, to, bytes, last_ms, start).await? {
                    return Ok(());
                }
                continue;
            };
            let n = match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.w, None, CHUNK, flags()).map_err(io::Error::from)
            }) {
                Ok(0) => {
                    put(pipe);
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    put(pipe);
                    continue;
                }
                Err(e) => {
                    put(pipe);
                    return Err(e);
                }
            };
            super::stamp(last_ms, start);
            let mut left = n;
            while left > 0 {
                to.writable().await?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(&pipe.r, None, to, None, left, flags()).map_err(io::Error::from)
                }) {
                    Ok(k) => left -= k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The pipe still holds bytes: it is dropped, not pooled.
                    Err(e) => return Err(e),
                }
            }
            put(pipe);
            bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// One read-and-write through a pooled buffer; true at EOF (after shutting `to` down).
    async fn copy_round(
        from: &TcpStream,
        to: &TcpStream,
        bytes: &AtomicU64,
        last_ms: &AtomicU64,
        start: Instant,
    ) -> io::Result<bool> {
        let mut buf = super::BufPool::take();
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                super::BufPool::put(buf);
                return Ok(false);
            }
            Err(e) => {
                super::BufPool::put(buf);
                return Err(e);
            }
        };
        if n == 0 {
            super::BufPool::put(buf);
            let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
            return Ok(true);
        }
        super::stamp(last_ms, start);
        let mut off = 0;
        while off < n {
            to.writable().await?;
            match to.try_write(&buf[off..n]) {
                Ok(k) => off += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    super::BufPool::put(buf);
                    return Err(e);
                }
            }
        }
        super::BufPool::put(buf);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(false)
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

#[cfg(test)]
mod tests {
    /// An idle proxied connection costs its task, and the task is mostly this future: guard
    /// its size so a change to the loop cannot quietly double the memory of every idle watch
    /// (README "Performance": 3.1 KiB RSS per idle connection at 1,680 bytes here).
    #[tokio::test]
    async fn an_idle_relay_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let a = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(tokio::net::TcpStream::connect(a), l.accept());
        let (cr, cw) = c.expect("connect").into_split();
        let (br, bw) = s.expect("accept").0.into_split();
        let (t1, t2) = (
            tokio_util::sync::CancellationToken::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        let relay = super::relay(
            cr,
            cw,
            br,
            bw,
            std::time::Duration::from_secs(1),
            super::drained(&t1, &t2),
        );
        let size = std::mem::size_of_val(&relay);
        assert!(size <= 2048, "the relay future grew to {size} bytes");
    }
}
