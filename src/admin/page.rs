//! `/status`: one self-contained HTML page from the admin [`View`], refreshed every 5 s.

use std::fmt::Write as _;
use std::time::SystemTime;

use super::view::{not_ready, unix_rfc3339, View};
use crate::balance::Backend;
use crate::health::State;
use crate::phase::Phase;

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
            esc(&l.destination),
            l.active.get()
        );
    }
    h.push_str("</table></section>");

    for p in &view.pools {
        let healthy = p.backends.iter().filter(|b| b.health.is_healthy()).count();
        let _ = write!(
            h,
            "<section><h2>Pool {} <span class=reason>{} · {} check · {}/{} healthy · skew {:.2}{}</span></h2><table>\
             <tr><th>backend</th><th>address</th><th>state</th><th>last check</th><th class=num>active</th>\
             <th class=num>connections</th><th class=num>bytes up</th><th class=num>bytes down</th></tr>",
            esc(&p.cfg.name),
            p.cfg.balance.as_str(),
            p.cfg.health.check.as_str(),
            healthy,
            p.backends.len(),
            crate::rebalance::current_skew(p),
            match p.cfg.rebalance {
                Some(r) => format!(" (rebalancing above {:.2})", 1.0 + r.max_skew),
                None => String::new(),
            }
        );
        for b in &p.backends {
            backend_row(&mut h, b, false);
        }
        for b in view.draining_in(&p.cfg.name) {
            backend_row(&mut h, b, true);
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

/// One backend's row; `draining` for a backend a reload removed that still has connections.
fn backend_row(h: &mut String, b: &Backend, draining: bool) {
    let s = b.health.status();
    let (state, reason) = if draining {
        (
            "draining",
            "removed by a reload; open connections are draining".to_string(),
        )
    } else {
        let state = match s.state {
            State::Unknown if b.health.is_healthy() => "unknown",
            other => other.as_str(),
        };
        (state, s.reason)
    };
    let when = s.last_check.map_or_else(|| "never".to_string(), ago);
    // SPEC §8: a certificate without the names clients use is marked, not taken out.
    let names = match &s.missing_names {
        Some(m) if !m.is_empty() => format!(
            " <span class='badge unhealthy' title='certificate does not cover these names'>not valid for {}</span>",
            esc(&m.join(", "))
        ),
        _ => String::new(),
    };
    let _ = write!(
        h,
        "<tr><td>{}{names}</td><td><code>{}</code></td><td><span class='badge {state}'>{state}</span></td>\
         <td>{} <span class=reason>{}</span></td><td class=num>{}</td><td class=num>{}</td>\
         <td class=num>{}</td><td class=num>{}</td></tr>",
        esc(&b.name),
        esc(&b.address),
        esc(&reason),
        esc(&when),
        b.active(),
        b.metrics.connections.get(),
        bytes(b.metrics.bytes_up.get()),
        bytes(b.metrics.bytes_down.get())
    );
}
