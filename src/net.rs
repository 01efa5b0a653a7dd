//! Socket set-up: listening sockets and the options every proxied socket carries.
//!
//! Owns `bind` (socket2: `SO_REUSEADDR`, `IPV6_V6ONLY` so `0.0.0.0:p` and `[::]:p` can be
//! separate listeners, a deep backlog), the TCP options of SPEC §3 (NODELAY, keepalive,
//! TCP_USER_TIMEOUT) and the backend socket. Listening sockets get the options once and Linux
//! copies them to every accepted socket; backend sockets get them before connect, so the SYN
//! already carries them. Nothing here knows about listeners, pools or the config.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket};

/// Pending connections the kernel may queue per listening socket. Large, so a reconnect storm
/// of kubelets is queued rather than dropped while the accept loop catches up.
const BACKLOG: i32 = 4096;

/// Keepalive and user-timeout settings: a peer that vanished under a quiet watch is noticed
/// within about a minute instead of the kernel's default two hours (SPEC §3).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets NODELAY, keepalive and TCP_USER_TIMEOUT; a failure is logged and the connection goes
/// on, since none of these is needed for correctness. Listening sockets get the options once,
/// and Linux copies them to every accepted socket; backend sockets get them before connect.
pub(crate) fn tune(sock: SockRef<'_>, role: &'static str) {
    if let Err(e) = sock.set_tcp_nodelay(true) {
        tracing::debug!(role, error = %e, "cannot set TCP_NODELAY");
    }
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(role, error = %e, "cannot set TCP keepalive");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::debug!(role, error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// Binds one listening address.
///
/// # Errors
/// The socket call that failed, such as `EADDRINUSE` or `EACCES` for a port below 1024.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit these on Linux, which saves six syscalls per connection.
    tune(SockRef::from(&socket), "listener");
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// A socket for a backend connection, tuned before connect.
///
/// # Errors
/// The gateway cannot make a socket (EMFILE, ENFILE, ENOBUFS, ...).
pub(crate) fn backend_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    tune(SockRef::from(&sock), "backend");
    Ok(sock)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_options() {
        let l = super::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = l.local_addr().expect("addr");
        let (_c, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        let (s, _) = accepted.expect("accept");
        let sock = socket2::SockRef::from(&s);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            std::time::Duration::from_secs(30)
        );
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(std::time::Duration::from_secs(60))
        );
    }
}
