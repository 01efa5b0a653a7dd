//! Process signals as futures: the ones that end the gateway, and SIGHUP, which reloads it.
//!
//! The gateway itself never listens for signals: [`crate::Gateway::start`] takes shutdown as
//! a future, so tests drive it with a channel and `main` passes [`shutdown`]. Handlers are
//! installed when these are first polled, which `main` does before the gateway reports
//! READY, so a signal sent right after READY is never lost.

/// SIGTERM and SIGINT, listened for from the moment [`ShutdownSignals::install`] returns (so
/// a signal right after READY is never lost to the default action).
#[derive(Debug)]
pub struct ShutdownSignals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl ShutdownSignals {
    /// Installs the handlers now. Must be called inside the runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot install signal handlers; only Ctrl-C will stop the process");
                    None
                }
            };
            Self { streams }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Completes on the next SIGTERM or SIGINT; returns its name.
    pub async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.streams {
            return tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Completes on the first SIGTERM or SIGINT, logging which one arrived.
pub async fn shutdown() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                tracing::info!(signal = name, "shutdown requested");
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot install signal handlers; only Ctrl-C will stop the process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested");
    }
}

/// SIGHUP, listened for from the moment [`Hangups::install`] returns: installed before the
/// gateway reports READY, so a reload requested right after it never ends the process (the
/// default action of SIGHUP).
#[derive(Debug)]
pub struct Hangups {
    #[cfg(unix)]
    stream: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Installs the handler now. Must be called inside the runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let stream = signal(SignalKind::hangup())
                .map_err(|e| {
                    tracing::error!(error = %e, "cannot install the SIGHUP handler; reload by editing the config file");
                })
                .ok();
            Self { stream }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Reloads on every SIGHUP, for as long as the process runs. A failed reload is logged
    /// and counted by the reload itself; the running configuration stays.
    pub async fn reload(self, reloader: crate::reload::Reloader) {
        #[cfg(unix)]
        if let Some(mut hup) = self.stream {
            while hup.recv().await.is_some() {
                tracing::info!(signal = "SIGHUP", "reload requested");
                let _ = reloader.reload().await;
            }
        }
        #[cfg(not(unix))]
        let _ = reloader;
    }
}
