//! The shipped integrations read what a running gateway exports: every metric name in the
//! Grafana dashboard's expressions and in the Prometheus rules is a family that `/metrics`
//! serves (a renamed metric would otherwise leave a silent panel or an alert that can never
//! fire).

mod common;

use std::collections::BTreeSet;

use common::*;

/// Every `apilb_*` name in `text`, with the histogram suffixes taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("apilb_") {
        let start = i + at;
        let end = start
            + b[start..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                .count();
        let name = &text[start..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(name.to_string());
        i = end;
    }
    out
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_use_only_exported_metrics() {
    let tls = TlsFixture::new();
    let servers = apiservers(&tls.pki, 1, "127.0.0.1").await;
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[pool]]\nname = \"p\"\n[pool.tls]\nca = \"{ca}\"\nserver_name = \"kubernetes\"\n[pool.health]\ncheck = \"https\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n{backends}\n\
         [[listener]]\nname = \"pt\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\nnames = [\"localhost\"]\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nmode = \"terminate\"\npool = \"p\"\n\
         [listener.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n",
        ca = tls.ca().display(),
        backends = backends_toml(&[servers[0].addr()]),
        cert = tls.files.public_cert.display(),
        key = tls.files.public_key.display(),
    );
    let gw = gateway(&text).await;
    eventually(5, "a check saw the certificate", || {
        gw.handle()
            .backend_status("p", "b0")
            .is_some_and(|s| s.missing_names.is_some())
    })
    .await;
    let admin = gw.handle().admin_addr().expect("admin");
    let (status, _, body) = within(5, "metrics", admin_request(admin, "GET", "/metrics")).await;
    assert_eq!(status, 200);
    let exported: BTreeSet<String> = Metrics::parse(&body)
        .names()
        .into_iter()
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_string()
        })
        .collect();
    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "config/grafana/apilb.json",
        "config/prometheus/apilb-rules.yml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).expect("read");
        if file.ends_with(".json") {
            let v: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
            assert!(
                v["panels"].as_array().is_some_and(|p| p.len() > 10),
                "{file}: too few panels"
            );
        }
        let used = metric_names(&text);
        assert!(used.len() >= 6, "{file} uses too few metrics: {used:?}");
        let missing: Vec<&String> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics the gateway does not export: {missing:?}"
        );
    }
    gw.shutdown().await;
}

#[test]
fn names_are_read_from_expressions() {
    let n = metric_names(
        "rate(apilb_health_check_duration_seconds_bucket{x=\"apilb\"}[5m]) / apilb_ready",
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        ["apilb_health_check_duration_seconds", "apilb_ready"]
    );
}
