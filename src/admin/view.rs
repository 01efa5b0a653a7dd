//! The admin view: one immutable snapshot of what runs (listeners, pools, draining backends,
//! certificates, the last reload), published whole by the runtime, and the judgements every
//! endpoint shares (`/readyz`'s reasons, the service manager's status line, time formats).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::IntGauge;

use crate::balance::{Backend, Pool};
use crate::config::{CertificateInfo, Mode};
use crate::phase::Phase;

/// What the admin endpoints show: one immutable snapshot, replaced whole.
#[derive(Debug, Clone)]
pub(crate) struct View {
    /// Listeners in config order.
    pub listeners: Vec<ListenerView>,
    /// Pools in config order, as the data path sees them.
    pub pools: Vec<Arc<Pool>>,
    /// Backends a reload removed whose connections were still open then: shown as
    /// `draining` while they still have some and their drain deadline has not passed.
    pub draining: Vec<(String, Arc<Backend>)>,
    /// Every certificate the config names.
    pub certificates: Vec<CertificateInfo>,
    /// When the running config was loaded.
    pub loaded_at: SystemTime,
    /// The last reload, when there was one.
    pub last_reload: Option<ReloadOutcome>,
}

impl View {
    /// The view before anything is bound.
    pub(crate) fn empty() -> Self {
        Self {
            listeners: Vec::new(),
            pools: Vec::new(),
            draining: Vec::new(),
            certificates: Vec::new(),
            loaded_at: SystemTime::now(),
            last_reload: None,
        }
    }

    /// Removed backends of `pool` that still drain connections.
    pub(crate) fn draining_in<'a>(
        &'a self,
        pool: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Backend>> {
        self.draining
            .iter()
            .filter(move |(p, b)| p == pool && b.active() > 0 && !b.drain.is_cancelled())
            .map(|(_, b)| b)
    }

    /// One line for a service manager's `STATUS=`: listeners and healthy backends, or why
    /// the last reload failed.
    pub(crate) fn status_line(&self) -> String {
        if let Some(e) = self.last_reload.as_ref().and_then(|r| r.error.as_ref()) {
            let first = e.lines().next().unwrap_or_default();
            return format!("reload failed, running the previous config: {first}");
        }
        let total: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        let healthy: usize = self
            .pools
            .iter()
            .map(|p| p.backends.iter().filter(|b| b.health.is_healthy()).count())
            .sum();
        let addrs: usize = self.listeners.iter().map(|l| l.listen.len()).sum();
        format!(
            "{} listeners on {addrs} addresses, {healthy}/{total} backends healthy",
            self.listeners.len()
        )
    }
}

/// One listener on the status page.
#[derive(Debug, Clone)]
pub(crate) struct ListenerView {
    /// Its name.
    pub name: String,
    /// passthrough or terminate.
    pub mode: Mode,
    /// Bound addresses.
    pub listen: Vec<SocketAddr>,
    /// Where connections go (`ListenerConfig::destination`).
    pub destination: String,
    /// Every pool it uses.
    pub pools: Vec<String>,
    /// The default pool and the routes, for the JSON view.
    pub pool: Option<String>,
    /// SNI routes.
    pub routes: Vec<crate::config::RouteConfig>,
    /// Open connections.
    pub active: IntGauge,
}

/// How the last reload went.
#[derive(Debug, Clone)]
pub(crate) struct ReloadOutcome {
    /// When it happened.
    pub at: SystemTime,
    /// The error, if it failed (the running config then stayed as it was).
    pub error: Option<String>,
}

/// Why the gateway is not ready, or `None` when every listener's pool has a healthy backend.
pub(crate) fn not_ready(view: &View, phase: Phase) -> Option<String> {
    match phase {
        Phase::Running | Phase::Reloading => {}
        Phase::Starting => return Some("starting: listeners are being bound\n".into()),
        Phase::Draining | Phase::Stopped => {
            return Some("draining: shutting down, not accepting new connections\n".into())
        }
    }
    let mut reasons = String::new();
    for pool in &view.pools {
        if pool.backends.iter().any(|b| b.health.is_healthy()) {
            continue;
        }
        let users: Vec<&str> = view
            .listeners
            .iter()
            .filter(|l| l.pools.contains(&pool.cfg.name))
            .map(|l| l.name.as_str())
            .collect();
        if users.is_empty() {
            continue;
        }
        let _ = writeln!(
            reasons,
            "pool {:?} has no healthy backend (used by listener{} {})",
            pool.cfg.name,
            if users.len() == 1 { "" } else { "s" },
            users.join(", ")
        );
    }
    (!reasons.is_empty()).then_some(reasons)
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(crate) fn unix_rfc3339(secs: i64) -> String {
    rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}
