//! `/api/status`: the admin [`View`] as JSON, in the shape of SPEC §4 (with a few more
//! fields).

use super::view::{rfc3339, unix_rfc3339, View};
use crate::balance::Backend;
use crate::phase::Phase;

/// `/api/status`, in the shape of SPEC §4 (with a few more fields).
pub(crate) fn status_json(view: &View, phase: Phase) -> serde_json::Value {
    use serde_json::json;
    let listeners: Vec<_> = view
        .listeners
        .iter()
        .map(|l| {
            json!({
                "name": l.name,
                "mode": l.mode.as_str(),
                "listen": l.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "pool": l.pool,
                "routes": l.routes.iter().map(|r| json!({"sni": r.sni, "pool": r.pool})).collect::<Vec<_>>(),
                "active": l.active.get(),
            })
        })
        .collect();
    let pools: Vec<_> = view
        .pools
        .iter()
        .map(|p| {
            let live = p.backends.iter().map(|b| backend(b, None));
            let draining = view.draining_in(&p.cfg.name).map(|b| {
                backend(
                    b,
                    Some("removed by a reload; open connections are draining"),
                )
            });
            let backends: Vec<_> = live.chain(draining).collect();
            json!({
                "name": p.cfg.name,
                "balance": p.cfg.balance.as_str(),
                "health_check": p.cfg.health.check.as_str(),
                "connection_skew": (crate::rebalance::current_skew(p) * 100.0).round() / 100.0,
                "rebalance": p.cfg.rebalance.map(|r| json!({
                    "max_skew": r.max_skew,
                    "rate": r.rate,
                    "min_age_seconds": r.min_age.as_secs(),
                })),
                "backends": backends,
            })
        })
        .collect();
    let certificates: Vec<_> = view
        .certificates
        .iter()
        .map(|c| json!({"source": c.source, "subject": c.subject, "not_after": unix_rfc3339(c.not_after)}))
        .collect();
    json!({
        "phase": format!("{phase:?}").to_lowercase(),
        "listeners": listeners,
        "pools": pools,
        "certificates": certificates,
        "config": {
            "loaded_at": rfc3339(view.loaded_at),
            "last_reload": view.last_reload.as_ref().map(|r| json!({
                "at": rfc3339(r.at),
                "result": if r.error.is_some() { "failure" } else { "success" },
                "error": r.error,
            })),
        },
    })
}

/// One backend; `draining` overrides its health for a backend a reload removed.
fn backend(b: &Backend, draining: Option<&str>) -> serde_json::Value {
    let s = b.health.status();
    serde_json::json!({
        "name": b.name,
        "address": b.address,
        "state": if draining.is_some() { "draining" } else { s.state.as_str() },
        "reason": draining.map_or(s.reason, str::to_string),
        "last_check": s.last_check.map(rfc3339),
        "active": b.active(),
        "connections": b.metrics.connections.get(),
        "bytes_up": b.metrics.bytes_up.get(),
        "bytes_down": b.metrics.bytes_down.get(),
        "weight": b.weight,
        "covers_names": s.missing_names.as_ref().map(Vec::is_empty),
        "missing_names": s.missing_names,
        "certificate_not_after": s.certificate_not_after.map(unix_rfc3339),
    })
}
