//! Property tests of what the gateway reads from files: the config loader and PEM loading.
//! Whatever the bytes (random, mutated from a valid config, truncated, huge), the answer is a
//! config or a list of errors, never a panic.
//!
//! CI runs the default case count; a long run is `PROPTEST_CASES=100000 cargo test --release
//! --test properties`.

mod common;

use std::path::Path;

use proptest::prelude::*;

/// A valid config that touches every section (no files, so every mutation is judged by the
/// parser and validator alone).
const VALID: &str = r#"
[admin]
listen = "127.0.0.1:9090"
shutdown_grace = "5s"

[global]
max_connections = 1000

[[pool]]
name = "apiservers"
balance = "round-robin"
connect_timeout = "500ms"
connect_attempts = 2
when_all_down = "reject"
drain_timeout = "10s"
slow_start = "30s"
  [[pool.backend]]
  address = "127.0.0.1:6443"
  name = "a"
  weight = 2
  [[pool.backend]]
  address = "[::1]:6443"
  [pool.health]
  check = "tcp"
  interval = "2s"
  timeout = "1s"
  rise = 2
  fall = 3

[[listener]]
name = "passthrough"
listen = ["127.0.0.1:6443", "[::1]:6443"]
pool = "apiservers"
idle_timeout = "2h"
first_byte_timeout = "10s"
max_connections = 10
log_empty = false
"#;

fn parse(text: &str) {
    // Either outcome is fine; a panic fails the property.
    let _ = apilb::config::parse(Path::new("p.toml"), text);
}

/// One edit of a text: delete, insert, duplicate or replace a span.
#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    Duplicate(usize, usize),
    Replace(usize, usize, String),
}

fn apply(text: &str, edit: &Edit) -> String {
    let b = text.as_bytes();
    let clamp = |i: usize| i % (b.len() + 1);
    let span = |a: usize, n: usize| {
        let s = clamp(a);
        (s, (s + n % 64).min(b.len()))
    };
    let mut out: Vec<u8> = match edit {
        Edit::Delete(a, n) => {
            let (s, e) = span(*a, *n);
            [&b[..s], &b[e..]].concat()
        }
        Edit::Insert(a, t) => {
            let s = clamp(*a);
            [&b[..s], t.as_bytes(), &b[s..]].concat()
        }
        Edit::Duplicate(a, n) => {
            let (s, e) = span(*a, *n);
            [&b[..e], &b[s..e], &b[e..]].concat()
        }
        Edit::Replace(a, n, t) => {
            let (s, e) = span(*a, *n);
            [&b[..s], t.as_bytes(), &b[e..]].concat()
        }
    };
    // The loader takes text; invalid UTF-8 is the reader's error, not the parser's.
    out.retain(|c| c.is_ascii());
    String::from_utf8(out).unwrap_or_default()
}

/// Fragments that reach deep into validation when spliced in: values at and past the bounds,
/// unit-less and huge durations, odd addresses and names.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"0s\"".to_string()),
        Just("\"300000000000y\"".to_string()),
        Just("\"18446744073709551615ns\"".to_string()),
        Just("-1".to_string()),
        Just("9223372036854775807".to_string()),
        Just("\"[::]:0\"".to_string()),
        Just("\"localhost:99999\"".to_string()),
        Just("\"256.1.1.1:1\"".to_string()),
        Just("\"\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\n[[listener]]\n".to_string()),
        Just("\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n".to_string()),
        Just("\nmode = \"terminate\"\n".to_string()),
        Just("\ncheck = \"https\"\npath = \"/ready z\"\n".to_string()),
        "[ -~]{0,40}",
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), fragment()).prop_map(|(a, t)| Edit::Insert(a, t)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, n)| Edit::Duplicate(a, n)),
        (any::<usize>(), any::<usize>(), fragment()).prop_map(|(a, n, t)| Edit::Replace(a, n, t)),
    ]
}

proptest! {
    #[test]
    fn mutated_configs_give_a_config_or_errors(edits in prop::collection::vec(edit(), 1..8)) {
        let mut text = VALID.to_string();
        for e in &edits {
            text = apply(&text, e);
        }
        parse(&text);
    }

    #[test]
    fn random_text_gives_a_config_or_errors(text in "[ -~\n]{0,400}") {
        parse(&text);
    }

    #[test]
    fn random_tables_give_a_config_or_errors(
        section in prop::sample::select(vec!["admin", "global", "pool", "listener", "pool.health", "pool.tls", "listener.tls"]),
        key in "[a-z_]{1,20}",
        value in fragment(),
        array in any::<bool>(),
    ) {
        let head = if array { format!("[[{section}]]") } else { format!("[{section}]") };
        parse(&format!("{VALID}\n{head}\n{key} = {value}\n"));
    }

    #[test]
    fn pem_loading_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = apilb::tls::certs_from_pem(&bytes, "p");
        let _ = apilb::tls::key_from_pem(&bytes, "p");
        let _ = apilb::tls::roots_from_pem(&bytes, "p");
    }

    #[test]
    fn truncated_or_corrupted_certificates_never_panic(cut in any::<usize>(), flip in any::<usize>(), bit in 0u8..8) {
        let pki = apilb::demo::pki::Pki::generate().expect("pki");
        for pem in [&pki.ca.cert_pem, &pki.apiserver.cert_pem, &pki.apiserver.key_pem] {
            let b = pem.as_bytes();
            let truncated = &b[..cut % (b.len() + 1)];
            let _ = apilb::tls::certs_from_pem(truncated, "t");
            let _ = apilb::tls::key_from_pem(truncated, "t");
            let mut flipped = b.to_vec();
            let i = flip % flipped.len();
            flipped[i] ^= 1 << bit;
            let _ = apilb::tls::certs_from_pem(&flipped, "f");
            let _ = apilb::tls::roots_from_pem(&flipped, "f");
            let _ = apilb::tls::key_from_pem(&flipped, "f");
            if let Ok(certs) = apilb::tls::certs_from_pem(&flipped, "f") {
                for c in certs {
                    let _ = apilb::tls::subject_and_expiry(c.as_ref());
                }
            }
        }
    }
}

/// Files that the config names, hostile ones included, through the whole loader: a huge
/// bundle, a truncated certificate, a key that is a certificate, a directory.
#[test]
fn hostile_files_named_by_the_config_are_errors() {
    let tls = common::TlsFixture::new();
    let huge = tls.file("huge.pem", &tls.pki.ca.cert_pem.repeat(20_000));
    let half = tls.pki.apiserver.cert_pem.len() / 2;
    let truncated = tls.file("truncated.pem", &tls.pki.apiserver.cert_pem[..half]);
    let not_a_key = tls.file("notakey.pem", &tls.pki.apiserver.cert_pem);
    for (ca, cert, key) in [
        (
            huge,
            tls.files.public_cert.clone(),
            tls.files.public_key.clone(),
        ),
        (tls.ca(), truncated, tls.files.public_key.clone()),
        (tls.ca(), tls.files.public_cert.clone(), not_a_key),
        (
            tls.dir().to_path_buf(),
            tls.files.public_cert.clone(),
            tls.files.public_key.clone(),
        ),
    ] {
        let text = format!(
            "[[pool]]\nname = \"p\"\n[pool.tls]\nca = \"{}\"\n[[pool.backend]]\naddress = \"127.0.0.1:1\"\n\
             [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\nmode = \"terminate\"\npool = \"p\"\n\
             [listener.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            ca.display(),
            cert.display(),
            key.display()
        );
        let errs = apilb::config::parse(Path::new("t.toml"), &text)
            .expect_err("a hostile file must be an error")
            .0;
        assert!(!errs.is_empty());
    }
}
