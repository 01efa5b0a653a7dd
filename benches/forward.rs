//! The copy loop in-process over loopback: `forward::relay_tcp` (passthrough) between two socket pairs, so a
//! change to the hot path shows in seconds. `bulk` moves 8 MiB one way per iteration;
//! `pingpong` sends 100 bytes through the relay to an echo and back (one request's latency).
//! Run with `cargo bench --bench forward`.

use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_main, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = l.local_addr().expect("addr");
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let a = a.expect("connect");
    let b = b.expect("accept").0;
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

/// Client end, backend end, and the relay between them running in a task.
async fn relayed() -> (TcpStream, TcpStream, CancellationToken) {
    let (client, gw_client) = pair().await;
    let (gw_backend, backend) = pair().await;
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        apilb::relay::relay_tcp(
            gw_client,
            gw_backend,
            Duration::from_secs(3600),
            true,
            s.cancelled(),
        )
        .await;
    });
    (client, backend, stop)
}

fn bulk(c: &mut Criterion) {
    const N: usize = 8 << 20;
    let rt = Runtime::new().expect("runtime");
    let (mut client, mut backend, stop) = rt.block_on(relayed());
    let data = vec![7u8; N];
    let mut sink = vec![0u8; N];
    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Bytes(N as u64));
    g.bench_function("bulk_8MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (w, r) = tokio::join!(client.write_all(&data), backend.read_exact(&mut sink));
                w.expect("write");
                r.expect("read");
            });
        });
    });
    g.finish();
    stop.cancel();
}

fn pingpong(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let (mut client, mut backend, stop) = rt.block_on(relayed());
    rt.spawn(async move {
        let mut buf = [0u8; 100];
        while backend.read_exact(&mut buf).await.is_ok() {
            if backend.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let msg = [1u8; 100];
    let mut got = [0u8; 100];
    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pingpong_100B", |b| {
        b.iter(|| {
            rt.block_on(async {
                client.write_all(&msg).await.expect("write");
                client.read_exact(&mut got).await.expect("read");
            });
        });
    });
    g.finish();
    stop.cancel();
}

// The macros generate undocumented items.
#[allow(missing_docs)]
mod groups {
    use super::{bulk, pingpong};
    criterion::criterion_group!(benches, bulk, pingpong);
}
criterion_main!(groups::benches);
