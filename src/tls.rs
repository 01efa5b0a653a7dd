//! PEM files and rustls configurations.
//!
//! Owns reading certificate chains, private keys (PKCS#8, PKCS#1, SEC1) and CA bundles from
//! PEM, and the choice of crypto provider. `ring` is the provider: it builds with a C
//! compiler only (no cmake, no Go), which keeps a fresh machine's build short (aws-lc-rs was
//! not measured against it). Also owns the memory of TLS sessions with backends
//! ([`SessionStores`]). Nothing here does network I/O.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;

/// Why PEM material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// No certificate in the PEM text.
    #[error("no certificate found in {0}")]
    NoCertificate(String),
    /// No usable private key in the PEM text.
    #[error("no private key (PKCS#8, PKCS#1 or SEC1) found in {0}")]
    NoKey(String),
    /// The PEM text is malformed.
    #[error("{what}: malformed PEM: {source}")]
    Pem {
        /// Which file or object.
        what: String,
        /// The parser's complaint.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the material (a key that does not match, an unusable CA).
    #[error("{what}: {source}")]
    Rustls {
        /// Which file or object.
        what: String,
        /// rustls's complaint.
        #[source]
        source: rustls::Error,
    },
}

/// The crypto provider used for every TLS configuration.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM text, in order; `what` names the source in errors.
///
/// # Errors
/// Malformed PEM or no certificate at all.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

/// The first private key in a PEM text.
///
/// # Errors
/// Malformed PEM or no key.
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(what.to_string()),
        source => TlsError::Pem {
            what: what.to_string(),
            source,
        },
    })
}

/// A root store holding every CA of a PEM bundle (several during a CA rotation).
///
/// # Errors
/// Malformed PEM, no certificate, or a certificate rustls cannot use as a trust anchor.
pub fn roots_from_pem(pem: &[u8], what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem, what)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            what: what.to_string(),
            source,
        })?;
    }
    Ok(roots)
}

/// A certificate chain with its private key, checked to belong together.
#[derive(Debug)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Pairs a chain with its key.
    ///
    /// # Errors
    /// The key cannot be used, or does not match the first certificate.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, rustls::Error> {
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())?;
        Ok(Self { chain, key })
    }
}

/// A TLS client configuration trusting `roots`, presenting `identity` when given, and
/// offering HTTP/1.1 by ALPN when `http1` is set. TLS 1.2 and 1.3 only.
///
/// # Errors
/// rustls refused the identity.
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<Identity>,
    http1: bool,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    if http1 {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(Arc::new(config))
}

/// TLS 1.3 tickets kept per backend. rustls's own cache keeps 8 per server name, and a
/// ticket is used once: a burst of more new connections than that would pay full handshakes
/// (the backend's signature) for most of them. Servers send at least one ticket per
/// handshake, so a deep queue stays full.
const TICKETS_KEPT: usize = 256;
/// Server names remembered per backend (normally one: the pool's `server_name`).
const NAMES_KEPT: usize = 8;

/// Session memory for a pool's terminate connections, one store per backend address: all
/// backends usually share one server name (`kubernetes`), and a ticket from one apiserver is
/// worthless at another. Built with the pool's TLS configuration, so a reload (which may
/// change the CA) starts with no sessions.
#[derive(Default)]
pub struct SessionStores(Mutex<HashMap<SocketAddr, Arc<TicketStore>>>);

impl SessionStores {
    /// The store for connections to `backend`.
    pub fn for_backend(&self, backend: SocketAddr) -> Arc<TicketStore> {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        m.entry(backend).or_default().clone()
    }
}

impl fmt::Debug for SessionStores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.lock().map_or(0, |m| m.len());
        write!(f, "SessionStores({n} backends)")
    }
}

type Tickets = HashMap<
    rustls::pki_types::ServerName<'static>,
    VecDeque<rustls::client::Tls13ClientSessionValue>,
>;

/// A [`rustls::client::ClientSessionStore`] for one backend: TLS 1.3 tickets in a deep queue,
/// the rest (key-exchange hints, TLS 1.2 sessions) in rustls's own cache.
#[derive(Debug)]
pub struct TicketStore {
    other: rustls::client::ClientSessionMemoryCache,
    tls13: Mutex<Tickets>,
}

impl Default for TicketStore {
    fn default() -> Self {
        Self {
            other: rustls::client::ClientSessionMemoryCache::new(NAMES_KEPT),
            tls13: Mutex::default(),
        }
    }
}

impl rustls::client::ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, name: rustls::pki_types::ServerName<'static>, group: rustls::NamedGroup) {
        self.other.set_kx_hint(name, group);
    }

    fn kx_hint(&self, name: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.other.kx_hint(name)
    }

    fn set_tls12_session(
        &self,
        name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.other.set_tls12_session(name, value);
    }

    fn tls12_session(
        &self,
        name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.other.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &rustls::pki_types::ServerName<'static>) {
        self.other.remove_tls12_session(name);
    }

    fn insert_tls13_ticket(
        &self,
        name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let mut m = self.tls13.lock().unwrap_or_else(PoisonError::into_inner);
        if m.len() >= NAMES_KEPT && !m.contains_key(&name) {
            m.clear();
        }
        let q = m.entry(name).or_default();
        if q.len() >= TICKETS_KEPT {
            q.pop_front();
        }
        q.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        name: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let mut m = self.tls13.lock().unwrap_or_else(PoisonError::into_inner);
        // Newest first: the oldest are the likeliest to have expired.
        m.get_mut(name)?.pop_back()
    }
}

/// Subject and expiry (Unix seconds) of a DER certificate; `None` if it cannot be parsed.
pub fn subject_and_expiry(der: &[u8]) -> Option<(String, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some((
        cert.subject().to_string(),
        cert.validity().not_after.timestamp(),
    ))
}

/// Picks a terminate listener's certificate by SNI: an exact name, then a `*.` wildcard one
/// label deep, then the default (the first certificate configured).
#[derive(Debug)]
pub struct SniResolver {
    default: Arc<rustls::sign::CertifiedKey>,
    by_name: Vec<(String, Arc<rustls::sign::CertifiedKey>)>,
}

impl SniResolver {
    /// `by_name` holds lower-case names, possibly `*.example.com`.
    pub fn new(
        default: Arc<rustls::sign::CertifiedKey>,
        by_name: Vec<(String, Arc<rustls::sign::CertifiedKey>)>,
    ) -> Self {
        Self { default, by_name }
    }

    /// The certificate for `sni`, and whether a configured name matched.
    pub fn lookup(&self, sni: Option<&str>) -> (Arc<rustls::sign::CertifiedKey>, bool) {
        if let Some(name) = sni {
            let name = name.to_ascii_lowercase();
            let wildcard = name.split_once('.').map(|(_, rest)| format!("*.{rest}"));
            for (n, ck) in &self.by_name {
                if *n == name || Some(n) == wildcard.as_ref() {
                    return (ck.clone(), true);
                }
            }
        }
        (self.default.clone(), false)
    }
}

impl SniResolver {
    /// Whether a client using `name` gets a certificate that covers it, and whether that
    /// certificate was chosen by SNI: IP clients send no SNI, so they get the default.
    pub fn covers(&self, name: &str) -> (bool, bool) {
        let (ck, by_sni) = self.lookup(sni_for(name));
        let covered = ck.cert.first().is_some_and(|c| covers(c.as_ref(), name));
        (covered, by_sni)
    }
}

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let (cert, matched) = self.lookup(hello.server_name());
        if !matched && hello.server_name().is_some() {
            tracing::debug!(sni = ?hello.server_name(), "unknown SNI name: serving the default certificate");
        }
        Some(cert)
    }
}

/// A terminate listener's server configurations: TLS 1.2 and 1.3 (rustls's safe defaults),
/// a client certificate asked for only with `client_ca`, and the ALPN answer fixed to what the backend chose.
/// The usual answers are built once; they share one session cache so resumption works
/// whatever protocol a client ends up with.
#[derive(Debug)]
pub struct TerminateServer {
    certs: Arc<SniResolver>,
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    none: Arc<rustls::ServerConfig>,
    h2: Arc<rustls::ServerConfig>,
    http11: Arc<rustls::ServerConfig>,
    /// Offers only the protocols the gateway relays, so a client naming none of them gets
    /// rustls's `no_application_protocol` alert.
    known: Arc<rustls::ServerConfig>,
    /// Verifies client certificates (`client_ca`), when asked for.
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

impl TerminateServer {
    /// Builds the configurations for `certs`.
    ///
    /// # Errors
    /// rustls refused the protocol versions (it does not for the defaults).
    pub fn new(certs: Arc<SniResolver>) -> Result<Self, rustls::Error> {
        Self::with_clients(certs, None)
    }

    /// As [`new`](Self::new), asking clients for a certificate verified by `clients` (SPEC
    /// §10 `client_ca`).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn with_clients(
        certs: Arc<SniResolver>,
        clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> Result<Self, rustls::Error> {
        let sessions: Arc<dyn rustls::server::StoresServerSessions> =
            rustls::server::ServerSessionMemoryCache::new(4096);
        let build = |alpn: Option<&[u8]>| Self::build(&certs, &sessions, &clients, alpn);
        Ok(Self {
            none: build(None)?,
            h2: build(Some(b"h2"))?,
            http11: build(Some(b"http/1.1"))?,
            known: {
                let mut c = (*build(Some(b"h2"))?).clone();
                c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                Arc::new(c)
            },
            certs: certs.clone(),
            sessions: sessions.clone(),
            clients,
        })
    }

    fn build(
        certs: &Arc<SniResolver>,
        sessions: &Arc<dyn rustls::server::StoresServerSessions>,
        clients: &Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
        alpn: Option<&[u8]>,
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match clients {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(certs.clone());
        config.alpn_protocols = alpn.map(<[u8]>::to_vec).into_iter().collect();
        config.session_storage = sessions.clone();
        Ok(Arc::new(config))
    }

    /// The configuration that refuses a client whose ALPN list names neither `h2` nor
    /// `http/1.1`, with the alert RFC 7301 asks for.
    pub fn refusing_alpn(&self) -> Arc<rustls::ServerConfig> {
        self.known.clone()
    }

    /// The configuration answering ALPN with `alpn`.
    ///
    /// # Errors
    /// Only for an unusual protocol, built on demand, if rustls refused it.
    pub fn for_alpn(
        &self,
        alpn: Option<&[u8]>,
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        match alpn {
            None => Ok(self.none.clone()),
            Some(b"h2") => Ok(self.h2.clone()),
            Some(b"http/1.1") => Ok(self.http11.clone()),
            Some(other) => Self::build(&self.certs, &self.sessions, &self.clients, Some(other)),
        }
    }
}

/// The Kubernetes identity a client certificate names: its subject CN (the user) and every
/// subject O (the groups), as kube-apiserver reads it; `None` without a CN or unparsable.
pub fn subject_identity(der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    // Exactly one CN: readers differ on which of several counts (Go takes the last).
    let mut cns = subject.iter_common_name();
    let user = cns.next().and_then(|cn| cn.as_str().ok())?.to_string();
    if cns.next().is_some() {
        return None;
    }
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .map(str::to_string)
        .collect();
    Some((user, groups))
}

/// Whether certificate `der` was issued by one of the CAs in `roots` (its issuer is one of
/// their subjects): the `[listener.identity]` check of SPEC §10.
pub fn issued_by_one_of(der: &[u8], roots: &RootCertStore) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let issuer = cert.issuer().as_raw();
    roots.roots.iter().any(|ta| {
        ta.subject.as_ref() == issuer
            || strip_sequence(ta.subject.as_ref()) == Some(issuer)
            || strip_sequence(issuer) == Some(ta.subject.as_ref())
    })
}

/// The contents of a DER SEQUENCE (webpki keeps trust-anchor subjects without the outer
/// tag and length; x509-parser's raw names include them).
fn strip_sequence(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (n, rest) = if len < 0x80 {
        (usize::from(len), rest)
    } else {
        let k = usize::from(len & 0x7f);
        if k == 0 || k > 4 || rest.len() < k {
            return None;
        }
        let n = rest[..k]
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        (n, &rest[k..])
    };
    (rest.len() == n).then_some(rest)
}

/// The names a certificate's SANs cover: DNS names (lower case) and IP addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sans {
    /// `dNSName` entries, lower case, wildcards as written (`*.example.com`).
    pub dns: Vec<String>,
    /// `iPAddress` entries.
    pub ips: Vec<std::net::IpAddr>,
}

impl Sans {
    /// The SANs of a DER certificate; empty when it has none or does not parse.
    pub fn of(der: &[u8]) -> Self {
        use x509_parser::extensions::GeneralName;
        let mut out = Self::default();
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return out;
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return out;
        };
        for g in &san.value.general_names {
            match g {
                GeneralName::DNSName(d) => out.dns.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => out.ips.push(std::net::IpAddr::from(
                        <[u8; 4]>::try_from(*b).unwrap_or_default(),
                    )),
                    16 => out.ips.push(std::net::IpAddr::from(
                        <[u8; 16]>::try_from(*b).unwrap_or_default(),
                    )),
                    _ => {}
                },
                _ => {}
            }
        }
        out
    }

    /// Whether these SANs cover `name` as a client checks it (RFC 6125): an IP literal only
    /// by an IP SAN, a DNS name only by a DNS SAN, case-insensitively, a `*.` wildcard
    /// standing for exactly one whole left-most label.
    pub fn cover(&self, name: &str) -> bool {
        let name = name.trim().trim_end_matches('.');
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
        {
            return self.ips.contains(&ip);
        }
        let name = name.to_ascii_lowercase();
        self.dns.iter().any(|d| {
            let d = d.trim_end_matches('.');
            match d.strip_prefix("*.") {
                Some(rest) => name
                    .split_once('.')
                    .is_some_and(|(first, tail)| !first.is_empty() && tail == rest),
                None => d == name,
            }
        })
    }

    /// The names of `names` these SANs do not cover, in order.
    pub fn missing<'a>(&self, names: &'a [String]) -> Vec<&'a str> {
        names
            .iter()
            .map(String::as_str)
            .filter(|n| !self.cover(n))
            .collect()
    }
}

/// The SNI a client sends for `name`: none for an IP address (RFC 6066 forbids IP literals in
/// SNI), so such a client always gets a terminate listener's default certificate.
pub fn sni_for(name: &str) -> Option<&str> {
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>().is_err().then_some(name)
}

/// Whether a certificate's SANs cover `name` (see [`Sans::cover`]).
pub fn covers(der: &[u8], name: &str) -> bool {
    Sans::of(der).cover(name)
}

// === TLS and socket failures in words ===

/// The name checked in a backend's certificate: `configured` (`[pool.tls] server_name`), else
/// the host of its configured `address`, else its IP.
pub fn backend_server_name(
    configured: Option<&str>,
    address: &str,
    ip: std::net::IpAddr,
) -> ServerName<'static> {
    let host = configured.map(str::to_string).unwrap_or_else(|| {
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    ServerName::try_from(host).unwrap_or_else(|_| ServerName::IpAddress(ip.into()))
}

/// A socket error in plain words.
pub(crate) fn io_reason(e: &io::Error) -> String {
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

    fn sans(dns: &[&str], ips: &[&str]) -> Sans {
        Sans {
            dns: dns.iter().map(|d| d.to_string()).collect(),
            ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
        }
    }

    #[test]
    fn ip_names_match_only_ip_sans_and_dns_names_only_dns_sans() {
        let s = sans(
            &["10.0.0.1", "api.example.com"],
            &["192.0.2.10", "2001:db8::1"],
        );
        assert!(s.cover("192.0.2.10"));
        assert!(s.cover("2001:db8::1") && s.cover("[2001:db8::1]"));
        assert!(
            !s.cover("10.0.0.1"),
            "an IP written as a DNS SAN does not cover the IP"
        );
        assert!(
            s.cover("API.Example.com"),
            "DNS names compare case-insensitively"
        );
        assert!(!s.cover("api.example.org"));
    }

    #[test]
    fn ip_names_send_no_sni() {
        assert_eq!(sni_for("203.0.113.10"), None);
        assert_eq!(sni_for("[2001:db8::1]"), None);
        assert_eq!(sni_for("api.example.com"), Some("api.example.com"));
    }

    #[test]
    fn a_wildcard_covers_exactly_one_label() {
        let s = sans(&["*.example.com"], &[]);
        assert!(s.cover("a.example.com"));
        assert!(!s.cover("example.com"));
        assert!(!s.cover("a.b.example.com"));
        assert!(!s.cover(".example.com"));
        assert_eq!(
            s.missing(&["a.example.com".into(), "example.com".into()]),
            ["example.com"]
        );
    }

    #[test]
    fn sans_are_read_from_a_real_certificate() {
        let pki = crate::demo::pki::Pki::generate().expect("pki");
        let der = certs_from_pem(pki.apiserver.cert_pem.as_bytes(), "a").expect("cert");
        let s = Sans::of(der[0].as_ref());
        assert!(s.cover("kubernetes"), "{s:?}");
        assert!(s.cover("127.0.0.1"), "{s:?}");
        assert!(Sans::of(b"garbage").dns.is_empty());
    }
}
