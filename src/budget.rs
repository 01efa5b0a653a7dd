//! The process-wide connection budget: how many proxied connections the whole gateway may
//! hold at once, whatever each listener's `max_connections` says.
//!
//! Every proxied connection costs two descriptors, and the process has `RLIMIT_NOFILE` of
//! them for everything (listening sockets, the admin server, health checks, splice pipes,
//! certificate reads). Listeners' limits are per listener and easily sum past that, so
//! without a budget the gateway would run into EMFILE, which fails accepts and backend
//! sockets alike. With one, a connection over it is refused cleanly at accept, counted as
//! `reason="max_connections"`. The budget is `[global] max_connections` when set, else what
//! the descriptor limit allows; start-up warns when the listeners' limits do not fit.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Descriptors kept for everything but proxied connections: listening and admin sockets,
/// health checks, pooled splice pipes (two descriptors each, up to 32 pipes per worker),
/// files read on reload; at most a quarter of a small limit.
fn reserved(nofile: u64, workers: usize) -> u64 {
    (256 + 64 * workers as u64).min(nofile / 4)
}

/// The budget the descriptor limit `nofile` allows with `workers` worker threads.
pub(crate) fn from_nofile(nofile: u64, workers: usize) -> usize {
    usize::try_from(nofile.saturating_sub(reserved(nofile, workers)) / 2).unwrap_or(usize::MAX)
}

/// The soft descriptor limit of this process, if it can be read.
pub(crate) fn nofile() -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Connections admitted process-wide, against a fixed budget. One atomic on accept and one
/// on close: no lock.
#[derive(Debug)]
pub(crate) struct Budget {
    max: usize,
    used: AtomicUsize,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            used: AtomicUsize::new(0),
        }
    }

    /// The budget.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Takes one slot; false when the budget is spent.
    pub(crate) fn try_take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives one slot back.
    pub(crate) fn give(&self) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_what_the_descriptors_allow_and_holds() {
        assert_eq!(from_nofile(20_000, 2), (20_000 - 256 - 128) / 2);
        assert_eq!(
            from_nofile(100, 8),
            37,
            "a small limit keeps a quarter for the rest"
        );
        assert_eq!(from_nofile(0, 8), 0);
        let b = Budget::new(2);
        assert!(b.try_take() && b.try_take());
        assert!(!b.try_take(), "over the budget");
        b.give();
        assert!(b.try_take());
    }
}
