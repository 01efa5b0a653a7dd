//! The active checks: one loop per backend that checks at once, then every `interval` with
//! jitter, until its token is cancelled; `tcp` connects, `tls` completes a verified handshake,
//! `https` also sends `GET path` and judges the status.
//!
//! Checks never share connections with client traffic. `tls` and `https` checks verify the
//! backend against `[pool.tls]`, may present the health-only client certificate, and end
//! with close_notify so the apiserver logs no handshake error for a probe. Results go to the
//! pool ([`crate::balance::Pool::observe`]), which owns what a change of state means.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::balance::{Backend, Pool};
use crate::config::{CheckKind, HealthConfig};
use crate::tls::{io_reason, tls_reason};

/// Body bytes an https check reads before it stops listening: enough for any readiness
/// answer, bounded against a backend that streams.
const BODY_LIMIT: usize = 4096;

/// Starts one check loop per backend of `pool`; they end when `stop` is cancelled.
pub(crate) fn spawn(pool: &Arc<Pool>, stop: &CancellationToken) {
    for i in 0..pool.backends.len() {
        let pool = pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let backend = pool.backends[i].clone();
            let cfg = &pool.cfg.health;
            let name = pool.server_name(&backend);
            // A backend carried over by a reload keeps its state and is next checked after an
            // interval; one never checked (at start, or added by a reload) is checked at once.
            if backend.health.status().last_check.is_some() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(jittered(cfg.interval)) => {}
                }
            }
            loop {
                let started = Instant::now();
                // A check in flight is not cut short by shutdown (it is bounded by its
                // timeout): a probe dropped mid-handshake is an error in the apiserver's log.
                let mut leaf = None;
                let result = tokio::time::timeout(
                    cfg.timeout,
                    check(
                        &backend,
                        cfg,
                        name.clone(),
                        &mut leaf,
                        pool.cfg.send_proxy.is_some(),
                    ),
                )
                .await;
                if stop.is_cancelled() {
                    return;
                }
                backend
                    .metrics
                    .check_duration
                    .observe(started.elapsed().as_secs_f64());
                let (pass, reason) = match result {
                    Ok(Ok(())) => (true, "ok".to_string()),
                    Ok(Err(Failed::Backend(reason))) => (false, reason),
                    Ok(Err(Failed::Local(e))) => {
                        tracing::debug!(pool = %pool.cfg.name, backend = %backend.name, error = %e, "health check not run: the gateway is short of resources; not charged to the backend");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(jittered(cfg.interval)) => {}
                        }
                        continue;
                    }
                    Err(_) => (
                        false,
                        format!("timeout after {}", humantime::format_duration(cfg.timeout)),
                    ),
                };
                if pass {
                    backend.metrics.checks_pass.inc();
                } else {
                    backend.metrics.checks_fail.inc();
                }
                pool.observe(&backend, pass, &reason);
                if let Some(der) = leaf {
                    pool.observe_certificate(&backend, &der);
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(jittered(cfg.interval)) => {}
                }
            }
        });
    }
}

/// `interval` ± 10%, so the checks of many backends do not line up.
fn jittered(interval: Duration) -> Duration {
    let f = rand::random_range(0.9..1.1);
    interval.mul_f64(f)
}

async fn check(
    backend: &Backend,
    cfg: &HealthConfig,
    name: ServerName<'static>,
    leaf: &mut Option<Vec<u8>>,
    proxy: bool,
) -> Result<(), Failed> {
    let mut tcp = match TcpStream::connect(backend.addr).await {
        Ok(t) => t,
        // The gateway's own shortage says nothing about the backend (as for proxied
        // connects, connect.rs): no result at all, rather than a failure.
        Err(e) if crate::connect::is_local(&e) => return Err(Failed::Local(e.to_string())),
        Err(e) => return Err(Failed::Backend(io_reason(&e))),
    };
    let _ = tcp.set_nodelay(true);
    if proxy {
        send_local_header(&mut tcp).await.map_err(Failed::Backend)?;
    }
    let tls_config = match (cfg.check, &cfg.tls) {
        (CheckKind::Tcp, _) => return Ok(()),
        (_, Some(c)) => c.clone(),
        // Validation requires [pool.tls] for these checks.
        (_, None) => return Err(Failed::Backend("no [pool.tls] for a TLS check".into())),
    };
    let tls = handshake(tcp, tls_config, &name)
        .await
        .map_err(Failed::Backend)?;
    *leaf = leaf_of(&tls);
    if cfg.check == CheckKind::Tls {
        close_cleanly(tls);
        return Ok(());
    }
    let status = get_status(tls, &host_header(&name, backend.addr), &cfg.path)
        .await
        .map_err(Failed::Backend)?;
    judge_status(status, cfg).map_err(Failed::Backend)
}

/// Why a check did not pass.
enum Failed {
    /// The backend failed it: counted, and its state follows.
    Backend(String),
    /// The gateway could not even try (out of descriptors, buffers or ports): no result.
    Local(String),
}

// === The steps, shared with `apilb probe` (one way to reach and judge a backend) ===

/// A TCP connection to `addr`, or why not in plain words. `proxy`: the backend expects a
/// PROXY header (`send_proxy`), so a v2 `LOCAL` one goes first: the connection is the
/// gateway's own.
pub(crate) async fn reach(addr: std::net::SocketAddr, proxy: bool) -> Result<TcpStream, String> {
    let mut tcp = TcpStream::connect(addr).await.map_err(|e| io_reason(&e))?;
    let _ = tcp.set_nodelay(true);
    if proxy {
        send_local_header(&mut tcp).await?;
    }
    Ok(tcp)
}

async fn send_local_header(tcp: &mut TcpStream) -> Result<(), String> {
    use tokio::io::AsyncWriteExt as _;
    tcp.write_all(&crate::proxy_protocol::local_header())
        .await
        .map_err(|e| format!("writing the PROXY header: {}", io_reason(&e)))
}

/// A TLS handshake as `config` verifies it, or the failure in the words operators search
/// for ("certificate signed by unknown authority", ...).
pub(crate) async fn handshake(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: &ServerName<'static>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    tokio_rustls::TlsConnector::from(config)
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| tls_reason(&e, name))
}

/// The peer's leaf certificate (DER).
pub(crate) fn leaf_of(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<Vec<u8>> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
}

/// The Host header for `name`: the DNS name, else the address.
pub(crate) fn host_header(name: &ServerName<'_>, addr: std::net::SocketAddr) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        _ => addr.to_string(),
    }
}

/// The verdict of an https check on `status`, with the 401/403 hint.
pub(crate) fn judge_status(status: u16, cfg: &HealthConfig) -> Result<(), String> {
    if cfg.expect_status.contains(&status) {
        Ok(())
    } else if status == 401 || status == 403 {
        Err(format!(
            "status {status}: anonymous access to {} is off: set health.client_cert, or allow anonymous health endpoints",
            cfg.path
        ))
    } else {
        Err(format!("status {status}"))
    }
}

/// `GET path` over HTTP/1.1 on `tls`; the status code. The connection is driven while the
/// response and at most BODY_LIMIT bytes of its body are read: waiting for the connection to
/// finish first would hold a body of more than one frame (`/readyz?verbose`, chunked) until
/// the check timed out.
pub(crate) async fn get_status(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    host: &str,
    path: &str,
) -> Result<u16, String> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let conn = conn.without_shutdown();
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "apilb-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("HTTP request: {e}"))?;
    let mut conn = std::pin::pin!(conn);
    let send = sender.send_request(req);
    tokio::pin!(send);
    // A server that answers and closes at once (Connection: close) can end the connection
    // future in the same poll that delivered the response: then the response still counts.
    let mut conn_done = false;
    let resp = tokio::select! {
        biased;
        r = &mut send => r.map_err(|e| format!("HTTP: {e}"))?,
        c = &mut conn => {
            conn_done = true;
            match (c, (&mut send).await) {
                (_, Ok(resp)) => resp,
                (Ok(_), Err(_)) => return Err("HTTP: connection closed before the response".into()),
                (Err(e), Err(_)) => return Err(format!("HTTP: {e}")),
            }
        }
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let read_some = async {
        let mut read = 0;
        while read < BODY_LIMIT {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                Some(Err(_)) | None => return true,
            }
        }
        body.is_end_stream()
    };
    let whole = if conn_done {
        // Nothing more arrives; what was read with the head is all there is.
        read_some.await
    } else {
        tokio::select! {
            whole = read_some => whole,
            _ = &mut conn => {
                conn_done = true;
                false
            }
        }
    };
    drop(body);
    drop(sender);
    if whole && !conn_done {
        // The response is complete, so the connection hands its socket back at once.
        if let Ok(Ok(parts)) = tokio::time::timeout(Duration::from_millis(100), conn).await {
            close_cleanly(parts.io.into_inner());
        }
    }
    Ok(status)
}

/// Ends a probe's TLS session the way a well-behaved client does, off the check's clock
/// (the verdict is already in): send close_notify, then read until the server's own close.
/// Dropping the socket with unread bytes (TLS 1.3 session tickets) would make the kernel
/// send a reset, and the apiserver would log a failed connection for every probe.
pub(crate) fn close_cleanly(mut tls: tokio_rustls::client::TlsStream<TcpStream>) {
    tokio::spawn(async move {
        let _ = tls.shutdown().await;
        let mut sink = tokio::io::sink();
        let drain = tokio::io::copy(&mut tls, &mut sink);
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    });
}
