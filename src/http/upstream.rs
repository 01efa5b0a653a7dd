//! Kept-alive TLS connections from an identity-mode listener to its pool's backends (SPEC
//! §10): per backend, one HTTP/2 connection on which the gateway presents
//! `identity.client_cert` (for clients with a verified certificate) and one on which it
//! presents none (for token users and anonymous clients), each multiplexing every request
//! of its kind; a backend that offers only HTTP/1.1 gets a connection per request. Upgrades
//! (`kubectl exec`) always get a fresh HTTP/1.1 connection of their own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Mutex;

use crate::balance::{Backend, Pool};

/// The request body the gateway forwards: the client's, counted.
pub(crate) type UpBody = Counted<Incoming>;

/// A backend address, and whether its connection presents the gateway's identity.
type Key = (SocketAddr, bool);

/// A way to send one request to one backend.
pub(crate) enum Sender {
    /// A shared HTTP/2 connection.
    H2(hyper::client::conn::http2::SendRequest<UpBody>),
    /// A connection of this request's own.
    H1(hyper::client::conn::http1::SendRequest<UpBody>),
}

/// The connections of one listener snapshot to the backends of its pools.
#[derive(Default)]
pub(crate) struct Upstreams {
    /// (backend address, presents the gateway's identity) -> the shared h2 connection; read
    /// under a plain lock for each request (a clone), held for no await.
    h2: std::sync::Mutex<
        HashMap<(SocketAddr, bool), hyper::client::conn::http2::SendRequest<UpBody>>,
    >,
    /// Per (backend, kind): held while a connection is being made, so concurrent requests to
    /// a backend without one wait for it instead of each opening their own, and a backend
    /// that does not answer holds up only its own requests.
    connecting: std::sync::Mutex<HashMap<Key, Arc<Mutex<()>>>>,
    /// TLS client configurations by (pool, identity, ALPN), built once.
    configs: std::sync::Mutex<HashMap<(String, bool, bool), Arc<rustls::ClientConfig>>>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstreams")
    }
}

impl Upstreams {
    /// The TLS configuration for `pool`'s backends: its CA, the gateway's identity when
    /// `identity` is given, `h2` and `http/1.1` offered (or only `http/1.1` for upgrades).
    fn config(
        &self,
        pool: &Pool,
        identity: Option<&crate::tls::Identity>,
        upgrade: bool,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let key = (pool.cfg.name.clone(), identity.is_some(), upgrade);
        if let Some(c) = self.configs.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let tls = pool.cfg.tls.as_ref().ok_or("pool has no [pool.tls]")?;
        let mut c = (*crate::tls::client_config(tls.roots.clone(), identity.cloned(), false)
            .map_err(|e| e.to_string())?)
        .clone();
        c.alpn_protocols = if upgrade {
            vec![b"http/1.1".to_vec()]
        } else {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        };
        let c = Arc::new(c);
        if let Ok(mut m) = self.configs.lock() {
            m.insert(key, c.clone());
        }
        Ok(c)
    }

    /// A sender to `backend` for a request of this kind: the shared h2 connection when it
    /// is up, else a new connection (h2 when the backend offers it, then shared).
    pub(crate) async fn sender(
        &self,
        pool: &Pool,
        backend: &Arc<Backend>,
        identity: Option<&crate::tls::Identity>,
    ) -> Result<Sender, String> {
        let key = (backend.addr, identity.is_some());
        if let Some(s) = self.ready_h2(&key) {
            return Ok(Sender::H2(s));
        }
        let gate = self
            .connecting
            .lock()
            .map(|mut m| m.entry(key).or_default().clone())
            .unwrap_or_default();
        let _connecting = gate.lock().await;
        // Someone else may have connected while this request waited.
        if let Some(s) = self.ready_h2(&key) {
            return Ok(Sender::H2(s));
        }
        let config = self.config(pool, identity, false)?;
        let tls = connect(pool, backend, config).await?;
        let h2_chosen = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2_chosen {
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| format!("HTTP/2 to {}: {e}", backend.name))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            if let Ok(mut m) = self.h2.lock() {
                m.insert(key, send.clone());
            }
            Ok(Sender::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("HTTP/1.1 to {}: {e}", backend.name))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H1(send))
        }
    }

    /// The shared h2 connection for `key` when it is up (a closed one is forgotten).
    fn ready_h2(&self, key: &Key) -> Option<hyper::client::conn::http2::SendRequest<UpBody>> {
        let mut m = self.h2.lock().ok()?;
        match m.get(key) {
            Some(s) if s.is_ready() => Some(s.clone()),
            Some(_) => {
                m.remove(key);
                None
            }
            None => None,
        }
    }

    /// A fresh HTTP/1.1 connection for an upgrade, driven with upgrades allowed.
    pub(crate) async fn upgrade_sender(
        &self,
        pool: &Pool,
        backend: &Arc<Backend>,
        identity: Option<&crate::tls::Identity>,
    ) -> Result<hyper::client::conn::http1::SendRequest<UpBody>, String> {
        let config = self.config(pool, identity, true)?;
        let tls = connect(pool, backend, config).await?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/1.1 to {}: {e}", backend.name))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(send)
    }
}

/// TCP and TLS to `backend` within the pool's `connect_timeout`, verified against
/// `[pool.tls]`; a failure counts against the backend (passive health), as for proxied
/// connections.
async fn connect(
    pool: &Pool,
    backend: &Arc<Backend>,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let name = pool.server_name(backend);
    let attempt = async {
        let tcp = crate::net::connect(backend.addr)
            .await
            .map_err(|e| e.to_string())?;
        // Shared and long-lived: keepalive from the start.
        crate::net::keep_alive(socket2::SockRef::from(&tcp), "backend");
        tokio_rustls::TlsConnector::from(config)
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| crate::tls::tls_reason(&e, &name))
    };
    let r = match tokio::time::timeout(pool.cfg.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "timeout after {}",
            humantime::format_duration(pool.cfg.connect_timeout)
        )),
    };
    if let Err(e) = &r {
        backend.metrics.connect_errors.inc();
        pool.observe(backend, false, &format!("connect failed: {e}"));
    } else {
        backend.metrics.connections.inc();
    }
    r
}

pin_project_lite::pin_project! {
    /// A body whose data bytes are counted into a shared total.
    pub(crate) struct Counted<B> {
        #[pin]
        inner: B,
        bytes: Arc<AtomicU64>,
    }
}

impl<B> Counted<B> {
    pub(crate) fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
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
