//! The PROXY protocol (HAProxy's specification, versions 1 and 2): parsing the header a load
//! balancer in front of the gateway sends (`proxy_protocol = true` on a listener), and
//! writing the one a pool's backends ask for (`send_proxy`), SPEC §9.
//!
//! Parsing is a pure function of the bytes received so far, so a header split anywhere gets
//! the answer the whole header gets, and it never looks past [`MAX_HEADER`] bytes. It says
//! how many bytes the header took, so the caller consumes exactly those and leaves the TLS
//! bytes behind it in the socket. Only what the gateway uses is believed: the source address
//! of a `PROXY` command over TCP; `LOCAL` (a health check of the load balancer in front),
//! `UNKNOWN` and other families leave the connection's own address in place. TLVs are
//! skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpStream;

use crate::config::SendProxy as Version;

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line the specification allows, CRLF included.
const V1_MAX: usize = 107;
/// The fixed part of a v2 header.
const V2_FIXED: usize = 16;
/// The most address-and-TLV bytes accepted after a v2 header's fixed part: room for the
/// TLVs cloud load balancers add (AWS's VPC endpoint id, Azure's link id), and a bound on
/// what a connection may make the gateway hold.
const V2_MAX_BODY: usize = 2048;
/// The most bytes a header may take.
pub(crate) const MAX_HEADER: usize = V2_FIXED + V2_MAX_BODY;

/// What the bytes received so far hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A prefix of a valid header: read more.
    NeedMore,
    /// A whole header of `len` bytes.
    Header {
        /// Bytes the header takes, to be consumed.
        len: usize,
        /// The client's address it carries; `None` for `LOCAL`, `UNKNOWN` and families
        /// other than TCP over IPv4/IPv6 (the connection's own address stays).
        source: Option<SocketAddr>,
    },
    /// Not a PROXY header, or a broken one.
    Invalid(&'static str),
}

/// Parses the header at the start of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let v1 = buf.len().min(V1_PREFIX.len());
    let v2 = buf.len().min(V2_SIGNATURE.len());
    if buf[..v1] == V1_PREFIX[..v1] {
        parse_v1(buf)
    } else if buf[..v2] == V2_SIGNATURE[..v2] {
        parse_v2(buf)
    } else {
        Parsed::Invalid("no PROXY protocol header")
    }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|b| *b == b'\r') else {
        if window.contains(&b'\n') {
            return Parsed::Invalid("PROXY v1 line ends without CR");
        }
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("PROXY v1 line longer than 107 bytes")
        } else {
            Parsed::NeedMore
        };
    };
    if window[..cr].contains(&b'\n') {
        return Parsed::Invalid("PROXY v1 line ends without CR");
    }
    match buf.get(cr + 1) {
        None if cr + 1 < V1_MAX => return Parsed::NeedMore,
        Some(b'\n') if cr + 2 <= V1_MAX => {}
        _ => return Parsed::Invalid("PROXY v1 line does not end in CRLF"),
    }
    let len = cr + 2;
    let Ok(line) = std::str::from_utf8(&buf[V1_PREFIX.len()..cr]) else {
        return Parsed::Invalid("PROXY v1 line is not text");
    };
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["UNKNOWN", ..] => Parsed::Header { len, source: None },
        [family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let v4 = *family == "TCP4";
            let (Some(src), Some(_dst)) = (v1_ip(src, v4), v1_ip(dst, v4)) else {
                return Parsed::Invalid("PROXY v1 address does not match its family");
            };
            let (Some(sport), Some(_)) = (v1_port(sport), v1_port(dport)) else {
                return Parsed::Invalid("PROXY v1 port is not a number from 0 to 65535");
            };
            Parsed::Header {
                len,
                source: Some(SocketAddr::new(src, sport)),
            }
        }
        _ => Parsed::Invalid("PROXY v1 line is not TCP4, TCP6 or UNKNOWN with four fields"),
    }
}

fn v1_ip(s: &str, v4: bool) -> Option<IpAddr> {
    if v4 {
        s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    } else {
        s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    }
}

fn v1_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Parsed {
    let Some(fixed) = buf.get(..V2_FIXED) else {
        // Judge the version byte as soon as it is there, as the whole header would be.
        return match buf.get(12) {
            Some(b) if b >> 4 != 2 => Parsed::Invalid("PROXY v2 version is not 2"),
            Some(b) if b & 0x0f > 1 => {
                Parsed::Invalid("PROXY v2 command is neither LOCAL nor PROXY")
            }
            _ => Parsed::NeedMore,
        };
    };
    let (ver_cmd, family) = (fixed[12], fixed[13]);
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("PROXY v2 version is not 2");
    }
    let command = ver_cmd & 0x0f;
    if command > 1 {
        return Parsed::Invalid("PROXY v2 command is neither LOCAL nor PROXY");
    }
    let body_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if body_len > V2_MAX_BODY {
        return Parsed::Invalid("PROXY v2 header longer than 2 KiB");
    }
    let Some(body) = buf.get(V2_FIXED..V2_FIXED + body_len) else {
        return Parsed::NeedMore;
    };
    let len = V2_FIXED + body_len;
    if command == 0 {
        return Parsed::Header { len, source: None };
    }
    let source = match family {
        // TCP over IPv4: src, dst addresses, then ports.
        0x11 => {
            let Some(a) = body.get(..12) else {
                return Parsed::Invalid("PROXY v2 TCP4 addresses cut short");
            };
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        0x21 => {
            let Some(a) = body.get(..36) else {
                return Parsed::Invalid("PROXY v2 TCP6 addresses cut short");
            };
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            Some(SocketAddr::new(
                Ipv6Addr::from(ip).into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // UNSPEC, UDP, unix sockets: nothing the gateway can use as a TCP client address.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => None,
        _ => return Parsed::Invalid("PROXY v2 family or transport unknown"),
    };
    Parsed::Header { len, source }
}

/// Reads the PROXY header off the start of `tcp`, consuming exactly its bytes (the TLS bytes
/// behind it stay in the socket for whoever reads next); the client address it carries, or
/// `None` for `LOCAL`/`UNKNOWN`. Every step is one `peek` and one `read` of bytes already
/// seen, so nothing past the header is ever taken. The caller bounds the time.
pub(crate) async fn read_header(tcp: &TcpStream) -> Result<Option<SocketAddr>, &'static str> {
    let mut buf = [0u8; MAX_HEADER];
    let mut have = 0;
    loop {
        let n = tcp
            .peek(&mut buf[have..])
            .await
            .map_err(|_| "connection failed before a PROXY header")?;
        if n == 0 {
            return Err("connection closed before a whole PROXY header");
        }
        let (take, answer) = match parse(&buf[..have + n]) {
            Parsed::Header { len, source } => (len - have, Some(source)),
            // Every byte seen belongs to the header: take them, and wait for the rest.
            Parsed::NeedMore => (n, None),
            Parsed::Invalid(why) => return Err(why),
        };
        consume(tcp, &mut buf[have..have + take]).await?;
        have += take;
        if let Some(source) = answer {
            return Ok(source);
        }
        if have == MAX_HEADER {
            return Err("PROXY header longer than the gateway accepts");
        }
    }
}

/// Reads exactly `buf.len()` bytes that a peek has shown are there.
async fn consume(tcp: &TcpStream, buf: &mut [u8]) -> Result<(), &'static str> {
    let mut at = 0;
    while at < buf.len() {
        tcp.readable()
            .await
            .map_err(|_| "connection failed in its PROXY header")?;
        match tcp.try_read(&mut buf[at..]) {
            Ok(0) => return Err("connection closed in its PROXY header"),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err("connection failed in its PROXY header"),
        }
    }
    Ok(())
}

/// The v1 or v2 header saying a connection from `client` to `local` is proxied.
pub(crate) fn header(version: Version, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = same_family(client, local);
    match version {
        Version::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                local.ip(),
                client.port(),
                local.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.push(0x21);
            match (client.ip(), local.ip()) {
                (IpAddr::V4(c), IpAddr::V4(l)) => {
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&c.octets());
                    out.extend_from_slice(&l.octets());
                }
                (c, l) => {
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&v6(c).octets());
                    out.extend_from_slice(&v6(l).octets());
                }
            }
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&local.port().to_be_bytes());
            out
        }
    }
}

/// The v2 `LOCAL` header health checks of a `send_proxy` pool start with: the backend
/// accepts the connection as the gateway's own.
pub(crate) fn local_header() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
    out
}

/// Both addresses in one family: IPv4-mapped IPv6 addresses (a dual-stack listener) become
/// IPv4 where both can, otherwise both become IPv6.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let unmap = |s: SocketAddr| match s.ip() {
        IpAddr::V6(v) => v
            .to_ipv4_mapped()
            .map_or(s, |v4| SocketAddr::new(v4.into(), s.port())),
        IpAddr::V4(_) => s,
    };
    let (a, b) = (unmap(a), unmap(b));
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (
            SocketAddr::new(v6(a.ip()).into(), a.port()),
            SocketAddr::new(v6(b.ip()).into(), b.port()),
        )
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn v1_tcp4_and_tcp6_carry_the_client() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET";
        assert_eq!(
            parse(h),
            Parsed::Header {
                len: h.len() - 3,
                source: Some(addr("192.0.2.7:56324"))
            }
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert_eq!(
            parse(h),
            Parsed::Header {
                len: h.len(),
                source: Some(addr("[2001:db8::1]:4000"))
            }
        );
        let h = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(
            parse(h),
            Parsed::Header {
                len: h.len(),
                source: None
            }
        );
    }

    #[test]
    fn what_we_write_we_read() {
        for (c, l) in [
            ("10.1.2.3:5555", "10.0.0.1:6443"),
            ("[2001:db8::9]:1", "[2001:db8::1]:6443"),
            ("[::ffff:10.1.2.3]:7", "10.0.0.1:6443"),
            ("10.1.2.3:7", "[2001:db8::1]:6443"),
        ] {
            for v in [Version::V1, Version::V2] {
                let h = header(v, addr(c), addr(l));
                let Parsed::Header { len, source } = parse(&h) else {
                    panic!("{v:?} {c}: {:?}", parse(&h));
                };
                assert_eq!(len, h.len());
                let got = source.expect("source");
                let want = addr(c);
                assert_eq!(got.port(), want.port());
                assert_eq!(v6(got.ip()), v6(want.ip()), "{v:?} {c}");
            }
        }
        assert_eq!(
            parse(&local_header()),
            Parsed::Header {
                len: 16,
                source: None
            }
        );
    }

    #[test]
    fn every_prefix_of_a_header_needs_more() {
        for h in [
            header(Version::V1, addr("192.0.2.1:1"), addr("192.0.2.2:2")),
            header(Version::V2, addr("192.0.2.1:1"), addr("192.0.2.2:2")),
            header(Version::V2, addr("[::1]:1"), addr("[::2]:2")),
        ] {
            for cut in 0..h.len() {
                assert_eq!(parse(&h[..cut]), Parsed::NeedMore, "cut {cut} of {h:?}");
            }
        }
    }

    #[test]
    fn hostile_headers_are_invalid() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"\x16\x03\x01\x02\x00",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Invalid(_)),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(200, b'x');
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
        // v2 with a bad version, a bad command, a length past the bound, short addresses.
        let mut v = header(Version::V2, addr("1.2.3.4:1"), addr("5.6.7.8:2"));
        v[12] = 0x11;
        assert!(matches!(parse(&v), Parsed::Invalid(_)));
        assert!(matches!(parse(&v[..13]), Parsed::Invalid(_)));
        v[12] = 0x22;
        assert!(matches!(parse(&v), Parsed::Invalid(_)));
        let mut v = header(Version::V2, addr("1.2.3.4:1"), addr("5.6.7.8:2"));
        v[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(matches!(parse(&v), Parsed::Invalid(_)));
        let mut v = header(Version::V2, addr("1.2.3.4:1"), addr("5.6.7.8:2"));
        v[14..16].copy_from_slice(&4u16.to_be_bytes());
        assert!(matches!(parse(&v), Parsed::Invalid(_)));
    }

    #[test]
    fn v2_tlvs_are_skipped_and_unix_families_keep_the_own_address() {
        let mut v = header(Version::V2, addr("1.2.3.4:1"), addr("5.6.7.8:2"));
        v[14..16].copy_from_slice(&(12u16 + 7).to_be_bytes());
        v.extend_from_slice(&[0x04, 0, 4, 1, 2, 3, 4]);
        v.extend_from_slice(b"\x16\x03");
        assert_eq!(
            parse(&v),
            Parsed::Header {
                len: v.len() - 2,
                source: Some(addr("1.2.3.4:1"))
            }
        );
        let mut u = V2_SIGNATURE.to_vec();
        u.extend_from_slice(&[0x21, 0x31, 0, 216]);
        u.resize(16 + 216, 0);
        assert_eq!(
            parse(&u),
            Parsed::Header {
                len: u.len(),
                source: None
            }
        );
    }

    /// `parse` over pieces cut at `cuts`, as `read_header` feeds it: the bytes grow, and
    /// the first answer other than NeedMore stands.
    fn parse_split(bytes: &[u8], cuts: &[usize]) -> Parsed {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(bytes.len());
        points.sort_unstable();
        for p in points {
            let a = parse(&bytes[..p.min(MAX_HEADER)]);
            if a != Parsed::NeedMore {
                return a;
            }
        }
        Parsed::NeedMore
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let whole = parse(&bytes[..bytes.len().min(MAX_HEADER)]);
            let split = parse_split(&bytes, &cuts);
            if whole != Parsed::NeedMore {
                proptest::prop_assert_eq!(split, whole);
            }
            if let Parsed::Header { len, .. } = whole {
                proptest::prop_assert!(len <= bytes.len() && len <= MAX_HEADER);
            }
        }

        #[test]
        fn mutated_headers_give_one_answer_however_split(
            v2 in proptest::bool::ANY,
            six in proptest::bool::ANY,
            port in 1u16..,
            flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 0..3),
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let client = if six { addr("[2001:db8::7]:1") } else { addr("192.0.2.7:1") };
            let client = SocketAddr::new(client.ip(), port);
            let version = if v2 { Version::V2 } else { Version::V1 };
            let mut h = header(version, client, addr("10.0.0.1:6443"));
            let clean = flips.is_empty();
            for (at, b) in &flips {
                let i = at % h.len();
                h[i] = *b;
            }
            h.extend_from_slice(&tail);
            let whole = parse(&h);
            proptest::prop_assert_eq!(parse_split(&h, &cuts), whole);
            if clean {
                let Parsed::Header { len, source } = whole else {
                    return Err(proptest::test_runner::TestCaseError::fail(format!("{whole:?}")));
                };
                proptest::prop_assert_eq!(len, h.len() - tail.len());
                proptest::prop_assert_eq!(source, Some(client));
            }
        }
    }
}
