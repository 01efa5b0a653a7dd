//! The `apilb` binary as an operator runs it: `check` verdicts and exit codes, `run` with
//! SIGTERM draining, accept backoff when out of file descriptors, and `demo`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("run apilb check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn every_shipped_config_passes_check() {
    let mut seen = 0;
    for entry in
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config")).expect("config dir")
    {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out, err) = check(&path);
            assert_eq!(code, 0, "{}: {err}", path.display());
            assert!(out.contains("configuration is valid"), "{out}");
            seen += 1;
        }
    }
    assert!(seen >= 1, "no example config found");
}

/// (what is broken, config text, the line the error must name, text the message must hold)
const BROKEN: &[(&str, &str, usize, &str)] = &[
    ("syntax error", "[[pool]]\nname = \"p\nbalance = 1\n", 2, "t.toml:2:"),
    ("unknown key", "[[pool]]\nname = \"p\"\nbalence = \"round-robin\"\n", 3, "unknown field `balence`"),
    ("unknown pool", "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"q\"\n", 8, "listener[0].pool: unknown pool \"q\""),
    ("duplicate pool names", "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:2\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n", 6, "pool[1].name: duplicate pool name"),
    ("duplicate listen addresses", "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:7001\"\npool = \"p\"\n[[listener]]\nname = \"b\"\nlisten = [\"127.0.0.1:7001\"]\npool = \"p\"\n", 11, "listener[1].listen: address 127.0.0.1:7001 is already used"),
    ("bad duration", "[[pool]]\nname = \"p\"\nconnect_timeout = \"2 parsecs\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n", 3, "pool[0].connect_timeout: invalid duration"),
    ("zero attempts", "[[pool]]\nname = \"p\"\nconnect_attempts = 0\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n", 3, "pool[0].connect_attempts: 0 is out of range"),
    ("empty backends", "[[pool]]\nname = \"p\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n", 2, "pool[0].backend: pool \"p\" has no backends"),
    ("unresolvable host", "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"no-such-host.invalid:6443\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n", 4, "pool[0].backend[0].address: cannot resolve"),
    ("port out of range", "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:65536\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n", 4, "port out of range"),
    ("listen host name", "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"l\"\nlisten = \"localhost:6443\"\npool = \"p\"\n", 7, "listener[0].listen: invalid listen address"),
    ("terminate without certificates", "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\nmode = \"terminate\"\n", 9, "needs [listener.tls]"),
    ("no listener", "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n", 0, "no [[listener]] is configured"),
];

#[test]
fn check_rejects_broken_configs_naming_line_and_key() {
    for (what, text, line, needle) in BROKEN {
        let (_dir, path) = write_temp("t.toml", text);
        let (code, _out, err) = check(&path);
        assert_eq!(code, 2, "{what}: exit code, stderr: {err}");
        assert!(err.contains(needle), "{what}: {needle:?} not in:\n{err}");
        if *line > 0 {
            assert!(
                err.contains(&format!("t.toml:{line}:")),
                "{what}: line {line} not named in:\n{err}"
            );
        }
    }
}

#[test]
fn check_on_a_missing_file_exits_2() {
    let (code, _, err) = check(std::path::Path::new("/nonexistent/apilb.toml"));
    assert_eq!(code, 2);
    assert!(err.contains("cannot read config file"), "{err}");
}

/// The first listening address of a JSON "listening" log line; `None` for any other line.
fn listening(line: &serde_json::Value) -> Option<SocketAddr> {
    if line["message"] != "listening" {
        return None;
    }
    let addrs = line["addrs"].as_str().expect("addrs field");
    let first = addrs
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .next();
    Some(first.expect("an address").trim().parse().expect("addr"))
}

/// Starts `apilb run` with JSON logs; returns the child, the first listener address, and a
/// channel of the remaining stderr lines.
// The child is returned to the caller, which waits for it with `wait_exit`.
#[allow(clippy::zombie_processes)]
fn run_gateway(
    config: &std::path::Path,
    wrapper: &[&str],
) -> (Child, SocketAddr, mpsc::Receiver<String>, Vec<String>) {
    let mut cmd = if wrapper.is_empty() {
        Command::new(bin())
    } else {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..]).arg(bin());
        c
    };
    let mut child = cmd
        .args(["run", "--log-format", "json", "--threads", "1", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn apilb run");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    // Lines logged before "listening" (such as start-up errors), for the caller.
    let mut early = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("gateway logged its listening address");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            early.push(line);
            continue;
        };
        if let Some(addr) = listening(&v) {
            return (child, addr, rx, early);
        }
        early.push(line);
    }
}

#[tokio::test]
async fn sigterm_lets_an_active_transfer_finish_then_exits_0() {
    let sink = SinkServer::start().await;
    let (_dir, path) = write_temp(
        "apilb.toml",
        &simple_config(&[sink.addr], "drain_timeout = \"20s\"", ""),
    );
    let (mut child, addr, logs, _) = run_gateway(&path, &[]);

    let mut s = TcpStream::connect(addr).await.expect("connect");
    let seed = 77u64;
    let down = 2 << 20;
    let mut head = Vec::from(seed.to_le_bytes());
    head.extend_from_slice(&(down as u64).to_le_bytes());
    s.write_all(&head).await.expect("head");
    let data = payload(5, 4 << 20);
    let mut signalled = false;
    for (i, chunk) in data.chunks(64 * 1024).enumerate() {
        s.write_all(chunk).await.expect("write during drain");
        if i == 8 {
            signal(child.id(), "TERM");
            signalled = true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(signalled);
    // New connections are refused once the listener has closed.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "still accepting after SIGTERM");
    s.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    within(20, "answer", s.read_to_end(&mut answer))
        .await
        .expect("read answer");
    assert_eq!(answer.len(), down + 32);
    assert_eq!(&answer[down..], sha(&data), "upload changed in transit");
    assert_eq!(
        sha(&answer[..down]),
        sha(&payload(seed, down)),
        "download changed in transit"
    );

    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child, 20))
        .await
        .expect("join");
    assert_eq!(code, 0);
    let logs: Vec<String> = logs.try_iter().collect();
    assert!(
        logs.iter().any(|l| l.contains("drain finished")),
        "{logs:#?}"
    );
    let access = logs
        .iter()
        .find(|l| l.contains("connection closed"))
        .expect("access log line");
    let v: serde_json::Value = serde_json::from_str(access).expect("json");
    for field in [
        "listener",
        "client",
        "backend",
        "duration_ms",
        "bytes_up",
        "bytes_down",
        "end",
    ] {
        assert!(!v[field].is_null(), "access log lacks {field}: {access}");
    }
    assert_eq!(v["end"], "client_closed");
    assert_eq!(v["bytes_up"], 16 + (4 << 20));
}

/// /proc/PID/stat utime + stime, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').expect("comm").1;
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[tokio::test]
async fn out_of_file_descriptors_backs_off_without_spinning_and_recovers() {
    let echo = EchoServer::start().await;
    // A budget above what the descriptors allow, so the gateway does meet EMFILE (the budget
    // would otherwise refuse connections before it).
    let text = format!(
        "[global]\nmax_connections = 1000\n{}",
        simple_config(&[echo.addr], "", "")
    );
    let (_dir, path) = write_temp("apilb.toml", &text);
    // A low descriptor limit for the gateway alone; prlimit execs it, so the PID is apilb's.
    let (mut child, addr, logs, _) = run_gateway(&path, &["prlimit", "--nofile=48:48", "--"]);
    let pid = child.id();

    let mut held = Vec::new();
    let mut refused_at = None;
    for i in 0..60 {
        let mut s = TcpStream::connect(addr)
            .await
            .expect("the kernel queues the connection");
        s.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await {
            Ok(Ok(1)) => held.push(s),
            _ => {
                refused_at = Some(i);
                held.push(s);
                break;
            }
        }
    }
    let at = refused_at.expect("the descriptor limit was never reached");
    assert!(at > 5, "ran out of descriptors too early ({at})");

    // Out of descriptors with a connection waiting: the accept loop must sleep, not spin.
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    assert!(
        used < 30,
        "accept loop used {used} ticks of CPU in 1s while out of descriptors"
    );

    // Free the descriptors: the queued and new connections are served again.
    held.clear();
    let s = within(15, "served after recovery", async {
        loop {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"y").await.expect("write");
            let mut b = [0u8; 1];
            if let Ok(Ok(1)) =
                tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await
            {
                break s;
            }
        }
    })
    .await;
    drop(s);
    signal(pid, "TERM");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child, 40))
        .await
        .expect("join");
    assert_eq!(code, 0);
    let logs: Vec<String> = logs.try_iter().collect();
    assert!(
        logs.iter()
            .any(|l| l.contains("accept failed") && l.contains("Too many open files")),
        "no accept-error warning logged: {logs:#?}"
    );
}

/// The admin server's address, from the gateway's JSON log.
async fn admin_addr(logs: &mpsc::Receiver<String>) -> SocketAddr {
    within(10, "admin address", async {
        loop {
            if let Ok(line) = logs.try_recv() {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["message"] == "admin server listening" {
                    break v["addr"].as_str().expect("addr").parse().expect("addr");
                }
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
    .await
}

/// Descriptors below `limit` that the process `pid` has open (it may also hold inherited
/// ones above its limit, which take no slot).
fn open_fds(pid: u32, limit: usize) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
        .filter(|fd| *fd < limit)
        .count()
}

/// Round-2 hardening, item 1: a backend socket that cannot be made because the gateway is
/// out of descriptors is the gateway's failure, not the backend's. With `fall = 1` and
/// `when_all_down = "reject"`, charging it to the backend used to take the pool down.
#[tokio::test]
async fn out_of_descriptors_for_a_backend_socket_is_not_the_backends_fault() {
    const LIMIT: usize = 48;
    let echo = EchoServer::start().await;
    let text = format!(
        "[global]\nmax_connections = 1000\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        simple_config(
            &[echo.addr],
            "connect_attempts = 1\nwhen_all_down = \"reject\"\n[pool.health]\ninterval = \"1h\"\nfall = 1",
            "",
        )
    );
    let (_dir, path) = write_temp("apilb.toml", &text);
    let (mut child, addr, logs, _) = run_gateway(
        &path,
        &["prlimit", &format!("--nofile={LIMIT}:{LIMIT}"), "--"],
    );
    let pid = child.id();
    let admin = admin_addr(&logs).await;
    // The first health check runs at once; let its socket close before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Each proxied connection takes two descriptors. With an odd number free, the last
    // accept succeeds and its backend socket is the one that fails; an idle admin connection
    // takes one descriptor to make the number odd.
    let mut parity = None;
    if (LIMIT - open_fds(pid, LIMIT)) % 2 == 0 {
        let before = open_fds(pid, LIMIT);
        parity = Some(TcpStream::connect(admin).await.expect("admin"));
        eventually(5, "admin accepted", || open_fds(pid, LIMIT) > before).await;
    }
    let mut held = Vec::new();
    let mut failed = false;
    for _ in 0..LIMIT {
        let mut s = TcpStream::connect(addr)
            .await
            .expect("the kernel queues the connection");
        s.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await {
            Ok(Ok(1)) => held.push(s),
            _ => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the descriptor limit was never reached");
    held.clear();
    drop(parity);
    // The backend was not charged: it is still healthy, so the reject pool serves again.
    within(15, "served after the shortage", async {
        loop {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"y").await.expect("write");
            let mut b = [0u8; 1];
            if let Ok(Ok(1)) =
                tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (_, _, text) = within(10, "metrics", admin_request(admin, "GET", "/metrics")).await;
    let metrics = Metrics::parse(&text);
    assert!(
        metrics.value(
            "apilb_listener_connect_errors_total",
            &[("listener", "l"), ("cause", "local")]
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metrics.value(
            "apilb_backend_connect_errors_total",
            &[("pool", "p"), ("backend", "b0")]
        ),
        0.0
    );
    assert_eq!(
        metrics.value("apilb_backend_healthy", &[("pool", "p"), ("backend", "b0")]),
        1.0
    );
    signal(pid, "TERM");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child, 40))
        .await
        .expect("join");
    assert_eq!(code, 0);
    let logs: Vec<String> = logs.try_iter().collect();
    assert!(
        logs.iter()
            .any(|l| l.contains("connect_failed") && l.contains("gateway: Too many open files")),
        "no access line blames the gateway: {logs:#?}"
    );
}

/// Reads the demo's stdout until its last line of instructions.
fn demo_instructions(child: &mut Child) -> Vec<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("demo printed no complete instructions: {lines:#?}"));
        let done = line.contains("Ctrl-C");
        lines.push(line);
        if done {
            return lines;
        }
    }
}

#[test]
fn demo_prints_commands_that_work_and_exits_0_on_sigint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(bin())
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
        .expect("spawn demo");
    let lines = demo_instructions(&mut child);
    let mut child = KillOnDrop(child);
    let commands: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("curl ") || l.starts_with("kubectl "))
        .collect();
    assert!(commands.len() >= 5, "{lines:#?}");
    assert!(
        !commands.iter().any(|c| c.contains('$')),
        "commands must not need shell variables"
    );

    let first = sh(commands[0]);
    assert!(first.contains("\"user\":\"admin\""), "{first}");
    assert!(first.contains("system:masters"), "{first}");
    let kubectl = commands
        .iter()
        .find(|c| c.starts_with("kubectl") && c.contains("/whoami"))
        .expect("kubectl line");
    assert!(sh(kubectl).contains("\"user\":\"admin\""));
    let token = commands
        .iter()
        .find(|c| c.contains("Bearer"))
        .expect("token line");
    assert!(sh(token).contains("demo-user"));
    // Certificate users through the public certificate: the front-proxy identity.
    let public = commands
        .iter()
        .find(|c| c.contains("public-ca.crt") && c.contains("admin.crt"))
        .expect("front-proxy curl line");
    let who = sh(public);
    assert!(
        who.contains("\"user\":\"admin\"") && who.contains("\"authenticated_by\":\"front-proxy\""),
        "{who}"
    );
    assert!(who.contains("system:masters"), "{who}");
    let kubectl_public = commands
        .iter()
        .find(|c| c.contains("public-kubeconfig"))
        .expect("public kubeconfig line");
    assert!(sh(kubectl_public).contains("\"authenticated_by\":\"front-proxy\""));
    // The printed preflight runs, finds the demo's certificates cover its names, exits 0.
    let probe = lines
        .iter()
        .map(|l| l.trim())
        .find(|l| l.contains(" probe --config "))
        .expect("probe line");
    let mut words = probe.split_whitespace();
    let out = Command::new(words.next().expect("program"))
        .args(words)
        .output()
        .expect("run probe");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("no problem found"), "{text}");

    signal(child.0.id(), "INT");
    assert_eq!(wait_exit(&mut child.0, 20), 0);
    assert!(dir.path().join("apilb.toml").exists());
}

#[test]
fn demo_on_a_taken_port_names_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let out = Command::new(bin())
        .args([
            "demo",
            "--passthrough",
            &addr.to_string(),
            "--terminate",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run demo");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("--passthrough {addr}")), "{err}");
}

#[test]
fn expired_certificate_fails_check_but_not_run() {
    let tls = TlsFixture::new();
    let old = tls
        .pki
        .ca
        .client_valid_for("system:apilb-health", &["system:monitoring"], -2)
        .expect("cert");
    tls.file("health.crt", &old.cert_pem);
    tls.file("health.key", &old.key_pem);
    let text = format!(
        "[[pool]]\nname = \"p\"\n[pool.tls]\nca = \"{}\"\n[pool.health]\ncheck = \"https\"\nclient_cert = \"health.crt\"\nclient_key = \"health.key\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n",
        tls.ca().display()
    );
    let path = tls.file("apilb.toml", &text);
    let (code, _, err) = check(&path);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("pool[0].health.client_cert") && err.contains("expired at"),
        "{err}"
    );
    assert!(err.contains("apilb.toml:7:"), "{err}");

    // Round-2 hardening, item 2: the shipped unit's ExecStartPre, run as systemd would run
    // it, passes on this config, since `run` would start (it used to be plain `check`, which
    // kept the service down after any restart).
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/apilb.service"
    ))
    .expect("unit");
    let pre = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .expect("ExecStartPre");
    let args: Vec<String> = pre
        .split_whitespace()
        .skip(1)
        .map(|a| {
            if a == "/etc/apilb/apilb.toml" {
                path.display().to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let out = Command::new(bin())
        .args(&args)
        .output()
        .expect("ExecStartPre");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "ExecStartPre {args:?} failed: {err}"
    );
    assert!(
        err.contains("expired at"),
        "the expiry is still reported: {err}"
    );

    // `run` starts anyway and says so: one stale certificate must not take every listener down.
    let (mut child, _addr, _logs, early) = run_gateway(&path, &[]);
    signal(child.id(), "TERM");
    assert_eq!(wait_exit(&mut child, 20), 0);
    assert!(
        early
            .iter()
            .any(|l| l.contains("\"ERROR\"") && l.contains("expired at")),
        "run did not log the expired certificate: {early:#?}"
    );
}

#[test]
fn check_warns_about_operator_mistakes_and_still_passes() {
    use std::os::unix::fs::PermissionsExt;
    let tls = TlsFixture::new();
    let files = &tls.files;
    // A key every user can read.
    std::fs::set_permissions(&files.public_key, std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    // A health certificate that expires in 10 days.
    let soon = tls
        .pki
        .ca
        .client_valid_for("system:apilb-health", &["system:monitoring"], 10)
        .expect("cert");
    tls.file("health.crt", &soon.cert_pem);
    let health_key = tls.file("health.key", &soon.key_pem);
    std::fs::set_permissions(health_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let text = format!(
        "[admin]\nlisten = \"0.0.0.0:0\"\n\
         [[pool]]\nname = \"p\"\n[pool.tls]\nca = \"{ca}\"\n[pool.health]\ncheck = \"https\"\nclient_cert = \"health.crt\"\nclient_key = \"health.key\"\n\
         [[pool.backend]]\naddress = \"127.0.0.1:1\"\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\nidle_timeout = \"2m\"\n\
         [[listener]]\nname = \"public\"\nlisten = \"127.0.0.1:0\"\nmode = \"terminate\"\npool = \"p\"\n\
         [listener.tls]\ncert = \"{pc}\"\nkey = \"{pk}\"\n\
         [[listener.tls.sni]]\nnames = [\"api.example.com\", \"localhost\"]\ncert = \"{pc}\"\nkey = \"{pk}\"\n",
        ca = files.ca.display(),
        pc = files.public_cert.display(),
        pk = files.public_key.display(),
    );
    let path = tls.file("apilb.toml", &text);
    let (code, out, err) = check(&path);
    assert_eq!(code, 0, "warnings must not fail check: {err}");
    assert!(out.contains("configuration is valid"), "{out}");
    for (what, needle) in [
        ("readable key", "is readable by every user (mode 0644)"),
        ("expiring certificate", "days: rotate it soon"),
        (
            "SNI name not covered",
            "\"api.example.com\" is not among the certificate's names",
        ),
        ("short idle timeout", "`kubectl logs -f` will be cut"),
        ("admin on the network", "reachable from the network"),
    ] {
        assert!(err.contains(needle), "{what}: {needle:?} not in:\n{err}");
    }
    assert!(
        !err.contains("\"localhost\" is not among"),
        "a covered name was flagged:\n{err}"
    );
}

/// Round-2 hardening, item 5: rustls warns once per connection about what a client sent (an
/// invalid SNI name is echoed whole), so anyone who could reach a terminate listener could
/// flood the log at the default level. Those failures are counted instead; the log stays
/// quiet.
#[tokio::test]
async fn hostile_client_hellos_do_not_flood_the_log() {
    let tls = TlsFixture::new();
    let text = format!(
        "[[pool]]\nname = \"p\"\n[pool.tls]\nca = \"{}\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nmode = \"terminate\"\npool = \"p\"\n\
         [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\nhandshake_timeout = \"2s\"\n",
        tls.ca().display(),
        tls.files.public_cert.display(),
        tls.files.public_key.display()
    );
    let path = tls.file("apilb.toml", &text);
    let (child, addr, logs, _) = run_gateway(&path, &[]);
    let mut child = KillOnDrop(child);
    let target = format!("127.0.0.1:{}", addr.port());
    let hellos = tokio::task::spawn_blocking(move || {
        for name in ["bad..name", "x..y..z", "-.-"] {
            for _ in 0..3 {
                let _ = Command::new("timeout")
                    .args([
                        "5",
                        "openssl",
                        "s_client",
                        "-connect",
                        &target,
                        "-servername",
                        name,
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    });
    within(60, "ClientHellos", hellos).await.expect("join");
    signal(child.0.id(), "TERM");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child.0, 20))
        .await
        .expect("join");
    assert_eq!(code, 0);
    let logs: Vec<String> = logs.try_iter().collect();
    let loud: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("Illegal SNI") || (l.contains("\"WARN\"") && l.contains("alert")))
        .collect();
    assert!(loud.is_empty(), "client bytes reached the log: {loud:#?}");
}

/// Round-2 hardening, item 3: without a process-wide budget, listeners' max_connections sum
/// past the descriptor limit and the gateway meets EMFILE (failed accepts, failed backend
/// sockets). The budget from RLIMIT_NOFILE refuses the extra connections cleanly instead,
/// and start-up says the listeners' limits do not fit.
#[tokio::test]
async fn the_descriptor_limit_sets_a_budget_that_refuses_cleanly_before_emfile() {
    let echo = EchoServer::start().await;
    let (_dir, path) = write_temp("apilb.toml", &simple_config(&[echo.addr], "", ""));
    let (child, addr, logs, early) = run_gateway(&path, &["prlimit", "--nofile=64:64", "--"]);
    let mut child = KillOnDrop(child);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let mut s = TcpStream::connect(addr)
            .await
            .expect("the kernel queues the connection");
        s.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await {
            Ok(Ok(1)) => held.push(s),
            Ok(Ok(_) | Err(_)) => refused += 1,
            Err(_) => panic!("a connection hung instead of being refused (EMFILE backoff?)"),
        }
    }
    assert!(held.len() >= 10, "only {} served", held.len());
    assert!(refused >= 5, "nothing refused: {} held", held.len());
    held.clear();
    within(10, "served again", async {
        loop {
            if let Ok(mut s) = TcpStream::connect(addr).await {
                let _ = s.write_all(b"y").await;
                let mut b = [0u8; 1];
                if let Ok(Ok(1)) =
                    tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    signal(child.0.id(), "TERM");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child.0, 20))
        .await
        .expect("join");
    assert_eq!(code, 0);
    let mut all = early;
    all.extend(logs.try_iter());
    assert!(
        all.iter()
            .any(|l| l.contains("add up to more than the process can hold")),
        "no warning about the listeners' limits: {all:#?}"
    );
    assert!(
        !all.iter().any(|l| l.contains("Too many open files")),
        "the gateway ran out of descriptors: {all:#?}"
    );
}

/// Round-2 hardening, item 5: connections that moved nothing (port probes, scanners) can be
/// kept out of the access log (`log_empty = false`, HAProxy's dontlognull), while a
/// connection that carried bytes is still logged.
#[tokio::test]
async fn empty_connections_can_stay_out_of_the_access_log() {
    let echo = EchoServer::start().await;
    let (_dir, path) = write_temp(
        "apilb.toml",
        &simple_config(
            &[echo.addr],
            "",
            "first_byte_timeout = \"0s\"\nlog_empty = false",
        ),
    );
    let (child, addr, logs, _) = run_gateway(&path, &[]);
    let mut child = KillOnDrop(child);
    for _ in 0..3 {
        drop(TcpStream::connect(addr).await.expect("connect"));
    }
    drop(within(10, "echo", echo_once(addr)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(child.0.id(), "TERM");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child.0, 20))
        .await
        .expect("join");
    assert_eq!(code, 0);
    let access: Vec<String> = logs
        .try_iter()
        .filter(|l| l.contains("\"message\":\"connection closed\""))
        .collect();
    assert_eq!(access.len(), 1, "{access:#?}");
    assert!(!access[0].contains("\"bytes_up\":0"), "{access:#?}");
}

/// SPEC §8: a terminate listener's own certificate must cover its names; `check` says which
/// listener, which name and which certificate file.
#[test]
fn check_fails_when_a_terminate_certificate_does_not_cover_a_listener_name() {
    let tls = TlsFixture::new();
    let text = format!(
        "[[pool]]\nname = \"p\"\n[pool.tls]\nca = \"{}\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n\
         [[listener]]\nname = \"public\"\nlisten = \"127.0.0.1:0\"\nmode = \"terminate\"\npool = \"p\"\nnames = [\"localhost\", \"api.example.test\"]\n\
         [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        tls.ca().display(),
        tls.files.public_cert.display(),
        tls.files.public_key.display()
    );
    let path = tls.file("apilb.toml", &text);
    let (code, _, err) = check(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("listener[0].tls.cert"), "{err}");
    assert!(err.contains("\"api.example.test\""), "{err}");
    assert!(
        err.contains(&tls.files.public_cert.display().to_string()),
        "{err}"
    );
    assert!(
        !err.contains("\"localhost\""),
        "a covered name was reported: {err}"
    );
    // Names are validated: a wildcard or garbage is not a name clients use.
    let bad = tls.file(
        "bad.toml",
        &text.replace("\"api.example.test\"", "\"*.example.test\""),
    );
    let (code, _, err) = check(&bad);
    assert_eq!(code, 2);
    assert!(err.contains("listener[0].names"), "{err}");
}

#[test]
fn version_names_the_commit_and_completions_and_the_man_page_are_generated() {
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(args).output().expect("run");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let v = run(&["--version"]);
    let commit = v
        .trim()
        .strip_prefix(concat!("apilb ", env!("CARGO_PKG_VERSION"), " ("))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        commit == "unknown"
            || commit
                .trim_end_matches("-dirty")
                .chars()
                .all(|c| c.is_ascii_hexdigit()),
        "{v}"
    );
    assert!(run(&["completions", "bash"]).contains("_apilb"));
    assert!(run(&["completions", "zsh"]).starts_with("#compdef apilb"));
    assert!(run(&["completions", "fish"]).contains("complete -c apilb"));
    let man = run(&["manpage"]);
    assert!(
        man.contains(".TH apilb 1") && man.contains("probe"),
        "{man}"
    );
}

/// The soak found it: while the gateway is out of descriptors, health checks failed with its
/// own EMFILE and took every backend out at once (the same class as round-2 hardening item
/// 1, on the active side). Now such a check has no result instead of a failed one.
#[tokio::test]
async fn health_checks_do_not_charge_the_gateways_own_emfile_to_backends() {
    const LIMIT: usize = 48;
    let echo = EchoServer::start().await;
    let text = format!(
        "[global]\nmax_connections = 1000\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        simple_config(
            &[echo.addr],
            "[pool.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfall = 1",
            "",
        )
    );
    let (_dir, path) = write_temp("apilb.toml", &text);
    let (child, addr, logs, _) = run_gateway(
        &path,
        &["prlimit", &format!("--nofile={LIMIT}:{LIMIT}"), "--"],
    );
    let pid = child.id();
    let mut child = KillOnDrop(child);
    let admin = admin_addr(&logs).await;
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
            Ok(Ok(1)) => held.push(s),
            _ => break,
        }
    }
    // Take the last descriptors too (idle admin connections), then let checks run into
    // EMFILE for a while.
    for _ in 0..4 {
        if open_fds(pid, LIMIT) >= LIMIT {
            break;
        }
        held.push(TcpStream::connect(admin).await.expect("admin"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(open_fds(pid, LIMIT) >= LIMIT - 1, "not saturated");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    held.clear();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, _, text) = within(10, "metrics", admin_request(admin, "GET", "/metrics")).await;
    let m = Metrics::parse(&text);
    let b0 = [("pool", "p"), ("backend", "b0")];
    assert_eq!(
        m.value(
            "apilb_health_checks_total",
            &[("pool", "p"), ("backend", "b0"), ("result", "fail")]
        ),
        0.0,
        "{text}"
    );
    assert_eq!(m.value("apilb_backend_healthy", &b0), 1.0);
    signal(pid, "TERM");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child.0, 40))
        .await
        .expect("join");
    assert_eq!(code, 0);
}

/// Reads `n` lines of `apilb demo-apiserver`'s stdout (`NAME ADDR`), each server's name and
/// address.
fn apiserver_lines(child: &mut Child, n: usize) -> Vec<(String, SocketAddr)> {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    (0..n)
        .map(|_| {
            let line = lines.next().expect("a line").expect("read");
            let (name, addr) = line.split_once(' ').expect("NAME ADDR");
            (name.to_string(), addr.parse().expect("an address"))
        })
        .collect()
}

/// The hidden `demo-apiserver` the HA test (tests/ha/) runs in a namespace of its own: one
/// simulated apiserver per --listen, a PKI that clients started apart can read from --dir
/// and that a second start reuses, 0 on SIGTERM, a taken address named in the error.
#[test]
fn demo_apiserver_serves_each_address_with_a_shared_pki() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = || {
        Command::new(bin())
            .args([
                "demo-apiserver",
                "--listen",
                "127.0.0.1:0",
                "--listen",
                "127.0.0.1:0",
                "--dir",
            ])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo-apiserver")
    };
    let mut child = KillOnDrop(start());
    let servers = apiserver_lines(&mut child.0, 2);
    let d = dir.path().display();
    for (i, (name, addr)) in servers.iter().enumerate() {
        assert_eq!(name, &format!("apiserver-{i}"));
        let out = sh(&format!(
            "curl -s --cacert {d}/ca.crt --cert {d}/admin.crt --key {d}/admin.key https://{addr}/whoami"
        ));
        assert!(out.contains(&format!("\"backend\":\"{name}\"")), "{out}");
        assert!(out.contains("\"user\":\"admin\""), "{out}");
    }
    let ca = std::fs::read(dir.path().join("ca.crt")).expect("ca.crt");
    signal(child.0.id(), "TERM");
    assert_eq!(wait_exit(&mut child.0, 20), 0);

    let mut again = KillOnDrop(start());
    let (_, addr) = apiserver_lines(&mut again.0, 2).remove(0);
    assert_eq!(
        std::fs::read(dir.path().join("ca.crt")).expect("ca.crt"),
        ca
    );
    let out = sh(&format!(
        "curl -s --cacert {d}/ca.crt --cert {d}/admin.crt --key {d}/admin.key https://{addr}/whoami"
    ));
    assert!(out.contains("\"user\":\"admin\""), "the reused PKI: {out}");
    signal(again.0.id(), "TERM");
    assert_eq!(wait_exit(&mut again.0, 20), 0);

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr");
    let out = Command::new(bin())
        .args(["demo-apiserver", "--listen", &busy.to_string(), "--dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run demo-apiserver");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&busy.to_string()), "{err}");
}

/// The log is written off the workers: with stderr a pipe nobody reads (a journald that fell
/// behind), a busy gateway keeps proxying instead of blocking on write(2) once the pipe's
/// 64 KiB are full. 2,000 access lines are ten times what the pipe holds.
#[tokio::test]
async fn a_stalled_stderr_does_not_stall_the_gateway() {
    let echo = EchoServer::start().await;
    let (_dir, path) = write_temp("apilb.toml", &simple_config(&[echo.addr], "", ""));
    let mut child = KillOnDrop(
        Command::new(bin())
            .args(["run", "--log-format", "json", "--threads", "1", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn apilb run"),
    );
    let mut stderr = BufReader::new(child.0.stderr.take().expect("stderr"));
    let addr = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        loop {
            line.clear();
            if stderr.read_line(&mut line).expect("read stderr") == 0 {
                panic!("apilb exited before listening");
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(addr) = listening(&v) {
                // From here on nobody reads the pipe.
                return (addr, stderr);
            }
        }
    });
    let (addr, stalled) = within(20, "listening", addr).await.expect("join");
    within(120, "2,000 connections with stderr stalled", async {
        for _ in 0..2000 {
            drop(echo_once(addr).await);
        }
    })
    .await;
    // Still alive, and it ends normally once someone reads again.
    assert!(child.0.try_wait().expect("try_wait").is_none());
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut { stalled }, &mut rest);
        rest.lines()
            .filter(|l| l.contains("\"message\":\"connection closed\""))
            .count()
    });
    signal(child.0.id(), "TERM");
    let code = tokio::task::spawn_blocking(move || wait_exit(&mut child.0, 30))
        .await
        .expect("join");
    assert_eq!(code, 0);
    let logged = drain.join().expect("drain");
    // Every line was queued (the queue holds far more than 2,000), none dropped.
    assert_eq!(logged, 2000, "access lines after the stall");
}
