//! `apilb probe` (SPEC §8) as an operator runs it before go-live, against simulated
//! apiservers with rcgen certificates on loopback; and the same coverage seen by a running
//! gateway's https checks.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;

use apilb::demo::apiserver::ApiServer;
use apilb::demo::pki::CertKey;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The gateway's virtual IP and name, as clients use them.
const VIP: &str = "203.0.113.10";
const NAME: &str = "api.example.test";
const GOOD_SANS: &[&str] = &["kubernetes", NAME, VIP, "127.0.0.1"];

fn config(tls: &TlsFixture, backends: &[(&str, SocketAddr)], health_extra: &str) -> String {
    let mut s = format!(
        "[[pool]]\nname = \"apiservers\"\n[pool.tls]\nca = \"{}\"\nserver_name = \"kubernetes\"\n\
         [pool.health]\ncheck = \"https\"\n{health_extra}\n",
        tls.ca().display()
    );
    for (name, addr) in backends {
        s.push_str(&format!(
            "[[pool.backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
        ));
    }
    s.push_str(&format!(
        "[[listener]]\nname = \"passthrough\"\nlisten = \"127.0.0.1:0\"\npool = \"apiservers\"\nnames = [\"{NAME}\", \"{VIP}\"]\n"
    ));
    s
}

fn probe(path: &std::path::Path, json: bool) -> (i32, String) {
    let mut cmd = Command::new(bin());
    cmd.args(["probe", "--timeout", "3s", "--config"]).arg(path);
    if json {
        cmd.args(["--output", "json"]);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run probe");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

async fn serve(tls: &TlsFixture, name: &str, cert: &CertKey, anonymous: bool) -> ApiServer {
    apiserver_with(
        name,
        "127.0.0.1:0".parse().expect("addr"),
        cert,
        &tls.pki.ca.cert_pem,
        anonymous,
    )
    .await
}

fn row<'a>(text: &'a str, backend: &str) -> &'a str {
    text.lines()
        .find(|l| l.trim_start().starts_with(backend))
        .unwrap_or_else(|| panic!("no row for {backend}:\n{text}"))
}

#[tokio::test]
async fn probe_names_each_problem_on_its_backends_row() {
    let tls = TlsFixture::new();
    let novip = tls
        .pki
        .ca
        .server("novip", &["kubernetes", NAME, "127.0.0.1"], 365)
        .expect("cert");
    let soon = tls.pki.ca.server("soon", GOOD_SANS, 10).expect("cert");
    let good = tls.pki.ca.server("good", GOOD_SANS, 365).expect("cert");
    let servers = [
        serve(&tls, "novip", &novip, true).await,
        serve(&tls, "soon", &soon, true).await,
        serve(&tls, "good", &good, true).await,
    ];
    let path = tls.file(
        "apilb.toml",
        &config(
            &tls,
            &[
                ("novip", servers[0].addr()),
                ("soon", servers[1].addr()),
                ("good", servers[2].addr()),
            ],
            "",
        ),
    );
    let (code, text) = within(
        30,
        "probe",
        tokio::task::spawn_blocking({
            let path = path.clone();
            move || probe(&path, false)
        }),
    )
    .await
    .expect("join");
    assert_eq!(code, 2, "{text}");
    assert!(row(&text, "novip").contains(VIP), "{text}");
    assert!(row(&text, "good").contains("none"), "{text}");
    let soon_row = row(&text, "soon");
    assert!(
        soon_row.contains("9 days") || soon_row.contains("10 days"),
        "{text}"
    );
    assert!(text.contains(&format!("disagree on {VIP}")), "{text}");
    assert!(row(&text, "good").contains("200"), "readiness: {text}");
    assert!(text.lines().count() <= 25, "more than a screen:\n{text}");

    let (code, json) = tokio::task::spawn_blocking(move || probe(&path, true))
        .await
        .expect("join");
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let backends = v["pools"][0]["backends"].as_array().expect("backends");
    assert_eq!(backends[0]["missing_names"], serde_json::json!([VIP]));
    let days = backends[1]["certificate"]["days_left"]
        .as_i64()
        .expect("days");
    assert!((9..=10).contains(&days), "{days}");
    assert_eq!(backends[2]["missing_names"], serde_json::json!([]));
    assert_eq!(v["pools"][0]["same_sans"], false);
    assert_eq!(v["pools"][0]["disagree_on"], serde_json::json!([VIP]));
    assert!(v["problems"].as_array().expect("problems").len() >= 3);
}

#[tokio::test]
async fn all_good_exits_0_and_all_down_exits_1() {
    let tls = TlsFixture::new();
    let good = tls.pki.ca.server("good", GOOD_SANS, 365).expect("cert");
    let servers = [
        serve(&tls, "a", &good, true).await,
        serve(&tls, "b", &good, true).await,
    ];
    let path = tls.file(
        "apilb.toml",
        &config(
            &tls,
            &[("a", servers[0].addr()), ("b", servers[1].addr())],
            "",
        ),
    );
    let (code, text) = tokio::task::spawn_blocking(move || probe(&path, false))
        .await
        .expect("join");
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("no problem found"), "{text}");
    assert!(row(&text, "a").contains("h2,http/1.1"), "{text}");
    assert!(row(&text, "a").contains("TLS 1.3"), "{text}");

    let down = tls.file(
        "down.toml",
        &config(&tls, &[("a", closed_port()), ("b", closed_port())], ""),
    );
    let (code, text) = tokio::task::spawn_blocking(move || probe(&down, false))
        .await
        .expect("join");
    assert_eq!(code, 1, "{text}");
    assert!(row(&text, "a").contains("no"), "{text}");
}

#[tokio::test]
async fn a_401_gets_the_hint_and_the_health_identity_fixes_it() {
    let tls = TlsFixture::new();
    let good = tls.pki.ca.server("good", GOOD_SANS, 365).expect("cert");
    let closed = serve(&tls, "closed", &good, false).await;
    let path = tls.file(
        "apilb.toml",
        &config(&tls, &[("closed", closed.addr())], ""),
    );
    let (code, json) = tokio::task::spawn_blocking(move || probe(&path, true))
        .await
        .expect("join");
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let r = &v["pools"][0]["backends"][0]["readiness"];
    assert_eq!(r["status"], 401, "{r}");
    assert!(
        r["error"]
            .as_str()
            .expect("error")
            .contains("health.client_cert"),
        "{r}"
    );

    let id = tls
        .pki
        .ca
        .client("system:apilb-health", &["system:monitoring"])
        .expect("client");
    let cert = tls.file("health.crt", &id.cert_pem);
    let key = tls.file("health.key", &id.key_pem);
    let with_id = tls.file(
        "id.toml",
        &config(
            &tls,
            &[("closed", closed.addr())],
            &format!(
                "client_cert = \"{}\"\nclient_key = \"{}\"",
                cert.display(),
                key.display()
            ),
        ),
    );
    let (code, json) = tokio::task::spawn_blocking(move || probe(&with_id, true))
        .await
        .expect("join");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        v["pools"][0]["backends"][0]["readiness"]["status"], 200,
        "{json}"
    );
    assert_eq!(code, 0, "{json}");
}

/// A TLS server offering http/1.1 only, answering every request 200.
async fn http1_only(cert: &CertKey) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut cfg = rustls::ServerConfig::builder_with_provider(apilb::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            apilb::tls::certs_from_pem(cert.cert_pem.as_bytes(), "c").expect("c"),
            apilb::tls::key_from_pem(cert.key_pem.as_bytes(), "k").expect("k"),
        )
        .expect("cert");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    let mut b = [0u8; 1024];
                    if s.read(&mut b).await.is_ok_and(|n| n > 0) {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                            .await;
                        let _ = s.shutdown().await;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn differing_sans_and_a_backend_without_h2_are_flagged() {
    let tls = TlsFixture::new();
    let good = tls.pki.ca.server("good", GOOD_SANS, 365).expect("cert");
    let other = tls
        .pki
        .ca
        .server(
            "other",
            &["kubernetes", NAME, VIP, "127.0.0.1", "extra.example.test"],
            365,
        )
        .expect("cert");
    let a = serve(&tls, "a", &good, true).await;
    let (b, task) = http1_only(&other).await;
    let path = tls.file(
        "apilb.toml",
        &config(&tls, &[("a", a.addr()), ("old", b)], ""),
    );
    let (code, json) = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || probe(&path, true))
            .await
            .expect("join")
    };
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["pools"][0]["same_sans"], false, "{json}");
    // Both cover every name that matters: each node's own extra names are no problem.
    assert_eq!(
        v["pools"][0]["disagree_on"],
        serde_json::json!([]),
        "{json}"
    );
    assert_eq!(
        v["pools"][0]["backends"][0]["alpn"],
        serde_json::json!(["h2", "http/1.1"])
    );
    assert_eq!(
        v["pools"][0]["backends"][1]["alpn"],
        serde_json::json!(["http/1.1"]),
        "{json}"
    );
    assert_eq!(code, 0, "{json}");
    let (_, text) = tokio::task::spawn_blocking(move || probe(&path, false))
        .await
        .expect("join");
    assert!(text.contains("differ elsewhere"), "{text}");
    assert!(row(&text, "old").contains(" http/1.1 "), "{text}");
    task.abort();
}

/// SPEC §8 in a running gateway: coverage is reported, never a reason to take a backend
/// out; the metric and /api/status follow a certificate swap at the backend.
#[tokio::test]
async fn https_checks_report_coverage_without_judging_health() {
    let tls = TlsFixture::new();
    let novip = tls
        .pki
        .ca
        .server("novip", &["kubernetes", NAME, "127.0.0.1"], 365)
        .expect("cert");
    let srv = serve(&tls, "b0", &novip, true).await;
    let addr = srv.addr();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        config(
            &tls,
            &[("b0", addr)],
            "interval = \"200ms\"\ntimeout = \"150ms\""
        )
    );
    let gw = gateway(&text).await;
    let labels = [("pool", "apiservers"), ("backend", "b0")];
    eventually(5, "first check", || {
        gw.handle()
            .backend_status("apiservers", "b0")
            .is_some_and(|s| s.missing_names.is_some())
    })
    .await;
    assert_eq!(
        gw.metric("apilb_backend_certificate_covers_names", &labels),
        0.0
    );
    assert_eq!(
        gw.metric("apilb_backend_healthy", &labels),
        1.0,
        "coverage decided health"
    );
    let admin = gw.handle().admin_addr().expect("admin");
    let (_, _, body) = within(5, "status", admin_request(admin, "GET", "/api/status")).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let b = &v["pools"][0]["backends"][0];
    assert_eq!(b["covers_names"], false, "{b}");
    assert_eq!(b["missing_names"], serde_json::json!([VIP]));
    assert!(
        gw.metric(
            "apilb_backend_certificate_expiry_timestamp_seconds",
            &labels
        ) > 0.0
    );
    let (_, _, page) = within(5, "page", admin_request(admin, "GET", "/status")).await;
    assert!(
        page.contains(&format!("not valid for {VIP}")),
        "the status page shows no mark"
    );

    // The backend gets a certificate with the name (same address).
    drop(srv);
    let good = tls.pki.ca.server("good", GOOD_SANS, 365).expect("cert");
    let moved = restart_apiserver("b0", addr, &good, &tls.pki.ca.cert_pem).await;
    eventually(10, "covered now", || {
        gw.metrics()
            .get("apilb_backend_certificate_covers_names", &labels)
            == Some(1.0)
    })
    .await;
    let (_, _, body) = within(5, "status", admin_request(admin, "GET", "/api/status")).await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["pools"][0]["backends"][0]["covers_names"], true);
    drop(moved);
    gw.shutdown().await;
}
