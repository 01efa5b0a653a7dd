//! What stands behind the gateway: simulated apiservers (real TLS, real authentication),
//! raw TCP backends that echo or check a payload ([`EchoServer`], [`SinkServer`]), and
//! addresses that refuse ([`closed_port`]) or never answer ([`Blackhole`]). Also the
//! deterministic payloads and digests the raw backends and their clients agree on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use apilb::demo::apiserver::{ApiServer, ApiServerOptions, Identity};
use apilb::demo::pki::{CertKey, Pki};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{within, TOKEN};

// === Simulated apiservers ===

/// `n` simulated apiservers on `ip`, named `apiserver-0..n`, serving `pki.apiserver`,
/// trusting client certificates from `pki.ca` and the bearer token [`TOKEN`].
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

/// A simulated apiserver started again at `listen` (a restart with a new certificate, say):
/// the old server's socket closes asynchronously, so this retries until the port is free.
pub async fn restart_apiserver(
    name: &str,
    listen: SocketAddr,
    serving: &CertKey,
    client_ca_pem: &str,
) -> ApiServer {
    within(10, "restart on the same port", async {
        loop {
            let r = ApiServer::start(ApiServerOptions {
                name: name.into(),
                listen,
                cert_pem: serving.cert_pem.clone(),
                key_pem: serving.key_pem.clone(),
                client_ca_pem: client_ca_pem.into(),
                tokens: Vec::new(),
                watch_interval: Duration::from_secs(1),
                anonymous: true,
            })
            .await;
            match r {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
}

// === Payloads ===

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

// === Raw TCP backends ===

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

/// Aborts a server's accept task and waits until it (and so its listening socket) is gone.
async fn abort_and_wait(task: &tokio::task::JoinHandle<()>) {
    task.abort();
    while !task.is_finished() {
        tokio::task::yield_now().await;
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

// === Dead backends ===

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
