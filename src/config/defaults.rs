//! Every default of the configuration file (SPEC §2), in one place, and the bounds that
//! keep values inside what the gateway's arithmetic can hold.

use std::time::Duration;

/// `[admin] shutdown_grace`: off.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::ZERO;
/// `[[pool]] connect_timeout`
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `[[pool]] connect_attempts`
pub(crate) const CONNECT_ATTEMPTS: u32 = 3;
/// `[[pool]] drain_timeout`
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `[[pool]] slow_start`: off.
pub(crate) const SLOW_START: Duration = Duration::ZERO;
/// `[[listener]] idle_timeout`: watches are long-lived.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// `[[listener]] first_byte_timeout` (SPEC §3, Silent clients)
pub(crate) const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// `[[listener]] max_connections`
/// `sni_timeout`: time for the PROXY header and the whole ClientHello (SPEC §9).
pub(crate) const SNI_TIMEOUT: Duration = Duration::from_secs(5);
/// `[pool.rebalance] max_skew`.
pub(crate) const REBALANCE_MAX_SKEW: f64 = 0.25;
/// `[pool.rebalance] rate`: connections closed per second in a pool.
pub(crate) const REBALANCE_RATE: u32 = 10;
/// `[pool.rebalance] min_age`.
pub(crate) const REBALANCE_MIN_AGE: Duration = Duration::from_secs(120);
/// `[[listener]] max_connections`.
pub(crate) const MAX_CONNECTIONS: u32 = 50_000;
/// `[listener.tls] max_handshakes`: a burst of reconnecting clients fits; a flood of
/// ClientHellos (each costing a backend handshake before the client did any cryptographic
/// work) does not.
pub(crate) const MAX_HANDSHAKES: u32 = 1024;
/// `[listener.tls] handshake_timeout`
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `[[pool.backend]] weight`
pub(crate) const WEIGHT: u32 = 1;
/// Weights are small integers so that least-conn can compare `active * weight` products
/// without overflow and so that a typo like `weight = 1000000` is caught.
pub(crate) const MAX_WEIGHT: u32 = 256;
/// `[pool.health] path`
pub(crate) const HEALTH_PATH: &str = "/readyz";
/// `[pool.health] expect_status`
pub(crate) const HEALTH_EXPECT_STATUS: [u16; 1] = [200];
/// `[pool.health] interval`
pub(crate) const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// `[pool.health] timeout`
pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// `[pool.health] rise`
pub(crate) const HEALTH_RISE: u32 = 2;
/// `[pool.health] fall`
pub(crate) const HEALTH_FALL: u32 = 3;
/// An idle timeout shorter than this cuts quiet watches: a warning.
pub(crate) const SHORT_IDLE: Duration = Duration::from_secs(300);
