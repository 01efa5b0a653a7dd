//! The one TLS fixture: a fresh demo PKI ([`apilb::demo::pki::Pki`]), its files written to a
//! temp folder that lives as long as the fixture, and rustls clients that trust either the
//! cluster CA (passthrough, what apiservers serve) or the public CA (what terminate listeners
//! serve). One call gives everything, in the spirit of tokio-rustls's `make_configs()`.
//! Also [`tls_connect`], a TLS handshake over a fresh TCP connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use apilb::demo::pki::{CertKey, Pki, PkiFiles};
use tokio::net::TcpStream;

/// A PKI in memory and on disk. Files beyond the PKI's own go in the same folder with
/// [`TlsFixture::file`], so a test needs no second temp folder.
pub struct TlsFixture {
    /// Certificates and keys, PEM.
    pub pki: Pki,
    /// Where [`Pki::write_to`] put them (`ca.crt`, `public.crt`, `admin.key`, ...).
    pub files: PkiFiles,
    _dir: tempfile::TempDir,
}

impl TlsFixture {
    /// A fresh PKI written to a fresh temp folder.
    pub fn new() -> Self {
        let pki = Pki::generate().expect("generate PKI");
        let dir = tempfile::tempdir().expect("tempdir");
        let files = pki.write_to(dir.path()).expect("write PKI");
        Self {
            pki,
            files,
            _dir: dir,
        }
    }

    /// The folder holding the files.
    pub fn dir(&self) -> &Path {
        &self.files.dir
    }

    /// `name` in the folder (which need not exist yet).
    pub fn path(&self, name: &str) -> PathBuf {
        self.files.dir.join(name)
    }

    /// Writes `text` to `name` in the folder; returns its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write fixture file");
        p
    }

    /// The cluster CA certificate (`ca.crt`), what pools verify apiservers against.
    pub fn ca(&self) -> PathBuf {
        self.files.ca.clone()
    }

    /// A client trusting the cluster CA: for passthrough listeners and the apiservers
    /// themselves. `identity` is a client certificate to offer; `alpn` the protocols.
    pub fn client(&self, identity: Option<&CertKey>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
        client_trusting(&self.pki.ca.cert_pem, identity, alpn)
    }

    /// A client trusting the public CA: for terminate listeners.
    pub fn public_client(
        &self,
        identity: Option<&CertKey>,
        alpn: &[&str],
    ) -> Arc<rustls::ClientConfig> {
        client_trusting(&self.pki.public_ca.cert_pem, identity, alpn)
    }
}

fn client_trusting(
    ca_pem: &str,
    identity: Option<&CertKey>,
    alpn: &[&str],
) -> Arc<rustls::ClientConfig> {
    let roots = apilb::tls::roots_from_pem(ca_pem.as_bytes(), "ca").expect("roots");
    let builder = rustls::ClientConfig::builder_with_provider(apilb::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                apilb::tls::certs_from_pem(id.cert_pem.as_bytes(), "cert").expect("cert"),
                apilb::tls::key_from_pem(id.key_pem.as_bytes(), "key").expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// Connects to `addr` (which must accept: a refused TCP connect fails the test) and runs a
/// TLS handshake for `server_name`; the handshake's result is the caller's to judge.
pub async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.expect("TCP connect");
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).expect("name");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}
