//! Health of backends: a pure state machine ([`state`]) and the active checks (`probe`).
//!
//! Passive health (a failed proxied connect) and active results both end in
//! `balance::Pool::observe`, which updates the state machine, the gauge and the slow
//! start ramp, and logs a change of state with its reason.

pub(crate) mod probe;
pub mod state;

pub use state::{BackendHealth, State, Status};
