//! Shared support for the integration tests, split by what it stands for: the gateway under
//! test ([`gateway`]), the backends behind it ([`backends`]), the PKI and TLS clients
//! ([`tls`]), an HTTP/1.1 client ([`http`]), a Prometheus text reader ([`metrics`]) and
//! child processes ([`process`]). This file owns what every test needs to stay bounded in
//! time ([`within`], [`eventually`]) and the bearer token the simulated apiservers accept.
//! Everything listens on loopback with ephemeral ports. Each test binary uses a subset, hence
//! the `dead_code` allowance for the whole tree, and `unused_imports` for the re-exports a
//! binary does not reach.
#![allow(dead_code, unused_imports, unreachable_pub, missing_docs)]

pub mod backends;
pub mod cluster;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod process;
pub mod tls;

pub use backends::*;
pub use cluster::*;
pub use gateway::*;
pub use http::*;
pub use metrics::*;
pub use process::*;
pub use tls::*;

use std::future::Future;
use std::time::Duration;

/// The bearer token the simulated apiservers of [`apiservers`] accept (as `token-user`).
pub const TOKEN: &str = "test-token";

/// Every await in a test goes under this, so a bug fails the test instead of hanging it.
pub async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

/// Polls `cond` every 20 ms until it holds; panics after `secs`. Returns how long it took.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = std::time::Instant::now();
    within(secs, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    started.elapsed()
}
