//! Shared helpers for the integration tests: a PKI, simulated apiservers, raw TCP backends,
//! a gateway started from TOML text, and small TLS/HTTP clients. Everything listens on
//! loopback with ephemeral ports.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use apilb::demo::apiserver::{ApiServer, ApiServerOptions, Identity, WhoAmI};
use apilb::demo::pki::{CertKey, Pki};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub const TOKEN: &str = "test-token";

/// Every await in a test goes under this, so a bug fails the test instead of hanging it.
pub async fn within<T>(secs: u64, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

pub fn pki() -> Pki {
    Pki::generate().expect("generate PKI")
}

/// `n` simulated apiservers on `ip`, named `apiserver-0..n`.
pub async fn apiservers(pki: &Pki, n: usize, ip: &str) -> Vec<ApiServer> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(
            ApiServer::start(ApiServerOptions {
                name: format!("apiserver-{i}"),
                listen: format!("{}:0", bracket(ip)).parse().expect("listen addr"),
                cert_pem: pki.apiserver.cert_pem.clone(),
                key_pem: pki.apiserver.key_pem.clone(),
                client_ca_pem: pki.ca.cert_pem.clone(),
                tokens: vec![(
                    TOKEN.into(),
                    Identity {
                        user: "token-user".into(),
                        groups: vec!["system:authenticated".into()],
                    },
                )],
                watch_interval: Duration::from_millis(50),
                anonymous: true,
            })
            .await
            .expect("start apiserver"),
        );
    }
    v
}

fn bracket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// A `[[pool.backend]]` block per address.
pub fn backends_toml(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("  [[pool.backend]]\n  name = \"b{i}\"\n  address = \"{a}\"\n"))
        .collect()
}

/// A gateway with one pool `p` over `backends` and one listener `l` on 127.0.0.1:0.
pub fn simple_config(backends: &[SocketAddr], pool_extra: &str, listener_extra: &str) -> String {
    format!(
        "[[pool]]\nname = \"p\"\n{pool_extra}\n{}\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n{listener_extra}\n",
        backends_toml(backends)
    )
}

/// A running gateway and the means to stop it.
pub struct Gw {
    pub handle: Option<apilb::Handle>,
    stop: Option<oneshot::Sender<()>>,
}

impl Gw {
    pub fn addr(&self) -> SocketAddr {
        self.handle().addr("l").expect("listener l")
    }

    pub fn handle(&self) -> &apilb::Handle {
        self.handle.as_ref().expect("running")
    }

    /// Value of one metric sample, found by name and exact labels, via the text format.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.handle().metrics().encode(), name, labels)
    }

    pub async fn shutdown(mut self) -> apilb::ShutdownReport {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let h = self.handle.take().expect("running");
        within(30, "gateway shutdown", h.wait())
            .await
            .expect("a clean shutdown")
    }
}

/// Finds a sample in Prometheus text output; 0 when absent (counters start absent).
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let Some((l, v)) = r.split_once('}') else {
                    continue;
                };
                (l, v)
            }
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let found: Vec<(String, String)> = label_part
            .split(',')
            .filter(|s| !s.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        if found.len() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| found.iter().any(|(fk, fv)| fk == k && fv == v))
        {
            return value.trim().parse().expect("metric value");
        }
    }
    0.0
}

pub async fn gateway(toml_text: &str) -> Gw {
    gateway_with(toml_text, apilb::GatewayOptions::default()).await
}

pub async fn gateway_with(toml_text: &str, opts: apilb::GatewayOptions) -> Gw {
    let cfg = apilb::config::parse(Path::new("test.toml"), toml_text)
        .unwrap_or_else(|e| panic!("config should be valid:\n{e}\n---\n{toml_text}"));
    start(cfg, opts).await
}

async fn start(cfg: apilb::config::Config, opts: apilb::GatewayOptions) -> Gw {
    let (tx, rx) = oneshot::channel::<()>();
    let handle = apilb::Gateway::start(cfg, opts, async move {
        let _ = rx.await;
    })
    .await
    .expect("gateway starts");
    Gw {
        handle: Some(handle),
        stop: Some(tx),
    }
}

// === TLS clients ===

pub fn client_config(
    pki: &Pki,
    identity: Option<&CertKey>,
    alpn: &[&str],
) -> Arc<rustls::ClientConfig> {
    let roots = apilb::tls::roots_from_pem(pki.ca.cert_pem.as_bytes(), "ca").expect("roots");
    let builder = rustls::ClientConfig::builder_with_provider(apilb::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                apilb::tls::certs_from_pem(id.cert_pem.as_bytes(), "cert").expect("cert"),
                apilb::tls::key_from_pem(id.key_pem.as_bytes(), "key").expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// GET `path` over HTTP/1.1 through TLS to `addr`; returns status and body.
pub async fn https_get(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    server_name: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes()).await.expect("write request");
    let mut raw = Vec::new();
    // The simulated apiserver closes after answering a Connection: close request.
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub async fn whoami(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> WhoAmI {
    let (status, body) = https_get(addr, cfg, "kubernetes", "/whoami", &[]).await;
    assert_eq!(status, 200, "body: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("whoami JSON {body:?}: {e}"))
}

// === Raw TCP backends ===

/// Deterministic pseudo-random bytes (xorshift), so both ends can produce the same payload.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// A test backend on loopback: its address, how many connections it accepted, and its
/// accept loop. Built by [`SinkServer`] and [`EchoServer`].
pub struct TestServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// Accepts on `listen`, counting connections, and runs `conn` for each in its own task.
    async fn spawn<F, Fut>(listen: &str, conn: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind(listen).await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(conn(s));
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    /// Closes the listening socket (connections already accepted go on).
    pub async fn stop(&self) {
        abort_and_wait(&self.task).await;
    }
}

/// A backend that reads a request until EOF, then answers with `len` bytes of
/// `payload(seed)` followed by the SHA-256 of what it received, and closes.
/// The request starts with 16 bytes: seed and length of the answer.
pub struct SinkServer;

impl SinkServer {
    pub async fn start() -> TestServer {
        TestServer::spawn("127.0.0.1:0", |mut s: TcpStream| async move {
            let mut head = [0u8; 16];
            if s.read_exact(&mut head).await.is_err() {
                return;
            }
            let seed = u64::from_le_bytes(head[..8].try_into().expect("8"));
            let len = u64::from_le_bytes(head[8..].try_into().expect("8")) as usize;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => hasher.update(&buf[..n]),
                    Err(_) => return,
                }
            }
            let got: [u8; 32] = hasher.finalize().into();
            let _ = s.write_all(&payload(seed, len)).await;
            let _ = s.write_all(&got).await;
            let _ = s.shutdown().await;
        })
        .await
    }
}

/// Sends `up` bytes, half-closes, then reads the whole answer; checks both checksums.
pub async fn sink_roundtrip(addr: SocketAddr, up: usize, down: usize, seed: u64) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let data = payload(seed, up);
    let mut head = Vec::from(seed.wrapping_add(1).to_le_bytes());
    head.extend_from_slice(&(down as u64).to_le_bytes());
    s.write_all(&head).await.expect("write head");
    s.write_all(&data).await.expect("write payload");
    s.shutdown().await.expect("half-close");
    let mut answer = Vec::with_capacity(down + 32);
    s.read_to_end(&mut answer).await.expect("read answer");
    assert_eq!(answer.len(), down + 32, "answer length");
    let (body, their_hash) = answer.split_at(down);
    assert_eq!(
        their_hash,
        sha(&data),
        "backend received different bytes than sent"
    );
    assert!(
        sha(body) == sha(&payload(seed.wrapping_add(1), down)),
        "client received different bytes than the backend sent"
    );
}

/// A backend that echoes everything and counts accepted connections.
pub struct EchoServer;

impl EchoServer {
    pub async fn start() -> TestServer {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(listen: &str) -> TestServer {
        TestServer::spawn(listen, |s: TcpStream| async move {
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }
}

/// `n` echo servers.
pub async fn echo_servers(n: usize) -> Vec<TestServer> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(EchoServer::start().await);
    }
    v
}

/// Connects and proves the path works with one echoed byte; returns the open stream.
pub async fn echo_once(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.expect("echo");
    assert_eq!(&b, b"x");
    s
}

/// An address whose port is closed (bound once, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A loopback address that never answers a SYN: a listener with a full accept queue that
/// never accepts. Linux drops SYNs for a listener whose accept queue is full. Checked
/// before it is returned, so a kernel that behaves differently fails the test loudly.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<std::net::TcpStream>,
}

impl Blackhole {
    pub fn new() -> Self {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        s.bind(&any.into()).expect("bind");
        s.listen(0).expect("listen");
        let addr = s.local_addr().expect("addr").as_socket().expect("inet");
        let mut fillers = Vec::new();
        for _ in 0..4 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(c) => fillers.push(c),
                Err(_) => break,
            }
        }
        let probe = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(
            probe.is_err(),
            "the blackhole listener answered a SYN; cannot emulate a silent backend"
        );
        Self {
            addr,
            _listener: s,
            _fillers: fillers,
        }
    }
}

// === The binary ===

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_apilb"))
}

/// Writes `text` to a fresh temp file named `name` and returns the folder guard and path.
pub fn write_temp(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write");
    (dir, path)
}

/// Sends a signal to a child process we started, by PID, with the `kill` command.
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// One simulated apiserver with a chosen serving certificate and anonymous-auth setting.
pub async fn apiserver_with(
    name: &str,
    listen: SocketAddr,
    serving: &CertKey,
    client_ca_pem: &str,
    anonymous: bool,
) -> ApiServer {
    ApiServer::start(ApiServerOptions {
        name: name.into(),
        listen,
        cert_pem: serving.cert_pem.clone(),
        key_pem: serving.key_pem.clone(),
        client_ca_pem: client_ca_pem.into(),
        tokens: Vec::new(),
        watch_interval: Duration::from_millis(50),
        anonymous,
    })
    .await
    .expect("start apiserver")
}

/// Polls `cond` every 20 ms until it holds; panics after `secs`.
pub async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = std::time::Instant::now();
    within(secs, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    started.elapsed()
}

/// A plain HTTP/1.1 request to the admin server; returns status, headers and body.
pub async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, head.to_string(), body)
}

/// Writes `text` to `path` atomically (a temp file renamed over it), as careful tools do.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A gateway started from a config file, so it can reload it.
pub async fn gateway_file(path: &Path) -> Gw {
    let cfg = apilb::config::load(path).unwrap_or_else(|e| panic!("config should be valid:\n{e}"));
    start(cfg, apilb::GatewayOptions::default()).await
}

/// A child process of the test, killed (by its PID, which the test owns) if the test fails
/// before it ends the child itself.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Aborts a server's accept task and waits until it (and so its listening socket) is gone.
async fn abort_and_wait(task: &tokio::task::JoinHandle<()>) {
    task.abort();
    while !task.is_finished() {
        tokio::task::yield_now().await;
    }
}
