//! The simulated Kubernetes API (SPEC §12) on real sockets: kubectl through the demo's kind
//! of gateway (passthrough, three apiservers over one store), WATCH from a resourceVersion and
//! 410 past the history, selectors, merge patches and the answers naming their apiserver.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use apilb::demo::api::store::{Kind, StoreLimits};
use apilb::demo::apiserver::SERVED_BY;
use common::*;

/// Runs kubectl with `kubeconfig` off the runtime; returns exit code, stdout, stderr.
async fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let kc = kubeconfig.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
    let out = within(
        60,
        "kubectl",
        tokio::task::spawn_blocking(move || {
            Command::new("timeout")
                .arg("45")
                .arg("kubectl")
                .arg("--kubeconfig")
                .arg(&kc)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .expect("run kubectl")
        }),
    )
    .await
    .expect("join");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn ok(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let (code, out, err) = kubectl(kubeconfig, args).await;
    assert_eq!(code, 0, "kubectl {args:?}: {out}{err}");
    out
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: default\n  labels:\n    app: web\nspec:\n  nodeName: worker0\n  containers:\n  - name: web\n    image: nginx:1.27\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_apply_delete_through_the_gateway_and_every_apiserver() {
    let c = SimCluster::start(3, StoreLimits::default()).await;
    let kc = c.kubeconfig.clone();
    let out = ok(&kc, &["get", "pods", "-A"]).await;
    assert!(out.is_empty(), "a fresh cluster has no pods: {out}");
    let ns = ok(&kc, &["get", "namespaces"]).await;
    assert!(
        ns.contains("kube-node-lease") && ns.contains("Active"),
        "{ns}"
    );

    let manifest = c.tls.file("pod.yaml", POD);
    let manifest = manifest.to_str().expect("utf-8 path");
    let applied = ok(&kc, &["apply", "--validate=false", "-f", manifest]).await;
    assert!(applied.contains("pod/web created"), "{applied}");
    let again = ok(&kc, &["apply", "--validate=false", "-f", manifest]).await;
    assert!(again.contains("pod/web unchanged"), "{again}");
    let changed = c
        .tls
        .file("pod2.yaml", &POD.replace("nginx:1.27", "nginx:1.28"));
    let reapplied = ok(
        &kc,
        &[
            "apply",
            "--validate=false",
            "-f",
            changed.to_str().expect("path"),
        ],
    )
    .await;
    assert!(reapplied.contains("pod/web configured"), "{reapplied}");

    let all = ok(&kc, &["get", "pods", "-A"]).await;
    let header = all.lines().next().unwrap_or("");
    assert!(
        header.starts_with("NAMESPACE") && header.contains("STATUS"),
        "{all}"
    );
    assert!(
        all.lines()
            .any(|l| l.starts_with("default") && l.contains("web")),
        "{all}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&ok(&kc, &["get", "pod", "web", "-o", "json"]).await).expect("JSON");
    assert_eq!(json["metadata"]["name"], "web");
    assert_eq!(json["spec"]["containers"][0]["image"], "nginx:1.28");
    let uid = json["metadata"]["uid"].as_str().expect("uid").to_string();

    // The same object through each apiserver directly, each answer naming who served it.
    for i in 0..3 {
        let direct = c.kubeconfig_for(i);
        let seen = ok(
            &direct,
            &["get", "pod", "web", "-o", "jsonpath={.metadata.uid}"],
        )
        .await;
        assert_eq!(seen, uid, "apiserver-{i}");
        let who = ok(&direct, &["get", "--raw", "/whoami"]).await;
        assert!(
            who.contains(&format!("\"backend\":\"apiserver-{i}\"")),
            "{who}"
        );
    }

    let deleted = ok(&kc, &["delete", "pod", "web"]).await;
    assert!(deleted.contains("pod \"web\" deleted"), "{deleted}");
    let (code, _, err) = kubectl(&kc, &["get", "pod", "web"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
    assert!(c.store.get(Kind::Pod, Some("default"), "web").is_err());
    c.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_nodes_watch_sees_a_node_created_meanwhile() {
    let c = SimCluster::start(3, StoreLimits::default()).await;
    c.store
        .create(
            Kind::Node,
            None,
            serde_json::json!({"metadata": {"name": "first"}}),
        )
        .expect("node");
    let mut child = KillOnDrop(
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&c.kubeconfig)
            .args(["get", "nodes", "-w"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl -w"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait_for = |what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("kubectl get nodes -w never printed {what}"),
            }
        }
    };
    wait_for("first");
    // Created through one apiserver directly; the watch may be on any of them.
    let direct = c.kubeconfig_for(2);
    let node = c.tls.file(
        "node.json",
        r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"second"}}"#,
    );
    ok(
        &direct,
        &[
            "create",
            "--validate=false",
            "-f",
            node.to_str().expect("path"),
        ],
    )
    .await;
    let line = wait_for("second");
    assert!(line.starts_with("second"), "{line}");
    drop(child);
    c.gw.shutdown().await;
}

#[tokio::test]
async fn watch_from_a_resource_version_and_410_past_the_history() {
    let c = SimCluster::start(
        1,
        StoreLimits {
            history: 4,
            watcher_buffer: 100,
        },
    )
    .await;
    let addr = c.gw.addr();
    let cfg = c.tls.client(Some(&c.tls.pki.admin), &[]);
    let rv0 = c.store.resource_version();
    for i in 0..3 {
        c.store
            .create(
                Kind::Pod,
                Some("default"),
                serde_json::json!({"metadata": {"name": format!("p{i}")}, "spec": {"nodeName": format!("n{}", i % 2)}}),
            )
            .expect("create");
    }
    // From rv0: the three changes since, filtered by node.
    let path = format!(
        "/api/v1/pods?watch=1&resourceVersion={rv0}&timeoutSeconds=1&fieldSelector=spec.nodeName%3Dn0"
    );
    let r = within(
        10,
        "watch",
        request(addr, Some((cfg.clone(), "kubernetes")), "GET", &path, &[]),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r
        .header(SERVED_BY)
        .is_some_and(|h| h.starts_with("apiserver-")));
    let events: Vec<serde_json::Value> = r
        .body
        .lines()
        .map(|l| serde_json::from_str(l).expect("event JSON"))
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["object"]["metadata"]["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["p0", "p2"], "{}", r.body);
    assert!(events.iter().all(|e| e["type"] == "ADDED"));

    // Push rv0 out of the history: a 200 whose one event is the 410, as the watch cache does.
    for i in 3..8 {
        c.store
            .create(
                Kind::Pod,
                Some("default"),
                serde_json::json!({"metadata": {"name": format!("p{i}")}}),
            )
            .expect("create");
    }
    let r = within(
        10,
        "watch",
        request(addr, Some((cfg.clone(), "kubernetes")), "GET", &path, &[]),
    )
    .await;
    let e: serde_json::Value = serde_json::from_str(r.body.trim()).expect("one event");
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["code"], 410);

    // Selectors on a LIST, a merge patch, and anonymous callers refused.
    let (status, body) = https_get(
        addr,
        cfg.clone(),
        "kubernetes",
        "/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3Dp1",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).expect("list");
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    let (status, _) = https_get(
        addr,
        cfg.clone(),
        "kubernetes",
        "/api/v1/pods?fieldSelector=status.phase%3DRunning",
        &[],
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = https_get(
        addr,
        c.tls.client(None, &[]),
        "kubernetes",
        "/api/v1/pods",
        &[],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    c.gw.shutdown().await;
}
