//! One passthrough connection, from accepted socket to access-log line: the glue between the
//! snapshot, the PROXY header and SNI route (SPEC §9), connecting and the relay.
//!
//! With `proxy_protocol` the header is read first and its address is the client's from then
//! on. With routes, the ClientHello is read ([`crate::sni`]) within `sni_timeout`, the
//! route picks the pool, and the bytes read go to the backend first, untouched, before the
//! relay (and splice) take over. Without routes, the client's first bytes are read the same
//! way (one read, which the relay would otherwise do) and go ahead of the relay too.
//! `serve` runs in its own task with the listener's snapshot of accept time: it connects
//! ([`crate::connect`], which picks and retries), relays bytes both ways with
//! [`crate::relay::relay_tcp`] until both directions are done, and writes one log line with
//! the close reason. No backend is contacted before the client's first bytes arrive
//! (`first_byte_timeout`). The client socket inherited NODELAY, keepalive and TCP_USER_TIMEOUT
//! from the listening socket ([`crate::net::bind`]): no syscalls for them per connection; the
//! backend socket gets keepalive from the relay, once the connection has lived a few seconds.

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::close::End;
use crate::connect::{connect, ConnectError};
use crate::relay::buf::read_draining;
use crate::relay::{drained, relay_tracked};
use crate::snapshot::ListenerSnapshot;
use crate::sni::{Hello, HelloReader};

/// How the wait for a client's first bytes ended (SPEC §3, Silent clients).
enum FirstBytes {
    /// These bytes arrived: they go to the backend ahead of the relay (empty when there is
    /// no wait).
    Arrived(Vec<u8>),
    /// Nothing within `first_byte_timeout`.
    Silent,
    /// The client closed (or reset) without sending a byte.
    Closed,
}

/// The most of the client's first bytes read before connecting; the rest waits in the
/// socket for the relay. Enough for a ClientHello or a request head.
const FIRST_READ: usize = 4096;

/// Waits until the client has sent something, so that no backend connection is opened for
/// a client that never speaks, and reads it: the read the relay would do first, done now
/// (peeking and then reading cost a system call more). Zero `timeout`: no wait.
async fn first_bytes(
    client: &TcpStream,
    timeout: Duration,
    drain: &CancellationToken,
) -> FirstBytes {
    if timeout.is_zero() {
        return FirstBytes::Arrived(Vec::new());
    }
    // Shutdown's deadline (or a second signal) ends the wait too.
    let mut drained = std::pin::pin!(drain.cancelled());
    // A poll function over the socket's own readiness and one timer, not `timeout(readable())`:
    // this state is what every connection that has not spoken yet costs, and tokio's
    // readiness future is twice the size of the rest.
    let mut silent = std::pin::pin!(tokio::time::sleep(timeout));
    std::future::poll_fn(|cx| loop {
        match client.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(FirstBytes::Closed),
            Poll::Pending => {
                if drained.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(FirstBytes::Closed);
                }
                return silent.as_mut().poll(cx).map(|()| FirstBytes::Silent);
            }
        }
        let mut scratch = [0u8; FIRST_READ];
        match read_draining(client, &mut scratch) {
            Ok(0) => return Poll::Ready(FirstBytes::Closed),
            Ok(n) => return Poll::Ready(FirstBytes::Arrived(scratch[..n].to_vec())),
            // The readiness was stale: tokio forgot it, and the next poll waits for more.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => return Poll::Ready(FirstBytes::Closed),
        }
    })
    .await
}

/// How reading the ClientHello of a routed connection ended.
enum Inspected {
    /// The hello (or bytes that are not one) is in, with everything read.
    Read(HelloReader),
    /// Nothing within `first_byte_timeout`.
    Silent,
    /// The client closed or failed before the hello was whole.
    Closed,
    /// The hello was incomplete at `sni_timeout`.
    TimedOut,
}

/// Reads until the ClientHello is whole (or known not to be one), by readiness and
/// `try_read`, so a client that sends its hello at once costs one read. A client that sent
/// nothing by `silent_at` (or by `sni_at`, when that comes first) is silent, as without
/// routes; an incomplete hello at `sni_at` is a timeout.
async fn read_hello(
    client: &TcpStream,
    silent_at: Option<tokio::time::Instant>,
    sni_at: tokio::time::Instant,
) -> Inspected {
    let mut r = HelloReader::new();
    loop {
        if r.answer().is_some() {
            return Inspected::Read(r);
        }
        let until = match silent_at {
            Some(t) if r.bytes().is_empty() && t < sni_at => t,
            _ => sni_at,
        };
        match tokio::time::timeout_at(until, client.readable()).await {
            // A client that sent nothing at all is silent, whichever wait ran out.
            Err(_) if r.bytes().is_empty() => return Inspected::Silent,
            Err(_) => return Inspected::TimedOut,
            Ok(Err(_)) => return Inspected::Closed,
            Ok(Ok(())) => {}
        }
        // Into scratch space, so the reader holds only what arrived (a record header
        // promising 16 KiB must not make it allocate 16 KiB).
        let mut scratch = [0u8; 4096];
        let want = r.want().min(scratch.len());
        match read_draining(client, &mut scratch[..want]) {
            Ok(0) => return Inspected::Closed,
            Ok(n) => {
                r.push(&scratch[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Inspected::Closed,
        }
    }
}

/// What a client said first: its first bytes, or (on a listener with routes) its
/// ClientHello, or what it sent instead of one.
enum Spoke {
    Bytes(Vec<u8>),
    Hello(HelloReader),
}

/// Waits until the client has spoken: the first bytes (within `first_byte_timeout`), or on a
/// listener with routes the whole ClientHello (within `sni_timeout` of the accept, a PROXY
/// header included). A client that stays silent, closes or times out is logged and counted
/// here; `None` then.
async fn spoken(
    client: &TcpStream,
    state: &ListenerSnapshot,
    client_addr: SocketAddr,
    started: Instant,
) -> Option<Spoke> {
    if state.routes.is_empty() {
        let waited = first_bytes(client, state.cfg.first_byte_timeout, &state.drain).await;
        return said(waited, state, client_addr, started);
    }
    // Boxed: the hello reader's state is larger than the relay's, and this wait may run in
    // the connection's task. Only routed listeners pay for it, while the hello comes in.
    Box::pin(hello(client, state, client_addr, started)).await
}

/// [`spoken`] on a listener with routes: the ClientHello.
async fn hello(
    client: &TcpStream,
    state: &ListenerSnapshot,
    client_addr: SocketAddr,
    started: Instant,
) -> Option<Spoke> {
    let fbt = state.cfg.first_byte_timeout;
    let silent_at = (!fbt.is_zero()).then(|| tokio::time::Instant::now() + fbt);
    // From the accept, not from now: the wait behind a PROXY header is not a second one.
    let sni_at = tokio::time::Instant::from_std(started) + state.cfg.sni_timeout;
    let inspected = tokio::select! {
        i = read_hello(client, silent_at, sni_at) => i,
        () = state.drain.cancelled() => Inspected::Closed,
    };
    match inspected {
        Inspected::Read(h) => Some(Spoke::Hello(h)),
        Inspected::Silent => {
            state.log_silent(client_addr, started);
            None
        }
        Inspected::Closed => {
            tracing::debug!(listener = %state.cfg.name, client = %client_addr, "client closed before its ClientHello was whole");
            None
        }
        Inspected::TimedOut => {
            state.log_rejected(
                client_addr,
                started,
                End::SniTimeout,
                "ClientHello incomplete at sni_timeout",
            );
            None
        }
    }
}

/// What the wait for a client's first bytes comes to: the bytes, or nothing after the
/// silent client was logged (or the closed one noted).
fn said(
    waited: FirstBytes,
    state: &ListenerSnapshot,
    client_addr: SocketAddr,
    started: Instant,
) -> Option<Spoke> {
    match waited {
        FirstBytes::Arrived(first) => Some(Spoke::Bytes(first)),
        FirstBytes::Silent => {
            state.log_silent(client_addr, started);
            None
        }
        FirstBytes::Closed => {
            // A port probe (keepalived, a scanner): nothing to proxy, nothing to log.
            tracing::debug!(listener = %state.cfg.name, client = %client_addr, "client closed before sending anything");
            None
        }
    }
}

/// Serves one accepted passthrough connection to completion.
pub(crate) async fn serve(
    client: TcpStream,
    mut client_addr: SocketAddr,
    state: Arc<ListenerSnapshot>,
) {
    let started = Instant::now();
    // A client that has not spoken yet (an idle one, every silent one) costs its task alone:
    // without a PROXY header to read first, the wait for its first bytes runs here, in a
    // state smaller than the relay's (so the task does not grow), and the box below is made
    // only once they are in.
    let early = if state.cfg.proxy_protocol {
        None
    } else {
        let Some(spoke) = spoken(&client, &state, client_addr, started).await else {
            return;
        };
        Some(spoke)
    };
    // Everything else before the relay (the PROXY header and the wait behind it, connecting,
    // logging a failure) runs in this box, which is freed once connected: a task is as large
    // as its largest state for its whole life, and only the relay's state should stay.
    // The PROXY header's address replaces the socket's in place: one address for the
    // connection's whole life, not two.
    let connected = Box::pin(async {
        let spoke = match early {
            Some(spoke) => spoke,
            None => {
                client_addr = tokio::select! {
                    c = state.proxied_client(&client, client_addr, started) => c?,
                    () = state.drain.cancelled() => return None,
                };
                spoken(&client, &state, client_addr, started).await?
            }
        };
        let (pool, tag, first) = match spoke {
            Spoke::Bytes(first) => {
                let (pool, tag) = state.route(None)?;
                (pool, tag, first)
            }
            Spoke::Hello(hello) => {
                let answer = hello.answer();
                let sni = answer.and_then(Hello::sni);
                if let Some(Hello::Malformed(why)) = answer {
                    tracing::debug!(listener = %state.cfg.name, client = %client_addr, error = why, "malformed ClientHello: routed as without a server name");
                }
                let Some((pool, tag)) = state.route(sni) else {
                    state.log_rejected(client_addr, started, End::NoRoute, "no route for the server name and no default pool");
                    return None;
                };
                if let Some(Hello::Tls { alpn, .. }) = answer {
                    tracing::debug!(listener = %state.cfg.name, client = %client_addr, sni = sni.unwrap_or("-"), alpn = ?alpn, route = state.route_name(tag), "routed");
                }
                (pool, tag, hello.into_bytes())
            }
        };
        let preamble = crate::connect::preamble(pool, &client, client_addr, &first);
        let r = tokio::select! {
            r = connect(pool, client_addr, &state.cfg.name, |_, mut tcp| {
                let preamble = &preamble;
                async move {
                    crate::connect::send_preamble(&mut tcp, preamble).await?;
                    Ok(tcp)
                }
            }) => r,
            () = state.drain.cancelled() => Err(ConnectError::Draining),
        };
        match r {
            Ok((stream, mut guard)) => {
                // Only pools that rebalance pay for the registry (a lock in and out per
                // connection); connections opened before a reload turned rebalancing on
                // are not moved.
                let tracked = match pool.cfg.rebalance {
                    Some(_) => guard.track(),
                    None => Arc::new(crate::relay::Tracked::untracked()),
                };
                // At most MAX_WIRE bytes: a u32 keeps the relay's task small.
                Some((stream, guard, tracked, tag, first.len() as u32))
            }
            Err(e) => {
                state.log_connect_failed(client_addr, started, &e);
                None
            }
        }
    })
    .await;
    let Some((backend_stream, guard, tracked, tag, sent)) = connected else {
        return;
    };

    let drain = drained(&state.drain, &guard.backend().drain);
    let mut r = relay_tracked(
        client,
        backend_stream,
        state.cfg.idle_timeout,
        state.splice,
        drain,
        tracked,
    )
    .await;
    r.up += u64::from(sent);
    state.log_close(client_addr, guard.backend(), tag, started, &r);
}
