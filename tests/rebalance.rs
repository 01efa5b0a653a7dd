//! Rebalancing long-lived connections on real sockets (SPEC §11): 150 watch-like clients
//! through a passthrough listener in front of three backends; one backend is stopped (its
//! clients come back through the gateway onto the other two) and started again. Without
//! `[pool.rebalance]` the skew stays; with it the surplus moves at `rate`, oldest and quiet
//! connections only, each ending with a FIN the client reconnects after, and no watch is
//! lost.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A backend that holds every connection open, reading and discarding and sending an event
/// byte every 20 ms, until it is stopped; stopping closes the listener and every open
/// connection (a restarted apiserver).
struct Held {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Held {
    async fn start(listen: SocketAddr) -> Self {
        let l = within(10, "bind backend", async {
            loop {
                match TcpListener::bind(listen).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        let addr = l.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut c, _) = tokio::select! {
                    () = s.cancelled() => return,
                    r = l.accept() => match r { Ok(c) => c, Err(_) => return },
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    // A watch's events: a byte every 20 ms, so that a reset anywhere on the
                    // path surfaces at the client.
                    let mut events = tokio::time::interval(Duration::from_millis(20));
                    loop {
                        tokio::select! {
                            () = s.cancelled() => return,
                            r = c.read(&mut buf) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            },
                            _ = events.tick() => {
                                if c.write_all(b"e").await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self { addr, stop }
    }

    fn stop(&self) {
        self.stop.cancel();
    }
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// Clients connected now.
    open: AtomicUsize,
    /// Orderly ends (read returned 0): when, and how old the connection was.
    ends: Mutex<Vec<(Instant, Duration)>>,
    /// Resets and other errors.
    errors: AtomicUsize,
    /// Ends of the busy client.
    busy_ends: AtomicUsize,
}

/// A client like a watch: connects, sends its request, then reads until the gateway or the
/// backend ends the connection, and connects again. `busy`: it also sends a byte every
/// 100 ms (an upload in progress).
fn watcher(gw: SocketAddr, seen: Arc<Seen>, done: Arc<AtomicBool>, busy: bool) {
    tokio::spawn(async move {
        while !done.load(Ordering::SeqCst) {
            let Ok(mut s) = TcpStream::connect(gw).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let started = Instant::now();
            if s.write_all(b"GET /api/v1/pods?watch=1\n").await.is_err() {
                seen.errors.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            seen.open.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let end = loop {
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        // An event: the watch goes on.
                        Ok(n) if n > 0 => {}
                        r => break r,
                    },
                    _ = tick.tick(), if busy => {
                        if s.write_all(b".").await.is_err() {
                            break Err(std::io::Error::other("write failed"));
                        }
                    }
                }
            };
            seen.open.fetch_sub(1, Ordering::SeqCst);
            match end {
                Ok(0) => {
                    seen.ends
                        .lock()
                        .expect("lock")
                        .push((Instant::now(), started.elapsed()));
                    if busy {
                        seen.busy_ends.fetch_add(1, Ordering::SeqCst);
                    }
                }
                _ => {
                    seen.errors.fetch_add(1, Ordering::SeqCst);
                }
            }
            if done.load(Ordering::SeqCst) {
                return;
            }
        }
    });
}

fn active(gw: &Gw, b: &str) -> f64 {
    gw.metric(
        "apilb_backend_active_connections",
        &[("pool", "p"), ("backend", b)],
    )
}

/// Runs the restart scenario; returns the gateway, what the clients saw, and when the
/// stopped backend was back.
async fn restart_scenario(rebalance: &str) -> (Gw, Arc<Seen>, Instant, Arc<AtomicBool>, Vec<Held>) {
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(Held::start("127.0.0.1:0".parse().expect("addr")).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let cfg = simple_config(
        &addrs,
        &format!(
            "connect_attempts = 3\n[pool.health]\ncheck = \"tcp\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n{rebalance}"
        ),
        "",
    );
    let gw = gateway(&cfg).await;
    let seen = Arc::new(Seen::default());
    let done = Arc::new(AtomicBool::new(false));
    for i in 0..150 {
        watcher(gw.addr(), seen.clone(), done.clone(), i == 0);
        // Spread the connects a little, as kubelets start.
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    eventually(20, "150 watches open, 50 per backend", || {
        seen.open.load(Ordering::SeqCst) == 150
            && (0..3).all(|i| active(&gw, &format!("b{i}")) == 50.0)
    })
    .await;

    // The third backend restarts: its 50 clients come back through the gateway.
    backends[2].stop();
    eventually(
        20,
        "the stopped backend's clients are back on the others",
        || {
            seen.open.load(Ordering::SeqCst) == 150
                && active(&gw, "b0") + active(&gw, "b1") == 150.0
        },
    )
    .await;
    eventually(10, "the stopped backend is marked down", || {
        gw.metric("apilb_backend_healthy", &[("pool", "p"), ("backend", "b2")]) == 0.0
    })
    .await;
    let addr2 = backends[2].addr;
    backends[2] = Held::start(addr2).await;
    eventually(10, "the backend is healthy again", || {
        gw.metric("apilb_backend_healthy", &[("pool", "p"), ("backend", "b2")]) == 1.0
    })
    .await;
    let back = Instant::now();
    (gw, seen, back, done, backends)
}

fn skew(gw: &Gw) -> f64 {
    gw.metric("apilb_pool_connection_skew", &[("pool", "p")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rebalance_the_skew_stays() {
    let (gw, seen, _back, done, _b) = restart_scenario("").await;
    // Five seconds later nothing has moved: the returned backend holds nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(active(&gw, "b2"), 0.0);
    assert!(skew(&gw) >= 1.45, "skew {}", skew(&gw));
    assert_eq!(seen.open.load(Ordering::SeqCst), 150);
    done.store(true, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rebalance_the_surplus_moves_at_rate_cleanly_and_nothing_is_lost() {
    let rate = 5;
    // Longer than the original connections have lived when the backend is back (about
    // 1.5 s): the first moves must wait for them to come of age.
    let min_age = Duration::from_secs(4);
    let (gw, seen, _back, done, _b) = restart_scenario(&format!(
        "[pool.rebalance]\nmax_skew = 0.25\nrate = {rate}\nmin_age = \"4s\"\n"
    ))
    .await;
    let ends_before = seen.ends.lock().expect("lock").len();
    let busy_before = seen.busy_ends.load(Ordering::SeqCst);
    let errors_before = seen.errors.load(Ordering::SeqCst);
    // 150 over three: fair 50, and at 75/75/0 the two hold 25 too many each; they must
    // come down to at most 62 (1.25 x 50), 26 moves at 5 a second: about 6 s, after the
    // originals reach min_age, plus a few.
    let took = eventually(25, "every backend within max_skew", || {
        (0..3).all(|i| active(&gw, &format!("b{i}")) <= 62.0)
            && seen.open.load(Ordering::SeqCst) == 150
    })
    .await;
    eprintln!("rebalanced within max_skew {took:?} after the backend was back");
    // Let the last round settle.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(skew(&gw) <= 1.25, "skew {}", skew(&gw));
    assert!(active(&gw, "b2") >= 26.0, "b2 holds {}", active(&gw, "b2"));

    let ends: Vec<(Instant, Duration)> = seen.ends.lock().expect("lock")[ends_before..].to_vec();
    let moved: f64 = (0..3)
        .map(|i| {
            gw.metrics().value_or_zero(
                "apilb_pool_rebalanced_total",
                &[("pool", "p"), ("backend", &format!("b{i}"))],
            )
        })
        .sum();
    assert_eq!(
        moved as usize,
        ends.len(),
        "every rebalanced connection ended at a client, and only those"
    );
    assert!(ends.len() >= 26, "moved {}", ends.len());
    eprintln!("moved {} connections", ends.len());
    // Orderly ends only: no reset, no error.
    assert_eq!(
        seen.errors.load(Ordering::SeqCst),
        errors_before,
        "resets seen by clients"
    );
    // No connection younger than min_age was closed (a little slack for the clock reads).
    for (_, age) in &ends {
        assert!(
            *age + Duration::from_millis(50) >= min_age,
            "a connection of {age:?} was closed"
        );
    }
    // Never more than `rate` in a second: each round's closes arrive together, rounds are a
    // second apart (a window a little under a second absorbs the delivery jitter).
    for (t, _) in &ends {
        let window = ends
            .iter()
            .filter(|(u, _)| *u >= *t && *u < *t + Duration::from_millis(900))
            .count();
        assert!(window <= rate, "{window} closes within 0.9 s");
    }
    // The busy client (uploading all along) was never chosen.
    assert_eq!(seen.busy_ends.load(Ordering::SeqCst), busy_before);
    // Nothing lost: the same 150 watches are open.
    assert_eq!(seen.open.load(Ordering::SeqCst), 150);
    done.store(true, Ordering::SeqCst);
}
