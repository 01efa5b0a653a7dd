//! The drain sequence (SPEC §3, Shutdown): once the shutdown future fires, fail `/readyz`
//! and keep accepting for `[admin] shutdown_grace` (so the virtual IP moves first), then stop
//! accepting, let connections finish for up to the longest `drain_timeout`, close the rest,
//! report. `hurry` (a second SIGTERM/SIGINT) skips what is left of the grace and the drain.
//!
//! It runs in its own task, started by [`crate::Gateway::start`], and moves the lifecycle to
//! `Draining` (which fails `/readyz` and tells the service manager STOPPING) and at the end to
//! `Stopped`. It takes the runtime's lock only long enough to copy out the tokens and
//! trackers it needs, so a reload that is still loading never holds shutdown up, and a reload
//! that comes later sees the `Draining` phase and does nothing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::phase::{Lifecycle, Phase, ShutdownReport};
use crate::runtime::Running;

/// Runs the drain once `shutdown` completes; `admin_stop` ends the admin server last, so
/// `/readyz` keeps saying "draining" to keepalived until the process is done.
pub(crate) async fn drain(
    shutdown: impl Future<Output = ()>,
    running: Arc<Mutex<Running>>,
    lifecycle: Lifecycle,
    admin_stop: CancellationToken,
    hurry: CancellationToken,
) -> ShutdownReport {
    shutdown.await;
    lifecycle.enter(Phase::Draining);
    let (stop, drain, tracker, accepts, deadline, grace) = {
        let r = running.lock().await;
        r.shutting_down.cancel();
        (
            r.stop.clone(),
            r.drain.clone(),
            r.tracker.clone(),
            r.accepts.clone(),
            r.drain_deadline(),
            r.shutdown_grace(),
        )
    };
    if !grace.is_zero() {
        tracing::info!(
            grace = %humantime::format_duration(grace),
            "shutting down: /readyz fails now; still accepting for the grace"
        );
        tokio::select! {
            () = tokio::time::sleep(grace) => {}
            () = hurry.cancelled() => tracing::warn!("second signal: skipping the rest of the grace"),
        }
    }
    stop.cancel();
    accepts.close();
    accepts.wait().await;
    tracker.close();
    tracing::info!(
        open_connections = tracker.len(),
        deadline = %humantime::format_duration(deadline),
        "stopped accepting; draining"
    );
    let finished = tokio::select! {
        r = tokio::time::timeout(deadline, tracker.wait()) => r.is_ok(),
        () = hurry.cancelled() => false,
    };
    let forced = if finished {
        tracing::info!("drain finished: every connection closed on its own");
        0
    } else {
        let forced = tracker.len();
        tracing::warn!(
            closing = forced,
            "drain deadline reached (or a second signal): closing the remaining connections"
        );
        drain.cancel();
        // Every connection watches the drain token; this bound only keeps a bug from
        // holding the process past the service manager's stop timeout.
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                left = tracker.len(),
                "connections did not end after the drain deadline; exiting anyway"
            );
        }
        forced
    };
    lifecycle.enter(Phase::Stopped);
    admin_stop.cancel();
    ShutdownReport { forced }
}
