//! `apilb demo-apiserver` (hidden): the simulated apiservers of [`super::apiserver`] on
//! addresses of the caller's choosing, without a gateway, for tests that put the apiservers
//! and the gateways in different places (the HA tests in `tests/ha/` run them in their own
//! network namespace).
//!
//! The PKI lives in a folder so that gateways and clients started separately can share it:
//! a folder that already holds `ca.crt`, `apiserver.crt` and `apiserver.key` is reused as it
//! is; otherwise a fresh [`Pki`] is written there (client certificates included). Each
//! `--listen` address gets one server, named `apiserver-0`, `apiserver-1`, ...; one line per
//! server (`NAME ADDR`) goes to stdout once all are listening, then it runs until `shutdown`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::apiserver::{ApiServer, ApiServerOptions, Identity};
use super::pki::Pki;
use super::{DemoError, DEMO_TOKEN};

/// What `apilb demo-apiserver` was asked for.
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    /// One simulated apiserver per address (`--listen`, repeated).
    pub listen: Vec<SocketAddr>,
    /// Where the PKI is read from, or written to when it is not there (`--dir`).
    pub dir: PathBuf,
    /// Time between the events of a watch stream (`--watch-interval`).
    pub watch_interval: Duration,
}

/// The serving certificate, its key and the client CA: read from `dir` when all three are
/// there, else from a new PKI written to `dir`.
fn serving_material(dir: &Path) -> Result<(String, String, String), DemoError> {
    let files_err = |source| DemoError::Files {
        dir: dir.to_path_buf(),
        source,
    };
    let (ca, cert, key) = (
        dir.join("ca.crt"),
        dir.join("apiserver.crt"),
        dir.join("apiserver.key"),
    );
    if ca.is_file() && cert.is_file() && key.is_file() {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(files_err);
        return Ok((read(&cert)?, read(&key)?, read(&ca)?));
    }
    let pki = Pki::generate()?;
    pki.write_to(dir).map_err(files_err)?;
    let Pki { ca, apiserver, .. } = pki;
    Ok((apiserver.cert_pem, apiserver.key_pem, ca.cert_pem))
}

/// Starts one simulated apiserver per address and serves until `shutdown` completes.
///
/// # Errors
/// The PKI cannot be read or written, or a server cannot start (a taken address names it).
pub async fn run(
    opts: StandaloneOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    // Reading or generating keys is blocking work: off the runtime's workers.
    let dir = opts.dir.clone();
    let (cert_pem, key_pem, client_ca_pem) =
        tokio::task::spawn_blocking(move || serving_material(&dir))
            .await
            .map_err(|e| DemoError::Files {
                dir: opts.dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })??;
    let mut servers = Vec::with_capacity(opts.listen.len());
    for (i, listen) in opts.listen.iter().enumerate() {
        servers.push(
            ApiServer::start(ApiServerOptions {
                name: format!("apiserver-{i}"),
                listen: *listen,
                cert_pem: cert_pem.clone(),
                key_pem: key_pem.clone(),
                client_ca_pem: client_ca_pem.clone(),
                tokens: vec![(
                    DEMO_TOKEN.to_string(),
                    Identity {
                        user: "demo-user".into(),
                        groups: vec!["system:authenticated".into()],
                    },
                )],
                watch_interval: opts.watch_interval,
                anonymous: true,
            })
            .await?,
        );
    }
    // Scripts wait for these lines, so they go out together and at once.
    let lines: String = servers
        .iter()
        .map(|s| format!("{} {}\n", s.name(), s.addr()))
        .collect();
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(lines.as_bytes());
        let _ = out.flush();
    }
    tracing::info!(servers = servers.len(), dir = %opts.dir.display(), "simulated apiservers listening");
    shutdown.await;
    tracing::info!("simulated apiservers stopping");
    drop(servers);
    Ok(())
}
