//! Hot reload on real sockets: nothing refused or cut that still belongs, nothing lost on a
//! bad config, certificates and CAs rotated in place, listeners moved.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn failures(gw: &Gw) -> f64 {
    gw.metric("apilb_config_reloads_total", &[("result", "failure")])
}

#[tokio::test]
async fn fifty_reloads_refuse_nothing_and_cut_nothing() {
    let echo = EchoServer::start().await;
    let sink = SinkServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("apilb.toml");
    let config = |idle: &str| {
        format!(
            "[[pool]]\nname = \"p\"\n{}\n[[pool]]\nname = \"s\"\n{}\n\
             [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\nidle_timeout = \"{idle}\"\n\
             [[listener]]\nname = \"long\"\nlisten = \"127.0.0.1:0\"\npool = \"s\"\n",
            backends_toml(&[echo.addr]),
            backends_toml(&[sink.addr])
        )
    };
    write_atomic(&path, &config("1h"));
    let gw = gateway_file(&path).await;
    let addr = gw.addr();
    let long_addr = gw.handle().addr("long").expect("long");

    // A long transfer started before the first reload: 8 MiB up, slowly, then 8 MiB down.
    let long = tokio::spawn(async move {
        let mut s = TcpStream::connect(long_addr).await.expect("connect");
        let mut head = Vec::from(7u64.to_le_bytes());
        head.extend_from_slice(&(8u64 << 20).to_le_bytes());
        s.write_all(&head).await.expect("head");
        let data = payload(3, 8 << 20);
        for chunk in data.chunks(128 * 1024) {
            s.write_all(chunk).await.expect("write across reloads");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        s.shutdown().await.expect("half-close");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("read");
        assert_eq!(answer.len(), (8 << 20) + 32);
        assert_eq!(&answer[8 << 20..], sha(&data));
        assert_eq!(sha(&answer[..8 << 20]), sha(&payload(7, 8 << 20)));
    });
    // A bounded loop of short connections through the unchanged listener.
    let failed = Arc::new(AtomicUsize::new(0));
    let f = failed.clone();
    let short = tokio::spawn(async move {
        let mut n = 0;
        while n < 400 {
            let ok = tokio::time::timeout(Duration::from_secs(5), async {
                let mut s = TcpStream::connect(addr).await?;
                s.write_all(b"x").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(ok, Ok(Ok(()))) {
                f.fetch_add(1, Ordering::SeqCst);
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    });
    let reloader = gw.handle().reloader();
    for i in 0..50 {
        write_atomic(&path, &config(if i % 2 == 0 { "2h" } else { "1h" }));
        within(10, "reload", reloader.reload())
            .await
            .expect("reload succeeds");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let made = within(60, "short connections", short).await.expect("join");
    within(60, "long transfer", long)
        .await
        .expect("long transfer intact");
    assert_eq!(made, 400);
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "connections failed during reloads"
    );
    assert!(gw.metric("apilb_config_reloads_total", &[("result", "success")]) >= 50.0);
    assert_eq!(failures(&gw), 0.0);
    assert_eq!(gw.handle().addr("l"), Some(addr));
    gw.shutdown().await;
}

#[tokio::test]
async fn added_backends_take_traffic_once_checked_and_removed_ones_drain() {
    let echos = echo_servers(3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("apilb.toml");
    let config = |addrs: &[SocketAddr]| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\
             [[pool]]\nname = \"p\"\nbalance = \"round-robin\"\ndrain_timeout = \"600ms\"\n[pool.health]\ninterval = \"1h\"\n{}\n\
             [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n",
            backends_toml(addrs)
        )
    };
    write_atomic(&path, &config(&[echos[0].addr, echos[1].addr]));
    let gw = gateway_file(&path).await;
    let addr = gw.addr();
    // One open connection on each backend.
    let on_b0 = within(10, "c0", echo_once(addr)).await;
    let on_b1 = within(10, "c1", echo_once(addr)).await;
    let accepted = |i: usize| echos[i].accepted.load(Ordering::SeqCst);

    // Add the third backend (the names shift: b2 is new).
    write_atomic(
        &path,
        &config(&[echos[0].addr, echos[1].addr, echos[2].addr]),
    );
    let summary = within(10, "reload", gw.handle().reloader().reload())
        .await
        .expect("reload");
    assert_eq!(summary.backends_added, [format!("p/{}", echos[2].addr)]);
    eventually(5, "new backend checked", || {
        gw.handle()
            .backend_status("p", "b2")
            .is_some_and(|s| s.last_check.is_some())
    })
    .await;
    let before = accepted(2);
    for _ in 0..6 {
        drop(within(10, "after add", echo_once(addr)).await);
    }
    assert!(
        accepted(2) - before >= 2,
        "the added backend got no traffic"
    );

    // Remove b1: no new connections, its open connection closed after drain_timeout, b0's untouched.
    write_atomic(&path, &config(&[echos[0].addr, echos[2].addr]));
    let summary = within(10, "reload", gw.handle().reloader().reload())
        .await
        .expect("reload");
    assert_eq!(summary.backends_removed, [format!("p/{}", echos[1].addr)]);
    // While its connection is open, the removed backend is reported as draining (SPEC §4).
    let admin = gw.handle().admin_addr().expect("admin");
    let removed = echos[1].addr.to_string();
    let b1_state = || async {
        let (_, _, body) = admin_request(admin, "GET", "/api/status").await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        v["pools"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .find(|b| b["address"] == removed.as_str())
            .map(|b| {
                (
                    b["state"].as_str().unwrap_or("").to_string(),
                    b["active"].as_u64(),
                )
            })
    };
    assert_eq!(
        within(5, "status", b1_state()).await,
        Some(("draining".to_string(), Some(1))),
        "a removed backend with an open connection must show as draining"
    );
    let (_, _, page) = within(5, "page", admin_request(admin, "GET", "/status")).await;
    assert!(
        page.contains("badge draining"),
        "the status page shows no draining backend"
    );
    let b1_before = accepted(1);
    for _ in 0..6 {
        drop(within(10, "after remove", echo_once(addr)).await);
    }
    assert_eq!(
        accepted(1),
        b1_before,
        "a removed backend got a new connection"
    );
    let mut on_b1 = on_b1;
    let mut b = [0u8; 1];
    let n = within(5, "drained", on_b1.read(&mut b)).await.unwrap_or(0);
    assert_eq!(n, 0, "the removed backend's connection was not closed");
    eventually(5, "counted as drained", || {
        gw.metric(
            "apilb_listener_closed_total",
            &[("listener", "l"), ("end", "drained")],
        ) == 1.0
    })
    .await;
    assert_eq!(
        within(5, "status", b1_state()).await,
        None,
        "a drained backend is no longer shown"
    );
    let mut on_b0 = on_b0;
    on_b0
        .write_all(b"k")
        .await
        .expect("b0 connection untouched");
    within(5, "b0 echo", on_b0.read_exact(&mut b))
        .await
        .expect("b0 connection untouched");
    drop(on_b0);
    gw.shutdown().await;
}

fn terminate_config(e: &TlsFixture, backends: &[SocketAddr], ca: &Path, listen: &str) -> String {
    format!(
        "[[pool]]\nname = \"p\"\n[pool.health]\ncheck = \"tls\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n[pool.tls]\nca = \"{}\"\nserver_name = \"kubernetes\"\n{}\n\
         [[listener]]\nname = \"l\"\nlisten = \"{listen}\"\nmode = \"terminate\"\npool = \"p\"\n\
         [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        ca.display(),
        backends_toml(backends),
        e.path("public.crt").display(),
        e.path("public.key").display(),
    )
}

#[tokio::test]
async fn bad_configs_change_nothing_and_are_counted() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let path = e.path("apilb.toml");
    let good = terminate_config(&e, &[servers[0].addr()], &e.ca(), "127.0.0.1:0");
    write_atomic(&path, &good);
    let gw = gateway_file(&path).await;
    let addr = gw.addr();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let other = e
        .pki
        .public_ca
        .server("x", &["localhost"], 30)
        .expect("cert");
    e.file("other.key", &other.key_pem);
    let pem = std::fs::read_to_string(e.path("public.crt")).expect("read");
    e.file("truncated.crt", &pem[..pem.len() / 2]);
    let cases: Vec<(&str, String)> = vec![
        (
            "syntax error",
            good.replace("mode = \"terminate\"", "mode = terminate"),
        ),
        (
            "unknown pool",
            good.replace(
                "pool = \"p\"\n\n[listener.tls]",
                "pool = \"q\"\n\n[listener.tls]",
            )
            .replace(
                "pool = \"p\"\n[listener.tls]",
                "pool = \"q\"\n[listener.tls]",
            ),
        ),
        (
            "missing certificate",
            good.replace("public.crt", "gone.crt"),
        ),
        (
            "key of another certificate",
            good.replace("public.key", "other.key"),
        ),
        (
            "address taken",
            good.replace(
                "127.0.0.1:0",
                &taken.local_addr().expect("addr").to_string(),
            ),
        ),
        ("truncated PEM", good.replace("public.crt", "truncated.crt")),
    ];
    let client = e.public_client(None, &[]);
    for (what, text) in cases {
        assert_ne!(text, good, "{what}: the case did not change the config");
        let before = failures(&gw);
        write_atomic(&path, &text);
        let r = within(10, what, gw.handle().reloader().reload()).await;
        let err = match r {
            Ok(_) => panic!("{what}: reload should fail"),
            Err(e) => e.to_string(),
        };
        // Failing for the reason the case is about, not for some other mistake in the text.
        let expected = match what {
            "syntax error" => "apilb.toml:",
            "unknown pool" => "unknown pool \"q\"",
            "missing certificate" => "cannot read",
            "key of another certificate" => "other.key",
            "address taken" => "cannot listen on",
            _ => "truncated.crt",
        };
        assert!(err.contains(expected), "{what}: {expected:?} not in {err}");
        assert!(failures(&gw) >= before + 1.0, "{what}: not counted");
        let (status, _) = within(
            10,
            what,
            https_get(addr, client.clone(), "localhost", "/version", &[]),
        )
        .await;
        assert_eq!(status, 200, "{what}: the running config stopped serving");
        assert_eq!(gw.handle().listeners()[0].addrs, [addr], "{what}");
    }
    gw.shutdown().await;
}

fn peer_cert(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default()
}

#[tokio::test]
async fn certificate_replaced_by_rename_is_served_without_sighup() {
    let e = TlsFixture::new();
    let servers = apiservers(&e.pki, 1, "127.0.0.1").await;
    let path = e.path("apilb.toml");
    write_atomic(
        &path,
        &terminate_config(&e, &[servers[0].addr()], &e.ca(), "127.0.0.1:0"),
    );
    let gw = gateway_file(&path).await;
    let addr = gw.addr();
    let cfg = e.public_client(None, &["http/1.1"]);
    let connect = || {
        let cfg = cfg.clone();
        async move { tls_connect(addr, cfg, "localhost").await.expect("tls") }
    };
    // An established session (an upgraded echo stream) from before the rotation.
    let mut old = within(10, "old", connect()).await;
    let old_cert = peer_cert(&old);
    old.write_all(b"GET /upgrade-echo HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").await.expect("w");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        within(10, "101", old.read_exact(&mut b)).await.expect("r");
        head.push(b[0]);
    }

    // Rotate: new certificate and key written aside, then renamed over the old files.
    let new = e
        .pki
        .public_ca
        .server("apilb.demo.test", &["localhost"], 90)
        .expect("cert");
    e.file("public.key.new", &new.key_pem);
    e.file("public.crt.new", &new.cert_pem);
    std::fs::rename(e.path("public.key.new"), e.path("public.key")).expect("mv");
    std::fs::rename(e.path("public.crt.new"), e.path("public.crt")).expect("mv");

    let rotated = within(15, "new certificate served", async {
        loop {
            let tls = connect().await;
            let c = peer_cert(&tls);
            if c != old_cert {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let expected = apilb::tls::certs_from_pem(new.cert_pem.as_bytes(), "new").expect("pem");
    assert_eq!(
        rotated,
        expected[0].as_ref(),
        "a different certificate than the new one"
    );
    old.write_all(b"still here")
        .await
        .expect("old session writes");
    let mut b = [0u8; 10];
    within(5, "old session", old.read_exact(&mut b))
        .await
        .expect("old session reads");
    assert_eq!(&b, b"still here");
    assert!(gw.metric("apilb_config_reloads_total", &[("result", "success")]) >= 1.0);
    drop(old);
    gw.shutdown().await;
}

#[tokio::test]
async fn ca_rotation_keeps_the_backend_healthy() {
    let e = TlsFixture::new();
    let new_ca = apilb::demo::pki::Ca::new("new-cluster-ca").expect("ca");
    let local: SocketAddr = "127.0.0.1:0".parse().expect("a");
    let srv = apiserver_with("a", local, &e.pki.apiserver, &e.pki.ca.cert_pem, true).await;
    let backend = srv.addr();
    let path = e.path("apilb.toml");
    write_atomic(
        &path,
        &terminate_config(&e, &[backend], &e.ca(), "127.0.0.1:0"),
    );
    let gw = gateway_file(&path).await;
    eventually(5, "checked", || {
        gw.handle()
            .backend_status("p", "b0")
            .is_some_and(|s| s.reason == "ok")
    })
    .await;
    let watch_healthy = {
        let m = gw.handle().metrics().clone();
        tokio::spawn(async move {
            let mut min = 1.0f64;
            for _ in 0..60 {
                let v = Metrics::parse(&m.encode())
                    .value("apilb_backend_healthy", &[("pool", "p"), ("backend", "b0")]);
                min = min.min(v);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            min
        })
    };
    // Step 1: trust old + new.
    let bundle = e.file(
        "bundle.pem",
        &format!("{}{}", e.pki.ca.cert_pem, new_ca.cert_pem),
    );
    write_atomic(
        &path,
        &terminate_config(&e, &[backend], &bundle, "127.0.0.1:0"),
    );
    within(10, "reload", gw.handle().reloader().reload())
        .await
        .expect("reload");
    // Step 2: the apiserver moves to a certificate from the new CA (same address).
    drop(srv);
    let new_cert = new_ca.server("k", &["kubernetes"], 30).expect("c");
    let moved = restart_apiserver("a", backend, &new_cert, &e.pki.ca.cert_pem).await;
    let min = within(20, "watch", watch_healthy).await.expect("join");
    assert_eq!(min, 1.0, "the backend left rotation during the CA rotation");
    assert_eq!(
        gw.handle().backend_status("p", "b0").expect("b0").reason,
        "ok"
    );
    drop(moved);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_listener_moved_to_a_new_port_keeps_its_open_connections() {
    let echo = EchoServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("apilb.toml");
    let port = |p: u16| {
        format!(
            "[[pool]]\nname = \"p\"\n{}\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:{p}\"\npool = \"p\"\n",
            backends_toml(&[echo.addr])
        )
    };
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("b")
            .local_addr()
            .expect("a")
            .port()
    };
    let (p1, p2) = (free(), free());
    write_atomic(&path, &port(p1));
    let gw = gateway_file(&path).await;
    let old_addr: SocketAddr = format!("127.0.0.1:{p1}").parse().expect("a");
    let mut open = within(10, "open", echo_once(old_addr)).await;
    write_atomic(&path, &port(p2));
    let summary = within(10, "reload", gw.handle().reloader().reload())
        .await
        .expect("reload");
    assert_eq!(summary.addresses_removed, [old_addr]);
    let new_addr: SocketAddr = format!("127.0.0.1:{p2}").parse().expect("a");
    drop(within(10, "new port", echo_once(new_addr)).await);
    assert!(
        TcpStream::connect(old_addr).await.is_err(),
        "the old port still accepts"
    );
    open.write_all(b"z").await.expect("open connection works");
    let mut b = [0u8; 1];
    within(5, "echo", open.read_exact(&mut b))
        .await
        .expect("open connection works");
    drop(open);
    gw.shutdown().await;
}

/// Round-2 hardening, item 9: every reload restarted the health loops, and a carried-over
/// backend waits an interval before its next check, so reloads more frequent than the
/// interval stopped health checking altogether.
#[tokio::test]
async fn frequent_reloads_do_not_stop_health_checks() {
    let echo = EchoServer::start().await;
    let (_dir, path) = write_temp(
        "apilb.toml",
        &simple_config(
            &[echo.addr],
            "[pool.health]\ninterval = \"300ms\"\ntimeout = \"200ms\"",
            "",
        ),
    );
    let gw = gateway_file(&path).await;
    let checks = |gw: &Gw| {
        gw.metrics().value_or_zero(
            "apilb_health_checks_total",
            &[("pool", "p"), ("backend", "b0"), ("result", "pass")],
        )
    };
    eventually(5, "first check", || checks(&gw) >= 1.0).await;
    let before = checks(&gw);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        within(10, "reload", gw.handle().reloader().reload())
            .await
            .expect("reload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = checks(&gw) - before;
    assert!(
        done >= 4.0,
        "{done} checks in 2 s of reloads with a 300 ms interval"
    );
    gw.shutdown().await;
}

/// Round-2 hardening, item 9: metric series of removed backends lived forever, and a new
/// backend under an old name shared the old one's counters.
#[tokio::test]
async fn a_removed_backend_takes_its_series_with_it() {
    let echos = echo_servers(2).await;
    let (dir, path) = write_temp(
        "apilb.toml",
        &simple_config(
            &[echos[0].addr, echos[1].addr],
            "drain_timeout = \"200ms\"\n[pool.health]\ninterval = \"1h\"",
            "",
        ),
    );
    let gw = gateway_file(&path).await;
    for _ in 0..4 {
        drop(within(10, "echo", echo_once(gw.addr())).await);
    }
    let b1 = [("pool", "p"), ("backend", "b1")];
    eventually(5, "b1 served", || {
        gw.metric("apilb_backend_connections_total", &b1) >= 1.0
    })
    .await;
    // b1 goes away.
    write_atomic(
        &path,
        &simple_config(
            &[echos[0].addr],
            "drain_timeout = \"200ms\"\n[pool.health]\ninterval = \"1h\"",
            "",
        ),
    );
    within(10, "reload", gw.handle().reloader().reload())
        .await
        .expect("reload");
    eventually(5, "b1's series removed", || {
        gw.metrics()
            .get("apilb_backend_connections_total", &b1)
            .is_none()
    })
    .await;
    assert!(gw.metrics().get("apilb_backend_healthy", &b1).is_none());
    // b1 returns at another address: a new backend, counted from zero.
    write_atomic(
        &path,
        &simple_config(
            &[echos[0].addr, closed_port()],
            "drain_timeout = \"200ms\"\n[pool.health]\ninterval = \"1h\"",
            "",
        ),
    );
    within(10, "reload", gw.handle().reloader().reload())
        .await
        .expect("reload");
    assert_eq!(gw.metric("apilb_backend_connections_total", &b1), 0.0);
    drop(dir);
    gw.shutdown().await;
}

/// A reload that failed because a file the new config names did not exist yet is retried
/// when that file appears (the watcher used to watch only the running config's files).
#[tokio::test]
async fn a_file_that_appears_after_a_failed_reload_is_picked_up() {
    let tls = TlsFixture::new();
    let echo = EchoServer::start().await;
    let path = tls.file("apilb.toml", &simple_config(&[echo.addr], "", ""));
    let gw = gateway_file(&path).await;
    let later = tls.path("later-ca.pem");
    let text = simple_config(
        &[echo.addr],
        &format!("[pool.tls]\nca = \"{}\"", later.display()),
        "",
    );
    // The watcher takes its first look at the files when it starts.
    tokio::time::sleep(Duration::from_millis(700)).await;
    write_atomic(&path, &text);
    eventually(10, "the reload failed", || failures(&gw) >= 1.0).await;
    let ok = gw.metric("apilb_config_reloads_total", &[("result", "success")]);
    std::fs::write(&later, &tls.pki.ca.cert_pem).expect("write");
    eventually(10, "reloaded once the file appeared", || {
        gw.metric("apilb_config_reloads_total", &[("result", "success")]) > ok
    })
    .await;
    gw.shutdown().await;
}
