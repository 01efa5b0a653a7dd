//! The front-proxy identity mode (SPEC §10) on real sockets: one terminate listener with a
//! public certificate, client certificates verified by the gateway and passed on as
//! kube-apiserver's request headers to simulated apiservers that trust a front-proxy CA;
//! tokens untouched; spoofed identity headers stripped; each request balanced on its own;
//! watches streamed; upgrades tunnelled after `101`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use apilb::demo::apiserver::{ApiServer, FrontProxy, WhoAmI};
use apilb::demo::pki::Ca;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Three simulated apiservers trusting the cluster CA for users and `fp` as front proxy
/// (allowed name `front-proxy-client`), and a gateway in identity mode in front.
struct Setup {
    tls: TlsFixture,
    servers: Vec<ApiServer>,
    gw: Gw,
    /// The front-proxy CA, PEM (to start an apiserver again).
    fp_ca: String,
}

async fn setup(servers: usize) -> Setup {
    setup_with(servers, Duration::from_millis(50), "").await
}

/// [`setup`] with the apiservers' watch event interval and more `[[listener]]` keys.
async fn setup_with(servers: usize, watch_interval: Duration, listener_extra: &str) -> Setup {
    setup_full(servers, watch_interval, listener_extra, "").await
}

/// [`setup_with`] with more `[listener.tls]` keys too.
async fn setup_full(
    servers: usize,
    watch_interval: Duration,
    listener_extra: &str,
    tls_extra: &str,
) -> Setup {
    let tls = TlsFixture::new();
    let fp = Ca::new("front-proxy-ca").expect("ca");
    let fp_client = fp.client("front-proxy-client", &[]).expect("cert");
    let fp_cert = tls.file("front-proxy-client.crt", &fp_client.cert_pem);
    let fp_key = tls.file("front-proxy-client.key", &fp_client.key_pem);
    let mut v = Vec::new();
    for i in 0..servers {
        let mut opts = sim_options(&tls, i, "127.0.0.1:0".parse().expect("addr"));
        opts.name = format!("apiserver-{i}");
        opts.tokens = vec![(
            TOKEN.into(),
            apilb::demo::apiserver::Identity {
                user: "token-user".into(),
                groups: vec!["system:authenticated".into()],
            },
        )];
        opts.anonymous = true;
        opts.watch_interval = watch_interval;
        v.push(
            ApiServer::start_with_front_proxy(
                opts,
                None,
                FrontProxy {
                    ca_pem: fp.cert_pem.clone(),
                    allowed_names: vec!["front-proxy-client".into()],
                },
            )
            .await
            .expect("start"),
        );
    }
    let addrs: Vec<SocketAddr> = v.iter().map(|s| s.addr()).collect();
    let cfg = format!(
        "[[pool]]\nname = \"p\"\nbalance = \"round-robin\"\n{}\n[pool.tls]\nca = \"{ca}\"\nserver_name = \"kubernetes\"\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nmode = \"terminate\"\npool = \"p\"\n{listener_extra}\n\
         [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\nhandshake_timeout = \"1s\"\nclient_ca = \"{ca}\"\n{tls_extra}\n\
         [listener.identity]\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
        backends_toml(&addrs),
        tls.files.public_cert.display(),
        tls.files.public_key.display(),
        fp_cert.display(),
        fp_key.display(),
        ca = tls.ca().display(),
    );
    let gw = gateway(&cfg).await;
    Setup {
        tls,
        servers: v,
        gw,
        fp_ca: fp.cert_pem.clone(),
    }
}

fn p(p: &Path) -> String {
    p.display().to_string()
}

/// curl through the gateway's public certificate; `args` before the URL(s).
async fn curl(s: &Setup, args: &[String], paths: &[&str]) -> String {
    let mut all: Vec<String> = vec![
        "-sS".into(),
        "--fail-with-body".into(),
        "--cacert".into(),
        p(&s.tls.files.public_ca),
    ];
    all.extend(args.iter().cloned());
    for path in paths {
        all.push(format!("https://127.0.0.1:{}{path}", s.gw.addr().port()));
    }
    let out = within(
        60,
        "curl",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(&all)
                .output()
                .expect("run curl (CI installs it)")
        }),
    )
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "curl: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn who(body: &str) -> WhoAmI {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("whoami JSON {body:?}: {e}"))
}

fn cert_args(s: &Setup, cert: &Path, key: &Path) -> Vec<String> {
    let _ = s;
    vec!["--cert".into(), p(cert), "--key".into(), p(key)]
}

#[tokio::test]
async fn certificates_tokens_and_nobody_are_who_they_are_through_one_public_endpoint() {
    let s = setup(3).await;
    let f = s.tls.files.clone();
    for proto in ["--http2", "--http1.1"] {
        let mut a = cert_args(&s, &f.admin_cert, &f.admin_key);
        a.push(proto.into());
        let w = who(&curl(&s, &a, &["/whoami"]).await);
        assert_eq!(
            (
                w.user.as_str(),
                w.groups.clone(),
                w.authenticated_by.as_str()
            ),
            ("admin", vec!["system:masters".to_string()], "front-proxy"),
            "{proto}"
        );
        assert_eq!(
            w.http_version, "HTTP/2.0",
            "h2 to the backend whatever the client"
        );
    }
    let w = who(&curl(&s, &cert_args(&s, &f.node_cert, &f.node_key), &["/whoami"]).await);
    assert_eq!(
        (w.user.as_str(), w.groups.clone()),
        ("system:node:worker0", vec!["system:nodes".to_string()])
    );
    let token = vec!["-H".to_string(), format!("Authorization: Bearer {TOKEN}")];
    let w = who(&curl(&s, &token, &["/whoami"]).await);
    assert_eq!(
        (w.user.as_str(), w.authenticated_by.as_str()),
        ("token-user", "token")
    );
    let w = who(&curl(&s, &[], &["/whoami"]).await);
    assert_eq!(w.authenticated_by, "anonymous");
    // X-Forwarded-For from the client is replaced by the client's real address.
    let xff = vec![
        "-H".to_string(),
        "X-Forwarded-For: 1.2.3.4".into(),
        "-H".into(),
        "x-forwarded-for: 5.6.7.8".into(),
    ];
    let w = who(&curl(&s, &xff, &["/whoami"]).await);
    assert_eq!(w.forwarded_for, vec!["127.0.0.1".to_string()]);
}

/// Sends raw bytes over TLS to the identity listener and returns what came back before
/// the gateway closed (or 10 s passed).
async fn raw(s: &Setup, bytes: &[u8]) -> String {
    let c = s.tls.public_client(None, &["http/1.1"]);
    let mut t = tls_connect(s.gw.addr(), c, "localhost").await.expect("tls");
    let _ = t.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn hostile_http_is_refused_and_harms_nobody() {
    let s = setup(1).await;
    // 200 clients that send half a request head and stall.
    let mut slow = Vec::new();
    for _ in 0..200 {
        let c = s.tls.public_client(None, &["http/1.1"]);
        let addr = s.gw.addr();
        slow.push(tokio::spawn(async move {
            let mut t = tls_connect(addr, c, "localhost").await.expect("tls");
            t.write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .expect("write");
            let mut b = [0u8; 64];
            // Closed by the header read timeout (10 s), or by the test's end.
            let _ = tokio::time::timeout(Duration::from_secs(15), t.read(&mut b)).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A normal client is served meanwhile.
    let w = who(&curl(&s, &[], &["/whoami"]).await);
    assert_eq!(w.backend, "apiserver-0");
    // A 1 MiB header block, and 10,000 headers: refused (431 or closed), never forwarded.
    let big = format!(
        "GET /whoami HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let r = raw(&s, big.as_bytes()).await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r:.80}");
    let many: String = (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(
        &s,
        format!("GET /whoami HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r:.80}");
    // Conflicting Content-Length and Transfer-Encoding (request smuggling): hyper takes the
    // chunked framing only (RFC 9112 §6.3: Content-Length dropped), and closes the client
    // connection after the answer, so the request smuggled behind the body is never read.
    let before = s.gw.metrics().value_or_zero(
        "apilb_http_requests_total",
        &[("listener", "l"), ("backend", "b0"), ("code", "200")],
    );
    let r = raw(
        &s,
        b"POST /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /whoami HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "one answer only: {r}");
    assert!(
        !r.contains("\"authenticated_by\""),
        "the smuggled request was answered: {r}"
    );
    assert_eq!(
        s.gw.metrics().value_or_zero(
            "apilb_http_requests_total",
            &[("listener", "l"), ("backend", "b0"), ("code", "200")]
        ),
        before
    );
    // Each is counted.
    assert!(s.gw.metric("apilb_http_connection_errors_total", &[("listener", "l")]) >= 2.0);
    // And the normal client is still served.
    let w = who(&curl(&s, &[], &["/whoami"]).await);
    assert_eq!(w.backend, "apiserver-0");
    for t in slow {
        t.abort();
    }
}

#[tokio::test]
async fn spoofed_identity_headers_are_stripped_in_http1_and_h2() {
    let s = setup(1).await;
    let f = s.tls.files.clone();
    let spoof: Vec<String> = [
        "X-Remote-User: admin",
        "x-remote-user: root",
        "x-remote-group: system:masters",
        "X-REMOTE-GROUP: system:masters",
        "X-Remote-Extra-Scopes: x",
    ]
    .iter()
    .flat_map(|h| ["-H".to_string(), h.to_string()])
    .collect();
    for proto in ["--http2", "--http1.1"] {
        let mut a = spoof.clone();
        a.push(proto.into());
        let w = who(&curl(&s, &a, &["/whoami"]).await);
        assert_eq!(w.authenticated_by, "anonymous", "{proto}: {w:?}");
        assert_eq!(w.user, "system:anonymous", "{proto}");
        let mut a = spoof.clone();
        a.extend(cert_args(&s, &f.node_cert, &f.node_key));
        a.push(proto.into());
        let w = who(&curl(&s, &a, &["/whoami"]).await);
        assert_eq!(w.user, "system:node:worker0", "{proto}");
        assert_eq!(w.groups, vec!["system:nodes".to_string()], "{proto}");
    }
    // A certificate from an unrelated CA fails the handshake and is counted.
    let stranger = Ca::new("stranger").expect("ca");
    let m = stranger.client("admin", &["system:masters"]).expect("cert");
    let cert = s.tls.file("stranger.crt", &m.cert_pem);
    let key = s.tls.file("stranger.key", &m.key_pem);
    let mut args = vec!["-sS".to_string(), "--cacert".into(), p(&f.public_ca)];
    args.extend(cert_args(&s, &cert, &key));
    args.push(format!("https://127.0.0.1:{}/whoami", s.gw.addr().port()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(&args)
            .output()
            .expect("curl")
    })
    .await
    .expect("join");
    assert!(
        !out.status.success(),
        "a foreign certificate must be refused"
    );
    eventually(5, "client_certificate counted", || {
        s.gw.metric(
            "apilb_tls_handshake_errors_total",
            &[("listener", "l"), ("reason", "client_certificate")],
        ) == 1.0
    })
    .await;
}

#[tokio::test]
async fn each_request_of_one_h2_connection_is_balanced_on_its_own() {
    let s = setup(3).await;
    let f = s.tls.files.clone();
    let paths = vec!["/whoami"; 300];
    let mut a = cert_args(&s, &f.admin_cert, &f.admin_key);
    a.push("--http2".into());
    let body = curl(&s, &a, &paths).await;
    let mut per = [0usize; 3];
    for (i, name) in ["apiserver-0", "apiserver-1", "apiserver-2"]
        .iter()
        .enumerate()
    {
        per[i] = body.matches(&format!("\"backend\":\"{name}\"")).count();
    }
    assert_eq!(per.iter().sum::<usize>(), 300, "{body}");
    // round-robin: each third, give or take the requests in flight.
    assert!(per.iter().all(|n| (90..=110).contains(n)), "{per:?}");
    assert_eq!(
        s.gw.metric("apilb_listener_connections_total", &[("listener", "l")]),
        1.0,
        "curl used one connection"
    );
    assert!(
        s.gw.metric(
            "apilb_http_requests_total",
            &[("listener", "l"), ("backend", "b0"), ("code", "200")]
        ) >= 90.0
    );
}

#[tokio::test]
async fn watches_stream_and_upgrades_tunnel_after_101() {
    let s = setup(1).await;
    let client = s.tls.public_client(Some(&s.tls.pki.admin), &["http/1.1"]);
    // A watch: events arrive as they happen, for longer than the handshake timeout (1 s).
    let mut w = tls_connect(s.gw.addr(), client.clone(), "localhost")
        .await
        .expect("tls");
    w.write_all(b"GET /api/v1/namespaces/default/pods?watch=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    within(10, "watch events", async {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(1500) {
            let n = w.read(&mut buf).await.expect("read");
            assert!(n > 0, "the watch ended");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let events = String::from_utf8_lossy(&got).matches("\"type\"").count();
    assert!(
        events >= 10,
        "{events} events in 1.5 s: {}",
        String::from_utf8_lossy(&got)
    );

    // An upgrade: 64 MiB each way intact after 101.
    let mut u = tls_connect(s.gw.addr(), client.clone(), "localhost")
        .await
        .expect("tls");
    u.write_all(b"POST /upgrade-echo HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = within(10, "101", u.read(&mut b)).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let data = payload(7, 64 << 20);
    let (mut r, mut wr) = tokio::io::split(u);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(256 * 1024) {
            wr.write_all(chunk).await.expect("write");
        }
        wr.flush().await.expect("flush");
        wr
    });
    let mut back = vec![0u8; data.len()];
    within(60, "echo", r.read_exact(&mut back))
        .await
        .expect("read");
    assert!(sha(&back) == sha(&data), "the tunnel changed bytes");
    let _ = writer.await;

    // An upgrade the backend refuses: its 400 reaches the client, and no tunnel.
    let mut bad = tls_connect(s.gw.addr(), client, "localhost")
        .await
        .expect("tls");
    bad.write_all(b"POST /upgrade-echo HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: spdy/3.1\r\n\r\n")
        .await
        .expect("write");
    let mut resp = vec![0u8; 64];
    let n = within(10, "400", bad.read(&mut resp)).await.expect("read");
    assert!(
        resp[..n].starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&resp[..n])
    );
}

#[tokio::test]
async fn a_quiet_response_stream_ends_after_the_idle_timeout() {
    // Watch events every 10 s, an idle timeout of 1 s: the stream ends after the first
    // quiet second, and the access line is written.
    let s = setup_with(1, Duration::from_secs(10), "idle_timeout = \"1s\"").await;
    let client = s.tls.public_client(None, &["http/1.1"]);
    let mut w = tls_connect(s.gw.addr(), client, "localhost")
        .await
        .expect("tls");
    w.write_all(b"GET /api/v1/namespaces/default/pods?watch=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    within(8, "the quiet stream ends", async {
        loop {
            let n = w.read(&mut buf).await.unwrap_or(0);
            if n == 0 || got.ends_with(b"0\r\n\r\n") {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"0\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "ended too early"
    );
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    eventually(5, "the request was logged and counted", || {
        s.gw.metrics().value_or_zero(
            "apilb_http_requests_total",
            &[("listener", "l"), ("backend", "b0"), ("code", "200")],
        ) == 1.0
    })
    .await;
}

#[tokio::test]
async fn kubectl_with_a_client_certificate_is_its_user_through_the_public_certificate() {
    use base64::Engine as _;
    let s = setup(1).await;
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t.as_bytes());
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: public\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: admin@public\n  context:\n    cluster: public\n    user: admin\ncurrent-context: admin@public\n",
        s.gw.addr().port(),
        b64(&s.tls.pki.public_ca.cert_pem),
        b64(&s.tls.pki.admin.cert_pem),
        b64(&s.tls.pki.admin.key_pem),
    );
    let path = s.tls.file("public-admin.kubeconfig", &kubeconfig);
    let out = within(
        60,
        "kubectl",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&path)
                .args(["get", "--raw", "/whoami"])
                .output()
                .expect("run kubectl (CI installs it)")
        }),
    )
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = who(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        (w.user.as_str(), w.authenticated_by.as_str()),
        ("admin", "front-proxy")
    );
    assert_eq!(w.groups, vec!["system:masters".to_string()]);
}

#[tokio::test]
async fn behind_a_proxy_protocol_balancer_x_forwarded_for_is_the_original_client() {
    let s = setup_full(1, Duration::from_millis(50), "proxy_protocol = true", "").await;
    // What an NLB with PROXY v2 sends in front of the client's TLS: 203.0.113.9:5000.
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12, 203, 0, 113, 9, 127, 0, 0, 1]);
    h.extend_from_slice(&5000u16.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    let mut tcp = tokio::net::TcpStream::connect(s.gw.addr())
        .await
        .expect("tcp");
    tcp.write_all(&h).await.expect("header");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls =
        tokio_rustls::TlsConnector::from(s.tls.public_client(Some(&s.tls.pki.node), &["http/1.1"]))
            .connect(name, tcp)
            .await
            .expect("TLS after the PROXY header");
    let mut tls = tls;
    tls.write_all(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    within(10, "answer", tls.read_to_end(&mut out)).await.ok();
    let text = String::from_utf8_lossy(&out);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let w = who(body.trim());
    assert_eq!(w.forwarded_for, vec!["203.0.113.9".to_string()], "{text}");
    assert_eq!(w.user, "system:node:worker0");
}

#[tokio::test]
async fn thirty_watches_over_one_h2_connection_spread_and_a_returning_backend_gets_requests_at_once(
) {
    let mut s = setup(3).await;
    let f = s.tls.files.clone();
    // 30 watches multiplexed over one HTTP/2 connection (curl --parallel), each ended by
    // curl after 2 s; each response names the apiserver that served it.
    let mut args: Vec<String> = vec![
        "-s".into(),
        "--http2".into(),
        "--parallel".into(),
        "--parallel-max".into(),
        "30".into(),
        "-m".into(),
        "2".into(),
        "-D".into(),
        "-".into(),
        "--cacert".into(),
        p(&f.public_ca),
    ];
    args.extend(cert_args(&s, &f.admin_cert, &f.admin_key));
    for _ in 0..30 {
        args.push("-o".into());
        args.push("/dev/null".into());
        args.push(format!(
            "https://127.0.0.1:{}/api/v1/namespaces/default/pods?watch=1",
            s.gw.addr().port()
        ));
    }
    let out = within(
        30,
        "30 watches",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(&args)
                .output()
                .expect("curl")
        }),
    )
    .await
    .expect("join");
    let heads = String::from_utf8_lossy(&out.stdout).to_lowercase();
    let per: Vec<usize> = (0..3)
        .map(|i| {
            heads
                .matches(&format!("x-apilb-apiserver: apiserver-{i}"))
                .count()
        })
        .collect();
    assert_eq!(per.iter().sum::<usize>(), 30, "{heads}");
    assert!(
        per.iter().all(|n| *n >= 8),
        "watches per apiserver: {per:?}"
    );
    assert_eq!(
        s.gw.metric("apilb_listener_connections_total", &[("listener", "l")]),
        1.0,
        "one client connection"
    );

    // One apiserver stops: requests go to the others; it comes back on its port and, over
    // the same client connection, gets requests at once.
    let client = s.tls.public_client(Some(&s.tls.pki.admin), &["http/1.1"]);
    let mut conn = tls_connect(s.gw.addr(), client, "localhost")
        .await
        .expect("tls");
    let addr0 = s.servers[0].addr();
    s.servers[0].stop();
    eventually(10, "apiserver-0 marked down", || {
        s.gw.metric("apilb_backend_healthy", &[("pool", "p"), ("backend", "b0")]) == 0.0
    })
    .await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(get_on(&mut conn).await);
    }
    assert!(!seen.iter().any(|b| b == "apiserver-0"), "{seen:?}");
    let fp = s.fp_ca.clone();
    let mut opts = sim_options(&s.tls, 0, addr0);
    opts.name = "apiserver-0".into();
    s.servers[0] = within(10, "restart apiserver-0", async {
        loop {
            let r = ApiServer::start_with_front_proxy(
                opts.clone(),
                None,
                FrontProxy {
                    ca_pem: fp.clone(),
                    allowed_names: vec!["front-proxy-client".into()],
                },
            )
            .await;
            match r {
                Ok(a) => break a,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    eventually(10, "apiserver-0 healthy again", || {
        s.gw.metric("apilb_backend_healthy", &[("pool", "p"), ("backend", "b0")]) == 1.0
    })
    .await;
    let mut after = Vec::new();
    for _ in 0..6 {
        after.push(get_on(&mut conn).await);
    }
    assert!(after.iter().any(|b| b == "apiserver-0"), "{after:?}");
}

/// One `GET /whoami` on an open HTTP/1.1 connection; the backend that answered.
async fn get_on(conn: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    conn.write_all(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    within(10, "answer", async {
        loop {
            let n = conn.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_string)
                    })
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    return who(&body[..len]).backend;
                }
            }
        }
    })
    .await
}

#[tokio::test]
async fn an_h2_client_resetting_streams_in_a_loop_is_closed_and_harms_nobody() {
    let s = setup(1).await;
    let tls = tls_connect(s.gw.addr(), s.tls.public_client(None, &["h2"]), "localhost")
        .await
        .expect("tls");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    let driver = tokio::spawn(conn);
    // CVE-2023-44487: open a stream and reset it at once, over and over.
    let mut sent = 0;
    let mut client = client;
    let ended = within(30, "the rapid-reset connection ends", async {
        loop {
            let Ok(c) = client.clone().ready().await else {
                break true;
            };
            client = c;
            let req = hyper::Request::get("https://localhost/whoami")
                .body(())
                .expect("request");
            let Ok((_resp, mut stream)) = client.send_request(req, false) else {
                break true;
            };
            stream.send_reset(h2::Reason::CANCEL);
            sent += 1;
            if sent >= 100_000 {
                break false;
            }
            if sent % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
    })
    .await;
    assert!(
        ended,
        "100,000 reset streams and the connection is still open"
    );
    let _ = within(10, "driver", driver).await;
    assert!(sent < 100_000, "closed after {sent} streams");
    eprintln!("the rapid-reset connection was closed after {sent} reset streams");
    eventually(5, "counted", || {
        s.gw.metric("apilb_http_connection_errors_total", &[("listener", "l")]) >= 1.0
    })
    .await;
    // Others are served.
    let w = who(&curl(&s, &["--http2".to_string()], &["/whoami"]).await);
    assert_eq!(w.authenticated_by, "anonymous");
}
