//! Just enough kubeconfig for `apilb load`: the server, the CA and the user's credentials
//! (client certificate and key, or a bearer token) of one context, inline (`*-data`) or by
//! file (relative to the kubeconfig's folder, as kubectl reads them).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// Who to connect to and as whom.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// `https://host:port` (a path after it is ignored).
    pub server: String,
    /// The CA bundle the server's certificate must chain to, PEM; `None`: the system's
    /// roots are not loaded, so a server without a CA is refused.
    pub ca_pem: Option<String>,
    /// A client certificate and key, PEM.
    pub cert_pem: Option<(String, String)>,
    /// A bearer token.
    pub token: Option<String>,
    /// The TLS server name to ask for, when it is not the server's host.
    pub tls_server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default)]
    current_context: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Debug, Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Debug, Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    #[serde(default)]
    certificate_authority: Option<PathBuf>,
    #[serde(default)]
    certificate_authority_data: Option<String>,
    #[serde(default)]
    tls_server_name: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct User {
    #[serde(default)]
    client_certificate: Option<PathBuf>,
    #[serde(default)]
    client_certificate_data: Option<String>,
    #[serde(default)]
    client_key: Option<PathBuf>,
    #[serde(default)]
    client_key_data: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    exec: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: Option<String>,
}

/// Reads `path` and returns the credentials of `context` (default: the current context).
///
/// # Errors
/// A message naming the file and what is missing or unreadable.
pub fn load(path: &Path, context: Option<&str>) -> Result<Credentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, context, base).map_err(|e| format!("kubeconfig {}: {e}", path.display()))
}

/// Parses kubeconfig `text`; relative file names are read from `base`.
///
/// # Errors
/// What is missing or unreadable.
pub fn parse(text: &str, context: Option<&str>, base: &Path) -> Result<Credentials, String> {
    let file: File = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let ctx_name = context
        .map(str::to_string)
        .or_else(|| file.current_context.clone().filter(|c| !c.is_empty()))
        .ok_or("no --context given and no current-context set")?;
    let ctx = &file
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .ok_or_else(|| format!("no context named {ctx_name:?}"))?
        .context;
    let cluster = &file
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .ok_or_else(|| {
            format!(
                "context {ctx_name:?} names cluster {:?}, which is not there",
                ctx.cluster
            )
        })?
        .cluster;
    if cluster.insecure_skip_tls_verify {
        return Err(format!(
            "cluster {:?} sets insecure-skip-tls-verify; apilb load always verifies the server",
            ctx.cluster
        ));
    }
    let default_user = User::default();
    let user = match &ctx.user {
        Some(u) => {
            &file
                .users
                .iter()
                .find(|x| &x.name == u)
                .ok_or_else(|| {
                    format!("context {ctx_name:?} names user {u:?}, which is not there")
                })?
                .user
        }
        None => &default_user,
    };
    if user.exec.is_some() {
        return Err("exec credential plugins are not supported: use a client certificate or a token (--token)".into());
    }
    let read = |p: &Path| -> Result<String, String> {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        };
        std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let data = |d: &str, what: &str| -> Result<String, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map_err(|e| format!("{what} is not base64: {e}"))?;
        String::from_utf8(bytes).map_err(|_| format!("{what} is not PEM text"))
    };
    let pick = |file: &Option<PathBuf>,
                inline: &Option<String>,
                what: &str|
     -> Result<Option<String>, String> {
        match (inline, file) {
            (Some(d), _) => data(d, what).map(Some),
            (None, Some(p)) => read(p).map(Some),
            (None, None) => Ok(None),
        }
    };
    let ca_pem = pick(
        &cluster.certificate_authority,
        &cluster.certificate_authority_data,
        "certificate-authority-data",
    )?;
    let cert = pick(
        &user.client_certificate,
        &user.client_certificate_data,
        "client-certificate-data",
    )?;
    let key = pick(&user.client_key, &user.client_key_data, "client-key-data")?;
    let cert_pem = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(format!("user of context {ctx_name:?} has a client certificate without its key, or a key without its certificate")),
    };
    let token = match (&user.token, &user.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(p)) => Some(read(p)?.trim().to_string()),
        (None, None) => None,
    };
    Ok(Credentials {
        server: cluster.server.clone(),
        ca_pem,
        cert_pem,
        token,
        tls_server_name: cluster.tls_server_name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_demo_kubeconfig_and_names_what_is_missing() {
        let pki = crate::demo::pki::Pki::generate().expect("pki");
        let text = crate::demo::kubeconfig_yaml("https://127.0.0.1:6443", &pki);
        let c = parse(&text, None, Path::new("/")).expect("parse");
        assert_eq!(c.server, "https://127.0.0.1:6443");
        assert_eq!(c.ca_pem.as_deref(), Some(pki.ca.cert_pem.as_str()));
        assert_eq!(c.cert_pem.map(|(c, _)| c), Some(pki.admin.cert_pem.clone()));
        let tok = parse(
            &crate::demo::token_kubeconfig_yaml("https://127.0.0.1:8443", &pki),
            None,
            Path::new("/"),
        )
        .expect("token kubeconfig");
        assert_eq!(tok.token.as_deref(), Some(crate::demo::DEMO_TOKEN));
        let err = parse(&text, Some("nope"), Path::new("/")).expect_err("no such context");
        assert!(err.contains("no context named \"nope\""), "{err}");
        assert!(parse("clusters: [", None, Path::new("/")).is_err());
    }
}
