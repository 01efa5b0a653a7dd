//! Process signals as futures: the ones that end the gateway, and SIGHUP, which reloads it.
//!
//! The gateway itself never listens for signals: [`crate::Gateway::start`] takes shutdown as
//! a future, so tests drive it with a channel and `main` passes [`shutdown`]. Handlers are
//! installed when these are first polled, which `main` does before the gateway reports
//! READY, so a signal sent right after READY is never lost.

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

/// Reloads on every SIGHUP, for as long as the process runs. A failed reload is logged and
/// counted by the reload itself; the running configuration stays.
pub async fn reload_on_sighup(reloader: crate::reload::Reloader) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install the SIGHUP handler; reload by editing the config file");
                return;
            }
        };
        while hup.recv().await.is_some() {
            tracing::info!(signal = "SIGHUP", "reload requested");
            let _ = reloader.reload().await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = reloader;
    }
}
