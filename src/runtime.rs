//! What is running: the listening sockets and their accept loops, the listeners' snapshots,
//! the pools, the health loops and the admin view, and how a reload [`Plan`] is applied.
//!
//! `Running` is built once by [`crate::Gateway::start`] (which applies the plan from nothing
//! to the config) and changed only by [`Running::apply`], in short steps: bind every new
//! socket first (a failure changes nothing), build the pools (carrying backends over by
//! address), drain what went away, publish the listeners' new snapshots, stop and start
//! sockets, restart the health loops, and publish the admin view. Deciding what to do is
//! [`crate::reload::plan`]'s; loading the file is the reloader's, off the runtime's workers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{ListenerView, View};
use crate::balance::{Backend, Pool};
use crate::config::{Config, Mode};
use crate::listener::AcceptLoop;
use crate::metrics::Metrics;
use crate::reload::plan::{plan, Deployed, Plan, ReloadSummary, SocketKey};
use crate::snapshot::{ListenerSnapshot, Route};
use crate::{health, terminate};

/// Failure to start the gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listening address could not be bound.
    #[error("listener {listener:?}: cannot listen on {addr}: {source}")]
    Bind {
        /// The listener's name.
        listener: String,
        /// The address from the config.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The config names a pool that it does not define (`config::load` rules this out).
    #[error("listener {0:?} refers to an unknown pool")]
    UnknownPool(String),
}

/// One listening socket.
struct Socket {
    key: SocketKey,
    /// The address actually bound.
    bound: SocketAddr,
    /// What its accept loop reads per connection.
    state: Arc<ArcSwap<ListenerSnapshot>>,
    /// Stops this socket's accept loop.
    stop: CancellationToken,
}

/// What a listener keeps across reloads.
struct ListenerRt {
    limit: Arc<Semaphore>,
    /// The limit in force: permits in the semaphore (held and free) once `owed` is paid.
    max: u32,
    /// Permits still to be taken back after `max_connections` was lowered while more
    /// connections than the new limit were open: taken as connections close.
    owed: Arc<std::sync::Mutex<Debt>>,
    /// The task collecting `owed`.
    shrink: Option<tokio::task::AbortHandle>,
    /// Handshake slots (terminate listeners) and their number.
    handshakes: (Arc<Semaphore>, u32),
    drain: CancellationToken,
}

/// Permits still owed after a lowered limit, and which collecting task may pay them: a task
/// whose epoch is no longer current gives what it gathered back instead (comparing amounts
/// alone let a stale task pay a newer debt and leave the new task waiting forever).
#[derive(Debug, Default)]
struct Debt {
    owed: u32,
    epoch: u64,
}

/// The gateway's running state.
pub(crate) struct Running {
    pub(crate) metrics: Arc<Metrics>,
    /// Parent of every socket's stop token: shutdown stops all accept loops and health.
    pub(crate) stop: CancellationToken,
    /// Parent of every listener's and backend's drain token: the shutdown deadline.
    pub(crate) drain: CancellationToken,
    /// Connection tasks.
    pub(crate) tracker: TaskTracker,
    /// Accept-loop tasks.
    pub(crate) accepts: TaskTracker,
    pub(crate) view: Arc<ArcSwap<View>>,
    pub(crate) config: Config,
    sockets: Vec<Socket>,
    listeners: HashMap<String, ListenerRt>,
    pools: Vec<Arc<Pool>>,
    /// Backends a reload removed, kept for the admin view while their connections drain.
    removed: Vec<(String, Arc<Backend>)>,
    /// Each pool's health loops, and what they were started for: a reload that changes
    /// nothing a check uses leaves them running (restarting them on every reload would
    /// starve checks under frequent reloads).
    health: HashMap<String, (String, CancellationToken)>,
    /// Replaced on every reload: the terminate listeners' error summaries.
    health_stop: CancellationToken,
    /// Cancelled when shutdown begins (before the grace): the rebalancer closes nothing
    /// from then on.
    pub(crate) shutting_down: CancellationToken,
    /// When each pool's rebalancer last closed connections ([`crate::balance::now_ms`]),
    /// kept across reloads so a reload cannot start a second round within the second.
    rebalance_rounds: HashMap<String, Arc<std::sync::atomic::AtomicU64>>,
    /// Whether passthrough relays may splice (a gateway option).
    splice: bool,
    /// The process-wide connection budget (fixed at start).
    budget: Arc<crate::budget::Budget>,
}

impl Running {
    /// Binds and starts everything of `cfg`.
    pub(crate) fn start(
        cfg: Config,
        metrics: Arc<Metrics>,
        view: Arc<ArcSwap<View>>,
        splice: bool,
    ) -> Result<Self, StartError> {
        let stop = CancellationToken::new();
        let mut running = Self {
            metrics,
            health_stop: stop.child_token(),
            shutting_down: CancellationToken::new(),
            rebalance_rounds: HashMap::new(),
            stop,
            drain: CancellationToken::new(),
            tracker: TaskTracker::new(),
            accepts: TaskTracker::new(),
            view,
            config: cfg.clone(),
            sockets: Vec::new(),
            listeners: HashMap::new(),
            pools: Vec::new(),
            removed: Vec::new(),
            health: HashMap::new(),
            splice,
            budget: Arc::new(crate::budget::Budget::new(budget(&cfg))),
        };
        let p = plan(&Deployed::default(), &Deployed::of(&cfg));
        running.apply(cfg, &p, true)?;
        Ok(running)
    }

    /// What runs now, as plain data for [`plan`].
    pub(crate) fn deployed(&self) -> Deployed {
        let mut d = Deployed::of(&self.config);
        // The limits in force, which are what a change is measured against.
        for (name, rt) in &self.listeners {
            d.listeners.insert(name.clone(), rt.max);
        }
        d
    }

    /// How long `/readyz` fails before accepting stops (`[admin] shutdown_grace`).
    pub(crate) fn shutdown_grace(&self) -> Duration {
        self.config
            .admin
            .as_ref()
            .map_or(Duration::ZERO, |a| a.shutdown_grace)
    }

    /// The longest `drain_timeout` of the current pools: the shutdown drain deadline.
    pub(crate) fn drain_deadline(&self) -> Duration {
        longest_drain(&self.config)
    }

    /// Applies a validated config as `plan` says. At start (`initial`) every backend counts
    /// as healthy until its first check; on reload only carried-over backends keep their state.
    ///
    /// # Errors
    /// A new address could not be bound; nothing changed then.
    pub(crate) fn apply(
        &mut self,
        cfg: Config,
        plan: &Plan,
        initial: bool,
    ) -> Result<ReloadSummary, StartError> {
        for e in &cfg.expired {
            tracing::error!("{e} (running anyway: fix before clients notice)");
        }
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        let fresh = bind_all(&plan.bind)?;
        let pools = self.build_pools(&cfg, initial);
        self.drain_removed_backends(plan);
        let states = self.listener_snapshots(&cfg, &pools, plan)?;
        let added = self.switch_sockets(plan, fresh, &states);
        self.restart_health(&cfg, &pools, &states);
        self.metrics.set_certificates(&cfg.certificates);
        self.metrics.set_config_hash(&cfg.hash);
        self.pools = pools;
        self.config = cfg;
        self.publish_view();
        if initial {
            for l in &self.view.load().listeners {
                tracing::info!(listener = %l.name, mode = l.mode.as_str(), pool = %l.destination, addrs = ?l.listen, "listening");
            }
        }
        Ok(summary(plan, added, initial))
    }

    /// New pools, carrying backends over by address (health, counters, drain token, TLS
    /// sessions).
    fn build_pools(&self, cfg: &Config, initial: bool) -> Vec<Arc<Pool>> {
        cfg.pools
            .iter()
            .map(|pc| {
                let previous = self.pools.iter().find(|p| p.cfg.name == pc.name);
                let names = cfg.passthrough_names(&pc.name);
                Arc::new(
                    Pool::new(
                        pc.clone(),
                        &self.metrics,
                        previous.map(AsRef::as_ref),
                        initial,
                        &self.drain,
                    )
                    .with_names(names),
                )
            })
            .collect()
    }

    /// Removed backends get no new connections (they are in no pool now); their open ones
    /// are closed after their pool's `drain_timeout`, and the admin view shows them as
    /// draining until then.
    fn drain_removed_backends(&mut self, plan: &Plan) {
        self.removed
            .retain(|(_, b)| b.active() > 0 && !b.drain.is_cancelled());
        for r in &plan.backends_removed {
            let Some(pool) = self.pools.iter().find(|p| p.cfg.name == r.pool) else {
                continue;
            };
            let Some(b) = pool.backends.iter().find(|b| b.addr == r.addr) else {
                continue;
            };
            let (token, wait) = (b.drain.clone(), pool.cfg.drain_timeout);
            let (view, metrics) = (self.view.clone(), self.metrics.clone());
            let (pool_name, name) = (r.pool.clone(), b.name.clone());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                token.cancel();
                // Its series go unless a backend of that name is in the pool now.
                let taken =
                    view.load().pools.iter().any(|p| {
                        p.cfg.name == pool_name && p.backends.iter().any(|b| b.name == name)
                    });
                if !taken {
                    metrics.remove_backend(&pool_name, &name);
                }
            });
            if b.active() > 0 {
                self.removed.push((r.pool.clone(), b.clone()));
            }
        }
    }

    /// Each listener's snapshot for new connections; permits and the drain token carry over.
    fn listener_snapshots(
        &mut self,
        cfg: &Config,
        pools: &[Arc<Pool>],
        plan: &Plan,
    ) -> Result<HashMap<String, Arc<ListenerSnapshot>>, StartError> {
        let mut states = HashMap::new();
        for l in &cfg.listeners {
            let find = |name: &str| {
                pools
                    .iter()
                    .find(|p| p.cfg.name == name)
                    .cloned()
                    .ok_or_else(|| StartError::UnknownPool(l.name.clone()))
            };
            let pool = l.pool.as_deref().map(find).transpose()?;
            let routes = l
                .routes
                .iter()
                .map(|r| {
                    Ok(Route {
                        sni: r.sni.clone(),
                        pool: find(&r.pool)?,
                    })
                })
                .collect::<Result<Vec<_>, StartError>>()?;
            let rt = self
                .listeners
                .entry(l.name.clone())
                .or_insert_with(|| ListenerRt {
                    limit: Arc::new(Semaphore::new(l.max_connections as usize)),
                    max: l.max_connections,
                    owed: Arc::default(),
                    shrink: None,
                    handshakes: (Arc::new(Semaphore::new(0)), 0),
                    drain: self.drain.child_token(),
                });
            if plan.limits.iter().any(|(n, ..)| *n == l.name) {
                set_limit(rt, l.max_connections);
            }
            let slots = l.tls.as_ref().map_or(0, |t| t.max_handshakes);
            if rt.handshakes.1 != slots {
                // Handshakes in progress keep their slots in the old semaphore.
                rt.handshakes = (Arc::new(Semaphore::new(slots as usize)), slots);
            }
            states.insert(
                l.name.clone(),
                Arc::new(ListenerSnapshot {
                    cfg: l.clone(),
                    pool,
                    routes,
                    upstreams: Arc::default(),
                    metrics: self.metrics.listener(&l.name),
                    limit: rt.limit.clone(),
                    drain: rt.drain.clone(),
                    splice: self.splice,
                    handshakes: rt.handshakes.0.clone(),
                    budget: self.budget.clone(),
                }),
            );
        }
        let longest = longest_drain(cfg);
        for name in &plan.listeners_removed {
            if let Some(rt) = self.listeners.remove(name) {
                tokio::spawn(async move {
                    tokio::time::sleep(longest).await;
                    rt.drain.cancel();
                });
            }
        }
        Ok(states)
    }

    /// Stops the sockets the plan drops, re-points the kept ones and starts accept loops on
    /// the new ones. Returns the addresses newly bound.
    fn switch_sockets(
        &mut self,
        plan: &Plan,
        fresh: Vec<(SocketKey, String, TcpListener)>,
        states: &HashMap<String, Arc<ListenerSnapshot>>,
    ) -> Vec<SocketAddr> {
        self.sockets.retain(|s| {
            let stopped = plan.stop.contains(&s.key);
            if stopped {
                s.stop.cancel();
            }
            !stopped
        });
        for (key, name) in &plan.keep {
            if let (Some(s), Some(state)) = (
                self.sockets.iter().find(|s| s.key == *key),
                states.get(name),
            ) {
                s.state.store(state.clone());
            }
        }
        let mut added = Vec::new();
        for (key, name, socket) in fresh {
            let Some(state) = states.get(&name) else {
                continue;
            };
            let bound = socket.local_addr().unwrap_or(key.addr);
            added.push(bound);
            let state = Arc::new(ArcSwap::new(state.clone()));
            let stop = self.stop.child_token();
            self.accepts.spawn(
                AcceptLoop {
                    listener: socket,
                    state: state.clone(),
                    stop: stop.clone(),
                    tracker: self.tracker.clone(),
                }
                .run(),
            );
            self.sockets.push(Socket {
                key,
                bound,
                state,
                stop,
            });
        }
        added
    }

    /// Keeps each pool's health loops when nothing they use changed (see [`health_key`]);
    /// otherwise the old ones end and new ones start: carried-over backends keep their state
    /// and are next checked after an interval, new ones at once.
    fn restart_health(
        &mut self,
        cfg: &Config,
        pools: &[Arc<Pool>],
        states: &HashMap<String, Arc<ListenerSnapshot>>,
    ) {
        self.health_stop.cancel();
        self.health_stop = self.stop.child_token();
        let mut loops = HashMap::new();
        for p in pools {
            let key = health_key(p, cfg);
            match self.health.remove(&p.cfg.name) {
                Some((old, token)) if old == key => {
                    loops.insert(p.cfg.name.clone(), (old, token));
                }
                previous => {
                    if let Some((_, token)) = previous {
                        token.cancel();
                    }
                    let token = self.stop.child_token();
                    health::probe::spawn(p, &token);
                    loops.insert(p.cfg.name.clone(), (key, token));
                }
            }
        }
        // The rebalancer of every pool (its skew is exported even when it moves nothing),
        // restarted with the pools on every apply.
        for p in pools {
            let last_round = self
                .rebalance_rounds
                .entry(p.cfg.name.clone())
                .or_default()
                .clone();
            tokio::spawn(crate::rebalance::run(
                p.clone(),
                self.metrics.pool_skew(&p.cfg.name),
                self.health_stop.clone(),
                self.shutting_down.clone(),
                last_round,
            ));
        }
        // Pools that went away.
        for (_, (_, token)) in self.health.drain() {
            token.cancel();
        }
        self.health = loops;
        for l in cfg.listeners.iter().filter(|l| l.mode == Mode::Terminate) {
            if let Some(state) = states.get(&l.name) {
                tokio::spawn(terminate::report_errors(
                    state.clone(),
                    self.health_stop.clone(),
                ));
            }
        }
    }

    /// Publishes the admin view of what runs now (keeping the last reload's outcome).
    fn publish_view(&self) {
        let last_reload = self.view.load().last_reload.clone();
        let bound = |a: SocketAddr, l: &str| {
            let key = SocketKey::new(a, l);
            self.sockets.iter().find(|s| s.key == key).map(|s| s.bound)
        };
        self.view.store(Arc::new(View {
            listeners: self
                .config
                .listeners
                .iter()
                .map(|l| ListenerView {
                    name: l.name.clone(),
                    mode: l.mode,
                    listen: l.listen.iter().filter_map(|a| bound(*a, &l.name)).collect(),
                    destination: l.destination(),
                    pools: l.pools().map(str::to_string).collect(),
                    pool: l.pool.clone(),
                    routes: l.routes.clone(),
                    active: self.metrics.listener(&l.name).active,
                })
                .collect(),
            pools: self.pools.clone(),
            draining: self.removed.clone(),
            certificates: self.config.certificates.clone(),
            loaded_at: SystemTime::now(),
            last_reload,
        }));
    }
}

/// Everything a pool's health loops use: its check settings, slow start, its backends (the
/// very objects, which carry health and counters), and what its certificate files held. When
/// this is unchanged by a reload, the running loops are as good as new ones.
fn health_key(p: &Pool, cfg: &Config) -> String {
    let h = &p.cfg.health;
    let backends: Vec<(usize, &str, &str, u32)> = p
        .backends
        .iter()
        .map(|b| {
            (
                Arc::as_ptr(b) as usize,
                b.name.as_str(),
                b.address.as_str(),
                b.weight,
            )
        })
        .collect();
    let scope = format!("pool/{}", p.cfg.name);
    let files: Vec<&str> = cfg
        .inputs
        .iter()
        .filter(|(s, ..)| *s == scope)
        .map(|(.., digest)| digest.as_str())
        .collect();
    let server_name = p.cfg.tls.as_ref().map(|t| t.server_name.clone());
    let names = &p.names;
    format!(
        "{:?}",
        (
            h.check.as_str(),
            &h.path,
            &h.expect_status,
            h.interval,
            h.timeout,
            (h.rise, h.fall),
            p.cfg.slow_start,
            server_name,
            backends,
            files,
            names,
            p.cfg.send_proxy,
        )
    )
}

/// The process-wide budget: `[global] max_connections`, else what the descriptor limit
/// allows; warns when the listeners' limits (or the configured budget) do not fit.
fn budget(cfg: &Config) -> usize {
    let workers = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_workers())
        .unwrap_or(1);
    let fits = crate::budget::nofile().map(|n| (n, crate::budget::from_nofile(n, workers)));
    let budget = match (cfg.global_max_connections, fits) {
        (Some(max), Some((nofile, fits))) if max as usize > fits => {
            tracing::warn!(max_connections = max, nofile, fits, "[global] max_connections needs more descriptors than the limit allows: the gateway will run out of descriptors before it refuses; raise LimitNOFILE");
            max as usize
        }
        (Some(max), _) => max as usize,
        (None, Some((_, fits))) => fits,
        (None, None) => usize::MAX,
    };
    let sum: u64 = cfg
        .listeners
        .iter()
        .map(|l| u64::from(l.max_connections))
        .sum();
    if sum > budget as u64 {
        tracing::warn!(
            listeners_max_connections = sum,
            budget,
            "the listeners' max_connections add up to more than the process can hold at once: beyond the budget new connections are refused (raise LimitNOFILE, or set [global] max_connections)"
        );
    } else {
        tracing::info!(budget, "process-wide connection budget");
    }
    budget
}

/// Binds every socket of the plan, or none.
fn bind_all(
    wanted: &[(SocketKey, String)],
) -> Result<Vec<(SocketKey, String, TcpListener)>, StartError> {
    wanted
        .iter()
        .map(|(key, listener)| {
            crate::net::bind(key.addr)
                .map(|socket| (key.clone(), listener.clone(), socket))
                .map_err(|source| StartError::Bind {
                    listener: listener.clone(),
                    addr: key.addr,
                    source,
                })
        })
        .collect()
}

/// Moves a listener's limit. Free permits are taken back at once; when more connections than
/// the new limit are open, the rest is owed and a task takes the permits as those connections
/// close (it queues for them, so new connections are refused until the limit holds). Open
/// connections are never cut.
fn set_limit(rt: &mut ListenerRt, max: u32) {
    let mut debt = rt
        .owed
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // What the semaphore holds now: the limit in force plus what is still owed. A pending
    // task finds its epoch gone and gives its permits back.
    let real = rt.max.saturating_add(std::mem::take(&mut debt.owed));
    debt.epoch += 1;
    if let Some(task) = rt.shrink.take() {
        // Dropping its wait returns what it had gathered; the debt is recomputed below.
        task.abort();
    }
    if max >= real {
        rt.limit.add_permits((max - real) as usize);
    } else {
        let want = real - max;
        let took = u32::try_from(rt.limit.forget_permits(want as usize)).unwrap_or(want);
        let rest = want.saturating_sub(took);
        if rest > 0 {
            debt.owed = rest;
            let epoch = debt.epoch;
            let (limit, shared) = (rt.limit.clone(), rt.owed.clone());
            let task = tokio::spawn(async move {
                let Ok(permits) = limit.acquire_many_owned(rest).await else {
                    return;
                };
                let mut debt = shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if debt.epoch == epoch {
                    permits.forget();
                    debt.owed = 0;
                }
            });
            rt.shrink = Some(task.abort_handle());
        }
    }
    rt.max = max;
}

fn longest_drain(cfg: &Config) -> Duration {
    cfg.pools
        .iter()
        .map(|p| p.drain_timeout)
        .max()
        .unwrap_or(Duration::ZERO)
}

/// The reload log line's facts, read off the plan (nothing is "added" at start-up).
fn summary(plan: &Plan, addresses_added: Vec<SocketAddr>, initial: bool) -> ReloadSummary {
    if initial {
        return ReloadSummary::default();
    }
    let backend = |b: &crate::reload::plan::BackendRef| format!("{}/{}", b.pool, b.address);
    ReloadSummary {
        listeners_added: plan.listeners_added.clone(),
        listeners_removed: plan.listeners_removed.clone(),
        addresses_added,
        addresses_removed: plan.stop.iter().map(|k| k.addr).collect(),
        backends_added: plan.backends_added.iter().map(backend).collect(),
        backends_removed: plan.backends_removed.iter().map(backend).collect(),
        certificates_replaced: plan.certificates_replaced.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(max: u32) -> ListenerRt {
        ListenerRt {
            limit: Arc::new(Semaphore::new(max as usize)),
            max,
            owed: Arc::default(),
            shrink: None,
            handshakes: (Arc::new(Semaphore::new(0)), 0),
            drain: CancellationToken::new(),
        }
    }

    /// Round-2 hardening, item 9: lowering max_connections below the open count used to take
    /// back only the free permits, so the new limit never held; now the rest is taken as
    /// connections close, and raising it again cancels what is still owed.
    #[tokio::test]
    async fn a_lowered_limit_holds_once_enough_connections_closed() {
        let mut l = rt(10);
        let mut open: Vec<_> = (0..8)
            .map(|_| l.limit.clone().try_acquire_owned().expect("permit"))
            .collect();
        set_limit(&mut l, 5);
        assert_eq!(l.limit.available_permits(), 0);
        // Three of the eight closing pay the debt; none of them frees a slot.
        for _ in 0..3 {
            open.pop();
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(l.limit.available_permits(), 0, "over the lowered limit");
        assert_eq!(l.owed.lock().expect("lock").owed, 0);
        // Now five are open, the new limit: one more closing frees exactly one slot.
        open.pop();
        assert_eq!(l.limit.available_permits(), 1);
        // Raised while nothing is owed: plain permits.
        set_limit(&mut l, 7);
        assert_eq!(l.limit.available_permits(), 3);
        // Lowered below the open count again, then raised before anything closed: the
        // pending debt is cancelled and nothing is lost.
        set_limit(&mut l, 2);
        set_limit(&mut l, 7);
        tokio::task::yield_now().await;
        drop(open);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(l.limit.available_permits(), 7);
    }
}
