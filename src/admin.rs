//! The admin server: `/metrics`, `/healthz`, `/readyz`, `/status` and `/api/status` (SPEC §4).
//!
//! It only reads: the current [`View`] of the gateway (published by `Gateway::start`, and by
//! reload later) and the metrics registry. Nothing here changes state, and nothing here is on
//! the data path. It speaks HTTP/1.1 with hyper on its own listener, which validation keeps
//! apart from every traffic listener.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::balance::Pool;
use crate::config::{CertificateInfo, Mode};
use crate::health::State;
use crate::metrics::Metrics;
use crate::Phase;

/// What the admin endpoints show: one immutable snapshot, replaced whole.
#[derive(Debug)]
pub struct View {
    /// Listeners in config order.
    pub listeners: Vec<ListenerView>,
    /// Pools in config order, as the data path sees them.
    pub pools: Vec<Arc<Pool>>,
    /// Every certificate the config names.
    pub certificates: Vec<CertificateInfo>,
    /// When the running config was loaded.
    pub loaded_at: SystemTime,
    /// The last reload, when there was one.
    pub last_reload: Option<ReloadOutcome>,
}

/// One listener on the status page.
#[derive(Debug, Clone)]
pub struct ListenerView {
    /// Its name.
    pub name: String,
    /// passthrough or terminate.
    pub mode: Mode,
    /// Bound addresses.
    pub listen: Vec<SocketAddr>,
    /// The pool it uses.
    pub pool: String,
    /// Open connections.
    pub active: IntGauge,
}

/// How the last reload went.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    /// When it happened.
    pub at: SystemTime,
    /// The error, if it failed (the running config then stayed as it was).
    pub error: Option<String>,
}

/// Everything the admin server reads.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub view: Arc<ArcSwap<View>>,
    pub metrics: Arc<Metrics>,
    pub phase: watch::Receiver<Phase>,
}

/// Serves admin requests on `listener` until `stop` is cancelled.
pub(crate) async fn serve(listener: TcpListener, admin: Admin, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&req, &admin)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(hyper::header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn route(req: &Request<Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD: the admin endpoints change nothing\n".into(),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let text = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            admin.metrics.encode(),
        ),
        "/healthz" => respond(StatusCode::OK, text, "ok\n".into()),
        "/readyz" => match not_ready(&admin.view.load(), *admin.phase.borrow()) {
            None => respond(StatusCode::OK, text, "ok\n".into()),
            Some(reason) => respond(StatusCode::SERVICE_UNAVAILABLE, text, reason),
        },
        "/api/status" => respond(
            StatusCode::OK,
            "application/json",
            status_json(&admin.view.load(), *admin.phase.borrow()).to_string(),
        ),
        "/status" | "/" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_html(&admin.view.load(), *admin.phase.borrow()),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            text,
            "not found: try /status, /metrics, /readyz, /healthz, /api/status\n".into(),
        ),
    }
}

/// Why the gateway is not ready, or `None` when every listener's pool has a healthy backend.
pub(crate) fn not_ready(view: &View, phase: Phase) -> Option<String> {
    if phase != Phase::Running {
        return Some("draining: shutting down, not accepting new connections\n".into());
    }
    let mut reasons = String::new();
    for pool in &view.pools {
        if pool.backends.iter().any(|b| b.health.is_healthy()) {
            continue;
        }
        let users: Vec<&str> = view
            .listeners
            .iter()
            .filter(|l| l.pool == pool.cfg.name)
            .map(|l| l.name.as_str())
            .collect();
        if users.is_empty() {
            continue;
        }
        let _ = writeln!(
            reasons,
            "pool {:?} has no healthy backend (used by listener{} {})",
            pool.cfg.name,
            if users.len() == 1 { "" } else { "s" },
            users.join(", ")
        );
    }
    (!reasons.is_empty()).then_some(reasons)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix_rfc3339(secs: i64) -> String {
    rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

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
                "active": l.active.get(),
            })
        })
        .collect();
    let pools: Vec<_> = view
        .pools
        .iter()
        .map(|p| {
            let backends: Vec<_> = p
                .backends
                .iter()
                .map(|b| {
                    let s = b.health.status();
                    json!({
                        "name": b.name,
                        "address": b.address,
                        "state": s.state.as_str(),
                        "reason": s.reason,
                        "last_check": s.last_check.map(rfc3339),
                        "active": b.active(),
                        "connections": b.metrics.connections.get(),
                        "bytes_up": b.metrics.bytes_up.get(),
                        "bytes_down": b.metrics.bytes_down.get(),
                        "weight": b.weight,
                    })
                })
                .collect();
            json!({
                "name": p.cfg.name,
                "balance": p.cfg.balance.as_str(),
                "health_check": p.cfg.health.check.as_str(),
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

/// Escapes text for HTML (names and reasons come from the config and the network).
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ago(t: SystemTime) -> String {
    match SystemTime::now().duration_since(t) {
        Ok(d) if d.as_secs() < 120 => format!("{}s ago", d.as_secs()),
        Ok(d) if d.as_secs() < 7200 => format!("{}m ago", d.as_secs() / 60),
        Ok(d) => format!("{}h ago", d.as_secs() / 3600),
        Err(_) => "just now".into(),
    }
}

const STYLE: &str = "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#1f2328}\
header{background:#1f2937;color:#fff;padding:14px 24px;display:flex;gap:16px;align-items:baseline;flex-wrap:wrap}\
header h1{font-size:18px;margin:0}header .sub{color:#cbd5e1}\
main{padding:16px 24px;max-width:1200px}\
section{background:#fff;border:1px solid #d8dee4;border-radius:8px;margin:0 0 16px;padding:12px 16px}\
h2{font-size:15px;margin:0 0 8px}table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #eef1f4;vertical-align:top}\
th{font-size:12px;text-transform:uppercase;letter-spacing:.03em;color:#57606a}\
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}\
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-weight:600;font-size:12px}\
.healthy{background:#dafbe1;color:#116329}.unhealthy{background:#ffebe9;color:#a40e26}\
.unknown{background:#eaeef2;color:#57606a}.draining{background:#fff8c5;color:#7d4e00}\
.ok{color:#116329}.bad{color:#a40e26;font-weight:600}.warn{color:#9a6700;font-weight:600}\
.reason{color:#57606a}code{font-size:13px}";

/// `/status`: one self-contained page, refreshed every 5 seconds.
pub(crate) fn status_html(view: &View, phase: Phase) -> String {
    let mut h = String::with_capacity(8192);
    let ready = not_ready(view, phase);
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
         <meta name=viewport content='width=device-width,initial-scale=1'><title>apilb status</title>\
         <style>{STYLE}</style></head><body><header><h1>apilb</h1><span class=sub>{}</span>\
         <span class=sub>config loaded {}</span><span class=sub>{}</span></header><main>",
        match &ready {
            None => "<span class=badge style='background:#2da44e;color:#fff'>READY</span>".to_string(),
            Some(r) => format!("<span class=badge style='background:#cf222e;color:#fff'>NOT READY</span> {}", esc(r.trim())),
        },
        esc(&ago(view.loaded_at)),
        match &view.last_reload {
            None => "no reload yet".to_string(),
            Some(r) => match &r.error {
                None => format!("last reload {} <span class=ok>succeeded</span>", esc(&ago(r.at))),
                Some(e) => format!("last reload {} <span class=bad>failed</span>: {}", esc(&ago(r.at)), esc(e)),
            },
        }
    );

    h.push_str("<section><h2>Listeners</h2><table><tr><th>name</th><th>mode</th><th>address</th><th>pool</th><th class=num>active</th></tr>");
    for l in &view.listeners {
        let addrs: Vec<String> = l
            .listen
            .iter()
            .map(|a| format!("<code>{}</code>", esc(&a.to_string())))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=num>{}</td></tr>",
            esc(&l.name),
            l.mode.as_str(),
            addrs.join(" "),
            esc(&l.pool),
            l.active.get()
        );
    }
    h.push_str("</table></section>");

    for p in &view.pools {
        let healthy = p.backends.iter().filter(|b| b.health.is_healthy()).count();
        let _ = write!(
            h,
            "<section><h2>Pool {} <span class=reason>{} · {} check · {}/{} healthy</span></h2><table>\
             <tr><th>backend</th><th>address</th><th>state</th><th>last check</th><th class=num>active</th>\
             <th class=num>connections</th><th class=num>bytes up</th><th class=num>bytes down</th></tr>",
            esc(&p.cfg.name),
            p.cfg.balance.as_str(),
            p.cfg.health.check.as_str(),
            healthy,
            p.backends.len()
        );
        for b in &p.backends {
            let s = b.health.status();
            let state = match s.state {
                State::Unknown if b.health.is_healthy() => "unknown",
                other => other.as_str(),
            };
            let when = s.last_check.map_or_else(|| "never".to_string(), ago);
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td><span class='badge {state}'>{state}</span></td>\
                 <td>{} <span class=reason>{}</span></td><td class=num>{}</td><td class=num>{}</td>\
                 <td class=num>{}</td><td class=num>{}</td></tr>",
                esc(&b.name),
                esc(&b.address),
                esc(&s.reason),
                esc(&when),
                b.active(),
                b.metrics.connections.get(),
                bytes(b.metrics.bytes_up.get()),
                bytes(b.metrics.bytes_down.get())
            );
        }
        h.push_str("</table></section>");
    }

    if !view.certificates.is_empty() {
        h.push_str("<section><h2>Certificates</h2><table><tr><th>source</th><th>subject</th><th>expires</th></tr>");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        for c in &view.certificates {
            let days = (c.not_after - now) / 86_400;
            let class = if c.not_after < now {
                "bad"
            } else if days < 30 {
                "warn"
            } else {
                "ok"
            };
            let left = if c.not_after < now {
                "expired".to_string()
            } else {
                format!("in {days} days")
            };
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td>{} <span class={class}>{left}</span></td></tr>",
                esc(&c.source),
                esc(&c.subject),
                esc(&unix_rfc3339(c.not_after))
            );
        }
        h.push_str("</table></section>");
    }
    h.push_str("<p class=reason>Refreshes every 5 s · <a href=/api/status>/api/status</a> · <a href=/metrics>/metrics</a></p></main></body></html>\n");
    h
}
