//! `apilb load` (SPEC §12) against three simulated apiservers behind a passthrough gateway,
//! on real sockets: the kubelet profile's counts add up against what the simulated API
//! served, leases are renewed, per-node identities, `--admin` matches `/api/status`, a
//! failover re-establishes every watch, the list profile is open loop, and the exit codes.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use apilb::demo::api::store::{Kind, StoreLimits, VERBS};
use common::*;

/// Runs `apilb load ARGS` off the runtime (bounded by `timeout`), without a KUBECONFIG from
/// the environment.
async fn load(args: Vec<String>) -> Output {
    within(
        120,
        "apilb load",
        tokio::task::spawn_blocking(move || {
            Command::new("timeout")
                .arg("100")
                .arg(bin())
                .arg("load")
                .args(&args)
                .env_remove("KUBECONFIG")
                .stdin(Stdio::null())
                .output()
                .expect("run apilb load")
        }),
    )
    .await
    .expect("join")
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_string()).collect()
}

fn json_report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("--output json: {e}: {stdout}"))
}

/// Open connections per backend name, from the gateway's `/api/status`.
async fn active_per_backend(admin: std::net::SocketAddr) -> Vec<(String, u64)> {
    let (status, _, body) = admin_request(admin, "GET", "/api/status").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    v["pools"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("").to_string(),
                b["active"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_profile_through_the_gateway_adds_up() {
    let c = SimCluster::start(3, StoreLimits::default()).await;
    let admin = c.gw.handle().admin_addr().expect("admin");
    let kc = c.kubeconfig.display().to_string();
    let ca = c.tls.files.ca.display().to_string();
    let ca_key = c.tls.files.ca_key.display().to_string();
    let admin_url = format!("http://{admin}");
    let run = tokio::spawn(load(args(&[
        "--kubeconfig",
        &kc,
        "--profile",
        "kubelet",
        "--nodes",
        "50",
        "--duration",
        "10s",
        "--ramp",
        "2s",
        "--lease-interval",
        "2s",
        "--node-ca-cert",
        &ca,
        "--node-ca-key",
        &ca_key,
        "--admin",
        &admin_url,
        "--output",
        "json",
    ])));
    // Once every node has started, the gateway's view of the connections holds still.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let seen = active_per_backend(admin).await;
    let out = run.await.expect("join");
    let r = json_report(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[   5s] nodes 50/50, watches 100 open"),
        "progress: {stderr}"
    );

    assert_eq!(r["nodes"], 50);
    assert_eq!(r["errors"], serde_json::json!({}), "{r:#}");
    assert_eq!(r["watches"]["open"], 100, "{r:#}");
    assert_eq!(r["watches"]["expected"], 100);
    assert_eq!(r["watches"]["reestablished"], 0);
    // Requests by verb are what the simulated API served, read from it.
    for verb in VERBS {
        let counted = r["requests"][verb.to_uppercase()]["count"]
            .as_u64()
            .unwrap_or(0);
        assert_eq!(counted, c.store.served(verb), "{verb}: {r:#}");
    }
    assert_eq!(
        r["requests"]["CREATE"]["count"], 100,
        "a Node and a Lease per node"
    );
    assert_eq!(r["requests"]["WATCH"]["count"], 100);
    assert_eq!(r["requests"]["LIST"]["count"], 100);
    assert!(
        r["requests"]["UPDATE"]["count"].as_u64().unwrap_or(0) >= 150,
        "{r:#}"
    );
    assert!(r["requests"]["GET"].is_null(), "no GETs in this profile");

    // Every lease was renewed after it was created.
    for i in 0..50 {
        let name = format!("load-node-{i:05}");
        let lease = c
            .store
            .get(Kind::Lease, Some("kube-node-lease"), &name)
            .expect("lease");
        let v = &lease.value;
        let created = humantime::parse_rfc3339(
            v["metadata"]["creationTimestamp"]
                .as_str()
                .expect("created"),
        )
        .expect("rfc3339");
        let renewed =
            humantime::parse_rfc3339_weak(v["spec"]["renewTime"].as_str().expect("renewTime"))
                .expect("rfc3339");
        assert!(
            renewed.duration_since(created).unwrap_or_default() >= Duration::from_secs(1),
            "{name}: {v}"
        );
        assert_eq!(v["spec"]["holderIdentity"], name);
        // Its requests came with its own minted identity, which NodeRestriction-lite let
        // write its own Node and Lease.
        assert!(c.store.has_seen(&format!("system:node:{name}")), "{name}");
        let node = c.store.get(Kind::Node, None, &name).expect("node");
        assert_eq!(node.value["status"]["conditions"][0]["type"], "Ready");
    }

    assert!(
        !c.store.has_seen("admin"),
        "no API request went as the kubeconfig's user"
    );

    // --admin: the spread the run read matches the gateway's own /api/status.
    let spread = r["spread"].as_array().expect("spread");
    assert_eq!(spread.len(), 3);
    let total: u64 = spread
        .iter()
        .map(|b| b["active"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 50, "one connection per node: {spread:?}");
    for (name, active) in &seen {
        let reported = spread
            .iter()
            .find(|b| b["name"] == name.as_str())
            .expect("backend in the spread");
        assert_eq!(reported["active"].as_u64(), Some(*active), "{name}");
        assert!(
            *active > 0,
            "least-conn puts nodes on every backend: {seen:?}"
        );
    }
    c.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_apiserver_s_watches_come_back_through_the_others() {
    let mut c = SimCluster::start(3, StoreLimits::default()).await;
    let admin = c.gw.handle().admin_addr().expect("admin");
    let kc = c.kubeconfig.display().to_string();
    let run = tokio::spawn(load(args(&[
        "--kubeconfig",
        &kc,
        "--nodes",
        "30",
        "--duration",
        "12s",
        "--ramp",
        "1s",
        "--lease-interval",
        "1s",
        "--output",
        "json",
    ])));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = active_per_backend(admin).await;
    let on_first = before
        .iter()
        .find(|(n, _)| n == "b0")
        .map_or(0, |(_, a)| *a);
    assert!(on_first > 0, "{before:?}");
    let addr0 = c.servers[0].addr();
    c.servers[0].stop();
    eventually(5, "b0 unhealthy", || {
        c.gw.handle()
            .backend_status("p", "b0")
            .is_some_and(|s| s.state.as_str() != "healthy")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // It comes back on the same port; with least-conn, new connections go to it.
    c.servers[0] = start_sim(&c.tls, &c.store, 0, addr0).await;
    eventually(5, "b0 healthy again", || {
        c.gw.handle()
            .backend_status("p", "b0")
            .is_some_and(|s| s.state.as_str() == "healthy")
    })
    .await;
    let cfg = c.tls.client(Some(&c.tls.pki.admin), &[]);
    let who = within(10, "whoami", whoami(c.gw.addr(), cfg)).await;
    assert_eq!(
        who.backend, "apiserver-0",
        "the emptiest backend gets the new connection"
    );

    let r = json_report(&run.await.expect("join"));
    assert_eq!(r["watches"]["open"], 60, "no watch lost for good: {r:#}");
    assert_eq!(
        r["watches"]["reestablished"].as_u64(),
        Some(2 * on_first),
        "each node on apiserver-0 re-established both its watches: {r:#}"
    );
    let gap = r["watches"]["longest_gap_ms"].as_f64().expect("a gap");
    assert!(gap > 0.0);
    c.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_profile_is_open_loop_and_500s_are_errors_by_status() {
    let c = SimCluster::start(3, StoreLimits::default()).await;
    let kc = c.kubeconfig.display().to_string();
    let r = json_report(
        &load(args(&[
            "--kubeconfig",
            &kc,
            "--profile",
            "list",
            "--qps",
            "20",
            "--connections",
            "3",
            "--duration",
            "2s",
            "--output",
            "json",
        ]))
        .await,
    );
    // Every request due in the 2 s was sent, and served.
    assert_eq!(r["requests"]["LIST"]["count"], 40, "{r:#}");
    assert_eq!(c.store.served("list"), 40);
    assert_eq!(r["errors"], serde_json::json!({}));
    assert!(r["requests"]["LIST"]["p99_ms"].as_f64().is_some());

    c.store.set_failing(Some(500));
    let out = load(args(&[
        "--kubeconfig",
        &kc,
        "--profile",
        "list",
        "--qps",
        "10",
        "--duration",
        "1s",
    ]))
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a run with errors still finished: {text}"
    );
    assert!(text.contains("errors: http 500: 10"), "{text}");
    c.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_exit_2_and_an_unreachable_server_exits_1() {
    let tls = TlsFixture::new();
    let kc = tls.file(
        "kubeconfig",
        &apilb::demo::kubeconfig_yaml(&format!("https://{}", closed_port()), &tls.pki),
    );
    let kc = kc.display().to_string();
    for (words, says) in [
        (vec!["--nodes", "1"], "--kubeconfig"),
        (vec!["--kubeconfig", &kc, "--profile", "nope"], "nope"),
        (
            vec!["--kubeconfig", &kc, "--profile", "list", "--qps", "0"],
            "--qps",
        ),
        (vec!["--kubeconfig", &kc, "--nodes", "0"], "--nodes"),
    ] {
        let out = load(args(&words)).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{words:?}: {err}");
        assert!(err.contains(says), "{words:?}: {err}");
    }
    let out = load(args(&[
        "--kubeconfig",
        &kc,
        "--nodes",
        "1",
        "--duration",
        "1s",
    ]))
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mixed_profile_with_a_token_straight_to_one_apiserver() {
    let c = SimCluster::start(3, StoreLimits::default()).await;
    let server = apilb::demo::url_base(c.servers[1].addr());
    let ca = c.tls.files.ca.display().to_string();
    let r = json_report(
        &load(args(&[
            "--server",
            &server,
            "--ca",
            &ca,
            "--token",
            TOKEN,
            "--profile",
            "mixed",
            "--nodes",
            "5",
            "--ramp",
            "500ms",
            "--qps",
            "10",
            "--connections",
            "2",
            "--duration",
            "2s",
            "--output",
            "json",
        ]))
        .await,
    );
    assert_eq!(r["profile"], "mixed");
    assert_eq!(r["errors"], serde_json::json!({}), "{r:#}");
    assert_eq!(r["watches"]["open"], 10);
    // Two LISTs per node before its watches, and the 20 of the open loop.
    assert_eq!(r["requests"]["LIST"]["count"], 30, "{r:#}");
    for verb in VERBS {
        let counted = r["requests"][verb.to_uppercase()]["count"]
            .as_u64()
            .unwrap_or(0);
        assert_eq!(counted, c.store.served(verb), "{verb}");
    }
    // A wrong token is refused before the run starts.
    let out = load(args(&[
        "--server",
        &server,
        "--ca",
        &ca,
        "--token",
        "wrong",
        "--nodes",
        "1",
        "--duration",
        "1s",
    ]))
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
    c.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_command_apilb_demo_prints_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut demo = KillOnDrop(
        Command::new(bin())
            .args([
                "demo",
                "--passthrough",
                "127.0.0.1:0",
                "--terminate",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--dir",
            ])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo"),
    );
    let stdout = demo.0.stdout.take().expect("stdout");
    // The reader goes on draining the demo's stdout after the line is found: a closed pipe
    // would make the demo's next write fail.
    let (found, line) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if l.contains(" load --kubeconfig ") {
                let _ = found.send(l);
            }
        }
    });
    let line = within(
        30,
        "the demo's load line",
        tokio::task::spawn_blocking(move || line.recv().ok()),
    )
    .await
    .expect("join")
    .expect("the demo prints an apilb load command");
    // As printed, only shorter.
    let short = line
        .trim()
        .replace("--nodes 100", "--nodes 6")
        .replace("--duration 60s", "--duration 3s --ramp 1s --output json");
    let mut words = short.split_whitespace();
    assert_eq!(
        words.next().map(std::path::Path::new),
        Some(bin().as_path())
    );
    assert_eq!(words.next(), Some("load"));
    let out = load(words.map(str::to_string).collect()).await;
    let r = json_report(&out);
    assert_eq!(r["watches"]["open"], 12, "{r:#}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r:#}");
    let spread: u64 = r["spread"]
        .as_array()
        .expect("--admin spread")
        .iter()
        .map(|b| b["active"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(spread, 6);
    signal(demo.0.id(), "INT");
    assert_eq!(wait_exit(&mut demo.0, 20), 0);
}

/// SPEC §11 end to end: simulated kubelets through the gateway, an apiserver restarted
/// mid-run; with `[pool.rebalance]` the spread `--admin` reports at the end is within
/// `max_skew` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rebalance_a_restarted_apiserver_gets_its_share_back_during_the_run() {
    let mut c = SimCluster::start_with(
        3,
        StoreLimits::default(),
        "[pool.rebalance]\nmax_skew = 0.25\nrate = 20\nmin_age = \"1s\"",
    )
    .await;
    let admin = c.gw.handle().admin_addr().expect("admin");
    let kc = c.kubeconfig.display().to_string();
    let admin_url = format!("http://{admin}");
    let run = tokio::spawn(load(args(&[
        "--kubeconfig",
        &kc,
        "--nodes",
        "60",
        "--duration",
        "16s",
        "--ramp",
        "1s",
        // Real kubelets renew every 10 s; a client that sends something every second is
        // never quiet enough to be moved (the one-second rule).
        "--lease-interval",
        "5s",
        "--admin",
        &admin_url,
        "--output",
        "json",
    ])));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let addr0 = c.servers[0].addr();
    c.servers[0].stop();
    eventually(5, "b0 unhealthy", || {
        c.gw.handle()
            .backend_status("p", "b0")
            .is_some_and(|s| s.state.as_str() != "healthy")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.servers[0] = start_sim(&c.tls, &c.store, 0, addr0).await;
    let r = json_report(&run.await.expect("join"));
    let spread = r["spread"].as_array().expect("spread");
    let active: Vec<u64> = spread
        .iter()
        .map(|b| b["active"].as_u64().unwrap_or(0))
        .collect();
    let total: u64 = active.iter().sum();
    assert_eq!(total, 60, "one connection per node: {spread:?}");
    let fair = total as f64 / 3.0;
    assert!(
        active.iter().all(|a| (*a as f64) <= 1.25 * fair),
        "spread beyond max_skew at the end: {active:?}"
    );
    assert!(
        c.gw.metrics().value_or_zero(
            "apilb_pool_rebalanced_total",
            &[("pool", "p"), ("backend", "b1")]
        ) + c.gw.metrics().value_or_zero(
            "apilb_pool_rebalanced_total",
            &[("pool", "p"), ("backend", "b2")]
        ) > 0.0,
        "the surplus was moved by the rebalancer"
    );
    assert_eq!(r["watches"]["open"], 120, "no watch lost: {r:#}");
    // The skew is on /api/status too, per pool.
    let (_, _, body) = admin_request(admin, "GET", "/api/status").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    let skew = v["pools"][0]["connection_skew"]
        .as_f64()
        .expect("connection_skew");
    assert!(skew <= 1.25, "{skew}");
    assert_eq!(v["pools"][0]["rebalance"]["rate"], 20);
    c.gw.shutdown().await;
}
