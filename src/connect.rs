//! Connecting a client to a backend: the pool's candidates in order, each attempt within
//! `connect_timeout`, up to `connect_attempts` distinct backends (SPEC §3, Backend choice).
//!
//! Owns who is to blame for a failed attempt. Passive health charges a backend only for what
//! the backend did: refused, timed out, reset, or a TLS handshake that failed verification.
//! A failure the client caused (an ALPN list no backend can accept) or the gateway itself
//! (out of descriptors, buffers or local ports) says nothing about the backend: it is counted
//! per listener by cause and ends the attempts at once, since every other backend would fail
//! the same way. Before this split, a handful of ClientHellos with a bogus ALPN could mark a
//! whole pool down (round-2 hardening, item 1).

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::balance::{ActiveGuard, Backend, Pool};

/// Why one attempt on one backend failed, and so who is to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AttemptError {
    /// The backend refused, timed out, reset, or failed TLS verification: passive health
    /// counts it, and the next backend is tried.
    Backend(String),
    /// The client's request cannot be served (its ALPN protocols): not charged, not retried.
    Client(String),
    /// The gateway could not make or connect a socket (EMFILE, ENFILE, ENOBUFS, ENOMEM,
    /// EADDRNOTAVAIL): not charged, not retried.
    Local(String),
}

/// Why a client got no backend connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The listener or the gateway is draining.
    #[error("shutting down")]
    Draining,
    /// No backend was eligible (`when_all_down = "reject"` with none healthy).
    #[error("no healthy backend (when_all_down = \"reject\")")]
    NoBackend,
    /// Every attempt failed at a backend; the last one's words.
    #[error("connect to {backend} ({addr}): {reason}")]
    Backends {
        /// The last backend tried.
        backend: String,
        /// Its address.
        addr: SocketAddr,
        /// What went wrong there.
        reason: String,
    },
    /// The client's request could not be served by any backend.
    #[error("client: {0}")]
    Client(String),
    /// The gateway itself failed (descriptors, buffers, local ports).
    #[error("gateway: {0}")]
    Local(String),
}

/// Whether a socket error is the gateway's own shortage rather than anything the backend did.
pub(crate) fn is_local(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE)
            | Some(libc_errno::ENFILE)
            | Some(libc_errno::ENOBUFS)
            | Some(libc_errno::ENOMEM)
            | Some(libc_errno::EADDRNOTAVAIL)
    )
}

/// The errno values [`is_local`] looks for (Linux numbering, which rustix exposes).
mod libc_errno {
    pub(super) const EMFILE: i32 = rustix::io::Errno::MFILE.raw_os_error();
    pub(super) const ENFILE: i32 = rustix::io::Errno::NFILE.raw_os_error();
    pub(super) const ENOBUFS: i32 = rustix::io::Errno::NOBUFS.raw_os_error();
    pub(super) const ENOMEM: i32 = rustix::io::Errno::NOMEM.raw_os_error();
    pub(super) const EADDRNOTAVAIL: i32 = rustix::io::Errno::ADDRNOTAVAIL.raw_os_error();
}

/// A socket error of one attempt, with the blame placed.
fn socket_error(e: &io::Error) -> AttemptError {
    if is_local(e) {
        AttemptError::Local(e.to_string())
    } else {
        AttemptError::Backend(e.to_string())
    }
}

/// What every backend connection of `pool` starts with for this client: the PROXY header
/// when the pool has `send_proxy` (carrying `client` and the address it connected to), then
/// `first`, the bytes already read from the client (a routed ClientHello). Borrowed, with
/// no system call, when there is no header to write.
pub(crate) fn preamble<'a>(
    pool: &Pool,
    client_socket: &TcpStream,
    client: SocketAddr,
    first: &'a [u8],
) -> Cow<'a, [u8]> {
    let Some(version) = pool.cfg.send_proxy else {
        return Cow::Borrowed(first);
    };
    let local = client_socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut out = crate::proxy_protocol::header(version, client, local);
    out.extend_from_slice(first);
    Cow::Owned(out)
}

/// Writes the preamble to a fresh backend connection, in one write; a failure is the
/// backend's (it reset or closed at once).
pub(crate) async fn send_preamble(tcp: &mut TcpStream, bytes: &[u8]) -> Result<(), AttemptError> {
    if bytes.is_empty() {
        return Ok(());
    }
    tcp.write_all(bytes).await.map_err(|e| socket_error(&e))
}

/// Tries distinct backends in the pool's order until one accepts the connect and `finish`
/// (nothing for passthrough, the backend TLS handshake for terminate) succeeds, each attempt
/// within `connect_timeout`.
///
/// A backend's own failures count against it (metrics and passive health) and the next
/// backend is tried; a client's or the gateway's failure ends the attempts uncharged.
pub(crate) async fn connect<T, F, Fut>(
    pool: &Pool,
    client: SocketAddr,
    listener: &str,
    finish: F,
) -> Result<(T, ActiveGuard), ConnectError>
where
    F: Fn(Arc<Backend>, TcpStream) -> Fut,
    Fut: std::future::Future<Output = Result<T, AttemptError>>,
{
    let attempts = pool.cfg.connect_attempts.get() as usize;
    // Inline for the usual few attempts: no allocation per connection.
    let mut tried: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
    let mut last_error = None;
    while tried.len() < attempts {
        let Some(i) = pool.pick(&tried) else { break };
        tried.push(i);
        let backend = &pool.backends[i];
        // Counted as active from the pick on, so concurrent picks by least-conn see it.
        let guard = ActiveGuard::new(backend.clone());
        let attempt = async {
            let tcp = crate::net::connect(backend.addr)
                .await
                .map_err(|e| socket_error(&e))?;
            finish(backend.clone(), tcp).await
        };
        let err = match tokio::time::timeout(pool.cfg.connect_timeout, attempt).await {
            Ok(Ok(stream)) => {
                backend.metrics.connections.inc();
                return Ok((stream, guard));
            }
            Ok(Err(AttemptError::Backend(e))) => e,
            Ok(Err(AttemptError::Client(e))) => {
                tracing::debug!(listener, client = %client, backend = %backend.name, error = %e, "backend connect failed because of the client; not charged to the backend");
                return Err(ConnectError::Client(e));
            }
            Ok(Err(AttemptError::Local(e))) => {
                tracing::debug!(listener, client = %client, backend = %backend.name, error = %e, "backend connect failed on the gateway's side; not charged to the backend");
                return Err(ConnectError::Local(e));
            }
            Err(_) => format!(
                "timeout after {}",
                humantime::format_duration(pool.cfg.connect_timeout)
            ),
        };
        backend.metrics.connect_errors.inc();
        // Passive health: a failed connect counts like a failed check (a success does not
        // count as a pass: an accepting socket says little about a hung apiserver).
        pool.observe(backend, false, &format!("connect failed: {err}"));
        tracing::debug!(listener, client = %client, backend = %backend.name, error = %err, "backend connect failed, trying another");
        last_error = Some(ConnectError::Backends {
            backend: backend.name.clone(),
            addr: backend.addr,
            reason: err,
        });
    }
    Err(last_error.unwrap_or(ConnectError::NoBackend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortages_of_the_gateway_are_local_and_refusals_are_the_backends() {
        for errno in [
            rustix::io::Errno::MFILE,
            rustix::io::Errno::NFILE,
            rustix::io::Errno::NOBUFS,
            rustix::io::Errno::ADDRNOTAVAIL,
        ] {
            let e = io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(matches!(socket_error(&e), AttemptError::Local(_)), "{e}");
        }
        for errno in [
            rustix::io::Errno::CONNREFUSED,
            rustix::io::Errno::TIMEDOUT,
            rustix::io::Errno::CONNRESET,
            rustix::io::Errno::HOSTUNREACH,
        ] {
            let e = io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(matches!(socket_error(&e), AttemptError::Backend(_)), "{e}");
        }
    }
}
