//! Backends and pools as the data path sees them, and the three selection algorithms.
//!
//! A [`Pool`] is part of an immutable snapshot: its backend list never changes after it is
//! built. A [`Backend`] is shared (`Arc`) so that a reload can carry one over into the next
//! snapshot with its live counters. Selection is pure computation over atomics: no I/O, no
//! lock, no allocation per pick. Connect retries call [`Pool::pick`] again with the backends
//! already tried excluded, so every attempt follows the same algorithm.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendConfig, Balance, PoolConfig, WhenAllDown};
use crate::health::state::{BackendHealth, State};
use crate::metrics::{BackendMetrics, Metrics};
use crate::relay::Tracked;

/// Milliseconds on a process-wide monotonic clock.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

// === Backend ===

/// One apiserver, with the counters the balancer and the metrics read.
#[derive(Debug)]
pub(crate) struct Backend {
    /// Display name.
    pub name: String,
    /// The address as configured (`host:port` or `IP:port`).
    pub address: String,
    /// Where connections go.
    pub addr: SocketAddr,
    /// Relative share of new connections.
    pub weight: u32,
    /// Metric handles, resolved once by name.
    pub metrics: BackendMetrics,
    /// Health state; the data path reads one atomic flag of it. Shared with the next
    /// snapshot's backend of the same address, even if its name or weight changed.
    pub health: Arc<BackendHealth>,
    /// Cancelled when the backend's connections must end: at the shutdown deadline (it is a
    /// child of the gateway's drain token) or `drain_timeout` after a reload removed it.
    pub drain: CancellationToken,
    /// When the slow-start ramp began, as [`now_ms`] + 1; 0 while not ramping.
    ramp_start: AtomicU64,
    /// Connections open to (or being opened to) this backend: the figure least-conn compares.
    /// Its own count, shared with renamed copies, rather than the gauge: a renamed backend gets
    /// a new gauge, and a new backend under an old name would share the old one's.
    load: Arc<AtomicU64>,
    /// Its open passthrough relays, for the rebalancer.
    pub(crate) relays: Arc<Relays>,
}

impl Backend {
    /// Builds a backend with its metric handles resolved. `healthy` is its state until the
    /// first check ends: true at start-up (the gateway serves from its first second), false
    /// for a backend a reload added (it takes traffic once a check passed).
    pub(crate) fn new(
        pool: &str,
        cfg: &BackendConfig,
        metrics: &Metrics,
        healthy: bool,
        drain: &CancellationToken,
    ) -> Self {
        let metrics = metrics.backend(pool, &cfg.name);
        metrics.healthy.set(i64::from(healthy));
        Self {
            name: cfg.name.clone(),
            address: cfg.address.clone(),
            addr: cfg.addr,
            weight: cfg.weight.max(1),
            metrics,
            health: Arc::new(BackendHealth::new(healthy)),
            drain: drain.child_token(),
            ramp_start: AtomicU64::new(0),
            load: Arc::default(),
            relays: Arc::default(),
        }
    }

    /// The same backend under a new name or weight: health, drain token and ramp carry over.
    fn renamed(&self, pool: &str, cfg: &BackendConfig, metrics: &Metrics) -> Self {
        let m = metrics.backend(pool, &cfg.name);
        m.healthy.set(i64::from(self.health.is_healthy()));
        Self {
            name: cfg.name.clone(),
            address: cfg.address.clone(),
            addr: cfg.addr,
            weight: cfg.weight.max(1),
            metrics: m,
            health: self.health.clone(),
            drain: self.drain.clone(),
            ramp_start: AtomicU64::new(self.ramp_start.load(Ordering::Relaxed)),
            load: self.load.clone(),
            relays: self.relays.clone(),
        }
    }

    /// Starts the slow-start ramp now (the backend just turned healthy again).
    pub(crate) fn start_ramp(&self) {
        self.ramp_start.store(now_ms() + 1, Ordering::Relaxed);
    }

    /// The share of its weight the backend gets at `now` (0.1 to 1.0 over `window`).
    fn ramp_factor(&self, window: Duration, now: u64) -> f64 {
        let start = self.ramp_start.load(Ordering::Relaxed);
        if start == 0 {
            return 1.0;
        }
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let elapsed = now.saturating_sub(start - 1);
        if elapsed >= window_ms {
            // Ramp over: stop paying for the clock on every pick.
            let _ =
                self.ramp_start
                    .compare_exchange(start, 0, Ordering::Relaxed, Ordering::Relaxed);
            return 1.0;
        }
        0.1 + 0.9 * (elapsed as f64 / window_ms as f64)
    }

    /// Connections open to (or being opened to) this backend.
    pub(crate) fn active(&self) -> u64 {
        self.load.load(Ordering::Relaxed)
    }
}

/// The passthrough relays of one backend that the rebalancer may end (SPEC §11), shared
/// with renamed copies of the backend like its load count. A lock taken twice per
/// connection (in and out) and once a second by the rebalancer, never per read.
#[derive(Debug, Default)]
pub(crate) struct Relays {
    next: AtomicU64,
    open: std::sync::Mutex<HashMap<u64, Arc<Tracked>>>,
}

impl Relays {
    /// The relays open now.
    pub(crate) fn snapshot(&self) -> Vec<Arc<Tracked>> {
        self.open
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Counts one connection as active on a backend for as long as it lives, on every exit path,
/// and keeps its relay in the backend's [`Relays`] once it has one.
#[derive(Debug)]
pub(crate) struct ActiveGuard(Arc<Backend>, u64);

// [`ActiveGuard`]'s relay id while it has none: a sentinel, not an `Option`, since every idle
// connection pays for the guard's size; the relay's own sentinel.
use crate::relay::UNTRACKED;

impl ActiveGuard {
    /// Marks a new connection to `backend` as active.
    pub(crate) fn new(backend: Arc<Backend>) -> Self {
        backend.load.fetch_add(1, Ordering::Relaxed);
        backend.metrics.active.inc();
        Self(backend, UNTRACKED)
    }

    /// The backend this guard counts against.
    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.0
    }

    /// Registers the connection's relay with its backend, for the rebalancer; it leaves the
    /// registry when the guard drops.
    pub(crate) fn track(&mut self) -> Arc<Tracked> {
        let relays = &self.0.relays;
        let id = relays.next.fetch_add(1, Ordering::Relaxed) % UNTRACKED;
        let t = Arc::new(Tracked::new(id));
        if let Ok(mut m) = relays.open.lock() {
            m.insert(id, t.clone());
            self.1 = id;
        }
        t
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.dec();
        if self.1 != UNTRACKED {
            if let Ok(mut m) = self.0.relays.open.lock() {
                m.remove(&self.1);
            }
        }
    }
}

// === Pool ===

/// A pool as one snapshot sees it.
#[derive(Debug)]
pub(crate) struct Pool {
    /// The validated settings.
    pub cfg: Arc<PoolConfig>,
    /// Backends in configuration order.
    pub backends: Vec<Arc<Backend>>,
    /// Round-robin position; also rotates least-conn tie-breaks.
    cursor: AtomicUsize,
    /// Sum of weights, for weighted round-robin.
    total_weight: usize,
    /// Counted when a connection is routed while no backend is healthy.
    pub fail_open: IntCounter,
    /// Set while all backends are down and the warning for this episode was logged.
    all_down_warned: AtomicBool,
    /// TLS sessions of terminate listeners' backend connections, per backend address.
    pub(crate) sessions: Arc<crate::tls::SessionStores>,
    /// The names clients use to reach this pool through passthrough listeners: every
    /// backend certificate must cover them (SPEC §8).
    pub(crate) names: Vec<String>,
}

impl Pool {
    /// Builds a pool from its config. A backend of the `previous` pool of that name with the
    /// same address is the same backend (SPEC §3, Hot reload): reused as is, or, if its name
    /// or weight changed, rebuilt around the same health state and drain token. Other
    /// backends are new and start `healthy_at_first` (see [`Backend::new`]); their drain
    /// tokens are children of `drain`. The backends' TLS sessions carry over too: they are
    /// live state, which a validated config does not hold.
    pub(crate) fn new(
        cfg: Arc<PoolConfig>,
        metrics: &Metrics,
        previous: Option<&Self>,
        healthy_at_first: bool,
        drain: &CancellationToken,
    ) -> Self {
        let existing: &[Arc<Backend>] = previous.map_or(&[], |p| &p.backends);
        let sessions = previous.map_or_else(Arc::default, |p| p.sessions.clone());
        let backends: Vec<Arc<Backend>> = cfg
            .backends
            .iter()
            .map(|b| match existing.iter().find(|e| e.addr == b.addr) {
                // The address as written matters too: without [pool.tls] server_name it is the
                // name TLS verifies.
                Some(e) if e.name == b.name && e.weight == b.weight && e.address == b.address => {
                    e.clone()
                }
                Some(e) => Arc::new(e.renamed(&cfg.name, b, metrics)),
                None => Arc::new(Backend::new(&cfg.name, b, metrics, healthy_at_first, drain)),
            })
            .collect();
        let total_weight = backends.iter().map(|b| b.weight as usize).sum();
        Self {
            fail_open: metrics.pool_fail_open(&cfg.name),
            cfg,
            sessions,
            names: Vec::new(),
            backends,
            cursor: AtomicUsize::new(0),
            total_weight,
            all_down_warned: AtomicBool::new(false),
        }
    }

    /// The pool with the names its backends' certificates must cover.
    pub(crate) fn with_names(mut self, names: Vec<String>) -> Self {
        self.names = names;
        self
    }

    /// Records what a tls/https check saw of `backend`'s certificate (DER): expiry and the
    /// names it does not cover, in the metrics and the status; a change of the missing names
    /// is logged once. Coverage never decides health: the names are the clients' matter.
    pub(crate) fn observe_certificate(&self, backend: &Backend, der: &[u8]) {
        let sans = crate::tls::Sans::of(der);
        let missing: Vec<String> = sans
            .missing(&self.names)
            .into_iter()
            .map(str::to_string)
            .collect();
        let not_after = crate::tls::subject_and_expiry(der).map(|(_, t)| t);
        if let Some(t) = not_after {
            backend.metrics.cert_expiry.set(t);
        }
        backend
            .metrics
            .covers_names
            .set(i64::from(missing.is_empty()));
        if let Some(before) = backend.health.set_certificate(missing.clone(), not_after) {
            if !missing.is_empty() {
                tracing::warn!(pool = %self.cfg.name, backend = %backend.name, missing = ?missing, "backend certificate does not cover names clients use through the gateway: they will fail with \"certificate is valid for ..., not NAME\"; add them to its SANs");
            } else if before.is_some_and(|b| !b.is_empty()) {
                tracing::info!(pool = %self.cfg.name, backend = %backend.name, "backend certificate now covers every name clients use");
            }
        }
    }

    /// Records a health result (an active check's, or a failed proxied connect's) for `backend`:
    /// the state machine, the gauge, the slow-start ramp on a return, and a log line on change.
    pub(crate) fn observe(&self, backend: &Backend, pass: bool, reason: &str) {
        let pool = self;
        let h = &pool.cfg.health;
        if let Some((prev, state)) = backend.health.observe(pass, reason, h.rise, h.fall) {
            backend
                .metrics
                .healthy
                .set(i64::from(state == State::Healthy));
            // Only a return ramps: at start-up every backend begins together at full weight.
            let ramp = prev == State::Unhealthy
                && state == State::Healthy
                && !pool.cfg.slow_start.is_zero();
            if ramp {
                backend.start_ramp();
                tracing::info!(pool = %pool.cfg.name, backend = %backend.name, slow_start = %humantime::format_duration(pool.cfg.slow_start), "slow start: ramping up from 10% of its weight");
            }
            match state {
                State::Healthy => {
                    tracing::info!(pool = %pool.cfg.name, backend = %backend.name, reason, "backend is healthy")
                }
                _ => {
                    tracing::warn!(pool = %pool.cfg.name, backend = %backend.name, reason, "backend is unhealthy")
                }
            }
        }
    }

    /// The name checked in `backend`'s certificate (see [`crate::tls::backend_server_name`]).
    pub(crate) fn server_name(&self, backend: &Backend) -> rustls::pki_types::ServerName<'static> {
        let configured = self.cfg.tls.as_ref().and_then(|t| t.server_name.as_deref());
        crate::tls::backend_server_name(configured, &backend.address, backend.addr.ip())
    }

    /// Picks a healthy backend for a new connection, skipping the indexes in `tried`.
    ///
    /// When no backend is healthy, `when_all_down` decides: `fail-open` picks among all of
    /// them (counted, and warned about once per episode), `reject` picks none. Returns the
    /// index into [`Pool::backends`], or `None`.
    pub(crate) fn pick(&self, tried: &[usize]) -> Option<usize> {
        if self.backends.iter().any(|b| b.health.is_healthy()) {
            // Load before swap: the common case reads a shared line instead of writing it.
            if self.all_down_warned.load(Ordering::Relaxed)
                && self.all_down_warned.swap(false, Ordering::Relaxed)
            {
                tracing::info!(pool = %self.cfg.name, "a backend is healthy again; fail-open ended");
            }
            return self
                .pick_among(|i| !tried.contains(&i) && self.backends[i].health.is_healthy());
        }
        match self.cfg.when_all_down {
            WhenAllDown::Reject => None,
            WhenAllDown::FailOpen => {
                if tried.is_empty() {
                    self.fail_open.inc();
                    if !self.all_down_warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(pool = %self.cfg.name, "no backend is healthy: routing among all of them (when_all_down = fail-open)");
                    }
                }
                self.pick_among(|i| !tried.contains(&i))
            }
        }
    }

    /// `backend`'s weight as selection uses it now: its configured weight, times the
    /// slow-start ramp while one runs.
    pub(crate) fn effective_weight(&self, backend: &Backend) -> f64 {
        let w = f64::from(backend.weight);
        if self.cfg.slow_start.is_zero() || backend.ramp_start.load(Ordering::Relaxed) == 0 {
            return w;
        }
        w * backend.ramp_factor(self.cfg.slow_start, now_ms())
    }

    fn pick_among(&self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        // The clock is read only while some backend has a ramp on record, and a ramp that
        // has ended is cleared here, so exact selection resumes on the very next pick.
        if !self.cfg.slow_start.is_zero()
            && self
                .backends
                .iter()
                .any(|b| b.ramp_start.load(Ordering::Relaxed) != 0)
        {
            let now = now_ms();
            if self
                .backends
                .iter()
                .any(|b| b.ramp_factor(self.cfg.slow_start, now) < 1.0)
            {
                return self.pick_ramping(ok, now);
            }
        }
        match self.cfg.balance {
            Balance::LeastConn => self.least_conn(ok),
            Balance::RoundRobin => self.round_robin(ok),
            Balance::RandomTwo => self.random_two(ok),
        }
    }

    /// Selection while a backend ramps up (SPEC §3: its weight grows linearly from 10% to
    /// 100% over `slow_start`, for every algorithm). Exact round-robin cannot express a
    /// fractional weight, so this path trades it for weighted random choices; it only runs
    /// during a ramp.
    fn pick_ramping(&self, ok: impl Fn(usize) -> bool, now: u64) -> Option<usize> {
        let w = |i: usize| {
            let b = &self.backends[i];
            f64::from(b.weight) * b.ramp_factor(self.cfg.slow_start, now)
        };
        match self.cfg.balance {
            // Least-conn on (active + u) / weight with u uniform in [0, 1): a ramping backend
            // may hold only its growing share of the open connections, and with short
            // connections (all loads zero) it wins in proportion to its weight instead of
            // never or always.
            Balance::LeastConn => (0..self.backends.len())
                .filter(|&i| ok(i))
                .map(|i| {
                    let load = self.backends[i].active() as f64 + rand::random::<f64>();
                    (i, load / w(i))
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(i, _)| i),
            Balance::RoundRobin => self.weighted_random(&ok, &w, None),
            Balance::RandomTwo => {
                let a = self.weighted_random(&ok, &w, None)?;
                let Some(b) = self.weighted_random(&ok, &w, Some(a)) else {
                    return Some(a);
                };
                let la = self.backends[a].active() as f64 / w(a);
                let lb = self.backends[b].active() as f64 / w(b);
                Some(if lb < la { b } else { a })
            }
        }
    }

    /// One backend drawn with probability proportional to `w`, skipping `not`.
    fn weighted_random(
        &self,
        ok: &impl Fn(usize) -> bool,
        w: &impl Fn(usize) -> f64,
        not: Option<usize>,
    ) -> Option<usize> {
        let eligible = |i: usize| ok(i) && Some(i) != not;
        let n = self.backends.len();
        let total: f64 = (0..n).filter(|&i| eligible(i)).map(w).sum();
        if total <= 0.0 {
            return None;
        }
        let mut r = rand::random::<f64>() * total;
        let mut last = None;
        for i in (0..n).filter(|&i| eligible(i)) {
            last = Some(i);
            r -= w(i);
            if r < 0.0 {
                return Some(i);
            }
        }
        // Rounding can leave r at a hair above zero after the last backend.
        last
    }

    fn least_conn(&self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        // Starting the scan at a rotating offset and keeping the first strict minimum breaks
        // ties round-robin without a second pass.
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, u128)> = None;
        let mut best_weight = 1u128;
        for k in 0..n {
            let i = (start.wrapping_add(k)) % n;
            if !ok(i) {
                continue;
            }
            let b = &self.backends[i];
            let load = u128::from(b.active());
            let w = u128::from(b.weight);
            // load_i / w_i < load_best / w_best, without division.
            let better = match best {
                None => true,
                Some((_, best_load)) => load * best_weight < best_load * w,
            };
            if better {
                best = Some((i, load));
                best_weight = w;
            }
        }
        best.map(|(i, _)| i)
    }

    fn round_robin(&self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.backends.len();
        if n == 0 || self.total_weight == 0 {
            return None;
        }
        // Weighted: the cursor walks slots, a backend owning `weight` consecutive slots.
        let mut slot = self.cursor.fetch_add(1, Ordering::Relaxed) % self.total_weight;
        let mut first = 0;
        for (i, b) in self.backends.iter().enumerate() {
            let w = b.weight as usize;
            if slot < w {
                first = i;
                break;
            }
            slot -= w;
        }
        (0..n).map(|k| (first + k) % n).find(|&i| ok(i))
    }

    fn random_two(&self, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.backends.len();
        let eligible = (0..n).filter(|&i| ok(i)).count();
        let nth = |k: usize| (0..n).filter(|&i| ok(i)).nth(k);
        match eligible {
            0 => None,
            1 => nth(0),
            m => {
                let a = rand::random_range(0..m);
                // A second, different pick: draw from the m-1 others.
                let mut b = rand::random_range(0..m - 1);
                if b >= a {
                    b += 1;
                }
                let (ia, ib) = (nth(a)?, nth(b)?);
                let (ba, bb) = (&self.backends[ia], &self.backends[ib]);
                let la = u128::from(ba.active()) * u128::from(bb.weight);
                let lb = u128::from(bb.active()) * u128::from(ba.weight);
                Some(if lb < la { ib } else { ia })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WhenAllDown;
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn pool(balance: Balance, weights: &[u32]) -> Pool {
        let cfg = PoolConfig {
            name: "p".into(),
            balance,
            connect_timeout: Duration::from_secs(1),
            connect_attempts: NonZeroU32::MIN,
            when_all_down: WhenAllDown::FailOpen,
            drain_timeout: Duration::from_secs(1),
            slow_start: Duration::ZERO,
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| BackendConfig {
                    name: format!("b{i}"),
                    address: format!("127.0.0.1:{}", 1000 + i),
                    addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                    weight: w,
                })
                .collect(),
            health: Default::default(),
            send_proxy: None,
            rebalance: None,
            tls: None,
        };
        Pool::new(
            Arc::new(cfg),
            &Metrics::new(),
            None,
            true,
            &CancellationToken::new(),
        )
    }

    fn counts(p: &Pool, n: usize) -> Vec<usize> {
        let mut c = vec![0; p.backends.len()];
        for _ in 0..n {
            c[p.pick(&[]).expect("a backend")] += 1;
        }
        c
    }

    #[test]
    fn round_robin_is_exactly_even() {
        assert_eq!(
            counts(&pool(Balance::RoundRobin, &[1, 1, 1]), 300),
            [100, 100, 100]
        );
    }

    #[test]
    fn round_robin_follows_weights() {
        assert_eq!(
            counts(&pool(Balance::RoundRobin, &[1, 2, 3]), 600),
            [100, 200, 300]
        );
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_per_weight() {
        let p = pool(Balance::LeastConn, &[1, 1, 2]);
        let _a = ActiveGuard::new(p.backends[0].clone());
        let _b = ActiveGuard::new(p.backends[2].clone());
        // b1 has 0 active: it wins.
        assert_eq!(p.pick(&[]), Some(1));
        let _c = ActiveGuard::new(p.backends[1].clone());
        // Now 1/1, 1/1, 1/2: b2 has the lowest load per weight.
        assert_eq!(p.pick(&[]), Some(2));
    }

    #[test]
    fn least_conn_breaks_ties_in_turn() {
        let p = pool(Balance::LeastConn, &[1, 1, 1]);
        assert_eq!(counts(&p, 300), [100, 100, 100]);
    }

    #[test]
    fn least_conn_with_held_connections_stays_balanced() {
        let p = pool(Balance::LeastConn, &[1, 1, 1]);
        let guards: Vec<ActiveGuard> = (0..300)
            .map(|_| ActiveGuard::new(p.backends[p.pick(&[]).expect("pick")].clone()))
            .collect();
        assert_eq!(guards.len(), 300);
        for b in &p.backends {
            assert_eq!(b.active(), 100);
        }
    }

    #[test]
    fn random_two_picks_the_less_loaded_of_two() {
        let p = pool(Balance::RandomTwo, &[1, 1]);
        let _held: Vec<ActiveGuard> = (0..5)
            .map(|_| ActiveGuard::new(p.backends[0].clone()))
            .collect();
        // With two backends both are always drawn, so the idle one always wins.
        for _ in 0..50 {
            assert_eq!(p.pick(&[]), Some(1));
        }
    }

    #[test]
    fn every_algorithm_skips_tried_backends_and_ends() {
        for balance in [Balance::LeastConn, Balance::RoundRobin, Balance::RandomTwo] {
            let p = pool(balance, &[1, 1, 1]);
            let mut tried = Vec::new();
            while let Some(i) = p.pick(&tried) {
                assert!(!tried.contains(&i), "{balance:?} returned a tried backend");
                tried.push(i);
            }
            tried.sort_unstable();
            assert_eq!(tried, [0, 1, 2], "{balance:?}");
        }
    }

    fn ramping_pool(balance: Balance) -> Pool {
        let mut p = pool(balance, &[1, 1, 1]);
        let mut cfg = (*p.cfg).clone();
        cfg.slow_start = Duration::from_secs(3600);
        p.cfg = Arc::new(cfg);
        p.backends[2].start_ramp();
        p
    }

    #[test]
    fn a_ramping_backend_starts_near_a_tenth_of_its_share() {
        for balance in [Balance::LeastConn, Balance::RoundRobin, Balance::RandomTwo] {
            let p = ramping_pool(balance);
            let c = counts(&p, 3000);
            // Full share would be 1000; at 10% weight it is about 3000 * 0.1 / 2.1 = 143.
            assert!(c[2] < 400, "{balance:?}: ramping backend got {c:?}");
            assert!(c[2] > 20, "{balance:?}: ramping backend got nothing: {c:?}");
        }
    }

    #[test]
    fn ramp_factor_grows_linearly_and_ends() {
        let p = ramping_pool(Balance::RoundRobin);
        let b = &p.backends[2];
        let start = b.ramp_start.load(Ordering::Relaxed) - 1;
        let w = Duration::from_millis(1000);
        assert!((b.ramp_factor(w, start) - 0.1).abs() < 1e-9);
        assert!((b.ramp_factor(w, start + 500) - 0.55).abs() < 1e-9);
        assert!((b.ramp_factor(w, start + 1000) - 1.0).abs() < 1e-9);
        assert_eq!(
            b.ramp_start.load(Ordering::Relaxed),
            0,
            "ramp cleared at its end"
        );
    }

    #[test]
    fn reload_keeps_unchanged_backends() {
        let metrics = Metrics::new();
        let p1 = pool(Balance::LeastConn, &[1, 1]);
        let _g = ActiveGuard::new(p1.backends[0].clone());
        let p2 = Pool::new(
            p1.cfg.clone(),
            &metrics,
            Some(&p1),
            false,
            &CancellationToken::new(),
        );
        assert!(Arc::ptr_eq(&p1.backends[0], &p2.backends[0]));
        assert_eq!(p2.backends[0].active(), 1);
        // Renamed: a new object around the same health and drain token.
        let mut cfg = (*p1.cfg).clone();
        cfg.backends[1].name = "renamed".into();
        let p3 = Pool::new(
            Arc::new(cfg),
            &metrics,
            Some(&p2),
            false,
            &CancellationToken::new(),
        );
        assert!(Arc::ptr_eq(&p2.backends[1].health, &p3.backends[1].health));
        assert_eq!(p3.backends[1].name, "renamed");
        assert!(
            p3.backends[1].health.is_healthy(),
            "carried over, not a new backend"
        );
    }

    /// The address as written is the TLS name when the pool has no server_name: a change of
    /// it (same IP) must reach the backend object, not leave the old name in place.
    #[test]
    fn a_rewritten_address_with_the_same_ip_is_carried_with_the_new_text() {
        let metrics = Metrics::new();
        let p1 = pool(Balance::LeastConn, &[1]);
        let mut cfg = (*p1.cfg).clone();
        cfg.backends[0].address = "cp0.internal:1000".into();
        let p2 = Pool::new(
            Arc::new(cfg),
            &metrics,
            Some(&p1),
            false,
            &CancellationToken::new(),
        );
        assert_eq!(p2.backends[0].address, "cp0.internal:1000");
        assert!(
            Arc::ptr_eq(&p1.backends[0].health, &p2.backends[0].health),
            "same backend"
        );
    }

    /// Round-2 hardening, item 9: least-conn counted through the gauge of the backend's name,
    /// so a renamed backend looked idle and a new backend under an old name looked busy.
    #[test]
    fn the_load_figure_follows_the_backend_not_its_name() {
        let metrics = Metrics::new();
        let base = pool(Balance::LeastConn, &[1, 1]);
        let p1 = Pool::new(base.cfg, &metrics, None, true, &CancellationToken::new());
        let _held = [
            ActiveGuard::new(p1.backends[0].clone()),
            ActiveGuard::new(p1.backends[0].clone()),
        ];
        // b0 renamed: still two open connections.
        let mut cfg = (*p1.cfg).clone();
        cfg.backends[0].name = "renamed".into();
        let p2 = Pool::new(
            Arc::new(cfg.clone()),
            &metrics,
            Some(&p1),
            false,
            &CancellationToken::new(),
        );
        assert_eq!(p2.backends[0].active(), 2);
        // A new address under b0's old name: a new backend with nothing open.
        cfg.backends[0].name = p1.backends[0].name.clone();
        cfg.backends[0].addr = "10.9.9.9:6443".parse().expect("addr");
        let p3 = Pool::new(
            Arc::new(cfg),
            &metrics,
            Some(&p2),
            false,
            &CancellationToken::new(),
        );
        assert_eq!(p3.backends[0].active(), 0);
    }
}
