//! Prometheus metrics: one struct of handles, registered once in the gateway's own registry.
//!
//! Names and labels are part of the contract (SPEC §4) and live here as constants. The hot
//! path never looks a metric up by label: listeners and backends resolve their labelled
//! children once, when a snapshot is built, and afterwards only touch atomics
//! ([`ListenerMetrics`], [`BackendMetrics`]). Byte counters are added once per connection,
//! at its end, not per read.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// `apilb_listener_connections_total{listener}`
pub(crate) const LISTENER_CONNECTIONS: &str = "apilb_listener_connections_total";
/// `apilb_listener_active_connections{listener}`
pub(crate) const LISTENER_ACTIVE: &str = "apilb_listener_active_connections";
/// `apilb_listener_rejected_total{listener,reason}`
pub(crate) const LISTENER_REJECTED: &str = "apilb_listener_rejected_total";
/// `apilb_listener_accept_errors_total{listener}`: accept(2) failures such as EMFILE.
pub(crate) const LISTENER_ACCEPT_ERRORS: &str = "apilb_listener_accept_errors_total";
/// `apilb_backend_connections_total{pool,backend}`
pub(crate) const BACKEND_CONNECTIONS: &str = "apilb_backend_connections_total";
/// `apilb_backend_active_connections{pool,backend}`
pub(crate) const BACKEND_ACTIVE: &str = "apilb_backend_active_connections";
/// `apilb_backend_connect_errors_total{pool,backend}`
pub(crate) const BACKEND_CONNECT_ERRORS: &str = "apilb_backend_connect_errors_total";
/// `apilb_backend_bytes_total{pool,backend,direction}`
pub(crate) const BACKEND_BYTES: &str = "apilb_backend_bytes_total";
/// `apilb_backend_healthy{pool,backend}`
pub(crate) const BACKEND_HEALTHY: &str = "apilb_backend_healthy";
/// `apilb_health_checks_total{pool,backend,result}`
pub(crate) const HEALTH_CHECKS: &str = "apilb_health_checks_total";
/// `apilb_health_check_duration_seconds{pool,backend}`
pub(crate) const HEALTH_CHECK_DURATION: &str = "apilb_health_check_duration_seconds";
/// `apilb_tls_handshake_errors_total{listener,reason}`: client-side TLS failures on
/// terminate listeners. SPEC §4 names it with `listener` only; `reason` (handshake_timeout,
/// not_tls, client_handshake, backend_tls, client_alpn) is added so an operator can tell a scanner from a
/// broken backend, and `sum by (listener)` gives SPEC's series.
pub(crate) const TLS_HANDSHAKE_ERRORS: &str = "apilb_tls_handshake_errors_total";
/// `apilb_listener_connection_duration_seconds{listener}`: how long proxied connections lived.
pub(crate) const LISTENER_CONNECTION_DURATION: &str = "apilb_listener_connection_duration_seconds";
/// `apilb_config_reloads_total{result}`
pub(crate) const CONFIG_RELOADS: &str = "apilb_config_reloads_total";
/// `apilb_certificate_expiry_timestamp_seconds{source}`
pub(crate) const CERTIFICATE_EXPIRY: &str = "apilb_certificate_expiry_timestamp_seconds";
/// `apilb_listener_closed_total{listener,end}`: proxied connections by how they ended
/// (the `end` of the access log: client_closed, backend_closed, idle_timeout, drained, error,
/// client_silent).
pub(crate) const LISTENER_CLOSED: &str = "apilb_listener_closed_total";
/// `apilb_config_info{hash}`: 1 for the content hash of the running config.
pub(crate) const CONFIG_INFO: &str = "apilb_config_info";
/// `apilb_listener_connect_errors_total{listener,cause}`: clients that got no backend
/// connection for a cause that is not a backend's (`client`: its ALPN; `local`: the gateway
/// ran out of descriptors, buffers or ports). Kept apart from
/// `apilb_backend_connect_errors_total` and passive health, which are for what backends do.
pub(crate) const LISTENER_CONNECT_ERRORS: &str = "apilb_listener_connect_errors_total";
/// `cause` of [`LISTENER_CONNECT_ERRORS`]: the client's request could not be served.
pub(crate) const CAUSE_CLIENT: &str = "client";
/// `cause` of [`LISTENER_CONNECT_ERRORS`]: the gateway's own shortage.
pub(crate) const CAUSE_LOCAL: &str = "local";
/// `apilb_backend_certificate_covers_names{pool,backend}`: 1 when the backend's certificate
/// (seen by tls/https checks) covers every name of the passthrough listeners routing to it.
pub(crate) const BACKEND_CERT_COVERS: &str = "apilb_backend_certificate_covers_names";
/// `apilb_backend_certificate_expiry_timestamp_seconds{pool,backend}`
pub(crate) const BACKEND_CERT_EXPIRY: &str = "apilb_backend_certificate_expiry_timestamp_seconds";
/// `apilb_ready`: 1 when `/readyz` would answer 200, set when `/metrics` is encoded (what an
/// alert on "not ready" reads).
pub(crate) const READY: &str = "apilb_ready";
/// `apilb_log_lines_dropped_total`: log lines dropped because stderr did not keep up (the
/// log is written by a thread of its own through a bounded queue; a full queue drops lines
/// rather than stall a worker).
pub(crate) const LOG_LINES_DROPPED: &str = "apilb_log_lines_dropped_total";

/// The log writer's count of dropped lines, set once by the binary that installs it.
static LOG_DROPS: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Tells every [`Metrics`] where the log writer counts the lines it dropped.
pub fn count_log_drops(counter: tracing_appender::non_blocking::ErrorCounter) {
    let _ = LOG_DROPS.set(counter);
}

/// `apilb_pool_fail_open_total{pool}`
pub(crate) const POOL_FAIL_OPEN: &str = "apilb_pool_fail_open_total";
/// `apilb_pool_connection_skew{pool}`: the largest backend's open connections over its fair
/// share (SPEC §11).
pub(crate) const POOL_SKEW: &str = "apilb_pool_connection_skew";
/// `apilb_http_requests_total{listener,backend,code}` (SPEC §10)
pub(crate) const HTTP_REQUESTS: &str = "apilb_http_requests_total";
/// `apilb_http_request_duration_seconds{listener,verb}` (SPEC §10)
pub(crate) const HTTP_DURATION: &str = "apilb_http_request_duration_seconds";
/// `apilb_http_connection_errors_total{listener}`
pub(crate) const HTTP_ERRORS: &str = "apilb_http_connection_errors_total";
/// `apilb_pool_rebalanced_total{pool,backend}`
pub(crate) const POOL_REBALANCED: &str = "apilb_pool_rebalanced_total";

/// Rejection reasons, the `reason` label of [`LISTENER_REJECTED`].
pub(crate) const REJECT_MAX_CONNECTIONS: &str = "max_connections";
/// No backend could be connected to (all refused, timed out, or `when_all_down = "reject"`).
pub(crate) const REJECT_NO_BACKEND: &str = "no_backend";
/// No route took the server name, and the listener has no default pool (SPEC §9).
pub(crate) const REJECT_NO_ROUTE: &str = "no_route";
/// The ClientHello (or PROXY header) was incomplete after `sni_timeout`.
pub(crate) const REJECT_SNI_TIMEOUT: &str = "sni_timeout";
/// No valid PROXY protocol header on a `proxy_protocol` listener.
pub(crate) const REJECT_PROXY_PROTOCOL: &str = "proxy_protocol";

/// Every metric family the gateway exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    listener_connections: IntCounterVec,
    listener_active: IntGaugeVec,
    listener_rejected: IntCounterVec,
    listener_accept_errors: IntCounterVec,
    listener_connect_errors: IntCounterVec,
    backend_connections: IntCounterVec,
    backend_active: IntGaugeVec,
    backend_connect_errors: IntCounterVec,
    backend_bytes: IntCounterVec,
    pool_fail_open: IntCounterVec,
    backend_healthy: IntGaugeVec,
    backend_cert_covers: IntGaugeVec,
    backend_cert_expiry: IntGaugeVec,
    health_checks: IntCounterVec,
    health_check_duration: HistogramVec,
    tls_handshake_errors: IntCounterVec,
    connection_duration: HistogramVec,
    config_reloads: IntCounterVec,
    certificate_expiry: IntGaugeVec,
    config_info: IntGaugeVec,
    ready: IntGauge,
    log_dropped: IntCounter,
    listener_closed: IntCounterVec,
    pool_skew: GaugeVec,
    pool_rebalanced: IntCounterVec,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    http_errors: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .expect("metric names and labels are static and valid");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .expect("metric names and labels are static and valid");
    registry
        .register(Box::new(g.clone()))
        .expect("each metric is registered once");
    g
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family in a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        Self {
            listener_connections: counter(
                &r,
                LISTENER_CONNECTIONS,
                "Client connections accepted by the listener.",
                &["listener"],
            ),
            listener_active: gauge(
                &r,
                LISTENER_ACTIVE,
                "Client connections open on the listener.",
                &["listener"],
            ),
            listener_rejected: counter(
                &r,
                LISTENER_REJECTED,
                "Client connections closed without being proxied, by reason.",
                &["listener", "reason"],
            ),
            listener_accept_errors: counter(
                &r,
                LISTENER_ACCEPT_ERRORS,
                "accept(2) failures, such as running out of file descriptors.",
                &["listener"],
            ),
            listener_connect_errors: counter(
                &r,
                LISTENER_CONNECT_ERRORS,
                "Clients that got no backend connection for a cause not the backend's (client, local); not charged to any backend.",
                &["listener", "cause"],
            ),
            backend_connections: counter(
                &r,
                BACKEND_CONNECTIONS,
                "Proxied client connections established to the backend.",
                &["pool", "backend"],
            ),
            backend_active: gauge(
                &r,
                BACKEND_ACTIVE,
                "Proxied client connections open to (or connecting to) the backend.",
                &["pool", "backend"],
            ),
            backend_connect_errors: counter(
                &r,
                BACKEND_CONNECT_ERRORS,
                "Failed connects to the backend for proxied connections.",
                &["pool", "backend"],
            ),
            backend_bytes: counter(
                &r,
                BACKEND_BYTES,
                "Bytes relayed, up (client to backend) and down (backend to client).",
                &["pool", "backend", "direction"],
            ),
            pool_skew: {
                let g = GaugeVec::new(
                    Opts::new(POOL_SKEW, "The most loaded healthy backend's open connections divided by its fair share by effective weight (1 = even)."),
                    &["pool"],
                )
                .expect("metric names and labels are static and valid");
                r.register(Box::new(g.clone()))
                    .expect("each metric is registered once");
                g
            },
            http_requests: counter(
                &r,
                HTTP_REQUESTS,
                "Requests through identity-mode listeners, by backend and status code.",
                &["listener", "backend", "code"],
            ),
            http_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(HTTP_DURATION, "Time from request to the end of its response on identity-mode listeners, by verb (watches and upgrades excluded).")
                        .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
                    &["listener", "verb"],
                )
                .expect("metric names and labels are static and valid");
                r.register(Box::new(h.clone()))
                    .expect("each metric is registered once");
                h
            },
            http_errors: counter(
                &r,
                HTTP_ERRORS,
                "Identity-mode client connections that ended with an HTTP protocol error (malformed or oversized requests, timeouts, HTTP/2 resets beyond the limit).",
                &["listener"],
            ),
            pool_rebalanced: counter(
                &r,
                POOL_REBALANCED,
                "Connections closed by the rebalancer to move them off a backend holding more than its share.",
                &["pool", "backend"],
            ),
            pool_fail_open: counter(
                &r,
                POOL_FAIL_OPEN,
                "Connections routed while no backend of the pool was healthy.",
                &["pool"],
            ),
            backend_healthy: gauge(
                &r,
                BACKEND_HEALTHY,
                "1 while the backend is healthy (gets new connections), else 0.",
                &["pool", "backend"],
            ),
            backend_cert_covers: gauge(
                &r,
                BACKEND_CERT_COVERS,
                "1 when the backend's certificate covers every name clients use through passthrough listeners (tls/https checks), else 0.",
                &["pool", "backend"],
            ),
            backend_cert_expiry: gauge(
                &r,
                BACKEND_CERT_EXPIRY,
                "notAfter of the backend's certificate as tls/https checks see it, Unix seconds.",
                &["pool", "backend"],
            ),
            health_checks: counter(
                &r,
                HEALTH_CHECKS,
                "Active health checks, by result (pass, fail).",
                &["pool", "backend", "result"],
            ),
            health_check_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(HEALTH_CHECK_DURATION, "Time one health check took.")
                        .buckets(vec![
                            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        ]),
                    &["pool", "backend"],
                )
                .expect("metric names and labels are static and valid");
                r.register(Box::new(h.clone()))
                    .expect("each metric is registered once");
                h
            },
            tls_handshake_errors: counter(
                &r,
                TLS_HANDSHAKE_ERRORS,
                "Client connections to terminate listeners that failed before relaying, by reason.",
                &["listener", "reason"],
            ),
            connection_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        LISTENER_CONNECTION_DURATION,
                        "Lifetime of proxied connections, from accept to close.",
                    )
                    // From one short request to hour-long watches.
                    .buckets(vec![0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0]),
                    &["listener"],
                )
                .expect("metric names and labels are static and valid");
                r.register(Box::new(h.clone()))
                    .expect("each metric is registered once");
                h
            },
            config_reloads: {
                let c = counter(&r, CONFIG_RELOADS, "Configuration reloads, by result.", &["result"]);
                // Both series exist from the start, so an alert on failures has a baseline.
                c.with_label_values(&["success"]);
                c.with_label_values(&["failure"]);
                c
            },
            certificate_expiry: gauge(
                &r,
                CERTIFICATE_EXPIRY,
                "notAfter of every certificate the config names (each CA of a bundle its own), Unix seconds.",
                &["source"],
            ),
            config_info: gauge(
                &r,
                CONFIG_INFO,
                "1 for the content hash of the running configuration (changes on each applied reload).",
                &["hash"],
            ),
            log_dropped: {
                let c = IntCounter::new(
                    LOG_LINES_DROPPED,
                    "Log lines dropped because stderr did not keep up.",
                )
                .expect("metric names are static and valid");
                r.register(Box::new(c.clone()))
                    .expect("each metric is registered once");
                c
            },
            ready: {
                let g = IntGauge::new(READY, "1 when /readyz answers 200 (every listener's pool has a healthy backend and the gateway is not shutting down), else 0.")
                    .expect("metric names are static and valid");
                r.register(Box::new(g.clone()))
                    .expect("each metric is registered once");
                g
            },
            listener_closed: counter(
                &r,
                LISTENER_CLOSED,
                "Proxied connections by how they ended.",
                &["listener", "end"],
            ),
            registry: {
                #[cfg(target_os = "linux")]
                {
                    // Open fds, RSS, CPU: the process collector of the prometheus crate.
                    let _ = r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
                }
                r
            },
        }
    }

    /// Sets the expiry series to exactly `certs` (series of certificates no longer named go).
    pub fn set_certificates(&self, certs: &[crate::config::CertificateInfo]) {
        self.certificate_expiry.reset();
        for c in certs {
            self.certificate_expiry
                .with_label_values(&[c.source.as_str()])
                .set(c.not_after);
        }
    }

    /// Marks `hash` as the running configuration's.
    pub fn set_config_hash(&self, hash: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[hash]).set(1);
    }

    /// Counts one configuration reload.
    pub fn reload(&self, success: bool) {
        self.config_reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    /// The registry, for the admin server and for tests.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything in Prometheus text format.
    pub fn encode(&self) -> String {
        if let Some(c) = LOG_DROPS.get() {
            let dropped = c.dropped_lines() as u64;
            let seen = self.log_dropped.get();
            if dropped > seen {
                self.log_dropped.inc_by(dropped - seen);
            }
        }
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Handles for one listener, resolved once per listener.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        ListenerMetrics {
            connections: self.listener_connections.with_label_values(&[listener]),
            active: self.listener_active.with_label_values(&[listener]),
            rejected_max_connections: self
                .listener_rejected
                .with_label_values(&[listener, REJECT_MAX_CONNECTIONS]),
            rejected_no_backend: self
                .listener_rejected
                .with_label_values(&[listener, REJECT_NO_BACKEND]),
            rejected_no_route: self
                .listener_rejected
                .with_label_values(&[listener, REJECT_NO_ROUTE]),
            rejected_sni_timeout: self
                .listener_rejected
                .with_label_values(&[listener, REJECT_SNI_TIMEOUT]),
            rejected_proxy_protocol: self
                .listener_rejected
                .with_label_values(&[listener, REJECT_PROXY_PROTOCOL]),
            accept_errors: self.listener_accept_errors.with_label_values(&[listener]),
            connect_client: self
                .listener_connect_errors
                .with_label_values(&[listener, CAUSE_CLIENT]),
            connect_local: self
                .listener_connect_errors
                .with_label_values(&[listener, CAUSE_LOCAL]),
            duration: self.connection_duration.with_label_values(&[listener]),
            closed_silent: self
                .listener_closed
                .with_label_values(&[listener, crate::close::End::ClientSilent.as_str()]),
            closed: crate::close::End::PROXIED.map(|end| {
                self.listener_closed
                    .with_label_values(&[listener, end.as_str()])
            }),
            http_requests: self.http_requests.clone(),
            http_duration: self.http_duration.clone(),
            http_errors: self.http_errors.with_label_values(&[listener]),
            tls: TlsErrorMetrics {
                handshake_timeout: self
                    .tls_handshake_errors
                    .with_label_values(&[listener, "handshake_timeout"]),
                not_tls: self
                    .tls_handshake_errors
                    .with_label_values(&[listener, "not_tls"]),
                client_handshake: self
                    .tls_handshake_errors
                    .with_label_values(&[listener, "client_handshake"]),
                backend_tls: self
                    .tls_handshake_errors
                    .with_label_values(&[listener, "backend_tls"]),
                client_alpn: self
                    .tls_handshake_errors
                    .with_label_values(&[listener, "client_alpn"]),
                handshake_limit: self
                    .tls_handshake_errors
                    .with_label_values(&[listener, "handshake_limit"]),
                client_certificate: self
                    .tls_handshake_errors
                    .with_label_values(&[listener, "client_certificate"]),
            },
        }
    }

    /// Handles for one backend of one pool, resolved once per backend.
    pub fn backend(&self, pool: &str, backend: &str) -> BackendMetrics {
        BackendMetrics {
            connections: self.backend_connections.with_label_values(&[pool, backend]),
            active: self.backend_active.with_label_values(&[pool, backend]),
            connect_errors: self
                .backend_connect_errors
                .with_label_values(&[pool, backend]),
            bytes_up: self.backend_bytes.with_label_values(&[pool, backend, "up"]),
            bytes_down: self
                .backend_bytes
                .with_label_values(&[pool, backend, "down"]),
            healthy: self.backend_healthy.with_label_values(&[pool, backend]),
            covers_names: self.backend_cert_covers.with_label_values(&[pool, backend]),
            cert_expiry: self.backend_cert_expiry.with_label_values(&[pool, backend]),
            checks_pass: self
                .health_checks
                .with_label_values(&[pool, backend, "pass"]),
            checks_fail: self
                .health_checks
                .with_label_values(&[pool, backend, "fail"]),
            check_duration: self
                .health_check_duration
                .with_label_values(&[pool, backend]),
            rebalanced: self.pool_rebalanced.with_label_values(&[pool, backend]),
        }
    }

    /// Drops every series of backend `backend` of pool `pool` from the export, once nothing
    /// of that name is in the pool any more. Handles still held (by connections finishing)
    /// keep working but are no longer exported, and a later backend of that name starts
    /// from fresh series.
    pub(crate) fn remove_backend(&self, pool: &str, backend: &str) {
        let pb = [pool, backend];
        let _ = self.backend_connections.remove_label_values(&pb);
        let _ = self.backend_active.remove_label_values(&pb);
        let _ = self.backend_connect_errors.remove_label_values(&pb);
        let _ = self.backend_healthy.remove_label_values(&pb);
        let _ = self.backend_cert_covers.remove_label_values(&pb);
        let _ = self.backend_cert_expiry.remove_label_values(&pb);
        let _ = self.health_check_duration.remove_label_values(&pb);
        let _ = self.pool_rebalanced.remove_label_values(&pb);
        for d in ["up", "down"] {
            let _ = self.backend_bytes.remove_label_values(&[pool, backend, d]);
        }
        for r in ["pass", "fail"] {
            let _ = self.health_checks.remove_label_values(&[pool, backend, r]);
        }
    }

    /// Sets `apilb_ready`.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// The skew gauge of one pool.
    pub(crate) fn pool_skew(&self, pool: &str) -> prometheus::Gauge {
        self.pool_skew.with_label_values(&[pool])
    }

    /// The fail-open counter of one pool.
    pub fn pool_fail_open(&self, pool: &str) -> IntCounter {
        self.pool_fail_open.with_label_values(&[pool])
    }
}

/// Pre-resolved handles of one listener.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    /// Accepted and handed to a connection task.
    pub connections: IntCounter,
    /// Open right now.
    pub active: IntGauge,
    /// Refused because the listener was at `max_connections`.
    pub rejected_max_connections: IntCounter,
    /// Closed because no backend could take it.
    pub rejected_no_backend: IntCounter,
    /// Closed because no route took it and there is no default pool.
    pub rejected_no_route: IntCounter,
    /// Closed because its ClientHello or PROXY header was incomplete after `sni_timeout`.
    pub rejected_sni_timeout: IntCounter,
    /// Closed for a missing or invalid PROXY header.
    pub rejected_proxy_protocol: IntCounter,
    /// accept(2) errors.
    pub accept_errors: IntCounter,
    /// No backend connection because of the client (not charged to a backend).
    pub connect_client: IntCounter,
    /// No backend connection because of the gateway itself (not charged to a backend).
    pub connect_local: IntCounter,
    /// Lifetime of proxied connections.
    pub duration: Histogram,
    /// Proxied connections by end, indexed like [`crate::close::End::PROXIED`].
    pub closed: [IntCounter; 6],
    /// Passthrough clients closed for sending nothing within `first_byte_timeout`
    /// (`apilb_listener_closed_total{end="client_silent"}`).
    pub closed_silent: IntCounter,
    /// TLS failures (terminate listeners only).
    pub tls: TlsErrorMetrics,
    /// Identity-mode requests (labels resolved per request: backend and code vary).
    pub http_requests: IntCounterVec,
    /// Identity-mode request durations by verb.
    pub http_duration: HistogramVec,
    /// Identity-mode connections ended by an HTTP protocol error.
    pub http_errors: IntCounter,
}

/// TLS failures of one terminate listener, by reason.
#[derive(Debug, Clone)]
pub struct TlsErrorMetrics {
    /// No complete handshake within `handshake_timeout` (silent or slow clients).
    pub handshake_timeout: IntCounter,
    /// The first bytes were not a TLS ClientHello (plain HTTP, scanners).
    pub not_tls: IntCounter,
    /// The client's handshake failed after its ClientHello.
    pub client_handshake: IntCounter,
    /// The TLS handshake with a backend failed (counted per backend tried).
    pub backend_tls: IntCounter,
    /// The client offered ALPN protocols of which the gateway knows none (refused with
    /// `no_application_protocol` before any backend is contacted).
    pub client_alpn: IntCounter,
    /// Closed at once: `max_handshakes` clients were already in their handshake.
    pub handshake_limit: IntCounter,
    /// The client's certificate did not verify against `client_ca`, or it sent none where
    /// `require_client_cert` asks for one (SPEC §10).
    pub client_certificate: IntCounter,
}

impl TlsErrorMetrics {
    /// The sum over reasons.
    pub fn total(&self) -> u64 {
        self.handshake_timeout.get()
            + self.not_tls.get()
            + self.client_handshake.get()
            + self.backend_tls.get()
            + self.client_alpn.get()
            + self.handshake_limit.get()
            + self.client_certificate.get()
    }
}

/// Pre-resolved handles of one backend.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    /// Established proxied connections.
    pub connections: IntCounter,
    /// Open (or connecting) proxied connections; also the least-conn load figure.
    pub active: IntGauge,
    /// Failed connects from proxied traffic.
    pub connect_errors: IntCounter,
    /// Client to backend bytes.
    pub bytes_up: IntCounter,
    /// Backend to client bytes.
    pub bytes_down: IntCounter,
    /// 1 while healthy.
    pub healthy: IntGauge,
    /// 1 while the certificate covers the listeners' names.
    pub covers_names: IntGauge,
    /// The certificate's notAfter.
    pub cert_expiry: IntGauge,
    /// Passed active checks.
    pub checks_pass: IntCounter,
    /// Failed active checks.
    pub checks_fail: IntCounter,
    /// Duration of active checks.
    pub check_duration: Histogram,
    /// Connections the rebalancer closed on this backend.
    pub rebalanced: IntCounter,
}
