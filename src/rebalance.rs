//! Rebalancing long-lived connections (SPEC §11): after a rolling restart most watches sit
//! on the apiservers that stayed up, and a passthrough gateway cannot send an HTTP/2 GOAWAY.
//! It can close, slowly and cleanly, just the surplus, which clients (client-go) re-establish
//! through the gateway onto the least-loaded apiserver.
//!
//! [`decide`] is the whole policy, pure: open connections per backend, effective weights,
//! ages and the client side's quiet time in; the connections to close out. [`run`] is the
//! small effectful part, once a second per pool: it reads the backends' counters and
//! relay registries, exports the skew of every pool, and asks the chosen relays to end
//! (they discard unread bytes and send FIN both ways, `end=rebalanced`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::balance::Pool;
use crate::config::RebalanceConfig;

/// A connection whose client sent something within this long may be in the middle of a
/// request: never closed.
pub(crate) const QUIET: Duration = Duration::from_secs(1);

/// One backend as the decision sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Load {
    /// Whether it takes new connections.
    pub(crate) healthy: bool,
    /// Its effective weight (slow start included).
    pub(crate) weight: f64,
    /// Connections open to it.
    pub(crate) open: u64,
    /// Its relays that could be closed: (id, age, how long the client has been quiet).
    pub(crate) relays: Vec<(u64, Duration, Duration)>,
}

/// Each healthy backend's fair share of `total` connections by effective weight (`None`
/// for the others); all `None` when no healthy backend has weight.
fn fair_shares(loads: &[Load]) -> Vec<Option<f64>> {
    let total: u64 = loads.iter().map(|l| l.open).sum();
    let weight: f64 = loads
        .iter()
        .filter(|l| l.healthy)
        .map(|l| l.weight.max(0.0))
        .sum();
    loads
        .iter()
        .map(|l| (l.healthy && weight > 0.0).then(|| total as f64 * l.weight.max(0.0) / weight))
        .collect()
}

/// `apilb_pool_connection_skew`: the largest healthy backend's open connections over its
/// fair share; 1.0 when there is nothing to compare (no connection, no healthy backend).
pub(crate) fn skew(loads: &[Load]) -> f64 {
    let fair = fair_shares(loads);
    loads
        .iter()
        .zip(&fair)
        .filter_map(|(l, f)| f.filter(|f| *f > 0.0).map(|f| l.open as f64 / f))
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))))
        .unwrap_or(1.0)
}

/// The skew of `pool` now (open connections and weights only), for the status page.
pub(crate) fn current_skew(pool: &Pool) -> f64 {
    let loads: Vec<Load> = pool
        .backends
        .iter()
        .map(|b| Load {
            healthy: b.health.is_healthy(),
            weight: pool.effective_weight(b),
            open: b.active(),
            relays: Vec::new(),
        })
        .collect();
    skew(&loads)
}

/// The connections to close now, as (backend index, relay id), at most `rules.rate`.
///
/// While some healthy backend holds more than `(1 + max_skew)` times its fair share and
/// another healthy backend holds less than its own, the most loaded backend (by open over
/// fair) that has a closable relay gives up its oldest one (older than `min_age`, client
/// quiet for [`QUIET`]); the closed connection is counted as landing on the least loaded
/// backend, as least-conn will place it. Nothing with fewer than two healthy backends.
pub(crate) fn decide(loads: &[Load], rules: &RebalanceConfig) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    if loads.iter().filter(|l| l.healthy).count() < 2 {
        return out;
    }
    let fair = fair_shares(loads);
    let mut open: Vec<f64> = loads.iter().map(|l| l.open as f64).collect();
    let mut closable: Vec<Vec<(u64, Duration)>> = loads
        .iter()
        .map(|l| {
            let mut v: Vec<(u64, Duration)> = l
                .relays
                .iter()
                .filter(|(_, age, quiet)| *age >= rules.min_age && *quiet >= QUIET)
                .map(|(id, age, _)| (*id, *age))
                .collect();
            // Oldest last, so taking one is a pop; ties broken by id for a stable answer.
            v.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
            v
        })
        .collect();
    let ratio = |i: usize, open: &[f64]| fair[i].filter(|f| *f > 0.0).map(|f| open[i] / f);
    while out.len() < rules.rate as usize {
        let over = (0..loads.len())
            .filter(|&i| !closable[i].is_empty())
            .filter_map(|i| {
                let f = fair[i]?;
                if open[i] > (1.0 + rules.max_skew) * f {
                    Some((i, ratio(i, &open)?))
                } else {
                    None
                }
            })
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let under = (0..loads.len())
            .filter_map(|i| {
                let f = fair[i]?;
                (open[i] < f).then(|| (i, open[i] / f.max(f64::MIN_POSITIVE)))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let (Some((from, _)), Some((to, _))) = (over, under) else {
            break;
        };
        let Some((id, _)) = closable[from].pop() else {
            break;
        };
        out.push((from, id));
        open[from] -= 1.0;
        open[to] += 1.0;
    }
    out
}

/// Once a second until `stop`: exports the pool's skew and, with `[pool.rebalance]`, closes
/// what [`decide`] picks. Nothing is closed once `shutting_down` is cancelled, or while the
/// pool fails open (no healthy backend).
pub(crate) async fn run(
    pool: Arc<Pool>,
    skew_gauge: prometheus::Gauge,
    stop: CancellationToken,
    shutting_down: CancellationToken,
    last_round: Arc<std::sync::atomic::AtomicU64>,
) {
    // Closes at most `rate` per round, and rounds are a second apart even across reloads
    // (which start a new loop): `last_round` outlives the loop, the first tick waits a
    // second, and a stopped loop takes no further tick.
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let rules = pool.cfg.rebalance;
        let acting = rules.is_some() && !shutting_down.is_cancelled();
        let mut relays = Vec::new();
        let loads: Vec<Load> = pool
            .backends
            .iter()
            .map(|b| {
                let open = if acting {
                    b.relays.snapshot()
                } else {
                    Vec::new()
                };
                let load = Load {
                    healthy: b.health.is_healthy(),
                    weight: pool.effective_weight(b),
                    open: b.active(),
                    relays: open
                        .iter()
                        .filter(|t| !t.was_asked())
                        .map(|t| (t.id, t.clock.age(), t.clock.client_quiet()))
                        .collect(),
                };
                relays.push(open);
                load
            })
            .collect();
        skew_gauge.set(skew(&loads));
        let Some(rules) = rules.filter(|_| acting) else {
            continue;
        };
        let now = crate::balance::now_ms();
        if now.saturating_sub(last_round.load(std::sync::atomic::Ordering::Relaxed)) < 1000 {
            continue;
        }
        let chosen = decide(&loads, &rules);
        if chosen.is_empty() {
            continue;
        }
        last_round.store(now, std::sync::atomic::Ordering::Relaxed);
        for &(i, id) in &chosen {
            if let Some(t) = relays[i].iter().find(|t| t.id == id) {
                // Counted when the relay ends (it declines while a request is in flight).
                t.rebalance();
            }
        }
        tracing::info!(
            pool = %pool.cfg.name,
            closed = chosen.len(),
            skew = format!("{:.2}", skew(&loads)),
            "rebalancing: asking connections of backends above their share to end; clients reconnect to the least loaded"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(120);

    fn rules(rate: u32) -> RebalanceConfig {
        RebalanceConfig {
            max_skew: 0.25,
            rate,
            min_age: MIN,
        }
    }

    /// A healthy backend of weight 1 with `open` relays, all old and quiet, ids from `base`.
    fn backend(open: u64, base: u64) -> Load {
        Load {
            healthy: true,
            weight: 1.0,
            open,
            relays: (0..open)
                .map(|k| {
                    (
                        base + k,
                        MIN + Duration::from_secs(k),
                        Duration::from_secs(5),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn after_a_restart_the_surplus_moves_at_rate_oldest_first() {
        // 150 connections, the third backend back with none.
        let loads = [backend(75, 0), backend(75, 1000), backend(0, 2000)];
        assert!((skew(&loads) - 1.5).abs() < 1e-9);
        let first = decide(&loads, &rules(10));
        assert_eq!(first.len(), 10, "rate bounds one round");
        // Alternating between the two loaded backends, each giving its oldest first.
        let mut two = first[..2].to_vec();
        two.sort_unstable();
        assert_eq!(two, [(0, 74), (1, 1074)]);
        assert!(
            first.iter().all(|(i, _)| *i < 2),
            "nothing from the empty backend"
        );
        // With no rate limit, it stops as soon as no backend is above (1 + max_skew) x fair.
        let all = decide(&loads, &rules(1000));
        let from0 = all.iter().filter(|(i, _)| *i == 0).count() as u64;
        let from1 = all.iter().filter(|(i, _)| *i == 1).count() as u64;
        assert!(75 - from0 <= 62 && 75 - from1 <= 62, "{from0} {from1}");
        assert_eq!(from0 + from1, all.len() as u64);
        let after = [
            backend(75 - from0, 0),
            backend(75 - from1, 1000),
            backend(from0 + from1, 2000),
        ];
        assert!(skew(&after) <= 1.25, "{}", skew(&after));
    }

    #[test]
    fn nothing_moves_within_the_skew_or_without_an_underloaded_backend() {
        assert!(decide(
            &[backend(60, 0), backend(50, 100), backend(40, 200)],
            &rules(10)
        )
        .is_empty());
        assert!(decide(&[backend(50, 0), backend(50, 100)], &rules(10)).is_empty());
        assert!(decide(&[backend(0, 0), backend(0, 100)], &rules(10)).is_empty());
    }

    #[test]
    fn fewer_than_two_healthy_backends_move_nothing() {
        let mut down = backend(0, 100);
        down.healthy = false;
        assert!(decide(&[backend(100, 0), down.clone()], &rules(10)).is_empty());
        let mut down0 = backend(100, 0);
        down0.healthy = false;
        assert!(decide(&[down0, down], &rules(10)).is_empty(), "fail-open");
    }

    #[test]
    fn young_and_busy_connections_are_never_chosen() {
        let mut b = backend(100, 0);
        for (k, r) in b.relays.iter_mut().enumerate() {
            if k % 2 == 0 {
                r.1 = MIN - Duration::from_millis(1); // too young
            } else {
                r.2 = Duration::from_millis(999); // client sent something within 1s
            }
        }
        b.relays[1].2 = QUIET; // exactly one second quiet: allowed
        let chosen = decide(&[b, backend(0, 1000)], &rules(100));
        assert_eq!(chosen, vec![(0, 1)]);
    }

    #[test]
    fn fair_shares_follow_effective_weights() {
        // Weight 3 vs 1 (a ramping backend counts with its current weight): 75/25 is even.
        let mut a = backend(75, 0);
        a.weight = 3.0;
        let b = backend(25, 1000);
        assert!((skew(&[a.clone(), b.clone()]) - 1.0).abs() < 1e-9);
        assert!(decide(&[a.clone(), b], &rules(10)).is_empty());
        // The same 75/25 with equal weights: the first holds 1.5x its share.
        let mut a2 = a;
        a2.weight = 1.0;
        assert!(!decide(&[a2, backend(25, 1000)], &rules(10)).is_empty());
        // Slow start: the returning backend at 10% of its weight has a small fair share,
        // so a 100/10 split is already even enough.
        let mut ramping = backend(10, 1000);
        ramping.weight = 0.1;
        let mut big = backend(100, 0);
        big.weight = 1.0;
        assert!(decide(&[big, ramping], &rules(10)).is_empty());
    }

    #[test]
    fn no_connections_and_no_healthy_backend_have_skew_one() {
        assert_eq!(skew(&[backend(0, 0), backend(0, 0)]), 1.0);
        let mut d = backend(5, 0);
        d.healthy = false;
        assert_eq!(skew(&[d]), 1.0);
    }
}
