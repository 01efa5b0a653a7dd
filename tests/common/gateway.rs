//! The gateway under test, in process: started from TOML text or from a file (so it can
//! reload it), and the config text and files the tests give it. [`Gw`] stops it cleanly and
//! reads its metrics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::{eventually, within};

/// A `[[pool.backend]]` block per address, named `b0..`.
pub fn backends_toml(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("  [[pool.backend]]\n  name = \"b{i}\"\n  address = \"{a}\"\n"))
        .collect()
}

/// A gateway with one pool `p` over `backends` and one listener `l` on 127.0.0.1:0.
pub fn simple_config(backends: &[SocketAddr], pool_extra: &str, listener_extra: &str) -> String {
    format!(
        "[[pool]]\nname = \"p\"\n{pool_extra}\n{}\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n{listener_extra}\n",
        backends_toml(backends)
    )
}

/// A running gateway and the means to stop it.
pub struct Gw {
    pub handle: Option<apilb::Handle>,
    stop: Option<oneshot::Sender<()>>,
}

impl Gw {
    /// The first address of listener `l`.
    pub fn addr(&self) -> SocketAddr {
        self.handle().addr("l").expect("listener l")
    }

    pub fn handle(&self) -> &apilb::Handle {
        self.handle.as_ref().expect("running")
    }

    /// Everything the gateway's registry holds right now, parsed.
    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.handle().metrics().encode())
    }

    /// The one sample of `name` with exactly `labels`; panics when there is none.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics().value(name, labels)
    }

    /// Waits until backend `backend` of pool `pool` has had its first health check.
    pub async fn first_check(&self, pool: &str, backend: &str) {
        eventually(5, "first check", || {
            self.handle()
                .backend_status(pool, backend)
                .is_some_and(|s| s.last_check.is_some())
        })
        .await;
    }

    /// Fires the shutdown future without waiting for the drain.
    pub fn begin_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    pub async fn shutdown(mut self) -> apilb::ShutdownReport {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let h = self.handle.take().expect("running");
        within(30, "gateway shutdown", h.wait())
            .await
            .expect("a clean shutdown")
    }
}

pub async fn gateway(toml_text: &str) -> Gw {
    gateway_with(toml_text, apilb::GatewayOptions::default()).await
}

pub async fn gateway_with(toml_text: &str, opts: apilb::GatewayOptions) -> Gw {
    let cfg = apilb::config::parse(Path::new("test.toml"), toml_text)
        .unwrap_or_else(|e| panic!("config should be valid:\n{e}\n---\n{toml_text}"));
    start(cfg, opts).await
}

/// A gateway started from a config file, so it can reload it.
pub async fn gateway_file(path: &Path) -> Gw {
    let cfg = apilb::config::load(path).unwrap_or_else(|e| panic!("config should be valid:\n{e}"));
    start(cfg, apilb::GatewayOptions::default()).await
}

async fn start(cfg: apilb::config::Config, opts: apilb::GatewayOptions) -> Gw {
    let (tx, rx) = oneshot::channel::<()>();
    let handle = apilb::Gateway::start(cfg, opts, async move {
        let _ = rx.await;
    })
    .await
    .expect("gateway starts");
    Gw {
        handle: Some(handle),
        stop: Some(tx),
    }
}

/// Writes `text` to a fresh temp file named `name` and returns the folder guard and path.
pub fn write_temp(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write");
    (dir, path)
}

/// Writes `text` to `path` atomically (a temp file renamed over it), as careful tools do.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}
