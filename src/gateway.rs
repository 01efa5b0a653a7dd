//! Starting the gateway and the handle to a running one.
//!
//! [`Gateway::start`] binds everything (a failure leaves nothing behind), starts the admin
//! server, the file watcher and the drain task, enters `Running` (READY for systemd) and
//! returns a [`Handle`]. Shutdown is a future passed in, so tests drive it without signals;
//! what happens after it fires is [`crate::shutdown`]'s.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

use crate::admin::View;
use crate::config::Config;
use crate::health::Status;
use crate::metrics::Metrics;
use crate::phase::{Lifecycle, Phase, ShutdownReport};
use crate::reload::Reloader;
use crate::runtime::{Running, StartError};

/// A task of the gateway ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The drain task panicked: connections may have been cut without a drain.
    #[error("the shutdown sequence failed: {0}")]
    Panicked(String),
}

/// How the gateway runs, apart from its configuration.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Let passthrough relays move bulk bytes with splice(2) (Linux; default on). Off only to
    /// exercise the copy path, which TLS and other platforms always use.
    pub splice: bool,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self { splice: true }
    }
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
    reloader: Reloader,
    admin: Option<SocketAddr>,
    view: Arc<ArcSwap<View>>,
    metrics: Arc<Metrics>,
    phase: watch::Receiver<Phase>,
    hurry: CancellationToken,
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
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// One line for a service manager's STATUS: listeners and healthy backends.
    pub fn status_line(&self) -> String {
        self.view.load().status_line()
    }

    /// The admin server's bound address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The health status of backend `backend` of pool `pool`.
    pub fn backend_status(&self, pool: &str, backend: &str) -> Option<Status> {
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

    /// Skips what is left of the shutdown grace and the drain (a second SIGTERM/SIGINT):
    /// open connections are closed at once. Before shutdown began, it takes effect then.
    pub fn hurry(&self) {
        self.hurry.cancel();
    }

    /// [`Handle::hurry`] as a function that outlives the handle (for a signal task).
    pub fn hurrier(&self) -> impl Fn() + Send + Sync + 'static {
        let hurry = self.hurry.clone();
        move || hurry.cancel()
    }

    /// Waits until the shutdown future fired and every connection is closed.
    ///
    /// # Errors
    /// The shutdown sequence panicked (a bug): reported, not taken for a clean stop.
    pub async fn wait(self) -> Result<ShutdownReport, GatewayError> {
        self.done
            .await
            .map_err(|e| GatewayError::Panicked(e.to_string()))
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
        opts: GatewayOptions,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Handle, StartError> {
        let metrics = Arc::new(Metrics::new());
        // Bind the admin socket before anything runs, so a bind failure leaves nothing behind.
        let admin_socket = match &cfg.admin {
            Some(a) => Some(
                crate::net::bind(a.listen).map_err(|source| StartError::Bind {
                    listener: "admin".into(),
                    addr: a.listen,
                    source,
                })?,
            ),
            None => None,
        };
        let admin_addr = admin_socket.as_ref().and_then(|s| s.local_addr().ok());
        let view = Arc::new(ArcSwap::from_pointee(View::empty()));
        let source = cfg.source.clone();
        let running = Running::start(cfg, metrics.clone(), view.clone(), opts.splice)?;
        let status_view = view.clone();
        let (lifecycle, phase) = Lifecycle::new(move || status_view.load().status_line());
        let stop = running.stop.clone();
        let running = Arc::new(Mutex::new(running));
        let reloader = Reloader {
            running: running.clone(),
            lifecycle: lifecycle.clone(),
            source,
            tried: Arc::default(),
        };

        // The admin server outlives draining, so /readyz can say "draining" to keepalived.
        let admin_stop = CancellationToken::new();
        if let (Some(socket), Some(addr)) = (admin_socket, admin_addr) {
            tracing::info!(addr = %addr, "admin server listening");
            tokio::spawn(crate::admin::serve(
                socket,
                crate::admin::Admin::new(view.clone(), metrics.clone(), phase.clone()),
                admin_stop.clone(),
            ));
        }
        tokio::spawn(crate::reload::watch::watch_files(reloader.clone(), stop));
        let hurry = CancellationToken::new();
        let done = tokio::spawn(crate::shutdown::drain(
            shutdown,
            running,
            lifecycle.clone(),
            admin_stop,
            hurry.clone(),
        ));
        // Every listener is bound and the first health checks are under way.
        lifecycle.enter(Phase::Running);
        if let Some(every) = crate::sd_notify::watchdog_interval() {
            tokio::spawn(crate::sd_notify::watchdog(every));
        }
        Ok(Handle {
            admin: admin_addr,
            view,
            reloader,
            metrics,
            phase,
            hurry,
            done,
        })
    }
}
