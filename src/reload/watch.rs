//! Reloading on file changes: polls the config file and every file it names, so atomic
//! renames and editors that replace files are seen (no inotify: it misses a file replaced by
//! a rename of its directory, which is how Kubernetes mounts secrets). The polls run on the
//! blocking pool, off the workers that carry connections.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::Reloader;

/// Identity of a file's current content as far as the file system tells (modification time,
/// size, inode: changes on write, truncate and rename-over), by path.
type Fingerprint = BTreeMap<PathBuf, Option<(SystemTime, u64, u64)>>;

fn stamp(p: &Path) -> Option<(SystemTime, u64, u64)> {
    std::fs::metadata(p).ok().map(|m| {
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let ino = 0;
        (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), ino)
    })
}

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    paths.iter().map(|p| (p.clone(), stamp(p))).collect()
}

/// What was tried by a reload that started when the files looked like `before`: for files
/// the running config still names, their state then (so that a change landing while the
/// reload ran is seen on the next poll); for files only the new config names, their state now.
fn tried(before: &Fingerprint, paths: &[PathBuf]) -> Fingerprint {
    paths
        .iter()
        .map(|p| {
            let s = before.get(p).copied().unwrap_or_else(|| stamp(p));
            (p.clone(), s)
        })
        .collect()
}

/// Polls the config file and every file it names; after a change has been stable for one
/// more poll (about a second), reloads. A change that fails to load (a half-written file) is
/// not retried until the files change again. Runs until `stop` is cancelled.
pub(crate) async fn watch_files(reloader: Reloader, stop: CancellationToken) {
    const POLL: Duration = Duration::from_millis(500);
    let mut paths = reloader.watched_files().await;
    let mut applied = {
        let paths = paths.clone();
        tokio::task::spawn_blocking(move || fingerprint(&paths))
            .await
            .unwrap_or_default()
    };
    let mut pending: Option<Fingerprint> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
        // stat(2) can hang on a network file system or a stuck secret mount: never on a
        // worker that carries connections.
        let now = {
            let paths = paths.clone();
            match tokio::task::spawn_blocking(move || fingerprint(&paths)).await {
                Ok(f) => f,
                Err(_) => continue,
            }
        };
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
        // Whatever the outcome, the files as they were before the reload were tried: taking
        // their state after it would swallow a change written while it ran.
        paths = reloader.watched_files().await;
        let (now, again) = (now, paths.clone());
        // Unknown (the pool failed): the next poll sees a difference and reloads once more.
        applied = tokio::task::spawn_blocking(move || tried(&now, &again))
            .await
            .unwrap_or_default();
        pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round-2 hardening, item 9: the state recorded after a reload is the one the reload
    /// read, so a file written during the reload still differs from it.
    #[test]
    fn a_change_written_during_a_reload_is_not_taken_as_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("apilb.toml");
        std::fs::write(&a, "one").expect("write");
        let before = fingerprint(std::slice::from_ref(&a));
        // Written while the reload runs: a new inode, as editors and atomic writers make.
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, "two, longer").expect("write");
        std::fs::rename(&tmp, &a).expect("rename");
        let new_file = dir.path().join("ca.pem");
        std::fs::write(&new_file, "ca").expect("write");
        let applied = tried(&before, &[a.clone(), new_file.clone()]);
        let now = fingerprint(&[a, new_file]);
        assert_ne!(
            now, applied,
            "the change written during the reload was swallowed"
        );
        let (_, first) = applied.iter().next().expect("entry");
        assert_eq!(Some(first), before.values().next());
    }
}
