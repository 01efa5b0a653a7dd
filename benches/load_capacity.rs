//! How much load one core of `apilb load` sustains against the simulated API directly (no
//! gateway), so a run through apilb can tell the gateway's limits from the generator's.
//!
//! The simulated API (one apiserver over one store) runs in this process; `apilb load
//! --threads 1` runs as a child pinned to CPU 1 with `taskset` (when there are two CPUs or
//! more), and its CPU time is read from `/proc/PID/stat` while it runs. Two parts:
//!
//! - `kubelet`: N nodes (two watches each, a Lease every 10 s) while this process changes one
//!   pod per node at a fixed rate, so the pod watches carry events;
//! - `list`: the open-loop LIST load at rising rates over 10 connections against a small
//!   store (the generator's cost, not the server's).
//!
//! Each step is bounded in time (`--duration`) and the whole run takes about three minutes.
//! Run with `cargo bench --bench load_capacity` (`-- quick` for a short run).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apilb::demo::api::store::{Kind, Store, StoreLimits};
use apilb::demo::apiserver::{ApiServer, ApiServerOptions};
use apilb::demo::pki::Pki;

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Runs `apilb load ARGS` pinned to CPU 1; returns its JSON report and CPU seconds.
fn run_load(kubeconfig: &Path, args: &[String]) -> (serde_json::Value, f64) {
    let pin = std::thread::available_parallelism().map_or(1, |n| n.get()) > 1;
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "1"]).arg(env!("CARGO_BIN_EXE_apilb"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_apilb"))
    };
    let child = cmd
        .args(["load", "--threads", "1", "--output", "json", "--kubeconfig"])
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn apilb load");
    let pid = child.id();
    let sampler = std::thread::spawn(move || {
        let mut last = 0.0;
        while let Some(c) = cpu_seconds(pid) {
            last = c;
            std::thread::sleep(Duration::from_millis(200));
        }
        last
    });
    let out = child.wait_with_output().expect("wait");
    let cpu = sampler.join().unwrap_or(0.0);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (report, cpu)
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn total_rate(r: &serde_json::Value) -> f64 {
    r["requests"]
        .as_object()
        .map_or(0.0, |m| m.values().map(|v| num(&v["rate_per_s"])).sum())
}

/// Changes one pod per node, round robin, `per_s` times a second until `until`.
async fn churn(store: Arc<Store>, prefix: String, nodes: usize, per_s: u64, until: Instant) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_s.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut k = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        let name = format!("{prefix}-pod-{:05}", k % nodes);
        let _ = store.modify(Kind::Pod, Some("default"), &name, |v| {
            let mut v = v.clone();
            v["metadata"]["labels"]["gen"] = serde_json::json!(k.to_string());
            Ok(v)
        });
        k += 1;
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let pki = Pki::generate().expect("pki");
        let dir = tempfile::tempdir().expect("tempdir");
        let files = pki.write_to(dir.path()).expect("write pki");
        let store = Store::new(StoreLimits {
            history: 500_000,
            watcher_buffer: 10_000,
        });
        let server = ApiServer::start_with_api(
            ApiServerOptions {
                name: "bench".into(),
                listen: "127.0.0.1:0".parse().expect("addr"),
                cert_pem: pki.apiserver.cert_pem.clone(),
                key_pem: pki.apiserver.key_pem.clone(),
                client_ca_pem: pki.ca.cert_pem.clone(),
                tokens: Vec::new(),
                watch_interval: Duration::from_secs(1),
                anonymous: false,
            },
            store.clone(),
        )
        .await
        .expect("simulated apiserver");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            apilb::demo::kubeconfig_yaml(&apilb::demo::url_base(server.addr()), &pki),
        )
        .expect("kubeconfig");
        let ca = files.ca.display().to_string();
        let ca_key = files.ca_key.display().to_string();

        println!("apilb load, one core (--threads 1, pinned), against the simulated API directly\n");
        println!("kubelet profile: nodes, watches open, events/s received, requests/s, generator CPU (cores), UPDATE p99");
        let sizes: &[(usize, u64)] = if quick { &[(500, 500)] } else { &[(1_000, 1_000), (5_000, 2_000)] };
        let duration = if quick { 15 } else { 40 };
        for &(nodes, events_per_s) in sizes {
            let prefix = format!("bench{nodes}");
            for i in 0..nodes {
                let node = format!("{prefix}-{i:05}");
                let _ = store.create(
                    Kind::Pod,
                    Some("default"),
                    serde_json::json!({"metadata": {"name": format!("{prefix}-pod-{i:05}")}, "spec": {"nodeName": node}}),
                );
            }
            let ramp = 10.min(duration / 2);
            let until = Instant::now() + Duration::from_secs(duration);
            let churner = tokio::spawn(churn(
                store.clone(),
                prefix.clone(),
                nodes,
                events_per_s,
                until,
            ));
            let args: Vec<String> = [
                "--nodes", &nodes.to_string(), "--duration", &format!("{duration}s"),
                "--ramp", &format!("{ramp}s"), "--node-prefix", &prefix,
                "--node-ca-cert", &ca, "--node-ca-key", &ca_key,
            ]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
            let kc = kubeconfig.clone();
            let (r, cpu) = tokio::task::spawn_blocking(move || run_load(&kc, &args))
                .await
                .expect("join");
            churner.abort();
            let secs = num(&r["elapsed_s"]).max(1.0);
            println!(
                "  {nodes:>6} nodes  {:>6} watches open  {:>8.0} events/s  {:>7.0} requests/s  {:.2} cores  UPDATE p99 {:.2} ms  errors {}",
                r["watches"]["open"],
                num(&r["watches"]["events"]) / secs,
                total_rate(&r),
                cpu / secs,
                num(&r["requests"]["UPDATE"]["p99_ms"]),
                r["errors"],
            );
        }

        // A small store for the LIST part: the generator's cost per request, not the server's.
        let small = Store::new(StoreLimits::default());
        for i in 0..10 {
            let _ = small.create(
                Kind::Pod,
                Some("default"),
                serde_json::json!({"metadata": {"name": format!("p{i}")}, "spec": {"nodeName": "n"}}),
            );
        }
        let list_server = ApiServer::start_with_api(
            ApiServerOptions {
                name: "bench-list".into(),
                listen: "127.0.0.1:0".parse().expect("addr"),
                cert_pem: pki.apiserver.cert_pem.clone(),
                key_pem: pki.apiserver.key_pem.clone(),
                client_ca_pem: pki.ca.cert_pem.clone(),
                tokens: Vec::new(),
                watch_interval: Duration::from_secs(1),
                anonymous: false,
            },
            small,
        )
        .await
        .expect("simulated apiserver");
        let list_kc = dir.path().join("kubeconfig-list");
        std::fs::write(
            &list_kc,
            apilb::demo::kubeconfig_yaml(&apilb::demo::url_base(list_server.addr()), &pki),
        )
        .expect("kubeconfig");
        println!("\nlist profile (open loop, 10 connections): asked, answered/s, p50, p99, generator CPU (cores), errors");
        let rates: &[u32] = if quick { &[500, 2_000] } else { &[1_000, 4_000, 8_000, 16_000] };
        for &qps in rates {
            let args: Vec<String> = ["--profile", "list", "--qps", &qps.to_string(), "--duration", "10s", "--connections", "10"]
                .iter()
                .map(|s| (*s).to_string())
                .collect();
            let kc = list_kc.clone();
            let (r, cpu) = tokio::task::spawn_blocking(move || run_load(&kc, &args))
                .await
                .expect("join");
            let secs = num(&r["elapsed_s"]).max(1.0);
            let l = &r["requests"]["LIST"];
            println!(
                "  {qps:>6}/s  {:>7.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  {:.2} cores  errors {}",
                num(&l["count"]) / secs,
                num(&l["p50_ms"]),
                num(&l["p99_ms"]),
                cpu / secs,
                r["errors"],
            );
        }
        drop(server);
        drop(list_server);
    });
}
