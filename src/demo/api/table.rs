//! What the simulated API shows kubectl: discovery documents (`/api`, `/api/v1`, `/apis`,
//! the coordination group) and server-side printing (`as=Table`), the columns `kubectl get`
//! prints for pods, nodes, namespaces and leases.

use std::time::SystemTime;

use serde_json::{json, Value};

use super::store::{Kind, Stored};

/// The discovery document at `path`, if it is one.
pub fn discovery(path: &str) -> Option<Value> {
    let doc = match path {
        "/api" => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}],
        }),
        "/api/v1" => resource_list("v1", ""),
        "/apis" => json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [group()],
        }),
        "/apis/coordination.k8s.io" => {
            let mut g = group();
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            g
        }
        "/apis/coordination.k8s.io/v1" => {
            resource_list("coordination.k8s.io/v1", "coordination.k8s.io")
        }
        _ => return None,
    };
    Some(doc)
}

fn group() -> Value {
    json!({
        "name": "coordination.k8s.io",
        "versions": [{"groupVersion": "coordination.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "coordination.k8s.io/v1", "version": "v1"},
    })
}

fn resource_list(group_version: &str, group: &str) -> Value {
    let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
    let mut resources = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| k.group() == group) {
        let singular = kind.name().to_lowercase();
        let short: &[&str] = match kind {
            Kind::Namespace => &["ns"],
            Kind::Node => &["no"],
            Kind::Pod => &["po"],
            Kind::Lease => &[],
        };
        resources.push(json!({
            "name": kind.plural(), "singularName": singular, "namespaced": kind.namespaced(),
            "kind": kind.name(), "verbs": verbs, "shortNames": short,
            "categories": if kind == Kind::Pod { json!(["all"]) } else { json!([]) },
        }));
        if matches!(kind, Kind::Node | Kind::Pod | Kind::Namespace) {
            resources.push(json!({
                "name": format!("{}/status", kind.plural()), "singularName": "",
                "namespaced": kind.namespaced(), "kind": kind.name(),
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

/// Whether an `Accept` header asks for server-side printing.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

fn columns(kind: Kind) -> Value {
    let names: &[&str] = match kind {
        Kind::Pod => &["Name", "Ready", "Status", "Restarts", "Age", "Node"],
        Kind::Node => &["Name", "Status", "Roles", "Age", "Version"],
        Kind::Namespace => &["Name", "Status", "Age"],
        Kind::Lease => &["Name", "Holder", "Age"],
    };
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({
                "name": n, "type": "string", "format": if i == 0 { "name" } else { "" },
                "description": "", "priority": if *n == "Node" { 1 } else { 0 },
            })
        })
        .collect()
}

/// A Table of `items`; `with_columns` false for the watch events after the first.
pub fn table(kind: Kind, items: &[Stored], rv: u64, with_columns: bool) -> Value {
    let rows: Vec<Value> = items.iter().map(|s| row(kind, &s.value)).collect();
    let mut t = json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "rows": rows,
    });
    if with_columns {
        t["columnDefinitions"] = columns(kind);
    }
    t
}

fn row(kind: Kind, obj: &Value) -> Value {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let meta = &obj["metadata"];
    let age = age(meta["creationTimestamp"].as_str());
    let cells = match kind {
        Kind::Pod => {
            let containers = obj["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = obj["status"]["containerStatuses"]
                .as_array()
                .map_or(0, |c| {
                    c.iter().filter(|c| c["ready"] == json!(true)).count()
                });
            let phase = obj["status"]["phase"].as_str().unwrap_or("Pending");
            json!([
                s(&meta["name"]),
                format!("{ready}/{containers}"),
                phase,
                0,
                age,
                s(&obj["spec"]["nodeName"])
            ])
        }
        Kind::Node => {
            let ready = obj["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == json!("Ready")))
                .map_or("Unknown", |c| match c["status"].as_str() {
                    Some("True") => "Ready",
                    Some("False") => "NotReady",
                    _ => "Unknown",
                });
            json!([
                s(&meta["name"]),
                ready,
                "<none>",
                age,
                s(&obj["status"]["nodeInfo"]["kubeletVersion"])
            ])
        }
        Kind::Namespace => json!([
            s(&meta["name"]),
            obj["status"]["phase"].as_str().unwrap_or("Active"),
            age
        ]),
        Kind::Lease => json!([s(&meta["name"]), s(&obj["spec"]["holderIdentity"]), age]),
    };
    json!({
        "cells": cells,
        "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta},
    })
}

/// kubectl's short age: 42s, 5m, 3h, 2d.
fn age(created: Option<&str>) -> String {
    let Some(t) = created.and_then(|c| humantime::parse_rfc3339(c).ok()) else {
        return "<unknown>".into();
    };
    let secs = SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| d.as_secs());
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_lists_every_kind_once() {
        let core = discovery("/api/v1").expect("core");
        let names: Vec<&str> = core["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        for n in ["pods", "nodes", "namespaces", "pods/status"] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let coord = discovery("/apis/coordination.k8s.io/v1").expect("coordination");
        assert_eq!(coord["resources"][0]["name"], "leases");
        assert!(discovery("/apis/apps/v1").is_none());
    }

    #[test]
    fn table_is_asked_for_first() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
