//! The typed configuration that validation produces (SPEC §2), and the errors it reports.
//! Plain data: values, loaded certificates, nothing live.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::defaults;

/// A string setting with a fixed set of values: one table gives the names, the parser and
/// `as_str`.
pub(crate) trait Choice: Copy + PartialEq + 'static {
    /// What the setting is called in the error message ("unknown balance ...").
    const WHAT: &'static str;
    /// Every name and its value, the default first by convention.
    const CHOICES: &'static [(&'static str, Self)];

    /// The name of `self` in the config file.
    fn name(self) -> &'static str {
        Self::CHOICES
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("", |(n, _)| n)
    }
}

// === Errors ===

/// One problem found in a configuration file, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Dotted path of the key, such as `pool[0].connect_timeout` (empty for syntax errors).
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

/// Everything wrong with one configuration file; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// === Typed configuration ===

/// A validated configuration, ready to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from, for messages and for watching.
    pub source: PathBuf,
    /// The admin listener, when configured.
    pub admin: Option<AdminConfig>,
    /// `[global] max_connections`: proxied connections the whole process may hold at once;
    /// `None`: what the descriptor limit allows (read at start).
    pub global_max_connections: Option<u32>,
    /// Pools in file order; names are unique.
    pub pools: Vec<Arc<PoolConfig>>,
    /// Listeners in file order; names and addresses are unique.
    pub listeners: Vec<ListenerConfig>,
    /// Expired certificates the config names. `check` fails on them; `run` and reload log
    /// them as errors and go on, since refusing to start would turn one stale certificate
    /// into an outage of every listener (SPEC §2).
    pub expired: Vec<ConfigError>,
    /// Every certificate the config names (each CA of a bundle its own), for expiry metrics
    /// and the status page.
    pub certificates: Vec<CertificateInfo>,
    /// Every file the config names (certificates, keys, CA bundles), watched for changes.
    pub files: Vec<PathBuf>,
    /// What each file held when read, as (scope, path, SHA-256 prefix), the scope being the
    /// object that named it (`pool/NAME`, `listener/NAME`): tells a reload which objects'
    /// certificates changed, even when a new certificate has the old one's dates.
    pub inputs: Vec<(String, PathBuf, String)>,
    /// Likely operator mistakes that do not stop the gateway: printed by `check`, logged by
    /// `run` and reload.
    pub warnings: Vec<ConfigError>,
    /// The first 16 hex digits of the SHA-256 of the text this config was parsed from
    /// (`apilb_config_info{hash}`): stable across builds and toolchains.
    pub hash: String,
}

/// One certificate named by the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Where it comes from, like `listener/public/cert` or `pool/apiservers/ca/0`.
    pub source: String,
    /// Its subject.
    pub subject: String,
    /// Its notAfter, Unix seconds.
    pub not_after: i64,
}

impl Config {
    /// The names clients use to reach `pool` through passthrough listeners, each once: every
    /// backend certificate of the pool must cover them (SPEC §8).
    pub fn passthrough_names(&self, pool: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |n: &String| {
            if !out.contains(n) {
                out.push(n.clone());
            }
        };
        for l in self
            .listeners
            .iter()
            .filter(|l| l.mode == Mode::Passthrough)
        {
            if l.pool.as_deref() == Some(pool) {
                l.names.iter().for_each(&mut add);
            }
            // A route's exact names are names its clients use; a wildcard names none.
            for r in l.routes.iter().filter(|r| r.pool == pool) {
                r.sni
                    .iter()
                    .filter(|n| !n.starts_with("*."))
                    .for_each(&mut add);
            }
        }
        out
    }

    /// The pool a listener refers to; validation guarantees it exists.
    pub fn pool(&self, name: &str) -> Option<&Arc<PoolConfig>> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// `[admin]`: where the admin endpoints are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address of the admin HTTP server; never shared with a traffic listener.
    pub listen: SocketAddr,
    /// On shutdown, `/readyz` fails for this long while every listener keeps accepting, so
    /// keepalived or a BGP speaker moves the virtual IP before anything is refused.
    pub shutdown_grace: Duration,
}

/// How a pool orders its backends for a new connection (SPEC §3, Backend choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Fewest active connections per unit of weight, ties broken round-robin.
    LeastConn,
    /// Each backend in turn, in proportion to its weight.
    RoundRobin,
    /// The less loaded of two random picks.
    RandomTwo,
}

impl Choice for Balance {
    const WHAT: &'static str = "balance";
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("least-conn", Self::LeastConn),
        ("round-robin", Self::RoundRobin),
        ("random-two", Self::RandomTwo),
    ];
}

impl Balance {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        self.name()
    }
}

/// What a pool does when none of its backends is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenAllDown {
    /// Route among all backends as if they were healthy.
    FailOpen,
    /// Close the client connection.
    Reject,
}

impl Choice for WhenAllDown {
    const WHAT: &'static str = "value";
    const CHOICES: &'static [(&'static str, Self)] =
        &[("fail-open", Self::FailOpen), ("reject", Self::Reject)];
}

impl WhenAllDown {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        self.name()
    }
}

/// What a health check does (SPEC §3, Health checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// A full TLS handshake, verified against `[pool.tls]`, closed with close_notify.
    Tls,
    /// The TLS handshake plus `GET path`, passing on a status in `expect_status`.
    Https,
}

impl Choice for CheckKind {
    const WHAT: &'static str = "check";
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("tcp", Self::Tcp),
        ("tls", Self::Tls),
        ("https", Self::Https),
    ];
}

impl CheckKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        self.name()
    }
}

/// `[pool.health]`: how each backend of a pool is checked.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// The kind of check.
    pub check: CheckKind,
    /// Path requested by `https` checks.
    pub path: String,
    /// Statuses that pass an `https` check.
    pub expect_status: Vec<u16>,
    /// Time between checks of one backend (a little jitter is added).
    pub interval: Duration,
    /// Time one check may take.
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy backend healthy.
    pub rise: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub fall: u32,
    /// The TLS client configuration of `tls`/`https` checks, built and validated at load;
    /// it carries the health-only client certificate when one is configured.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            check: CheckKind::Tcp,
            path: defaults::HEALTH_PATH.into(),
            expect_status: defaults::HEALTH_EXPECT_STATUS.to_vec(),
            interval: defaults::HEALTH_INTERVAL,
            timeout: defaults::HEALTH_TIMEOUT,
            rise: defaults::HEALTH_RISE,
            fall: defaults::HEALTH_FALL,
            tls: None,
        }
    }
}

/// `[pool.tls]`: how the gateway verifies its backends' certificates.
#[derive(Debug, Clone)]
pub struct PoolTlsConfig {
    /// The trust anchors read from `ca`.
    pub roots: Arc<rustls::RootCertStore>,
    /// Name checked in backend certificates; `None`: the backend's host.
    pub server_name: Option<String>,
    /// Client configuration for proxied backend connections of terminate listeners: the same
    /// roots, and never a client certificate (the gateway lends no identity to clients).
    /// (The TLS sessions of those connections are live state: they live in the running pool.)
    pub client: Arc<rustls::ClientConfig>,
}

/// `[[pool]]`: a named set of backends and how to reach them.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Unique name, used by listeners and in metrics.
    pub name: String,
    /// Selection algorithm.
    pub balance: Balance,
    /// Time allowed for one TCP connect to a backend.
    pub connect_timeout: Duration,
    /// Distinct backends tried for one client before giving up.
    pub connect_attempts: NonZeroU32,
    /// Behaviour when no backend is healthy.
    pub when_all_down: WhenAllDown,
    /// How long connections may outlive their backend's removal, and the shutdown drain.
    pub drain_timeout: Duration,
    /// A backend that turns healthy again ramps from 10% to 100% of its weight over this
    /// long; zero turns the ramp off.
    pub slow_start: Duration,
    /// Backends in file order; addresses are unique within the pool.
    pub backends: Vec<BackendConfig>,
    /// Health checking.
    pub health: HealthConfig,
    /// Backend TLS verification, when configured.
    pub tls: Option<PoolTlsConfig>,
    /// `send_proxy`: the PROXY header every backend connection starts with (SPEC §9).
    pub send_proxy: Option<SendProxy>,
    /// `[pool.rebalance]`: moving surplus long-lived connections (SPEC §11); off when absent.
    pub rebalance: Option<RebalanceConfig>,
}

/// `[pool.rebalance]` (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RebalanceConfig {
    /// Act when a backend holds more than `(1 + max_skew)` times its fair share.
    pub max_skew: f64,
    /// At most this many connections closed per second in the pool.
    pub rate: u32,
    /// Never close a connection younger than this.
    pub min_age: Duration,
}

/// `send_proxy`: which PROXY protocol header a pool's backends expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProxy {
    /// The text line (`send-proxy` in HAProxy).
    V1,
    /// The binary header (`send-proxy-v2`).
    V2,
}

impl Choice for SendProxy {
    const WHAT: &'static str = "send_proxy";
    const CHOICES: &'static [(&'static str, Self)] = &[("v1", Self::V1), ("v2", Self::V2)];
}

/// `[[listener.route]]`: the pool for clients asking for one of `sni` (SPEC §9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Lower-case names, or `*.` and a name (one label), each once per listener.
    pub sni: Vec<String>,
    /// The pool those clients go to.
    pub pool: String,
}

/// `[[pool.backend]]`: one apiserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Display name (defaults to the address as written).
    pub name: String,
    /// The address as written in the file (`host:port` or `IP:port`).
    pub address: String,
    /// The resolved address connections go to.
    pub addr: SocketAddr,
    /// Relative share of new connections (1 to 256).
    pub weight: u32,
}

/// How a listener treats the bytes it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes relayed untouched; TLS is between client and apiserver.
    Passthrough,
    /// TLS ends at the gateway with `[listener.tls]`; a verified TLS connection of the
    /// gateway's own carries the bytes to the backend.
    Terminate,
}

impl Choice for Mode {
    const WHAT: &'static str = "mode";
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("passthrough", Self::Passthrough),
        ("terminate", Self::Terminate),
    ];
}

impl Mode {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        self.name()
    }
}

/// `[listener.tls]`: the terminate listener's certificates and handshake rules.
#[derive(Debug, Clone)]
pub struct ListenerTlsConfig {
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Client connections that may be in their TLS handshake (backend connection included)
    /// at once; more are closed at accept (like HAProxy's `maxsslconn`).
    pub max_handshakes: u32,
    /// The only ALPN protocols accepted from clients and offered to backends; `None`: any.
    pub alpn: Option<Vec<String>>,
    /// Certificates by SNI name, the first being the default.
    pub certs: Arc<crate::tls::SniResolver>,
    /// Server configurations, one per ALPN answer, built once at load.
    pub server: Arc<crate::tls::TerminateServer>,
    /// `client_ca`: clients that present a certificate are verified against it (SPEC §10).
    pub client_ca: Option<Arc<rustls::RootCertStore>>,
    /// `require_client_cert`: clients without a certificate are refused.
    pub require_client_cert: bool,
}

/// `[listener.identity]`: the front-proxy identity mode of a terminate listener (SPEC §10).
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// What the gateway presents to the apiservers for requests of verified clients.
    pub client: crate::tls::Identity,
    /// Carries a verified client's subject CN.
    pub user_header: String,
    /// One per subject O of a verified client.
    pub group_header: String,
    /// Headers starting with this are stripped from every request.
    pub extra_header_prefix: String,
}

impl ListenerConfig {
    /// Every pool this listener sends connections to: its default, then its routes'.
    pub fn pools(&self) -> impl Iterator<Item = &str> {
        self.pool
            .as_deref()
            .into_iter()
            .chain(self.routes.iter().map(|r| r.pool.as_str()))
    }

    /// Where connections go, in one line for logs and the status page: `POOL`, or with
    /// routes `a.example,*.b.example -> POOL; otherwise POOL` (`otherwise closed` without a
    /// default).
    pub fn destination(&self) -> String {
        if self.routes.is_empty() {
            return self.pool.clone().unwrap_or_default();
        }
        let mut out: Vec<String> = self
            .routes
            .iter()
            .map(|r| format!("{} -> {}", r.sni.join(","), r.pool))
            .collect();
        out.push(match &self.pool {
            Some(p) => format!("otherwise {p}"),
            None => "otherwise closed".into(),
        });
        out.join("; ")
    }
}

/// `[[listener]]`: addresses that accept client connections for a pool (or, with routes,
/// several).
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// One or more addresses (IPv4 and IPv6); port 0 binds an ephemeral port.
    pub listen: Vec<SocketAddr>,
    /// What the listener does with the bytes.
    pub mode: Mode,
    /// The pool connections go to: all of them without routes; with routes, those whose
    /// server name no route names (or that send none). `None`: those are closed.
    pub pool: Option<String>,
    /// `[[listener.route]]`s in file order; the first match wins.
    pub routes: Vec<RouteConfig>,
    /// Time to receive the PROXY header and (passthrough with routes) the whole ClientHello.
    pub sni_timeout: Duration,
    /// Every connection starts with a PROXY protocol header carrying the client's address.
    pub proxy_protocol: bool,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Passthrough: a client that sends nothing for this long is closed before any backend
    /// is contacted (`end=client_silent`); zero turns the wait off (server-first protocols).
    pub first_byte_timeout: Duration,
    /// The names clients use to reach this listener (DNS names and IP addresses: the
    /// gateway's name, its virtual IP), which the certificate clients verify must cover
    /// (SPEC §8): the backends' for passthrough, the listener's own for terminate.
    pub names: Vec<String>,
    /// Whether connections that moved no byte either way (scanners, port probes, silent
    /// clients) write an access line; they are counted either way (HAProxy's `dontlognull`
    /// is `log_empty = false`).
    pub log_empty: bool,
    /// Connections beyond this many are accepted and closed at once.
    pub max_connections: u32,
    /// Certificates of a terminate listener.
    pub tls: Option<ListenerTlsConfig>,
    /// Front-proxy identity mode (terminate listeners only).
    pub identity: Option<IdentityConfig>,
}
