//! `apilb probe`: preflight every backend and certificate against the names clients use,
//! without starting the gateway (SPEC §8).
//!
//! Every backend of every pool is probed at once, each step bounded by the timeout, through
//! the health checks' own steps (`health::probe::{reach, handshake, get_status}`): reachable
//! or why not; the chain verified against `[pool.tls]` (in the checks' words); the leaf's
//! subject, issuer, SANs and expiry (read without verification when verification failed, so
//! the report can say what is wrong with it); which listener names it does not cover; the
//! TLS version and which of h2 and http/1.1 it accepts; `GET [pool.health] path` with the
//! health identity. Then per pool: do all backends present the same SANs. Terminate
//! listeners' own certificates are judged against their names too. The verdict: 0 nothing
//! wrong, 2 a problem found, 1 no backend reachable at all.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::ServerName;
use serde::Serialize;

use crate::config::{Config, Mode, PoolConfig};
use crate::health::probe::{get_status, handshake, host_header, judge_status, leaf_of, reach};
use crate::tls::Sans;

/// A certificate expiring sooner than this is a problem worth a line.
const SOON: i64 = 30 * 86_400;

/// What the probe found, as `--output json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// One entry per pool, in config order.
    pub pools: Vec<PoolReport>,
    /// Terminate listeners' certificates against their names.
    pub listeners: Vec<ListenerReport>,
    /// Every problem in one line each (empty: nothing wrong).
    pub problems: Vec<String>,
}

/// One pool.
#[derive(Debug, Serialize)]
pub struct PoolReport {
    /// The pool's name.
    pub name: String,
    /// The names its backends' certificates must cover (its passthrough listeners').
    pub names: Vec<String>,
    /// Whether every reachable backend presents the same SANs. Information only: kubeadm,
    /// k3s and RKE2 give each apiserver its own node name and address.
    pub same_sans: bool,
    /// Names (the listeners' and `server_name`) that some backends' certificates cover and
    /// others' do not: clients using them would fail on some backends only. A problem.
    pub disagree_on: Vec<String>,
    /// One entry per backend.
    pub backends: Vec<BackendReport>,
}

/// One backend.
#[derive(Debug, Serialize)]
pub struct BackendReport {
    /// Its name.
    pub name: String,
    /// Its address as configured.
    pub address: String,
    /// `null` when reachable, else why not.
    pub unreachable: Option<String>,
    /// The TLS version of the verified (or, failing that, the reading) handshake.
    pub tls_version: Option<String>,
    /// Which of `h2` and `http/1.1` it accepts.
    pub alpn: Vec<String>,
    /// `null` when the chain verified against `[pool.tls]`, else why not.
    pub chain_error: Option<String>,
    /// The leaf certificate, when one was seen.
    pub certificate: Option<CertReport>,
    /// Listener names the certificate does not cover.
    pub missing_names: Vec<String>,
    /// `GET [pool.health] path` with the health identity.
    pub readiness: Option<Readiness>,
}

impl BackendReport {
    /// A backend nothing is known of yet.
    fn new(name: &str, address: &str) -> Self {
        Self {
            name: name.to_string(),
            address: address.to_string(),
            unreachable: None,
            tls_version: None,
            alpn: Vec::new(),
            chain_error: None,
            certificate: None,
            missing_names: Vec::new(),
            readiness: None,
        }
    }
}

/// A certificate's facts.
#[derive(Debug, Serialize)]
pub struct CertReport {
    /// Subject.
    pub subject: String,
    /// Issuer.
    pub issuer: String,
    /// SANs: DNS names, then IP addresses.
    pub sans: Vec<String>,
    /// notAfter, RFC 3339.
    pub not_after: String,
    /// Whole days until notAfter (negative: expired).
    pub days_left: i64,
}

/// The readiness request.
#[derive(Debug, Serialize)]
pub struct Readiness {
    /// The path asked for.
    pub path: String,
    /// The status, when an answer came.
    pub status: Option<u16>,
    /// How long it took.
    pub latency_ms: u64,
    /// `null` when the status passes `expect_status`, else why not (with the 401/403 hint).
    pub error: Option<String>,
}

/// A terminate listener.
#[derive(Debug, Serialize)]
pub struct ListenerReport {
    /// Its name.
    pub name: String,
    /// Its names.
    pub names: Vec<String>,
    /// Names its certificate (or the SNI certificate for the name) does not cover.
    pub missing_names: Vec<String>,
}

impl Report {
    /// The exit code: 0 nothing wrong, 2 a problem, 1 no backend reachable at all.
    pub fn exit_code(&self) -> u8 {
        let backends = self.pools.iter().flat_map(|p| &p.backends);
        if backends.clone().count() > 0 && backends.clone().all(|b| b.unreachable.is_some()) {
            1
        } else if self.problems.is_empty() {
            0
        } else {
            2
        }
    }
}

/// Probes everything `cfg` names, each step within `timeout`.
pub async fn run(cfg: &Config, timeout: Duration) -> Report {
    let mut tasks = Vec::new();
    for pool in &cfg.pools {
        let names = cfg.passthrough_names(&pool.name);
        for (i, _) in pool.backends.iter().enumerate() {
            let (pool, names) = (pool.clone(), names.clone());
            tasks.push(tokio::spawn(async move {
                backend(&pool, i, &names, timeout).await
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.ok());
    }
    let mut results = results.into_iter();
    let mut problems = Vec::new();
    let mut pools = Vec::new();
    for pool in &cfg.pools {
        let names = cfg.passthrough_names(&pool.name);
        let backends: Vec<BackendReport> = pool
            .backends
            .iter()
            .map(|b| {
                results.next().flatten().unwrap_or_else(|| {
                    let mut r = BackendReport::new(&b.name, &b.address);
                    r.unreachable = Some("the probe failed".into());
                    r
                })
            })
            .collect();
        let sans: Vec<&Vec<String>> = backends
            .iter()
            .filter_map(|b| b.certificate.as_ref().map(|c| &c.sans))
            .collect();
        let same_sans = sans.windows(2).all(|w| {
            let (mut a, mut b) = (w[0].clone(), w[1].clone());
            a.sort();
            b.sort();
            a == b
        });
        // The names that matter to clients: a difference there fails clients on some
        // backends only; a difference elsewhere (each node's own name and address) is normal.
        let mut matter = names.clone();
        if let Some(n) = pool.tls.as_ref().and_then(|t| t.server_name.clone()) {
            if !matter.contains(&n) {
                matter.push(n);
            }
        }
        let seen: Vec<Sans> = backends
            .iter()
            .filter_map(|b| b.certificate.as_ref())
            .map(|c| sans_from(&c.sans))
            .collect();
        let disagree_on: Vec<String> = matter
            .iter()
            .filter(|n| {
                let covered = seen.iter().filter(|s| s.cover(n)).count();
                covered > 0 && covered < seen.len()
            })
            .cloned()
            .collect();
        for b in &backends {
            let at = format!("pool {} backend {}", pool.name, b.name);
            if let Some(e) = &b.unreachable {
                problems.push(format!("{at}: unreachable: {e}"));
                continue;
            }
            if let Some(e) = &b.chain_error {
                problems.push(format!("{at}: chain: {e}"));
            }
            if let Some(c) = &b.certificate {
                if c.days_left < 0 {
                    problems.push(format!("{at}: certificate expired at {}", c.not_after));
                } else if c.days_left * 86_400 < SOON {
                    problems.push(format!(
                        "{at}: certificate expires in {} days ({})",
                        c.days_left, c.not_after
                    ));
                }
            }
            if !b.missing_names.is_empty() {
                problems.push(format!(
                    "{at}: certificate does not cover {}: add them to its SANs",
                    b.missing_names.join(", ")
                ));
            }
            if let Some(Readiness {
                error: Some(e),
                path,
                ..
            }) = &b.readiness
            {
                problems.push(format!("{at}: GET {path}: {e}"));
            }
        }
        if !disagree_on.is_empty() {
            problems.push(format!(
                "pool {}: backends disagree on {}: some certificates cover them, others do not",
                pool.name,
                disagree_on.join(", ")
            ));
        }
        pools.push(PoolReport {
            name: pool.name.clone(),
            names,
            same_sans,
            disagree_on,
            backends,
        });
    }
    let listeners: Vec<ListenerReport> = cfg
        .listeners
        .iter()
        .filter(|l| l.mode == Mode::Terminate)
        .filter_map(|l| {
            let tls = l.tls.as_ref()?;
            let missing: Vec<String> = l
                .names
                .iter()
                .filter(|n| !tls.certs.covers(n).0)
                .cloned()
                .collect();
            Some(ListenerReport {
                name: l.name.clone(),
                names: l.names.clone(),
                missing_names: missing,
            })
        })
        .collect();
    for l in &listeners {
        if !l.missing_names.is_empty() {
            problems.push(format!(
                "listener {}: its certificate does not cover {}",
                l.name,
                l.missing_names.join(", ")
            ));
        }
    }
    Report {
        pools,
        listeners,
        problems,
    }
}

/// One backend, every step within `timeout`.
async fn backend(
    pool: &PoolConfig,
    i: usize,
    names: &[String],
    timeout: Duration,
) -> BackendReport {
    let b = &pool.backends[i];
    let mut r = BackendReport::new(&b.name, &b.address);
    let tcp = match tokio::time::timeout(timeout, reach(b.addr, pool.send_proxy.is_some())).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            r.unreachable = Some(e);
            return r;
        }
        Err(_) => {
            r.unreachable = Some(format!(
                "timeout after {}",
                humantime::format_duration(timeout)
            ));
            return r;
        }
    };
    let configured = pool.tls.as_ref().and_then(|t| t.server_name.as_deref());
    let name = crate::tls::backend_server_name(configured, &b.address, b.addr.ip());
    let mut leaf = None;
    match &pool.tls {
        Some(t) => {
            let mut verified = (*t.client).clone();
            verified.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            match tokio::time::timeout(timeout, handshake(tcp, Arc::new(verified), &name)).await {
                Ok(Ok(tls)) => {
                    r.tls_version = version(&tls);
                    leaf = leaf_of(&tls);
                    crate::health::probe::close_cleanly(tls);
                }
                Ok(Err(e)) => r.chain_error = Some(e),
                Err(_) => r.chain_error = Some("TLS handshake timed out".into()),
            }
        }
        None => drop(tcp),
    }
    // Read what it presents even when it did not verify (or there is no CA to verify it
    // against): the report says what is wrong with it.
    if leaf.is_none() {
        if let Some((tls_version, der)) =
            read_unverified(b.addr, pool.send_proxy.is_some(), &name, &[], timeout).await
        {
            r.tls_version = r.tls_version.or(tls_version);
            leaf = Some(der);
        }
    }
    for proto in ["h2", "http/1.1"] {
        if let Some(accepted) =
            accepts(b.addr, pool.send_proxy.is_some(), &name, proto, timeout).await
        {
            if accepted {
                r.alpn.push(proto.to_string());
            }
        }
    }
    if let Some(der) = &leaf {
        let sans = Sans::of(der);
        r.missing_names = sans
            .missing(names)
            .into_iter()
            .map(str::to_string)
            .collect();
        r.certificate = cert_report(der, &sans);
    }
    if pool.tls.is_some() && r.chain_error.is_none() {
        r.readiness = Some(readiness(pool, b.addr, &name, timeout).await);
    }
    r
}

/// `GET [pool.health] path` with the health identity (the checks' TLS configuration when
/// the pool's checks use TLS, else the pool's).
async fn readiness(
    pool: &PoolConfig,
    addr: std::net::SocketAddr,
    name: &ServerName<'static>,
    timeout: Duration,
) -> Readiness {
    let path = pool.health.path.clone();
    let started = Instant::now();
    let config = pool.health.tls.clone().or_else(|| {
        pool.tls.as_ref().map(|t| {
            let mut c = (*t.client).clone();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        })
    });
    let result = tokio::time::timeout(timeout, async {
        let config = config.ok_or_else(|| "no [pool.tls]".to_string())?;
        let tcp = reach(addr, pool.send_proxy.is_some()).await?;
        let tls = handshake(tcp, config, name).await?;
        get_status(tls, &host_header(name, addr), &path).await
    })
    .await;
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (status, error) = match result {
        Ok(Ok(s)) => (Some(s), judge_status(s, &pool.health).err()),
        Ok(Err(e)) => (None, Some(e)),
        Err(_) => (
            None,
            Some(format!(
                "timeout after {}",
                humantime::format_duration(timeout)
            )),
        ),
    };
    Readiness {
        path,
        status,
        latency_ms,
        error,
    }
}

fn version(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Option<String> {
    tls.get_ref().1.protocol_version().map(|v| match v {
        rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3".to_string(),
        rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2".to_string(),
        other => format!("{other:?}"),
    })
}

fn cert_report(der: &[u8], sans: &Sans) -> Option<CertReport> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut names = sans.dns.clone();
    names.extend(sans.ips.iter().map(ToString::to_string));
    Some(CertReport {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        sans: names,
        not_after: humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0)),
        )
        .to_string(),
        days_left: (not_after - now).div_euclid(86_400),
    })
}

/// SANs back from the report's strings (DNS names and IP addresses).
fn sans_from(list: &[String]) -> Sans {
    let mut s = Sans::default();
    for n in list {
        match n.parse::<std::net::IpAddr>() {
            Ok(ip) => s.ips.push(ip),
            Err(_) => s.dns.push(n.clone()),
        }
    }
    s
}

/// Whether the backend accepts `proto` when it is the only protocol offered; `None` when
/// that could not be told (unreachable, no TLS).
async fn accepts(
    addr: std::net::SocketAddr,
    proxy: bool,
    name: &ServerName<'static>,
    proto: &str,
    timeout: Duration,
) -> Option<bool> {
    let config = reading_config(&[proto.as_bytes()])?;
    let result = tokio::time::timeout(timeout, async {
        let tcp = reach(addr, proxy).await?;
        handshake(tcp, config, name).await
    })
    .await
    .ok()?;
    match result {
        Ok(tls) => {
            let chosen = tls.get_ref().1.alpn_protocol() == Some(proto.as_bytes());
            crate::health::probe::close_cleanly(tls);
            Some(chosen)
        }
        Err(e) if e.contains("NoApplicationProtocol") => Some(false),
        Err(_) => None,
    }
}

/// The TLS version and leaf certificate a backend presents, without judging it.
async fn read_unverified(
    addr: std::net::SocketAddr,
    proxy: bool,
    name: &ServerName<'static>,
    alpn: &[&[u8]],
    timeout: Duration,
) -> Option<(Option<String>, Vec<u8>)> {
    let config = reading_config(alpn)?;
    let tls = tokio::time::timeout(timeout, async {
        let tcp = reach(addr, proxy).await?;
        handshake(tcp, config, name).await
    })
    .await
    .ok()?
    .ok()?;
    let out = (version(&tls), leaf_of(&tls)?);
    crate::health::probe::close_cleanly(tls);
    Some(out)
}

/// A client configuration that accepts any certificate: only ever used to *read* what a
/// backend presents for the report, never to send a request. `None` only if rustls refused
/// its own default versions.
fn reading_config(alpn: &[&[u8]]) -> Option<Arc<rustls::ClientConfig>> {
    let provider = crate::tls::provider();
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReadOnly(provider)))
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Some(Arc::new(c))
}

/// Accepts every certificate (the report judges it separately), but still checks the
/// handshake signatures so the TLS version reported is real.
#[derive(Debug)]
struct ReadOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for ReadOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The report as one screen of text: a table per pool, then the terminate listeners, then
/// the problems.
pub fn text(r: &Report) -> String {
    let mut s = String::new();
    for p in &r.pools {
        let _ = writeln!(
            s,
            "pool {} (names clients use: {})",
            p.name,
            if p.names.is_empty() {
                "none configured".to_string()
            } else {
                p.names.join(", ")
            }
        );
        let _ = writeln!(
            s,
            "  {:<12} {:<22} {:<10} {:<8} {:<12} {:<10} {:<14} {:<20} readiness",
            "backend",
            "address",
            "reachable",
            "TLS",
            "ALPN",
            "chain",
            "expires",
            "names not covered",
        );
        for b in &p.backends {
            let reachable = if b.unreachable.is_some() { "no" } else { "yes" };
            let chain = match (&b.chain_error, &b.unreachable) {
                (_, Some(_)) => "-".to_string(),
                (None, None) => "ok".to_string(),
                (Some(_), None) => "FAILED".to_string(),
            };
            let expires = b.certificate.as_ref().map_or("-".to_string(), |c| {
                if c.days_left < 0 {
                    "EXPIRED".to_string()
                } else {
                    format!("{} days", c.days_left)
                }
            });
            let missing = if b.unreachable.is_some() {
                "-".to_string()
            } else if b.missing_names.is_empty() {
                "none".to_string()
            } else {
                b.missing_names.join(",")
            };
            let ready = match &b.readiness {
                Some(Readiness {
                    status: Some(st),
                    error: None,
                    latency_ms,
                    ..
                }) => format!("{st} ({latency_ms} ms)"),
                Some(Readiness { status, .. }) => {
                    status.map_or("FAILED".to_string(), |st| format!("{st} FAILED"))
                }
                None => "-".to_string(),
            };
            let alpn = if b.alpn.is_empty() {
                "-".to_string()
            } else {
                b.alpn.join(",")
            };
            let _ = writeln!(
                s,
                "  {:<12} {:<22} {:<10} {:<8} {:<12} {:<10} {:<14} {:<20} {}",
                b.name,
                b.address,
                reachable,
                b.tls_version.as_deref().unwrap_or("-"),
                alpn,
                chain,
                expires,
                missing,
                ready
            );
        }
        if !p.disagree_on.is_empty() {
            let _ = writeln!(
                s,
                "  the backends disagree on {}: covered by some certificates, not others",
                p.disagree_on.join(", ")
            );
        } else if !p.same_sans {
            let _ = writeln!(
                s,
                "  (the backends' SANs differ elsewhere: each node's own names, as usual)"
            );
        }
        let _ = writeln!(s);
    }
    for l in &r.listeners {
        let _ = writeln!(
            s,
            "listener {} (terminate): names {} -> {}",
            l.name,
            if l.names.is_empty() {
                "none configured".to_string()
            } else {
                l.names.join(", ")
            },
            if l.missing_names.is_empty() {
                "all covered".to_string()
            } else {
                format!("NOT covered: {}", l.missing_names.join(", "))
            }
        );
    }
    if r.problems.is_empty() {
        let _ = writeln!(s, "no problem found");
    } else {
        let _ = writeln!(s, "{} problem(s):", r.problems.len());
        for p in &r.problems {
            let _ = writeln!(s, "  - {p}");
        }
    }
    s
}
