//! `[pool.health]`: the check kind and its settings, in range and consistent with each other
//! and with `[pool.tls]`, and the TLS client the checks use (with the health-only identity).

use toml::Spanned;

use super::file::FileHealth;
use super::types::{CheckKind, HealthConfig, PoolTlsConfig};
use super::validate::Validator;

impl Validator<'_> {
    pub(super) fn health(
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
        let check = self.choice(h.check.as_ref(), &k("check"), CheckKind::Tcp);
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
            Some(p)
                if p.get_ref()
                    .parse::<hyper::http::uri::PathAndQuery>()
                    .is_err() =>
            {
                self.error(
                    p.span(),
                    k("path"),
                    format!(
                        "{:?} is not a valid request path: spaces and control characters must be percent-encoded",
                        p.get_ref()
                    ),
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
            // Operators switch a check to tcp while they debug; the certificate stays put.
            self.warn(
                span.clone(),
                k("client_cert"),
                "unused: a client certificate is only presented by tls and https checks (check = \"tcp\")",
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
}
