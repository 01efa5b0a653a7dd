//! A simulated kube-apiserver: a real TLS server that authenticates like the real one.
//!
//! It asks for a client certificate signed by the cluster CA but does not require one (as
//! kube-apiserver does), also accepts bearer tokens from a fixed list, and serves HTTP/1.1
//! and HTTP/2 (ALPN) with hyper. `/whoami` reports who the caller is, which is how tests prove
//! that a passthrough gateway did not terminate TLS: a user from a certificate CN can only
//! reach the backend if the certificate itself did. `/readyz` can be switched to failing at
//! run time for health-check tests. It is used by `apilb demo`, the tests and the benchmarks;
//! it is not a Kubernetes implementation.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::api::{self, store::Store};
use crate::tls;

use super::auth::{self, CertAuth};
pub use super::auth::{FrontProxy, Identity};

/// The response header that names the simulated apiserver which answered.
pub const SERVED_BY: &str = "x-apilb-apiserver";

/// What `/whoami` answers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WhoAmI {
    /// The backend's name.
    pub backend: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub http_version: String,
    /// `x509`, `token`, `front-proxy` or `anonymous`.
    pub authenticated_by: String,
    /// The caller's user name.
    pub user: String,
    /// The caller's groups.
    pub groups: Vec<String>,
    /// Every `X-Forwarded-For` value the request carried, in order (what a proxy in front
    /// said about the client).
    #[serde(default)]
    pub forwarded_for: Vec<String>,
}

/// How to run one simulated apiserver.
#[derive(Debug, Clone)]
pub struct ApiServerOptions {
    /// Reported by `/whoami` and in logs.
    pub name: String,
    /// Where to listen (port 0 for an ephemeral port).
    pub listen: SocketAddr,
    /// Serving certificate chain, PEM.
    pub cert_pem: String,
    /// Serving key, PEM.
    pub key_pem: String,
    /// CA bundle that client certificates must chain to, PEM.
    pub client_ca_pem: String,
    /// Accepted bearer tokens and who they stand for.
    pub tokens: Vec<(String, Identity)>,
    /// Time between events of the watch stream.
    pub watch_interval: Duration,
    /// Whether callers without credentials are served (`--anonymous-auth`); when off they
    /// get 401 on every path, health endpoints included.
    pub anonymous: bool,
}

/// Failure to start a simulated apiserver.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The TLS material is unusable.
    #[error("simulated apiserver {name}: {source}")]
    Tls {
        /// Which server.
        name: String,
        /// What was wrong.
        #[source]
        source: tls::TlsError,
    },
    /// The listening socket could not be bound.
    #[error("simulated apiserver {name}: cannot listen on {addr}: {source}")]
    Bind {
        /// Which server.
        name: String,
        /// The address asked for.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
}

struct Shared {
    name: String,
    ready: AtomicBool,
    requests: AtomicU64,
    handshake_errors: AtomicU64,
    connection_errors: AtomicU64,
    resumed: AtomicU64,
    tokens: Vec<(String, Identity)>,
    watch_interval: Duration,
    anonymous: bool,
    api: Option<Arc<Store>>,
    /// `--requestheader-client-ca-file` and `--requestheader-allowed-names`.
    front_proxy: Option<(rustls::RootCertStore, Vec<String>)>,
}

/// A running simulated apiserver; stops when dropped.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type RespBody = api::RespBody;

/// Time a client has to send a complete request head (HTTP/1.1).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

impl ApiServer {
    /// Binds and starts serving in the background.
    ///
    /// # Errors
    /// Unusable TLS material or a bind failure.
    pub async fn start(opts: ApiServerOptions) -> Result<Self, ApiServerError> {
        Self::start_inner(opts, None, None).await
    }

    /// [`ApiServer::start_with_api`] (or without a store) that also trusts an
    /// authenticating front proxy, as kube-apiserver's `--requestheader-*` flags do
    /// (SPEC §10).
    ///
    /// # Errors
    /// Unusable TLS material or a bind failure.
    pub async fn start_with_front_proxy(
        opts: ApiServerOptions,
        store: Option<Arc<Store>>,
        front_proxy: FrontProxy,
    ) -> Result<Self, ApiServerError> {
        Self::start_inner(opts, store, Some(front_proxy)).await
    }

    /// Binds and starts serving the simulated Kubernetes API of `store` (shared with the
    /// other apiservers given the same store) besides the endpoints of [`ApiServer::start`].
    ///
    /// # Errors
    /// Unusable TLS material or a bind failure.
    pub async fn start_with_api(
        opts: ApiServerOptions,
        store: Arc<Store>,
    ) -> Result<Self, ApiServerError> {
        Self::start_inner(opts, Some(store), None).await
    }

    async fn start_inner(
        opts: ApiServerOptions,
        api: Option<Arc<Store>>,
        front_proxy: Option<FrontProxy>,
    ) -> Result<Self, ApiServerError> {
        let tls_err = |source| ApiServerError::Tls {
            name: opts.name.clone(),
            source,
        };
        let provider = tls::provider();
        let mut roots =
            tls::roots_from_pem(opts.client_ca_pem.as_bytes(), "client CA").map_err(tls_err)?;
        // Both CAs verify client certificates; which one signed a certificate decides how it
        // authenticates (x509 user, or front proxy).
        let front_proxy = match front_proxy {
            None => None,
            Some(fp) => {
                let fp_roots =
                    tls::roots_from_pem(fp.ca_pem.as_bytes(), "front-proxy CA").map_err(tls_err)?;
                roots.roots.extend(fp_roots.roots.iter().cloned());
                Some((fp_roots, fp.allowed_names))
            }
        };
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| {
                    tls_err(tls::TlsError::Rustls {
                        what: "client CA".into(),
                        source: rustls::Error::General(e.to_string()),
                    })
                })?;
        let chain = tls::certs_from_pem(opts.cert_pem.as_bytes(), "serving certificate")
            .map_err(tls_err)?;
        let key = tls::key_from_pem(opts.key_pem.as_bytes(), "serving key").map_err(tls_err)?;
        let rustls_err = |source| {
            tls_err(tls::TlsError::Rustls {
                what: "serving certificate".into(),
                source,
            })
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(rustls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(rustls_err)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| ApiServerError::Bind {
                    name: opts.name.clone(),
                    addr: opts.listen,
                    source,
                })?;
        let addr = listener.local_addr().unwrap_or(opts.listen);
        let shared = Arc::new(Shared {
            name: opts.name,
            ready: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            handshake_errors: AtomicU64::new(0),
            connection_errors: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            tokens: opts.tokens,
            watch_interval: opts.watch_interval,
            anonymous: opts.anonymous,
            api,
            front_proxy,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            acceptor,
            shared.clone(),
            stop.clone(),
        ));
        Ok(Self { addr, shared, stop })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Makes `/readyz` pass (`true`) or fail with 500 (`false`).
    pub fn set_ready(&self, ready: bool) {
        self.shared.ready.store(ready, Ordering::Relaxed);
    }

    /// HTTP requests served so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// TLS handshakes that failed or were cut off: what kube-apiserver logs as
    /// "http: TLS handshake error".
    pub fn handshake_errors(&self) -> u64 {
        self.shared.handshake_errors.load(Ordering::Relaxed)
    }

    /// Connections that ended with an error after the handshake, such as a close without
    /// close_notify.
    pub fn connection_errors(&self) -> u64 {
        self.shared.connection_errors.load(Ordering::Relaxed)
    }

    /// TLS handshakes that resumed an earlier session instead of a full handshake (which
    /// costs the server a signature).
    pub fn resumed_handshakes(&self) -> u64 {
        self.shared.resumed.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes open connections.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(apiserver = %shared.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = serve_conn(tcp, peer, acceptor, shared) => {}
            }
        });
    }
}

async fn serve_conn(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            shared.handshake_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(apiserver = %shared.name, client = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.handshake_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(apiserver = %shared.name, client = %peer, "TLS handshake timed out");
            return;
        }
    };
    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        shared.resumed.fetch_add(1, Ordering::Relaxed);
    }
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let cert_identity = auth::cert_auth(leaf.map(|c| c.as_ref()), shared.front_proxy.as_ref());
    let cert_identity = Arc::new(cert_identity);
    let counters = shared.clone();
    let spoke = Arc::new(AtomicBool::new(false));
    let first = spoke.clone();
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let cert_identity = cert_identity.clone();
        first.store(true, Ordering::Relaxed);
        async move {
            let mut req = req;
            let cert = cert_identity.as_ref();
            let mut resp = if req.uri().path() == "/upgrade-echo" {
                upgrade_echo(&mut req)
            } else if let Some(store) = shared
                .api
                .as_ref()
                .filter(|_| api::serves(req.uri().path()))
            {
                shared.requests.fetch_add(1, Ordering::Relaxed);
                match auth::authenticate(&req, &shared.tokens, shared.anonymous, cert) {
                    Some((id, by)) => {
                        let caller = (by != "anonymous").then_some(api::Caller {
                            user: &id.user,
                            groups: &id.groups,
                        });
                        api::handle(store, req, caller).await
                    }
                    None => unauthorized(),
                }
            } else {
                route(&req, &shared, cert)
            };
            if let Ok(v) = hyper::header::HeaderValue::from_str(&shared.name) {
                resp.headers_mut().insert(SERVED_BY, v);
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that opens a connection and never finishes a request head is dropped, as
    // kube-apiserver's own server does; HTTP/2 connections are pinged so a vanished peer
    // does not hold one forever.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
    // hyper's header timeout starts with the first byte of a request: a client that never
    // sends one is dropped here.
    let silent = async {
        tokio::time::sleep(HEADER_TIMEOUT).await;
        if spoke.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        r = conn => r,
        () = silent => {
            tracing::debug!(client = %peer, "no request within the header timeout; closing");
            return;
        }
    };
    if let Err(e) = served {
        counters.connection_errors.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(client = %peer, error = %e, "connection ended with an error");
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<RespBody> {
    let mut body = value.to_string();
    body.push('\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn text(status: StatusCode, body: &'static str) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// The checks kube-apiserver lists under `/readyz?verbose` (a subset, in its order).
const READYZ_CHECKS: &[&str] = &[
    "ping",
    "log",
    "etcd",
    "etcd-readiness",
    "informer-sync",
    "api-priority-and-fairness",
    "poststarthook/start-apiserver-admission-initializer",
    "poststarthook/generic-apiserver-start-informers",
    "poststarthook/priority-and-fairness-config-consumer",
    "poststarthook/priority-and-fairness-filter",
    "poststarthook/storage-object-count-tracker-hook",
    "poststarthook/start-apiextensions-informers",
    "poststarthook/start-apiextensions-controllers",
    "poststarthook/crd-informer-synced",
    "poststarthook/start-system-namespaces-controller",
    "poststarthook/bootstrap-controller",
    "poststarthook/rbac/bootstrap-roles",
    "poststarthook/scheduling/bootstrap-system-priority-classes",
    "poststarthook/priority-and-fairness-config-producer",
    "poststarthook/start-cluster-authentication-info-controller",
    "poststarthook/start-kube-apiserver-identity-lease-controller",
    "poststarthook/aggregator-reload-proxy-client-cert",
    "poststarthook/start-kube-aggregator-informers",
    "poststarthook/apiservice-registration-controller",
    "poststarthook/apiservice-status-available-controller",
    "poststarthook/kube-apiserver-autoregistration",
    "autoregister-completion",
    "poststarthook/apiservice-openapi-controller",
    "shutdown",
];

/// `/readyz?verbose`: one line per check, sent as one chunk per line, as a long answer that
/// arrives in many frames (what a health check must handle without waiting for the end).
fn verbose_readyz(ready: bool) -> Response<RespBody> {
    let mut frames: std::collections::VecDeque<Bytes> = READYZ_CHECKS
        .iter()
        .map(|c| {
            let failed = !ready && *c == "shutdown";
            Bytes::from(format!(
                "[{}]{c} {}\n",
                if failed { "-" } else { "+" },
                if failed {
                    "failed: reason withheld"
                } else {
                    "ok"
                }
            ))
        })
        .collect();
    frames.push_back(Bytes::from_static(if ready {
        b"readyz check passed\n"
    } else {
        b"readyz check failed\n"
    }));
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(BodyExt::boxed(Frames(frames)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// A body of the given frames, one per poll (chunked on the wire).
struct Frames(std::collections::VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<RespBody> {
    json(
        code,
        &serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

fn unauthorized() -> Response<RespBody> {
    status_error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
}

fn route(req: &Request<Incoming>, shared: &Shared, cert: &CertAuth) -> Response<RespBody> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let Some((identity, by)) = auth::authenticate(req, &shared.tokens, shared.anonymous, cert)
    else {
        return unauthorized();
    };
    let query = req.uri().query().unwrap_or("");
    match req.uri().path() {
        "/version" => json(
            StatusCode::OK,
            &serde_json::json!({
                "major": "1", "minor": "32", "gitVersion": "v1.32.0-apilb-sim",
                "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc",
                "platform": "linux/amd64",
            }),
        ),
        "/healthz" | "/livez" => text(StatusCode::OK, "ok"),
        "/readyz"
            if query
                .split('&')
                .any(|p| p == "verbose" || p.starts_with("verbose=")) =>
        {
            verbose_readyz(shared.ready.load(Ordering::Relaxed))
        }
        "/readyz" => {
            if shared.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ok")
            } else {
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "[-]shutdown failed: reason withheld\nreadyz check failed\n",
                )
            }
        }
        "/whoami" => json(
            StatusCode::OK,
            &serde_json::json!(WhoAmI {
                backend: shared.name.clone(),
                http_version: format!("{:?}", req.version()),
                authenticated_by: by.into(),
                user: identity.user,
                groups: identity.groups,
                forwarded_for: req
                    .headers()
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(str::to_string)
                    .collect(),
            }),
        ),
        "/api/v1/namespaces/default/pods"
            if query
                .split('&')
                .any(|p| p == "watch=1" || p == "watch=true") =>
        {
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(BodyExt::boxed(WatchBody::new(
                    shared.name.clone(),
                    shared.watch_interval,
                )))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
        }
        _ => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

/// `GET /upgrade-echo` with `Connection: Upgrade` and `Upgrade: echo`: 101, then every byte
/// the client sends comes back, as on the SPDY/WebSocket streams of `kubectl exec`.
fn upgrade_echo(req: &mut Request<Incoming>) -> Response<RespBody> {
    let wants = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("echo"));
    if !wants || req.version() != hyper::Version::HTTP_11 {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "expected an HTTP/1.1 Upgrade: echo request",
        );
    }
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let mut io = TokioIo::new(upgraded);
            let (mut r, mut w) = tokio::io::split(&mut io);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::CONNECTION, "Upgrade")
        .header(hyper::header::UPGRADE, "echo")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// An endless stream of watch events, one JSON object per line, until the client leaves.
struct WatchBody {
    backend: String,
    interval: tokio::time::Interval,
    sent: u64,
}

impl WatchBody {
    fn new(backend: String, every: Duration) -> Self {
        Self {
            backend,
            interval: tokio::time::interval(every.max(Duration::from_millis(1))),
            sent: 0,
        }
    }
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        ready!(self.interval.poll_tick(cx));
        self.sent += 1;
        let kind = if self.sent == 1 { "ADDED" } else { "MODIFIED" };
        let event = serde_json::json!({
            "type": kind,
            "object": {
                "kind": "Pod", "apiVersion": "v1",
                "metadata": {
                    "name": "demo", "namespace": "default",
                    "resourceVersion": self.sent.to_string(),
                    "annotations": {"apilb.demo/backend": self.backend},
                },
            },
        });
        let mut line = event.to_string();
        line.push('\n');
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(line)))))
    }
}
