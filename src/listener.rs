//! Listening sockets and their accept loops.
//!
//! Owns binding (socket2: `SO_REUSEADDR`, `IPV6_V6ONLY` so `0.0.0.0:p` and `[::]:p` can be
//! separate listeners, a deep backlog), the accept loop with its error backoff, and the
//! `max_connections` admission check. Each accepted connection is handed to
//! `forward::serve` in its own task with the listener's current
//! [`ListenerState`], loaded once from an `ArcSwap` so a reload affects new connections only.
//! The loop never awaits anything but `accept` and its stop signal, so a slow client or
//! backend can never hold it up.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::Pool;
use crate::config::{ListenerConfig, Mode};
use crate::metrics::ListenerMetrics;

/// Pending connections the kernel may queue per listening socket. Large, so a reconnect storm
/// of kubelets is queued rather than dropped while the loop catches up.
const BACKLOG: i32 = 4096;
/// First and last pause after an accept error. EMFILE leaves the connection in the queue, so
/// without a pause `accept` would fail again at once and spin a core.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What a listener's connections need, as of one snapshot.
#[derive(Debug)]
pub struct ListenerState {
    /// The listener's settings.
    pub cfg: ListenerConfig,
    /// The pool it forwards to.
    pub pool: Arc<Pool>,
    /// Its metric handles.
    pub metrics: ListenerMetrics,
    /// Permits for `max_connections`, shared by all addresses of the listener and kept
    /// across reloads (open connections hold permits).
    pub limit: Arc<Semaphore>,
    /// Cancelled when the listener's connections must end: at the shutdown deadline, or
    /// after a reload removed the listener and the drain time passed.
    pub drain: CancellationToken,
}

/// Binds one listening address.
///
/// # Errors
/// The socket call that failed, such as `EADDRINUSE` or `EACCES` for a port below 1024.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit these on Linux, which saves six syscalls per connection.
    crate::forward::tune(socket2::SockRef::from(&socket), "listener");
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Holds a connection's admission for as long as it lives: the `max_connections` permit
/// and the active gauge are released together on every exit path.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    active: IntGauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// Everything an accept loop runs with.
pub(crate) struct AcceptLoop {
    /// The bound socket.
    pub listener: TcpListener,
    /// The listener's current state; swapped by reload.
    pub state: Arc<ArcSwap<ListenerState>>,
    /// Cancelled to stop accepting (shutdown, address removed by a reload).
    pub stop: CancellationToken,
    /// Tracks connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
}

impl AcceptLoop {
    /// Accepts until `stop` is cancelled; the listening socket closes when this returns.
    pub(crate) async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        let mut last_warning: Option<Instant> = None;
        let local = self.listener.local_addr().ok();
        loop {
            let accepted = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok((stream, client)) => {
                    backoff = BACKOFF_MIN;
                    self.admit(stream, client);
                }
                Err(e) => {
                    let state = self.state.load();
                    state.metrics.accept_errors.inc();
                    // One warning a second at most: EMFILE under load would otherwise log
                    // thousands of identical lines.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(
                            listener = %state.cfg.name,
                            address = ?local,
                            error = %e,
                            backoff_ms = backoff.as_millis() as u64,
                            "accept failed, backing off"
                        );
                        last_warning = Some(Instant::now());
                    }
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn admit(&self, stream: tokio::net::TcpStream, client: SocketAddr) {
        let state = self.state.load_full();
        let Ok(permit) = state.limit.clone().try_acquire_owned() else {
            state.metrics.rejected_max_connections.inc();
            tracing::debug!(
                listener = %state.cfg.name,
                client = %client,
                max_connections = state.cfg.max_connections,
                "refused: listener at max_connections"
            );
            drop(stream);
            return;
        };
        state.metrics.connections.inc();
        state.metrics.active.inc();
        let admitted = Admitted {
            _permit: permit,
            active: state.metrics.active.clone(),
        };
        self.tracker
            .spawn(connection(stream, client, state, admitted));
    }
}

/// The task of one admitted connection. Its size is what every idle connection costs, so a
/// test guards it; an `async fn` would keep its arguments twice (856 bytes instead of 824).
#[allow(clippy::manual_async_fn)]
fn connection(
    stream: tokio::net::TcpStream,
    client: SocketAddr,
    state: Arc<ListenerState>,
    admitted: Admitted,
) -> impl std::future::Future<Output = ()> {
    async move {
        match state.cfg.mode {
            Mode::Passthrough => crate::forward::serve(stream, client, state).await,
            // Boxed: the TLS state machine is large, and a passthrough connection must not
            // pay for it in the size of every task.
            Mode::Terminate => Box::pin(crate::terminate::serve(stream, client, state)).await,
        }
        drop(admitted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle passthrough connection costs its task (plus two sockets' registrations): 824
    /// bytes when written, 2,040 before the relay became one poll function (README
    /// "Performance": 1.9 KiB RSS per idle connection). A change that makes it grow, such as
    /// connecting without the box in `forward::serve` (912 bytes), fails here.
    #[tokio::test]
    async fn a_passthrough_connection_task_stays_small() {
        let cfg = crate::config::parse(
            std::path::Path::new("size.toml"),
            "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n\
             [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n",
        )
        .expect("config");
        let metrics = crate::metrics::Metrics::new();
        let drain = CancellationToken::new();
        let pool = Arc::new(Pool::new(cfg.pools[0].clone(), &metrics, &[], true, &drain));
        let limit = Arc::new(Semaphore::new(1));
        let state = Arc::new(ListenerState {
            cfg: cfg.listeners[0].clone(),
            pool,
            metrics: metrics.listener("l"),
            limit: limit.clone(),
            drain,
        });
        let l = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = l.local_addr().expect("addr");
        let (_c, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let (s, client) = accepted.expect("accept");
        let admitted = Admitted {
            _permit: limit.try_acquire_owned().expect("permit"),
            active: state.metrics.active.clone(),
        };
        let task = connection(s, client, state, admitted);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 880,
            "a passthrough connection task grew to {size} bytes"
        );
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let l = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = l.local_addr().expect("addr");
        let (_c, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let (s, _) = accepted.expect("accept");
        let sock = socket2::SockRef::from(&s);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            std::time::Duration::from_secs(30)
        );
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(std::time::Duration::from_secs(60))
        );
    }
}
