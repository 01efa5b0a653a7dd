//! Accept loops: one per listening socket (bound by [`crate::net::bind`]).
//!
//! Owns the accept loop with its error backoff and the `max_connections` admission check. Each accepted connection is handed to
//! `forward::serve` in its own task with the listener's current
//! [`ListenerSnapshot`], loaded once from an `ArcSwap` so a reload affects new connections only.
//! The loop never awaits anything but `accept` and its stop signal, so a slow client or
//! backend can never hold it up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Budget;
use crate::config::Mode;
use crate::snapshot::ListenerSnapshot;

/// First and last pause after an accept error. EMFILE leaves the connection in the queue, so
/// without a pause `accept` would fail again at once and spin a core.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Holds a connection's admission for as long as it lives: the `max_connections` permit
/// and the active gauge are released together on every exit path.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    active: IntGauge,
    /// The process-wide slot, given back with the rest.
    budget: Arc<Budget>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.active.dec();
        self.budget.give();
    }
}

/// Everything an accept loop runs with.
pub(crate) struct AcceptLoop {
    /// The bound socket.
    pub listener: TcpListener,
    /// The listener's current state; swapped by reload.
    pub state: Arc<ArcSwap<ListenerSnapshot>>,
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
        if !state.budget.try_take() {
            state.metrics.rejected_max_connections.inc();
            tracing::debug!(
                listener = %state.cfg.name,
                client = %client,
                budget = state.budget.max(),
                "refused: the process-wide connection budget is spent"
            );
            drop(stream);
            return;
        }
        state.metrics.connections.inc();
        state.metrics.active.inc();
        let admitted = Admitted {
            _permit: permit,
            active: state.metrics.active.clone(),
            budget: state.budget.clone(),
        };
        self.tracker
            .spawn(connection(stream, client, state, admitted));
    }
}

/// The most a passthrough connection's task may take: with its two sockets it is what every
/// idle watch costs (docs/performance.md), so growth must be argued for. Connecting outside
/// the box in `forward::serve`, or wrapping the serving future in an async block (which keeps
/// its arguments, or the awaited future, twice), each break it. SNI routes added 24 bytes
/// (784 to 808: the route that chose the pool and the count of ClientHello bytes sent
/// ahead of the relay, both kept for the access line). The wait for a client's first bytes
/// moved out of the box into the task (issue 19: a client that has not spoken costs the
/// task alone, 1.6 KiB of RSS where it cost 4.0 with the box) and made it 816.
#[cfg(test)]
const CONNECTION_TASK_BUDGET: usize = 816;

/// The task of one admitted connection. Its size is what every idle connection costs, so a
/// test guards it against [`CONNECTION_TASK_BUDGET`].
/// The serving future is built here, outside the task's own async block, so that the block
/// captures only it and the admission, not the arguments a second time.
fn connection(
    stream: tokio::net::TcpStream,
    client: SocketAddr,
    state: Arc<ListenerSnapshot>,
    admitted: Admitted,
) -> impl std::future::Future<Output = ()> {
    let serving = match state.cfg.mode {
        Mode::Passthrough => Either::Left(crate::forward::serve(stream, client, state)),
        // Boxed: the TLS state machine is large, and a passthrough connection must not pay
        // for it in the size of every task.
        Mode::Terminate => Either::Right(Box::pin(crate::terminate::serve(stream, client, state))),
    };
    Connection {
        serving,
        admitted: Some(admitted),
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: its serving future and its admission, released when it ends. A
    /// plain struct: an async block would keep the awaited future twice.
    struct Connection<F> {
        #[pin]
        serving: F,
        admitted: Option<Admitted>,
    }
}

impl<F: std::future::Future<Output = ()>> std::future::Future for Connection<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        std::task::ready!(this.serving.poll(cx));
        this.admitted.take();
        std::task::Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Pool;
    use tokio::sync::Semaphore;

    /// An idle passthrough connection costs its task (plus two sockets' registrations).
    #[tokio::test]
    async fn a_passthrough_connection_task_stays_within_its_budget() {
        let cfg = crate::config::parse(
            std::path::Path::new("size.toml"),
            "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n\
             [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n",
        )
        .expect("config");
        let metrics = crate::metrics::Metrics::new();
        let drain = CancellationToken::new();
        let pool = Arc::new(Pool::new(
            cfg.pools[0].clone(),
            &metrics,
            None,
            true,
            &drain,
        ));
        let limit = Arc::new(Semaphore::new(1));
        let state = Arc::new(ListenerSnapshot {
            cfg: cfg.listeners[0].clone(),
            pool: Some(pool),
            routes: Vec::new(),
            upstreams: Arc::default(),
            metrics: metrics.listener("l"),
            limit: limit.clone(),
            drain,
            splice: true,
            handshakes: Arc::new(Semaphore::new(0)),
            budget: Arc::new(Budget::new(10)),
        });
        let l = crate::net::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = l.local_addr().expect("addr");
        let (_c, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let (s, client) = accepted.expect("accept");
        let admitted = Admitted {
            _permit: limit.try_acquire_owned().expect("permit"),
            active: state.metrics.active.clone(),
            budget: state.budget.clone(),
        };
        let task = connection(s, client, state, admitted);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= CONNECTION_TASK_BUDGET,
            "a passthrough connection task grew to {size} bytes"
        );
    }
}
