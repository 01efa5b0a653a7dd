//! The systemd notify protocol: READY, RELOADING, STOPPING, STATUS and WATCHDOG messages over
//! `$NOTIFY_SOCKET`, with std's unix datagram socket.
//!
//! Every function is a no-op when `NOTIFY_SOCKET` is unset, so the library calls them
//! unconditionally. Send failures are logged at debug and otherwise ignored: the service
//! manager going away must not take the gateway with it. The watchdog is fed from a task on
//! the runtime itself, so a wedged runtime stops feeding it and systemd restarts the process.

use std::sync::OnceLock;
use std::time::Duration;

#[cfg(unix)]
use std::os::unix::net::UnixDatagram;

struct Target {
    #[cfg(unix)]
    socket: UnixDatagram,
    path: String,
}

fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let path = std::env::var("NOTIFY_SOCKET").ok().filter(|p| !p.is_empty())?;
            #[cfg(unix)]
            {
                match UnixDatagram::unbound() {
                    Ok(socket) => Some(Target { socket, path }),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot create the notify socket; systemd will not hear from apilb");
                        None
                    }
                }
            }
            #[cfg(not(unix))]
            {
                let _ = path;
                None
            }
        })
        .as_ref()
}

/// Sends one message (lines `KEY=value`); a no-op without `NOTIFY_SOCKET`.
pub(crate) fn notify(message: &str) {
    let Some(t) = target() else { return };
    #[cfg(unix)]
    {
        let result = match t.path.strip_prefix('@') {
            // An abstract socket name (Linux).
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                    .and_then(|addr| t.socket.send_to_addr(message.as_bytes(), &addr))
            }
            _ => t.socket.send_to(message.as_bytes(), &t.path),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, socket = %t.path, "notify message not sent");
        }
    }
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it.
fn monotonic_usec() -> u128 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u128::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u128::try_from(ts.tv_nsec).unwrap_or(0) / 1_000
}

/// Every listener is bound and serving.
pub(crate) fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// A reload starts.
pub(crate) fn reloading() {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

/// Shutdown starts.
pub(crate) fn stopping() {
    notify("STOPPING=1\nSTATUS=draining connections");
}

/// The interval at which to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set for
/// this process.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    target()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    half_of(&std::env::var("WATCHDOG_USEC").ok()?)
}

/// Half of a `WATCHDOG_USEC` value, never below a millisecond: a timer of zero would panic,
/// and a value that small is a misconfiguration to survive, not to crash on.
fn half_of(usec: &str) -> Option<Duration> {
    let usec: u64 = usec.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Feeds the watchdog every `every` for as long as the runtime runs this task.
pub(crate) async fn watchdog(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notify("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_values_from_the_environment_never_make_a_zero_timer() {
        assert_eq!(half_of("1"), Some(Duration::from_millis(1)));
        assert_eq!(half_of("0"), None);
        assert_eq!(half_of("nonsense"), None);
        assert_eq!(half_of("-5"), None);
        assert_eq!(half_of("30000000"), Some(Duration::from_secs(15)));
        assert_eq!(
            half_of("18446744073709551615").map(|d| d > Duration::ZERO),
            Some(true)
        );
    }
}
