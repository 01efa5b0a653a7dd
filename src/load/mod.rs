//! `apilb load` (SPEC §12): the fan-out load generator. It puts kubelet-like clients (one
//! HTTP/2 connection and, with a node CA, one identity each; two watches, a Lease renewed
//! every 10 s, node status every 60 s) and open-loop LIST load on an apiserver, through the
//! gateway or directly, and reports what it measured ([`stats`]).
//!
//! This file owns the run: checking the options (bad ones are [`LoadError::Args`], exit 2),
//! the credentials from a kubeconfig ([`kubeconfig`]) or flags, minting node certificates,
//! a first request that proves the server is there ([`LoadError::Start`], exit 1), starting
//! the clients evenly over the ramp, the progress line, reading the gateway's spread from
//! `--admin`, and the stop: no request starts after the duration, the ones out are waited
//! for, so the counts are whole.

pub mod client;
pub mod kubeconfig;
pub mod kubelet;
pub mod list;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use self::client::{client_config, split_server, Dialer};
use self::kubelet::{Ctx, NodeConn};
use self::stats::{BackendSpread, Report, Stats};

/// Which load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Simulated kubelets.
    Kubelet,
    /// Open-loop LISTs.
    List,
    /// Both.
    Mixed,
}

impl Profile {
    /// As on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kubelet => "kubelet",
            Self::List => "list",
            Self::Mixed => "mixed",
        }
    }
}

/// Where the credentials come from.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`.
    pub context: Option<String>,
    /// `--server` (overrides the kubeconfig's).
    pub server: Option<String>,
    /// `--ca`.
    pub ca: Option<PathBuf>,
    /// `--cert`.
    pub cert: Option<PathBuf>,
    /// `--key`.
    pub key: Option<PathBuf>,
    /// `--token`.
    pub token: Option<String>,
}

/// What `apilb load` was asked for.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Server and credentials.
    pub source: Source,
    /// `--profile`.
    pub profile: Profile,
    /// `--nodes`.
    pub nodes: usize,
    /// `--duration`.
    pub duration: Duration,
    /// `--ramp`: nodes start evenly over it.
    pub ramp: Duration,
    /// `--qps`.
    pub qps: f64,
    /// `--connections` for the LIST load.
    pub connections: usize,
    /// `--node-ca-cert`, `--node-ca-key`.
    pub node_ca: Option<(PathBuf, PathBuf)>,
    /// `--admin`: an apilb admin address.
    pub admin: Option<String>,
    /// Node names are this, a dash and a number.
    pub node_prefix: String,
    /// Between Lease renewals.
    pub lease_every: Duration,
    /// Between node status updates.
    pub status_every: Duration,
    /// Between progress lines.
    pub progress_every: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            source: Source::default(),
            profile: Profile::Kubelet,
            nodes: 100,
            duration: Duration::from_secs(60),
            ramp: Duration::from_secs(10),
            qps: 50.0,
            connections: 10,
            node_ca: None,
            admin: None,
            node_prefix: "load-node".into(),
            lease_every: Duration::from_secs(10),
            status_every: Duration::from_secs(60),
            progress_every: Duration::from_secs(5),
        }
    }
}

/// Why a run did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad arguments (exit 2).
    #[error("{0}")]
    Args(String),
    /// The run could not start: unreadable files, an unreachable server, refused
    /// credentials (exit 1).
    #[error("{0}")]
    Start(String),
}

fn read(path: &std::path::Path, what: &str) -> Result<String, LoadError> {
    std::fs::read_to_string(path)
        .map_err(|e| LoadError::Start(format!("cannot read {what} {}: {e}", path.display())))
}

fn check(opts: &LoadOptions) -> Result<(), LoadError> {
    let bad = |m: &str| Err(LoadError::Args(m.to_string()));
    if opts.duration.is_zero() {
        return bad("--duration must be longer than 0s");
    }
    let kubelets = matches!(opts.profile, Profile::Kubelet | Profile::Mixed);
    let lists = matches!(opts.profile, Profile::List | Profile::Mixed);
    if kubelets && opts.nodes == 0 {
        return bad("--nodes must be at least 1 for the kubelet and mixed profiles");
    }
    if kubelets && opts.nodes > 100_000 {
        return bad("--nodes is at most 100000");
    }
    if lists && !(opts.qps > 0.0 && opts.qps.is_finite()) {
        return bad("--qps must be more than 0");
    }
    if lists && opts.connections == 0 {
        return bad("--connections must be at least 1");
    }
    if opts.lease_every.is_zero() || opts.status_every.is_zero() || opts.progress_every.is_zero() {
        return bad("intervals must be longer than 0s");
    }
    let s = &opts.source;
    if s.kubeconfig.is_none() && s.server.is_none() {
        return bad(
            "give --kubeconfig FILE, or --server URL with --ca FILE and --cert/--key or --token",
        );
    }
    if s.cert.is_some() != s.key.is_some() {
        return bad("--cert and --key go together");
    }
    if let Some(a) = &opts.admin {
        if !a.starts_with("http://") {
            return bad("--admin takes the gateway's admin address as http://HOST:PORT");
        }
    }
    Ok(())
}

/// The credentials asked for: the kubeconfig's, with any flag overriding its part.
fn credentials(s: &Source) -> Result<kubeconfig::Credentials, LoadError> {
    let mut c = match &s.kubeconfig {
        Some(p) => kubeconfig::load(p, s.context.as_deref()).map_err(LoadError::Start)?,
        None => kubeconfig::Credentials::default(),
    };
    if let Some(server) = &s.server {
        c.server.clone_from(server);
    }
    if let Some(ca) = &s.ca {
        c.ca_pem = Some(read(ca, "--ca")?);
    }
    if let (Some(cert), Some(key)) = (&s.cert, &s.key) {
        c.cert_pem = Some((read(cert, "--cert")?, read(key, "--key")?));
        c.token = None;
    }
    if let Some(t) = &s.token {
        c.token = Some(t.clone());
        c.cert_pem = None;
    }
    if c.ca_pem.is_none() {
        return Err(LoadError::Args(
            "no CA for the server: give --ca FILE (or certificate-authority in the kubeconfig)"
                .into(),
        ));
    }
    Ok(c)
}

/// Runs the load and returns its report; `progress` gets a line every
/// [`LoadOptions::progress_every`].
///
/// # Errors
/// [`LoadError`].
pub async fn run(opts: LoadOptions, mut progress: impl FnMut(&str)) -> Result<Report, LoadError> {
    check(&opts)?;
    let creds = credentials(&opts.source)?;
    let (host, port) = split_server(&creds.server).map_err(LoadError::Args)?;
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| LoadError::Start(format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| LoadError::Start(format!("{host} resolves to no address")))?;
    let ca = creds.ca_pem.clone().unwrap_or_default();
    let identity = creds
        .cert_pem
        .as_ref()
        .map(|(c, k)| (c.as_str(), k.as_str()));
    let base_tls = client_config(&ca, identity).map_err(LoadError::Start)?;
    let name = creds
        .tls_server_name
        .clone()
        .unwrap_or_else(|| host.clone());
    let token = creds.token.as_deref().map(Arc::<str>::from);
    let dialer = Dialer::new(addr, &name, port, base_tls, token).map_err(LoadError::Start)?;

    // The server is there and takes the credentials, or the run does not start.
    let first = dialer
        .connect()
        .await
        .map_err(|(_, e)| LoadError::Start(format!("cannot reach {}: {e}", creds.server)))?;
    match first
        .call(hyper::Method::GET, "/version", None, bytes::Bytes::new())
        .await
    {
        Ok((401, _)) => {
            return Err(LoadError::Start(format!(
                "{} refused the credentials (401 on /version)",
                creds.server
            )))
        }
        Ok(_) => {}
        Err((_, e)) => {
            return Err(LoadError::Start(format!(
                "cannot reach {}: {e}",
                creds.server
            )))
        }
    }
    drop(first);

    let kubelets = matches!(opts.profile, Profile::Kubelet | Profile::Mixed);
    let lists = matches!(opts.profile, Profile::List | Profile::Mixed);
    let names: Vec<String> = if kubelets {
        (0..opts.nodes)
            .map(|i| format!("{}-{i:05}", opts.node_prefix))
            .collect()
    } else {
        Vec::new()
    };
    let stats = Arc::new(Stats::default());
    let node_dialers = node_dialers(&opts, &names, &ca, &dialer).await?;

    let ctx = Arc::new(Ctx {
        stats: stats.clone(),
        stop: CancellationToken::new(),
        lease_every: opts.lease_every,
        status_every: opts.status_every,
    });
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let n = names.len().max(1) as u32;
    for (i, (name, d)) in names.iter().zip(node_dialers).enumerate() {
        // A ramp longer than the run is cut to it.
        let delay = opts
            .ramp
            .min(opts.duration)
            .mul_f64(f64::from(i as u32) / f64::from(n));
        let conn = Arc::new(NodeConn::new(d, stats.clone()));
        tasks.spawn(kubelet::run_node(name.clone(), conn, ctx.clone(), delay));
    }
    if lists {
        let conns = (0..opts.connections)
            .map(|_| Arc::new(NodeConn::new(dialer.clone(), stats.clone())))
            .collect();
        tasks.spawn(list::run_list(conns, opts.qps, opts.duration, ctx.clone()));
    }

    let end = tokio::time::Instant::from_std(started) + opts.duration;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(started) + opts.progress_every,
        opts.progress_every,
    );
    let mut last = (0u64, Duration::ZERO);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(end) => break,
            _ = tick.tick() => {
                let elapsed = started.elapsed();
                let (line, answered) = stats.progress(elapsed, names.len(), last);
                last = (answered, elapsed);
                progress(&line);
            }
        }
    }
    let elapsed = started.elapsed();
    // What is open at the end, and the gateway's spread, before anything closes.
    let open_at_end = stats
        .watches_open
        .load(std::sync::atomic::Ordering::Relaxed);
    let spread = match &opts.admin {
        Some(url) => Some(read_spread(url).await),
        None => None,
    };
    ctx.stop.cancel();
    let wind_down = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(client::REQUEST_TIMEOUT + Duration::from_secs(5), wind_down)
        .await
        .is_err()
    {
        progress("some requests were still out after the wind-down; their counts are missing");
    }
    let mut measured = stats.snapshot(elapsed);
    measured.watches.open = open_at_end.max(0) as u64;
    measured.watches.expected = 2 * names.len() as u64;
    let (spread, spread_error) = match spread {
        Some(Ok(s)) => (Some(s), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    Ok(Report {
        profile: opts.profile.as_str().into(),
        server: creds.server.clone(),
        nodes: names.len(),
        qps: lists.then_some(opts.qps),
        measured,
        spread,
        spread_error,
    })
}

/// One dialer per node: with a node CA, each with its own minted identity
/// (`CN=system:node:NAME`, `O=system:nodes`); without, all with the given credentials.
async fn node_dialers(
    opts: &LoadOptions,
    names: &[String],
    ca: &str,
    dialer: &Dialer,
) -> Result<Vec<Dialer>, LoadError> {
    let Some((cert, key)) = &opts.node_ca else {
        return Ok(names.iter().map(|_| dialer.clone()).collect());
    };
    let (cert, key) = (read(cert, "--node-ca-cert")?, read(key, "--node-ca-key")?);
    let names = names.to_vec();
    let ca = ca.to_string();
    let dialer = dialer.clone();
    // Thousands of signatures: off the runtime's workers.
    tokio::task::spawn_blocking(move || {
        let issuer = crate::demo::pki::Ca::from_pem(&cert, &key).map_err(|e| {
            LoadError::Start(format!(
                "--node-ca-cert/--node-ca-key: not a usable CA: {e}"
            ))
        })?;
        names
            .iter()
            .map(|n| {
                let id = issuer
                    .client(&format!("system:node:{n}"), &["system:nodes"])
                    .map_err(|e| {
                        LoadError::Start(format!("cannot mint a certificate for {n}: {e}"))
                    })?;
                let tls = client_config(&ca, Some((&id.cert_pem, &id.key_pem)))
                    .map_err(LoadError::Start)?;
                Ok(dialer.with_identity(tls))
            })
            .collect()
    })
    .await
    .map_err(|e| LoadError::Start(format!("minting node certificates: {e}")))?
}

/// The open connections per backend from an apilb admin server's `/api/status`.
async fn read_spread(url: &str) -> Result<Vec<BackendSpread>, String> {
    use http_body_util::BodyExt;
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/api/status")
            .header(hyper::header::HOST, &authority)
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(format!("/api/status answered {}", resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| e.to_string())
    };
    let status = tokio::time::timeout(client::REQUEST_TIMEOUT, fetch)
        .await
        .map_err(|_| format!("{url}/api/status: no answer in time"))??;
    let mut out = Vec::new();
    for pool in status["pools"].as_array().into_iter().flatten() {
        for b in pool["backends"].as_array().into_iter().flatten() {
            out.push(BackendSpread {
                pool: pool["name"].as_str().unwrap_or("").into(),
                name: b["name"].as_str().unwrap_or("").into(),
                address: b["address"].as_str().unwrap_or("").into(),
                state: b["state"].as_str().unwrap_or("").into(),
                active: b["active"].as_u64().unwrap_or(0),
            });
        }
    }
    Ok(out)
}
