//! The one HTTP client of the tests: a single HTTP/1.1 request on a fresh connection, over
//! TLS or plain TCP, answered with status, headers and the whole body. hyper does the
//! protocol (chunked bodies, HEAD, `Connection: close`), so no test parses HTTP by hand.
//! [`https_get`], [`admin_request`] and [`whoami`] are the shapes the tests call it in.

use std::net::SocketAddr;
use std::sync::Arc;

use apilb::demo::apiserver::WhoAmI;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::HeaderMap;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::tls::tls_connect;

/// What came back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    /// The whole body (dechunked), lossily as UTF-8.
    pub body: String,
}

impl Reply {
    /// The value of header `name`, when present once or more (the first) and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The status line and the headers as text (names in lower case, as hyper keeps them).
    pub fn head(&self) -> String {
        let mut s = format!("HTTP/1.1 {}\r\n", self.status);
        for (k, v) in &self.headers {
            s.push_str(&format!(
                "{k}: {}\r\n",
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
        s
    }
}

/// One HTTP/1.1 request on a fresh connection to `addr`, through TLS when `tls` gives a
/// client config and server name (which is also the `Host`), else in the clear with
/// `Host: admin`. Sends `Connection: close`. Any failure to connect or to get a whole answer
/// fails the test.
pub async fn request(
    addr: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, &str)>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    match tls {
        Some((cfg, server_name)) => {
            let stream = tls_connect(addr, cfg, server_name)
                .await
                .expect("TLS handshake");
            exchange(stream, server_name, method, path, headers).await
        }
        None => {
            let stream = TcpStream::connect(addr).await.expect("connect");
            exchange(stream, "admin", method, path, headers).await
        }
    }
}

async fn exchange<S>(io: S, host: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
            .await
            .expect("HTTP/1.1 handshake");
    // Drives the connection; it ends when the answer is read and the sender dropped.
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONNECTION, "close");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::new()).expect("request");
    let resp = sender
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: body cut: {e}"))
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// GET `path` over HTTP/1.1 through TLS to `addr`; returns status and body.
pub async fn https_get(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    server_name: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let r = request(addr, Some((cfg, server_name)), "GET", path, headers).await;
    (r.status, r.body)
}

/// A plain HTTP/1.1 request to the admin server; returns status, head (see [`Reply::head`])
/// and body.
pub async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let r = request(addr, None, method, path, &[]).await;
    (r.status, r.head(), r.body)
}

/// `GET /whoami` of a simulated apiserver (through whatever `addr` is), as `kubernetes`.
pub async fn whoami(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> WhoAmI {
    let (status, body) = https_get(addr, cfg, "kubernetes", "/whoami", &[]).await;
    assert_eq!(status, 200, "body: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("whoami JSON {body:?}: {e}"))
}
