//! apilb: a Layer-4 / TLS-passthrough load balancer for Kubernetes API servers.
//!
//! An accept loop hands each connection to a task that reads one immutable snapshot of its
//! listener's state, picks a backend, connects, and runs the copy loop; everything else only
//! ever publishes a new snapshot or reads counters. The hot path takes no lock, looks up no
//! configuration and allocates nothing per read.
//!
//! ```text
//!   apilb.toml ──config::load──▶ Config ──Gateway::start──▶ runtime: per listener
//!        ▲ reload::plan(deployed, new) ──▶ runtime::apply      ArcSwap<ListenerSnapshot>
//!        │                                                            │ (load_full per accept)
//!   client ──▶ listener::AcceptLoop ──spawn──▶ forward::serve ────────┘ (terminate::serve)
//!                 │ net::bind, max_connections  │ connect: balance::Pool::pick + retry
//!                 │ accept backoff              │ relay::relay_tcp (half-close, idle, drain)
//!                 ▼                             ▼
//!              metrics (atomics) ◀──── snapshot: one access-log line + counters at close
//!
//!   health::probe ──▶ Pool::observe ──▶ health::state (one atomic flag for the data path)
//!   shutdown future ─▶ shutdown::drain: stop accepting ─▶ ≤ longest drain_timeout ─▶ close rest
//!   phase::Lifecycle: Starting → Running ⇄ Reloading → Draining → Stopped (READY/RELOADING/STOPPING)
//! ```
//!
//! Threading: one multi-threaded tokio runtime whose worker count is `--threads` (default:
//! the number of cores). Every connection is one task; tokio's work-stealing spreads them
//! over the workers, and the copy loop is readiness-driven, so a worker only runs a
//! connection when one of its sockets has something to do. Each listening socket has one
//! accept task; accepting is cheap next to a connection's life, and new connections are
//! spawned onto the accepting worker, from where idle workers steal them. Relay buffers and
//! splice pipes come from per-worker pools (no lock), and per-connection counters are plain
//! fields summed into the shared metrics once, at close. Health checks, reloads and the admin
//! server are ordinary tasks on the same workers; what can block (reading and resolving the
//! config, polling its files, encoding `/metrics`) runs on the blocking pool, and the log is
//! written by a thread of its own. docs/architecture.md says why this model and not one
//! runtime per core.
//!
//! `demo` holds the throwaway PKI and the simulated kube-apiserver used by `apilb demo`,
//! the tests and the benchmarks.

mod admin;
mod balance;
mod budget;
mod close;
pub mod config;
mod connect;
pub mod demo;
mod forward;
mod gateway;
pub mod health;
mod http;
mod listener;
pub mod load;
mod metrics;
mod net;
mod phase;
pub mod probe;
mod proxy_protocol;
mod rebalance;
pub mod relay;
mod reload;
mod runtime;
mod sd_notify;
mod shutdown;
pub mod signals;
mod snapshot;
mod sni;
mod terminate;
pub mod tls;

pub use close::{End, Relayed};
pub use gateway::{BoundListener, Gateway, GatewayError, GatewayOptions, Handle};
pub use metrics::{count_log_drops, Metrics};
pub use phase::{Phase, ShutdownReport};
pub use reload::{ReloadError, ReloadSummary, Reloader};
pub use runtime::StartError;
