//! The load generator's HTTP/2 client, shaped like client-go's: one TLS connection per
//! simulated client (ALPN `h2`, pinged when idle), many streams on it, a new connection when
//! the old one is gone. Failures are sorted into the kinds the summary counts: connect, TLS,
//! HTTP status, reset, timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::tls;

/// How long a connect, a handshake, or a non-watch request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong with a request, as the summary counts it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The TCP connect failed.
    Connect,
    /// The TLS handshake failed.
    Tls,
    /// An HTTP status the caller did not expect.
    Status(u16),
    /// The connection or stream was reset or closed under the request.
    Reset,
    /// No answer in time.
    Timeout,
    /// The generator itself could not keep up (too many requests in flight): its own
    /// limit, reported so that a run it limited cannot pass for a fast server.
    Backlog,
}

impl Failure {
    /// The summary's name for it: `connect`, `tls`, `http 500`, `reset`, `timeout`.
    pub fn label(&self) -> String {
        match self {
            Self::Connect => "connect".into(),
            Self::Tls => "tls".into(),
            Self::Status(s) => format!("http {s}"),
            Self::Reset => "reset".into(),
            Self::Timeout => "timeout".into(),
            Self::Backlog => "generator backlog".into(),
        }
    }
}

/// Where to connect and how to prove who we are.
#[derive(Debug, Clone)]
pub struct Dialer {
    addr: SocketAddr,
    authority: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    token: Option<Arc<str>>,
}

/// The parts of a `https://host:port` URL.
///
/// # Errors
/// Not an https URL with a host.
pub fn split_server(server: &str) -> Result<(String, u16), String> {
    let rest = server
        .strip_prefix("https://")
        .ok_or_else(|| format!("server {server:?} is not an https:// URL"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("server {server:?}: unclosed [ in the address"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("server {server:?} has no host"));
    }
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("server {server:?}: bad port {p:?}"))?,
        None => 443,
    };
    Ok((host, port))
}

/// A rustls client for `ca_pem`, offering `identity` (certificate, key PEM), ALPN h2.
///
/// # Errors
/// Unusable PEM.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let roots = tls::roots_from_pem(ca_pem.as_bytes(), "CA").map_err(|e| e.to_string())?;
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                tls::certs_from_pem(cert.as_bytes(), "client certificate")
                    .map_err(|e| e.to_string())?,
                tls::key_from_pem(key.as_bytes(), "client key").map_err(|e| e.to_string())?,
            )
            .map_err(|e| format!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

impl Dialer {
    /// A dialer for `addr`, naming the server `host` (SNI, certificate check, `:authority`).
    ///
    /// # Errors
    /// `host` is not a valid server name.
    pub fn new(
        addr: SocketAddr,
        host: &str,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        token: Option<Arc<str>>,
    ) -> Result<Self, String> {
        let server_name = ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        )
        .map_err(|e| format!("{host:?} is not a server name: {e}"))?;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            addr,
            authority,
            server_name,
            tls,
            token,
        })
    }

    /// The same server, as another identity.
    pub fn with_identity(&self, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls,
            token: None,
            ..self.clone()
        }
    }

    /// Opens one HTTP/2 connection.
    ///
    /// # Errors
    /// [`Failure::Connect`], [`Failure::Tls`], [`Failure::Timeout`].
    pub async fn connect(&self) -> Result<Conn, (Failure, String)> {
        let tcp = match tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(self.addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err((Failure::Connect, format!("connect {}: {e}", self.addr))),
            Err(_) => {
                return Err((
                    Failure::Timeout,
                    format!("connect {}: timed out", self.addr),
                ))
            }
        };
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = match tokio::time::timeout(
            REQUEST_TIMEOUT,
            connector.connect(self.server_name.clone(), tcp),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err((Failure::Tls, format!("TLS with {}: {e}", self.addr))),
            Err(_) => {
                return Err((
                    Failure::Timeout,
                    format!("TLS with {}: timed out", self.addr),
                ))
            }
        };
        // client-go's HTTP/2 health check: a ping after 30 s without reads, 15 s to answer.
        let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(15))
            .handshake::<_, Full<Bytes>>(TokioIo::new(tls));
        let (send, conn) = match tokio::time::timeout(REQUEST_TIMEOUT, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err((Failure::Reset, format!("HTTP/2 with {}: {e}", self.addr))),
            Err(_) => {
                return Err((
                    Failure::Timeout,
                    format!("HTTP/2 with {}: timed out", self.addr),
                ))
            }
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            send,
            authority: self.authority.clone(),
            token: self.token.clone(),
            id: NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }
}

static NEXT_CONN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct Conn {
    send: SendRequest<Full<Bytes>>,
    authority: String,
    token: Option<Arc<str>>,
    id: u64,
}

impl Conn {
    /// Which connection this is (unique in the process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the connection is gone (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }

    /// Sends a request and returns the response head (the body still streaming).
    ///
    /// # Errors
    /// [`Failure::Reset`] or [`Failure::Timeout`], with a message.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<Response<Incoming>, (Failure, String)> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("https://{}{path}", self.authority))
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("apilb-load/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| (Failure::Reset, format!("{method} {path}: {e}")))?;
        let mut send = self.send.clone();
        let fut = async move {
            send.ready().await?;
            send.send_request(req).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err((Failure::Reset, format!("{method} {path}: {e}"))),
            Err(_) => Err((
                Failure::Timeout,
                format!(
                    "{method} {path}: no answer in {}s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// Sends a request and reads the whole answer: status and body.
    ///
    /// # Errors
    /// As [`Conn::send`], and a body cut short.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(u16, Bytes), (Failure, String)> {
        let resp = self.send(method.clone(), path, content_type, body).await?;
        let status = resp.status().as_u16();
        match tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect()).await {
            Ok(Ok(b)) => Ok((status, b.to_bytes())),
            Ok(Err(e)) => Err((Failure::Reset, format!("{method} {path}: body cut: {e}"))),
            Err(_) => Err((
                Failure::Timeout,
                format!("{method} {path}: body not done in time"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(
            split_server("https://127.0.0.1:6443"),
            Ok(("127.0.0.1".into(), 6443))
        );
        assert_eq!(
            split_server("https://[::1]:6443/"),
            Ok(("::1".into(), 6443))
        );
        assert_eq!(
            split_server("https://api.example.com"),
            Ok(("api.example.com".into(), 443))
        );
        assert!(split_server("http://127.0.0.1:6443").is_err());
        assert!(split_server("https://h:x").is_err());
    }
}
