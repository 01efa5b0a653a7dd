//! What a listener's connections run with, as of one snapshot, and the access log they
//! write at their end.
//!
//! The accept loop loads one `Arc<ListenerSnapshot>` per connection (`ArcSwap::load_full`) and
//! the connection keeps it for its whole life, so a reload affects new connections only. The
//! snapshot is the one noun every data-path module shares (forward, terminate, listener):
//! it holds the listener's settings, its pool, its pre-resolved metric handles, its
//! admission permits and its drain token, and nothing here does I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::balance::{Backend, Pool};
use crate::close::{End, Relayed};
use crate::config::ListenerConfig;
use crate::connect::ConnectError;
use crate::metrics::ListenerMetrics;

/// What a listener's connections need, as of one snapshot.
#[derive(Debug)]
pub(crate) struct ListenerSnapshot {
    /// The listener's settings.
    pub(crate) cfg: ListenerConfig,
    /// The pool it forwards to: every connection without routes; with routes, those no
    /// route takes. `None`: those are closed (`no_route`).
    pub(crate) pool: Option<Arc<Pool>>,
    /// SNI routes, in file order, with their pools.
    pub(crate) routes: Vec<Route>,
    /// Its metric handles.
    pub(crate) metrics: ListenerMetrics,
    /// Permits for `max_connections`, shared by all addresses of the listener and kept
    /// across reloads (open connections hold permits).
    pub(crate) limit: Arc<Semaphore>,
    /// Cancelled when the listener's connections must end: at the shutdown deadline, or
    /// after a reload removed the listener and the drain time passed.
    pub(crate) drain: CancellationToken,
    /// Whether passthrough relays may switch to splice(2) for bulk bytes (a gateway option;
    /// off only to exercise the copy path).
    pub(crate) splice: bool,
    /// Terminate listeners: slots for clients in their handshake (`max_handshakes`), kept
    /// across reloads with the listener.
    pub(crate) handshakes: Arc<Semaphore>,
    /// The process-wide connection budget, shared by every listener.
    pub(crate) budget: Arc<crate::budget::Budget>,
    /// Identity mode: kept-alive connections to the backends, per snapshot.
    pub(crate) upstreams: Arc<crate::http::upstream::Upstreams>,
}

/// One `[[listener.route]]` with its live pool.
#[derive(Debug)]
pub(crate) struct Route {
    /// Lower-case names and `*.` patterns.
    pub(crate) sni: Vec<String>,
    /// Where matching connections go.
    pub(crate) pool: Arc<Pool>,
}

/// Which route took a connection, kept by the connection until its access line: four bytes,
/// not a borrowed name, since every idle connection pays for what its task holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RouteTag(u32);

impl RouteTag {
    /// A listener without routes.
    pub(crate) const NONE: Self = Self(0);
    /// The default pool of a listener with routes.
    const DEFAULT: Self = Self(u32::MAX);
}

impl ListenerSnapshot {
    /// The pool for a client asking for `sni` (lower-case): the first route with a
    /// matching pattern, else the default pool; `None` when neither.
    pub(crate) fn route(&self, sni: Option<&str>) -> Option<(&Arc<Pool>, RouteTag)> {
        if let Some(sni) = sni {
            for (i, r) in self.routes.iter().enumerate() {
                if let Some(j) = r.sni.iter().position(|p| crate::sni::matches(p, sni)) {
                    // Validation keeps routes and names far below 2^16 each.
                    let tag = ((i as u32) << 16 | (j as u32 & 0xffff)) + 1;
                    return Some((&r.pool, RouteTag(tag)));
                }
            }
        }
        let pool = self.pool.as_ref()?;
        let tag = match self.routes.is_empty() {
            true => RouteTag::NONE,
            false => RouteTag::DEFAULT,
        };
        Some((pool, tag))
    }

    /// The access log's `route`: the pattern that matched, `default`, or nothing on a
    /// listener without routes.
    pub(crate) fn route_name(&self, tag: RouteTag) -> Option<&str> {
        match tag {
            RouteTag::NONE => None,
            RouteTag::DEFAULT => Some("default"),
            RouteTag(t) => {
                let (i, j) = (((t - 1) >> 16) as usize, ((t - 1) & 0xffff) as usize);
                self.routes
                    .get(i)
                    .and_then(|r| r.sni.get(j))
                    .map(String::as_str)
            }
        }
    }

    /// The access-log line of a client that never reached a backend, and its counter.
    pub(crate) fn log_connect_failed(
        &self,
        client: SocketAddr,
        started: Instant,
        error: &ConnectError,
    ) {
        match error {
            ConnectError::Client(_) => self.metrics.connect_client.inc(),
            ConnectError::Local(_) => self.metrics.connect_local.inc(),
            ConnectError::Draining | ConnectError::NoBackend | ConnectError::Backends { .. } => {
                self.metrics.rejected_no_backend.inc();
            }
        }
        self.log_unproxied(client, started, End::ConnectFailed, Some(error));
    }

    /// The access-log line of a passthrough client that sent nothing within
    /// `first_byte_timeout`, and its counter; an empty connection, so `log_empty` applies.
    pub(crate) fn log_silent(&self, client: SocketAddr, started: Instant) {
        self.metrics.closed_silent.inc();
        if self.cfg.log_empty {
            self.log_unproxied(client, started, End::ClientSilent, None);
        }
    }

    /// With `proxy_protocol`: reads the PROXY header within `sni_timeout` and returns the
    /// client address it carries (the socket's for `LOCAL`); `None`, counted and logged as
    /// `proxy_protocol`, when there is no valid header in time. Without: `client` as is.
    pub(crate) async fn proxied_client(
        &self,
        tcp: &tokio::net::TcpStream,
        client: SocketAddr,
        started: Instant,
    ) -> Option<SocketAddr> {
        if !self.cfg.proxy_protocol {
            return Some(client);
        }
        // Boxed: the reader keeps a whole header's buffer across its awaits, and every
        // connection's connect phase would otherwise reserve room for it, PROXY or not
        // (2.7 KiB instead of well under 1 KiB, past the allocator's fast sizes).
        let header = tokio::time::timeout(
            self.cfg.sni_timeout,
            Box::pin(crate::proxy_protocol::read_header(tcp)),
        )
        .await;
        match header {
            Ok(Ok(source)) => Some(source.unwrap_or(client)),
            Ok(Err(why)) => {
                self.log_rejected(client, started, End::ProxyProtocol, why);
                None
            }
            Err(_) => {
                self.log_rejected(
                    client,
                    started,
                    End::ProxyProtocol,
                    "no whole PROXY header within sni_timeout",
                );
                None
            }
        }
    }

    /// A connection closed before any backend was chosen (`no_route`, `sni_timeout`,
    /// `proxy_protocol`): its counter, and its access line (an empty connection, so
    /// `log_empty` applies).
    pub(crate) fn log_rejected(&self, client: SocketAddr, started: Instant, end: End, why: &str) {
        match end {
            End::NoRoute => self.metrics.rejected_no_route.inc(),
            End::SniTimeout => self.metrics.rejected_sni_timeout.inc(),
            _ => self.metrics.rejected_proxy_protocol.inc(),
        }
        tracing::debug!(listener = %self.cfg.name, client = %client, end = %end, "{why}");
        if self.cfg.log_empty {
            self.log_unproxied(client, started, end, None);
        }
    }

    /// One access line for a connection that reached no backend.
    fn log_unproxied(
        &self,
        client: SocketAddr,
        started: Instant,
        end: End,
        error: Option<&ConnectError>,
    ) {
        tracing::info!(
            target: "apilb::access",
            listener = %self.cfg.name,
            client = %client,
            backend = "-",
            duration_ms = duration_ms(started),
            bytes_up = 0u64,
            bytes_down = 0u64,
            end = %end,
            error = error.map(tracing::field::display),
            "connection closed"
        );
    }

    /// The access-log line of a proxied connection, and its byte counters.
    pub(crate) fn log_close(
        &self,
        client: SocketAddr,
        backend: &Backend,
        route: RouteTag,
        started: Instant,
        r: &Relayed,
    ) {
        backend.metrics.bytes_up.inc_by(r.up);
        backend.metrics.bytes_down.inc_by(r.down);
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(i) = End::PROXIED.iter().position(|e| *e == r.end) {
            self.metrics.closed[i].inc();
        }
        if r.end == End::Rebalanced {
            backend.metrics.rebalanced.inc();
        }
        if r.up == 0 && r.down == 0 && r.error.is_none() && !self.cfg.log_empty {
            return;
        }
        let error = r.error.as_ref().map(ToString::to_string);
        tracing::info!(
            target: "apilb::access",
            listener = %self.cfg.name,
            client = %client,
            backend = %backend.name,
            route = self.route_name(route).map(tracing::field::display),
            duration_ms = duration_ms(started),
            bytes_up = r.up,
            bytes_down = r.down,
            end = %r.end,
            error = error.as_deref(),
            "connection closed"
        );
    }
}

fn duration_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}
