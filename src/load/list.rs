//! The `list` profile: LIST requests at a fixed rate, open loop. Request k is due at
//! `start + k / qps` whatever happened to the ones before, and its latency is measured from
//! that due time, so a server that slows down shows up as latency instead of quietly
//! slowing the generator (coordinated omission). Requests take turns over the connections
//! and alternate between pods of all namespaces and pods of one namespace.

use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::client::Failure;
use super::kubelet::{Ctx, NodeConn};

/// LISTs in flight at most; a request due when this many are still out is counted as a
/// generator backlog error instead of being sent late.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// What the list profile asks for, in turn.
pub const LIST_PATHS: [&str; 2] = ["/api/v1/pods", "/api/v1/namespaces/default/pods"];

/// Sends LISTs at `qps` over `conns` until `run_for` has passed or the run stops; then waits
/// for the answers still out.
pub async fn run_list(conns: Vec<Arc<NodeConn>>, qps: f64, run_for: Duration, ctx: Arc<Ctx>) {
    if conns.is_empty() || qps <= 0.0 {
        return;
    }
    let interval = Duration::from_secs_f64(1.0 / qps);
    let start = tokio::time::Instant::now();
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    for k in 0u64.. {
        let due = start + interval.mul_f64(k as f64);
        if due >= start + run_for {
            break;
        }
        tokio::select! {
            () = ctx.stop.cancelled() => break,
            () = tokio::time::sleep_until(due) => {}
        }
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            ctx.stats.failed(
                Failure::Backlog,
                &format!("{MAX_IN_FLIGHT} LISTs still in flight when another was due"),
            );
            continue;
        };
        let conn = conns[(k as usize) % conns.len()].clone();
        let path = LIST_PATHS[(k as usize / conns.len()) % LIST_PATHS.len()];
        let due = due.into_std();
        tasks.spawn(async move {
            let _permit = permit;
            conn.call("LIST", Method::GET, path, None, &[], Some(due))
                .await;
        });
    }
    while tasks.join_next().await.is_some() {}
}
