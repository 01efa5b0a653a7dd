//! The admin server: `/metrics`, `/healthz`, `/readyz`, `/status` and `/api/status` (SPEC §4).
//!
//! It only reads: the current [`View`] of the gateway (published by the runtime at start and
//! on every reload) and the metrics registry; `json` renders `/api/status` and `page` the
//! HTML status page from the same view. Nothing here changes state, and nothing here is on
//! the data path. It speaks HTTP/1.1 with hyper on its own listener, which validation keeps
//! apart from every traffic listener.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::balance::{Backend, Pool};
use crate::config::{CertificateInfo, Mode};
use crate::metrics::Metrics;
use crate::phase::Phase;

mod json;
mod page;

pub(crate) use json::status_json;
pub(crate) use page::status_html;

/// What the admin endpoints show: one immutable snapshot, replaced whole.
#[derive(Debug, Clone)]
pub(crate) struct View {
    /// Listeners in config order.
    pub listeners: Vec<ListenerView>,
    /// Pools in config order, as the data path sees them.
    pub pools: Vec<Arc<Pool>>,
    /// Backends a reload removed whose connections were still open then: shown as
    /// `draining` while they still have some and their drain deadline has not passed.
    pub draining: Vec<(String, Arc<Backend>)>,
    /// Every certificate the config names.
    pub certificates: Vec<CertificateInfo>,
    /// When the running config was loaded.
    pub loaded_at: SystemTime,
    /// The last reload, when there was one.
    pub last_reload: Option<ReloadOutcome>,
}

impl View {
    /// The view before anything is bound.
    pub(crate) fn empty() -> Self {
        Self {
            listeners: Vec::new(),
            pools: Vec::new(),
            draining: Vec::new(),
            certificates: Vec::new(),
            loaded_at: SystemTime::now(),
            last_reload: None,
        }
    }

    /// Removed backends of `pool` that still drain connections.
    pub(crate) fn draining_in<'a>(
        &'a self,
        pool: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Backend>> {
        self.draining
            .iter()
            .filter(move |(p, b)| p == pool && b.active() > 0 && !b.drain.is_cancelled())
            .map(|(_, b)| b)
    }

    /// One line for a service manager's `STATUS=`: listeners and healthy backends, or why
    /// the last reload failed.
    pub(crate) fn status_line(&self) -> String {
        if let Some(e) = self.last_reload.as_ref().and_then(|r| r.error.as_ref()) {
            let first = e.lines().next().unwrap_or_default();
            return format!("reload failed, running the previous config: {first}");
        }
        let total: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        let healthy: usize = self
            .pools
            .iter()
            .map(|p| p.backends.iter().filter(|b| b.health.is_healthy()).count())
            .sum();
        let addrs: usize = self.listeners.iter().map(|l| l.listen.len()).sum();
        format!(
            "{} listeners on {addrs} addresses, {healthy}/{total} backends healthy",
            self.listeners.len()
        )
    }
}

/// One listener on the status page.
#[derive(Debug, Clone)]
pub(crate) struct ListenerView {
    /// Its name.
    pub name: String,
    /// passthrough or terminate.
    pub mode: Mode,
    /// Bound addresses.
    pub listen: Vec<SocketAddr>,
    /// The pool it uses.
    pub pool: String,
    /// Open connections.
    pub active: IntGauge,
}

/// How the last reload went.
#[derive(Debug, Clone)]
pub(crate) struct ReloadOutcome {
    /// When it happened.
    pub at: SystemTime,
    /// The error, if it failed (the running config then stayed as it was).
    pub error: Option<String>,
}

/// Everything the admin server reads.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub view: Arc<ArcSwap<View>>,
    pub metrics: Arc<Metrics>,
    pub phase: watch::Receiver<Phase>,
}

/// Serves admin requests on `listener` until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, admin: Admin, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&req, &admin)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn route(req: &Request<Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD: the admin endpoints change nothing\n".into(),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let text = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            admin.metrics.encode(),
        ),
        "/healthz" => respond(StatusCode::OK, text, "ok\n".into()),
        "/readyz" => match not_ready(&admin.view.load(), *admin.phase.borrow()) {
            None => respond(StatusCode::OK, text, "ok\n".into()),
            Some(reason) => respond(StatusCode::SERVICE_UNAVAILABLE, text, reason),
        },
        "/api/status" => respond(
            StatusCode::OK,
            "application/json",
            status_json(&admin.view.load(), *admin.phase.borrow()).to_string(),
        ),
        "/status" | "/" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_html(&admin.view.load(), *admin.phase.borrow()),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            text,
            "not found: try /status, /metrics, /readyz, /healthz, /api/status\n".into(),
        ),
    }
}

/// Why the gateway is not ready, or `None` when every listener's pool has a healthy backend.
pub(crate) fn not_ready(view: &View, phase: Phase) -> Option<String> {
    match phase {
        Phase::Running | Phase::Reloading => {}
        Phase::Starting => return Some("starting: listeners are being bound\n".into()),
        Phase::Draining | Phase::Stopped => {
            return Some("draining: shutting down, not accepting new connections\n".into())
        }
    }
    let mut reasons = String::new();
    for pool in &view.pools {
        if pool.backends.iter().any(|b| b.health.is_healthy()) {
            continue;
        }
        let users: Vec<&str> = view
            .listeners
            .iter()
            .filter(|l| l.pool == pool.cfg.name)
            .map(|l| l.name.as_str())
            .collect();
        if users.is_empty() {
            continue;
        }
        let _ = writeln!(
            reasons,
            "pool {:?} has no healthy backend (used by listener{} {})",
            pool.cfg.name,
            if users.len() == 1 { "" } else { "s" },
            users.join(", ")
        );
    }
    (!reasons.is_empty()).then_some(reasons)
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(crate) fn unix_rfc3339(secs: i64) -> String {
    rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}
