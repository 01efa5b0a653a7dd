//! Hot reload: load and validate off the runtime's workers, plan, apply (SPEC §3, Hot reload).
//!
//! [`Reloader::reload`] reads and validates the whole new config with the same code as
//! `apilb check`, on a blocking thread (file reads and DNS must not stall a worker) and
//! without holding the runtime's lock; only a valid config takes the lock, is compared with
//! what runs ([`plan`]) and applied ([`crate::runtime::Running::apply`]). An invalid config,
//! or an address that cannot be bound, changes nothing. Triggers: SIGHUP
//! ([`crate::signals::Hangups`]) and [`watch::watch_files`].

pub(crate) mod plan;
pub(crate) mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::Mutex;

use crate::admin::{ReloadOutcome, View};
use crate::config::{Config, ConfigErrors};
use crate::phase::{Lifecycle, Phase};
use crate::runtime::{Running, StartError};

pub use plan::ReloadSummary;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is invalid.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A new address could not be bound.
    #[error(transparent)]
    Bind(#[from] StartError),
    /// The gateway is shutting down.
    #[error("shutting down: not reloading")]
    Stopping,
    /// The loading thread died (a bug; the running config stays).
    #[error("loading the configuration failed: {0}")]
    Load(String),
}

/// A cloneable handle that reloads the running gateway.
#[derive(Clone)]
pub struct Reloader {
    pub(crate) running: Arc<Mutex<Running>>,
    pub(crate) lifecycle: Lifecycle,
    /// The config file, read without the lock.
    pub(crate) source: PathBuf,
    /// Files the last failed load named: watched too, so a reload that failed on a missing
    /// certificate happens once the certificate appears.
    pub(crate) tried: Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

impl Reloader {
    /// Reloads from the config file the gateway was started with.
    ///
    /// # Errors
    /// The new config is invalid, a new address cannot be bound, or shutdown began; the
    /// running config then stays exactly as it was.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        if self.lifecycle.now().is_stopping() {
            return Err(ReloadError::Stopping);
        }
        self.lifecycle.enter(Phase::Reloading);
        let path = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::config::load_tracking(&path)).await;
        let result = match loaded {
            Ok((Ok(cfg), _)) => {
                self.set_tried(Vec::new());
                self.apply(cfg).await
            }
            Ok((Err(e), files)) => {
                self.set_tried(files);
                Err(ReloadError::from(e))
            }
            Err(e) => Err(ReloadError::Load(e.to_string())),
        };
        self.report(&result).await;
        self.lifecycle.enter(Phase::Running);
        result
    }

    async fn apply(&self, cfg: Config) -> Result<ReloadSummary, ReloadError> {
        let mut running = self.running.lock().await;
        if self.lifecycle.now().is_stopping() {
            return Err(ReloadError::Stopping);
        }
        let p = plan::plan(&running.deployed(), &plan::Deployed::of(&cfg));
        Ok(running.apply(cfg, &p, false)?)
    }

    /// The log line, the counter and the view's last reload.
    async fn report(&self, result: &Result<ReloadSummary, ReloadError>) {
        let path = &self.source;
        match result {
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
            Err(ReloadError::Stopping) => {
                tracing::info!("reload skipped: shutting down");
                return;
            }
            Err(e) => tracing::error!(
                config = %path.display(),
                "reload failed, the running configuration is unchanged:\n{e}"
            ),
        }
        let running = self.running.lock().await;
        running.metrics.reload(result.is_ok());
        let outcome = ReloadOutcome {
            at: SystemTime::now(),
            error: result.as_ref().err().map(ToString::to_string),
        };
        let old = running.view.load_full();
        running.view.store(Arc::new(View {
            last_reload: Some(outcome),
            ..View::clone(&old)
        }));
    }

    fn set_tried(&self, files: Vec<PathBuf>) {
        *self
            .tried
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = files;
    }

    /// The config file and every file it names, as of the running config, and the files a
    /// failed load named.
    pub(crate) async fn watched_files(&self) -> Vec<PathBuf> {
        let running = self.running.lock().await;
        let mut v = vec![running.config.source.clone()];
        v.extend(running.config.files.iter().cloned());
        drop(running);
        let tried = self
            .tried
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for f in tried {
            if !v.contains(&f) {
                v.push(f);
            }
        }
        v
    }
}
