//! The admin server: `/metrics`, `/healthz`, `/readyz`, `/status` and `/api/status` (SPEC §4).
//!
//! It only reads: the current [`View`] of the gateway (published by the runtime at start and
//! on every reload) and the metrics registry; `json` renders `/api/status` and `page` the
//! HTML status page from the same view. Nothing here changes state, and nothing here is on
//! the data path. It speaks HTTP/1.1 with hyper on its own listener, which validation keeps
//! apart from every traffic listener.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::phase::Phase;

mod json;
mod page;
mod view;

use json::status_json;
use page::status_html;
pub(crate) use view::{not_ready, ListenerView, ReloadOutcome, View};

/// Admin connections served at once; more wait in the kernel's queue (a scraper, keepalived
/// and a person with a browser need a handful, a flood must not take descriptors or memory).
const MAX_CONNECTIONS: usize = 64;
/// The longest one admin connection may live, keep-alive included: a client that reads its
/// answer slowly (or never) is cut, so it cannot hold one of the slots.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// How long one encoding of `/metrics` is served again: scrapes from several Prometheus
/// servers (or a flood of requests) cost one encoding a second, not one each.
const METRICS_CACHE: Duration = Duration::from_secs(1);
/// `/metrics`'s content type (Prometheus text format 0.0.4).
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything the admin server reads.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub view: Arc<ArcSwap<View>>,
    pub metrics: Arc<Metrics>,
    pub phase: watch::Receiver<Phase>,
    /// The last `/metrics` text and when it was encoded.
    pub encoded: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, Bytes)>>>,
}

impl Admin {
    pub(crate) fn new(
        view: Arc<ArcSwap<View>>,
        metrics: Arc<Metrics>,
        phase: watch::Receiver<Phase>,
    ) -> Self {
        Self {
            view,
            metrics,
            phase,
            encoded: Arc::default(),
        }
    }

    /// The metrics text, encoded at most once per [`METRICS_CACHE`]. The encoding (every
    /// family, a few hundred series) runs on the blocking pool, and a request that finds
    /// another encoding under way waits for it without holding a worker.
    async fn metrics_text(&self) -> Option<Bytes> {
        let mut cached = self.encoded.lock().await;
        let now = tokio::time::Instant::now();
        if let Some((at, text)) = &*cached {
            if now.duration_since(*at) < METRICS_CACHE {
                return Some(text.clone());
            }
        }
        let ready = not_ready(&self.view.load(), *self.phase.borrow()).is_none();
        self.metrics.set_ready(ready);
        let metrics = self.metrics.clone();
        // A failed encoding (the pool shutting down) is no scrape: an empty 200 would look
        // like a gateway with every series gone.
        let text = Bytes::from(
            tokio::task::spawn_blocking(move || metrics.encode())
                .await
                .ok()?,
        );
        *cached = Some((now, text.clone()));
        Some(text)
    }
}

/// Serves admin requests on `listener` until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, admin: Admin, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        // A slot first: at the limit, new connections wait in the listen queue.
        let Ok(slot) = (tokio::select! {
            () = stop.cancelled() => return,
            s = slots.clone().acquire_owned() => s,
        }) else {
            return;
        };
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // One warning a second at most: EMFILE would repeat it every pause.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(error = %e, "admin accept failed");
                        last_warning = Some(tokio::time::Instant::now());
                    }
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
                async move {
                    if req.uri().path() == "/metrics"
                        && matches!(*req.method(), Method::GET | Method::HEAD)
                    {
                        return Ok::<_, Infallible>(match admin.metrics_text().await {
                            Some(body) => respond_bytes(StatusCode::OK, METRICS_TYPE, body),
                            None => respond(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain; charset=utf-8",
                                "metrics could not be encoded (shutting down?)\n".into(),
                            ),
                        });
                    }
                    Ok(route(&req, &admin))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_DEADLINE, conn) => {}
                () = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    respond_bytes(status, content_type, Bytes::from(body))
}

fn respond_bytes(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(body))
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
