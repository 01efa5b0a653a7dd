//! One passthrough connection, from accepted socket to access-log line: the glue between the
//! snapshot, connecting and the relay.
//!
//! `serve` runs in its own task with the listener's snapshot of accept time: it connects
//! ([`crate::connect`], which picks and retries), relays bytes both ways with
//! [`crate::relay::relay_tcp`] until both directions are done, and writes one log line with
//! the close reason. No backend is contacted before the client's first bytes arrive
//! (`first_byte_timeout`). The client socket inherited NODELAY, keepalive and TCP_USER_TIMEOUT
//! from the listening socket ([`crate::net::bind`]): no syscalls for them per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::connect::{connect, ConnectError};
use crate::relay::{drained, relay_tcp};
use crate::snapshot::ListenerSnapshot;

/// How the wait for a client's first bytes ended (SPEC §3, Silent clients).
enum FirstBytes {
    /// Bytes are there: connect.
    Arrived,
    /// Nothing within `first_byte_timeout`.
    Silent,
    /// The client closed (or reset) without sending a byte.
    Closed,
}

/// Waits until the client has sent something, without reading it, so that no backend
/// connection is opened for a client that never speaks. Zero `timeout`: no wait.
async fn first_bytes(client: &TcpStream, timeout: Duration) -> FirstBytes {
    if timeout.is_zero() {
        return FirstBytes::Arrived;
    }
    let peeked = tokio::time::timeout(timeout, async {
        let mut b = [0u8; 1];
        client.peek(&mut b).await
    })
    .await;
    match peeked {
        Err(_) => FirstBytes::Silent,
        Ok(Ok(0) | Err(_)) => FirstBytes::Closed,
        Ok(Ok(_)) => FirstBytes::Arrived,
    }
}

/// Serves one accepted passthrough connection to completion.
pub(crate) async fn serve(
    client: TcpStream,
    client_addr: SocketAddr,
    state: Arc<ListenerSnapshot>,
) {
    let started = Instant::now();
    // Everything before the relay (the wait for the first bytes, connecting, logging a
    // failure) runs in this box, which is freed once connected: a task is as large as its
    // largest state for its whole life, and only the relay's state should stay.
    let connected = Box::pin(async {
        let waited = tokio::select! {
            w = first_bytes(&client, state.cfg.first_byte_timeout) => w,
            // Shutdown's deadline (or a second signal) ends the wait too.
            () = state.drain.cancelled() => FirstBytes::Closed,
        };
        match waited {
            FirstBytes::Arrived => {}
            FirstBytes::Silent => {
                state.log_silent(client_addr, started);
                return None;
            }
            FirstBytes::Closed => {
                // A port probe (keepalived, a scanner): nothing to proxy, nothing to log.
                tracing::debug!(listener = %state.cfg.name, client = %client_addr, "client closed before sending anything");
                return None;
            }
        }
        let r = tokio::select! {
            r = connect(&state.pool, client_addr, &state.cfg.name, |_, tcp| async move { Ok(tcp) }) => r,
            () = state.drain.cancelled() => Err(ConnectError::Draining),
        };
        r.map_err(|e| state.log_connect_failed(client_addr, started, &e))
            .ok()
    })
    .await;
    let Some((backend_stream, guard)) = connected else {
        return;
    };
    let drain = drained(&state.drain, &guard.backend().drain);
    let r = relay_tcp(
        client,
        backend_stream,
        state.cfg.idle_timeout,
        state.splice,
        drain,
    )
    .await;
    state.log_close(client_addr, guard.backend(), started, &r);
}
