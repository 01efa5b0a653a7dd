//! The copy loops, the hot path: bytes both ways between a client and a backend until both
//! directions are done, with half-close, an idle timeout and a drain signal.
//!
//! Two loops share one set of rules, kept here: [`tcp::relay_tcp`] for passthrough (TCP to
//! TCP, splice(2) for bulk bytes on Linux) and [`stream::relay`] for terminate (TLS streams on
//! both sides). Both keep one idle `Clock` (activity stores a timestamp; the timer re-arms
//! from it only when it fires), end by the same `Ends` rules (the first EOF names the end,
//! the connection ends when both directions are done, an error ends it at once), and poll
//! their drain future through `Watched` (all in `rules`). A loop knows only its two sides: nothing in it
//! touches metrics, logs or configuration, and it holds no buffer or pipe while idle.

pub(crate) mod buf;
mod rules;
#[cfg(target_os = "linux")]
pub(crate) mod splice;
mod stream;
mod tcp;

pub(crate) use buf::ReadAhead;
pub use rules::{drained, Drained};
pub(crate) use rules::{Clock, Tracked, UNTRACKED};
pub use stream::relay;
pub(crate) use tcp::relay_tracked;
pub use tcp::{relay_tcp, RelayTcp};

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
