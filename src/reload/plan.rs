//! What a reload changes, decided on plain data before anything is touched.
//!
//! [`Deployed`] describes a gateway as names, addresses and numbers: what is running now
//! ([`crate::runtime::Running::deployed`]) or what a validated config asks for
//! ([`Deployed::of`]). [`plan`] compares two of them and returns a [`Plan`]: the sockets to
//! bind, keep and stop, the listeners added and removed, the limits that change, the backends
//! that appear, stay or go, and the certificates replaced. Applying it is the runtime's job;
//! the reload summary in the log is read off the plan. Identity rules (SPEC §3, Hot reload):
//! a socket is its configured address (for port 0, also its listener's name); a listener is
//! its name; a backend is its pool's name and its address, so a renamed backend is the same
//! backend and a readdressed one is a new one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::config::Config;

/// What identifies a socket across reloads: its configured address, and for port 0 (any free
/// port, so several listeners may say the same) also its listener's name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SocketKey {
    /// The configured address.
    pub(crate) addr: SocketAddr,
    /// The listener's name for port 0, else empty.
    pub(crate) port0_of: String,
}

impl SocketKey {
    pub(crate) fn new(addr: SocketAddr, listener: &str) -> Self {
        Self {
            addr,
            port0_of: if addr.port() == 0 {
                listener.to_string()
            } else {
                String::new()
            },
        }
    }
}

/// A gateway as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Deployed {
    /// Every listening socket and the listener it belongs to.
    pub(crate) sockets: BTreeMap<SocketKey, String>,
    /// Every listener and its `max_connections`.
    pub(crate) listeners: BTreeMap<String, u32>,
    /// Every pool and its backends' addresses, with the address as configured.
    pub(crate) pools: BTreeMap<String, BTreeMap<SocketAddr, String>>,
    /// Every certificate source and its notAfter (a changed date means a new certificate).
    pub(crate) certificates: BTreeMap<String, i64>,
}

impl Deployed {
    /// What `cfg` asks for.
    pub(crate) fn of(cfg: &Config) -> Self {
        let mut d = Self::default();
        for l in &cfg.listeners {
            for &a in &l.listen {
                d.sockets.insert(SocketKey::new(a, &l.name), l.name.clone());
            }
            d.listeners.insert(l.name.clone(), l.max_connections);
        }
        for p in &cfg.pools {
            let backends = p
                .backends
                .iter()
                .map(|b| (b.addr, b.address.clone()))
                .collect();
            d.pools.insert(p.name.clone(), backends);
        }
        for c in &cfg.certificates {
            d.certificates.insert(c.source.clone(), c.not_after);
        }
        d
    }
}

/// A backend as the plan names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BackendRef {
    /// Its pool.
    pub(crate) pool: String,
    /// Where it is.
    pub(crate) addr: SocketAddr,
    /// Its address as configured (for the log).
    pub(crate) address: String,
}

/// What changed in one reload, for the log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Listeners that appeared.
    pub listeners_added: Vec<String>,
    /// Listeners that went away.
    pub listeners_removed: Vec<String>,
    /// Addresses newly bound.
    pub addresses_added: Vec<SocketAddr>,
    /// Addresses no longer listened on.
    pub addresses_removed: Vec<SocketAddr>,
    /// `pool/address` of backends that appeared.
    pub backends_added: Vec<String>,
    /// `pool/address` of backends that went away.
    pub backends_removed: Vec<String>,
    /// Sources of certificates whose content changed.
    pub certificates_replaced: Vec<String>,
}

/// What one reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Sockets to bind, with their listener: a failure to bind any changes nothing.
    pub(crate) bind: Vec<(SocketKey, String)>,
    /// Sockets that stay open, with the listener they serve from now on.
    pub(crate) keep: Vec<(SocketKey, String)>,
    /// Sockets that stop accepting (their connections finish on their own).
    pub(crate) stop: Vec<SocketKey>,
    /// Listeners that appear.
    pub(crate) listeners_added: Vec<String>,
    /// Listeners that go: their connections get the longest `drain_timeout`.
    pub(crate) listeners_removed: Vec<String>,
    /// Listeners whose `max_connections` changes: (name, old, new).
    pub(crate) limits: Vec<(String, u32, u32)>,
    /// Backends that appear: they take traffic once a check passed.
    pub(crate) backends_added: Vec<BackendRef>,
    /// Backends that go: no new connections, open ones closed after `drain_timeout`.
    pub(crate) backends_removed: Vec<BackendRef>,
    /// Certificates whose content changed.
    pub(crate) certificates_replaced: Vec<String>,
}

impl Plan {
    /// Whether the plan changes nothing that is running (settings may still change).
    #[cfg(test)]
    pub(crate) fn is_quiet(&self) -> bool {
        self.bind.is_empty()
            && self.stop.is_empty()
            && self.listeners_added.is_empty()
            && self.listeners_removed.is_empty()
            && self.limits.is_empty()
            && self.backends_added.is_empty()
            && self.backends_removed.is_empty()
            && self.certificates_replaced.is_empty()
    }
}

/// Compares what runs with what is asked for. `current` is empty at start-up, so the first
/// plan binds everything and reports additions, which the caller does not log as changes.
pub(crate) fn plan(current: &Deployed, next: &Deployed) -> Plan {
    let mut p = Plan::default();
    for (key, listener) in &next.sockets {
        if current.sockets.contains_key(key) {
            p.keep.push((key.clone(), listener.clone()));
        } else {
            p.bind.push((key.clone(), listener.clone()));
        }
    }
    p.stop = current
        .sockets
        .keys()
        .filter(|k| !next.sockets.contains_key(*k))
        .cloned()
        .collect();
    for (name, &max) in &next.listeners {
        match current.listeners.get(name) {
            None => p.listeners_added.push(name.clone()),
            Some(&old) if old != max => p.limits.push((name.clone(), old, max)),
            Some(_) => {}
        }
    }
    p.listeners_removed = current
        .listeners
        .keys()
        .filter(|n| !next.listeners.contains_key(*n))
        .cloned()
        .collect();
    let empty = BTreeMap::new();
    let pools: BTreeSet<&String> = current.pools.keys().chain(next.pools.keys()).collect();
    for pool in pools {
        let old = current.pools.get(pool).unwrap_or(&empty);
        let new = next.pools.get(pool).unwrap_or(&empty);
        let refer = |(addr, address): (&SocketAddr, &String)| BackendRef {
            pool: pool.clone(),
            addr: *addr,
            address: address.clone(),
        };
        p.backends_added
            .extend(new.iter().filter(|(a, _)| !old.contains_key(*a)).map(refer));
        p.backends_removed
            .extend(old.iter().filter(|(a, _)| !new.contains_key(*a)).map(refer));
    }
    p.certificates_replaced = next
        .certificates
        .iter()
        .filter(|(source, after)| {
            current
                .certificates
                .get(*source)
                .is_some_and(|a| a != *after)
        })
        .map(|(source, _)| source.clone())
        .collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// A gateway from a compact description: listeners (name, addresses, max), pools
    /// (name, backend addresses), certificates (source, notAfter).
    fn deployed(
        listeners: &[(&str, &[&str], u32)],
        pools: &[(&str, &[&str])],
        certs: &[(&str, i64)],
    ) -> Deployed {
        let mut d = Deployed::default();
        for (name, addrs, max) in listeners {
            for a in *addrs {
                d.sockets
                    .insert(SocketKey::new(addr(a), name), (*name).to_string());
            }
            d.listeners.insert((*name).to_string(), *max);
        }
        for (name, backends) in pools {
            d.pools.insert(
                (*name).to_string(),
                backends
                    .iter()
                    .map(|b| (addr(b), (*b).to_string()))
                    .collect(),
            );
        }
        for (s, n) in certs {
            d.certificates.insert((*s).to_string(), *n);
        }
        d
    }

    const B1: &str = "10.0.0.1:6443";
    const B2: &str = "10.0.0.2:6443";

    #[test]
    fn the_same_config_changes_nothing() {
        let d = deployed(
            &[("l", &["0.0.0.0:6443"], 10)],
            &[("p", &[B1, B2])],
            &[("c", 1)],
        );
        let p = plan(&d, &d);
        assert!(p.is_quiet(), "{p:?}");
        assert_eq!(p.keep.len(), 1);
    }

    #[test]
    fn at_start_everything_is_bound() {
        let d = deployed(
            &[("a", &["0.0.0.0:6443", "[::]:6443"], 10)],
            &[("p", &[B1])],
            &[],
        );
        let p = plan(&Deployed::default(), &d);
        assert_eq!(p.bind.len(), 2);
        assert_eq!(p.listeners_added, ["a"]);
        assert!(p.stop.is_empty() && p.keep.is_empty());
    }

    #[test]
    fn port_zero_listeners_are_told_apart_by_name() {
        let old = deployed(
            &[("a", &["127.0.0.1:0"], 10), ("b", &["127.0.0.1:0"], 10)],
            &[],
            &[],
        );
        let new = deployed(
            &[("a", &["127.0.0.1:0"], 10), ("c", &["127.0.0.1:0"], 10)],
            &[],
            &[],
        );
        let p = plan(&old, &new);
        assert_eq!(p.keep.len(), 1, "a keeps its socket");
        assert_eq!(
            p.bind,
            [(SocketKey::new(addr("127.0.0.1:0"), "c"), "c".to_string())]
        );
        assert_eq!(p.stop, [SocketKey::new(addr("127.0.0.1:0"), "b")]);
        assert_eq!(
            (p.listeners_added, p.listeners_removed),
            (vec!["c".to_string()], vec!["b".to_string()])
        );
    }

    #[test]
    fn a_listener_moved_to_a_new_port_binds_the_new_one_before_stopping_the_old() {
        let old = deployed(&[("l", &["0.0.0.0:6443"], 10)], &[], &[]);
        let new = deployed(&[("l", &["0.0.0.0:7443"], 10)], &[], &[]);
        let p = plan(&old, &new);
        assert_eq!(p.bind.len(), 1);
        assert_eq!(p.bind[0].0.addr.port(), 7443);
        assert_eq!(p.stop[0].addr.port(), 6443);
        assert!(p.listeners_added.is_empty() && p.listeners_removed.is_empty());
    }

    #[test]
    fn an_address_moved_between_listeners_keeps_its_socket() {
        let old = deployed(&[("a", &["0.0.0.0:6443"], 10)], &[], &[]);
        let new = deployed(&[("b", &["0.0.0.0:6443"], 10)], &[], &[]);
        let p = plan(&old, &new);
        assert_eq!(
            p.keep,
            [(SocketKey::new(addr("0.0.0.0:6443"), "b"), "b".to_string())]
        );
        assert!(p.bind.is_empty() && p.stop.is_empty());
    }

    #[test]
    fn a_renamed_backend_is_kept_and_a_readdressed_one_replaced() {
        let old = deployed(&[], &[("p", &[B1, B2])], &[]);
        // Renaming does not show here at all: names are not part of a backend's identity.
        let renamed = deployed(&[], &[("p", &[B1, B2])], &[]);
        assert!(plan(&old, &renamed).is_quiet());
        let readdressed = deployed(&[], &[("p", &[B1, "10.0.0.3:6443"])], &[]);
        let p = plan(&old, &readdressed);
        assert_eq!(p.backends_removed.len(), 1);
        assert_eq!(p.backends_removed[0].addr, addr(B2));
        assert_eq!(p.backends_added[0].addr, addr("10.0.0.3:6443"));
    }

    #[test]
    fn a_removed_pool_removes_its_backends() {
        let old = deployed(&[], &[("p", &[B1]), ("q", &[B2])], &[]);
        let new = deployed(&[], &[("p", &[B1])], &[]);
        let p = plan(&old, &new);
        assert_eq!(p.backends_removed.len(), 1);
        assert_eq!(p.backends_removed[0].pool, "q");
    }

    #[test]
    fn lowering_max_connections_is_a_limit_change() {
        let old = deployed(&[("l", &["0.0.0.0:6443"], 100)], &[], &[]);
        let new = deployed(&[("l", &["0.0.0.0:6443"], 10)], &[], &[]);
        assert_eq!(plan(&old, &new).limits, [("l".to_string(), 100, 10)]);
    }

    #[test]
    fn replaced_certificates_are_named_and_new_ones_are_not() {
        let old = deployed(&[], &[], &[("listener/l/cert", 100), ("pool/p/ca/0", 5)]);
        let new = deployed(
            &[],
            &[],
            &[
                ("listener/l/cert", 200),
                ("pool/p/ca/0", 5),
                ("pool/p/ca/1", 9),
            ],
        );
        assert_eq!(plan(&old, &new).certificates_replaced, ["listener/l/cert"]);
    }

    #[test]
    fn a_listener_removed_while_connections_are_open_stops_accepting_and_drains() {
        let old = deployed(
            &[("a", &["0.0.0.0:6443"], 10), ("b", &["0.0.0.0:443"], 10)],
            &[],
            &[],
        );
        let new = deployed(&[("a", &["0.0.0.0:6443"], 10)], &[], &[]);
        let p = plan(&old, &new);
        assert_eq!(p.listeners_removed, ["b"]);
        assert_eq!(p.stop, [SocketKey::new(addr("0.0.0.0:443"), "b")]);
    }
}
