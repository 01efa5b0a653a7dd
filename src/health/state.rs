//! A backend's health as a pure state machine: the state, the counts behind it, and the last
//! result in words. No I/O and no knowledge of pools: the prober, passive failures and the
//! admin page feed or read it.
//!
//! The data path reads one atomic flag ([`BackendHealth::is_healthy`]); everything else sits
//! behind a mutex that only results and the admin page touch. The first result decides the
//! state on its own; after that `rise`/`fall` apply (SPEC §3, Health checks).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

/// A backend's health as the admin page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No check has finished yet.
    Unknown,
    /// Gets new connections.
    Healthy,
    /// Gets no new connections; established ones are left alone.
    Unhealthy,
}

impl State {
    /// Lower-case name, as in `/api/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// The last result and the counters behind the state.
#[derive(Debug, Clone)]
pub struct Status {
    /// Current state.
    pub state: State,
    /// Consecutive passes.
    pub passes: u32,
    /// Consecutive failures (active checks and failed proxied connects).
    pub failures: u32,
    /// The last result in plain words ("ok", "connection refused", ...).
    pub reason: String,
    /// When the last result came in.
    pub last_check: Option<SystemTime>,
    /// The names (of the passthrough listeners routing here) that the backend's certificate
    /// does not cover, as of the last tls/https check; `None` before one saw a certificate.
    /// Reported, never a reason to take the backend out (SPEC §8).
    pub missing_names: Option<Vec<String>>,
    /// The backend certificate's notAfter (Unix seconds), from the last tls/https check.
    pub certificate_not_after: Option<i64>,
}

/// Health of one backend.
#[derive(Debug)]
pub struct BackendHealth {
    healthy: AtomicBool,
    status: Mutex<Status>,
}

impl BackendHealth {
    /// A backend no check has seen yet, counted as `healthy` until the first result.
    pub fn new(healthy: bool) -> Self {
        Self {
            healthy: AtomicBool::new(healthy),
            status: Mutex::new(Status {
                state: State::Unknown,
                passes: 0,
                failures: 0,
                reason: "not checked yet".into(),
                last_check: None,
                missing_names: None,
                certificate_not_after: None,
            }),
        }
    }

    /// Whether the backend takes new connections: one atomic load, for the data path.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A copy of the current status.
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Records what a check saw of the backend's certificate. Returns the previous missing
    /// names when they changed (so a change is logged once, not on every check).
    pub fn set_certificate(
        &self,
        missing: Vec<String>,
        not_after: Option<i64>,
    ) -> Option<Option<Vec<String>>> {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.certificate_not_after = not_after;
        if s.missing_names.as_ref() == Some(&missing) {
            return None;
        }
        Some(s.missing_names.replace(missing))
    }

    /// Records one result. Returns the previous and the new state when it changed.
    pub fn observe(
        &self,
        pass: bool,
        reason: &str,
        rise: u32,
        fall: u32,
    ) -> Option<(State, State)> {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.reason = reason.to_string();
        s.last_check = Some(SystemTime::now());
        if pass {
            s.passes = s.passes.saturating_add(1);
            s.failures = 0;
        } else {
            s.failures = s.failures.saturating_add(1);
            s.passes = 0;
        }
        let next = match (s.state, pass) {
            // The first result decides on its own (SPEC §3).
            (State::Unknown, true) => State::Healthy,
            (State::Unknown, false) => State::Unhealthy,
            (State::Unhealthy, true) if s.passes >= rise => State::Healthy,
            (State::Healthy, false) if s.failures >= fall => State::Unhealthy,
            (state, _) => state,
        };
        self.healthy
            .store(next == State::Healthy, Ordering::Relaxed);
        if next == s.state {
            return None;
        }
        let prev = std::mem::replace(&mut s.state, next);
        Some((prev, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_then_rise_and_fall() {
        let h = BackendHealth::new(true);
        assert_eq!(
            h.observe(false, "connection refused", 2, 3),
            Some((State::Unknown, State::Unhealthy))
        );
        assert!(!h.is_healthy());
        assert_eq!(h.observe(true, "ok", 2, 3), None);
        assert!(!h.is_healthy(), "one pass is not enough with rise = 2");
        assert_eq!(
            h.observe(true, "ok", 2, 3),
            Some((State::Unhealthy, State::Healthy))
        );
        assert_eq!(h.observe(false, "x", 2, 3), None);
        assert_eq!(h.observe(false, "x", 2, 3), None);
        assert!(h.is_healthy());
        assert_eq!(
            h.observe(false, "status 500", 2, 3),
            Some((State::Healthy, State::Unhealthy))
        );
        assert_eq!(h.status().reason, "status 500");
    }

    #[test]
    fn a_pass_resets_the_failure_count() {
        let h = BackendHealth::new(true);
        h.observe(true, "ok", 1, 2);
        h.observe(false, "x", 1, 2);
        h.observe(true, "ok", 1, 2);
        h.observe(false, "x", 1, 2);
        assert!(h.is_healthy());
    }

    #[test]
    fn unknown_backend_added_later_starts_out_of_rotation() {
        assert!(!BackendHealth::new(false).is_healthy());
        assert_eq!(BackendHealth::new(false).status().state, State::Unknown);
    }

    /// SPEC §8: a change of the missing names is reported once, not on every check.
    #[test]
    fn certificate_coverage_changes_are_reported_once() {
        let h = BackendHealth::new(true);
        assert_eq!(h.set_certificate(vec!["vip".into()], Some(1)), Some(None));
        assert_eq!(h.set_certificate(vec!["vip".into()], Some(1)), None);
        assert_eq!(
            h.set_certificate(Vec::new(), Some(2)),
            Some(Some(vec!["vip".to_string()]))
        );
        assert_eq!(h.set_certificate(Vec::new(), Some(2)), None);
        assert_eq!(h.status().certificate_not_after, Some(2));
    }
}
