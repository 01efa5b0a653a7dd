//! Socket set-up: listening sockets and the options every proxied socket carries.
//!
//! Owns `bind` (socket2: `SO_REUSEADDR`, `IPV6_V6ONLY` so `0.0.0.0:p` and `[::]:p` can be
//! separate listeners, a deep backlog), the TCP options of SPEC §3 (NODELAY, keepalive,
//! TCP_USER_TIMEOUT) and connecting to a backend. Listening sockets get the options once and
//! Linux copies them to every accepted socket; backend sockets get NODELAY before connect and
//! keepalive when their connection turns out to live (see [`KEEP_ALIVE_AFTER`]). Nothing here
//! knows about listeners, pools or the config.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};

/// Pending connections the kernel may queue per listening socket. Large, so a reconnect storm
/// of kubelets is queued rather than dropped while the accept loop catches up.
const BACKLOG: i32 = 4096;

/// Keepalive and user-timeout settings: a peer that vanished under a quiet watch is noticed
/// within about a minute instead of the kernel's default two hours (SPEC §3).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a passthrough connection lives before its backend socket gets keepalive and
/// TCP_USER_TIMEOUT ([`keep_alive`]): most short connections (a kubectl call, a probe) are
/// over by then and pay five system calls less. A dead backend under a quiet watch is
/// still noticed within `KEEP_ALIVE_AFTER` + idle + retries x interval = 63 s of its last
/// sign of life (SPEC §3: about a minute and a half).
pub(crate) const KEEP_ALIVE_AFTER: Duration = Duration::from_secs(3);

/// Sets NODELAY, keepalive and TCP_USER_TIMEOUT; a failure is logged and the connection goes
/// on, since none of these is needed for correctness. Listening sockets get the options once,
/// and Linux copies them to every accepted socket.
pub(crate) fn tune(sock: SockRef<'_>, role: &'static str) {
    if let Err(e) = sock.set_tcp_nodelay(true) {
        tracing::debug!(role, error = %e, "cannot set TCP_NODELAY");
    }
    keep_alive(sock, role);
}

/// Keepalive (30 s idle, 3 probes 10 s apart) and TCP_USER_TIMEOUT (60 s): what SPEC §3
/// asks of a socket that may sit under a quiet watch. Five system calls; best effort.
pub(crate) fn keep_alive(sock: SockRef<'_>, role: &'static str) {
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

/// Connects to a backend: a non-blocking socket with TCP_NODELAY (set before connect, so
/// the first segment already goes out at once), `connect`, and a wait for the kernel's
/// answer. Keepalive and TCP_USER_TIMEOUT are the caller's to add ([`keep_alive`]): at once
/// for TLS backends, after [`KEEP_ALIVE_AFTER`] for passthrough relays.
///
/// The outcome is read off the readiness event itself: a refused or unreachable connect
/// reports an error or hang-up with its writability, a successful one writability alone, so
/// only a failure pays for the `SO_ERROR` lookup that says why (tokio's own `connect` asks
/// for it every time).
///
/// # Errors
/// The gateway cannot make a socket (EMFILE, ENFILE, ENOBUFS, ...), or the backend refused
/// or cannot be reached.
pub(crate) async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if let Err(e) = sock.set_tcp_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY on a backend socket");
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection closed while connecting",
            )
        }));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    /// The outcome of a connect is read off its readiness event: a refusal is an error with
    /// the kernel's reason, an accepted connect a stream with NODELAY and, until the relay
    /// adds it, no keepalive.
    #[tokio::test]
    async fn connect_tells_refused_from_accepted_without_asking_every_time() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed = l.local_addr().expect("addr");
        drop(l);
        for _ in 0..20 {
            let e = super::connect(closed)
                .await
                .expect_err("nothing listens there");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, accepted) = tokio::join!(super::connect(addr), l.accept());
        let (c, (mut s, _)) = (c.expect("connect"), accepted.expect("accept"));
        let sock = socket2::SockRef::from(&c);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert!(!sock.keepalive().expect("keepalive"));
        c.try_write(b"x").expect("write");
        let mut b = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut b)
            .await
            .expect("read");
        assert_eq!(&b, b"x");
    }

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
