//! The rules both copy loops share: the idle clock, the end-of-stream rules, and the drain
//! signal they poll only when it fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::close::End;

// === The idle clock ===

/// When a relay last read anything, in milliseconds since it started. An atomic so that the
/// two directions of the stream relay can share it by reference; a relaxed store is a plain
/// store on the machines this runs on.
pub(crate) struct Clock {
    /// tokio's clock, so tests can pause it.
    start: Instant,
    last_ms: AtomicU64,
    /// When the client side last sent anything (the rebalancer's quiet rule, SPEC §11).
    client_ms: AtomicU64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            client_ms: AtomicU64::new(0),
        }
    }

    /// Notes activity now; `client`: the bytes came from the client.
    pub(crate) fn stamp(&self, client: bool) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
        if client {
            self.client_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// How long the relay has run.
    pub(crate) fn age(&self) -> Duration {
        self.start.elapsed()
    }

    /// How long the client has sent nothing (since the start, when it never did).
    pub(crate) fn client_quiet(&self) -> Duration {
        let since = Duration::from_millis(self.client_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(since)
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// `after` past the start, as a deadline to reset a timer to.
    pub(crate) fn after_start(&self, after: Duration) -> Instant {
        deadline(self.start, after)
    }

    /// The first idle deadline: `idle` after the start.
    pub(crate) fn first_deadline(&self, idle: Duration) -> tokio::time::Sleep {
        tokio::time::sleep_until(deadline(self.start, idle))
    }

    /// Whether the connection has been idle for `idle`: polls the timer and, when it fired
    /// early because of activity since it was armed, re-arms it from the last activity.
    pub(crate) fn poll_idle(
        &self,
        mut sleep: Pin<&mut tokio::time::Sleep>,
        idle: Duration,
        cx: &mut Context<'_>,
    ) -> bool {
        while sleep.as_mut().poll(cx).is_ready() {
            let next = deadline(self.last(), idle);
            if next <= Instant::now() {
                return true;
            }
            sleep.as_mut().reset(next);
        }
        false
    }
}

/// `from + idle`, or far in the future when that does not fit in an `Instant`.
fn deadline(from: Instant, idle: Duration) -> Instant {
    from.checked_add(idle)
        .unwrap_or_else(|| from + Duration::from_secs(100 * 365 * 24 * 3600))
}

// === A relay the rebalancer can see and end ===

/// The id of a relay outside every registry.
pub(crate) const UNTRACKED: u64 = u64::MAX;

/// What the rebalancer (SPEC §11) reads of one passthrough relay, and how it asks the relay
/// to end: the relay's own idle clock (its start and the client's last activity, stamped
/// by the reads it does anyway) and a flag with a waker. One allocation per connection,
/// nothing per read beyond the clock's relaxed stores.
pub(crate) struct Tracked {
    /// The relay's clock.
    pub(crate) clock: Clock,
    /// A key in its backend's registry.
    pub(crate) id: u64,
    /// 0: running; 1: asked to end; 2: closing.
    rebalance: std::sync::atomic::AtomicU8,
    task: atomic_waker::AtomicWaker,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked").field("id", &self.id).finish()
    }
}

impl Tracked {
    pub(crate) fn new(id: u64) -> Self {
        Self {
            clock: Clock::new(),
            id,
            rebalance: std::sync::atomic::AtomicU8::new(0),
            task: atomic_waker::AtomicWaker::new(),
        }
    }

    /// Asks the relay to end cleanly (`end=rebalanced`).
    pub(crate) fn rebalance(&self) {
        self.rebalance.store(1, Ordering::Release);
        self.task.wake();
    }

    /// Whether the rebalancer asked and the relay has not answered yet (a relay asked
    /// once is not picked again while it closes).
    pub(crate) fn was_asked(&self) -> bool {
        self.rebalance.load(Ordering::Acquire) != 0
    }

    /// A relay no rebalancer can see (its pool does not rebalance): never asked, and it
    /// registers no waker on each poll.
    pub(crate) fn untracked() -> Self {
        Self::new(UNTRACKED)
    }

    /// Whether the rebalancer asked the relay to end; registers the relay's task, so that
    /// the request wakes it.
    pub(crate) fn asked(&self, cx: &Context<'_>) -> bool {
        if self.id == UNTRACKED {
            return false;
        }
        self.task.register(cx.waker());
        self.rebalance.load(Ordering::Acquire) == 1
    }

    /// The relay declined (bytes from the client were in flight): it may be asked again.
    pub(crate) fn decline(&self) {
        self.rebalance.store(0, Ordering::Release);
    }

    /// The relay is closing: not to be asked again.
    pub(crate) fn closing(&self) {
        self.rebalance.store(2, Ordering::Release);
    }
}

// === The end rules ===

/// Which directions are done, and which finished first: the one set of end-of-stream rules
/// both loops follow.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Ends {
    up: bool,
    down: bool,
    first: Option<End>,
}

impl Ends {
    /// Whether the direction (`up`: client to backend) is done.
    pub(crate) fn is_done(&self, up: bool) -> bool {
        if up {
            self.up
        } else {
            self.down
        }
    }

    /// Records EOF on one direction (passed on to the other side). Returns the end once both
    /// directions are done: named after whichever side finished first.
    pub(crate) fn eof(&mut self, up: bool) -> Option<End> {
        let (mine, eof) = if up {
            (&mut self.up, End::ClientClosed)
        } else {
            (&mut self.down, End::BackendClosed)
        };
        *mine = true;
        let first = *self.first.get_or_insert(eof);
        (self.up && self.down).then_some(first)
    }
}

// === The drain signal ===

/// Completes when the connection must end: its listener or its backend is drained.
pub fn drained<'a>(listener: &'a CancellationToken, backend: &'a CancellationToken) -> Drained<'a> {
    Drained {
        listener: listener.cancelled(),
        backend: backend.cancelled(),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`drained`]: two waits side by side, no larger than they are.
    pub struct Drained<'a> {
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

pin_project_lite::pin_project! {
    /// A relay's drain future, polled only when it asked to be: on the first poll and after
    /// it woke the task. Polling a cancellation wait takes two mutexes that every connection
    /// of the listener (or backend) shares, and a relay is polled on every readiness event;
    /// this keeps the data path free of shared locks, at one small allocation per connection.
    pub(crate) struct Watched<D> {
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
    pub(crate) fn new(inner: D) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_eof_names_the_end_and_both_end_the_connection() {
        let mut e = Ends::default();
        assert_eq!(e.eof(false), None, "one direction done is a half-close");
        assert!(e.is_done(false) && !e.is_done(true));
        assert_eq!(e.eof(true), Some(End::BackendClosed));
        let mut e = Ends::default();
        assert_eq!(e.eof(true), None);
        assert_eq!(e.eof(false), Some(End::ClientClosed));
    }

    #[test]
    fn an_idle_timeout_too_large_for_the_clock_never_overflows() {
        let now = Instant::now();
        assert!(deadline(now, Duration::MAX) > now);
        assert_eq!(
            deadline(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_rearms_from_the_last_activity() {
        let clock = Clock::new();
        let idle = Duration::from_secs(10);
        let mut sleep = std::pin::pin!(clock.first_deadline(idle));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        tokio::time::advance(Duration::from_secs(6)).await;
        clock.stamp(true);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            !clock.poll_idle(sleep.as_mut(), idle, &mut cx),
            "activity 5s ago: not idle yet"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            clock.poll_idle(sleep.as_mut(), idle, &mut cx),
            "11s quiet: idle"
        );
    }
}
