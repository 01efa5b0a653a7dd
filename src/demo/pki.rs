//! A throwaway cluster PKI made with rcgen, for the demo, the tests and the benchmarks.
//!
//! It mirrors what kubeadm lays out, reduced to what a gateway in front of apiservers meets:
//! a cluster CA, an apiserver serving certificate with the SANs clients use (loopback names
//! and addresses, `kubernetes`, `kubernetes.default.svc`), and client certificates whose CN
//! and O become the Kubernetes user and groups. Keys are ECDSA P-256. Nothing here is meant
//! to protect anything: the keys live in memory and in a temp folder.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// The SANs of the demo apiserver certificate.
pub const APISERVER_SANS: &[&str] = &[
    "localhost",
    "127.0.0.1",
    "::1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
];

/// The SANs of the demo's "public" certificate for the terminate listener.
pub const PUBLIC_SANS: &[&str] = &["localhost", "127.0.0.1", "::1", "apilb.demo.test"];

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertKey {
    /// The certificate (a single PEM block).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
}

/// A certificate authority that can issue more certificates.
pub struct Ca {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // Back-dated an hour so a clock that is slightly behind still accepts it.
    params.not_after = now + Duration::days(days);
    // A negative `days` makes an already expired certificate (for tests); it was valid for
    // the month before.
    params.not_before = if days < 0 {
        params.not_after - Duration::days(30)
    } else {
        now - Duration::hours(1)
    };
}

impl Ca {
    /// A new self-signed CA with the given common name, valid for ten years.
    ///
    /// # Errors
    /// Key generation or signing failed.
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA read back from its certificate and key (PEM), to issue more certificates:
    /// what `apilb load --node-ca-cert/--node-ca-key` mints node identities with.
    ///
    /// # Errors
    /// The certificate or key does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
        })
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A serving certificate for `sans` (DNS names or IP addresses), valid for `days`.
    ///
    /// # Errors
    /// Key generation or signing failed, or a SAN is not a valid name.
    pub fn server(
        &self,
        common_name: &str,
        sans: &[&str],
        days: i64,
    ) -> Result<CertKey, rcgen::Error> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_string()).collect::<Vec<_>>())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, days);
        self.sign(&params)
    }

    /// A client certificate for a Kubernetes user: CN is the user, each O a group.
    ///
    /// # Errors
    /// Key generation or signing failed.
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<CertKey, rcgen::Error> {
        self.client_valid_for(user, groups, 365)
    }

    /// A client certificate valid for `days` (negative: expired that many days ago).
    ///
    /// # Errors
    /// Key generation or signing failed.
    pub fn client_valid_for(
        &self,
        user: &str,
        groups: &[&str],
        days: i64,
    ) -> Result<CertKey, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        // rcgen keeps one value per attribute type, so only the first group goes in the
        // subject; every demo identity has exactly one group.
        if let Some(group) = groups.first() {
            dn.push(DnType::OrganizationName, *group);
        }
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, days);
        self.sign(&params)
    }

    fn sign(&self, params: &CertificateParams) -> Result<CertKey, rcgen::Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The demo cluster's PKI.
#[derive(Debug)]
pub struct Pki {
    /// The cluster CA (what kubeconfigs and kubelets trust).
    pub ca: Ca,
    /// The apiservers' serving certificate, with [`APISERVER_SANS`].
    pub apiserver: CertKey,
    /// CN=admin, O=system:masters.
    pub admin: CertKey,
    /// CN=system:node:worker0, O=system:nodes.
    pub node: CertKey,
    /// Stands for a public CA (Let's Encrypt, ACM): what browsers and token users trust.
    pub public_ca: Ca,
    /// The terminate listener's certificate from [`Pki::public_ca`], for the loopback names.
    pub public: CertKey,
    /// kubeadm's `front-proxy-ca`: what the apiservers trust to vouch for users (SPEC §10).
    pub front_proxy_ca: Ca,
    /// kubeadm's `front-proxy-client` (CN `front-proxy-client`), the gateway's identity in
    /// front-proxy mode.
    pub front_proxy_client: CertKey,
}

/// Paths of a PKI written to a folder.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The folder.
    pub dir: PathBuf,
    /// `ca.crt`
    pub ca: PathBuf,
    /// `ca.key`: the cluster CA's key, for `apilb load --node-ca-key` (the demo's own
    /// throwaway CA; a real cluster's never leaves its control plane).
    pub ca_key: PathBuf,
    /// `apiserver.crt`
    pub apiserver_cert: PathBuf,
    /// `apiserver.key`
    pub apiserver_key: PathBuf,
    /// `admin.crt`
    pub admin_cert: PathBuf,
    /// `admin.key`
    pub admin_key: PathBuf,
    /// `node.crt`
    pub node_cert: PathBuf,
    /// `node.key`
    pub node_key: PathBuf,
    /// `public-ca.crt`
    pub public_ca: PathBuf,
    /// `public.crt`
    pub public_cert: PathBuf,
    /// `public.key`
    pub public_key: PathBuf,
    /// `front-proxy-ca.crt`
    pub front_proxy_ca: PathBuf,
    /// `front-proxy-client.crt`
    pub front_proxy_client_cert: PathBuf,
    /// `front-proxy-client.key`
    pub front_proxy_client_key: PathBuf,
}

impl Pki {
    /// A fresh PKI.
    ///
    /// # Errors
    /// Key generation or signing failed.
    pub fn generate() -> Result<Self, rcgen::Error> {
        let ca = Ca::new("apilb-demo-cluster-ca")?;
        let apiserver = ca.server("kube-apiserver", APISERVER_SANS, 365)?;
        let admin = ca.client("admin", &["system:masters"])?;
        let node = ca.client("system:node:worker0", &["system:nodes"])?;
        let public_ca = Ca::new("apilb-demo-public-ca")?;
        let public = public_ca.server("apilb.demo.test", PUBLIC_SANS, 90)?;
        let front_proxy_ca = Ca::new("front-proxy-ca")?;
        let front_proxy_client = front_proxy_ca.client("front-proxy-client", &[])?;
        Ok(Self {
            ca,
            apiserver,
            admin,
            node,
            public_ca,
            public,
            front_proxy_ca,
            front_proxy_client,
        })
    }

    /// Writes every certificate and key to `dir` (keys with mode 0600).
    ///
    /// # Errors
    /// The folder or a file could not be written.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<PkiFiles> {
        std::fs::create_dir_all(dir)?;
        let files = PkiFiles {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            node_cert: dir.join("node.crt"),
            node_key: dir.join("node.key"),
            public_ca: dir.join("public-ca.crt"),
            public_cert: dir.join("public.crt"),
            public_key: dir.join("public.key"),
            front_proxy_ca: dir.join("front-proxy-ca.crt"),
            front_proxy_client_cert: dir.join("front-proxy-client.crt"),
            front_proxy_client_key: dir.join("front-proxy-client.key"),
        };
        write_file(&files.ca, &self.ca.cert_pem, CERT_MODE)?;
        write_file(&files.ca_key, &self.ca.key_pem(), KEY_MODE)?;
        write_file(&files.apiserver_cert, &self.apiserver.cert_pem, CERT_MODE)?;
        write_file(&files.apiserver_key, &self.apiserver.key_pem, KEY_MODE)?;
        write_file(&files.admin_cert, &self.admin.cert_pem, CERT_MODE)?;
        write_file(&files.admin_key, &self.admin.key_pem, KEY_MODE)?;
        write_file(&files.node_cert, &self.node.cert_pem, CERT_MODE)?;
        write_file(&files.node_key, &self.node.key_pem, KEY_MODE)?;
        write_file(&files.public_ca, &self.public_ca.cert_pem, CERT_MODE)?;
        write_file(&files.public_cert, &self.public.cert_pem, CERT_MODE)?;
        write_file(&files.public_key, &self.public.key_pem, KEY_MODE)?;
        write_file(
            &files.front_proxy_ca,
            &self.front_proxy_ca.cert_pem,
            CERT_MODE,
        )?;
        write_file(
            &files.front_proxy_client_cert,
            &self.front_proxy_client.cert_pem,
            CERT_MODE,
        )?;
        write_file(
            &files.front_proxy_client_key,
            &self.front_proxy_client.key_pem,
            KEY_MODE,
        )?;
        Ok(files)
    }
}

/// Certificates are public; keys are for their owner only.
const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;

/// Writes `text` to `path` as a new file with `mode`, then renames it into place. Never
/// through what is already there: a symlink planted in the folder (`--dir` may be shared) is
/// replaced, not followed, and an old key file with loose permissions is replaced by one
/// created with `mode`, not rewritten under its old mode.
pub fn write_file(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let written = opts
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()));
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round-2 hardening, item 12: `demo --dir` followed symlinks already in the folder and
    /// set key modes only when it created a file.
    #[cfg(unix)]
    #[test]
    fn writing_the_pki_replaces_symlinks_and_tightens_old_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let victim = elsewhere.path().join("victim");
        std::fs::write(&victim, "do not touch").expect("write");
        std::os::unix::fs::symlink(&victim, dir.path().join("admin.key")).expect("symlink");
        std::fs::write(dir.path().join("node.key"), "old").expect("write");
        std::fs::set_permissions(
            dir.path().join("node.key"),
            std::fs::Permissions::from_mode(0o666),
        )
        .expect("chmod");
        let files = Pki::generate()
            .expect("pki")
            .write_to(dir.path())
            .expect("write");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("read"),
            "do not touch"
        );
        for key in [
            &files.ca_key,
            &files.admin_key,
            &files.node_key,
            &files.public_key,
        ] {
            let meta = std::fs::symlink_metadata(key).expect("meta");
            assert!(
                meta.file_type().is_file(),
                "{} is not a plain file",
                key.display()
            );
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o600,
                "{}",
                key.display()
            );
        }
        let ca = std::fs::metadata(&files.ca).expect("meta");
        assert_eq!(ca.permissions().mode() & 0o777, 0o644);
    }

    #[test]
    fn a_ca_read_back_from_its_files_issues_certificates_that_chain() {
        let pki = Pki::generate().expect("pki");
        let again = Ca::from_pem(&pki.ca.cert_pem, &pki.ca.key_pem()).expect("read back");
        let node = again
            .client("system:node:n1", &["system:nodes"])
            .expect("issue");
        let roots = crate::tls::roots_from_pem(pki.ca.cert_pem.as_bytes(), "ca").expect("roots");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .expect("verifier");
        let chain = crate::tls::certs_from_pem(node.cert_pem.as_bytes(), "node").expect("cert");
        verifier
            .verify_client_cert(&chain[0], &[], rustls::pki_types::UnixTime::now())
            .expect("the minted certificate chains to the original CA");
        assert!(Ca::from_pem("not a cert", &pki.ca.key_pem()).is_err());
    }
}
