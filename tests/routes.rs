//! SNI routes and the PROXY protocol on real sockets (SPEC §9): two clusters behind one
//! passthrough port (the client certificate still reaches the apiserver), wildcard, default
//! and no-route cases, ClientHellos split every way a client or a network splits them,
//! slow and half-sent hellos, plain HTTP, a terminate listener choosing its pool by SNI,
//! PROXY headers from HAProxy in front and to backends behind, and routes changed by reload.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use apilb::demo::apiserver::ApiServer;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw backend that answers every connection with its tag and a newline, then echoes
/// what it reads: which pool took a connection, and that its bytes came through untouched.
async fn tagged(tag: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(format!("{tag}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// Two tagged pools `a` (default) and `b` (routes `b.example`, `*.b.example`) behind a
/// passthrough listener; `extra` goes into the listener.
fn two_pool_config(a: SocketAddr, b: SocketAddr, default: bool, extra: &str) -> String {
    let pool = if default { "pool = \"a\"\n" } else { "" };
    format!(
        "[[pool]]\nname = \"a\"\n{}\n[[pool]]\nname = \"b\"\n{}\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n{pool}{extra}\n\
         [[listener.route]]\nsni = [\"b.example\", \"*.b.example\"]\npool = \"b\"\n",
        backends_toml(&[a]),
        backends_toml(&[b])
    )
}

/// A ClientHello for `sni` as rustls writes it (the real thing, as one record).
fn rustls_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(apilb::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("conn");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

/// The handshake bytes of `wire` in records of at most `size` bytes.
fn reframe(wire: &[u8], size: usize) -> Vec<u8> {
    let mut msg = Vec::new();
    let mut i = 0;
    while i + 5 <= wire.len() {
        let len = usize::from(u16::from_be_bytes([wire[i + 3], wire[i + 4]]));
        msg.extend_from_slice(&wire[i + 5..i + 5 + len]);
        i += 5 + len;
    }
    let mut out = Vec::new();
    for c in msg.chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(c.len() as u16).to_be_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// A synthetic ClientHello for `sni` padded to about `size` bytes (a padding extension, as a
/// post-quantum key share makes a hello large), in 16 KiB records.
fn big_hello(sni: &str, size: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    let entry_len = 3 + sni.len();
    exts.extend_from_slice(&[0, 0]);
    exts.extend_from_slice(&((entry_len + 2) as u16).to_be_bytes());
    exts.extend_from_slice(&(entry_len as u16).to_be_bytes());
    exts.push(0);
    exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    exts.extend_from_slice(sni.as_bytes());
    exts.extend_from_slice(&[0, 21]);
    exts.extend_from_slice(&(size as u16).to_be_bytes());
    exts.resize(exts.len() + size, 0);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[9u8; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut msg = vec![1];
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    reframe(
        &[&[22u8, 3, 1][..], &(msg.len() as u16).to_be_bytes(), &msg].concat(),
        16 * 1024,
    )
}

/// Sends `bytes` in pieces of `piece` bytes (a pause between them, so each is its own
/// segment), then reads the backend's tag and the echo of everything sent.
async fn send_and_echo(gw: SocketAddr, bytes: &[u8], piece: usize) -> (String, Vec<u8>) {
    send_and_echo_n(gw, bytes, piece, bytes.len()).await
}

/// [`send_and_echo`] when the backend gets only the last `want` bytes (the gateway took a
/// PROXY header off the front).
async fn send_and_echo_n(
    gw: SocketAddr,
    bytes: &[u8],
    piece: usize,
    want: usize,
) -> (String, Vec<u8>) {
    within(20, "routed echo", async {
        let mut s = TcpStream::connect(gw).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        for chunk in bytes.chunks(piece) {
            s.write_all(chunk).await.expect("write");
            if piece < bytes.len() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while !got.contains(&b'\n')
            || got.len() < got.iter().position(|b| *b == b'\n').unwrap_or(0) + 1 + want
        {
            let n = s.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed after {} bytes: {:?}",
                got.len(),
                String::from_utf8_lossy(&got[..got.len().min(40)])
            );
            got.extend_from_slice(&buf[..n]);
        }
        let nl = got.iter().position(|b| *b == b'\n').expect("tag line");
        let tag = String::from_utf8_lossy(&got[..nl]).to_string();
        (tag, got[nl + 1..].to_vec())
    })
    .await
}

/// Whether the gateway closes a connection that sent `bytes` without answering.
async fn closed_unanswered(gw: SocketAddr, bytes: &[u8]) -> bool {
    within(20, "closed", async {
        let mut s = TcpStream::connect(gw).await.expect("connect");
        s.write_all(bytes).await.expect("write");
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf).await, Ok(0) | Err(_))
    })
    .await
}

#[tokio::test]
async fn routes_pick_the_pool_by_server_name_and_forward_the_hello_untouched() {
    let (a, _ta) = tagged("A").await;
    let (b, _tb) = tagged("B").await;
    let gw = gateway(&two_pool_config(a, b, true, "")).await;
    let addr = gw.addr();

    let hello = rustls_hello("b.example");
    assert_eq!(
        send_and_echo(addr, &hello, hello.len()).await,
        ("B".into(), hello.clone())
    );
    // Mixed case and a wildcard of exactly one label.
    let h = rustls_hello("API.B.Example");
    assert_eq!(send_and_echo(addr, &h, h.len()).await.0, "B");
    // Two labels under the wildcard: not a match, the default pool.
    let h = rustls_hello("x.api.b.example");
    assert_eq!(send_and_echo(addr, &h, h.len()).await.0, "A");
    // Unknown name, and no name at all (an IP address), go to the default.
    let h = rustls_hello("c.example");
    assert_eq!(send_and_echo(addr, &h, h.len()).await.0, "A");
    let h = rustls_hello("127.0.0.1");
    assert_eq!(send_and_echo(addr, &h, h.len()).await.0, "A");
    // Not TLS at all: plain HTTP goes to the default, untouched.
    let http = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    assert_eq!(
        send_and_echo(addr, &http, http.len()).await,
        ("A".into(), http)
    );
    // A malformed hello is "no SNI".
    let mut bad = rustls_hello("b.example");
    bad[5] = 2;
    assert_eq!(
        send_and_echo(addr, &bad, bad.len()).await,
        ("A".into(), bad)
    );
}

#[tokio::test]
async fn split_large_and_slow_hellos_are_routed_and_half_hellos_time_out() {
    let (a, _ta) = tagged("A").await;
    let (b, _tb) = tagged("B").await;
    let gw = gateway(&two_pool_config(a, b, true, "sni_timeout = \"1s\"")).await;
    let addr = gw.addr();

    let hello = rustls_hello("b.example");
    // One byte per segment.
    assert_eq!(
        send_and_echo(addr, &hello, 1).await,
        ("B".into(), hello.clone())
    );
    // The same message over two TLS records, and over records of 7 bytes, in one write.
    let two = reframe(&hello, (hello.len() - 5) / 2 + 1);
    assert_eq!(
        send_and_echo(addr, &two, two.len()).await,
        ("B".into(), two)
    );
    let many = reframe(&hello, 7);
    assert_eq!(send_and_echo(addr, &many, 100).await, ("B".into(), many));
    // A 20 KiB hello spans two records and many segments.
    let big = big_hello("b.example", 20 * 1024);
    assert!(big.len() > 20 * 1024);
    assert_eq!(send_and_echo(addr, &big, 1500).await, ("B".into(), big));

    // Half a hello, then silence: closed after sni_timeout and counted, while other
    // clients are served meanwhile.
    let half = hello[..hello.len() / 2].to_vec();
    let stalled = tokio::spawn(async move { closed_unanswered(addr, &half).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let h = rustls_hello("b.example");
    assert_eq!(send_and_echo(addr, &h, h.len()).await.0, "B");
    assert!(stalled.await.expect("join"), "a half hello must be closed");
    assert_eq!(
        gw.metric(
            "apilb_listener_rejected_total",
            &[("listener", "l"), ("reason", "sni_timeout")]
        ),
        1.0
    );
}

#[tokio::test]
async fn without_a_default_pool_unrouted_clients_are_closed_and_counted() {
    let (a, _ta) = tagged("A").await;
    let (b, _tb) = tagged("B").await;
    let gw = gateway(&two_pool_config(a, b, false, "")).await;
    let h = rustls_hello("b.example");
    assert_eq!(send_and_echo(gw.addr(), &h, h.len()).await.0, "B");
    assert!(closed_unanswered(gw.addr(), &rustls_hello("c.example")).await);
    assert!(closed_unanswered(gw.addr(), b"GET / HTTP/1.1\r\n\r\n").await);
    assert!(closed_unanswered(gw.addr(), &rustls_hello("127.0.0.1")).await);
    eventually(5, "no_route counted", || {
        gw.metric(
            "apilb_listener_rejected_total",
            &[("listener", "l"), ("reason", "no_route")],
        ) == 3.0
    })
    .await;
}

/// A second cluster with its own CA, whose apiserver serves `lab-b.example.com` and
/// `*.lab-b.example.com`.
async fn cluster_b(tls_b: &TlsFixture) -> ApiServer {
    let serving = tls_b
        .pki
        .ca
        .server(
            "apiserver-b",
            &["lab-b.example.com", "*.lab-b.example.com", "127.0.0.1"],
            30,
        )
        .expect("cert");
    apiserver_with(
        "lab-b-0",
        "127.0.0.1:0".parse().expect("addr"),
        &serving,
        &tls_b.pki.ca.cert_pem,
        true,
    )
    .await
}

#[tokio::test]
async fn two_clusters_behind_one_passthrough_port_with_client_certificates() {
    let tls_a = TlsFixture::new();
    let tls_b = TlsFixture::new();
    let a = apiservers(&tls_a.pki, 1, "127.0.0.1").await;
    let b = cluster_b(&tls_b).await;
    let cfg = format!(
        "[[pool]]\nname = \"lab-a\"\n{}\n[[pool]]\nname = \"lab-b\"\n{}\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"lab-a\"\n\
         [[listener.route]]\nsni = [\"lab-b.example.com\", \"*.lab-b.example.com\"]\npool = \"lab-b\"\n",
        backends_toml(&[a[0].addr()]),
        backends_toml(&[b.addr()])
    );
    let gw = gateway(&cfg).await;
    let port = gw.addr().port();
    let p = |p: &std::path::Path| p.display().to_string();
    for host in ["lab-b.example.com", "api.lab-b.example.com"] {
        let args: Vec<String> = [
            "-sS",
            "--fail",
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            "--cacert",
            &p(&tls_b.files.ca),
            "--cert",
            &p(&tls_b.files.admin_cert),
            "--key",
            &p(&tls_b.files.admin_key),
            &format!("https://{host}:{port}/whoami"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = within(
            30,
            "curl",
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("curl")
                    .args(&args)
                    .output()
                    .expect("run curl")
            }),
        )
        .await
        .expect("join");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{host}: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let who: apilb::demo::apiserver::WhoAmI = serde_json::from_str(&body).expect("json");
        // Still passthrough: lab-b's apiserver verified the client certificate itself.
        assert_eq!(
            (
                who.backend.as_str(),
                who.authenticated_by.as_str(),
                who.user.as_str()
            ),
            ("lab-b-0", "x509", "admin"),
            "{host}"
        );
    }
    // No SNI (an IP address): the default cluster, with its own CA.
    let who = whoami(gw.addr(), tls_a.client(Some(&tls_a.pki.admin), &[])).await;
    assert_eq!(who.backend, "apiserver-0");
}

#[tokio::test]
async fn a_terminate_listener_picks_its_pool_by_sni_after_the_handshake() {
    let tls_a = TlsFixture::new();
    let tls_b = TlsFixture::new();
    let a = apiservers(&tls_a.pki, 1, "127.0.0.1").await;
    let b = cluster_b(&tls_b).await;
    // The public certificate of lab-b's name, from the same public CA the listener uses.
    let lab_b_public = tls_a
        .pki
        .public_ca
        .server("lab-b public", &["lab-b.example.com"], 30)
        .expect("cert");
    let cert = tls_a.file("lab-b-public.crt", &lab_b_public.cert_pem);
    let key = tls_a.file("lab-b-public.key", &lab_b_public.key_pem);
    let cfg = format!(
        "[[pool]]\nname = \"lab-a\"\n{}\n[pool.tls]\nca = \"{}\"\n\
         [[pool]]\nname = \"lab-b\"\n{}\n[pool.tls]\nca = \"{}\"\nserver_name = \"lab-b.example.com\"\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nmode = \"terminate\"\npool = \"lab-a\"\n\
         [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[listener.tls.sni]]\nnames = [\"lab-b.example.com\"]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[listener.route]]\nsni = [\"lab-b.example.com\"]\npool = \"lab-b\"\n",
        backends_toml(&[a[0].addr()]),
        tls_a.ca().display(),
        backends_toml(&[b.addr()]),
        tls_b.ca().display(),
        tls_a.files.public_cert.display(),
        tls_a.files.public_key.display(),
        cert.display(),
        key.display(),
    );
    let gw = gateway(&cfg).await;
    let client = tls_a.public_client(None, &["http/1.1"]);
    let (status, body) = https_get(
        gw.addr(),
        client.clone(),
        "lab-b.example.com",
        "/whoami",
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"lab-b-0\""), "{body}");
    let (status, body) = https_get(gw.addr(), client, "localhost", "/whoami", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"apiserver-0\""), "{body}");
}

#[tokio::test]
async fn reloaded_routes_apply_to_new_connections_and_spare_open_ones() {
    let (a, _ta) = tagged("A").await;
    let (b, _tb) = tagged("B").await;
    let (c, _tc) = tagged("C").await;
    let three = |route_pool: &str, extra_route: bool| {
        let mut t = format!(
            "[[pool]]\nname = \"a\"\n{}\n[[pool]]\nname = \"b\"\n{}\n[[pool]]\nname = \"c\"\n{}\n\
             [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"a\"\n\
             [[listener.route]]\nsni = [\"b.example\"]\npool = \"{route_pool}\"\n",
            backends_toml(&[a]),
            backends_toml(&[b]),
            backends_toml(&[c])
        );
        if extra_route {
            t.push_str("[[listener.route]]\nsni = [\"new.example\"]\npool = \"c\"\n");
        }
        t
    };
    let (_dir, path) = write_temp("routes.toml", &three("b", false));
    let gw = gateway_file(&path).await;
    let addr = gw.addr();
    let hb = rustls_hello("b.example");
    let hn = rustls_hello("new.example");
    assert_eq!(send_and_echo(addr, &hb, hb.len()).await.0, "B");
    assert_eq!(send_and_echo(addr, &hn, hn.len()).await.0, "A");

    // An open connection through the old route.
    let mut open = TcpStream::connect(addr).await.expect("connect");
    open.write_all(&hb).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = within(5, "tag", open.read(&mut buf)).await.expect("read");
    assert!(buf[..n].starts_with(b"B\n"));

    // Changed (b.example -> c) and added (new.example -> c).
    write_atomic(&path, &three("c", true));
    within(10, "reload", gw.handle().reloader().reload())
        .await
        .expect("reload");
    assert_eq!(send_and_echo(addr, &hb, hb.len()).await.0, "C");
    assert_eq!(send_and_echo(addr, &hn, hn.len()).await.0, "C");
    // Removed again.
    write_atomic(&path, &three("b", false));
    within(10, "reload", gw.handle().reloader().reload())
        .await
        .expect("reload");
    assert_eq!(send_and_echo(addr, &hn, hn.len()).await.0, "A");

    // The connection from before both reloads still goes to B.
    open.write_all(b"still here").await.expect("write");
    let mut got = Vec::new();
    while got.len() < hb.len() - (n - 2) + 10 {
        let k = within(5, "echo", open.read(&mut buf)).await.expect("read");
        assert!(k > 0, "the open connection was cut");
        got.extend_from_slice(&buf[..k]);
    }
    assert!(got.ends_with(b"still here"));
}

// === PROXY protocol ===

/// v2 `LOCAL` headers [`proxy_reading_backend`] received: the health checks'.
static LOCAL_HEADERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A backend that expects a PROXY header (as nginx's `proxy_protocol` does), answers with
/// the header's text (v1) or its source address (v2) on one line, then echoes.
async fn proxy_reading_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 16];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let line = if head.starts_with(b"PROXY ") {
                    let mut line = head.to_vec();
                    while !line.ends_with(b"\r\n") && line.len() < 107 {
                        let mut b = [0u8; 1];
                        if s.read_exact(&mut b).await.is_err() {
                            return;
                        }
                        line.push(b[0]);
                    }
                    String::from_utf8_lossy(&line).trim_end().to_string()
                } else {
                    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
                    let mut body = vec![0u8; len];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    match (head[12], head[13]) {
                        (0x20, _) => {
                            LOCAL_HEADERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            "v2 LOCAL".to_string()
                        }
                        (0x21, 0x11) => format!(
                            "v2 {}.{}.{}.{}:{}",
                            body[0],
                            body[1],
                            body[2],
                            body[3],
                            u16::from_be_bytes([body[8], body[9]])
                        ),
                        (c, f) => format!("v2 {c:#x} {f:#x}"),
                    }
                };
                if s.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// Reads one line, then `n` more bytes.
async fn read_line_and(s: &mut TcpStream, n: usize) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\n") {
        let k = s.read(&mut b).await.expect("read");
        assert!(k > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.push(b[0]);
    }
    let mut rest = vec![0u8; n];
    s.read_exact(&mut rest).await.expect("echo");
    (String::from_utf8_lossy(&got).trim_end().to_string(), rest)
}

/// [`line_from`], then the echo of `n` bytes.
async fn line_and_echo(to: SocketAddr, source: &str, bytes: &[u8], n: usize) -> (String, Vec<u8>) {
    within(10, "line and echo", async {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(source.parse().expect("source"))
            .expect("bind source");
        let mut s = sock.connect(to).await.expect("connect");
        s.write_all(bytes).await.expect("write");
        read_line_and(&mut s, n).await
    })
    .await
}

/// Connects from `source` (a loopback address of its own, so that the address a PROXY header
/// carries is told apart from the hop's), sends `bytes`, reads one line.
async fn line_from(to: SocketAddr, source: &str, bytes: &[u8]) -> (String, SocketAddr) {
    within(10, "one line", async {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(source.parse().expect("source"))
            .expect("bind source");
        let mut s = sock.connect(to).await.expect("connect");
        let me = s.local_addr().expect("local");
        s.write_all(bytes).await.expect("write");
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\n") {
            let n = s.read(&mut b).await.expect("read");
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.push(b[0]);
        }
        (String::from_utf8_lossy(&got).trim_end().to_string(), me)
    })
    .await
}

#[tokio::test]
async fn proxy_headers_in_carry_the_client_and_backends_get_them_out() {
    let (backend, _t) = proxy_reading_backend().await;
    for (send, want_prefix) in [("v1", "PROXY TCP4 127.0.0.7 "), ("v2", "v2 127.0.0.7:")] {
        let cfg = format!(
            "[[pool]]\nname = \"p\"\nsend_proxy = \"{send}\"\n{}\n[pool.health]\ncheck = \"tcp\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
             [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\nproxy_protocol = true\nsni_timeout = \"1s\"\n",
            backends_toml(&[backend])
        );
        LOCAL_HEADERS.store(0, std::sync::atomic::Ordering::SeqCst);
        let gw = gateway(&cfg).await;
        // A v2 header from an NLB says the client is 127.0.0.7:4242; the bytes behind it
        // reach the backend untouched (the echo), after the gateway's own header.
        let v2 = proxy_header_v2("127.0.0.7:4242", "127.0.0.1:6443");
        let (line, echo) =
            line_and_echo(gw.addr(), "127.0.0.9:0", &[&v2[..], b"hello"].concat(), 5).await;
        assert!(line.starts_with(want_prefix), "{send}: {line}");
        assert!(line.contains("4242"), "{send}: {line}");
        assert_eq!(echo, b"hello");
        // The same with a v1 line in front, sent in three segments.
        let v1 = b"PROXY TCP4 127.0.0.7 127.0.0.1 4243 6443\r\nhi";
        let (line, echo) = within(10, "split v1 header", async {
            let mut s = TcpStream::connect(gw.addr()).await.expect("connect");
            s.set_nodelay(true).expect("nodelay");
            for part in [&v1[..9], &v1[9..30], &v1[30..]] {
                s.write_all(part).await.expect("write");
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            read_line_and(&mut s, 2).await
        })
        .await;
        assert!(
            line.starts_with(want_prefix) && line.contains("4243"),
            "{send}: {line}"
        );
        assert_eq!(echo, b"hi");
        // Half a header, then silence: closed at sni_timeout, counted as proxy_protocol.
        assert!(closed_unanswered(gw.addr(), &v2[..10]).await);
        // No header: closed and counted; a health check (v2 LOCAL) keeps the backend up.
        assert!(closed_unanswered(gw.addr(), b"GET / HTTP/1.1\r\n\r\n").await);
        eventually(5, "proxy_protocol counted", || {
            gw.metric(
                "apilb_listener_rejected_total",
                &[("listener", "l"), ("reason", "proxy_protocol")],
            ) == 2.0
        })
        .await;
        gw.first_check("p", "b0").await;
        eventually(5, "a health check's v2 LOCAL header", || {
            LOCAL_HEADERS.load(std::sync::atomic::Ordering::SeqCst) > 0
        })
        .await;
        assert_eq!(
            gw.metric("apilb_backend_healthy", &[("pool", "p"), ("backend", "b0")]),
            1.0
        );
    }
}

/// A PROXY v2 header for TCP over IPv4 (what an NLB or HAProxy's `send-proxy-v2` sends).
fn proxy_header_v2(src: &str, dst: &str) -> Vec<u8> {
    let (src, dst): (SocketAddr, SocketAddr) =
        (src.parse().expect("src"), dst.parse().expect("dst"));
    let ip = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v) => v.octets(),
        std::net::IpAddr::V6(_) => panic!("v4 only"),
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&ip(src));
    h.extend_from_slice(&ip(dst));
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// A free port on loopback (bound and released; good enough for a child that binds it at
/// once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test]
async fn a_proxy_header_and_a_client_hello_in_one_segment_are_told_apart() {
    let (a, _ta) = tagged("A").await;
    let (b, _tb) = tagged("B").await;
    let gw = gateway(&two_pool_config(a, b, true, "proxy_protocol = true")).await;
    let hello = rustls_hello("b.example");
    let v2 = proxy_header_v2("127.0.0.7:4242", "127.0.0.1:6443");
    // One write: the header is consumed, the hello is routed and forwarded, untouched.
    let both = [&v2[..], &hello[..]].concat();
    assert_eq!(
        send_and_echo_n(gw.addr(), &both, both.len(), hello.len()).await,
        ("B".into(), hello.clone())
    );
}

#[tokio::test]
async fn haproxy_in_front_with_send_proxy_and_the_access_log_names_the_real_client() {
    if which("haproxy").is_none() {
        panic!("haproxy is not installed: .ci/run installs it");
    }
    let (backend, _t) = tagged("B").await;
    let tmp = tempfile::tempdir().expect("tmp");
    let gw_port = free_port();
    let cfg = format!(
        "[[pool]]\nname = \"p\"\n{}\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:{gw_port}\"\npool = \"p\"\nproxy_protocol = true\n\
         [[listener.route]]\nsni = [\"elsewhere.example\"]\npool = \"p\"\n",
        backends_toml(&[backend])
    );
    let cfg_path = tmp.path().join("apilb.toml");
    std::fs::write(&cfg_path, cfg).expect("write");
    let mut gw = KillOnDrop(
        std::process::Command::new(bin())
            .args(["run", "--config"])
            .arg(&cfg_path)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start apilb"),
    );
    let (v1_port, v2_port) = (free_port(), free_port());
    let hcfg = format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
         frontend v2\n  bind 127.0.0.1:{v2_port}\n  default_backend gw2\n\
         frontend v1\n  bind 127.0.0.1:{v1_port}\n  default_backend gw1\n\
         backend gw2\n  server g 127.0.0.1:{gw_port} send-proxy-v2\n\
         backend gw1\n  server g 127.0.0.1:{gw_port} send-proxy\n"
    );
    let hpath = tmp.path().join("haproxy.cfg");
    std::fs::write(&hpath, hcfg).expect("write");
    let _haproxy = KillOnDrop(
        std::process::Command::new("haproxy")
            .arg("-f")
            .arg(&hpath)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start haproxy"),
    );
    let mut clients = Vec::new();
    for port in [v2_port, v1_port] {
        let to: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let me = within(20, "through haproxy", async {
            loop {
                let sock = tokio::net::TcpSocket::new_v4().expect("socket");
                sock.bind("127.0.0.11:0".parse().expect("source"))
                    .expect("bind");
                if let Ok(mut s) = sock.connect(to).await {
                    let me = s.local_addr().expect("local");
                    s.write_all(b"ping").await.expect("write");
                    let mut buf = [0u8; 6];
                    if s.read_exact(&mut buf).await.is_ok() && &buf == b"B\nping" {
                        drop(s);
                        break me;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        clients.push(me);
    }
    // The access lines name the clients' own addresses, not HAProxy's 127.0.0.1.
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(gw.0.id(), "TERM");
    wait_exit(&mut gw.0, 20);
    let mut log = String::new();
    if let Some(mut e) = gw.0.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut log);
    }
    for me in clients {
        assert!(
            log.lines().any(|l| l.contains("connection closed")
                && l.contains(&format!("client={me}"))
                && l.contains("route=default")),
            "no access line for {me}:\n{log}"
        );
    }
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.is_file())
    })
}

#[tokio::test]
async fn an_nginx_backend_with_proxy_protocol_logs_the_real_client_and_passes_checks() {
    assert!(
        which("nginx").is_some(),
        "nginx is not installed: .ci/run installs it"
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let log = tmp.path().join("access.log");
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n  fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
           log_format pp '$proxy_protocol_addr:$proxy_protocol_port $remote_addr $status';\n\
           server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n    access_log {log} pp;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        dir = tmp.path().display(),
        log = log.display(),
    );
    let conf_path = tmp.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write");
    let _nginx = KillOnDrop(
        std::process::Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nginx"),
    );
    let backend: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let cfg = format!(
        "[[pool]]\nname = \"p\"\nsend_proxy = \"v2\"\n{}\n[pool.health]\ncheck = \"tcp\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n",
        backends_toml(&[backend])
    );
    // nginx binds as it starts; the gateway's first check waits for it.
    within(10, "nginx listening", async {
        while TcpStream::connect(backend).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let gw = gateway(&cfg).await;
    gw.first_check("p", "b0").await;
    let (line, me) = line_from(
        gw.addr(),
        "127.0.0.13:0",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(line.contains("200"), "{line}");
    // Its health checks (v2 LOCAL headers) pass, again and again.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        gw.metric("apilb_backend_healthy", &[("pool", "p"), ("backend", "b0")]),
        1.0
    );
    assert!(
        gw.metric(
            "apilb_health_checks_total",
            &[("pool", "p"), ("backend", "b0"), ("result", "pass")]
        ) >= 2.0
    );
    let logged = within(10, "nginx access line", async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if !text.is_empty() {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // nginx saw the gateway's address, and the client's in the PROXY header.
    assert!(
        logged.contains(&format!("{}:{} 127.0.0.1 200", me.ip(), me.port())),
        "{logged}"
    );
}
