//! Health checks against simulated apiservers on loopback: tcp, tls and https checks, the
//! reasons they give, rise/fall timing, CA rotation, anonymous-auth hints, fail-open/reject.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use apilb::demo::pki::{Ca, Pki};
use common::*;

struct Setup {
    pki: Pki,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let pki = pki();
        let dir = tempfile::tempdir().expect("tempdir");
        pki.write_to(dir.path()).expect("write PKI");
        Self { pki, dir }
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.crt").display().to_string()
    }
}

fn healthy(gw: &Gw, b: &str) -> bool {
    gw.metric("apilb_backend_healthy", &[("pool", "p"), ("backend", b)]) == 1.0
}

fn reason(gw: &Gw, b: &str) -> String {
    gw.handle().backend_status("p", b).expect("backend").reason
}

#[tokio::test]
async fn stopped_backend_leaves_and_rejoins_rotation_in_time() {
    let s = Setup::new();
    let servers = apiservers(&s.pki, 2, "127.0.0.1").await;
    let addrs: Vec<SocketAddr> = servers.iter().map(|a| a.addr()).collect();
    let gw = gateway(&simple_config(
        &addrs,
        "balance = \"round-robin\"\n[pool.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2",
        "",
    ))
    .await;
    eventually(5, "both healthy after first checks", || {
        gw.handle()
            .backend_status("p", "b1")
            .is_some_and(|s| s.last_check.is_some())
    })
    .await;

    servers[1].stop();
    // interval * fall + timeout = 500 ms, plus 10% jitter per interval; 3 s is the loud bound.
    let took = eventually(3, "stopped backend marked unhealthy", || {
        !healthy(&gw, "b1")
    })
    .await;
    assert!(took <= Duration::from_millis(1500), "took {took:?}");
    assert_eq!(reason(&gw, "b1"), "connection refused");

    let cfg = client_config(&s.pki, None, &[]);
    for _ in 0..10 {
        let who = within(10, "whoami", whoami(gw.addr(), cfg.clone())).await;
        assert_eq!(
            who.backend, "apiserver-0",
            "a client was sent to the stopped backend"
        );
    }

    let back = apiserver_with(
        "apiserver-1",
        addrs[1],
        &s.pki.apiserver,
        &s.pki.ca.cert_pem,
        true,
    )
    .await;
    let took = eventually(3, "restarted backend healthy again", || healthy(&gw, "b1")).await;
    // interval * rise = 400 ms plus jitter.
    assert!(took <= Duration::from_millis(1500), "took {took:?}");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(
            within(10, "whoami", whoami(gw.addr(), cfg.clone()))
                .await
                .backend,
        );
    }
    assert!(
        seen.contains("apiserver-1"),
        "returned backend gets no traffic: {seen:?}"
    );
    drop(back);
    gw.shutdown().await;
}

#[tokio::test]
async fn failing_readyz_takes_a_backend_out_with_https_but_not_with_tcp() {
    let s = Setup::new();
    let servers = apiservers(&s.pki, 1, "127.0.0.1").await;
    let https = gateway(&simple_config(
        &[servers[0].addr()],
        &format!("[pool.health]\ncheck = \"https\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1\n[pool.tls]\nca = \"{}\"\nserver_name = \"kubernetes\"", s.ca()),
        "",
    ))
    .await;
    let tcp = gateway(&simple_config(
        &[servers[0].addr()],
        "[pool.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1",
        "",
    ))
    .await;
    eventually(5, "https check passes", || reason(&https, "b0") == "ok").await;
    servers[0].set_ready(false);
    eventually(5, "https check sees status 500", || !healthy(&https, "b0")).await;
    assert_eq!(reason(&https, "b0"), "status 500");
    // The TCP check only sees an open port: a draining apiserver stays in rotation.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(healthy(&tcp, "b0"));
    assert_eq!(reason(&tcp, "b0"), "ok");
    servers[0].set_ready(true);
    eventually(5, "https check passes again", || healthy(&https, "b0")).await;
    assert!(
        https.metric(
            "apilb_health_checks_total",
            &[("pool", "p"), ("backend", "b0"), ("result", "fail")]
        ) >= 1.0
    );
    https.shutdown().await;
    tcp.shutdown().await;
}

#[tokio::test]
async fn certificate_problems_are_named_and_ca_rotation_is_trusted() {
    let s = Setup::new();
    let other_ca = Ca::new("unrelated-ca").expect("CA");
    let new_ca = Ca::new("new-cluster-ca").expect("CA");
    let local: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let ca_pem = &s.pki.ca.cert_pem;
    let unknown = apiserver_with(
        "unknown",
        local,
        &other_ca.server("x", &["kubernetes"], 30).expect("cert"),
        ca_pem,
        true,
    )
    .await;
    let wrong_name = apiserver_with(
        "wrong-name",
        local,
        &s.pki.ca.server("x", &["etcd.local"], 30).expect("cert"),
        ca_pem,
        true,
    )
    .await;
    let rotated = apiserver_with(
        "rotated",
        local,
        &new_ca.server("x", &["kubernetes"], 30).expect("cert"),
        ca_pem,
        true,
    )
    .await;
    let current = apiserver_with("current", local, &s.pki.apiserver, ca_pem, true).await;
    let bundle = s.file(
        "bundle.pem",
        &format!("{}{}", s.pki.ca.cert_pem, new_ca.cert_pem),
    );
    let gw = gateway(&simple_config(
        &[unknown.addr(), wrong_name.addr(), rotated.addr(), current.addr()],
        &format!("[pool.health]\ncheck = \"tls\"\ninterval = \"1h\"\ntimeout = \"2s\"\n[pool.tls]\nca = \"{bundle}\"\nserver_name = \"kubernetes\""),
        "",
    ))
    .await;
    eventually(10, "all checked", || {
        ["b0", "b1", "b2", "b3"].iter().all(|b| {
            gw.handle()
                .backend_status("p", b)
                .is_some_and(|s| s.last_check.is_some())
        })
    })
    .await;
    assert_eq!(reason(&gw, "b0"), "certificate signed by unknown authority");
    assert_eq!(
        reason(&gw, "b1"),
        "certificate not valid for name kubernetes"
    );
    assert!(!healthy(&gw, "b0") && !healthy(&gw, "b1"));
    assert!(
        healthy(&gw, "b2"),
        "a backend on the new CA of a rotation bundle: {}",
        reason(&gw, "b2")
    );
    assert!(healthy(&gw, "b3"), "{}", reason(&gw, "b3"));
    gw.shutdown().await;
}

#[tokio::test]
async fn anonymous_auth_off_gives_a_hint_and_the_health_certificate_fixes_it() {
    let s = Setup::new();
    let local: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let strict = apiserver_with("strict", local, &s.pki.apiserver, &s.pki.ca.cert_pem, false).await;
    let health_id = s
        .pki
        .ca
        .client("system:apilb-health", &["system:monitoring"])
        .expect("cert");
    let cert = s.file("health.crt", &health_id.cert_pem);
    let key = s.file("health.key", &health_id.key_pem);
    let base = format!("[pool.tls]\nca = \"{}\"\nserver_name = \"kubernetes\"\n[pool.health]\ncheck = \"https\"\ninterval = \"1h\"\ntimeout = \"2s\"\n", s.ca());

    let without = gateway(&simple_config(&[strict.addr()], &base, "")).await;
    eventually(10, "checked", || {
        reason(&without, "b0") != "not checked yet"
    })
    .await;
    let r = reason(&without, "b0");
    assert!(
        r.starts_with("status 401") && r.contains("set health.client_cert"),
        "{r}"
    );
    without.shutdown().await;

    let with = gateway(&simple_config(
        &[strict.addr()],
        &format!("{base}client_cert = \"{cert}\"\nclient_key = \"{key}\"\n"),
        "",
    ))
    .await;
    eventually(10, "checked", || reason(&with, "b0") != "not checked yet").await;
    assert_eq!(reason(&with, "b0"), "ok");
    assert!(healthy(&with, "b0"));
    // The health identity is for checks only: an anonymous client through the gateway stays
    // anonymous (and is refused by this apiserver).
    let (status, _) = within(
        10,
        "anonymous",
        https_get(
            with.addr(),
            client_config(&s.pki, None, &[]),
            "kubernetes",
            "/whoami",
            &[],
        ),
    )
    .await;
    assert_eq!(status, 401);
    with.shutdown().await;
}

#[tokio::test]
async fn all_down_fails_open_or_rejects_and_counts_it() {
    let s = Setup::new();
    let servers = apiservers(&s.pki, 2, "127.0.0.1").await;
    for srv in &servers {
        srv.set_ready(false);
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|a| a.addr()).collect();
    for mode in ["fail-open", "reject"] {
        let gw = gateway(&simple_config(
            &addrs,
            &format!("when_all_down = \"{mode}\"\n[pool.health]\ncheck = \"https\"\ninterval = \"1h\"\ntimeout = \"2s\"\n[pool.tls]\nca = \"{}\"\nserver_name = \"kubernetes\"", s.ca()),
            "",
        ))
        .await;
        eventually(10, "all down", || {
            !healthy(&gw, "b0") && !healthy(&gw, "b1")
        })
        .await;
        let cfg = client_config(&s.pki, Some(&s.pki.admin), &[]);
        if mode == "fail-open" {
            let who = within(10, "served while all down", whoami(gw.addr(), cfg)).await;
            assert_eq!(who.user, "admin");
            assert_eq!(
                gw.metric("apilb_pool_fail_open_total", &[("pool", "p")]),
                1.0
            );
        } else {
            let tcp = tokio::net::TcpStream::connect(gw.addr())
                .await
                .expect("connect");
            let name = rustls::pki_types::ServerName::try_from("kubernetes").expect("name");
            let r = within(
                10,
                "rejected",
                tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
            )
            .await;
            assert!(r.is_err(), "reject must close the connection");
            assert_eq!(
                gw.metric(
                    "apilb_listener_rejected_total",
                    &[("listener", "l"), ("reason", "no_backend")]
                ),
                1.0
            );
            assert_eq!(
                gw.metric("apilb_pool_fail_open_total", &[("pool", "p")]),
                0.0
            );
        }
        gw.shutdown().await;
    }
}
