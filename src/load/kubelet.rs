//! The simulated clients: a node's connection ([`NodeConn`]: one HTTP/2 connection, opened
//! again when it is gone), the `kubelet` profile ([`run_node`]: register, watch its pods and
//! its Node, renew its Lease, post its status) and the watch loop that re-establishes a
//! broken watch from its last resourceVersion, listing again after `410 Gone`, as
//! client-go's reflector does.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::client::{Conn, Dialer, Failure};
use super::stats::Stats;

/// What every simulated client shares.
#[derive(Debug)]
pub struct Ctx {
    /// The counters.
    pub stats: Arc<Stats>,
    /// Fired at the end of the run: no new request starts after it.
    pub stop: CancellationToken,
    /// Between two renewals of a node's Lease (10 s, as kubelets do).
    pub lease_every: Duration,
    /// Between two node status updates (60 s).
    pub status_every: Duration,
}

/// One simulated client's connection.
#[derive(Debug)]
pub struct NodeConn {
    dialer: Dialer,
    conn: tokio::sync::Mutex<Option<Conn>>,
    stats: Arc<Stats>,
}

impl NodeConn {
    /// A client that connects with `dialer` when it first needs to.
    pub fn new(dialer: Dialer, stats: Arc<Stats>) -> Self {
        Self {
            dialer,
            conn: tokio::sync::Mutex::new(None),
            stats,
        }
    }

    /// The open connection, or a new one; a failure is counted.
    pub async fn get(&self) -> Option<Conn> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Some(c.clone());
        }
        match self.dialer.connect().await {
            Ok(c) => {
                *slot = Some(c.clone());
                Some(c)
            }
            Err((kind, what)) => {
                *slot = None;
                self.stats.failed(kind, &what);
                None
            }
        }
    }

    /// Forgets connection `id` if it is still the current one: a stream on it broke, and
    /// the connection task may not have noticed yet, so the next request must not go there.
    pub async fn discard(&self, id: u64) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|c| c.id() == id) {
            *slot = None;
        }
    }

    /// One request of `verb`, its latency measured from `since` (the intended send time for
    /// open-loop load). A status outside 2xx and `expected` is counted as an error.
    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        verb: &'static str,
        method: Method,
        path: &str,
        body: Option<(&str, Value)>,
        expected: &[u16],
        since: Option<Instant>,
    ) -> Option<(u16, Bytes)> {
        let conn = self.get().await?;
        let started = since.unwrap_or_else(Instant::now);
        let (ct, bytes) = match body {
            Some((ct, v)) => (Some(ct), Bytes::from(v.to_string())),
            None => (None, Bytes::new()),
        };
        match conn.call(method, path, ct, bytes).await {
            Ok((status, body)) => {
                self.stats.answered(verb, started.elapsed());
                if !(200..300).contains(&status) && !expected.contains(&status) {
                    self.stats.failed(
                        Failure::Status(status),
                        &format!("{verb} {path}: HTTP {status}"),
                    );
                }
                Some((status, body))
            }
            Err((kind, what)) => {
                if kind == Failure::Reset {
                    self.discard(conn.id()).await;
                }
                self.stats.failed(kind, &what);
                None
            }
        }
    }
}

fn now_micro() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// The escaped `fieldSelector=` value for `field=value`.
fn field(field: &str, value: &str) -> String {
    format!("fieldSelector={field}%3D{value}")
}

/// Waits `d`, or returns false when the run stops first.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// One simulated kubelet: starts after `delay`, registers its Node and Lease, watches its
/// pods and its Node, renews the Lease and posts its status until the run stops.
pub async fn run_node(name: String, conn: Arc<NodeConn>, ctx: Arc<Ctx>, delay: Duration) {
    if !pause(&ctx.stop, delay).await {
        return;
    }
    ctx.stats.nodes_started.fetch_add(1, Ordering::Relaxed);
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "apilb.io/load": "true"}},
        "status": {"nodeInfo": {"kubeletVersion": "v1.32.0-apilb-load"}},
    });
    conn.call(
        "CREATE",
        Method::POST,
        "/api/v1/nodes",
        Some(("application/json", node)),
        &[409],
        None,
    )
    .await;
    let leases = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases";
    let lease = |renew: String| {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": renew},
        })
    };
    conn.call(
        "CREATE",
        Method::POST,
        leases,
        Some(("application/json", lease(now_micro()))),
        &[409],
        None,
    )
    .await;
    let status_path = format!("/api/v1/nodes/{name}/status");
    let status = || {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        json!({"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "kubelet is posting ready status", "lastHeartbeatTime": now,
        }]}})
    };
    conn.call(
        "PATCH",
        Method::PATCH,
        &status_path,
        Some(("application/merge-patch+json", status())),
        &[],
        None,
    )
    .await;

    let pods = tokio::spawn(watch_loop(
        conn.clone(),
        ctx.clone(),
        format!("/api/v1/pods?{}", field("spec.nodeName", &name)),
    ));
    let own = tokio::spawn(watch_loop(
        conn.clone(),
        ctx.clone(),
        format!("/api/v1/nodes?{}", field("metadata.name", &name)),
    ));
    let lease_path = format!("{leases}/{name}");
    let mut lease_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + ctx.lease_every,
        ctx.lease_every,
    );
    let mut status_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + ctx.status_every,
        ctx.status_every,
    );
    for t in [&mut lease_tick, &mut status_tick] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            () = ctx.stop.cancelled() => break,
            _ = lease_tick.tick() => {
                conn.call("UPDATE", Method::PUT, &lease_path, Some(("application/json", lease(now_micro()))), &[], None).await;
            }
            _ = status_tick.tick() => {
                conn.call("PATCH", Method::PATCH, &status_path, Some(("application/merge-patch+json", status())), &[], None).await;
            }
        }
    }
    let _ = pods.await;
    let _ = own.await;
}

/// How a watch stream ended.
enum End {
    /// The run stopped.
    Stopped,
    /// An ERROR event with code 410: list again.
    Gone,
    /// The server ended it (at the timeout asked for, or earlier: see the caller).
    Ended,
    /// Cut short: the connection went, the server ended it early, or it sent an error.
    Broken,
}

/// client-go's reflector backoff: 800 ms doubling to 30 s, with jitter.
fn next_backoff(b: Duration) -> Duration {
    let base = if b.is_zero() {
        Duration::from_millis(800)
    } else {
        (b * 2).min(Duration::from_secs(30))
    };
    base.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

/// Lists `path` (which has a query already), then watches it from the list's
/// resourceVersion, re-establishing every break from the last resourceVersion seen.
pub async fn watch_loop(conn: Arc<NodeConn>, ctx: Arc<Ctx>, path: String) {
    let stats = &ctx.stats;
    let mut rv: Option<String> = None;
    let mut broken_at: Option<Instant> = None;
    let mut backoff = Duration::ZERO;
    loop {
        if ctx.stop.is_cancelled() || (!backoff.is_zero() && !pause(&ctx.stop, backoff).await) {
            return;
        }
        if rv.is_none() {
            match conn.call("LIST", Method::GET, &path, None, &[], None).await {
                Some((200, body)) => {
                    rv = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
                        v["metadata"]["resourceVersion"]
                            .as_str()
                            .map(str::to_string)
                    });
                    if rv.is_none() {
                        stats.failed(
                            Failure::Status(200),
                            &format!("LIST {path}: no resourceVersion in the answer"),
                        );
                        backoff = next_backoff(backoff);
                        continue;
                    }
                }
                _ => {
                    broken_at.get_or_insert_with(Instant::now);
                    backoff = next_backoff(backoff);
                    continue;
                }
            }
        }
        let Some(c) = conn.get().await else {
            broken_at.get_or_insert_with(Instant::now);
            backoff = next_backoff(backoff);
            continue;
        };
        // client-go asks for 5 to 10 minutes.
        let timeout = 300 + rand::random::<u64>() % 300;
        let watch_path = format!(
            "{path}&watch=1&allowWatchBookmarks=true&timeoutSeconds={timeout}&resourceVersion={}",
            rv.as_deref().unwrap_or("")
        );
        let started = Instant::now();
        let resp = match c.send(Method::GET, &watch_path, None, Bytes::new()).await {
            Ok(r) => r,
            Err((kind, what)) => {
                if kind == Failure::Reset {
                    conn.discard(c.id()).await;
                }
                stats.failed(kind, &what);
                broken_at.get_or_insert_with(Instant::now);
                backoff = next_backoff(backoff);
                continue;
            }
        };
        stats.answered("WATCH", started.elapsed());
        let status = resp.status().as_u16();
        if status != 200 {
            stats.failed(
                Failure::Status(status),
                &format!("WATCH {path}: HTTP {status}"),
            );
            if status == 410 {
                rv = None;
                stats.relists.fetch_add(1, Ordering::Relaxed);
            }
            broken_at.get_or_insert_with(Instant::now);
            backoff = next_backoff(backoff);
            continue;
        }
        stats.watches_open.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = broken_at.take() {
            stats.watch_back(at.elapsed());
        }
        backoff = Duration::ZERO;
        let end = stream(resp.into_body(), &mut rv, &ctx).await;
        stats.watches_open.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Stopped => return,
            // At the timeout asked for, a watch ends as planned; earlier, it was cut.
            End::Ended if started.elapsed() >= Duration::from_secs(timeout.saturating_sub(1)) => {}
            End::Ended => broken_at = Some(Instant::now()),
            End::Gone => {
                rv = None;
                stats.relists.fetch_add(1, Ordering::Relaxed);
                broken_at = Some(Instant::now());
            }
            End::Broken => {
                broken_at = Some(Instant::now());
                conn.discard(c.id()).await;
            }
        }
    }
}

/// Reads a watch stream's events, keeping the last resourceVersion.
async fn stream(mut body: hyper::body::Incoming, rv: &mut Option<String>, ctx: &Ctx) -> End {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let frame = tokio::select! {
            () = ctx.stop.cancelled() => return End::Stopped,
            f = body.frame() => f,
        };
        let data = match frame {
            None => return End::Ended,
            Some(Err(_)) => return End::Broken,
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            match event["type"].as_str() {
                Some("ERROR") => {
                    return if event["object"]["code"] == json!(410) {
                        End::Gone
                    } else {
                        End::Broken
                    };
                }
                Some(t) => {
                    if let Some(v) = event["object"]["metadata"]["resourceVersion"].as_str() {
                        *rv = Some(v.to_string());
                    }
                    if t != "BOOKMARK" {
                        ctx.stats.events.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {}
            }
        }
    }
}
