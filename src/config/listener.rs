//! `[[listener]]` and `[listener.tls]`: names and addresses unique, the pool known (with
//! `[pool.tls]` for terminate), the mode's own settings, and the serving certificates.

use std::sync::Arc;

use toml::Spanned;

use super::defaults;
use super::file::{FileIdentity, FileListener, FileListenerTls, FileRoute, OneOrMany};
use super::types::{IdentityConfig, ListenerConfig, ListenerTlsConfig, Mode, RouteConfig};
use super::validate::{Seen, Validator};

/// The most routes per listener, and names per route.
const MAX_ROUTES: usize = 1000;

impl Validator<'_> {
    /// Validates listener `i` against what earlier sections and listeners took.
    pub(super) fn listener(
        &mut self,
        i: usize,
        l: FileListener,
        seen: &mut Seen,
    ) -> ListenerConfig {
        let name = l.name.get_ref().trim().to_string();
        self.scope = format!("listener/{name}");
        if name.is_empty() {
            self.error(
                l.name.span(),
                format!("listener[{i}].name"),
                "expected a non-empty name",
            );
        } else if !seen.listeners.insert(name.clone()) {
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
                    if let Some(other) = seen.addrs.insert(a, name.clone()) {
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
        let mode = self.choice(
            l.mode.as_ref(),
            &format!("listener[{i}].mode"),
            Mode::Passthrough,
        );
        let names = self.names(i, l.names.as_ref());
        let tls = match (mode, l.tls) {
            (Mode::Terminate, Some(t)) => self.listener_tls(i, t, &names),
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
        let pool = l.pool.as_ref().map(|p| {
            self.pool_ref(p, &format!("listener[{i}].pool"), mode, seen);
            p.get_ref().clone()
        });
        let routes = self.routes(i, &l.route, mode, seen);
        if pool.is_none() && routes.is_empty() {
            self.error(
                l.name.span(),
                format!("listener[{i}].pool"),
                "expected pool = \"NAME\" (or [[listener.route]]s with their pools)",
            );
        }
        let sni_timeout = self.duration(
            l.sni_timeout.as_ref(),
            &format!("listener[{i}].sni_timeout"),
            defaults::SNI_TIMEOUT,
        );
        let proxy_protocol = l.proxy_protocol.as_ref().is_some_and(|v| *v.get_ref());
        let inspects = proxy_protocol || (mode == Mode::Passthrough && !routes.is_empty());
        if let (Some(v), false) = (&l.sni_timeout, inspects) {
            self.warn(
                v.span(),
                format!("listener[{i}].sni_timeout"),
                "sni_timeout has no effect here: it bounds the PROXY header and a passthrough listener's ClientHello read for routes, and this listener has neither",
            );
        }
        let idle_timeout = self.duration(
            l.idle_timeout.as_ref(),
            &format!("listener[{i}].idle_timeout"),
            defaults::IDLE_TIMEOUT,
        );
        if idle_timeout < defaults::SHORT_IDLE {
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
        let first_byte_timeout = self.duration_or_off(
            l.first_byte_timeout.as_ref(),
            &format!("listener[{i}].first_byte_timeout"),
            defaults::FIRST_BYTE_TIMEOUT,
        );
        if let (Mode::Terminate, Some(v)) = (mode, &l.first_byte_timeout) {
            self.error(
                v.span(),
                format!("listener[{i}].first_byte_timeout"),
                "first_byte_timeout is for passthrough listeners: a terminate listener has [listener.tls] handshake_timeout",
            );
        }
        let identity = l
            .identity
            .map(|id| self.identity_mode(i, id, mode, tls.as_ref()));
        let max_connections = self.int_in(
            l.max_connections.as_ref(),
            &format!("listener[{i}].max_connections"),
            1..=10_000_000,
            defaults::MAX_CONNECTIONS,
        );
        ListenerConfig {
            name,
            listen,
            mode,
            pool,
            routes,
            sni_timeout,
            proxy_protocol,
            idle_timeout,
            first_byte_timeout,
            log_empty: l.log_empty.as_ref().is_none_or(|v| *v.get_ref()),
            names,
            max_connections,
            tls,
            identity: identity.flatten(),
        }
    }

    /// `[listener.identity]` of listener `i` (SPEC §10): terminate only; its certificate must
    /// not come from a CA of `client_ca`, or an apiserver trusting that CA for client
    /// certificates would take every request without identity headers as the gateway's own.
    fn identity_mode(
        &mut self,
        i: usize,
        id: Spanned<FileIdentity>,
        mode: Mode,
        tls: Option<&ListenerTlsConfig>,
    ) -> Option<IdentityConfig> {
        let span = id.span();
        let id = id.into_inner();
        let k = |key: &str| format!("listener[{i}].identity.{key}");
        if mode != Mode::Terminate {
            self.error(span, format!("listener[{i}].identity"), "[listener.identity] needs mode = \"terminate\": only a terminating listener sees the requests and the client's certificate");
            return None;
        }
        let source = format!("{}/identity_client_cert", self.scope);
        let client = self.identity_as(
            &id.client_cert,
            &id.client_key,
            &k("client_cert"),
            &k("client_key"),
            &source,
        )?;
        if let Some(roots) = tls.and_then(|t| t.client_ca.as_ref()) {
            // Any certificate of the chain issued by a client_ca CA (an intermediate, a
            // cross-signed CA) makes the chain one an apiserver trusting that CA accepts.
            if client
                .chain()
                .iter()
                .any(|c| crate::tls::issued_by_one_of(c.as_ref(), roots))
            {
                self.error(id.client_cert.span(), k("client_cert"), format!(
                    "{} was issued by a CA in client_ca: an apiserver that trusts that CA for client certificates would take every request without identity headers (token users, anonymous ones) as the gateway's own identity; use kubeadm's front-proxy-client certificate, from the front-proxy CA",
                    self.path(id.client_cert.get_ref()).display()
                ));
            }
        }
        if tls.is_some_and(|t| t.client_ca.is_none()) {
            self.warn(span.clone(), format!("listener[{i}].identity"), "[listener.identity] without [listener.tls] client_ca: no client certificate is asked for, so every request goes on as a token user or anonymous; set client_ca to the cluster CA");
        }
        let mut header = |v: &Option<Spanned<String>>, key: &str, default: &str| -> String {
            let Some(v) = v else {
                return default.to_string();
            };
            let name = v.get_ref().trim().to_string();
            if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() || name.is_empty() {
                self.error(
                    v.span(),
                    k(key),
                    format!("{name:?} is not an HTTP header name"),
                );
            }
            name
        };
        let user_header = header(&id.user_header, "user_header", "X-Remote-User");
        let group_header = header(&id.group_header, "group_header", "X-Remote-Group");
        let extra_header_prefix = header(
            &id.extra_header_prefix,
            "extra_header_prefix",
            "X-Remote-Extra-",
        );
        if user_header.eq_ignore_ascii_case(&group_header) {
            self.error(
                span,
                k("group_header"),
                "user_header and group_header must differ",
            );
        }
        Some(IdentityConfig {
            client,
            user_header,
            group_header,
            extra_header_prefix,
        })
    }

    /// A pool a listener or one of its routes names: it exists, and has `[pool.tls]` for
    /// terminate.
    fn pool_ref(&mut self, p: &Spanned<String>, key: &str, mode: Mode, seen: &Seen) {
        let name = p.get_ref();
        if !seen.pools.contains_key(name) {
            let known: Vec<&str> = seen.pools.keys().map(String::as_str).collect();
            self.error(
                p.span(),
                key,
                format!("unknown pool {name:?}: expected one of the [[pool]] names {known:?}"),
            );
        } else if mode == Mode::Terminate && !seen.pools_with_tls.contains(name) {
            self.error(p.span(), key, format!(
                "a terminate listener opens its own TLS connections to the backends, so pool {name:?} needs [pool.tls] with the CA that signed them"
            ));
        }
    }

    /// `[[listener.route]]`s of listener `i`: names valid and each once in the listener,
    /// pools known.
    fn routes(
        &mut self,
        i: usize,
        routes: &[Spanned<FileRoute>],
        mode: Mode,
        seen: &Seen,
    ) -> Vec<RouteConfig> {
        let mut names: Vec<String> = Vec::new();
        let mut out = Vec::new();
        // The access log's route tag packs both indexes in 16 bits; linear matching wants
        // far fewer anyway.
        if routes.len() > MAX_ROUTES {
            if let Some(r) = routes.get(MAX_ROUTES) {
                self.error(
                    r.span(),
                    format!("listener[{i}].route"),
                    format!("more than {MAX_ROUTES} routes on one listener"),
                );
            }
        }
        for (j, r) in routes.iter().enumerate().take(MAX_ROUTES) {
            let r = r.get_ref();
            let key = format!("listener[{i}].route[{j}].sni");
            self.pool_ref(
                &r.pool,
                &format!("listener[{i}].route[{j}].pool"),
                mode,
                seen,
            );
            if r.sni.get_ref().is_empty() {
                self.error(r.sni.span(), &key, "expected at least one name");
            }
            let mut sni = Vec::new();
            if r.sni.get_ref().len() > MAX_ROUTES {
                self.error(
                    r.sni.span(),
                    &key,
                    format!("more than {MAX_ROUTES} names in one route"),
                );
            }
            for n in r.sni.get_ref().iter().take(MAX_ROUTES) {
                let n = n.trim().trim_end_matches('.').to_ascii_lowercase();
                let base = n.strip_prefix("*.").unwrap_or(&n);
                // `*.com` would route a whole top-level domain: a wildcard needs two labels.
                let wildcard_ok = !n.starts_with("*.") || base.contains('.');
                let valid = !base.contains('*')
                    && wildcard_ok
                    && rustls::pki_types::DnsName::try_from(base).is_ok()
                    && base.parse::<std::net::IpAddr>().is_err();
                if !valid {
                    self.error(r.sni.span(), &key, format!(
                        "{n:?} is not a DNS name or \"*.\" and a DNS name (a wildcard stands for exactly one label, at the front; clients send no IP address as a server name)"
                    ));
                } else if names.contains(&n) {
                    self.error(r.sni.span(), &key, format!(
                        "{n:?} is named by an earlier route of this listener: each name may route to one pool only"
                    ));
                } else {
                    names.push(n.clone());
                    sni.push(n);
                }
            }
            out.push(RouteConfig {
                sni,
                pool: r.pool.get_ref().clone(),
            });
        }
        out
    }

    /// `[listener.tls]` of listener `i`.
    fn listener_tls(
        &mut self,
        i: usize,
        t: Spanned<FileListenerTls>,
        names: &[String],
    ) -> Option<ListenerTlsConfig> {
        let t = t.into_inner();
        let k = |key: &str| format!("listener[{i}].tls.{key}");
        let max_handshakes = self.int_in(
            t.max_handshakes.as_ref(),
            &k("max_handshakes"),
            1..=1_000_000,
            defaults::MAX_HANDSHAKES,
        );
        let handshake_timeout = self.duration(
            t.handshake_timeout.as_ref(),
            &k("handshake_timeout"),
            defaults::HANDSHAKE_TIMEOUT,
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
        // SPEC §8: the certificate a client of this listener verifies is this listener's own
        // (or the SNI certificate for the name it asks for): it must cover every name.
        for n in names {
            let (covered, by_sni) = certs.covers(n);
            if !covered {
                let file = match by_sni {
                    true => "its SNI certificate".to_string(),
                    false => format!("{}", self.path(t.cert.get_ref()).display()),
                };
                self.error(
                    t.cert.span(),
                    k("cert"),
                    format!(
                        "listener names {n:?}, which {file} does not cover: clients using that name will fail with \"certificate is valid for ..., not {n}\"; add it to the certificate's SANs"
                    ),
                );
            }
        }
        let client_ca = t.client_ca.as_ref().and_then(|c| {
            let key = k("client_ca");
            let (path, pem) = self.read(c, &key)?;
            match crate::tls::roots_from_pem(&pem, &path.display().to_string()) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    self.error(
                        c.span(),
                        &key,
                        format!("{e}: expected a PEM bundle of one or more CA certificates"),
                    );
                    None
                }
            }
        });
        let require_client_cert = t.require_client_cert.as_ref().is_some_and(|v| *v.get_ref());
        if let (Some(v), None) = (&t.require_client_cert, &t.client_ca) {
            if *v.get_ref() {
                self.error(v.span(), k("require_client_cert"), "require_client_cert needs client_ca: the bundle the client certificates are verified against");
            }
        }
        let verifier = match &client_ca {
            None => None,
            Some(roots) => {
                let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    crate::tls::provider(),
                );
                let b = if require_client_cert {
                    b
                } else {
                    b.allow_unauthenticated()
                };
                match b.build() {
                    Ok(v) => Some(v),
                    Err(e) => {
                        if let Some(c) = &t.client_ca {
                            self.error(
                                c.span(),
                                k("client_ca"),
                                format!("cannot verify clients with it: {e}"),
                            );
                        }
                        None
                    }
                }
            }
        };
        let server = match crate::tls::TerminateServer::with_clients(certs.clone(), verifier) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.error(t.cert.span(), k("cert"), e.to_string());
                return None;
            }
        };
        Some(ListenerTlsConfig {
            handshake_timeout,
            max_handshakes,
            alpn,
            certs,
            server,
            client_ca,
            require_client_cert,
        })
    }

    /// `names`: DNS names or IP addresses, each once.
    fn names(&mut self, i: usize, v: Option<&Spanned<Vec<String>>>) -> Vec<String> {
        let Some(v) = v else { return Vec::new() };
        let key = format!("listener[{i}].names");
        let mut out: Vec<String> = Vec::new();
        for n in v.get_ref() {
            let n = n.trim().trim_end_matches('.').to_ascii_lowercase();
            let ip = n
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>();
            let valid = ip.is_ok()
                || (!n.contains('*') && rustls::pki_types::DnsName::try_from(n.as_str()).is_ok());
            if !valid {
                self.error(
                    v.span(),
                    &key,
                    format!("{n:?} is not a DNS name or an IP address (wildcards belong in certificates, not here)"),
                );
            } else if out.contains(&n) {
                self.error(v.span(), &key, format!("{n:?} is listed twice"));
            } else {
                out.push(ip.map_or(n, |ip| ip.to_string()));
            }
        }
        out
    }
}
