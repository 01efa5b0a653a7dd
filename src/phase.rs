//! Where the gateway is in its life: the [`Phase`] that the lifecycle publishes on a `watch`
//! channel for the admin server (`/readyz`) and the tests, and [`Lifecycle`], the one place
//! that moves it and tells the service manager (READY, RELOADING, STOPPING) as it does.

use std::sync::Arc;

use tokio::sync::watch;

/// Where the gateway is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Binding listeners; nothing is served yet.
    Starting,
    /// Listeners are bound and accepting.
    Running,
    /// A reload is being applied (listeners keep accepting throughout).
    Reloading,
    /// Shutdown began: `/readyz` fails; listeners still accept for `shutdown_grace`, then stop
    /// and connections finish.
    Draining,
    /// Every connection is closed.
    Stopped,
}

impl Phase {
    /// Whether the gateway is past the start of shutdown.
    pub fn is_stopping(self) -> bool {
        matches!(self, Self::Draining | Self::Stopped)
    }
}

/// How shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still open at the drain deadline, closed with `end=drained`.
    pub forced: usize,
}

/// Moves the phase and announces each move to the service manager, so that READY, RELOADING
/// and STOPPING always agree with what `/readyz` and the tests see.
#[derive(Clone)]
pub(crate) struct Lifecycle {
    tx: Arc<watch::Sender<Phase>>,
    /// The `STATUS=` text sent with READY (listeners, healthy backends, a failed reload).
    status: Arc<dyn Fn() -> String + Send + Sync>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lifecycle")
            .field(&*self.tx.borrow())
            .finish()
    }
}

impl Lifecycle {
    /// A lifecycle in [`Phase::Starting`], and a receiver that follows it.
    pub(crate) fn new(
        status: impl Fn() -> String + Send + Sync + 'static,
    ) -> (Self, watch::Receiver<Phase>) {
        let (tx, rx) = watch::channel(Phase::Starting);
        (
            Self {
                tx: Arc::new(tx),
                status: Arc::new(status),
            },
            rx,
        )
    }

    /// The phase now.
    pub(crate) fn now(&self) -> Phase {
        *self.tx.borrow()
    }

    /// Enters `next`. Once shutdown began, only later phases are entered: a reload that
    /// finishes during the drain must not announce READY again.
    pub(crate) fn enter(&self, next: Phase) {
        // The announcement is made inside the update, under the channel's lock, so two
        // moves racing (a reload ending as shutdown begins) cannot announce out of order.
        self.tx.send_if_modified(|p| {
            let allowed = !p.is_stopping() || (next == Phase::Stopped && *p == Phase::Draining);
            if !allowed || *p == next {
                return false;
            }
            *p = next;
            match next {
                Phase::Running => crate::sd_notify::ready(&(self.status)()),
                Phase::Reloading => crate::sd_notify::reloading(),
                Phase::Draining => crate::sd_notify::stopping(),
                Phase::Starting | Phase::Stopped => {}
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_ending_during_shutdown_does_not_bring_the_gateway_back() {
        let (l, rx) = Lifecycle::new(String::new);
        l.enter(Phase::Running);
        l.enter(Phase::Reloading);
        l.enter(Phase::Draining);
        l.enter(Phase::Running);
        assert_eq!(*rx.borrow(), Phase::Draining);
        l.enter(Phase::Stopped);
        l.enter(Phase::Draining);
        assert_eq!(*rx.borrow(), Phase::Stopped);
    }
}
