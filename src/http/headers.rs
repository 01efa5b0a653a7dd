//! The header rules of the front-proxy identity mode (SPEC §10), pure: what is removed from
//! every request whatever the client sent, what is set from a verified certificate, and how
//! a request is named for the log and the duration histogram.
//!
//! The gateway is the trust boundary: every header named `user_header` or `group_header`, or
//! starting with `extra_header_prefix`, is removed case-insensitively (hyper keeps names in
//! lower case, in HTTP/1.1 and h2 alike, and repeated headers are all removed), and
//! `X-Forwarded-For` is replaced by the client's address. Only then are the identity
//! headers set, from the certificate alone.

use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::IdentityConfig;

/// Who a verified client certificate names: its subject CN and each subject O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verified {
    /// The user (CN).
    pub(crate) user: String,
    /// The groups (O, in certificate order).
    pub(crate) groups: Vec<String>,
}

impl Verified {
    /// The subject of a DER certificate (already verified by rustls against `client_ca`);
    /// `None` without a CN, which kube-apiserver would not accept either.
    /// `None` (the client is treated as unverified: no identity headers, no front-proxy
    /// connection) unless the certificate names exactly one CN and every name can travel as
    /// a header unchanged: no spaces at either end (an HTTP/1.1 reader trims them, so
    /// `"system:node:a "` would arrive as `system:node:a`), no control characters.
    pub(crate) fn of(der: &[u8]) -> Option<Self> {
        let (user, groups) = crate::tls::subject_identity(der)?;
        let clean = |v: &str| {
            !v.is_empty()
                && v.trim() == v
                && !v.chars().any(char::is_control)
                && HeaderValue::from_str(v).is_ok()
        };
        if !clean(&user) || !groups.iter().all(|g| clean(g)) {
            return None;
        }
        Some(Self { user, groups })
    }
}

/// Headers that claim the client's address (kube-apiserver's audit reads X-Real-Ip after
/// X-Forwarded-For): none of the client's own reach the apiserver.
const CLIENT_ADDRESS: [&str; 3] = ["x-forwarded-for", "x-real-ip", "forwarded"];

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), and not allowed at all
/// in HTTP/2.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
];

/// Applies SPEC §10 to a request's headers: strips every identity header and
/// `X-Forwarded-For`, sets `X-Forwarded-For` to `client` (the address, made once per
/// connection), and the identity headers from
/// `verified`. `upgrade`: the request is an upgrade, whose `Connection`/`Upgrade` headers
/// must reach the backend; otherwise hop-by-hop headers go too.
pub(crate) fn prepare(
    headers: &mut HeaderMap,
    id: &IdentityConfig,
    verified: Option<&Verified>,
    client: &HeaderValue,
    upgrade: bool,
) {
    // Names in the config are any case; hyper's are lower case.
    let user = id.user_header.as_str();
    let group = id.group_header.as_str();
    let extra = id.extra_header_prefix.as_str();
    let doomed = |k: &str| {
        k.eq_ignore_ascii_case(user)
            || k.eq_ignore_ascii_case(group)
            || k.get(..extra.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(extra))
            || CLIENT_ADDRESS.contains(&k)
            || (!upgrade && HOP_BY_HOP.contains(&k))
    };
    // Most requests carry none of them: no allocation then.
    if headers.keys().any(|k| doomed(k.as_str())) {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|k| doomed(k.as_str()))
            .cloned()
            .collect();
        for k in names {
            headers.remove(&k);
        }
    }
    headers.insert(HeaderName::from_static("x-forwarded-for"), client.clone());
    let Some(v) = verified else { return };
    // HeaderName::from_bytes lower-cases.
    let (Ok(user_name), Ok(group_name)) = (
        HeaderName::from_bytes(user.as_bytes()),
        HeaderName::from_bytes(group.as_bytes()),
    ) else {
        return;
    };
    if let Ok(u) = HeaderValue::from_str(&v.user) {
        headers.insert(user_name, u);
    }
    for g in &v.groups {
        if let Ok(g) = HeaderValue::from_str(g) {
            headers.append(group_name.clone(), g);
        }
    }
}

/// The Kubernetes verb of a request, as the access log and the duration histogram name it:
/// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or `connect`.
pub(crate) fn verb(
    method: &hyper::Method,
    path: &str,
    query: Option<&str>,
    upgrade: bool,
) -> &'static str {
    use hyper::Method;
    if upgrade || method == Method::CONNECT {
        return "connect";
    }
    match *method {
        Method::POST => return "create",
        Method::PUT => return "update",
        Method::PATCH => return "patch",
        Method::DELETE => return "delete",
        _ => {}
    }
    let watching = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| matches!(kv, "watch=true" | "watch=1" | "watch=True"))
    });
    if watching || path.contains("/watch/") {
        return "watch";
    }
    if names_one_object(path) {
        "get"
    } else {
        "list"
    }
}

/// Whether an API path names one object (`.../pods/NAME`, `.../namespaces/NS`) rather than
/// a collection; paths outside `/api` and `/apis` (`/healthz`, `/version`) are reads of one
/// thing.
fn names_one_object(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        // Discovery (`/api`, `/apis/GROUP`) and everything else.
        _ => return true,
    };
    match rest {
        [] => true,
        // namespaces/NS/RESOURCE[/NAME[/SUB]]
        ["namespaces", _ns, _resource] => false,
        ["namespaces", _ns, _resource, ..] => true,
        [_resource] => false,
        [_resource, _name, ..] => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> IdentityConfig {
        let pki = crate::demo::pki::Pki::generate().expect("pki");
        let chain = crate::tls::certs_from_pem(pki.admin.cert_pem.as_bytes(), "c").expect("c");
        let key = crate::tls::key_from_pem(pki.admin.key_pem.as_bytes(), "k").expect("k");
        IdentityConfig {
            client: crate::tls::Identity::new(chain, key).expect("identity"),
            user_header: "X-Remote-User".into(),
            group_header: "X-Remote-Group".into(),
            extra_header_prefix: "X-Remote-Extra-".into(),
        }
    }

    fn spoofed() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("X-Remote-User", "admin"),
            ("x-remote-user", "root"),
            ("X-REMOTE-GROUP", "system:masters"),
            ("x-remote-group", "system:masters"),
            ("X-Remote-Extra-Scopes", "x"),
            ("x-remote-extra-", "y"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Real-Ip", "1.2.3.4"),
            ("Forwarded", "for=1.2.3.4"),
            ("Authorization", "Bearer t"),
            ("Connection", "keep-alive"),
            ("Accept", "application/json"),
        ] {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_static(v),
            );
        }
        h
    }

    #[test]
    fn spoofed_identity_headers_are_removed_for_clients_without_certificates() {
        let mut h = spoofed();
        prepare(
            &mut h,
            &id(),
            None,
            &HeaderValue::from_static("10.0.0.9"),
            false,
        );
        assert!(h.get("x-remote-user").is_none());
        assert!(h.get("x-remote-group").is_none());
        assert!(h.keys().all(|k| !k.as_str().starts_with("x-remote-extra-")));
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert!(h.get("x-real-ip").is_none() && h.get("forwarded").is_none());
        // The token passes untouched; hop-by-hop headers do not.
        assert_eq!(h["authorization"], "Bearer t");
        assert!(h.get("connection").is_none());
        assert_eq!(h["accept"], "application/json");
    }

    #[test]
    fn a_verified_certificate_sets_user_and_one_group_header_per_organization() {
        let mut h = spoofed();
        let v = Verified {
            user: "system:node:worker0".into(),
            groups: vec!["system:nodes".into(), "extra".into()],
        };
        prepare(
            &mut h,
            &id(),
            Some(&v),
            &HeaderValue::from_static("10.0.0.9"),
            false,
        );
        let users: Vec<_> = h.get_all("x-remote-user").iter().collect();
        assert_eq!(users, ["system:node:worker0"]);
        let groups: Vec<_> = h.get_all("x-remote-group").iter().collect();
        assert_eq!(groups, ["system:nodes", "extra"]);
        assert!(h.keys().all(|k| !k.as_str().starts_with("x-remote-extra-")));
    }

    #[test]
    fn custom_header_names_are_stripped_in_any_case() {
        let mut cfg = id();
        cfg.user_header = "X-Auth-User".into();
        cfg.group_header = "X-Auth-Groups".into();
        cfg.extra_header_prefix = "X-Auth-Extra-".into();
        let mut h = HeaderMap::new();
        h.insert("x-auth-user", HeaderValue::from_static("admin"));
        h.insert("x-auth-extra-a", HeaderValue::from_static("1"));
        h.insert("x-remote-user", HeaderValue::from_static("kept"));
        prepare(&mut h, &cfg, None, &HeaderValue::from_static("::1"), false);
        assert!(h.get("x-auth-user").is_none() && h.get("x-auth-extra-a").is_none());
        assert_eq!(h["x-remote-user"], "kept");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn upgrades_keep_their_connection_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("SPDY/3.1"));
        prepare(
            &mut h,
            &id(),
            None,
            &HeaderValue::from_static("10.0.0.1"),
            true,
        );
        assert_eq!(h["upgrade"], "SPDY/3.1");
    }

    #[test]
    fn the_verb_follows_method_path_and_watch() {
        use hyper::Method;
        let cases = [
            (Method::GET, "/api/v1/pods", None, "list"),
            (Method::GET, "/api/v1/namespaces/default/pods", None, "list"),
            (
                Method::GET,
                "/api/v1/namespaces/default/pods/p",
                None,
                "get",
            ),
            (Method::GET, "/api/v1/namespaces/default", None, "get"),
            (Method::GET, "/api/v1/namespaces", None, "list"),
            (
                Method::GET,
                "/api/v1/pods",
                Some("watch=true&rv=1"),
                "watch",
            ),
            (
                Method::GET,
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n",
                None,
                "get",
            ),
            (Method::GET, "/healthz", None, "get"),
            (
                Method::POST,
                "/api/v1/namespaces/default/pods",
                None,
                "create",
            ),
            (Method::PUT, "/api/v1/nodes/n", None, "update"),
            (Method::PATCH, "/api/v1/nodes/n/status", None, "patch"),
            (
                Method::DELETE,
                "/api/v1/namespaces/default/pods/p",
                None,
                "delete",
            ),
        ];
        for (m, p, q, want) in cases {
            assert_eq!(verb(&m, p, q, false), want, "{m} {p} {q:?}");
        }
        assert_eq!(
            verb(
                &Method::POST,
                "/api/v1/namespaces/d/pods/p/exec",
                None,
                true
            ),
            "connect"
        );
    }

    #[test]
    fn names_that_would_change_on_the_way_are_not_an_identity() {
        let ca = crate::demo::pki::Ca::new("c").expect("ca");
        for (cn, groups) in [
            ("system:node:victim ", vec![]),
            (" admin", vec![]),
            ("admin", vec!["system:masters "]),
            ("adm\tin", vec![]),
        ] {
            let c = ca.client(cn, &groups).expect("cert");
            let der = crate::tls::certs_from_pem(c.cert_pem.as_bytes(), "c").expect("der");
            assert_eq!(Verified::of(der[0].as_ref()), None, "{cn:?} {groups:?}");
        }
        let c = ca
            .client("system:node:worker0", &["system:nodes"])
            .expect("cert");
        let der = crate::tls::certs_from_pem(c.cert_pem.as_bytes(), "c").expect("der");
        assert_eq!(
            Verified::of(der[0].as_ref()),
            Some(Verified {
                user: "system:node:worker0".into(),
                groups: vec!["system:nodes".into()]
            })
        );
    }
}
