//! The admin server: metrics parsed as Prometheus text, readiness, the JSON status, the HTML
//! status page in a real browser.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// The metric names SPEC §4 makes part of the contract.
const SPEC_METRICS: &[&str] = &[
    "apilb_listener_connections_total",
    "apilb_listener_active_connections",
    "apilb_listener_rejected_total",
    "apilb_backend_connections_total",
    "apilb_backend_active_connections",
    "apilb_backend_connect_errors_total",
    "apilb_backend_healthy",
    "apilb_backend_bytes_total",
    "apilb_health_checks_total",
    "apilb_health_check_duration_seconds",
    "apilb_pool_fail_open_total",
    "apilb_tls_handshake_errors_total",
    "apilb_config_reloads_total",
    "apilb_certificate_expiry_timestamp_seconds",
];

async fn scrape(admin: SocketAddr) -> Metrics {
    let r = within(10, "scrape", request(admin, None, "GET", "/metrics", &[])).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{}",
        r.head()
    );
    Metrics::parse(&r.body)
}

fn with_admin(cfg: String, extra_pool: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        cfg.replace("name = \"p\"\n", &format!("name = \"p\"\n{extra_pool}\n"))
    )
}

#[tokio::test]
async fn metrics_parse_and_move_by_the_right_amounts() {
    let tls = TlsFixture::new();
    let sinks = [SinkServer::start().await, SinkServer::start().await];
    let addrs: Vec<SocketAddr> = sinks.iter().map(|s| s.addr).collect();
    let gw = gateway(&with_admin(
        simple_config(&addrs, "", ""),
        &format!("balance = \"round-robin\"\n[pool.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 1\nfall = 1\n[pool.tls]\nca = \"{}\"", tls.ca().display()),
    ))
    .await;
    let admin = gw.handle().admin_addr().expect("admin bound");

    let before = scrape(admin).await;
    let names = before.names();
    for name in SPEC_METRICS {
        assert!(names.contains(name), "{name} missing from /metrics");
    }
    assert!(
        names.contains("process_open_fds"),
        "process metrics missing"
    );
    assert!(names.contains("apilb_listener_connection_duration_seconds"));
    let ca_expiry = before.value(
        "apilb_certificate_expiry_timestamp_seconds",
        &[("source", "pool/p/ca/0")],
    );
    assert!(ca_expiry > 1.7e9, "{ca_expiry}");

    // Four connections, round-robin: two per backend, 1000 bytes up and 3000 down each.
    for i in 0..4 {
        within(
            10,
            "transfer",
            sink_roundtrip(gw.addr(), 1000 - 16, 3000 - 32, i),
        )
        .await;
    }
    // The admin server encodes /metrics at most once a second: wait that out since the
    // `before` scrape, so `after` is a fresh encoding that saw all four connections.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = scrape(admin).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    assert_eq!(
        delta("apilb_listener_connections_total", &[("listener", "l")]),
        4.0
    );
    assert_eq!(
        after.value("apilb_listener_active_connections", &[("listener", "l")]),
        0.0
    );
    assert_eq!(
        delta(
            "apilb_listener_connection_duration_seconds",
            &[("listener", "l")]
        ),
        4.0
    );
    for b in ["b0", "b1"] {
        assert_eq!(
            delta(
                "apilb_backend_connections_total",
                &[("pool", "p"), ("backend", b)]
            ),
            2.0
        );
        // The request header is 16 bytes of the 1000; the answer carries a 32-byte digest.
        assert_eq!(
            delta(
                "apilb_backend_bytes_total",
                &[("pool", "p"), ("backend", b), ("direction", "up")]
            ),
            2.0 * 1000.0
        );
        assert_eq!(
            delta(
                "apilb_backend_bytes_total",
                &[("pool", "p"), ("backend", b), ("direction", "down")]
            ),
            2.0 * 3000.0
        );
        assert_eq!(
            after.value("apilb_backend_healthy", &[("pool", "p"), ("backend", b)]),
            1.0
        );
    }
    assert!(
        after.value(
            "apilb_health_check_duration_seconds",
            &[("pool", "p"), ("backend", "b0")]
        ) >= 1.0
    );
    assert_eq!(
        after.value("apilb_config_reloads_total", &[("result", "failure")]),
        0.0
    );

    // apilb_backend_healthy follows a backend going down ...
    sinks[1].stop().await;
    let admin2 = admin;
    within(10, "healthy goes to 0", async {
        while scrape(admin2)
            .await
            .value("apilb_backend_healthy", &[("pool", "p"), ("backend", "b1")])
            != 0.0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // ... and up again.
    let _back = EchoServer::start_on(&addrs[1].to_string()).await;
    within(10, "healthy back to 1", async {
        while scrape(admin2)
            .await
            .value("apilb_backend_healthy", &[("pool", "p"), ("backend", "b1")])
            != 1.0
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn readyz_follows_pool_health_and_other_paths_are_refused() {
    let echo = EchoServer::start().await;
    let gw = gateway(&with_admin(
        simple_config(&[echo.addr], "", ""),
        "[pool.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 1\nfall = 1",
    ))
    .await;
    let admin = gw.handle().admin_addr().expect("admin");
    let ready = || async move { admin_request(admin, "GET", "/readyz").await };
    eventually(5, "checked", || {
        gw.handle()
            .backend_status("p", "b0")
            .is_some_and(|s| s.last_check.is_some())
    })
    .await;
    assert_eq!(within(5, "readyz", ready()).await.0, 200);
    echo.stop().await;
    let (status, body) = within(10, "readyz 503", async {
        loop {
            let (s, _, b) = ready().await;
            if s == 503 {
                break (s, b);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(status, 503);
    assert!(
        body.contains("pool \"p\" has no healthy backend") && body.contains("listener l"),
        "{body}"
    );
    let _back = EchoServer::start_on(&echo.addr.to_string()).await;
    within(10, "readyz 200 again", async {
        while ready().await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    assert_eq!(
        within(5, "healthz", admin_request(admin, "GET", "/healthz"))
            .await
            .0,
        200
    );
    assert_eq!(
        within(5, "404", admin_request(admin, "GET", "/nope"))
            .await
            .0,
        404
    );
    let r = within(5, "405", request(admin, None, "POST", "/metrics", &[])).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"), "{}", r.head());
    let (status, _, body) = within(5, "HEAD", admin_request(admin, "HEAD", "/status")).await;
    assert_eq!((status, body.as_str()), (200, ""));
    gw.shutdown().await;
}

#[tokio::test]
async fn api_status_matches_config_and_live_state() {
    let echos = echo_servers(2).await;
    let dead = closed_port();
    let gw = gateway(&with_admin(
        simple_config(
            &[echos[0].addr, echos[1].addr, dead],
            "",
            "max_connections = 100",
        ),
        "balance = \"round-robin\"\n[pool.health]\ninterval = \"1h\"",
    ))
    .await;
    let admin = gw.handle().admin_addr().expect("admin");
    eventually(5, "checked", || {
        gw.handle()
            .backend_status("p", "b2")
            .is_some_and(|s| s.last_check.is_some())
    })
    .await;
    let held = within(10, "held", echo_once(gw.addr())).await;

    let r = within(5, "api", request(admin, None, "GET", "/api/status", &[])).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{}",
        r.head()
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    let l = &v["listeners"][0];
    assert_eq!(l["name"], "l");
    assert_eq!(l["mode"], "passthrough");
    assert_eq!(l["listen"][0], gw.addr().to_string());
    assert_eq!(l["active"], 1);
    let backends = v["pools"][0]["backends"].as_array().expect("backends");
    assert_eq!(v["pools"][0]["name"], "p");
    let by_name: HashMap<&str, &serde_json::Value> = backends
        .iter()
        .map(|b| (b["name"].as_str().expect("name"), b))
        .collect();
    assert_eq!(by_name.len(), 3);
    assert_eq!(by_name["b0"]["address"], echos[0].addr.to_string());
    assert_eq!(by_name["b0"]["state"], "healthy");
    assert_eq!(by_name["b2"]["state"], "unhealthy");
    assert_eq!(by_name["b2"]["reason"], "connection refused");
    assert!(by_name["b2"]["last_check"].is_string());
    let active: u64 = backends
        .iter()
        .map(|b| b["active"].as_u64().expect("active"))
        .sum();
    assert_eq!(active, 1);
    let up: u64 = backends
        .iter()
        .map(|b| b["bytes_up"].as_u64().expect("bytes"))
        .sum();
    assert_eq!(up, 0, "bytes are counted when a connection ends");
    assert!(v["config"]["loaded_at"].is_string());
    assert!(v["config"]["last_reload"].is_null());
    drop(held);
    gw.shutdown().await;
}

#[tokio::test]
async fn status_page_renders_in_a_real_browser() {
    let tls = TlsFixture::new();
    let servers = apiservers(&tls.pki, 3, "127.0.0.1").await;
    servers[2].set_ready(false);
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr()).collect();
    let gw = gateway(&with_admin(
        simple_config(&addrs, "", ""),
        &format!("[pool.health]\ncheck = \"https\"\ninterval = \"1h\"\n[pool.tls]\nca = \"{}\"\nserver_name = \"kubernetes\"", tls.ca().display()),
    ))
    .await;
    eventually(10, "checked", || {
        ["b0", "b1", "b2"].iter().all(|b| {
            gw.handle()
                .backend_status("p", b)
                .is_some_and(|s| s.last_check.is_some())
        })
    })
    .await;
    let _held = within(
        10,
        "a connection",
        whoami(gw.addr(), tls.client(Some(&tls.pki.admin), &[])),
    )
    .await;
    let url = format!("http://{}/status", gw.handle().admin_addr().expect("admin"));
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    let profile = tempfile::tempdir().expect("profile");
    let chromium = |extra: Vec<String>| {
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,820",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.extend(extra);
        args.push(url.clone());
        args
    };
    let dump_args = chromium(vec!["--dump-dom".into()]);
    let shot_args = chromium(vec![format!("--screenshot={}", shot.display())]);
    let (dom, shot_ok) = tokio::task::spawn_blocking(move || {
        let run = |args: Vec<String>| {
            std::process::Command::new("chromium")
                .args(args)
                .output()
                .expect("run chromium (CI installs Debian's chromium)")
        };
        let dom = run(dump_args);
        let shot = run(shot_args);
        (
            String::from_utf8_lossy(&dom.stdout).to_string(),
            shot.status.success(),
        )
    })
    .await
    .expect("join");
    for (b, state) in [("b0", "healthy"), ("b1", "healthy"), ("b2", "unhealthy")] {
        let row = dom
            .split("<tr>")
            .find(|r| r.contains(&format!("<td>{b}</td>")))
            .unwrap_or_else(|| panic!("{b} not on the rendered page:\n{dom}"));
        assert!(
            row.contains(&format!(">{state}<")),
            "{b} should be {state}: {row}"
        );
    }
    assert!(
        dom.contains("status 500"),
        "the failing check's reason is shown"
    );
    // b2 fails, but the pool has healthy backends: the gateway is ready.
    assert!(
        dom.contains(">READY<") && !dom.contains("NOT READY"),
        "readiness badge wrong"
    );
    assert!(dom.contains("pool/p/ca/0"), "certificates are listed");
    assert!(
        shot_ok && shot.exists(),
        "no screenshot at {}",
        shot.display()
    );
    gw.shutdown().await;
}
