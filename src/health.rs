//! Health of backends: the per-backend state machine, the active checks, passive failures.
//!
//! Each backend carries a [`BackendHealth`]. The data path reads one atomic flag from it
//! ([`BackendHealth::is_healthy`]); everything else (consecutive counts, the last reason and
//! time) sits behind a mutex that only the prober, passive failures and the admin page touch.
//! `spawn` starts one loop per backend that checks at once, then every `interval` with
//! jitter, until its token is cancelled. The first result decides the state on its own;
//! after that `rise`/`fall` apply, and only changes of state are logged, with the reason.
//!
//! Checks never share connections with client traffic. `tls` and `https` checks verify the
//! backend against `[pool.tls]`, may present the health-only client certificate, and end
//! with close_notify so the apiserver logs no handshake error for a probe.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::balance::{Backend, Pool};
use crate::config::{CheckKind, HealthConfig};

// === State ===

/// A backend's health as the admin page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No check has finished yet.
    Unknown,
    /// Gets new connections.
    Healthy,
    /// Gets no new connections; established ones are left alone.
    Unhealthy,
}

impl State {
    /// Lower-case name, as in `/api/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
        }
    }
}

/// The last result and the counters behind the state.
#[derive(Debug, Clone)]
pub struct Status {
    /// Current state.
    pub state: State,
    /// Consecutive passes.
    pub passes: u32,
    /// Consecutive failures (active checks and failed proxied connects).
    pub failures: u32,
    /// The last result in plain words ("ok", "connection refused", ...).
    pub reason: String,
    /// When the last result came in.
    pub last_check: Option<SystemTime>,
}

/// Health of one backend.
#[derive(Debug)]
pub struct BackendHealth {
    healthy: AtomicBool,
    status: Mutex<Status>,
}

impl BackendHealth {
    /// A backend no check has seen yet, counted as `healthy` until the first result.
    pub fn new(healthy: bool) -> Self {
        Self {
            healthy: AtomicBool::new(healthy),
            status: Mutex::new(Status {
                state: State::Unknown,
                passes: 0,
                failures: 0,
                reason: "not checked yet".into(),
                last_check: None,
            }),
        }
    }

    /// Whether the backend takes new connections: one atomic load, for the data path.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A copy of the current status.
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Records one result. Returns the previous and the new state when it changed.
    pub fn observe(
        &self,
        pass: bool,
        reason: &str,
        rise: u32,
        fall: u32,
    ) -> Option<(State, State)> {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.reason = reason.to_string();
        s.last_check = Some(SystemTime::now());
        if pass {
            s.passes = s.passes.saturating_add(1);
            s.failures = 0;
        } else {
            s.failures = s.failures.saturating_add(1);
            s.passes = 0;
        }
        let next = match (s.state, pass) {
            // The first result decides on its own (SPEC §3).
            (State::Unknown, true) => State::Healthy,
            (State::Unknown, false) => State::Unhealthy,
            (State::Unhealthy, true) if s.passes >= rise => State::Healthy,
            (State::Healthy, false) if s.failures >= fall => State::Unhealthy,
            (state, _) => state,
        };
        self.healthy
            .store(next == State::Healthy, Ordering::Relaxed);
        if next == s.state {
            return None;
        }
        let prev = std::mem::replace(&mut s.state, next);
        Some((prev, next))
    }
}

// === Recording results ===

/// Records a result for `backend` of `pool`, updating metrics and logging a change of state.
pub(crate) fn record(pool: &Pool, backend: &Backend, pass: bool, reason: &str) {
    let h = &pool.cfg.health;
    if let Some((prev, state)) = backend.health.observe(pass, reason, h.rise, h.fall) {
        backend
            .metrics
            .healthy
            .set(i64::from(state == State::Healthy));
        // Only a return ramps: at start-up every backend begins together at full weight.
        let ramp =
            prev == State::Unhealthy && state == State::Healthy && !pool.cfg.slow_start.is_zero();
        if ramp {
            backend.start_ramp();
            tracing::info!(pool = %pool.cfg.name, backend = %backend.name, slow_start = %humantime::format_duration(pool.cfg.slow_start), "slow start: ramping up from 10% of its weight");
        }
        match state {
            State::Healthy => {
                tracing::info!(pool = %pool.cfg.name, backend = %backend.name, reason, "backend is healthy")
            }
            _ => {
                tracing::warn!(pool = %pool.cfg.name, backend = %backend.name, reason, "backend is unhealthy")
            }
        }
    }
}

// === Active checks ===

/// Starts one check loop per backend of `pool`; they end when `stop` is cancelled.
pub(crate) fn spawn(pool: &Arc<Pool>, stop: &CancellationToken) {
    for i in 0..pool.backends.len() {
        let pool = pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let backend = pool.backends[i].clone();
            let cfg = &pool.cfg.health;
            let name = server_name(&pool, &backend);
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
                let result =
                    tokio::time::timeout(cfg.timeout, check(&backend, cfg, name.clone())).await;
                if stop.is_cancelled() {
                    return;
                }
                backend
                    .metrics
                    .check_duration
                    .observe(started.elapsed().as_secs_f64());
                let (pass, reason) = match result {
                    Ok(Ok(())) => (true, "ok".to_string()),
                    Ok(Err(reason)) => (false, reason),
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
                record(&pool, &backend, pass, &reason);
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

/// The name checked in the backend's certificate: `[pool.tls] server_name`, else its host.
pub(crate) fn server_name(pool: &Pool, backend: &Backend) -> ServerName<'static> {
    let configured = pool.cfg.tls.as_ref().and_then(|t| t.server_name.clone());
    let host = configured.unwrap_or_else(|| {
        let host = backend
            .address
            .rsplit_once(':')
            .map_or(backend.address.as_str(), |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    ServerName::try_from(host).unwrap_or_else(|_| ServerName::IpAddress(backend.addr.ip().into()))
}

async fn check(
    backend: &Backend,
    cfg: &HealthConfig,
    name: ServerName<'static>,
) -> Result<(), String> {
    let tcp = TcpStream::connect(backend.addr)
        .await
        .map_err(|e| io_reason(&e))?;
    let _ = tcp.set_nodelay(true);
    let tls_config = match (cfg.check, &cfg.tls) {
        (CheckKind::Tcp, _) => return Ok(()),
        (_, Some(c)) => c.clone(),
        // Validation requires [pool.tls] for these checks.
        (_, None) => return Err("no [pool.tls] for a TLS check".into()),
    };
    let tls = tokio_rustls::TlsConnector::from(tls_config)
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| tls_reason(&e, &name))?;
    if cfg.check == CheckKind::Tls {
        close_cleanly(tls);
        return Ok(());
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let conn = conn.without_shutdown();
    let host = match &name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        _ => backend.addr.to_string(),
    };
    let req = hyper::Request::get(cfg.path.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "apilb-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("HTTP request: {e}"))?;
    let request = async {
        let resp = sender.send_request(req).await;
        drop(sender);
        resp
    };
    let (resp, parts) = tokio::join!(request, conn);
    let status = resp.map_err(|e| format!("HTTP: {e}"))?.status().as_u16();
    if let Ok(parts) = parts {
        close_cleanly(parts.io.into_inner());
    }
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

/// Ends a probe's TLS session the way a well-behaved client does, off the check's clock
/// (the verdict is already in): send close_notify, then read until the server's own close.
/// Dropping the socket with unread bytes (TLS 1.3 session tickets) would make the kernel
/// send a reset, and the apiserver would log a failed connection for every probe.
fn close_cleanly(mut tls: tokio_rustls::client::TlsStream<TcpStream>) {
    tokio::spawn(async move {
        let _ = tls.shutdown().await;
        let mut sink = tokio::io::sink();
        let drain = tokio::io::copy(&mut tls, &mut sink);
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    });
}

/// A socket error in plain words.
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        _ => e.to_string(),
    }
}

/// A TLS failure in the words an operator searches for.
pub(crate) fn tls_reason(e: &io::Error, name: &ServerName<'_>) -> String {
    use rustls::CertificateError as C;
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return format!("TLS handshake: {}", io_reason(e));
    };
    match err {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "certificate signed by unknown authority".into(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("certificate not valid for name {}", name.to_str())
            }
            C::Expired | C::ExpiredContext { .. } => "certificate expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => "certificate not valid yet".into(),
            other => format!("invalid certificate: {other:?}"),
        },
        rustls::Error::AlertReceived(a) => format!("TLS alert from backend: {a:?}"),
        other => format!("TLS handshake: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_then_rise_and_fall() {
        let h = BackendHealth::new(true);
        assert_eq!(
            h.observe(false, "connection refused", 2, 3),
            Some((State::Unknown, State::Unhealthy))
        );
        assert!(!h.is_healthy());
        assert_eq!(h.observe(true, "ok", 2, 3), None);
        assert!(!h.is_healthy(), "one pass is not enough with rise = 2");
        assert_eq!(
            h.observe(true, "ok", 2, 3),
            Some((State::Unhealthy, State::Healthy))
        );
        assert_eq!(h.observe(false, "x", 2, 3), None);
        assert_eq!(h.observe(false, "x", 2, 3), None);
        assert!(h.is_healthy());
        assert_eq!(
            h.observe(false, "status 500", 2, 3),
            Some((State::Healthy, State::Unhealthy))
        );
        assert_eq!(h.status().reason, "status 500");
    }

    #[test]
    fn a_pass_resets_the_failure_count() {
        let h = BackendHealth::new(true);
        h.observe(true, "ok", 1, 2);
        h.observe(false, "x", 1, 2);
        h.observe(true, "ok", 1, 2);
        h.observe(false, "x", 1, 2);
        assert!(h.is_healthy());
    }

    #[test]
    fn unknown_backend_added_later_starts_out_of_rotation() {
        assert!(!BackendHealth::new(false).is_healthy());
        assert_eq!(BackendHealth::new(false).status().state, State::Unknown);
    }
}
