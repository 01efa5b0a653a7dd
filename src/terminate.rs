//! One connection on a terminate listener: TLS ends here, a verified TLS connection of the
//! gateway's own goes on to the backend.
//!
//! The order matters for ALPN (SPEC §3, Terminate listener): read the ClientHello first
//! (`LazyConfigAcceptor`), connect to a backend offering the client's protocols (only `h2`
//! and `http/1.1`, further filtered by `alpn`; a client offering none of those is refused
//! before any backend is contacted), and only then finish the client's handshake, answering with exactly what the
//! backend chose. So HTTP/2 works end to end, and a client that asks for http/1.1 only (as
//! `kubectl exec` does, to upgrade) gets an http/1.1 backend connection. The backend is
//! verified against `[pool.tls]`; no client certificate is ever presented to it, and none is
//! asked of the client. After both handshakes the bytes go through [`crate::relay::relay`],
//! with the same ends, half-close and idle rules as passthrough's loop; both sockets are read
//! through `relay::ReadAhead`, which hands rustls whole buffers instead of 4 KiB reads.
//!
//! Failures before relaying are counted by reason in `apilb_tls_handshake_errors_total` and
//! logged at debug per connection; `report_errors` writes an info summary at most once a
//! minute, so a scanner cannot flood the log.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::balance::{Backend, Pool};
use crate::close::End;
use crate::connect::{connect, AttemptError, ConnectError};
use crate::relay::{drained, relay, ReadAhead};
use crate::snapshot::{ListenerSnapshot, RouteTag};

/// Serves one accepted terminate connection to completion.
pub(crate) async fn serve(tcp: TcpStream, client_addr: SocketAddr, state: Arc<ListenerSnapshot>) {
    let started = Instant::now();
    // A client that has not finished its handshake costs a backend handshake already (the
    // backend's ALPN answer comes first), so their number is capped apart from
    // max_connections.
    let Ok(slot) = state.handshakes.try_acquire() else {
        state.metrics.tls.handshake_limit.inc();
        tracing::debug!(listener = %state.cfg.name, client = %client_addr, "refused: max_handshakes clients are in their handshake");
        return;
    };
    // Both handshakes obey the drain deadline too (SPEC §3, Shutdown): a client that is slow
    // to finish its handshake must not hold the shutdown for its handshake_timeout.
    let established = tokio::select! {
        e = establish(tcp, client_addr, &state, started) => e,
        () = state.drain.cancelled() => None,
    };
    drop(slot);
    let Some(established) = established else {
        return;
    };
    let (client_stream, backend_stream, guard, client_addr, tag) = match established {
        Established::Relay {
            client_stream,
            backend_stream,
            guard,
            client,
            route,
        } => (client_stream, backend_stream, guard, client, route),
        Established::Identity {
            client_stream,
            pool,
            client,
            route,
            leaf,
        } => {
            crate::http::serve(client_stream, client, state.clone(), pool, route, leaf).await;
            return;
        }
    };
    let (cr, cw) = tokio::io::split(client_stream);
    let (br, bw) = tokio::io::split(backend_stream);
    let drain = drained(&state.drain, &guard.backend().drain);
    let r = relay(cr, cw, br, bw, state.cfg.idle_timeout, drain).await;
    state.log_close(client_addr, guard.backend(), tag, started, &r);
}

/// A client past its handshake.
// Moved once, inside the terminate connection's future, which is boxed already: boxing the
// larger variant too would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Established {
    /// Both TLS connections, ready to relay.
    Relay {
        client_stream: tokio_rustls::server::TlsStream<ReadAhead>,
        backend_stream: tokio_rustls::client::TlsStream<ReadAhead>,
        guard: crate::balance::ActiveGuard,
        /// The client's address: the PROXY header's, when the listener takes one.
        client: SocketAddr,
        /// The route that chose the pool.
        route: RouteTag,
    },
    /// Identity mode: the client's connection, served request by request.
    Identity {
        client_stream: tokio_rustls::server::TlsStream<ReadAhead>,
        pool: Arc<crate::balance::Pool>,
        client: SocketAddr,
        route: RouteTag,
        /// The client's certificate, verified against `client_ca`.
        leaf: Option<Vec<u8>>,
    },
}

/// The PROXY header (with `proxy_protocol`), the client's ClientHello, the backend's TLS
/// connection (the pool chosen by the hello's server name when the listener has routes),
/// then the client's handshake; `None` (counted and logged) when any of them fails.
async fn establish(
    tcp: TcpStream,
    client_addr: SocketAddr,
    state: &ListenerSnapshot,
    started: Instant,
) -> Option<Established> {
    let Some(tls) = state.cfg.tls.as_ref() else {
        // Validation guarantees [listener.tls] for terminate listeners.
        return None;
    };
    let listener = state.cfg.name.as_str();
    let errors = &state.metrics.tls;
    let client_addr = state.proxied_client(&tcp, client_addr, started).await?;
    let deadline = tokio::time::Instant::now() + tls.handshake_timeout;
    let local = tcp.local_addr().ok();

    let acceptor =
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), ReadAhead::new(tcp));
    let start = match tokio::time::timeout_at(deadline, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            if is_not_tls(&e) {
                errors.not_tls.inc();
            } else {
                errors.client_handshake.inc();
            }
            tracing::debug!(listener, client = %client_addr, error = %e, "no TLS ClientHello");
            return None;
        }
        Err(_) => {
            errors.handshake_timeout.inc();
            tracing::debug!(listener, client = %client_addr, "no ClientHello within handshake_timeout");
            return None;
        }
    };

    let hello = start.client_hello();
    let client_offered = hello.alpn().is_some_and(|mut p| p.next().is_some());
    let offered = offered_to_backend(hello.alpn(), tls.alpn.as_deref());
    if client_offered && offered.is_empty() {
        // Nothing the gateway could forward: answer the client as an apiserver would
        // (no_application_protocol) without spending a backend handshake on it.
        errors.client_alpn.inc();
        tracing::debug!(listener, client = %client_addr, "client offered no ALPN protocol the gateway forwards");
        let _ = tokio::time::timeout(
            tls.handshake_timeout,
            start.into_stream(tls.server.refusing_alpn()),
        )
        .await;
        return None;
    }

    // The same routes as passthrough, by the name the client's handshake asks for (the
    // certificate it gets is still chosen by [[listener.tls.sni]]).
    let sni = hello
        .server_name()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase());
    let Some((pool, route)) = state.route(sni.as_deref()) else {
        state.log_rejected(
            client_addr,
            started,
            End::NoRoute,
            "no route for the server name and no default pool",
        );
        return None;
    };
    let backend = if state.cfg.identity.is_some() {
        // Identity mode (SPEC §10): the gateway answers ALPN itself (h2 when the client
        // offers it) and balances each request on its own after the handshake.
        None
    } else {
        let proxy_header = pool.cfg.send_proxy.map(|v| {
            crate::proxy_protocol::header(
                v,
                client_addr,
                local.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            )
        });
        let connected = tokio::select! {
            r = connect(pool, client_addr, listener, |backend, mut tcp| {
                let proxy_header = proxy_header.as_deref();
                let offered = &offered;
                async move {
                    if let Some(h) = proxy_header {
                        crate::connect::send_preamble(&mut tcp, h).await?;
                    }
                    backend_tls(pool, backend, tcp, offered, &errors.backend_tls).await
                }
            }) => r,
            () = state.drain.cancelled() => Err(ConnectError::Draining),
        };
        match connected {
            Ok(c) => Some(c),
            Err(e) => {
                // The client's handshake is left unfinished: dropping it closes the connection.
                state.log_connect_failed(client_addr, started, &e);
                return None;
            }
        }
    };
    let selected = match &backend {
        Some((backend_stream, _)) => backend_stream
            .get_ref()
            .1
            .alpn_protocol()
            .map(<[u8]>::to_vec),
        None if offered.iter().any(|p| p == b"h2") => Some(b"h2".to_vec()),
        None if client_offered => Some(b"http/1.1".to_vec()),
        None => None,
    };
    let config = match tls.server.for_alpn(selected.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            errors.client_handshake.inc();
            tracing::debug!(listener, client = %client_addr, error = %e, "cannot answer the backend's ALPN choice");
            return None;
        }
    };
    // The client's handshake gets a full `handshake_timeout` of its own from here: the time
    // spent connecting to the backend is the gateway's, not the client's.
    let client_stream = match tokio::time::timeout(tls.handshake_timeout, start.into_stream(config))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if bad_client_certificate(&e) {
                errors.client_certificate.inc();
            } else {
                errors.client_handshake.inc();
            }
            tracing::debug!(listener, client = %client_addr, error = %e, "client TLS handshake failed");
            return None;
        }
        Err(_) => {
            errors.handshake_timeout.inc();
            tracing::debug!(listener, client = %client_addr, "client TLS handshake timed out");
            return None;
        }
    };

    Some(match backend {
        Some((backend_stream, guard)) => Established::Relay {
            client_stream,
            backend_stream,
            guard,
            client: client_addr,
            route,
        },
        None => {
            let leaf = client_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            Established::Identity {
                client_stream,
                pool: pool.clone(),
                client: client_addr,
                route,
                leaf,
            }
        }
    })
}

/// The protocols the gateway knows how to relay, in its order of preference. Anything else a
/// client names is never offered to a backend: a backend refusing a protocol the client
/// made up must not look like a broken backend (round-2 hardening, item 1).
const KNOWN_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// What to offer the backend: the client's protocols, in the client's order, that the gateway
/// knows and `[listener.tls] alpn` (when set) allows.
fn offered_to_backend<'a>(
    client: Option<impl Iterator<Item = &'a [u8]>>,
    allowed: Option<&[String]>,
) -> Vec<Vec<u8>> {
    let Some(client) = client else {
        return Vec::new();
    };
    let mut out: Vec<Vec<u8>> = Vec::new();
    for p in client {
        let known = KNOWN_ALPN.contains(&p);
        let allowed = allowed.is_none_or(|a| a.iter().any(|a| a.as_bytes() == p));
        if known && allowed && !out.iter().any(|o| o == p) {
            out.push(p.to_vec());
        }
    }
    out
}

/// The backend half: a TLS handshake verified against `[pool.tls]`, offering `alpn`.
async fn backend_tls(
    pool: &Pool,
    backend: Arc<Backend>,
    tcp: TcpStream,
    alpn: &[Vec<u8>],
    failures: &prometheus::IntCounter,
) -> Result<tokio_rustls::client::TlsStream<ReadAhead>, AttemptError> {
    let Some(pool_tls) = pool.cfg.tls.as_ref() else {
        return Err(AttemptError::Local("pool has no [pool.tls]".into()));
    };
    // A TLS connection already costs a handshake; keepalive from the start is noise beside it.
    crate::net::keep_alive(socket2::SockRef::from(&tcp), "backend");
    let mut config = (*pool_tls.client).clone();
    config.alpn_protocols = alpn.to_vec();
    config.resumption = rustls::client::Resumption::store(pool.sessions.for_backend(backend.addr));
    let name = pool.server_name(&backend);
    match TlsConnector::from(Arc::new(config))
        .connect(name.clone(), ReadAhead::new(tcp))
        .await
    {
        Ok(s) => Ok(s),
        Err(e) => {
            failures.inc();
            let reason = format!("backend TLS: {}", crate::tls::tls_reason(&e, &name));
            Err(if refused_alpn(&e) {
                // The list came from the client (filtered); another backend would answer
                // the same, and this one did nothing wrong.
                AttemptError::Client(reason)
            } else {
                AttemptError::Backend(reason)
            })
        }
    }
}

/// Whether a backend handshake failed because the backend accepts none of the protocols
/// offered.
fn refused_alpn(e: &io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol
        ))
    )
}

/// Whether a client handshake failed on the client's certificate (`client_ca`): one that
/// does not verify, or none where one is required.
fn bad_client_certificate(e: &io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
    )
}

/// Whether a failed ClientHello read means the peer does not speak TLS at all.
fn is_not_tls(e: &io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(_))
    )
}

/// Logs, at most once a minute and only when something happened, how many clients of a
/// terminate listener failed before relaying; runs until `stop` is cancelled.
pub(crate) async fn report_errors(state: Arc<ListenerSnapshot>, stop: CancellationToken) {
    let every = Duration::from_secs(60);
    let t = &state.metrics.tls;
    let mut last = t.total();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let now = t.total();
        if now > last {
            tracing::info!(
                listener = %state.cfg.name,
                failed = now - last,
                handshake_timeout = t.handshake_timeout.get(),
                not_tls = t.not_tls.get(),
                client_handshake = t.client_handshake.get(),
                backend_tls = t.backend_tls.get(),
                client_alpn = t.client_alpn.get(),
                client_certificate = t.client_certificate.get(),
                handshake_limit = t.handshake_limit.get(),
                "TLS clients failed before relaying in the last minute (totals by reason since start)"
            );
        }
        last = now;
    }
}
