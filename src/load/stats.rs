//! What a load run measures and how it reports it: requests by verb with latency
//! percentiles, errors by kind, watches open and their re-establishments (with the longest
//! break), the progress line every few seconds, the final summary as text or as one JSON
//! document holding the same numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::client::Failure;

/// Latency samples kept per verb; past this, requests are still counted and sampled
/// one in `n`, so memory stays bounded on long runs.
const MAX_SAMPLES: usize = 1_000_000;

#[derive(Debug, Default)]
struct Verb {
    count: u64,
    samples: Vec<u32>,
    max_us: u32,
}

#[derive(Debug, Default)]
struct Inner {
    verbs: BTreeMap<&'static str, Verb>,
    errors: BTreeMap<Failure, u64>,
    first_error: Option<String>,
    longest_gap: Duration,
}

/// The counters of a run, shared by every simulated client.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Inner>,
    /// Watches streaming right now.
    pub watches_open: AtomicI64,
    /// Watches opened again after a break.
    pub reestablished: AtomicU64,
    /// Events received on watches.
    pub events: AtomicU64,
    /// Lists made again because a watch's resourceVersion was too old (410).
    pub relists: AtomicU64,
    /// Simulated nodes that have started.
    pub nodes_started: AtomicU64,
}

impl Stats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request of `verb` (upper case: GET, LIST, WATCH, CREATE, UPDATE, PATCH, DELETE)
    /// that got an answer after `latency` (for WATCH: until the response head).
    pub fn answered(&self, verb: &'static str, latency: Duration) {
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        let mut inner = self.lock();
        let v = inner.verbs.entry(verb).or_default();
        v.count += 1;
        v.max_us = v.max_us.max(us);
        if v.samples.len() < MAX_SAMPLES {
            v.samples.push(us);
        } else if v.count % 16 == 0 {
            let i = (v.count as usize / 16) % MAX_SAMPLES;
            v.samples[i] = us;
        }
    }

    /// A failure (`what` is kept for the first one, which the summary quotes).
    pub fn failed(&self, kind: Failure, what: &str) {
        let mut inner = self.lock();
        *inner.errors.entry(kind).or_default() += 1;
        if inner.first_error.is_none() {
            inner.first_error = Some(what.to_string());
        }
    }

    /// A watch is back after a break of `gap`.
    pub fn watch_back(&self, gap: Duration) {
        self.reestablished.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.longest_gap = inner.longest_gap.max(gap);
    }

    /// Requests answered and errors so far (for the progress line).
    fn totals(&self) -> (u64, u64, Option<f64>) {
        let inner = self.lock();
        let answered = inner.verbs.values().map(|v| v.count).sum();
        let errors = inner.errors.values().sum();
        let mut all: Vec<u32> = inner
            .verbs
            .iter()
            .filter(|(k, _)| **k != "WATCH")
            .flat_map(|(_, v)| v.samples.iter().copied())
            .collect();
        (answered, errors, percentile(&mut all, 0.99))
    }

    /// The summary of the run so far.
    pub fn snapshot(&self, elapsed: Duration) -> Measured {
        let inner = self.lock();
        let secs = elapsed.as_secs_f64().max(1e-9);
        let requests = inner
            .verbs
            .iter()
            .map(|(verb, v)| {
                let mut s = v.samples.clone();
                (
                    (*verb).to_string(),
                    VerbSummary {
                        count: v.count,
                        rate_per_s: v.count as f64 / secs,
                        p50_ms: percentile(&mut s, 0.50),
                        p90_ms: percentile(&mut s, 0.90),
                        p99_ms: percentile(&mut s, 0.99),
                        max_ms: f64::from(v.max_us) / 1000.0,
                    },
                )
            })
            .collect();
        Measured {
            elapsed_s: elapsed.as_secs_f64(),
            requests,
            errors: inner.errors.iter().map(|(k, n)| (k.label(), *n)).collect(),
            first_error: inner.first_error.clone(),
            watches: WatchSummary {
                open: self.watches_open.load(Ordering::Relaxed).max(0) as u64,
                expected: 0,
                reestablished: self.reestablished.load(Ordering::Relaxed),
                longest_gap_ms: (inner.longest_gap > Duration::ZERO)
                    .then(|| inner.longest_gap.as_secs_f64() * 1000.0),
                events: self.events.load(Ordering::Relaxed),
                relists_after_410: self.relists.load(Ordering::Relaxed),
            },
        }
    }

    /// The progress line: elapsed, nodes, watches, requests and rate, p99, errors.
    pub fn progress(
        &self,
        elapsed: Duration,
        nodes: usize,
        since: (u64, Duration),
    ) -> (String, u64) {
        let (answered, errors, p99) = self.totals();
        let window = elapsed.saturating_sub(since.1).as_secs_f64().max(1e-9);
        let rate = answered.saturating_sub(since.0) as f64 / window;
        let mut s = format!("[{:>4}s]", elapsed.as_secs());
        if nodes > 0 {
            let _ = write!(
                s,
                " nodes {}/{nodes}, watches {} open",
                self.nodes_started.load(Ordering::Relaxed),
                self.watches_open.load(Ordering::Relaxed).max(0)
            );
        }
        let _ = write!(s, ", {answered} requests ({rate:.1}/s)");
        if let Some(p) = p99 {
            let _ = write!(s, ", p99 {}", ms(p));
        }
        let _ = write!(s, ", {errors} errors");
        let re = self.reestablished.load(Ordering::Relaxed);
        if re > 0 {
            let _ = write!(s, ", {re} watches re-established");
        }
        (s, answered)
    }
}

/// The `q` quantile in milliseconds (nearest rank), or `None` without samples.
fn percentile(samples: &mut [u32], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    Some(f64::from(samples[rank - 1]) / 1000.0)
}

/// Milliseconds in words: `0.42 ms`, `12.3 ms`, `1.52 s`.
pub fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} s", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

/// One verb's numbers.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VerbSummary {
    /// Requests answered (any status).
    pub count: u64,
    /// Per second of the run.
    pub rate_per_s: f64,
    /// Latency percentiles, milliseconds (WATCH: until the response head).
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// The slowest.
    pub max_ms: f64,
}

/// The watches' numbers.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WatchSummary {
    /// Streaming at the end of the run.
    pub open: u64,
    /// How many the profile keeps open (two per node).
    pub expected: u64,
    /// Opened again after a break.
    pub reestablished: u64,
    /// The longest time from a watch's break to its re-establishment, milliseconds.
    pub longest_gap_ms: Option<f64>,
    /// Events received.
    pub events: u64,
    /// Lists made again after a 410.
    pub relists_after_410: u64,
}

/// What was measured.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Measured {
    /// Seconds the load ran (the ramp included, the wind-down not).
    pub elapsed_s: f64,
    /// By verb.
    pub requests: BTreeMap<String, VerbSummary>,
    /// By kind: `connect`, `tls`, `http 500`, `reset`, `timeout`.
    pub errors: BTreeMap<String, u64>,
    /// The first error, in words.
    pub first_error: Option<String>,
    /// Watches.
    pub watches: WatchSummary,
}

/// One backend of the gateway, from its `/api/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct BackendSpread {
    /// The pool.
    pub pool: String,
    /// The backend's name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// healthy, unhealthy, draining...
    pub state: String,
    /// Connections open to it.
    pub active: u64,
}

/// The whole report of a run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    /// kubelet, list or mixed.
    pub profile: String,
    /// The server the load went to.
    pub server: String,
    /// Simulated nodes (kubelet and mixed).
    pub nodes: usize,
    /// LIST requests per second asked for (list and mixed).
    pub qps: Option<f64>,
    /// The numbers.
    #[serde(flatten)]
    pub measured: Measured,
    /// The gateway's backends and their open connections, read before the load stopped.
    pub spread: Option<Vec<BackendSpread>>,
    /// Why the spread could not be read.
    pub spread_error: Option<String>,
}

impl Report {
    /// The summary as a person reads it.
    pub fn text(&self) -> String {
        let m = &self.measured;
        let mut s = format!(
            "apilb load: {} profile against {}, {:.1} s",
            self.profile, self.server, m.elapsed_s
        );
        if self.nodes > 0 {
            let _ = write!(
                s,
                ", {} simulated nodes (one HTTP/2 connection each)",
                self.nodes
            );
        }
        if let Some(q) = self.qps {
            let _ = write!(s, ", LIST at {q} requests/s (open loop)");
        }
        s.push_str("\n\n");
        let _ = writeln!(
            s,
            "  {:<8} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "verb", "requests", "rate", "p50", "p90", "p99", "max"
        );
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), ms);
        for (verb, v) in &m.requests {
            let _ = writeln!(
                s,
                "  {:<8} {:>9} {:>8.1}/s {:>10} {:>10} {:>10} {:>10}",
                verb,
                v.count,
                v.rate_per_s,
                opt(v.p50_ms),
                opt(v.p90_ms),
                opt(v.p99_ms),
                ms(v.max_ms)
            );
        }
        if m.requests.contains_key("WATCH") {
            s.push_str("  (WATCH latency: until the response head; the stream then stays open)\n");
        }
        s.push('\n');
        if m.errors.is_empty() {
            s.push_str("errors: none\n");
        } else {
            let list: Vec<String> = m.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            let _ = writeln!(s, "errors: {}", list.join(", "));
            if let Some(first) = &m.first_error {
                let _ = writeln!(s, "  first: {first}");
            }
        }
        let w = &m.watches;
        if w.expected > 0 {
            let _ = writeln!(
                s,
                "watches: {} of {} open at the end, {} events, {} re-established after a break (longest gap {}), {} relists after 410",
                w.open,
                w.expected,
                w.events,
                w.reestablished,
                opt(w.longest_gap_ms),
                w.relists_after_410
            );
        }
        if let Some(spread) = &self.spread {
            s.push_str(
                "connections per backend (the gateway's /api/status, before the load stopped):\n",
            );
            for b in spread {
                let _ = writeln!(
                    s,
                    "  {:<16} {:<22} {:<10} {:>6}",
                    b.name, b.address, b.state, b.active
                );
            }
        }
        if let Some(e) = &self.spread_error {
            let _ = writeln!(s, "connections per backend: not read ({e})");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_units() {
        let mut v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile(&mut v, 0.5), Some(50.0));
        assert_eq!(percentile(&mut v, 0.99), Some(99.0));
        assert_eq!(percentile(&mut [], 0.5), None);
        assert_eq!(ms(0.4242), "0.42 ms");
        assert_eq!(ms(12.34), "12.3 ms");
        assert_eq!(ms(1520.0), "1.52 s");
    }

    #[test]
    fn the_summary_counts_what_was_recorded() {
        let s = Stats::default();
        s.answered("GET", Duration::from_millis(2));
        s.answered("GET", Duration::from_millis(4));
        s.failed(Failure::Status(500), "GET /x: 500");
        s.watch_back(Duration::from_millis(300));
        let m = s.snapshot(Duration::from_secs(2));
        assert_eq!(m.requests["GET"].count, 2);
        assert_eq!(m.requests["GET"].rate_per_s, 1.0);
        assert_eq!(m.errors["http 500"], 1);
        assert_eq!(m.watches.reestablished, 1);
        assert_eq!(m.watches.longest_gap_ms, Some(300.0));
    }
}
