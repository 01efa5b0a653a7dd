//! How a proxied connection ended: the close reasons of the access log and what a relay
//! reports. A leaf module: the relay, the access log and the metrics all speak these nouns,
//! and none of them owns the others.

use std::fmt;
use std::io;

/// Why a proxied connection ended: the `end` field of the access log (SPEC §3, Logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client finished first (EOF), and the backend then finished too.
    ClientClosed,
    /// The backend finished first (EOF), and the client then finished too.
    BackendClosed,
    /// No byte in either direction for `idle_timeout`.
    IdleTimeout,
    /// Still open when the drain deadline passed (shutdown, or a removed backend).
    Drained,
    /// No backend could be connected to.
    ConnectFailed,
    /// A socket error such as a reset.
    Error,
    /// Closed cleanly by the rebalancer: the backend held more than its share (SPEC §11).
    Rebalanced,
    /// The client sent nothing within `first_byte_timeout`; no backend was contacted.
    ClientSilent,
    /// No route took the client's server name and the listener has no default pool.
    NoRoute,
    /// The PROXY header or the ClientHello was incomplete after `sni_timeout`.
    SniTimeout,
    /// The connection did not start with a valid PROXY protocol header.
    ProxyProtocol,
}

impl End {
    /// The ends of a connection that reached a backend, in the order of
    /// `ListenerMetrics::closed`.
    pub const PROXIED: [Self; 6] = [
        Self::ClientClosed,
        Self::BackendClosed,
        Self::IdleTimeout,
        Self::Drained,
        Self::Error,
        Self::Rebalanced,
    ];

    /// The name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::BackendClosed => "backend_closed",
            Self::IdleTimeout => "idle_timeout",
            Self::Drained => "drained",
            Self::ConnectFailed => "connect_failed",
            Self::Error => "error",
            Self::Rebalanced => "rebalanced",
            Self::ClientSilent => "client_silent",
            Self::NoRoute => "no_route",
            Self::SniTimeout => "sni_timeout",
            Self::ProxyProtocol => "proxy_protocol",
        }
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a relay saw.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes from client to backend.
    pub up: u64,
    /// Bytes from backend to client.
    pub down: u64,
    /// Why it ended.
    pub end: End,
    /// The socket error, when `end` is [`End::Error`].
    pub error: Option<io::Error>,
}
