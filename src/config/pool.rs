//! `[[pool]]` and `[[pool.backend]]`: the choices, timeouts and attempts, and every backend
//! address resolved once (at load and at reload), unique within its pool.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::ops::Range;

use toml::Spanned;

use super::defaults;
use super::file::FilePool;
use super::types::{
    BackendConfig, Balance, CheckKind, PoolConfig, RebalanceConfig, SendProxy, WhenAllDown,
};
use super::validate::{port_hint, Validator};

impl Validator<'_> {
    /// Validates one pool; returns it with the span of its name (for duplicate checks).
    pub(super) fn pool(&mut self, i: usize, p: FilePool) -> Option<(PoolConfig, Range<usize>)> {
        let k = |key: &str| format!("pool[{i}].{key}");
        let name = p.name.get_ref().trim().to_string();
        if name.is_empty() {
            self.error(p.name.span(), k("name"), "expected a non-empty name");
        }
        self.scope = format!("pool/{name}");
        let balance = self.choice(p.balance.as_ref(), &k("balance"), Balance::LeastConn);
        let when_all_down = self.choice(
            p.when_all_down.as_ref(),
            &k("when_all_down"),
            WhenAllDown::FailOpen,
        );
        let connect_timeout = self.duration(
            p.connect_timeout.as_ref(),
            &k("connect_timeout"),
            defaults::CONNECT_TIMEOUT,
        );
        let drain_timeout = self.duration(
            p.drain_timeout.as_ref(),
            &k("drain_timeout"),
            defaults::DRAIN_TIMEOUT,
        );
        let attempts = self.int_in(
            p.connect_attempts.as_ref(),
            &k("connect_attempts"),
            1..=100,
            defaults::CONNECT_ATTEMPTS,
        );
        let connect_attempts = NonZeroU32::new(attempts).unwrap_or(NonZeroU32::MIN);
        // "0s" is the documented way to turn the ramp off.
        let slow_start = self.duration_or_off(
            p.slow_start.as_ref(),
            &k("slow_start"),
            defaults::SLOW_START,
        );
        let tls = p.tls.map(|t| self.pool_tls(i, t));
        let health = self.health(i, p.health, tls.as_ref());
        let tls = tls.flatten();

        if p.backend.is_empty() {
            self.error(
                p.name.span(),
                k("backend"),
                format!("pool {name:?} has no backends: expected at least one [[pool.backend]]"),
            );
        }
        let mut backends = Vec::new();
        let mut seen_addr = HashSet::new();
        let mut seen_name = HashSet::new();
        for (j, b) in p.backend.into_iter().enumerate() {
            let b = b.into_inner();
            let bk = |key: &str| format!("pool[{i}].backend[{j}].{key}");
            let address = b.address.get_ref().trim().to_string();
            let Some(addr) = self.resolve(&address, b.address.span(), &bk("address")) else {
                continue;
            };
            if !seen_addr.insert(addr) {
                self.error(
                    b.address.span(),
                    bk("address"),
                    format!("duplicate backend address {address:?} in pool {name:?}"),
                );
            }
            let bname = b
                .name
                .as_ref()
                .map(|n| n.get_ref().trim().to_string())
                .unwrap_or_else(|| address.clone());
            if !seen_name.insert(bname.clone()) {
                let span = b.name.as_ref().map_or(b.address.span(), Spanned::span);
                self.error(
                    span,
                    bk("name"),
                    format!("duplicate backend name {bname:?} in pool {name:?}"),
                );
            }
            let weight = self.int_in(
                b.weight.as_ref(),
                &bk("weight"),
                1..=i64::from(defaults::MAX_WEIGHT),
                defaults::WEIGHT,
            );
            backends.push(BackendConfig {
                name: bname,
                address,
                addr,
                weight,
            });
        }
        let send_proxy = p
            .send_proxy
            .as_ref()
            .map(|v| self.choice(Some(v), &k("send_proxy"), SendProxy::V2));
        if let (Some(v), Some(_)) = (&p.send_proxy, send_proxy) {
            if health.check == CheckKind::Https && health.path.starts_with("/readyz") {
                self.warn(v.span(), k("send_proxy"), format!(
                    "pool {name:?} sends PROXY headers but checks /readyz over https, as for apiservers: kube-apiserver does not accept PROXY headers and will fail every connection; send_proxy is for backends such as HAProxy or nginx with proxy_protocol"
                ));
            }
        }
        let rebalance = p.rebalance.map(|r| {
            let r = r.into_inner();
            let max_skew = match &r.max_skew {
                None => defaults::REBALANCE_MAX_SKEW,
                Some(v) if v.get_ref().is_finite() && (0.01..=10.0).contains(v.get_ref()) => *v.get_ref(),
                Some(v) => {
                    self.error(v.span(), k("rebalance.max_skew"), format!(
                        "expected a number from 0.01 to 10 (0.25: act when a backend holds 25% more than its fair share), not {}",
                        v.get_ref()
                    ));
                    defaults::REBALANCE_MAX_SKEW
                }
            };
            let rate = self.int_in(
                r.rate.as_ref(),
                &k("rebalance.rate"),
                1..=10_000,
                defaults::REBALANCE_RATE,
            );
            let min_age = self.duration_or_off(
                r.min_age.as_ref(),
                &k("rebalance.min_age"),
                defaults::REBALANCE_MIN_AGE,
            );
            RebalanceConfig {
                max_skew,
                rate,
                min_age,
            }
        });
        Some((
            PoolConfig {
                name,
                send_proxy,
                rebalance,
                balance,
                connect_timeout,
                connect_attempts,
                when_all_down,
                drain_timeout,
                slow_start,
                backends,
                health,
                tls,
            },
            p.name.span(),
        ))
    }

    /// Resolves `IP:port` or `host:port` once, at load (and reload) time.
    fn resolve(&mut self, s: &str, span: Range<usize>, key: &str) -> Option<SocketAddr> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                self.error(span, key, format!("invalid backend address {s:?}: port 0 cannot be connected to; expected 1 to 65535"));
                return None;
            }
            return Some(a);
        }
        if let Some(hint) = port_hint(s) {
            self.error(span, key, format!("invalid backend address {s:?}: {hint}"));
            return None;
        }
        match s.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => Some(a),
                None => {
                    self.error(
                        span,
                        key,
                        format!("cannot resolve {s:?}: no addresses found"),
                    );
                    None
                }
            },
            Err(e) => {
                self.error(
                    span,
                    key,
                    format!("cannot resolve {s:?}: {e}; expected IP:port or host:port"),
                );
                None
            }
        }
    }
}
