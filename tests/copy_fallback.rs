//! The copy path that TLS and non-Linux platforms use, forced for TCP too: the same payload,
//! half-close and idle checks as the (spliced) passthrough tests, with splice turned off by the
//! gateway's options. A separate test binary, so the thread-local pipe pools it checks are
//! its own.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn forced_copy_keeps_payloads_half_close_and_idle_timeout() {
    let copy = || apilb::GatewayOptions { splice: false };
    let sink = SinkServer::start().await;
    let gw = gateway_with(&simple_config(&[sink.addr], "", ""), copy()).await;
    within(30, "1 MiB", sink_roundtrip(gw.addr(), 1 << 20, 1 << 20, 21)).await;
    within(
        60,
        "32 MiB",
        sink_roundtrip(gw.addr(), 32 << 20, 32 << 20, 22),
    )
    .await;
    within(30, "asymmetric", sink_roundtrip(gw.addr(), 10, 4 << 20, 23)).await;
    assert_eq!(
        apilb::relay::pooled_pipes(),
        0,
        "a pipe was used although splice was off"
    );
    gw.shutdown().await;

    let echo = EchoServer::start().await;
    let gw = gateway_with(
        &simple_config(&[echo.addr], "", "idle_timeout = \"300ms\""),
        copy(),
    )
    .await;
    let mut s = within(10, "echo", echo_once(gw.addr())).await;
    let mut b = [0u8; 1];
    let n = within(10, "idle close", s.read(&mut b)).await.unwrap_or(0);
    assert_eq!(n, 0, "idle connection not closed on the copy path");
    tokio::time::sleep(Duration::from_millis(10)).await;
    gw.shutdown().await;
}
