//! The running gateway's moving parts, and hot reload: load, validate, diff, apply.
//!
//! `Running` owns the listening sockets, the listener states the accept loops read, the
//! pools, the health loops and the admin view. It is built once by `Gateway::start` and
//! changed only by `Running::reload`, which first loads and validates the whole new config
//! with the same code as `apilb check` (nothing changes if that fails), then binds every new
//! address (a bind failure also changes nothing), and only then applies the difference:
//!
//! - sockets are keyed by configured address: an unchanged address keeps its socket, so there
//!   is no moment without a listener; its accept loop just reads the new listener state;
//! - listeners are keyed by name: settings and certificates apply to new connections, the
//!   `max_connections` permits and the drain token carry over; a removed listener stops
//!   accepting and its connections end on their own or after the longest `drain_timeout`;
//! - backends are keyed by pool name and address: health state and active counts carry over;
//!   an added backend takes traffic once its first check passed; a removed one gets no new
//!   connections and its open ones are closed after its pool's `drain_timeout`.
//!
//! Triggers: `Reloader::reload` (SIGHUP in `main`) and `watch_files`, which polls the config
//! file and every file it names, so atomic renames and editors that replace files are seen.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{ListenerView, ReloadOutcome, View};
use crate::balance::Pool;
use crate::config::{Config, ConfigErrors, Mode};
use crate::listener::{AcceptLoop, ListenerState};
use crate::metrics::Metrics;
use crate::{health, listener, terminate, StartError};

/// What identifies a socket across reloads: its configured address, and for port 0 (any
/// free port, so several listeners may say the same) also its listener's name.
type SocketKey = (SocketAddr, String);

fn socket_key(addr: SocketAddr, listener: &str) -> SocketKey {
    if addr.port() == 0 {
        (addr, listener.to_string())
    } else {
        (addr, String::new())
    }
}

/// One listening socket.
struct Socket {
    /// See [`SocketKey`].
    key: SocketKey,
    /// The address actually bound.
    bound: SocketAddr,
    /// The listener it belongs to now.
    listener: String,
    /// What its accept loop reads per connection.
    state: Arc<ArcSwap<ListenerState>>,
    /// Stops this socket's accept loop.
    stop: CancellationToken,
}

/// What a listener keeps across reloads.
struct ListenerRt {
    limit: Arc<Semaphore>,
    max: u32,
    drain: CancellationToken,
}

/// What changed in one reload, for the log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Listeners that appeared.
    pub listeners_added: Vec<String>,
    /// Listeners that went away.
    pub listeners_removed: Vec<String>,
    /// Addresses newly bound.
    pub addresses_added: Vec<SocketAddr>,
    /// Addresses no longer listened on.
    pub addresses_removed: Vec<SocketAddr>,
    /// `pool/address` of backends that appeared.
    pub backends_added: Vec<String>,
    /// `pool/address` of backends that went away.
    pub backends_removed: Vec<String>,
    /// Sources of certificates whose content changed.
    pub certificates_replaced: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is invalid.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A new address could not be bound.
    #[error(transparent)]
    Bind(#[from] StartError),
}

/// The gateway's running state.
pub(crate) struct Running {
    pub metrics: Arc<Metrics>,
    /// Parent of every socket's stop token: shutdown stops all accept loops and health.
    pub stop: CancellationToken,
    /// Parent of every listener's and backend's drain token: the shutdown deadline.
    pub drain: CancellationToken,
    /// Connection tasks.
    pub tracker: TaskTracker,
    /// Accept-loop tasks.
    pub accepts: TaskTracker,
    pub view: Arc<ArcSwap<View>>,
    pub config: Config,
    sockets: Vec<Socket>,
    listeners: HashMap<String, ListenerRt>,
    pools: Vec<Arc<Pool>>,
    /// Replaced on every reload: the health loops of the previous snapshot end.
    health_stop: CancellationToken,
}

/// A cloneable handle that reloads the running gateway.
#[derive(Clone)]
pub struct Reloader(pub(crate) Arc<Mutex<Running>>);

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

impl Reloader {
    /// Reloads from the config file the gateway was started with.
    ///
    /// # Errors
    /// The new config is invalid or a new address cannot be bound; the running config then
    /// stays exactly as it was.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let mut running = self.0.lock().await;
        running.reload().await
    }
}

impl Running {
    /// Binds and starts everything of `cfg`.
    pub(crate) fn start(cfg: Config, metrics: Arc<Metrics>) -> Result<Self, StartError> {
        let stop = CancellationToken::new();
        let drain = CancellationToken::new();
        let view = Arc::new(ArcSwap::from_pointee(View {
            listeners: Vec::new(),
            pools: Vec::new(),
            certificates: Vec::new(),
            loaded_at: SystemTime::now(),
            last_reload: None,
        }));
        let mut running = Self {
            metrics,
            health_stop: stop.child_token(),
            stop,
            drain,
            tracker: TaskTracker::new(),
            accepts: TaskTracker::new(),
            view,
            config: cfg.clone(),
            sockets: Vec::new(),
            listeners: HashMap::new(),
            pools: Vec::new(),
        };
        running.apply(cfg, true)?;
        Ok(running)
    }

    fn bound_addr(&self, key: &SocketKey) -> Option<SocketAddr> {
        self.sockets.iter().find(|s| s.key == *key).map(|s| s.bound)
    }

    /// One line for `STATUS=`: listeners and healthy backends.
    pub(crate) fn status_line(&self) -> String {
        let total: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        let healthy: usize = self
            .pools
            .iter()
            .map(|p| p.backends.iter().filter(|b| b.health.is_healthy()).count())
            .sum();
        format!(
            "{} listeners on {} addresses, {healthy}/{total} backends healthy",
            self.config.listeners.len(),
            self.sockets.len()
        )
    }

    /// The longest `drain_timeout` of the current pools: the shutdown drain deadline.
    pub(crate) fn drain_deadline(&self) -> Duration {
        self.config
            .pools
            .iter()
            .map(|p| p.drain_timeout)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Loads the config file again and applies it; see the module docs.
    async fn reload(&mut self) -> Result<ReloadSummary, ReloadError> {
        let path = self.config.source.clone();
        crate::sd_notify::reloading();
        let result = match crate::config::load(&path) {
            Ok(cfg) => self.apply(cfg, false).map_err(ReloadError::from),
            Err(e) => Err(ReloadError::from(e)),
        };
        let outcome = ReloadOutcome {
            at: SystemTime::now(),
            error: result.as_ref().err().map(ToString::to_string),
        };
        self.metrics.reload(result.is_ok());
        match &result {
            Ok(_) => crate::sd_notify::ready(&self.status_line()),
            Err(e) => {
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                crate::sd_notify::ready(&format!(
                    "reload failed, running the previous config: {first}"
                ));
            }
        }
        match &result {
            Ok(s) => tracing::info!(
                config = %path.display(),
                listeners_added = ?s.listeners_added,
                listeners_removed = ?s.listeners_removed,
                addresses_added = ?s.addresses_added,
                addresses_removed = ?s.addresses_removed,
                backends_added = ?s.backends_added,
                backends_removed = ?s.backends_removed,
                certificates_replaced = ?s.certificates_replaced,
                "configuration reloaded"
            ),
            Err(e) => tracing::error!(
                config = %path.display(),
                "reload failed, the running configuration is unchanged:\n{e}"
            ),
        }
        // The view's last_reload records failures too, for the status page.
        let old = self.view.load_full();
        self.view.store(Arc::new(View {
            listeners: old.listeners.clone(),
            pools: old.pools.clone(),
            certificates: old.certificates.clone(),
            loaded_at: old.loaded_at,
            last_reload: Some(outcome),
        }));
        result
    }

    /// Applies a validated config. At start (`initial`) every backend counts as healthy until
    /// its first check; on reload only carried-over backends keep their state.
    fn apply(&mut self, cfg: Config, initial: bool) -> Result<ReloadSummary, StartError> {
        for e in &cfg.expired {
            tracing::error!("{e} (running anyway: fix before clients notice)");
        }
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        let mut summary = ReloadSummary::default();

        // 1. Bind every new address first: a failure leaves everything as it was.
        let mut fresh: Vec<(SocketKey, String, TcpListener)> = Vec::new();
        for l in &cfg.listeners {
            for &addr in &l.listen {
                let key = socket_key(addr, &l.name);
                if self.sockets.iter().any(|s| s.key == key) || fresh.iter().any(|f| f.0 == key) {
                    continue;
                }
                let socket = listener::bind(addr).map_err(|source| StartError::Bind {
                    listener: l.name.clone(),
                    addr,
                    source,
                })?;
                fresh.push((key, l.name.clone(), socket));
            }
        }

        // 2. Pools, carrying backends over by address.
        let pools: Vec<Arc<Pool>> = cfg
            .pools
            .iter()
            .map(|pc| {
                let existing = self
                    .pools
                    .iter()
                    .find(|p| p.cfg.name == pc.name)
                    .map(|p| p.backends.clone())
                    .unwrap_or_default();
                Arc::new(Pool::new(
                    pc.clone(),
                    &self.metrics,
                    &existing,
                    initial,
                    &self.drain,
                ))
            })
            .collect();
        for old in &self.pools {
            let new = pools.iter().find(|p| p.cfg.name == old.cfg.name);
            for b in &old.backends {
                let kept = new.is_some_and(|p| p.backends.iter().any(|n| n.addr == b.addr));
                if !kept {
                    summary
                        .backends_removed
                        .push(format!("{}/{}", old.cfg.name, b.address));
                    // No new connections (it is in no pool now); open ones get drain_timeout.
                    let (token, wait) = (b.drain.clone(), old.cfg.drain_timeout);
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        token.cancel();
                    });
                }
            }
        }
        if !initial {
            for p in &pools {
                let old = self.pools.iter().find(|o| o.cfg.name == p.cfg.name);
                for b in &p.backends {
                    if !old.is_some_and(|o| o.backends.iter().any(|x| x.addr == b.addr)) {
                        summary
                            .backends_added
                            .push(format!("{}/{}", p.cfg.name, b.address));
                    }
                }
            }
        }

        // 3. Listener states, keyed by name.
        let mut states: HashMap<String, Arc<ListenerState>> = HashMap::new();
        for l in &cfg.listeners {
            let Some(pool) = pools.iter().find(|p| p.cfg.name == l.pool).cloned() else {
                return Err(StartError::UnknownPool(l.name.clone()));
            };
            let rt = self.listeners.entry(l.name.clone()).or_insert_with(|| {
                if !initial {
                    summary.listeners_added.push(l.name.clone());
                }
                ListenerRt {
                    limit: Arc::new(Semaphore::new(l.max_connections as usize)),
                    max: l.max_connections,
                    drain: self.drain.child_token(),
                }
            });
            if rt.max != l.max_connections {
                if l.max_connections > rt.max {
                    rt.limit.add_permits((l.max_connections - rt.max) as usize);
                } else {
                    // Only free permits can be taken back; connections over the new limit
                    // finish normally and their permits then stay available, which the
                    // next reload evens out. Good enough for a limit that is a safety net.
                    rt.limit
                        .forget_permits((rt.max - l.max_connections) as usize);
                }
                rt.max = l.max_connections;
            }
            states.insert(
                l.name.clone(),
                Arc::new(ListenerState {
                    cfg: l.clone(),
                    pool,
                    metrics: self.metrics.listener(&l.name),
                    limit: rt.limit.clone(),
                    drain: rt.drain.clone(),
                }),
            );
        }
        let longest_drain = cfg
            .pools
            .iter()
            .map(|p| p.drain_timeout)
            .max()
            .unwrap_or(Duration::ZERO);
        let removed: Vec<String> = self
            .listeners
            .keys()
            .filter(|n| !states.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(rt) = self.listeners.remove(&name) {
                summary.listeners_removed.push(name);
                tokio::spawn(async move {
                    tokio::time::sleep(longest_drain).await;
                    rt.drain.cancel();
                });
            }
        }

        // 4. Sockets: keep, re-point, stop, start.
        let mut wanted: HashMap<SocketKey, &str> = HashMap::new();
        for l in &cfg.listeners {
            for &a in &l.listen {
                wanted.insert(socket_key(a, &l.name), &l.name);
            }
        }
        self.sockets.retain(|s| match wanted.get(&s.key) {
            Some(_) => true,
            None => {
                summary.addresses_removed.push(s.bound);
                s.stop.cancel();
                false
            }
        });
        for s in &mut self.sockets {
            if let Some(name) = wanted.get(&s.key) {
                if let Some(state) = states.get(*name) {
                    s.listener = (*name).to_string();
                    s.state.store(state.clone());
                }
            }
        }
        for (key, name, socket) in fresh {
            let Some(state) = states.get(&name) else {
                continue;
            };
            let bound = socket.local_addr().unwrap_or(key.0);
            if !initial {
                summary.addresses_added.push(bound);
            }
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
                listener: name,
                state,
                stop,
            });
        }

        // 5. Health: the previous loops end; carried-over backends keep their state and are
        // next checked after an interval, new ones at once.
        self.health_stop.cancel();
        self.health_stop = self.stop.child_token();
        for p in &pools {
            health::spawn(p, &self.health_stop);
        }
        for l in &cfg.listeners {
            if l.mode == Mode::Terminate {
                if let Some(state) = states.get(&l.name) {
                    tokio::spawn(terminate::report_errors(
                        state.clone(),
                        self.health_stop.clone(),
                    ));
                }
            }
        }

        // 6. Certificates that changed, metrics, and the admin view.
        let old_certs: HashMap<&str, i64> = self
            .config
            .certificates
            .iter()
            .map(|c| (c.source.as_str(), c.not_after))
            .collect();
        if !initial {
            for c in &cfg.certificates {
                if old_certs
                    .get(c.source.as_str())
                    .is_some_and(|&n| n != c.not_after)
                {
                    summary.certificates_replaced.push(c.source.clone());
                }
            }
        }
        self.metrics.set_certificates(&cfg.certificates);
        self.metrics.set_config_hash(&cfg.hash);
        let last_reload = self.view.load().last_reload.clone();
        self.view.store(Arc::new(View {
            listeners: cfg
                .listeners
                .iter()
                .map(|l| ListenerView {
                    name: l.name.clone(),
                    mode: l.mode,
                    listen: l
                        .listen
                        .iter()
                        .filter_map(|a| self.bound_addr(&socket_key(*a, &l.name)))
                        .collect(),
                    pool: l.pool.clone(),
                    active: self.metrics.listener(&l.name).active,
                })
                .collect(),
            pools: pools.clone(),
            certificates: cfg.certificates.clone(),
            loaded_at: SystemTime::now(),
            last_reload,
        }));
        if initial {
            for l in &self.view.load().listeners {
                tracing::info!(listener = %l.name, mode = l.mode.as_str(), pool = %l.pool, addrs = ?l.listen, "listening");
            }
        }
        self.pools = pools;
        self.config = cfg;
        Ok(summary)
    }
}

// === File watching ===

/// Identity of a file's current content as far as the file system tells: changes on write,
/// truncate and rename-over.
type Fingerprint = Vec<Option<(SystemTime, u64, u64)>>;

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                #[cfg(unix)]
                let ino = std::os::unix::fs::MetadataExt::ino(&m);
                #[cfg(not(unix))]
                let ino = 0;
                (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), ino)
            })
        })
        .collect()
}

/// Polls the config file and every file it names; after a change has been stable for one
/// more poll (about a second), reloads. A change that fails to load (a half-written file) is
/// not retried until the files change again. Runs until `stop` is cancelled.
pub(crate) async fn watch_files(reloader: Reloader, stop: CancellationToken) {
    const POLL: Duration = Duration::from_millis(500);
    let files = |r: &Running| {
        let mut v = vec![r.config.source.clone()];
        v.extend(r.config.files.iter().cloned());
        v
    };
    let mut paths = files(&*reloader.0.lock().await);
    let mut applied = fingerprint(&paths);
    let mut pending: Option<Fingerprint> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
        let now = fingerprint(&paths);
        if now == applied {
            pending = None;
            continue;
        }
        if pending.as_ref() != Some(&now) {
            // Changed since the last poll: wait for it to settle.
            pending = Some(now);
            continue;
        }
        tracing::info!("configuration or a file it names changed; reloading");
        let _ = reloader.reload().await;
        // Whatever the outcome, this state of the files was tried.
        let running = reloader.0.lock().await;
        paths = files(&running);
        drop(running);
        applied = fingerprint(&paths);
        pending = None;
    }
}
