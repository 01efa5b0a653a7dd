//! Certificates and keys named by the config: chains and keys read and checked to match,
//! CA bundles, every certificate's expiry recorded (an expired one is an error for `check`,
//! logged by `run`), key file permissions, and the health-only identity.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::file::FilePoolTls;
use super::types::{CertificateInfo, ConfigError, PoolTlsConfig};
use super::validate::{line_col, Validator};

impl Validator<'_> {
    /// A serving certificate chain and key, checked to match.
    pub(super) fn certified_key(
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
    pub(super) fn pool_tls(&mut self, i: usize, t: Spanned<FilePoolTls>) -> Option<PoolTlsConfig> {
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
        })
    }

    /// Loads a certificate and key pair and checks that they belong together.
    pub(super) fn identity(
        &mut self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
        cert_key: &str,
        key_key: &str,
    ) -> Option<crate::tls::Identity> {
        let source = format!("{}/health_client_cert", self.scope);
        self.identity_as(cert, key, cert_key, key_key, &source)
    }

    /// [`identity`](Self::identity) for another use, named `source` in the certificate list.
    pub(super) fn identity_as(
        &mut self,
        cert: &Spanned<String>,
        key: &Spanned<String>,
        cert_key: &str,
        key_key: &str,
        source: &str,
    ) -> Option<crate::tls::Identity> {
        let source = source.to_string();
        self.pem_pair(
            cert,
            key,
            cert_key,
            key_key,
            &source,
            crate::tls::Identity::new,
        )
    }
}
