//! The fan-out run of SPEC §12: kubelet-like watches through apilb and, in the same run,
//! through HAProxy `mode tcp`, in front of three simulated apiservers over one store.
//!
//! For each front: its RSS before and with the load (per client connection), its CPU per
//! 1,000 watch events (this process changes pods at a fixed rate, one event to one watch
//! each), and the reconnect storm: one of the three apiservers is stopped mid-run and the
//! load's summary gives the longest time until a broken watch was re-established (all break
//! at once, so that is the time until every watch is back), and how many were. The
//! apiserver comes back before the next front runs.
//!
//! Needs `haproxy` (Debian's package) and two CPUs; each front gets one thread (`apilb run
//! --threads 1`, HAProxy `nbthread 1`). Bounded: two runs of `--duration` (default 60 s).
//! Run with `cargo bench --bench fanout` (`-- quick`: 1,000 nodes for 40 s).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apilb::demo::api::store::{Kind, Store, StoreLimits};
use apilb::demo::apiserver::{ApiServer, ApiServerOptions};
use apilb::demo::pki::Pki;

/// Ends the child (ours, by PID) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(i) = stat.rfind(')') else { return 0.0 };
    let f: Vec<&str> = stat[i + 2..].split_whitespace().collect();
    let t = |k: usize| f.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn wait_port(addr: SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}

fn options(pki: &Pki, i: usize, listen: SocketAddr) -> ApiServerOptions {
    ApiServerOptions {
        name: format!("apiserver-{i}"),
        listen,
        cert_pem: pki.apiserver.cert_pem.clone(),
        key_pem: pki.apiserver.key_pem.clone(),
        client_ca_pem: pki.ca.cert_pem.clone(),
        tokens: Vec::new(),
        watch_interval: Duration::from_secs(1),
        anonymous: false,
    }
}

fn front_apilb(dir: &Path, ca: &Path, listen: SocketAddr, backends: &[SocketAddr]) -> Proc {
    let mut cfg = format!(
        "[[pool]]\nname = \"apiservers\"\nbalance = \"least-conn\"\nconnect_timeout = \"2s\"\n\
         [pool.health]\ncheck = \"https\"\npath = \"/readyz\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nrise = 1\nfall = 1\n\
         [pool.tls]\nca = \"{}\"\nserver_name = \"kubernetes\"\n",
        ca.display()
    );
    for (i, b) in backends.iter().enumerate() {
        cfg.push_str(&format!(
            "[[pool.backend]]\nname = \"apiserver-{i}\"\naddress = \"{b}\"\n"
        ));
    }
    cfg.push_str(&format!(
        "[[listener]]\nname = \"front\"\nlisten = \"{listen}\"\nmode = \"passthrough\"\npool = \"apiservers\"\nidle_timeout = \"1h\"\nmax_connections = 15000\n"
    ));
    let path = dir.join("apilb.toml");
    std::fs::write(&path, cfg).expect("config");
    Proc(
        Command::new(env!("CARGO_BIN_EXE_apilb"))
            .args(["run", "--threads", "1", "--log-level", "warn", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("apilb run"),
    )
}

fn front_haproxy(dir: &Path, listen: SocketAddr, backends: &[SocketAddr]) -> Proc {
    let mut cfg = format!(
        "global\n  maxconn 8000\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n\
         frontend front\n  bind {listen}\n  default_backend apiservers\nbackend apiservers\n  balance leastconn\n  default-server check inter 1s fall 1 rise 1\n"
    );
    for (i, b) in backends.iter().enumerate() {
        cfg.push_str(&format!("  server apiserver-{i} {b}\n"));
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("config");
    Proc(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (apt-get install haproxy)"),
    )
}

/// Changes one pod per node, round robin, `per_s` times a second until `until`; returns how
/// many changes it made.
async fn churn(store: Arc<Store>, prefix: String, nodes: usize, per_s: u64, until: Instant) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_s.max(1)));
    let mut k = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        let name = format!("{prefix}-pod-{:05}", k as usize % nodes);
        let _ = store.modify(Kind::Pod, Some("default"), &name, |v| {
            let mut v = v.clone();
            v["metadata"]["labels"]["gen"] = serde_json::json!(k.to_string());
            Ok(v)
        });
        k += 1;
    }
    k
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (nodes, secs, events_per_s) = if quick {
        (1_000, 40u64, 500u64)
    } else {
        (2_500, 60, 1_000)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let pki = Pki::generate().expect("pki");
        let dir = tempfile::tempdir().expect("tempdir");
        let files = pki.write_to(dir.path()).expect("pki files");
        let store = Store::new(StoreLimits {
            history: 500_000,
            watcher_buffer: 10_000,
        });
        let mut servers = Vec::new();
        for i in 0..3 {
            servers.push(
                ApiServer::start_with_api(options(&pki, i, free_port()), store.clone())
                    .await
                    .expect("apiserver"),
            );
        }
        let addrs: Vec<SocketAddr> = servers.iter().map(ApiServer::addr).collect();
        println!(
            "fan-out: {nodes} simulated kubelets ({} watches), {secs} s, {events_per_s} pod changes/s; one apiserver of three stopped at {} s\n",
            2 * nodes,
            secs / 2
        );
        println!("front     RSS idle  RSS loaded  per connection  CPU/1000 events  watches back  longest gap  open at end");
        for front in ["apilb", "haproxy"] {
            let listen = free_port();
            let proc = match front {
                "apilb" => front_apilb(dir.path(), &files.ca, listen, &addrs),
                _ => front_haproxy(dir.path(), listen, &addrs),
            };
            wait_port(listen).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pid = proc.0.id();
            let rss_idle = rss_kib(pid);
            let prefix = format!("{front}-node");
            for i in 0..nodes {
                let _ = store.create(
                    Kind::Pod,
                    Some("default"),
                    serde_json::json!({"metadata": {"name": format!("{prefix}-pod-{i:05}")}, "spec": {"nodeName": format!("{prefix}-{i:05}")}}),
                );
            }
            let kubeconfig = dir.path().join(format!("kubeconfig-{front}"));
            std::fs::write(
                &kubeconfig,
                apilb::demo::kubeconfig_yaml(&apilb::demo::url_base(listen), &pki),
            )
            .expect("kubeconfig");
            let args: Vec<String> = [
                "load", "--threads", "1", "--output", "json", "--nodes", &nodes.to_string(),
                "--duration", &format!("{secs}s"), "--ramp", "10s", "--node-prefix", &prefix,
            ]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
            let kc = kubeconfig.clone();
            let load = tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_apilb"))
                    .args(&args)
                    .arg("--kubeconfig")
                    .arg(&kc)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output()
                    .expect("apilb load")
            });
            // Ramp (10 s) and settle, then measure CPU over a window of steady events.
            let started = Instant::now();
            let end = started + Duration::from_secs(secs);
            let churner = tokio::spawn(churn(store.clone(), prefix.clone(), nodes, events_per_s, end));
            tokio::time::sleep(Duration::from_secs(15)).await;
            let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
            let window = Duration::from_secs(secs / 2 - 15);
            tokio::time::sleep(window).await;
            let cpu = cpu_seconds(pid) - cpu0;
            let events = events_per_s as f64 * t0.elapsed().as_secs_f64();
            let rss_loaded = rss_kib(pid);
            // The reconnect storm.
            let addr0 = servers[0].addr();
            servers[0].stop();
            let out = load.await.expect("join");
            let _ = churner.await;
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            println!(
                "{front:<8} {:>7.1} MiB {:>8.1} MiB {:>11.1} KiB {:>12.1} ms    {:>10}  {:>9.0} ms  {:>6} of {}",
                rss_idle / 1024.0,
                rss_loaded / 1024.0,
                (rss_loaded - rss_idle) / nodes as f64,
                1000.0 * cpu / (events / 1000.0),
                r["watches"]["reestablished"],
                r["watches"]["longest_gap_ms"].as_f64().unwrap_or(f64::NAN),
                r["watches"]["open"],
                r["watches"]["expected"],
            );
            println!("         errors during the run: {}", r["errors"]);
            drop(proc);
            // apiserver-0 back on its port for the next front.
            loop {
                match ApiServer::start_with_api(options(&pki, 0, addr0), store.clone()).await {
                    Ok(s) => {
                        servers[0] = s;
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    });
}
