//! The front-proxy identity mode of a terminate listener (SPEC §10): one listener with a
//! public certificate that verifies clients' certificates itself and tells the apiservers
//! who the caller is, the way kube-apiserver's `--requestheader-*` flags expect.
//!
//! After the client's handshake (HTTP/2 or HTTP/1.1 by its ALPN) the connection is served
//! by hyper, and every request is balanced on its own among the pool's healthy backends.
//! The header rules live in [`headers`] (pure); the kept-alive backend connections in
//! [`upstream`]. Requests of a client with a verified certificate go over connections on
//! which the gateway presents `identity.client_cert`, with the identity headers set; the
//! others over connections that present nothing, with their own `Authorization` untouched,
//! so the apiserver authenticates a token (or sees an anonymous caller) exactly as if the
//! client had come directly. Responses stream through without being buffered; upgrades
//! (`kubectl exec`, `port-forward`) become a byte tunnel once the backend answered `101`.
//! Each request ends with one access-log line and its two metrics.

pub(crate) mod headers;
pub(crate) mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::balance::{ActiveGuard, Pool};
use crate::snapshot::ListenerSnapshot;
use headers::Verified;
use upstream::{Counted, Sender};

/// A client that has not sent a whole request head within this long is closed (slowloris
/// on HTTP/1.1; HTTP/2 has its own keep-alive).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most request-head bytes an HTTP/1.1 client may send (hyper's buffer).
const MAX_HEAD: usize = 64 * 1024;
/// The most headers in one HTTP/1.1 request.
const MAX_HEADERS: usize = 128;
/// HTTP/2: streams a client may have open at once, and the header block size.
const MAX_STREAMS: u32 = 250;
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// HTTP/2 streams a client may reset before the server caught up (CVE-2023-44487, "rapid
/// reset"): over it the connection is closed with GOAWAY.
const MAX_PENDING_RESETS: usize = 20;

type RespBody = BoxBody<Bytes, hyper::Error>;

/// What every request of one client connection shares.
struct Conn {
    state: Arc<ListenerSnapshot>,
    pool: Arc<Pool>,
    route: crate::snapshot::RouteTag,
    client: SocketAddr,
    /// The client's address as `X-Forwarded-For` sets it.
    forwarded: hyper::header::HeaderValue,
    verified: Option<Verified>,
}

/// Serves one identity-mode connection after its TLS handshake.
pub(crate) async fn serve<IO>(
    tls: IO,
    client: SocketAddr,
    state: Arc<ListenerSnapshot>,
    pool: Arc<Pool>,
    route: crate::snapshot::RouteTag,
    peer_leaf: Option<Vec<u8>>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let verified = peer_leaf.as_deref().and_then(Verified::of);
    let conn = Arc::new(Conn {
        state: state.clone(),
        pool,
        route,
        client,
        forwarded: hyper::header::HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("unknown")),
        verified,
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    });
    let served = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(served);
    tokio::select! {
        r = &mut served => {
            if let Err(e) = r {
                state.metrics.http_errors.inc();
                tracing::debug!(listener = %state.cfg.name, client = %client, error = %e, "HTTP connection ended with an error");
            }
        }
        () = state.drain.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), served).await;
        }
    }
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Connection: upgrade`).
fn is_upgrade(req: &Request<Incoming>) -> bool {
    let connection_upgrade = req
        .headers()
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade && req.headers().contains_key(hyper::header::UPGRADE)
}

/// A response of the gateway's own (no backend, or a failure reaching one).
fn own(status: StatusCode, text: &str) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// What the access line of a request needs, written when its response ends.
struct Line {
    conn: Arc<Conn>,
    method: hyper::Method,
    path: String,
    verb: &'static str,
    started: Instant,
    up: Arc<AtomicU64>,
}

impl Line {
    fn write(&self, status: u16, backend: &str, down: u64) {
        let state = &self.conn.state;
        let code = status.to_string();
        state
            .metrics
            .http_requests
            .with_label_values(&[&state.cfg.name, backend, &code])
            .inc();
        if self.verb != "watch" && self.verb != "connect" {
            state
                .metrics
                .http_duration
                .with_label_values(&[&state.cfg.name, self.verb])
                .observe(self.started.elapsed().as_secs_f64());
        }
        let user = self.conn.verified.as_ref().map_or("-", |v| v.user.as_str());
        tracing::info!(
            target: "apilb::access",
            listener = %state.cfg.name,
            client = %self.conn.client,
            user,
            method = %self.method,
            path = %self.path,
            verb = self.verb,
            status,
            backend,
            route = state.route_name(self.conn.route).map(tracing::field::display),
            duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            bytes_up = self.up.load(Ordering::Relaxed),
            bytes_down = down,
            "request"
        );
    }
}

async fn handle(conn: &Arc<Conn>, mut req: Request<Incoming>) -> Response<RespBody> {
    let state = &conn.state;
    let Some(id) = state.cfg.identity.as_ref() else {
        return own(
            StatusCode::INTERNAL_SERVER_ERROR,
            "not an identity listener",
        );
    };
    let upgrade = is_upgrade(&req);
    let line = Line {
        conn: conn.clone(),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        verb: headers::verb(req.method(), req.uri().path(), req.uri().query(), upgrade),
        started: Instant::now(),
        up: Arc::new(AtomicU64::new(0)),
    };
    headers::prepare(
        req.headers_mut(),
        id,
        conn.verified.as_ref(),
        &conn.forwarded,
        upgrade,
    );
    let identity = conn.verified.as_ref().map(|_| &id.client);
    let pool = &conn.pool;
    let upstreams = &state.upstreams;
    let attempts = pool.cfg.connect_attempts.get() as usize;
    let mut tried = Vec::new();
    let (guard, sender) = loop {
        let Some(i) = pool.pick(&tried) else {
            line.write(503, "-", 0);
            return own(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend");
        };
        tried.push(i);
        let backend = &pool.backends[i];
        let guard = ActiveGuard::new(backend.clone());
        let s = if upgrade {
            upstreams
                .upgrade_sender(pool, backend, identity)
                .await
                .map(Sender::H1)
        } else {
            upstreams.sender(pool, backend, identity).await
        };
        match s {
            Ok(s) => break (guard, s),
            Err(e) if tried.len() >= attempts => {
                tracing::debug!(listener = %state.cfg.name, backend = %backend.name, error = %e, "no backend connection");
                line.write(502, &backend.name, 0);
                return own(StatusCode::BAD_GATEWAY, "cannot reach an apiserver");
            }
            Err(_) => {}
        }
    };
    let backend_name = guard.backend().name.clone();
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let authority = authority(pool, guard.backend(), req.headers());
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", hyper::http::uri::PathAndQuery::as_str)
        .to_string();
    let body = Counted::new(body, line.up.clone());
    let sent = match sender {
        Sender::H2(mut s) => {
            parts.version = hyper::Version::HTTP_2;
            parts.headers.remove(hyper::header::HOST);
            parts.uri = match format!("https://{authority}{pq}").parse() {
                Ok(u) => u,
                Err(_) => return own(StatusCode::BAD_REQUEST, "bad request target"),
            };
            s.send_request(Request::from_parts(parts, body)).await
        }
        Sender::H1(mut s) => {
            parts.version = hyper::Version::HTTP_11;
            if !parts.headers.contains_key(hyper::header::HOST) {
                if let Ok(h) = hyper::header::HeaderValue::from_str(&authority) {
                    parts.headers.insert(hyper::header::HOST, h);
                }
            }
            parts.uri = match pq.parse() {
                Ok(u) => u,
                Err(_) => return own(StatusCode::BAD_REQUEST, "bad request target"),
            };
            s.send_request(Request::from_parts(parts, body)).await
        }
    };
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(listener = %state.cfg.name, backend = %backend_name, error = %e, "request to the backend failed");
            line.write(502, &backend_name, 0);
            return own(StatusCode::BAD_GATEWAY, "the apiserver did not answer");
        }
    };
    let status = resp.status();
    if let Some(client_upgrade) = client_upgrade {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            let drain = state.drain.clone();
            tokio::spawn(async move {
                let (Ok(c), Ok(b)) = (client_upgrade.await, backend_upgrade.await) else {
                    line.write(101, &backend_name, 0);
                    return;
                };
                let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                let moved = tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut c, &mut b) => r.unwrap_or((0, 0)),
                    () = drain.cancelled() => (0, 0),
                };
                line.up.fetch_add(moved.0, Ordering::Relaxed);
                line.write(101, &backend_name, moved.1);
                drop(guard);
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(
                parts,
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            );
        }
    }
    let (parts, body) = resp.into_parts();
    let idle_for = state.cfg.idle_timeout;
    let clock = crate::relay::Clock::new();
    let logged = Logged {
        inner: body,
        idle: clock.first_deadline(idle_for),
        idle_for,
        clock,
        down: 0,
        end: Some((line, backend_name, status.as_u16(), guard)),
    };
    Response::from_parts(parts, logged.boxed())
}

/// The authority the backend is asked for: the pool's `server_name` when set (what its
/// certificate names), else the client's `Host`, else the backend's address.
fn authority(pool: &Pool, backend: &crate::balance::Backend, headers: &hyper::HeaderMap) -> String {
    match pool.server_name(backend) {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_string(),
        // The client's Host only when it is an authority and nothing more: pasted into the
        // request target, `h/api/...` would change the path sent.
        _ => headers
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                h.parse::<hyper::http::uri::Authority>()
                    .is_ok_and(|a| a.as_str() == *h)
                    && !h.contains(['/', '?', '#', '@'])
            })
            .map_or_else(|| backend.addr.to_string(), str::to_string),
    }
}

pin_project_lite::pin_project! {
    /// A response body streamed frame by frame (never buffered: watches and `logs -f` flow
    /// as they come), which writes the request's access line when it ends or is dropped,
    /// and holds the backend's active count until then. A stream with no byte for the
    /// listener's `idle_timeout` ends there, as a quiet passthrough connection would.
    struct Logged {
        #[pin]
        inner: Incoming,
        #[pin]
        idle: tokio::time::Sleep,
        idle_for: Duration,
        // The relay's idle clock: a frame stores a timestamp, the timer re-arms only when it
        // fires (no timer reset per frame).
        clock: crate::relay::Clock,
        down: u64,
        end: Option<(Line, String, u16, ActiveGuard)>,
    }

    impl PinnedDrop for Logged {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((line, backend, status, _guard)) = this.end.take() {
                line.write(status, &backend, *this.down);
            }
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let r = this.inner.poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    *this.down += d.len() as u64;
                }
                this.clock.stamp(false);
            }
            Poll::Pending if this.clock.poll_idle(this.idle.as_mut(), *this.idle_for, cx) => {
                return Poll::Ready(None);
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
