//! The configuration file: parsing, validation and the typed result.
//!
//! Two layers, as in SPEC §2. `File*` structs mirror the TOML exactly (strings with spans,
//! `Option`s, `deny_unknown_fields`); [`load`] turns them into a [`Config`] of typed values
//! (`SocketAddr`, `Duration`, `NonZeroU32`) or into a list of [`ConfigError`]s, each naming
//! the file, the line and the key. `apilb check`, `apilb run` and (later) reload all go
//! through [`load`], so what `check` accepts is exactly what `run` runs. Nothing here binds a
//! socket or starts a task; resolving backend host names is the only I/O besides reading the
//! file.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

// === Defaults (SPEC §2), in one place ===

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
const DEFAULT_MAX_CONNECTIONS: u32 = 50_000;
const DEFAULT_WEIGHT: u32 = 1;
/// Weights are small integers so that least-conn can compare `active * weight` products
/// without overflow and so that a typo like `weight = 1000000` is caught.
const MAX_WEIGHT: u32 = 256;

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
    /// Where it was read from, for messages and (later) for watching.
    pub source: PathBuf,
    /// The admin listener, when configured.
    pub admin: Option<AdminConfig>,
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
    /// Likely operator mistakes that do not stop the gateway: printed by `check`, logged by
    /// `run` and reload.
    pub warnings: Vec<ConfigError>,
    /// A short digest of the text this config was parsed from (`apilb_config_info{hash}`).
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

impl Balance {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeastConn => "least-conn",
            Self::RoundRobin => "round-robin",
            Self::RandomTwo => "random-two",
        }
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

impl CheckKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Https => "https",
        }
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
            path: "/readyz".into(),
            expect_status: vec![200],
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
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
    pub client: Arc<rustls::ClientConfig>,
    /// TLS sessions of those connections, per backend.
    pub sessions: Arc<crate::tls::SessionStores>,
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

impl Mode {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::Terminate => "terminate",
        }
    }
}

/// `[listener.tls]`: the terminate listener's certificates and handshake rules.
#[derive(Debug, Clone)]
pub struct ListenerTlsConfig {
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// The only ALPN protocols accepted from clients and offered to backends; `None`: any.
    pub alpn: Option<Vec<String>>,
    /// Certificates by SNI name, the first being the default.
    pub certs: Arc<crate::tls::SniResolver>,
    /// Server configurations, one per ALPN answer, built once at load.
    pub server: Arc<crate::tls::TerminateServer>,
}

/// `[[listener]]`: addresses that accept client connections for one pool.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// One or more addresses (IPv4 and IPv6); port 0 binds an ephemeral port.
    pub listen: Vec<SocketAddr>,
    /// What the listener does with the bytes.
    pub mode: Mode,
    /// Name of the pool connections go to.
    pub pool: String,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connections beyond this many are accepted and closed at once.
    pub max_connections: u32,
    /// Certificates of a terminate listener.
    pub tls: Option<ListenerTlsConfig>,
}

// === File layer ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    admin: Option<Spanned<FileAdmin>>,
    #[serde(default)]
    pool: Vec<Spanned<FilePool>>,
    #[serde(default)]
    listener: Vec<Spanned<FileListener>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePool {
    name: Spanned<String>,
    balance: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    connect_attempts: Option<Spanned<i64>>,
    when_all_down: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    #[serde(default)]
    backend: Vec<Spanned<FileBackend>>,
    // Keys of features that are specified but not built yet: accepted by the parser only so
    // that the error can say "not supported yet" instead of "unknown field".
    slow_start: Option<Spanned<String>>,
    health: Option<Spanned<FileHealth>>,
    tls: Option<Spanned<FilePoolTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealth {
    check: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    expect_status: Option<Spanned<Vec<i64>>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePoolTls {
    ca: Spanned<String>,
    server_name: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    address: Spanned<String>,
    name: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    name: Spanned<String>,
    listen: Spanned<OneOrMany>,
    mode: Option<Spanned<String>>,
    pool: Spanned<String>,
    idle_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    tls: Option<Spanned<FileListenerTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListenerTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    handshake_timeout: Option<Spanned<String>>,
    alpn: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    sni: Vec<Spanned<FileSni>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSni {
    names: Spanned<Vec<String>>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

// === Loading ===

/// Reads, parses and validates a configuration file.
///
/// # Errors
/// Every problem found, each with file, line and key; an unreadable file is one error.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            key: String::new(),
            message: format!("cannot read config file: {e}"),
        }])
    })?;
    parse(path, &text)
}

/// Parses and validates configuration text; `path` is only used in messages.
///
/// # Errors
/// Every problem found, each with file, line and key.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        file: path,
        text,
        errors: Vec::new(),
        expired: Vec::new(),
        certificates: Vec::new(),
        files: Vec::new(),
        warnings: Vec::new(),
        scope: String::new(),
    };
    let file: FileConfig = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            return Err(ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line,
                column,
                key: String::new(),
                message: e.message().trim().to_string(),
            }]));
        }
    };
    let config = v.config(file);
    if v.errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(v.errors))
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

/// Collects every error instead of stopping at the first, so one `check` run lists all of them.
struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
    expired: Vec<ConfigError>,
    certificates: Vec<CertificateInfo>,
    files: Vec<PathBuf>,
    warnings: Vec<ConfigError>,
    /// `pool/NAME` or `listener/NAME` while validating that object: the prefix of
    /// certificate sources.
    scope: String,
}

impl Validator<'_> {
    fn warn(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.warnings.push(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line),
            column: Some(column),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Warns about a private key that every user of the machine can read.
    fn key_permissions(&mut self, path: &Path, span: Range<usize>, key: &str) {
        #[cfg(unix)]
        if let Ok(m) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o004 != 0 {
                self.warn(
                    span,
                    key,
                    format!(
                        "private key {} is readable by every user (mode {mode:04o}): chmod 0600, or 0640 with group apilb",
                        path.display()
                    ),
                );
            }
        }
    }

    fn error(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line),
            column: Some(column),
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, v: Option<&Spanned<String>>, key: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if d.is_zero() => {
                self.error(v.span(), key, "expected a duration above zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(
                    v.span(),
                    key,
                    format!(
                        "invalid duration {:?} ({e}): expected a number with a unit, like \"500ms\", \"2s\" or \"1h\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn int_in(
        &mut self,
        v: Option<&Spanned<i64>>,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        default: u32,
    ) -> u32 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if range.contains(&n) {
            u32::try_from(n).unwrap_or(default)
        } else {
            self.error(
                v.span(),
                key,
                format!(
                    "{n} is out of range: expected {} to {}",
                    range.start(),
                    range.end()
                ),
            );
            default
        }
    }

    fn listen_addr(&mut self, s: &str, span: Range<usize>, key: &str) -> Option<SocketAddr> {
        match s.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let hint = port_hint(s).unwrap_or(
                    "expected IP:port, like \"0.0.0.0:6443\" or \"[::]:6443\" (host names are not allowed here)",
                );
                self.error(span, key, format!("invalid listen address {s:?}: {hint}"));
                None
            }
        }
    }

    fn config(&mut self, file: FileConfig) -> Config {
        let admin = file.admin.and_then(|a| {
            let a = a.into_inner();
            let listen = self.listen_addr(a.listen.get_ref(), a.listen.span(), "admin.listen")?;
            if !listen.ip().is_loopback() {
                self.warn(
                    a.listen.span(),
                    "admin.listen",
                    format!("the admin server on {listen} is reachable from the network: it shows the gateway's backends and certificates; prefer 127.0.0.1, or a management network behind a firewall"),
                );
            }
            Some(AdminConfig { listen })
        });

        let mut pools = Vec::new();
        let mut pool_names: HashMap<String, usize> = HashMap::new();
        let mut pools_with_tls: HashSet<String> = HashSet::new();
        for (i, p) in file.pool.into_iter().enumerate() {
            let pool = self.pool(i, p.into_inner());
            if let Some(pool) = pool {
                if pool_names.insert(pool.0.name.clone(), i).is_some() {
                    self.error(
                        pool.1.clone(),
                        format!("pool[{i}].name"),
                        format!(
                            "duplicate pool name {:?}: pool names must be unique",
                            pool.0.name
                        ),
                    );
                }
                if pool.0.tls.is_some() {
                    pools_with_tls.insert(pool.0.name.clone());
                }
                pools.push(Arc::new(pool.0));
            }
        }

        let mut listeners = Vec::new();
        let mut listener_names = HashSet::new();
        let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
        if let Some(admin) = &admin {
            addrs.insert(admin.listen, "admin".to_string());
        }
        if file.listener.is_empty() {
            self.errors.push(ConfigError {
                file: self.file.to_path_buf(),
                line: None,
                column: None,
                key: "listener".into(),
                message: "no [[listener]] is configured: expected at least one".into(),
            });
        }
        for (i, l) in file.listener.into_iter().enumerate() {
            let l = l.into_inner();
            let name = l.name.get_ref().trim().to_string();
            self.scope = format!("listener/{name}");
            if name.is_empty() {
                self.error(
                    l.name.span(),
                    format!("listener[{i}].name"),
                    "expected a non-empty name",
                );
            } else if !listener_names.insert(name.clone()) {
                self.error(
                    l.name.span(),
                    format!("listener[{i}].name"),
                    format!("duplicate listener name {name:?}: listener names must be unique"),
                );
            }
            let key = format!("listener[{i}].listen");
            let list = match l.listen.get_ref() {
                OneOrMany::One(s) => vec![s.clone()],
                OneOrMany::Many(v) => v.clone(),
            };
            if list.is_empty() {
                self.error(l.listen.span(), &key, "expected at least one address");
            }
            let mut listen = Vec::new();
            for s in &list {
                if let Some(a) = self.listen_addr(s, l.listen.span(), &key) {
                    // Port 0 means "any free port" and can never collide.
                    if a.port() != 0 {
                        if let Some(other) = addrs.insert(a, name.clone()) {
                            self.error(
                                l.listen.span(),
                                &key,
                                format!("address {a} is already used by {other:?}: every listener (and the admin server) needs its own address"),
                            );
                        }
                    }
                    listen.push(a);
                }
            }
            let mode = match l.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                None | Some(("passthrough", _)) => Mode::Passthrough,
                Some(("terminate", _)) => Mode::Terminate,
                Some((other, span)) => {
                    self.error(
                        span,
                        format!("listener[{i}].mode"),
                        format!(
                            "unknown mode {other:?}: expected \"passthrough\" or \"terminate\""
                        ),
                    );
                    Mode::Passthrough
                }
            };
            let tls = match (mode, l.tls) {
                (Mode::Terminate, Some(t)) => self.listener_tls(i, t),
                (Mode::Terminate, None) => {
                    let span = l.mode.as_ref().map_or(l.name.span(), Spanned::span);
                    self.error(
                        span,
                        format!("listener[{i}].tls"),
                        "mode = \"terminate\" needs [listener.tls] with cert and key",
                    );
                    None
                }
                (Mode::Passthrough, Some(t)) => {
                    self.error(t.span(), format!("listener[{i}].tls"), "[listener.tls] is only for mode = \"terminate\": a passthrough listener never sees TLS");
                    None
                }
                (Mode::Passthrough, None) => None,
            };
            if mode == Mode::Terminate
                && pool_names.contains_key(l.pool.get_ref())
                && !pools_with_tls.contains(l.pool.get_ref())
            {
                self.error(l.pool.span(), format!("listener[{i}].pool"), format!(
                    "a terminate listener opens its own TLS connections to the backends, so pool {:?} needs [pool.tls] with the CA that signed them",
                    l.pool.get_ref()
                ));
            }
            let pool = l.pool.get_ref().clone();
            if !pool_names.contains_key(&pool) {
                let known: Vec<&str> = pool_names.keys().map(String::as_str).collect();
                self.error(
                    l.pool.span(),
                    format!("listener[{i}].pool"),
                    format!("unknown pool {pool:?}: expected one of the [[pool]] names {known:?}"),
                );
            }
            let idle_timeout = self.duration(
                l.idle_timeout.as_ref(),
                &format!("listener[{i}].idle_timeout"),
                DEFAULT_IDLE_TIMEOUT,
            );
            if idle_timeout < Duration::from_secs(300) {
                if let Some(v) = &l.idle_timeout {
                    self.warn(
                        v.span(),
                        format!("listener[{i}].idle_timeout"),
                        format!(
                            "idle_timeout {} is under 5 minutes: quiet watches and `kubectl logs -f` will be cut",
                            humantime::format_duration(idle_timeout)
                        ),
                    );
                }
            }
            let max_connections = self.int_in(
                l.max_connections.as_ref(),
                &format!("listener[{i}].max_connections"),
                1..=10_000_000,
                DEFAULT_MAX_CONNECTIONS,
            );
            listeners.push(ListenerConfig {
                name,
                listen,
                mode,
                pool,
                idle_timeout,
                max_connections,
                tls,
            });
        }

        Config {
            source: self.file.to_path_buf(),
            admin,
            pools,
            listeners,
            expired: std::mem::take(&mut self.expired),
            certificates: std::mem::take(&mut self.certificates),
            files: std::mem::take(&mut self.files),
            warnings: std::mem::take(&mut self.warnings),
            hash: {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                self.text.hash(&mut h);
                format!("{:016x}", h.finish())
            },
        }
    }

    /// Validates one pool; returns it with the span of its name (for duplicate checks).
    fn pool(&mut self, i: usize, p: FilePool) -> Option<(PoolConfig, Range<usize>)> {
        let k = |key: &str| format!("pool[{i}].{key}");
        let name = p.name.get_ref().trim().to_string();
        if name.is_empty() {
            self.error(p.name.span(), k("name"), "expected a non-empty name");
        }
        self.scope = format!("pool/{name}");
        let balance = match p.balance.as_ref().map(|b| (b.get_ref().as_str(), b.span())) {
            None | Some(("least-conn", _)) => Balance::LeastConn,
            Some(("round-robin", _)) => Balance::RoundRobin,
            Some(("random-two", _)) => Balance::RandomTwo,
            Some((other, span)) => {
                self.error(
                    span,
                    k("balance"),
                    format!("unknown balance {other:?}: expected \"least-conn\", \"round-robin\" or \"random-two\""),
                );
                Balance::LeastConn
            }
        };
        let when_all_down = match p
            .when_all_down
            .as_ref()
            .map(|b| (b.get_ref().as_str(), b.span()))
        {
            None | Some(("fail-open", _)) => WhenAllDown::FailOpen,
            Some(("reject", _)) => WhenAllDown::Reject,
            Some((other, span)) => {
                self.error(
                    span,
                    k("when_all_down"),
                    format!("unknown value {other:?}: expected \"fail-open\" or \"reject\""),
                );
                WhenAllDown::FailOpen
            }
        };
        let connect_timeout = self.duration(
            p.connect_timeout.as_ref(),
            &k("connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let drain_timeout = self.duration(
            p.drain_timeout.as_ref(),
            &k("drain_timeout"),
            DEFAULT_DRAIN_TIMEOUT,
        );
        let attempts = self.int_in(
            p.connect_attempts.as_ref(),
            &k("connect_attempts"),
            1..=100,
            DEFAULT_CONNECT_ATTEMPTS,
        );
        let connect_attempts = NonZeroU32::new(attempts).unwrap_or(NonZeroU32::MIN);
        // "0s" is the documented way to turn the ramp off, so zero is allowed here.
        let slow_start = match &p.slow_start {
            Some(v) if humantime::parse_duration(v.get_ref().trim()).is_ok_and(|d| d.is_zero()) => {
                Duration::ZERO
            }
            v => self.duration(v.as_ref(), &k("slow_start"), Duration::ZERO),
        };
        let tls = p.tls.map(|t| self.pool_tls(i, t));
        let health = self.health(i, p.health, tls.as_ref());
        let tls = tls.flatten();

        if p.backend.is_empty() {
            self.error(
                p.name.span(),
                k("backend"),
                format!("pool {name:?} has no backends: expected at least one [[pool.backend]]"),
            );
        }
        let mut backends = Vec::new();
        let mut seen_addr = HashSet::new();
        let mut seen_name = HashSet::new();
        for (j, b) in p.backend.into_iter().enumerate() {
            let b = b.into_inner();
            let bk = |key: &str| format!("pool[{i}].backend[{j}].{key}");
            let address = b.address.get_ref().trim().to_string();
            let Some(addr) = self.resolve(&address, b.address.span(), &bk("address")) else {
                continue;
            };
            if !seen_addr.insert(addr) {
                self.error(
                    b.address.span(),
                    bk("address"),
                    format!("duplicate backend address {address:?} in pool {name:?}"),
                );
            }
            let bname = b
                .name
                .as_ref()
                .map(|n| n.get_ref().trim().to_string())
                .unwrap_or_else(|| address.clone());
            if !seen_name.insert(bname.clone()) {
                let span = b.name.as_ref().map_or(b.address.span(), Spanned::span);
                self.error(
                    span,
                    bk("name"),
                    format!("duplicate backend name {bname:?} in pool {name:?}"),
                );
            }
            let weight = self.int_in(
                b.weight.as_ref(),
                &bk("weight"),
                1..=i64::from(MAX_WEIGHT),
                DEFAULT_WEIGHT,
            );
            backends.push(BackendConfig {
                name: bname,
                address,
                addr,
                weight,
            });
        }
        Some((
            PoolConfig {
                name,
                balance,
                connect_timeout,
                connect_attempts,
                when_all_down,
                drain_timeout,
                slow_start,
                backends,
                health,
                tls,
            },
            p.name.span(),
        ))
    }

    /// A path from the config, relative to the config file's folder.
    fn path(&self, s: &str) -> PathBuf {
        let p = Path::new(s.trim());
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.file.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// Reads a file named by the config, reporting a failure against its key.
    fn read(&mut self, v: &Spanned<String>, key: &str) -> Option<(PathBuf, Vec<u8>)> {
        let path = self.path(v.get_ref());
        if !self.files.contains(&path) {
            self.files.push(path.clone());
        }
        match std::fs::read(&path) {
            Ok(b) => Some((path, b)),
            Err(e) => {
                self.error(
                    v.span(),
                    key,
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    }

    /// `[listener.tls]` of listener `i`.
    fn listener_tls(&mut self, i: usize, t: Spanned<FileListenerTls>) -> Option<ListenerTlsConfig> {
        let t = t.into_inner();
        let k = |key: &str| format!("listener[{i}].tls.{key}");
        let handshake_timeout = self.duration(
            t.handshake_timeout.as_ref(),
            &k("handshake_timeout"),
            Duration::from_secs(10),
        );
        let alpn = t.alpn.as_ref().map(|a| {
            for p in a.get_ref() {
                if p != "h2" && p != "http/1.1" {
                    self.error(
                        a.span(),
                        k("alpn"),
                        format!("unknown protocol {p:?}: expected \"h2\" and/or \"http/1.1\""),
                    );
                }
            }
            if a.get_ref().is_empty() {
                self.error(
                    a.span(),
                    k("alpn"),
                    "expected at least one protocol; leave alpn out to accept any",
                );
            }
            a.get_ref().clone()
        });
        let source = format!("{}/cert", self.scope);
        let default = self.certified_key(&t.cert, &t.key, &k("cert"), &k("key"), &source);
        let mut by_name = Vec::new();
        for (j, sni) in t.sni.iter().enumerate() {
            let sni = sni.get_ref();
            let sk = |key: &str| format!("listener[{i}].tls.sni[{j}].{key}");
            if sni.names.get_ref().is_empty() {
                self.error(sni.names.span(), sk("names"), "expected at least one name");
            }
            let source = format!("{}/sni/{j}/cert", self.scope);
            if let Some(ck) =
                self.certified_key(&sni.cert, &sni.key, &sk("cert"), &sk("key"), &source)
            {
                for n in sni.names.get_ref() {
                    let covered = ck
                        .cert
                        .first()
                        .is_some_and(|c| crate::tls::covers(c.as_ref(), n.trim()));
                    if !covered {
                        self.warn(
                            sni.names.span(),
                            sk("names"),
                            format!("{n:?} is not among the certificate's names (SANs): clients asking for it will reject the handshake"),
                        );
                    }
                    by_name.push((n.trim().to_ascii_lowercase(), ck.clone()));
                }
            }
        }
        let certs = Arc::new(crate::tls::SniResolver::new(default?, by_name));
        let server = match crate::tls::TerminateServer::new(certs.clone()) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.error(t.cert.span(), k("cert"), e.to_string());
                return None;
            }
        };
        Some(ListenerTlsConfig {
            handshake_timeout,
            alpn,
            certs,
            server,
        })
    }

    /// A serving certificate chain and key, checked to match.
    fn certified_key(
        &mut self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
        cert_key: &str,
        key_key: &str,
        source: &str,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.pem_pair(cert, key, cert_key, key_key, source, |chain, pk| {
            rustls::sign::CertifiedKey::from_der(chain, pk, &crate::tls::provider()).map(Arc::new)
        })
    }

    /// Reads a certificate chain and its key (checking the key file's permissions and
    /// recording the chain's expiry at `source`), then `build`s them into what the caller
    /// needs; every failure is reported against the key that names the file.
    fn pem_pair<T, E: std::fmt::Display>(
        &mut self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
        cert_key: &str,
        key_key: &str,
        source: &str,
        build: impl FnOnce(
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ) -> Result<T, E>,
    ) -> Option<T> {
        let (cert_path, cert_pem) = self.read(cert, cert_key)?;
        let (key_path, key_pem) = self.read(key, key_key)?;
        self.key_permissions(&key_path, key.span(), key_key);
        let chain = match crate::tls::certs_from_pem(&cert_pem, &cert_path.display().to_string()) {
            Ok(c) => c,
            Err(e) => {
                self.error(cert.span(), cert_key, e.to_string());
                return None;
            }
        };
        self.expiry(&chain, cert.span(), cert_key, &cert_path, source, false);
        let pk = match crate::tls::key_from_pem(&key_pem, &key_path.display().to_string()) {
            Ok(k) => k,
            Err(e) => {
                self.error(key.span(), key_key, e.to_string());
                return None;
            }
        };
        match build(chain, pk) {
            Ok(built) => Some(built),
            Err(e) => {
                self.error(
                    key.span(),
                    key_key,
                    format!("{} and {}: {e}", cert_path.display(), key_path.display()),
                );
                None
            }
        }
    }

    /// Notes every certificate of `certs` that has expired, against `key`.
    /// Records the certificates at `source` (a CA bundle: each as `source/N`; a chain: the
    /// leaf only) and notes every expired one.
    fn expiry(
        &mut self,
        certs: &[rustls::pki_types::CertificateDer<'_>],
        span: Range<usize>,
        key: &str,
        path: &Path,
        source: &str,
        bundle: bool,
    ) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        for (n, c) in certs.iter().enumerate() {
            if let Some((subject, not_after)) = crate::tls::subject_and_expiry(c.as_ref()) {
                if bundle || n == 0 {
                    self.certificates.push(CertificateInfo {
                        source: if bundle {
                            format!("{source}/{n}")
                        } else {
                            source.to_string()
                        },
                        subject: subject.clone(),
                        not_after,
                    });
                }
                if not_after >= now && not_after - now < 30 * 86_400 {
                    let days = (not_after - now) / 86_400;
                    let msg = format!(
                        "certificate {n} of {} ({subject}) expires in {days} days: rotate it soon",
                        path.display()
                    );
                    self.warn(span.clone(), key, msg);
                }
                if not_after < now {
                    let when = humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH
                            + Duration::from_secs(u64::try_from(not_after).unwrap_or(0)),
                    );
                    let (line, column) = line_col(self.text, span.start);
                    self.expired.push(ConfigError {
                        file: self.file.to_path_buf(),
                        line: Some(line),
                        column: Some(column),
                        key: key.to_string(),
                        message: format!(
                            "certificate {n} of {} ({subject}) expired at {when}",
                            path.display()
                        ),
                    });
                }
            }
        }
    }

    /// `[pool.tls]`; `Some(None)` when present but broken (already reported).
    fn pool_tls(&mut self, i: usize, t: Spanned<FilePoolTls>) -> Option<PoolTlsConfig> {
        let t = t.into_inner();
        let key = format!("pool[{i}].tls.ca");
        let (ca, pem) = self.read(&t.ca, &key)?;
        if let Ok(certs) = crate::tls::certs_from_pem(&pem, &ca.display().to_string()) {
            let source = format!("{}/ca", self.scope);
            self.expiry(&certs, t.ca.span(), &key, &ca, &source, true);
        }
        let roots = match crate::tls::roots_from_pem(&pem, &ca.display().to_string()) {
            Ok(r) => r,
            Err(e) => {
                self.error(
                    t.ca.span(),
                    &key,
                    format!("{e}: expected a PEM bundle of one or more CA certificates"),
                );
                return None;
            }
        };
        let server_name = match t.server_name {
            Some(n) => {
                let name = n.get_ref().trim().to_string();
                if rustls::pki_types::ServerName::try_from(name.clone()).is_err() {
                    self.error(
                        n.span(),
                        format!("pool[{i}].tls.server_name"),
                        format!("{name:?} is not a valid DNS name or IP address"),
                    );
                }
                Some(name)
            }
            None => None,
        };
        let roots = Arc::new(roots);
        let client = match crate::tls::client_config(roots.clone(), None, false) {
            Ok(c) => c,
            Err(e) => {
                self.error(t.ca.span(), &key, e.to_string());
                return None;
            }
        };
        Some(PoolTlsConfig {
            roots,
            server_name,
            client,
            sessions: Arc::default(),
        })
    }

    fn health(
        &mut self,
        i: usize,
        h: Option<Spanned<FileHealth>>,
        tls: Option<&Option<PoolTlsConfig>>,
    ) -> HealthConfig {
        let d = HealthConfig::default();
        let Some(h) = h else { return d };
        let span = h.span();
        let h = h.into_inner();
        let k = |key: &str| format!("pool[{i}].health.{key}");
        let check = match h.check.as_ref().map(|c| (c.get_ref().as_str(), c.span())) {
            None | Some(("tcp", _)) => CheckKind::Tcp,
            Some(("tls", _)) => CheckKind::Tls,
            Some(("https", _)) => CheckKind::Https,
            Some((other, span)) => {
                self.error(
                    span,
                    k("check"),
                    format!("unknown check {other:?}: expected \"tcp\", \"tls\" or \"https\""),
                );
                CheckKind::Tcp
            }
        };
        let interval = self.duration(h.interval.as_ref(), &k("interval"), d.interval);
        let timeout = self.duration(h.timeout.as_ref(), &k("timeout"), d.timeout);
        if timeout >= interval {
            let span = h
                .timeout
                .as_ref()
                .or(h.interval.as_ref())
                .map_or(span.clone(), Spanned::span);
            self.error(
                span,
                k("timeout"),
                format!(
                    "timeout ({}) must be shorter than interval ({})",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            );
        }
        let rise = self.int_in(h.rise.as_ref(), &k("rise"), 1..=100, d.rise);
        let fall = self.int_in(h.fall.as_ref(), &k("fall"), 1..=100, d.fall);
        let path = match &h.path {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.error(
                    p.span(),
                    k("path"),
                    format!("{:?} must start with /", p.get_ref()),
                );
                d.path.clone()
            }
            Some(p) => p.get_ref().clone(),
            None => d.path.clone(),
        };
        let expect_status = match &h.expect_status {
            Some(v) if v.get_ref().is_empty() => {
                self.error(
                    v.span(),
                    k("expect_status"),
                    "expected at least one HTTP status",
                );
                d.expect_status
            }
            Some(v) => v
                .get_ref()
                .iter()
                .filter_map(|&s| match u16::try_from(s) {
                    Ok(s) if (100..=599).contains(&s) => Some(s),
                    _ => {
                        self.error(
                            v.span(),
                            k("expect_status"),
                            format!("{s} is not an HTTP status: expected 100 to 599"),
                        );
                        None
                    }
                })
                .collect(),
            None => d.expect_status,
        };
        if check == CheckKind::Tcp && (h.path.is_some() || h.expect_status.is_some()) {
            self.error(
                span.clone(),
                k("check"),
                "path and expect_status apply to https checks only: set check = \"https\"",
            );
        }
        let pool_tls = match tls {
            Some(Some(t)) => Some(t),
            Some(None) => None, // broken [pool.tls], already reported
            None => {
                if check != CheckKind::Tcp {
                    self.error(span.clone(), k("check"), format!(
                        "check = \"{}\" verifies the backends' certificates and needs [pool.tls] with ca",
                        check.as_str()
                    ));
                }
                None
            }
        };
        let identity = match (&h.client_cert, &h.client_key) {
            (Some(c), Some(key)) => self.identity(c, key, &k("client_cert"), &k("client_key")),
            (Some(c), None) => {
                self.error(c.span(), k("client_key"), "client_cert needs client_key");
                None
            }
            (None, Some(key)) => {
                self.error(key.span(), k("client_cert"), "client_key needs client_cert");
                None
            }
            (None, None) => None,
        };
        if identity.is_some() && check == CheckKind::Tcp {
            self.error(
                span.clone(),
                k("client_cert"),
                "a client certificate is only used by tls and https checks",
            );
        }
        let tls = match (check, pool_tls) {
            (CheckKind::Tls | CheckKind::Https, Some(t)) => {
                match crate::tls::client_config(
                    t.roots.clone(),
                    identity,
                    check == CheckKind::Https,
                ) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        self.error(span, k("client_cert"), e.to_string());
                        None
                    }
                }
            }
            _ => None,
        };
        HealthConfig {
            check,
            path,
            expect_status,
            interval,
            timeout,
            rise,
            fall,
            tls,
        }
    }

    /// Loads a certificate and key pair and checks that they belong together.
    fn identity(
        &mut self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
        cert_key: &str,
        key_key: &str,
    ) -> Option<crate::tls::Identity> {
        let source = format!("{}/health_client_cert", self.scope);
        self.pem_pair(
            cert,
            key,
            cert_key,
            key_key,
            &source,
            crate::tls::Identity::new,
        )
    }

    /// Resolves `IP:port` or `host:port` once, at load (and reload) time.
    fn resolve(&mut self, s: &str, span: Range<usize>, key: &str) -> Option<SocketAddr> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                self.error(span, key, format!("invalid backend address {s:?}: port 0 cannot be connected to; expected 1 to 65535"));
                return None;
            }
            return Some(a);
        }
        if let Some(hint) = port_hint(s) {
            self.error(span, key, format!("invalid backend address {s:?}: {hint}"));
            return None;
        }
        match s.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => Some(a),
                None => {
                    self.error(
                        span,
                        key,
                        format!("cannot resolve {s:?}: no addresses found"),
                    );
                    None
                }
            },
            Err(e) => {
                self.error(
                    span,
                    key,
                    format!("cannot resolve {s:?}: {e}; expected IP:port or host:port"),
                );
                None
            }
        }
    }
}

/// Explains a bad or missing port, the most common address typo.
fn port_hint(s: &str) -> Option<&'static str> {
    let Some((_, port)) = s.rsplit_once(':') else {
        return Some("expected IP:port or host:port (the port is missing)");
    };
    match port.parse::<u64>() {
        Ok(p) if p > 65_535 => Some("port out of range: expected 1 to 65535"),
        Ok(_) => None,
        Err(_) => Some("the port is not a number: expected 1 to 65535"),
    }
}

#[cfg(test)]
mod tests;
