//! `apilb demo`: a whole cluster front door on loopback, from nothing but the binary.
//!
//! Writes a throwaway PKI ([`pki`]), an admin kubeconfig and the gateway's own `apilb.toml`
//! to a folder, starts three simulated kube-apiservers ([`apiserver`]) on ephemeral ports,
//! then loads that `apilb.toml` through the same [`crate::config::load`] path as
//! `apilb run` and starts the gateway in front of them. What to try is printed to stdout with
//! literal paths and ports; logs go to stderr.

pub mod api;
pub mod apiserver;
mod auth;
pub mod pki;
pub mod standalone;

use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

use self::apiserver::{ApiServer, ApiServerOptions, Identity};
use self::pki::Pki;

/// The bearer token the demo apiservers accept, and who it stands for.
pub const DEMO_TOKEN: &str = "apilb-demo-token";

/// What `apilb demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The gateway's passthrough listener (`--passthrough`).
    pub passthrough: SocketAddr,
    /// The gateway's terminate listener with the "public" certificate (`--terminate`).
    pub terminate: SocketAddr,
    /// The admin server: metrics, readiness, status page (`--admin`).
    pub admin: SocketAddr,
    /// Keep the PKI, kubeconfig and config here instead of a temp folder (`--dir`).
    pub dir: Option<PathBuf>,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Generating the PKI failed.
    #[error("cannot generate the demo PKI: {0}")]
    Pki(#[from] rcgen::Error),
    /// Writing the demo files failed.
    #[error("cannot write the demo files to {dir}: {source}")]
    Files {
        /// The folder.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A simulated apiserver did not start.
    #[error(transparent)]
    ApiServer(#[from] apiserver::ApiServerError),
    /// The generated config did not validate (a bug in the demo).
    #[error("the demo's own config is invalid:\n{0}")]
    Config(#[from] crate::config::ConfigErrors),
    /// A gateway address given on the command line cannot be used.
    #[error("{flag} {addr}: {source}")]
    Flag {
        /// The flag that named the address.
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why it cannot be bound.
        #[source]
        source: std::io::Error,
    },
    /// The gateway did not start for another reason.
    #[error(transparent)]
    Start(#[from] crate::StartError),
    /// The gateway did not stop cleanly.
    #[error(transparent)]
    Stop(#[from] crate::GatewayError),
}

/// Runs the demo until `shutdown` completes, printing what to try to stdout.
///
/// # Errors
/// See [`DemoError`]; a taken port names its flag.
pub async fn run(
    opts: DemoOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DemoError> {
    // Kept alive until the end of the demo, so a temp folder is removed only then.
    let (_temp, dir) = match &opts.dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::Builder::new()
                .prefix("apilb-demo-")
                .tempdir()
                .map_err(|source| DemoError::Files {
                    dir: std::env::temp_dir(),
                    source,
                })?;
            let d = t.path().to_path_buf();
            (Some(t), d)
        }
    };
    let files_err = |source| DemoError::Files {
        dir: dir.clone(),
        source,
    };

    let pki = Pki::generate()?;
    let files = pki.write_to(&dir).map_err(files_err)?;

    // One store behind the three apiservers, as etcd is behind real ones.
    let store = api::store::Store::new(api::store::StoreLimits::default());
    api::seed_demo(&store);
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(
            ApiServer::start_with_front_proxy(
                ApiServerOptions {
                    name: format!("apiserver-{i}"),
                    listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                    cert_pem: pki.apiserver.cert_pem.clone(),
                    key_pem: pki.apiserver.key_pem.clone(),
                    client_ca_pem: pki.ca.cert_pem.clone(),
                    tokens: vec![(
                        DEMO_TOKEN.to_string(),
                        Identity {
                            user: "demo-user".into(),
                            groups: vec!["system:authenticated".into()],
                        },
                    )],
                    watch_interval: Duration::from_secs(1),
                    anonymous: true,
                },
                Some(store.clone()),
                // As kubeadm configures kube-apiserver: --requestheader-client-ca-file and
                // --requestheader-allowed-names=front-proxy-client.
                apiserver::FrontProxy {
                    ca_pem: pki.front_proxy_ca.cert_pem.clone(),
                    allowed_names: vec!["front-proxy-client".into()],
                },
            )
            .await?,
        );
    }

    let config_path = dir.join("apilb.toml");
    std::fs::write(&config_path, demo_config(&opts, &servers, &files)).map_err(files_err)?;
    // Loading reads files: off the runtime's workers, as every load is.
    let path = config_path.clone();
    let cfg = tokio::task::spawn_blocking(move || crate::config::load(&path))
        .await
        .map_err(|e| DemoError::Files {
            dir: config_path.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
    let gateway = match crate::Gateway::start(cfg, crate::GatewayOptions::default(), shutdown).await
    {
        Ok(g) => g,
        Err(crate::StartError::Bind {
            listener,
            addr,
            source,
        }) => {
            let flag = match listener.as_str() {
                "public" => "--terminate",
                "admin" => "--admin",
                _ => "--passthrough",
            };
            return Err(DemoError::Flag { flag, addr, source });
        }
        Err(e) => return Err(e.into()),
    };
    let passthrough = gateway.addr("passthrough").unwrap_or(opts.passthrough);
    let terminate = gateway.addr("public").unwrap_or(opts.terminate);
    let admin = gateway.admin_addr().unwrap_or(opts.admin);

    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(&url_base(passthrough), &pki))
        .map_err(files_err)?;
    let token_kubeconfig = dir.join("token-kubeconfig");
    std::fs::write(
        &token_kubeconfig,
        token_kubeconfig_yaml(&url_base(terminate), &pki),
    )
    .map_err(files_err)?;
    let public_kubeconfig = dir.join("public-kubeconfig");
    std::fs::write(
        &public_kubeconfig,
        public_kubeconfig_yaml(&url_base(terminate), &pki),
    )
    .map_err(files_err)?;
    let shown = Shown {
        passthrough,
        terminate,
        admin,
        files: &files,
        kubeconfig: &kubeconfig,
        token_kubeconfig: &token_kubeconfig,
        public_kubeconfig: &public_kubeconfig,
        config: &config_path,
    };
    println!("{}", instructions(&servers, &shown));

    let report = gateway.wait().await?;
    tracing::info!(forced = report.forced, "demo stopped");
    drop(servers);
    Ok(())
}

/// The gateway config the demo runs, written out so users can read and reuse it.
fn demo_config(opts: &DemoOptions, servers: &[ApiServer], files: &pki::PkiFiles) -> String {
    let mut s = String::from(
        "# Written by `apilb demo`: the gateway in front of three simulated apiservers.\n\
         # Run it yourself with: apilb run --config <this file>\n\n",
    );
    let _ = write!(s, "[admin]\nlisten = \"{}\"\n\n", opts.admin);
    let _ = write!(
        s,
        "[[pool]]\nname = \"apiservers\"\nbalance = \"least-conn\"\nconnect_timeout = \"2s\"\ndrain_timeout = \"5s\"\nslow_start = \"10s\"\n\
         \n  [pool.health]\n  check = \"https\"\n  path = \"/readyz\"\n  interval = \"2s\"\n  timeout = \"1s\"\n\
         \n  [pool.tls]\n  ca = \"{}\"\n  server_name = \"kubernetes\"\n",
        files.ca.display()
    );
    for srv in servers {
        let _ = write!(
            s,
            "\n  [[pool.backend]]\n  name = \"{}\"\n  address = \"{}\"\n",
            srv.name(),
            srv.addr()
        );
    }
    let _ = write!(
        s,
        "\n[[listener]]\nname = \"passthrough\"\nlisten = \"{}\"\nmode = \"passthrough\"\npool = \"apiservers\"\nidle_timeout = \"1h\"\n\
         names = [\"localhost\", \"127.0.0.1\"]   # what clients connect to; `apilb probe` checks the apiservers' certificates cover them\n\
         \n[[listener]]\nname = \"public\"\nlisten = \"{}\"\nmode = \"terminate\"\npool = \"apiservers\"\nidle_timeout = \"1h\"\n\
         names = [\"localhost\", \"apilb.demo.test\"]\n\
         \n  [listener.tls]\n  cert = \"{}\"\n  key = \"{}\"\n  handshake_timeout = \"10s\"\n         \x20 client_ca = \"{}\"   # client certificates are verified here, and passed on as front-proxy headers\n         \n  [listener.identity]   # one public endpoint for certificate and token users (SPEC §10)\n         \x20 client_cert = \"{}\"\n  client_key = \"{}\"\n",
        opts.passthrough,
        opts.terminate,
        files.public_cert.display(),
        files.public_key.display(),
        files.ca.display(),
        files.front_proxy_client_cert.display(),
        files.front_proxy_client_key.display(),
    );
    s
}

/// `https://host:port` for an address clients can connect to: a wildcard listen address is
/// reached through loopback, which the demo certificate covers.
pub fn url_base(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("https://{}", SocketAddr::new(ip, addr.port()))
}

/// A kubeconfig for a token user of the terminate listener: the public CA, a bearer token,
/// no client certificate.
pub fn token_kubeconfig_yaml(server: &str, pki: &Pki) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: apilb-demo-public\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: demo-user\n  user:\n    token: {DEMO_TOKEN}\ncontexts:\n- name: demo-user@apilb-demo-public\n  context:\n    cluster: apilb-demo-public\n    user: demo-user\ncurrent-context: demo-user@apilb-demo-public\n",
        ca = b64(&pki.public_ca.cert_pem),
    )
}

/// An admin kubeconfig for the terminate listener in front-proxy mode: the public CA with
/// the admin certificate, which the gateway verifies and passes on as `X-Remote-User`.
pub fn public_kubeconfig_yaml(server: &str, pki: &Pki) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: apilb-demo-public\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: admin@apilb-demo-public\n  context:\n    cluster: apilb-demo-public\n    user: admin\ncurrent-context: admin@apilb-demo-public\n",
        ca = b64(&pki.public_ca.cert_pem),
        cert = b64(&pki.admin.cert_pem),
        key = b64(&pki.admin.key_pem),
    )
}

/// An admin kubeconfig pointing at the gateway, with the CA, certificate and key embedded.
pub fn kubeconfig_yaml(server: &str, pki: &Pki) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: apilb-demo\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: admin@apilb-demo\n  context:\n    cluster: apilb-demo\n    user: admin\ncurrent-context: admin@apilb-demo\n",
        ca = b64(&pki.ca.cert_pem),
        cert = b64(&pki.admin.cert_pem),
        key = b64(&pki.admin.key_pem),
    )
}

/// What the instructions point at.
struct Shown<'a> {
    passthrough: SocketAddr,
    terminate: SocketAddr,
    admin: SocketAddr,
    files: &'a pki::PkiFiles,
    kubeconfig: &'a Path,
    token_kubeconfig: &'a Path,
    public_kubeconfig: &'a Path,
    config: &'a Path,
}

fn instructions(servers: &[ApiServer], w: &Shown<'_>) -> String {
    let f = w.files;
    let url = url_base(w.passthrough);
    let public = url_base(w.terminate);
    let (ca, public_ca) = (f.ca.display(), f.public_ca.display());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "apilb demo is running: three simulated kube-apiservers behind the gateway.\n"
    );
    for srv in servers {
        let _ = writeln!(s, "  {:<12} {}", srv.name(), srv.addr());
    }
    let _ = writeln!(s, "  {:<12} {}  passthrough: TLS goes through untouched, so the apiservers see your client certificate", "gateway", w.passthrough);
    let _ = writeln!(s, "  {:<12} {}  terminate: the gateway's \"public\" certificate; client certificates verified there and passed on as front-proxy identity", "gateway", w.terminate);
    let _ = writeln!(s, "  {:<12} {}  (cluster CA, public CA, admin and node certificates, kubeconfigs, apilb.toml)\n", "files", f.dir.display());
    let _ = writeln!(s, "Certificate users, through the passthrough listener (each answer names the apiserver and who you are):");
    let _ = writeln!(
        s,
        "  curl --cacert {ca} --cert {} --key {} {url}/whoami",
        f.admin_cert.display(),
        f.admin_key.display()
    );
    let _ = writeln!(
        s,
        "  curl --cacert {ca} --cert {} --key {} {url}/whoami",
        f.node_cert.display(),
        f.node_key.display()
    );
    let _ = writeln!(
        s,
        "  kubectl --kubeconfig {} get --raw /whoami",
        w.kubeconfig.display()
    );
    let _ = writeln!(
        s,
        "  kubectl --kubeconfig {} get --raw /version",
        w.kubeconfig.display()
    );
    let _ = writeln!(
        s,
        "  curl -N --cacert {ca} --cert {} --key {} '{url}/api/v1/namespaces/default/pods?watch=1&resourceVersion=0'",
        f.admin_cert.display(),
        f.admin_key.display()
    );
    let kc = w.kubeconfig.display();
    let _ = writeln!(s, "\nThe simulated Kubernetes API (one store behind all three apiservers; no OpenAPI, so apply with --validate=false):");
    let _ = writeln!(s, "  kubectl --kubeconfig {kc} get pods -A");
    let _ = writeln!(s, "  kubectl --kubeconfig {kc} get nodes -w");
    let _ = writeln!(
        s,
        "  kubectl --kubeconfig {kc} apply --validate=false -f pod.yaml"
    );
    let _ = writeln!(
        s,
        "\nLoad-test the fan-out: 100 simulated kubelets, each with its own node certificate, through the passthrough listener:"
    );
    let _ = writeln!(
        s,
        "  {} load --kubeconfig {kc} --node-ca-cert {ca} --node-ca-key {} --nodes 100 --duration 60s --admin http://{}",
        std::env::current_exe().map_or_else(|_| "apilb".to_string(), |p| p.display().to_string()),
        f.ca_key.display(),
        w.admin
    );
    let _ = writeln!(
        s,
        "\nToken users and browsers, through the terminate listener (HTTP/2 end to end):"
    );
    let _ = writeln!(
        s,
        "  curl --cacert {public_ca} -H 'Authorization: Bearer {DEMO_TOKEN}' {public}/whoami"
    );
    let _ = writeln!(
        s,
        "  kubectl --kubeconfig {} get --raw /whoami",
        w.token_kubeconfig.display()
    );
    let _ = writeln!(
        s,
        "\nCertificate users through the same public certificate (front-proxy identity: the gateway verifies the certificate and tells the apiserver who you are):"
    );
    let _ = writeln!(
        s,
        "  curl --cacert {public_ca} --cert {} --key {} {public}/whoami",
        f.admin_cert.display(),
        f.admin_key.display()
    );
    let _ = writeln!(
        s,
        "  kubectl --kubeconfig {} get --raw /whoami",
        w.public_kubeconfig.display()
    );
    let _ = writeln!(
        s,
        "\nWhat the gateway sees: http://{}/status (also /metrics, /readyz, /api/status)",
        w.admin
    );
    let _ = writeln!(s, "  curl -s http://{}/readyz", w.admin);
    let _ = writeln!(
        s,
        "\nBefore going live, check every backend's certificate against the names clients use:"
    );
    let _ = writeln!(
        s,
        "  {} probe --config {}",
        std::env::current_exe().map_or_else(|_| "apilb".to_string(), |p| p.display().to_string()),
        w.config.display()
    );
    let _ = writeln!(
        s,
        "\nThe gateway's config is {}. Ctrl-C stops the demo.",
        w.config.display()
    );
    s
}
