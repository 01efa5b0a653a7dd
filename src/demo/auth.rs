//! How the simulated apiserver authenticates a request, as kube-apiserver's authenticators
//! do: the request-header (front-proxy) authenticator first, then bearer tokens, then client
//! certificates from the client CA, then anonymous when allowed. Pure: certificates and
//! headers in, an identity and how it was decided out.

use hyper::body::Incoming;
use hyper::Request;

use crate::tls;

/// A Kubernetes identity: what the apiserver's authenticators produce.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The user name (certificate CN, or the token's user).
    pub user: String,
    /// The groups (certificate O values, or the token's groups).
    pub groups: Vec<String>,
}

impl Identity {
    /// The identity of a caller with no credentials.
    pub fn anonymous() -> Self {
        Self {
            user: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
        }
    }
}

/// What a simulated apiserver trusts as an authenticating front proxy (kube-apiserver's
/// `--requestheader-*` flags, with kubeadm's header names: `X-Remote-User`,
/// `X-Remote-Group`, `X-Remote-Extra-`).
#[derive(Debug, Clone)]
pub struct FrontProxy {
    /// The front-proxy CA bundle, PEM.
    pub ca_pem: String,
    /// Allowed certificate CNs; empty: any certificate of the CA.
    pub allowed_names: Vec<String>,
}

/// How a client's certificate authenticates.
#[derive(Debug, Clone)]
pub(crate) enum CertAuth {
    /// No usable certificate.
    None,
    /// A user certificate from the client CA.
    X509(Identity),
    /// An allowed front proxy: the user comes from the request headers.
    FrontProxy,
}

/// How the client certificate `leaf` authenticates, given what the server trusts as a front
/// proxy (its CA and allowed names).
pub(crate) fn cert_auth(
    leaf: Option<&[u8]>,
    front_proxy: Option<&(rustls::RootCertStore, Vec<String>)>,
) -> CertAuth {
    match (leaf, front_proxy) {
        (None, _) => CertAuth::None,
        (Some(c), Some((fp, allowed))) if tls::issued_by_one_of(c, fp) => {
            // A front-proxy certificate is never an x509 user, allowed or not.
            match identity_from_cert(c) {
                Some(id) if allowed.is_empty() || allowed.contains(&id.user) => {
                    CertAuth::FrontProxy
                }
                _ => CertAuth::None,
            }
        }
        (Some(c), _) => identity_from_cert(c).map_or(CertAuth::None, CertAuth::X509),
    }
}

/// User (CN) and groups (every O) of a client certificate; `None` if it cannot be parsed.
fn identity_from_cert(der: &[u8]) -> Option<Identity> {
    let (user, groups) = tls::subject_identity(der)?;
    Some(Identity { user, groups })
}

/// Who the caller is and how that was decided (`token`, `x509`, `anonymous`); `None` is a 401.
/// Bearer tokens win over certificates, as in kube-apiserver's union authenticator; a
/// token that is not on the list is a 401, not a fall-back to anonymous.
pub(crate) fn authenticate(
    req: &Request<Incoming>,
    tokens: &[(String, Identity)],
    anonymous: bool,
    cert: &CertAuth,
) -> Option<(Identity, &'static str)> {
    // The request-header authenticator comes first, as in kube-apiserver: an allowed front
    // proxy's request is the user its headers name; without a user header it is a 401.
    if let CertAuth::FrontProxy = cert {
        let h = req.headers();
        let user = h.get("x-remote-user").and_then(|v| v.to_str().ok())?;
        let groups = h
            .get_all("x-remote-group")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect();
        return Some((
            Identity {
                user: user.to_string(),
                groups,
            },
            "front-proxy",
        ));
    }
    let cert = match cert {
        CertAuth::X509(id) => Some(id),
        _ => None,
    };
    match req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        Some(token) => match tokens.iter().find(|(t, _)| t == token.trim()) {
            Some((_, id)) => Some((id.clone(), "token")),
            None => None,
        },
        None => match cert {
            Some(id) => Some((id.clone(), "x509")),
            None if anonymous => Some((Identity::anonymous(), "anonymous")),
            None => None,
        },
    }
}
