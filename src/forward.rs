//! One passthrough connection, from accepted socket to access-log line: the glue between the
//! snapshot, connecting and the relay.
//!
//! `serve` runs in its own task with the listener's snapshot of accept time: it connects
//! ([`crate::connect`], which picks and retries), relays bytes both ways with
//! [`crate::relay::relay_tcp`] until both directions are done, and writes one log line with
//! the close reason. The client socket inherited NODELAY, keepalive and TCP_USER_TIMEOUT
//! from the listening socket ([`crate::net::bind`]): no syscalls for them per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use crate::connect::{connect, ConnectError};
use crate::relay::{drained, relay_tcp};
use crate::snapshot::ListenerSnapshot;

/// Serves one accepted passthrough connection to completion.
pub(crate) async fn serve(
    client: TcpStream,
    client_addr: SocketAddr,
    state: Arc<ListenerSnapshot>,
) {
    let started = Instant::now();
    // Boxed: connecting needs more state than relaying (88 bytes more), and a task is as
    // large as its largest state for its whole life. This allocation is freed once connected.
    let connected = Box::pin(async {
        tokio::select! {
            r = connect(&state.pool, client_addr, &state.cfg.name, |_, tcp| async move { Ok(tcp) }) => r,
            () = state.drain.cancelled() => Err(ConnectError::Draining),
        }
    })
    .await;
    let (backend_stream, guard) = match connected {
        Ok(c) => c,
        Err(e) => {
            state.log_connect_failed(client_addr, started, &e);
            return;
        }
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
