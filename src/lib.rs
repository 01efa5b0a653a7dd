//! apilb: a Layer-4 / TLS-passthrough load balancer for Kubernetes API servers.
//!
//! An accept loop hands each connection to a task that reads one immutable snapshot of its
//! listener's state, picks a backend, connects, and runs the copy loop; everything else only
//! ever publishes a new snapshot or reads counters. The hot path takes no lock, looks up no
//! configuration and allocates nothing per read.
//!
//! ```text
//!   apilb.toml ──config::load──▶ Config ──Gateway::start──▶ per listener: ArcSwap<ListenerState>
//!                                                                   │ (load_full per accept)
//!   client ──▶ listener::AcceptLoop ──spawn──▶ forward::serve ──────┘
//!                 │ max_connections             │ balance::Pool::pick → connect (+retry)
//!                 │ accept backoff              │ forward::relay_tcp (half-close, idle, drain)
//!                 ▼                             ▼
//!              metrics (atomics) ◀──── one access-log line + counters at close
//!
//!   shutdown future ─▶ stop accepting ─▶ wait for connections ≤ longest drain_timeout ─▶ close rest
//! ```
//!
//! Threading: one multi-threaded tokio runtime whose worker count is `--threads` (default:
//! the number of cores). Every connection is one task; tokio's work-stealing spreads them
//! over the workers, and the copy loop is readiness-driven, so a worker only runs a
//! connection when one of its sockets has something to do. Each listening socket has one
//! accept task; accepting is cheap next to a connection's life, and new connections are
//! spawned onto the accepting worker, from where idle workers steal them. Relay buffers and
//! splice pipes come from per-worker pools (no lock), and per-connection counters are plain
//! fields summed into the shared metrics once, at close. Health checks, reloads and the admin
//! server are ordinary tasks on the same workers.
//!
//! `demo` holds the throwaway PKI and the simulated kube-apiserver used by `apilb demo`,
//! the tests and the benchmarks.

pub mod admin;
pub mod balance;
pub mod config;
mod connect;
pub mod demo;
pub mod forward;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod reload;
pub mod sd_notify;
pub mod shutdown;
pub mod terminate;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;

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

/// Where the gateway is in its life, for tests and for service-manager notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listeners are bound and accepting.
    Running,
    /// Shutdown began: no longer accepting, connections finishing.
    Draining,
    /// Every connection is closed.
    Stopped,
}

/// How shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections still open at the drain deadline, closed with `end=drained`.
    pub forced: usize,
}

/// A listener's bound addresses (port 0 in the config resolves to the real port here).
#[derive(Debug, Clone)]
pub struct BoundListener {
    /// The listener's name.
    pub name: String,
    /// One entry per configured address, in config order.
    pub addrs: Vec<SocketAddr>,
}

/// A running gateway.
#[derive(Debug)]
pub struct Handle {
    reloader: reload::Reloader,
    admin: Option<SocketAddr>,
    view: Arc<ArcSwap<admin::View>>,
    metrics: Arc<Metrics>,
    phase: watch::Receiver<Phase>,
    done: tokio::task::JoinHandle<ShutdownReport>,
}

impl Handle {
    /// Every listener with its bound addresses, as of now (a reload may change them).
    pub fn listeners(&self) -> Vec<BoundListener> {
        self.view
            .load()
            .listeners
            .iter()
            .map(|l| BoundListener {
                name: l.name.clone(),
                addrs: l.listen.clone(),
            })
            .collect()
    }

    /// The first bound address of the listener called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.view
            .load()
            .listeners
            .iter()
            .find(|l| l.name == name)
            .and_then(|l| l.listen.first().copied())
    }

    /// A handle that reloads the configuration (what SIGHUP does).
    pub fn reloader(&self) -> reload::Reloader {
        self.reloader.clone()
    }

    /// One line for a service manager's STATUS: listeners and healthy backends.
    pub async fn status_line(&self) -> String {
        self.reloader.0.lock().await.status_line()
    }

    /// The admin server's bound address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The health status of backend `backend` of pool `pool`.
    pub fn backend_status(&self, pool: &str, backend: &str) -> Option<health::Status> {
        self.view
            .load()
            .pools
            .iter()
            .find(|p| p.cfg.name == pool)?
            .backends
            .iter()
            .find(|b| b.name == backend)
            .map(|b| b.health.status())
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A receiver that follows the gateway's phase.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.clone()
    }

    /// Waits until the shutdown future fired and every connection is closed.
    pub async fn wait(self) -> ShutdownReport {
        self.done.await.unwrap_or(ShutdownReport { forced: 0 })
    }
}

/// The gateway: listeners, pools and the shutdown sequence.
#[derive(Debug)]
pub struct Gateway;

impl Gateway {
    /// Binds every listener of `cfg`, starts accepting, and returns at once.
    ///
    /// When `shutdown` completes the gateway stops accepting, waits up to the longest
    /// `drain_timeout` of its pools for open connections, closes what is left and stops.
    ///
    /// # Errors
    /// The first listening address that cannot be bound; nothing is left running then.
    pub async fn start(
        cfg: Config,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Handle, StartError> {
        let metrics = Arc::new(Metrics::new());
        // Bind the admin socket before anything runs, so a bind failure leaves nothing behind.
        let admin_socket = match &cfg.admin {
            Some(a) => Some(listener::bind(a.listen).map_err(|source| StartError::Bind {
                listener: "admin".into(),
                addr: a.listen,
                source,
            })?),
            None => None,
        };
        let admin_addr = admin_socket.as_ref().and_then(|s| s.local_addr().ok());
        let running = reload::Running::start(cfg, metrics.clone())?;
        let view = running.view.clone();
        let (stop, drain, tracker, accepts) = (
            running.stop.clone(),
            running.drain.clone(),
            running.tracker.clone(),
            running.accepts.clone(),
        );
        let reloader = reload::Reloader(Arc::new(tokio::sync::Mutex::new(running)));

        let (phase_tx, phase) = watch::channel(Phase::Running);
        // The admin server outlives draining, so /readyz can say "draining" to keepalived.
        let admin_stop = CancellationToken::new();
        if let (Some(socket), Some(addr)) = (admin_socket, admin_addr) {
            tracing::info!(addr = %addr, "admin server listening");
            tokio::spawn(admin::serve(
                socket,
                admin::Admin {
                    view: view.clone(),
                    metrics: metrics.clone(),
                    phase: phase.clone(),
                },
                admin_stop.clone(),
            ));
        }
        tokio::spawn(reload::watch_files(reloader.clone(), stop.clone()));

        let shutdown_reloader = reloader.clone();
        let done = tokio::spawn(async move {
            shutdown.await;
            // Holding the lock keeps a reload from binding new sockets while shutting down.
            let running = shutdown_reloader.0.lock().await;
            let drain_deadline = running.drain_deadline();
            let _ = phase_tx.send(Phase::Draining);
            sd_notify::stopping();
            stop.cancel();
            accepts.close();
            accepts.wait().await;
            tracker.close();
            let open = tracker.len();
            tracing::info!(
                open_connections = open,
                deadline = %humantime::format_duration(drain_deadline),
                "stopped accepting; draining"
            );
            let forced = if tokio::time::timeout(drain_deadline, tracker.wait())
                .await
                .is_ok()
            {
                tracing::info!("drain finished: every connection closed on its own");
                0
            } else {
                let forced = tracker.len();
                tracing::warn!(
                    closing = forced,
                    "drain deadline reached: closing the remaining connections"
                );
                drain.cancel();
                tracker.wait().await;
                forced
            };
            drop(running);
            let _ = phase_tx.send(Phase::Stopped);
            admin_stop.cancel();
            ShutdownReport { forced }
        });

        Ok(Handle {
            admin: admin_addr,
            view,
            reloader,
            metrics,
            phase,
            done,
        })
    }
}
