//! The terminate listener: public certificate in front, verified TLS to the simulated
//! apiservers behind, ALPN bridged, no identity lent, bad clients counted and contained.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use apilb::demo::apiserver::WhoAmI;
use apilb::demo::pki::Ca;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A terminate listener `l` over `backends`, with `extra` appended to `[listener.tls]`.
fn terminate_config(
    e: &TlsFixture,
    backends: &[SocketAddr],
    pool_extra: &str,
    tls_extra: &str,
) -> String {
    format!(
        "[[pool]]\nname = \"p\"\n{pool_extra}\n[pool.tls]\nca = \"{}\"\nserver_name = \"kubernetes\"\n{}\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nmode = \"terminate\"\npool = \"p\"\n\
         [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\nhandshake_timeout = \"1s\"\n{tls_extra}\n",
        e.files.ca.display(),
        backends_toml(backends),
        e.files.public_cert.display(),
        e.files.public_key.display(),
    )
}

fn curl(args: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args(args)
        .output()
        .expect("run curl (CI installs it)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn curl_gets_http2_and_http1_end_to_end_with_a_token() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 2, "127.0.0.1").await;
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    let gw = gateway(&terminate_config(&e, &addrs, "", "")).await;
    let url = format!("https://localhost:{}/whoami", gw.addr().port());
    let ca = e.files.public_ca.display().to_string();
    let auth = format!("Authorization: Bearer {TOKEN}");
    let (url2, ca2, auth2) = (url.clone(), ca.clone(), auth.clone());
    let h2 = tokio::task::spawn_blocking(move || {
        curl(&["-sS", "--http2", "--cacert", &ca2, "-H", &auth2, &url2])
    })
    .await
    .expect("join");
    let who: WhoAmI = serde_json::from_str(&h2).expect("json");
    assert_eq!(
        (who.http_version.as_str(), who.user.as_str()),
        ("HTTP/2.0", "token-user")
    );
    let h1 = tokio::task::spawn_blocking(move || {
        curl(&["-sS", "--http1.1", "--cacert", &ca, "-H", &auth, &url])
    })
    .await
    .expect("join");
    let who: WhoAmI = serde_json::from_str(&h1).expect("json");
    assert_eq!(
        (who.http_version.as_str(), who.user.as_str()),
        ("HTTP/1.1", "token-user")
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_never_reaches_the_backend() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let gw = gateway(&terminate_config(&e, &[servers[0].addr()], "", "")).await;
    // Offered by a rustls client ...
    let (status, body) = within(
        10,
        "whoami",
        https_get(
            gw.addr(),
            e.public_client(Some(&e.pki.admin), &[]),
            "localhost",
            "/whoami",
            &[],
        ),
    )
    .await;
    assert_eq!(status, 200);
    let who: WhoAmI = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (who.user.as_str(), who.authenticated_by.as_str()),
        ("system:anonymous", "anonymous")
    );
    // ... and by curl.
    let url = format!("https://localhost:{}/whoami", gw.addr().port());
    let f = &e.files;
    let args: Vec<String> = vec![
        "-sS".into(),
        "--cacert".into(),
        f.public_ca.display().to_string(),
        "--cert".into(),
        f.admin_cert.display().to_string(),
        "--key".into(),
        f.admin_key.display().to_string(),
        url,
    ];
    let out = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&a)
    })
    .await
    .expect("join");
    assert!(out.contains("system:anonymous"), "{out}");
    gw.shutdown().await;
}

#[tokio::test]
async fn http1_upgrade_streams_both_ways_and_64_mib_arrive_intact() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let gw = gateway(&terminate_config(&e, &[servers[0].addr()], "", "")).await;
    // kubectl exec asks for http/1.1 only, to be able to upgrade.
    let tls = within(
        10,
        "handshake",
        tls_connect(gw.addr(), e.public_client(None, &["http/1.1"]), "localhost"),
    )
    .await
    .expect("tls");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut r, mut w) = tokio::io::split(tls);
    w.write_all(b"GET /upgrade-echo HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").await.expect("request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        within(10, "101 headers", r.read_exact(&mut b))
            .await
            .expect("read");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    let data = payload(11, 64 << 20);
    let expected = sha(&data);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(256 * 1024) {
            w.write_all(chunk).await.expect("write");
        }
        w.flush().await.expect("flush");
        w
    });
    let mut got = vec![0u8; 64 << 20];
    within(120, "64 MiB echoed", r.read_exact(&mut got))
        .await
        .expect("read");
    assert_eq!(
        sha(&got),
        expected,
        "bytes changed through the terminate listener"
    );
    drop(writer.await.expect("writer"));
    drop(r);
    gw.shutdown().await;
}

#[tokio::test]
async fn kubectl_with_a_token_kubeconfig_goes_through() {
    use base64::Engine as _;
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 2, "127.0.0.1").await;
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    let gw = gateway(&terminate_config(&e, &addrs, "", "")).await;
    let ca = base64::engine::general_purpose::STANDARD.encode(e.pki.public_ca.cert_pem.as_bytes());
    let kubeconfig = e.file(
        "token-kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://localhost:{}\n    certificate-authority-data: {ca}\nusers:\n- name: u\n  user:\n    token: {TOKEN}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
            gw.addr().port()
        ),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("kubectl")
            .args([
                "--kubeconfig",
                &kubeconfig.display().to_string(),
                "get",
                "--raw",
                "/whoami",
            ])
            .output()
            .expect("run kubectl (CI installs it)")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let who: WhoAmI = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(who.user, "token-user");
    assert_eq!(
        who.http_version, "HTTP/2.0",
        "kubectl speaks h2 when the gateway bridges it"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn sni_picks_the_certificate_and_unknown_names_get_the_default() {
    let e = TlsFixture::new();
    let other = e
        .pki
        .public_ca
        .server("other", &["other.test"], 30)
        .expect("cert");
    let cert = e.file("other.crt", &other.cert_pem);
    let key = e.file("other.key", &other.key_pem);
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let gw = gateway(&terminate_config(
        &e,
        &[servers[0].addr()],
        "",
        &format!(
            "[[listener.tls.sni]]\nnames = [\"other.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    ))
    .await;
    let cfg = e.public_client(None, &[]);
    // other.test verifies only against the SNI certificate ...
    within(10, "sni", tls_connect(gw.addr(), cfg.clone(), "other.test"))
        .await
        .expect("SNI certificate served");
    // ... and apilb.demo.test, configured nowhere, gets the default, which covers it.
    within(
        10,
        "default",
        tls_connect(gw.addr(), cfg.clone(), "apilb.demo.test"),
    )
    .await
    .expect("default certificate served");
    // The default does not cover other.test, so a wrong pick would fail here:
    let default_only = gateway(&terminate_config(&e, &[servers[0].addr()], "", "")).await;
    assert!(within(
        10,
        "no sni",
        tls_connect(default_only.addr(), cfg, "other.test")
    )
    .await
    .is_err());
    default_only.shutdown().await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_backend_from_an_unrelated_ca_is_refused_and_counted_without_harm_to_others() {
    let e = TlsFixture::new();
    let stranger = Ca::new("stranger").expect("ca");
    let bad = apiserver_with(
        "bad",
        "127.0.0.1:0".parse().expect("a"),
        &stranger.server("k", &["kubernetes"], 30).expect("c"),
        &e.pki.ca.cert_pem,
        true,
    )
    .await;
    let good = apiservers(&e.pki, 1, "127.0.0.1").await;
    let gw = gateway(&terminate_config(&e, &[bad.addr(), good[0].addr()], "balance = \"round-robin\"\nconnect_attempts = 1\n[pool.health]\ninterval = \"1h\"\nfall = 1", "")).await;
    let cfg = e.public_client(None, &[]);
    // The first client lands on the bad backend: its handshake is never completed.
    let first = within(
        10,
        "first",
        tls_connect(gw.addr(), cfg.clone(), "localhost"),
    )
    .await;
    assert!(
        first.is_err(),
        "a client was served through an unverified backend"
    );
    assert_eq!(
        gw.metric(
            "apilb_tls_handshake_errors_total",
            &[("listener", "l"), ("reason", "backend_tls")]
        ),
        1.0
    );
    assert_eq!(
        gw.metric(
            "apilb_listener_rejected_total",
            &[("listener", "l"), ("reason", "no_backend")]
        ),
        1.0
    );
    let r = gw.handle().backend_status("p", "b0").expect("b0").reason;
    assert!(r.contains("unknown authority"), "{r}");
    // The bad backend is now out (passive health); the next clients are served.
    for _ in 0..3 {
        let (status, _) = within(
            10,
            "served",
            https_get(gw.addr(), cfg.clone(), "localhost", "/version", &[]),
        )
        .await;
        assert_eq!(status, 200);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn plain_http_garbage_and_silence_are_closed_in_time_and_counted() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let gw = gateway(&terminate_config(&e, &[servers[0].addr()], "", "")).await;
    let addr = gw.addr();
    let bad = |bytes: &'static [u8]| async move {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        if !bytes.is_empty() {
            s.write_all(bytes).await.expect("write");
        }
        let mut buf = [0u8; 1024];
        // Closed by the gateway: EOF or reset, well before the test's own limit.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("connection left open"),
            }
        }
        started.elapsed()
    };
    let good = async {
        // A normal client served while the bad ones hang around.
        tokio::time::sleep(Duration::from_millis(200)).await;
        https_get(
            addr,
            e.public_client(None, &[]),
            "localhost",
            "/version",
            &[],
        )
        .await
        .0
    };
    let (http, garbage, silent, ok) = tokio::join!(
        bad(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        bad(b"\x8f\x13\xa7\x00\xffrandom bytes\x01\x02\x03\x04\x05"),
        bad(b""),
        good
    );
    assert_eq!(ok, 200);
    assert!(
        http < Duration::from_secs(2) && garbage < Duration::from_secs(2),
        "{http:?} {garbage:?}"
    );
    assert!(
        silent >= Duration::from_millis(900) && silent < Duration::from_secs(3),
        "silent client closed after {silent:?}"
    );
    let m = |r: &str| {
        gw.metric(
            "apilb_tls_handshake_errors_total",
            &[("listener", "l"), ("reason", r)],
        )
    };
    assert_eq!(m("handshake_timeout"), 1.0);
    assert!(m("not_tls") >= 1.0, "plain HTTP is not TLS");
    assert_eq!(m("not_tls") + m("client_handshake"), 2.0);
    gw.shutdown().await;
}

#[tokio::test]
async fn rsa_pkcs1_ecdsa_sec1_and_ed25519_keys_are_served() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let d = e.dir().display().to_string();
    let req = "-subj /CN=localhost -addext subjectAltName=DNS:localhost -days 2";
    // Keys in the formats operators bring, made by openssl: PKCS#1 RSA, SEC1 ECDSA, PKCS#8 Ed25519.
    let kinds = [
        ("rsa", format!("openssl genrsa -traditional -out {d}/rsa.key 2048 && openssl req -x509 -key {d}/rsa.key -out {d}/rsa.crt {req}"), "BEGIN RSA PRIVATE KEY"),
        ("ec", format!("openssl ecparam -name prime256v1 -genkey -noout -out {d}/ec.key && openssl req -x509 -key {d}/ec.key -out {d}/ec.crt {req}"), "BEGIN EC PRIVATE KEY"),
        ("ed", format!("openssl genpkey -algorithm ed25519 -out {d}/ed.key && openssl req -x509 -key {d}/ed.key -out {d}/ed.crt {req}"), "BEGIN PRIVATE KEY"),
    ];
    for (kind, gen, marker) in kinds {
        tokio::task::spawn_blocking(move || sh(&format!("{gen} 2>&1")))
            .await
            .expect("join");
        let key = std::fs::read_to_string(format!("{d}/{kind}.key")).expect("key");
        assert!(key.contains(marker), "{kind}: {key}");
        let cfg = terminate_config(&e, &[servers[0].addr()], "", "").replace(
            &format!(
                "cert = \"{}\"\nkey = \"{}\"",
                e.files.public_cert.display(),
                e.files.public_key.display()
            ),
            &format!("cert = \"{d}/{kind}.crt\"\nkey = \"{d}/{kind}.key\""),
        );
        let gw = gateway(&cfg).await;
        let port = gw.addr().port();
        let out = tokio::task::spawn_blocking(move || {
            sh(&format!(
                "openssl s_client -connect 127.0.0.1:{port} -servername localhost </dev/null 2>&1"
            ))
        })
        .await
        .expect("join");
        assert!(
            out.contains("CN = localhost") || out.contains("CN=localhost"),
            "{kind}: {out}"
        );
        assert!(
            out.contains("TLSv1.3") || out.contains("TLSv1.2"),
            "{kind}: {out}"
        );
        gw.shutdown().await;
    }
}

/// rustls keeps 8 TLS 1.3 tickets per server name and uses each once, so a burst of more
/// concurrent connections than that would cost the apiserver a full handshake (a signature)
/// each; the gateway keeps a deep queue per backend.
#[tokio::test]
async fn backend_sessions_resume_for_a_burst_of_connections() {
    const BURST: usize = 32;
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let gw = gateway(&terminate_config(&e, &[servers[0].addr()], "", "")).await;
    let client = e.public_client(None, &["http/1.1"]);
    let mut resumed = Vec::new();
    for round in 0..2 {
        let before = servers[0].resumed_handshakes();
        // All handshakes at once, so the burst really is concurrent: the gateway finishes
        // its backend handshake before it answers the client's, and reads the backend's
        // tickets only once relaying.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..BURST {
            set.spawn(tls_connect(gw.addr(), client.clone(), "localhost"));
        }
        let mut conns = Vec::new();
        while let Some(c) = within(20, "handshakes", set.join_next()).await {
            conns.push(c.expect("join").expect("TLS through the gateway"));
        }
        for mut c in conns {
            c.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut body = Vec::new();
            within(10, "response", c.read_to_end(&mut body))
                .await
                .expect("read");
            assert!(
                body.starts_with(b"HTTP/1.1 200"),
                "round {round}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        resumed.push(servers[0].resumed_handshakes() - before);
    }
    assert!(
        resumed[0] < BURST as u64 / 2,
        "{} of the first burst resumed: the burst was not concurrent",
        resumed[0]
    );
    assert!(
        resumed[1] >= BURST as u64 - 2,
        "only {} of {BURST} backend handshakes resumed in the second burst",
        resumed[1]
    );
    gw.shutdown().await;
}

/// Round-2 hardening, item 1: anyone who can reach the public listener could mark the whole
/// pool down by offering a protocol no apiserver speaks, since each refused backend
/// handshake counted as that backend's failure. Now the gateway never offers a protocol it
/// does not know, refuses such a client itself, and the backends stay healthy.
#[tokio::test]
async fn bogus_alpn_from_clients_never_marks_backends_down() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 2, "127.0.0.1").await;
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    // fall = 1 and no periodic check: a single charged failure would flip a backend.
    let gw = gateway(&terminate_config(
        &e,
        &addrs,
        "when_all_down = \"reject\"\n[pool.health]\ninterval = \"1h\"\nfall = 1",
        "",
    ))
    .await;
    for b in ["b0", "b1"] {
        let b = b.to_string();
        eventually(10, "first check", || {
            gw.handle().backend_status("p", &b).expect("b").state == apilb::health::State::Healthy
        })
        .await;
    }
    let mut refusals = Vec::new();
    for offer in [&["bogus"][..], &["h3", "spdy/3.1"], &["BOGUS", "x"]] {
        for _ in 0..3 {
            let r = within(
                10,
                "bogus",
                tls_connect(gw.addr(), e.public_client(None, offer), "localhost"),
            )
            .await;
            let Err(e) = r else {
                panic!("a client offering only {offer:?} was served");
            };
            refusals.push(e);
        }
    }
    for b in ["b0", "b1"] {
        let s = gw.handle().backend_status("p", b).expect("b");
        assert_eq!(s.state, apilb::health::State::Healthy, "{b}: {}", s.reason);
        assert_eq!(
            gw.metric(
                "apilb_backend_connect_errors_total",
                &[("pool", "p"), ("backend", b)]
            ),
            0.0
        );
    }
    for err in refusals {
        assert!(
            err.to_string().contains("NoApplicationProtocol"),
            "refused without the RFC 7301 alert: {err}"
        );
    }
    assert_eq!(
        gw.metric(
            "apilb_tls_handshake_errors_total",
            &[("listener", "l"), ("reason", "client_alpn")]
        ),
        9.0
    );
    // A client that mixes a bogus protocol with a real one is served with the real one.
    let mut s = within(
        10,
        "mixed offer",
        tls_connect(
            gw.addr(),
            e.public_client(None, &["bogus", "http/1.1"]),
            "localhost",
        ),
    )
    .await
    .expect("served");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = [0u8; 12];
    within(10, "answer", s.read_exact(&mut answer))
        .await
        .expect("answer");
    assert_eq!(
        &answer,
        b"HTTP/1.1 200",
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(s);
    gw.shutdown().await;
}

/// Round-2 hardening, item 4: clients that have not finished their handshake each hold a
/// backend handshake already, so their number is capped apart from max_connections; over
/// the cap a client is closed at once, counted, and slots come back as handshakes end.
#[tokio::test]
async fn handshakes_in_progress_are_capped_apart_from_max_connections() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let gw = gateway(&terminate_config(
        &e,
        &[servers[0].addr()],
        "",
        "max_handshakes = 2",
    ))
    .await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(
            within(5, "connect", TcpStream::connect(gw.addr()))
                .await
                .expect("connect"),
        );
    }
    // Both slots are taken by clients that said nothing yet.
    eventually(5, "two handshakes in progress", || {
        gw.metric("apilb_listener_active_connections", &[("listener", "l")]) == 2.0
    })
    .await;
    let mut third = within(5, "connect", TcpStream::connect(gw.addr()))
        .await
        .expect("connect");
    let mut b = [0u8; 1];
    let asked = Instant::now();
    let n = within(2, "closed at once", third.read(&mut b))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Well before handshake_timeout (1s), which would close it without any cap.
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        gw.metric(
            "apilb_tls_handshake_errors_total",
            &[("listener", "l"), ("reason", "handshake_limit")]
        ),
        1.0
    );
    // Closing the stalled ones frees their slots; a real client is served again.
    drop(stalled);
    let cfg = e.public_client(None, &["http/1.1"]);
    let (status, _) = within(
        10,
        "served",
        https_get(gw.addr(), cfg, "localhost", "/version", &[]),
    )
    .await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

/// SPEC §10 `client_ca` without `[listener.identity]`: certificates are verified (and with
/// `require_client_cert` demanded), but the identity is not passed on.
#[tokio::test]
async fn client_ca_verifies_client_certificates_and_require_refuses_clients_without() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    let ca = e.ca().display().to_string();
    let optional = gateway(&terminate_config(
        &e,
        &addrs,
        "",
        &format!("client_ca = \"{ca}\""),
    ))
    .await;
    // No certificate: fine when not required; the apiserver sees the gateway's connection,
    // which lends no identity.
    let who = who_at(optional.addr(), e.public_client(None, &["http/1.1"])).await;
    assert_eq!(who.authenticated_by, "anonymous");
    // A certificate from the cluster CA verifies (and is not passed on).
    let who = who_at(
        optional.addr(),
        e.public_client(Some(&e.pki.admin), &["http/1.1"]),
    )
    .await;
    assert_eq!(who.authenticated_by, "anonymous");
    // A certificate from an unrelated CA fails the handshake, counted by its reason.
    let stranger = Ca::new("stranger").expect("ca");
    let foreign = stranger
        .client("mallory", &["system:masters"])
        .expect("cert");
    let r = within(10, "handshake", async {
        let s = tls_connect(
            optional.addr(),
            e.public_client(Some(&foreign), &["http/1.1"]),
            "localhost",
        )
        .await;
        match s {
            // TLS 1.3: the client learns of the rejection on its first read.
            Ok(mut s) => {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                let mut b = [0u8; 16];
                s.read(&mut b).await.map(|n| n > 0).unwrap_or(false)
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(!r, "a foreign client certificate must be refused");
    eventually(5, "client_certificate counted", || {
        optional.metric(
            "apilb_tls_handshake_errors_total",
            &[("listener", "l"), ("reason", "client_certificate")],
        ) == 1.0
    })
    .await;

    let required = gateway(&terminate_config(
        &e,
        &addrs,
        "",
        &format!("client_ca = \"{ca}\"\nrequire_client_cert = true"),
    ))
    .await;
    let who = who_at(
        required.addr(),
        e.public_client(Some(&e.pki.node), &["http/1.1"]),
    )
    .await;
    assert_eq!(who.backend, "apiserver-0");
    let refused = within(10, "handshake", async {
        match tls_connect(
            required.addr(),
            e.public_client(None, &["http/1.1"]),
            "localhost",
        )
        .await
        {
            Ok(mut s) => {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                let mut b = [0u8; 16];
                !s.read(&mut b).await.map(|n| n > 0).unwrap_or(false)
            }
            Err(_) => true,
        }
    })
    .await;
    assert!(
        refused,
        "require_client_cert must refuse a client without one"
    );
    eventually(5, "client_certificate counted", || {
        required.metric(
            "apilb_tls_handshake_errors_total",
            &[("listener", "l"), ("reason", "client_certificate")],
        ) == 1.0
    })
    .await;
}

/// `GET /whoami` through a terminate listener (the public certificate names `localhost`).
async fn who_at(addr: SocketAddr, cfg: std::sync::Arc<rustls::ClientConfig>) -> WhoAmI {
    let (status, body) = https_get(addr, cfg, "localhost", "/whoami", &[]).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("whoami JSON")
}
