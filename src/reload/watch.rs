//! Reloading on file changes: polls the config file and every file it names, so atomic
//! renames and editors that replace files are seen (no inotify: it misses a file replaced by
//! a rename of its directory, which is how Kubernetes mounts secrets).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::Reloader;

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
    let mut paths = reloader.watched_files().await;
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
        paths = reloader.watched_files().await;
        applied = fingerprint(&paths);
        pending = None;
    }
}
