use std::time::Duration;

use super::types::Choice;
use super::validate::line_col;
use super::*;

const GOOD: &str = r#"
[admin]
listen = "127.0.0.1:9090"

[[pool]]
name = "apiservers"
balance = "round-robin"
connect_timeout = "500ms"
connect_attempts = 2
when_all_down = "reject"
drain_timeout = "10s"
  [[pool.backend]]
  address = "127.0.0.1:6443"
  name = "control0"
  weight = 3
  [[pool.backend]]
  address = "localhost:6444"

[[listener]]
name = "passthrough"
listen = ["127.0.0.1:6443", "[::1]:6443"]
pool = "apiservers"
idle_timeout = "2h"
max_connections = 10
"#;

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(Path::new("t.toml"), text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.0,
    }
}

/// The single error of `text`, which must be on `line` and mention `needle`.
fn one_error(text: &str, line: usize, key: &str, needle: &str) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = &errs[0];
    assert_eq!(e.line, Some(line), "{e}");
    assert!(
        e.key.contains(key) || e.message.contains(key),
        "key {key:?} not named in {e}"
    );
    assert!(e.message.contains(needle), "{needle:?} not in {e}");
    assert!(e.to_string().starts_with(&format!("t.toml:{line}:")), "{e}");
}

#[test]
fn good_config_is_typed_with_defaults_applied() {
    let c = parse(Path::new("t.toml"), GOOD).expect("valid");
    assert_eq!(
        c.admin,
        Some(AdminConfig {
            listen: "127.0.0.1:9090".parse().expect("addr"),
            shutdown_grace: Duration::ZERO,
        })
    );
    let p = &c.pools[0];
    assert_eq!(p.balance, Balance::RoundRobin);
    assert_eq!(p.connect_timeout, Duration::from_millis(500));
    assert_eq!(p.connect_attempts.get(), 2);
    assert_eq!(p.when_all_down, WhenAllDown::Reject);
    assert_eq!(p.backends[0].weight, 3);
    assert_eq!(p.backends[1].name, "localhost:6444");
    assert_eq!(p.backends[1].addr.port(), 6444);
    let l = &c.listeners[0];
    assert_eq!(l.listen.len(), 2);
    assert!(l.listen[1].is_ipv6());
    assert_eq!(l.idle_timeout, Duration::from_secs(7200));
    assert_eq!(l.mode, Mode::Passthrough);
}

#[test]
fn defaults_follow_the_spec() {
    let c = parse(
        Path::new("t.toml"),
        "[[pool]]\nname='p'\n[[pool.backend]]\naddress='127.0.0.1:1'\n[[listener]]\nname='l'\nlisten='127.0.0.1:0'\npool='p'\n",
    )
    .expect("valid");
    let p = &c.pools[0];
    assert_eq!(
        (
            p.balance,
            p.connect_timeout,
            p.connect_attempts.get(),
            p.when_all_down,
            p.drain_timeout
        ),
        (
            Balance::LeastConn,
            Duration::from_secs(2),
            3,
            WhenAllDown::FailOpen,
            Duration::from_secs(30)
        )
    );
    let l = &c.listeners[0];
    assert_eq!(
        (l.idle_timeout, l.max_connections),
        (Duration::from_secs(3600), 50_000)
    );
}

#[test]
fn syntax_error_names_the_line() {
    one_error(
        &GOOD.replace("balance = \"round-robin\"", "balance = round-robin"),
        7,
        "",
        "",
    );
}

#[test]
fn unknown_key_is_rejected_with_its_name() {
    one_error(
        &GOOD.replace(
            "drain_timeout = \"10s\"",
            "drain_timeout = \"10s\"\nretries = 2",
        ),
        12,
        "retries",
        "unknown field",
    );
}

#[test]
fn unknown_pool_is_named() {
    one_error(
        &GOOD.replace("pool = \"apiservers\"", "pool = \"apiserver\""),
        22,
        "listener[0].pool",
        "unknown pool \"apiserver\"",
    );
}

#[test]
fn duplicate_names_are_rejected() {
    let text = format!("{GOOD}\n[[listener]]\nname = \"passthrough\"\nlisten = \"127.0.0.1:7000\"\npool = \"apiservers\"\n");
    one_error(&text, 27, "listener[1].name", "duplicate listener name");
    let text = GOOD.replace(
        "  address = \"localhost:6444\"",
        "  address = \"localhost:6444\"\n  name = \"control0\"",
    );
    one_error(&text, 18, "backend[1].name", "duplicate backend name");
}

#[test]
fn duplicate_listen_addresses_are_rejected() {
    let text = format!("{GOOD}\n[[listener]]\nname = \"second\"\nlisten = \"127.0.0.1:6443\"\npool = \"apiservers\"\n");
    one_error(
        &text,
        28,
        "listener[1].listen",
        "already used by \"passthrough\"",
    );
    let text = GOOD.replace("127.0.0.1:9090", "127.0.0.1:6443");
    one_error(&text, 21, "listener[0].listen", "already used by \"admin\"");
}

#[test]
fn bad_duration_explains_the_format() {
    one_error(
        &GOOD.replace("\"500ms\"", "\"500\""),
        8,
        "pool[0].connect_timeout",
        "like \"500ms\"",
    );
    one_error(
        &GOOD.replace("\"2h\"", "\"0s\""),
        23,
        "listener[0].idle_timeout",
        "above zero",
    );
}

#[test]
fn zero_attempts_is_out_of_range() {
    one_error(
        &GOOD.replace("connect_attempts = 2", "connect_attempts = 0"),
        9,
        "pool[0].connect_attempts",
        "expected 1 to 100",
    );
}

#[test]
fn empty_backends_are_rejected() {
    let text = "[[pool]]\nname = \"p\"\n[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\npool = \"p\"\n";
    one_error(text, 2, "pool[0].backend", "no backends");
}

#[test]
fn unresolvable_host_is_reported() {
    one_error(
        &GOOD.replace("localhost:6444", "no-such-host.invalid:6444"),
        17,
        "backend[1].address",
        "cannot resolve",
    );
}

#[test]
fn port_out_of_range_is_reported() {
    one_error(
        &GOOD.replace("127.0.0.1:6443\"\n  name", "127.0.0.1:70000\"\n  name"),
        13,
        "backend[0].address",
        "port out of range",
    );
    one_error(
        &GOOD.replace("[::1]:6443", "[::1]:99999"),
        21,
        "listener[0].listen",
        "port out of range",
    );
}

#[test]
fn health_settings_are_validated() {
    let with = |health: &str| {
        GOOD.replace(
            "drain_timeout = \"10s\"",
            &format!("drain_timeout = \"10s\"\n  [pool.health]\n{health}"),
        )
    };
    let errs = errors(&with("  check = \"https\""));
    assert!(
        errs.iter()
            .any(|e| e.key == "pool[0].health.check" && e.message.contains("needs [pool.tls]")),
        "{errs:#?}"
    );
    let errs = errors(&with("  interval = \"1s\"\n  timeout = \"1s\""));
    assert!(
        errs.iter()
            .any(|e| e.key == "pool[0].health.timeout"
                && e.message.contains("shorter than interval")),
        "{errs:#?}"
    );
    let errs = errors(&with("  rise = 0"));
    assert!(
        errs.iter().any(|e| e.key == "pool[0].health.rise"),
        "{errs:#?}"
    );
    let errs = errors(&with("  check = \"icmp\""));
    assert!(
        errs.iter()
            .any(|e| e.message.contains("unknown check \"icmp\"")),
        "{errs:#?}"
    );
    let c = parse(
        Path::new("t.toml"),
        &with("  interval = \"5s\"\n  fall = 1"),
    )
    .expect("valid");
    assert_eq!(
        (
            c.pools[0].health.interval,
            c.pools[0].health.fall,
            c.pools[0].health.rise
        ),
        (Duration::from_secs(5), 1, 2)
    );
}

#[test]
fn pool_tls_files_must_exist() {
    let text = GOOD.replace(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"10s\"\n  [pool.tls]\n  ca = \"/nonexistent/ca.pem\"",
    );
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.key == "pool[0].tls.ca"
                && e.message.contains("cannot read /nonexistent/ca.pem")),
        "{errs:#?}"
    );
}

#[test]
fn slow_start_takes_a_duration_and_zero_turns_it_off() {
    let with = |v: &str| {
        GOOD.replace(
            "drain_timeout = \"10s\"",
            &format!("drain_timeout = \"10s\"\nslow_start = \"{v}\""),
        )
    };
    let c = parse(Path::new("t.toml"), &with("30s")).expect("valid");
    assert_eq!(c.pools[0].slow_start, Duration::from_secs(30));
    let c = parse(Path::new("t.toml"), &with("0s")).expect("valid");
    assert!(c.pools[0].slow_start.is_zero());
    let errs = errors(&with("soon"));
    assert!(
        errs.iter().any(|e| e.key == "pool[0].slow_start"),
        "{errs:#?}"
    );
}

#[test]
fn terminate_listeners_need_certificates_and_a_verified_pool() {
    let text = GOOD.replace(
        "max_connections = 10",
        "max_connections = 10\nmode = \"terminate\"",
    );
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.key == "listener[0].tls" && e.message.contains("needs [listener.tls]")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.key == "listener[0].pool" && e.message.contains("needs [pool.tls]")),
        "{errs:#?}"
    );
    let text = GOOD.replace(
        "max_connections = 10",
        "max_connections = 10\n[listener.tls]\ncert = \"a\"\nkey = \"b\"",
    );
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.key == "listener[0].tls"
                && e.message.contains("only for mode = \"terminate\"")),
        "{errs:#?}"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = GOOD
        .replace("connect_attempts = 2", "connect_attempts = 0")
        .replace("\"2h\"", "\"forever\"")
        .replace("balance = \"round-robin\"", "balance = \"fastest\"");
    assert_eq!(errors(&text).len(), 3);
}

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("ab\ncd", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
}

#[test]
fn durations_beyond_ten_years_are_refused_at_load() {
    // Added to an Instant on every connection, this used to overflow in the data path.
    let text = GOOD.replace("idle_timeout = \"2h\"", "idle_timeout = \"300000000000y\"");
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.key == "listener[0].idle_timeout" && e.message.contains("too long")),
        "{errs:#?}"
    );
}

#[test]
fn a_health_path_must_be_a_request_path() {
    let text = GOOD.replace(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"10s\"\n  [pool.health]\n  path = \"/ready z\"",
    );
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.key == "pool[0].health.path" && e.message.contains("percent-encoded")),
        "{errs:#?}"
    );
}

#[test]
fn every_choice_lists_its_values_when_misspelt() {
    for (from, to, needle) in [
        ("balance = \"round-robin\"", "balance = \"fastest\"", "unknown balance \"fastest\": expected \"least-conn\", \"round-robin\" or \"random-two\""),
        ("when_all_down = \"reject\"", "when_all_down = \"panic\"", "unknown value \"panic\": expected \"fail-open\" or \"reject\""),
        ("max_connections = 10", "max_connections = 10\nmode = \"proxy\"", "unknown mode \"proxy\": expected \"passthrough\" or \"terminate\""),
    ] {
        let errs = errors(&GOOD.replace(from, to));
        assert!(errs.iter().any(|e| e.message == needle), "{needle}: {errs:#?}");
    }
    for (name, value) in Balance::CHOICES {
        assert_eq!(value.as_str(), *name);
    }
}

#[test]
fn the_config_hash_is_a_stable_digest_of_the_text() {
    let a = parse(Path::new("t.toml"), GOOD).expect("valid");
    let b = parse(Path::new("other.toml"), GOOD).expect("valid");
    assert_eq!(a.hash, b.hash);
    assert_eq!(a.hash.len(), 16);
    // The SHA-256 of the text: the same value on every build and toolchain.
    let d = ring::digest::digest(&ring::digest::SHA256, GOOD.as_bytes());
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(a.hash, hex);
    let c = parse(Path::new("t.toml"), &GOOD.replace("2h", "3h")).expect("valid");
    assert_ne!(a.hash, c.hash);
}

#[test]
fn a_health_client_cert_with_a_tcp_check_is_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = crate::demo::pki::Pki::generate().expect("pki");
    let files = pki.write_to(dir.path()).expect("write");
    let text = GOOD.replace(
        "drain_timeout = \"10s\"",
        &format!(
            "drain_timeout = \"10s\"\n  [pool.health]\n  check = \"tcp\"\n  client_cert = \"{}\"\n  client_key = \"{}\"",
            files.admin_cert.display(),
            files.admin_key.display()
        ),
    );
    let c = parse(Path::new("t.toml"), &text).expect("a warning, not an error");
    assert!(
        c.warnings
            .iter()
            .any(|w| w.key == "pool[0].health.client_cert" && w.message.contains("unused")),
        "{:#?}",
        c.warnings
    );
}

/// Round-2 hardening, item 7: a FIFO named by the config used to hang the load (and with it
/// a reload and shutdown); a huge file was read whole.
#[test]
fn only_regular_files_of_bounded_size_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("ca.pem");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo (coreutils)");
    assert!(made.success());
    let huge = dir.path().join("huge.pem");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(5 << 20))
        .expect("sparse file");
    for (path, needle) in [(&fifo, "not a regular file"), (&huge, "larger than")] {
        let text = GOOD.replace(
            "drain_timeout = \"10s\"",
            &format!(
                "drain_timeout = \"10s\"\n  [pool.tls]\n  ca = \"{}\"",
                path.display()
            ),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(parse(Path::new("t.toml"), &text).map(|_| ()));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the load returned instead of hanging");
        let errs = result.expect_err("refused").0;
        assert!(
            errs.iter()
                .any(|e| e.key == "pool[0].tls.ca" && e.message.contains(needle)),
            "{errs:#?}"
        );
    }
    let errs = load(&fifo).expect_err("a FIFO as the config").0;
    assert!(errs[0].message.contains("not a regular file"), "{errs:#?}");
}

#[test]
fn shutdown_grace_and_first_byte_timeout_take_durations_and_zero() {
    let text = GOOD
        .replace(
            "listen = \"127.0.0.1:9090\"",
            "listen = \"127.0.0.1:9090\"\nshutdown_grace = \"6s\"",
        )
        .replace(
            "max_connections = 10",
            "max_connections = 10\nfirst_byte_timeout = \"0s\"",
        );
    let c = parse(Path::new("t.toml"), &text).expect("valid");
    assert_eq!(
        c.admin.expect("admin").shutdown_grace,
        Duration::from_secs(6)
    );
    assert!(c.listeners[0].first_byte_timeout.is_zero());
    let c = parse(Path::new("t.toml"), GOOD).expect("valid");
    assert_eq!(c.listeners[0].first_byte_timeout, Duration::from_secs(10));
    let errs = errors(&GOOD.replace(
        "max_connections = 10",
        "max_connections = 10\nfirst_byte_timeout = \"soon\"",
    ));
    assert!(
        errs.iter()
            .any(|e| e.key == "listener[0].first_byte_timeout"),
        "{errs:#?}"
    );
}

const ROUTED: &str = r#"
[[pool]]
name = "a"
  [[pool.backend]]
  address = "127.0.0.1:1"
[[pool]]
name = "b"
  [[pool.backend]]
  address = "127.0.0.1:2"
[[listener]]
name = "clusters"
listen = "127.0.0.1:6443"
"#;

#[test]
fn routes_are_typed_lower_cased_and_feed_the_names_of_their_pools() {
    let text = format!(
        "{ROUTED}pool = \"a\"\nproxy_protocol = true\nsni_timeout = \"2s\"\n\
         [[listener.route]]\nsni = [\"Lab-B.Example.com.\", \"*.lab-b.example.com\"]\npool = \"b\"\n"
    );
    let c = parse(Path::new("t.toml"), &text).expect("valid");
    let l = &c.listeners[0];
    assert_eq!(l.pool.as_deref(), Some("a"));
    assert!(l.proxy_protocol);
    assert_eq!(l.sni_timeout, Duration::from_secs(2));
    assert_eq!(
        l.routes,
        vec![RouteConfig {
            sni: vec!["lab-b.example.com".into(), "*.lab-b.example.com".into()],
            pool: "b".into()
        }]
    );
    assert_eq!(l.pools().collect::<Vec<_>>(), ["a", "b"]);
    // The exact route name is a name lab-b's certificates must cover (SPEC §8); the
    // wildcard is not a name.
    assert_eq!(c.passthrough_names("b"), ["lab-b.example.com"]);
    // Without routes or proxy_protocol the defaults apply.
    let c = parse(Path::new("t.toml"), GOOD).expect("valid");
    assert_eq!(c.listeners[0].sni_timeout, Duration::from_secs(5));
    assert!(!c.listeners[0].proxy_protocol && c.listeners[0].routes.is_empty());
}

#[test]
fn route_mistakes_are_errors_with_their_line() {
    let route = |sni: &str, pool: &str| {
        format!("{ROUTED}pool = \"a\"\n[[listener.route]]\nsni = {sni}\npool = \"{pool}\"\n")
    };
    one_error(
        &route("[\"b.example\"]", "nope"),
        16,
        "route[0].pool",
        "unknown pool",
    );
    one_error(&route("[]", "b"), 15, "route[0].sni", "at least one name");
    one_error(
        &route("[\"*.com\"]", "b"),
        15,
        "route[0].sni",
        "not a DNS name",
    );
    one_error(
        &route("[\"a.*.example\"]", "b"),
        15,
        "route[0].sni",
        "not a DNS name",
    );
    one_error(
        &route("[\"10.0.0.1\"]", "b"),
        15,
        "route[0].sni",
        "not a DNS name",
    );
    one_error(
        &route("[\"b.example\", \"B.example\"]", "b"),
        15,
        "route[0].sni",
        "earlier route",
    );
    let two = format!(
        "{}[[listener.route]]\nsni = [\"b.example\"]\npool = \"a\"\n",
        route("[\"b.example\"]", "b")
    );
    one_error(&two, 18, "route[1].sni", "earlier route");
    // Neither a default pool nor routes.
    one_error(ROUTED, 11, "listener[0].pool", "expected pool");
    one_error(
        &format!("{ROUTED}pool = \"a\"\nsni_timeout = \"0s\"\nproxy_protocol = true\n"),
        14,
        "sni_timeout",
        "above zero",
    );
}

#[test]
fn a_terminate_route_needs_a_pool_with_tls() {
    let fx = crate::demo::pki::Pki::generate().expect("pki");
    let dir = tempfile::tempdir().expect("dir");
    let files = fx.write_to(dir.path()).expect("write");
    let text = format!(
        "[[pool]]\nname = \"a\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[pool.tls]\nca = \"{}\"\n\
         [[pool]]\nname = \"b\"\n[[pool.backend]]\naddress = \"127.0.0.1:2\"\n\
         [[listener]]\nname = \"t\"\nlisten = \"127.0.0.1:8443\"\nmode = \"terminate\"\npool = \"a\"\n\
         [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[listener.route]]\nsni = [\"b.example\"]\npool = \"b\"\n",
        files.ca.display(),
        files.public_cert.display(),
        files.public_key.display()
    );
    one_error(&text, 21, "route[0].pool", "needs [pool.tls]");
}

#[test]
fn send_proxy_is_typed_and_warned_about_in_front_of_apiservers() {
    let text = "[[pool]]\nname = \"p\"\nsend_proxy = \"v2\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n\
                [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1234\"\npool = \"p\"\n";
    let c = parse(Path::new("t.toml"), text).expect("valid");
    assert_eq!(c.pools[0].send_proxy, Some(SendProxy::V2));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    one_error(&text.replace("\"v2\"", "\"v3\""), 3, "send_proxy", "\"v1\"");
}

#[test]
fn rebalance_is_typed_with_defaults_and_checked_for_range() {
    let base =
        "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[pool.rebalance]\n";
    let tail = "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1234\"\npool = \"p\"\n";
    let c = parse(Path::new("t.toml"), &format!("{base}{tail}")).expect("valid");
    assert_eq!(
        c.pools[0].rebalance,
        Some(RebalanceConfig {
            max_skew: 0.25,
            rate: 10,
            min_age: Duration::from_secs(120)
        })
    );
    let c = parse(
        Path::new("t.toml"),
        &format!("{base}max_skew = 1\nrate = 50\nmin_age = \"0s\"\n{tail}"),
    )
    .expect("valid");
    let r = c.pools[0].rebalance.expect("rebalance");
    assert_eq!((r.max_skew, r.rate, r.min_age), (1.0, 50, Duration::ZERO));
    assert!(parse(Path::new("t.toml"), GOOD).expect("valid").pools[0]
        .rebalance
        .is_none());
    one_error(
        &format!("{base}max_skew = 0\n{tail}"),
        6,
        "rebalance.max_skew",
        "0.01 to 10",
    );
    one_error(
        &format!("{base}max_skew = nan\n{tail}"),
        6,
        "rebalance.max_skew",
        "0.01 to 10",
    );
    one_error(&format!("{base}rate = 0\n{tail}"), 6, "rebalance.rate", "");
    one_error(
        &format!("{base}min_age = \"soon\"\n{tail}"),
        6,
        "rebalance.min_age",
        "",
    );
    one_error(&format!("{base}every = \"1s\"\n{tail}"), 6, "", "every");
}

/// A terminate listener over a pool with TLS, `tls_extra` in `[listener.tls]` and `tail`
/// after it, from a fresh PKI in `dir`.
fn identity_text(files: &crate::demo::pki::PkiFiles, tls_extra: &str, tail: &str) -> String {
    format!(
        "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n[pool.tls]\nca = \"{ca}\"\n\
         [[listener]]\nname = \"public\"\nlisten = \"127.0.0.1:8443\"\nmode = \"terminate\"\npool = \"p\"\n\
         [listener.tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n{tls_extra}\n{tail}",
        ca = files.ca.display(),
        cert = files.public_cert.display(),
        key = files.public_key.display(),
    )
}

#[test]
fn identity_mode_is_validated_as_spec_10_says() {
    let pki = crate::demo::pki::Pki::generate().expect("pki");
    let dir = tempfile::tempdir().expect("dir");
    let f = pki.write_to(dir.path()).expect("write");
    let ca = f.ca.display().to_string();
    // A front-proxy client certificate from a CA of its own: valid, with kubeadm's headers.
    let fp = crate::demo::pki::Ca::new("front-proxy-ca").expect("ca");
    let fp_client = fp.client("front-proxy-client", &[]).expect("cert");
    let fp_cert = dir.path().join("fp.crt");
    let fp_key = dir.path().join("fp.key");
    std::fs::write(&fp_cert, &fp_client.cert_pem).expect("write");
    std::fs::write(&fp_key, &fp_client.key_pem).expect("write");
    let identity = |cert: &Path, key: &Path| {
        format!(
            "[listener.identity]\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    let good = identity_text(
        &f,
        &format!("client_ca = \"{ca}\""),
        &identity(&fp_cert, &fp_key),
    );
    let c = parse(Path::new("t.toml"), &good).expect("valid");
    let l = &c.listeners[0];
    let id = l.identity.as_ref().expect("identity");
    assert_eq!(
        (
            id.user_header.as_str(),
            id.group_header.as_str(),
            id.extra_header_prefix.as_str()
        ),
        ("X-Remote-User", "X-Remote-Group", "X-Remote-Extra-")
    );
    let tls = l.tls.as_ref().expect("tls");
    assert!(tls.client_ca.is_some() && !tls.require_client_cert);

    // The gateway's identity issued by a CA of client_ca: an error naming file and line.
    let bad = identity_text(
        &f,
        &format!("client_ca = \"{ca}\""),
        &identity(&f.admin_cert, &f.admin_key),
    );
    one_error(
        &bad,
        17,
        "identity.client_cert",
        "issued by a CA in client_ca",
    );
    // Identity on a passthrough listener.
    let pass = format!(
        "[[pool]]\nname = \"p\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n\
         [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:6443\"\npool = \"p\"\n{}",
        identity(&fp_cert, &fp_key)
    );
    one_error(&pass, 9, "listener[0].identity", "mode = \"terminate\"");
    // require_client_cert without a bundle to verify against.
    one_error(
        &identity_text(&f, "require_client_cert = true", ""),
        15,
        "require_client_cert",
        "needs client_ca",
    );
    // Header names.
    one_error(
        &identity_text(
            &f,
            "",
            &format!(
                "{}user_header = \"X Remote\"\n",
                identity(&fp_cert, &fp_key)
            ),
        ),
        19,
        "identity.user_header",
        "not an HTTP header name",
    );
}
