//! The passthrough copy loop: TCP to TCP, one poll function over plain state.
//!
//! Its state is most of what an idle connection costs, so it is a struct rather than nested
//! futures (whose arguments and locals the compiler would both keep), and a test guards its
//! size. Each direction copies small reads through a pooled buffer and switches to splice(2)
//! through a pooled pipe once a read fills the buffer; a short splice switches it back. The
//! backend socket gets keepalive from here, once the connection has lived a few seconds.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::buf::{read_draining, retry, BufPool};
use super::rules::{Clock, Ends, Tracked, Watched};
#[cfg(target_os = "linux")]
use super::splice;
use crate::close::{End, Relayed};

/// The most an idle relay future may take: it is most of an idle watch's memory (1.9 KiB RSS
/// per idle connection, docs/performance.md), so a change that makes it grow must say why.
/// 512 bytes when set; the margin is for toolchain differences.
#[cfg(test)]
pub(crate) const RELAY_TCP_BUDGET: usize = 640;

/// Relays bytes both ways between two TCP sockets (passthrough) until both directions
/// reached EOF, an error occurs, nothing moved for `idle`, or `drain` completes.
///
/// The future holds no buffer or pipe while nothing is in flight. Each
/// direction copies small reads through a pooled buffer (a read shorter than the buffer
/// means the socket is drained, so the next message costs two syscalls, not three) and
/// switches to splice(2) through a pooled pipe once a read fills the buffer, so bulk bytes
/// never enter user space; a short splice switches it back.
///
/// Half-close is propagated: EOF from one side shuts down writing towards the other, and the
/// other direction keeps flowing.
pub fn relay_tcp<D: Future<Output = ()>>(
    client: TcpStream,
    backend: TcpStream,
    idle: Duration,
    splice: bool,
    drain: D,
) -> RelayTcp<D> {
    relay_tracked(
        client,
        backend,
        idle,
        splice,
        drain,
        Arc::new(Tracked::untracked()),
    )
}

/// [`relay_tcp`] with its clock and end request in `tracked`, which the connection's
/// backend registry shares with the rebalancer (SPEC §11). Asked to end, the relay declines
/// while bytes from the client are in flight; otherwise it shuts both sockets down for
/// writing (FIN both ways), discards what the peers still send until each answers with its
/// own FIN (at most [`CLOSING_WAIT`]), and ends with [`End::Rebalanced`]: no RST.
pub(crate) fn relay_tracked<D: Future<Output = ()>>(
    client: TcpStream,
    backend: TcpStream,
    idle: Duration,
    splice: bool,
    drain: D,
    tracked: Arc<Tracked>,
) -> RelayTcp<D> {
    RelayTcp {
        client,
        backend,
        up: Flow::new(splice),
        down: Flow::new(splice),
        // The one timer serves both: first for the backend's keepalive, then for idleness.
        idle_sleep: tracked
            .clock
            .first_deadline(idle.min(crate::net::KEEP_ALIVE_AFTER)),
        tracked,
        closing: false,
        keep_alive_due: true,
        ends: Ends::default(),
        idle,
        drain: Watched::new(drain),
    }
}

/// How long a relay the rebalancer ended waits for both peers to answer its FIN before it
/// closes anyway.
const CLOSING_WAIT: Duration = Duration::from_secs(3);

/// Whether the client has sent bytes the relay has not read yet (a request may be starting):
/// then a rebalancer's request is declined.
fn client_pending(client: &TcpStream) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(client).peek(&mut b), Ok(n) if n > 0)
}

/// While closing: reads and discards what each peer still sends, until both reached EOF;
/// Ready once they have. Discarding (rather than closing with bytes unread) is what keeps
/// the kernel from answering with RST.
fn poll_closed(cx: &mut Context<'_>, socks: [&TcpStream; 2], ends: &mut Ends) -> Poll<()> {
    let mut scratch = [0u8; 4096];
    for (up, s) in [(true, socks[0]), (false, socks[1])] {
        while !ends.is_done(up) {
            match s.poll_read_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => {
                    ends.eof(up);
                }
                Poll::Ready(Ok(())) => match s.try_read(&mut scratch) {
                    Ok(0) => {
                        ends.eof(up);
                    }
                    Ok(_) => {}
                    // Readiness is cleared: the next poll_read_ready registers the waker.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        ends.eof(up);
                    }
                },
            }
        }
    }
    if ends.is_done(true) && ends.is_done(false) {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// The future of [`relay_tcp`].
    pub struct RelayTcp<D> {
        client: TcpStream,
        backend: TcpStream,
        up: Flow,
        down: Flow,
        tracked: Arc<Tracked>,
        // Ended by the rebalancer: FIN sent both ways, waiting for the peers' own.
        closing: bool,
        // The backend socket has no keepalive yet: it gets it once the connection has lived
        // `net::KEEP_ALIVE_AFTER` (SPEC §3), so short connections never pay for it.
        keep_alive_due: bool,
        ends: Ends,
        idle: Duration,
        #[pin]
        idle_sleep: tokio::time::Sleep,
        #[pin]
        drain: Watched<D>,
    }
}

impl<D: Future<Output = ()>> Future for RelayTcp<D> {
    type Output = Relayed;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Relayed> {
        let mut this = self.project();
        if *this.closing {
            let waited = this.idle_sleep.as_mut().poll(cx).is_ready();
            if waited || poll_closed(cx, [this.client, this.backend], this.ends).is_ready() {
                return Poll::Ready(Relayed {
                    up: this.up.bytes,
                    down: this.down.bytes,
                    end: End::Rebalanced,
                    error: None,
                });
            }
            return Poll::Pending;
        }
        let end = 'end: {
            for up in [true, false] {
                if this.ends.is_done(up) {
                    continue;
                }
                let (flow, from, to) = if up {
                    (&mut *this.up, &*this.client, &*this.backend)
                } else {
                    (&mut *this.down, &*this.backend, &*this.client)
                };
                // When the other direction is done too, both sockets are closed next, which
                // sends the FIN without a shutdown call of its own.
                let pass_eof = !this.ends.is_done(!up);
                match flow.poll(cx, from, to, pass_eof, &this.tracked.clock, up) {
                    Poll::Ready(Ok(())) => {
                        if let Some(end) = this.ends.eof(up) {
                            break 'end (end, None);
                        }
                    }
                    Poll::Ready(Err(e)) => break 'end (End::Error, Some(e)),
                    Poll::Pending => {}
                }
            }
            if *this.keep_alive_due && this.idle_sleep.as_mut().poll(cx).is_ready() {
                *this.keep_alive_due = false;
                crate::net::keep_alive(socket2::SockRef::from(&*this.backend), "backend");
                // The timer fired for the keepalive; idleness is measured as ever, and a
                // relay already idle for `idle` ends just below.
                this.idle_sleep
                    .as_mut()
                    .reset(this.tracked.clock.after_start(*this.idle));
            }
            if this
                .tracked
                .clock
                .poll_idle(this.idle_sleep.as_mut(), *this.idle, cx)
            {
                break 'end (End::IdleTimeout, None);
            }
            if this.tracked.asked(cx) {
                let held = !matches!(this.up.held, Held::Nothing)
                    || !matches!(this.down.held, Held::Nothing);
                if held || client_pending(this.client) {
                    // Bytes in flight: a request may be under way. Not now.
                    this.tracked.decline();
                } else {
                    this.tracked.closing();
                    for s in [&*this.client, &*this.backend] {
                        let _ = socket2::SockRef::from(s).shutdown(Shutdown::Write);
                    }
                    *this.closing = true;
                    *this.ends = Ends::default();
                    this.idle_sleep
                        .as_mut()
                        .reset(tokio::time::Instant::now() + CLOSING_WAIT);
                    // Poll again at once, in the closing state.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            if this.drain.as_mut().poll(cx).is_ready() {
                break 'end (End::Drained, None);
            }
            return Poll::Pending;
        };
        Poll::Ready(Relayed {
            up: this.up.bytes,
            down: this.down.bytes,
            end: end.0,
            error: end.1,
        })
    }
}

/// Bytes read but not yet written by one direction of [`relay_tcp`].
enum Held {
    Nothing,
    #[cfg(target_os = "linux")]
    Pipe {
        pipe: splice::Pipe,
        len: usize,
    },
    Buf {
        buf: Box<[u8]>,
        off: usize,
        len: usize,
    },
}

/// One direction of [`relay_tcp`].
struct Flow {
    held: Held,
    /// Allowed to splice at all.
    splice: bool,
    /// Moving bulk bytes: splice instead of copying.
    bulk: bool,
    /// What is held is the last the peer sends: its FIN is in already (see [`peer_finished`]).
    fin_follows: bool,
    bytes: u64,
}

/// After a short read: whether the peer's FIN has arrived already, so its EOF is all that is
/// left. Read off the readiness tokio keeps (a short read cleared "readable"; "read closed"
/// stays once the kernel reported the peer's shutdown), without a system call. The closing
/// bytes then go out with the FIN in one segment, as HAProxy sends them: a packet less per
/// connection through both kernels.
fn peer_finished(from: &TcpStream, cx: &mut Context<'_>) -> bool {
    if from.poll_read_ready(cx).is_pending() {
        return false;
    }
    // Ready again at once: either the FIN, or bytes that arrived since the read.
    let ready = std::pin::pin!(from.ready(Interest::READABLE));
    matches!(ready.poll(cx), Poll::Ready(Ok(r)) if r.is_read_closed())
}

/// A splice that moves less than this switches its direction back to copying: small
/// messages are cheaper through a buffer (see [`relay_tcp`]).
#[cfg(target_os = "linux")]
const SMALL_SPLICE: usize = 4096;

impl Flow {
    fn new(splice: bool) -> Self {
        #[cfg(target_os = "linux")]
        let splice = splice && splice::usable();
        Self {
            held: Held::Nothing,
            splice,
            bulk: false,
            fin_follows: false,
            bytes: 0,
        }
    }

    /// Moves bytes from `from` to `to` until `from` would block (Pending) or reached EOF and
    /// `to` was shut down for writing if `pass_eof` (Ready(Ok)).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        pass_eof: bool,
        clock: &Clock,
        up: bool,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.flush(cx, to))?;
            ready!(from.poll_read_ready(cx))?;
            #[cfg(target_os = "linux")]
            if self.bulk {
                // Out of descriptors for a pipe: this round goes through a buffer.
                if let Ok(pipe) = splice::take() {
                    match from.try_io(Interest::READABLE, || splice::fill(from, &pipe)) {
                        Ok(0) => {
                            splice::put(pipe);
                            return eof_reached(to, pass_eof);
                        }
                        Ok(len) => {
                            clock.stamp(up);
                            self.bulk = len >= SMALL_SPLICE;
                            self.held = Held::Pipe { pipe, len };
                        }
                        Err(e) => {
                            splice::put(pipe);
                            if !retry(&e) {
                                // Splice itself failed: copy instead. A broken socket shows
                                // again on the copy path's read, with its own error.
                                splice::note_failure(&e);
                                self.splice = false;
                                self.bulk = false;
                            }
                        }
                    }
                    continue;
                }
                self.bulk = false;
            }
            let mut buf = BufPool::take();
            match read_draining(from, &mut buf) {
                Ok(0) => {
                    BufPool::put(buf);
                    return eof_reached(to, pass_eof);
                }
                Ok(got) => {
                    clock.stamp(up);
                    self.bulk = self.splice && got == buf.len();
                    self.fin_follows = got < buf.len() && peer_finished(from, cx);
                    self.held = Held::Buf {
                        buf,
                        off: 0,
                        len: got,
                    };
                }
                Err(e) => {
                    BufPool::put(buf);
                    if std::mem::take(&mut self.fin_follows) {
                        // Corked bytes and, against the rule, no EOF: send them now.
                        let _ = socket2::SockRef::from(to).set_tcp_nodelay(true);
                    }
                    if !retry(&e) {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }

    /// Writes what is held to `to`, then returns the buffer or pipe to its pool.
    fn flush(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<io::Result<()>> {
        let Self {
            held,
            bytes,
            splice,
            bulk,
            fin_follows,
        } = &mut *self;
        match held {
            Held::Nothing => return Poll::Ready(Ok(())),
            #[cfg(target_os = "linux")]
            Held::Pipe { pipe, len } => {
                while *len > 0 {
                    ready!(to.poll_write_ready(cx))?;
                    match to.try_io(Interest::WRITABLE, || splice::drain(pipe, to, *len)) {
                        Ok(k) => {
                            *len -= k;
                            *bytes += k as u64;
                        }
                        Err(e) if retry(&e) => {}
                        Err(e) if splice::is_unsupported(&e) => {
                            // Splice cannot write here: move what the pipe holds into a
                            // buffer and write that; this direction copies from now on.
                            splice::note_failure(&e);
                            let mut buf = BufPool::take();
                            let got = splice::unload(pipe, &mut buf[..*len])?;
                            (*splice, *bulk) = (false, false);
                            if let Held::Pipe { pipe, .. } = std::mem::replace(
                                held,
                                Held::Buf {
                                    buf,
                                    off: 0,
                                    len: got,
                                },
                            ) {
                                splice::put(pipe);
                            }
                            return self.flush(cx, to);
                        }
                        // On an error the pipe still holds bytes: it is dropped, not pooled.
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
            Held::Buf { buf, off, len } => {
                while *off < *len {
                    ready!(to.poll_write_ready(cx))?;
                    let sent = if *fin_follows {
                        // The peer's last bytes: held back (MSG_MORE) for the FIN that
                        // follows them at once, so both leave in one segment, not two.
                        to.try_io(Interest::WRITABLE, || {
                            rustix::net::send(
                                to,
                                &buf[*off..*len],
                                rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL,
                            )
                            .map_err(io::Error::from)
                        })
                    } else {
                        to.try_write(&buf[*off..*len])
                    };
                    match sent {
                        Ok(k) => {
                            *off += k;
                            *bytes += k as u64;
                        }
                        Err(e) if retry(&e) => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
        }
        match std::mem::replace(held, Held::Nothing) {
            #[cfg(target_os = "linux")]
            Held::Pipe { pipe, .. } => splice::put(pipe),
            Held::Buf { buf, .. } => BufPool::put(buf),
            Held::Nothing => {}
        }
        Poll::Ready(Ok(()))
    }
}

/// A direction's end: passes EOF on when asked. The peer may already be gone; its own
/// direction reports that.
fn eof_reached(to: &TcpStream, pass_eof: bool) -> Poll<io::Result<()>> {
    if pass_eof {
        let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
    }
    Poll::Ready(Ok(()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::End;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    use crate::relay::{drained, pooled_pipes};

    /// A drain ends a relay at once, whether it comes while bytes flow or while the
    /// connection is idle, and whichever of the two tokens fires.
    #[tokio::test]
    async fn drain_ends_a_relay_busy_or_idle() {
        for (busy, backend_token) in [(false, false), (false, true), (true, false), (true, true)] {
            let (mut client, gw_client) = pair().await;
            let (gw_backend, mut backend) = pair().await;
            let (listener, per_backend) = (
                tokio_util::sync::CancellationToken::new(),
                tokio_util::sync::CancellationToken::new(),
            );
            let (l, b) = (listener.clone(), per_backend.clone());
            let relay = tokio::spawn(async move {
                super::relay_tcp(
                    gw_client,
                    gw_backend,
                    Duration::from_secs(30),
                    true,
                    drained(&l, &b),
                )
                .await
            });
            client.write_all(b"ping").await.expect("write");
            let mut m = [0u8; 4];
            backend.read_exact(&mut m).await.expect("relayed");
            // Busy: a writer keeps bytes flowing while the token fires. Idle: both ends
            // stay open and quiet.
            let mut tasks = Vec::new();
            let mut quiet = None;
            if busy {
                tasks.push(tokio::spawn(async move {
                    while client.write_all(&[7u8; 1024]).await.is_ok() {}
                }));
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while backend.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                }));
            } else {
                quiet = Some((client, backend));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if backend_token {
                per_backend.cancel()
            } else {
                listener.cancel()
            }
            let r = tokio::time::timeout(Duration::from_secs(2), relay)
                .await
                .expect("relay ended after the drain")
                .expect("join");
            assert_eq!(
                r.end,
                End::Drained,
                "busy {busy}, backend token {backend_token}"
            );
            for t in tasks {
                t.abort();
            }
            drop(quiet);
        }
    }

    /// The direction switches between copying and splicing as the traffic changes: a bulk
    /// upload (spliced), small messages both ways (copied), a bulk download, then half-closes;
    /// every byte arrives in order and the counts and the end are right.
    #[tokio::test]
    async fn bulk_small_bulk_and_half_close_through_relay_tcp() {
        const BULK: usize = 4 << 20;
        let (client, gw_client) = pair().await;
        let (gw_backend, backend) = pair().await;
        let relay = tokio::spawn(super::relay_tcp(
            gw_client,
            gw_backend,
            Duration::from_secs(30),
            true,
            std::future::pending::<()>(),
        ));
        let (mut cr, mut cw) = client.into_split();
        let (mut br, mut bw) = backend.into_split();
        let big: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
        let mut got = vec![0u8; BULK];

        let (w, r) = tokio::join!(cw.write_all(&big), br.read_exact(&mut got));
        w.expect("upload");
        r.expect("upload arrives");
        assert!(got == big, "upload corrupted");
        assert!(pooled_pipes() > 0, "the bulk upload was not spliced");

        for k in 0..100u8 {
            let msg = [k; 100];
            cw.write_all(&msg).await.expect("request");
            let mut m = [0u8; 100];
            br.read_exact(&mut m).await.expect("request arrives");
            assert_eq!(m, msg);
            bw.write_all(&[k ^ 0xff; 100]).await.expect("answer");
            cr.read_exact(&mut m).await.expect("answer arrives");
            assert_eq!(m, [k ^ 0xff; 100]);
        }

        let (w, r) = tokio::join!(bw.write_all(&big), cr.read_exact(&mut got));
        w.expect("download");
        r.expect("download arrives");
        assert!(got == big, "download corrupted");

        // Client finishes first: the backend sees EOF and can still answer.
        cw.shutdown().await.expect("client FIN");
        let mut rest = Vec::new();
        br.read_to_end(&mut rest).await.expect("backend EOF");
        assert!(rest.is_empty());
        bw.write_all(b"bye").await.expect("after half-close");
        bw.shutdown().await.expect("backend FIN");
        cr.read_to_end(&mut rest).await.expect("client EOF");
        assert_eq!(rest, b"bye");

        let r = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("relay ended")
            .expect("join");
        assert_eq!(r.end, End::ClientClosed);
        assert_eq!(r.up, (BULK + 100 * 100) as u64);
        assert_eq!(r.down, (BULK + 100 * 100 + 3) as u64);
    }

    /// Round-2 hardening, item 11: a splice(2) that fails with anything but EAGAIN/EINTR
    /// used to end the connection. Now the bytes go through a buffer instead (whatever the
    /// pipe already held included), and that worker stops splicing.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_failing_splice_falls_back_to_copying_without_losing_a_byte() {
        for fill in [true, false] {
            crate::relay::splice::reset();
            let (client, gw_client) = pair().await;
            let (gw_backend, backend) = pair().await;
            // Two bulk rounds so that the relay is splicing when the failure comes.
            let big: Vec<u8> = (0..(2 << 20)).map(|i| (i % 249) as u8).collect();
            let relay = super::relay_tcp(
                gw_client,
                gw_backend,
                Duration::from_secs(30),
                true,
                std::future::pending::<()>(),
            );
            let (mut cr, mut cw) = client.into_split();
            let (mut br, mut bw) = backend.into_split();
            let expected = big.clone();
            let io = async move {
                let mut got = vec![0u8; expected.len()];
                let (w, r) = tokio::join!(
                    cw.write_all(&big[..1 << 20]),
                    br.read_exact(&mut got[..1 << 20])
                );
                w.expect("first half");
                r.expect("first half arrives");
                crate::relay::splice::fail_next(fill, rustix::io::Errno::INVAL);
                let (w, r) = tokio::join!(
                    cw.write_all(&big[1 << 20..]),
                    br.read_exact(&mut got[1 << 20..])
                );
                w.expect("second half");
                r.expect("second half arrives");
                assert!(got == expected, "bytes changed (fill failure: {fill})");
                cw.shutdown().await.expect("FIN");
                bw.shutdown().await.expect("FIN");
                let mut rest = Vec::new();
                cr.read_to_end(&mut rest).await.expect("EOF");
                br.read_to_end(&mut rest).await.expect("EOF");
            };
            let (r, ()) =
                tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(relay, io) })
                    .await
                    .expect("relay ended");
            assert!(r.error.is_none(), "fill failure {fill}: {:?}", r.error);
            assert_eq!(r.up, 2 << 20);
            assert!(!crate::relay::splice::usable(), "the worker still splices");
        }
    }

    /// SPEC §3: the backend socket gets keepalive and TCP_USER_TIMEOUT once the connection
    /// has lived `KEEP_ALIVE_AFTER`, not before (short connections do not pay for them), and
    /// the relay goes on relaying.
    #[tokio::test(start_paused = true)]
    async fn the_backend_socket_gets_keepalive_once_the_connection_has_lived() {
        let (mut client, gw_client) = pair().await;
        let (gw_backend, mut backend) = pair().await;
        // A second descriptor of the gateway's backend socket, to read its options while the
        // relay owns it.
        let std = gw_backend.into_std().expect("into_std");
        let view = std.try_clone().expect("dup");
        let gw_backend = TcpStream::from_std(std).expect("from_std");
        let sock = socket2::SockRef::from(&view);
        assert!(!sock.keepalive().expect("keepalive"));
        let (t1, t2) = (
            tokio_util::sync::CancellationToken::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        let (l, b) = (t1.clone(), t2.clone());
        let relay = tokio::spawn(async move {
            super::relay_tcp(
                gw_client,
                gw_backend,
                Duration::from_secs(3600),
                true,
                drained(&l, &b),
            )
            .await
        });
        tokio::time::sleep(crate::net::KEEP_ALIVE_AFTER - Duration::from_millis(500)).await;
        assert!(
            !sock.keepalive().expect("keepalive"),
            "keepalive set before the connection lived KEEP_ALIVE_AFTER"
        );
        assert_eq!(sock.tcp_user_timeout().expect("user timeout"), None);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            sock.keepalive().expect("keepalive"),
            "no keepalive after the deferral"
        );
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(30)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            Duration::from_secs(10)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("retries"), 3);
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(Duration::from_secs(60))
        );
        client.write_all(b"still relaying").await.expect("write");
        let mut got = [0u8; 14];
        backend.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"still relaying");
        assert!(!relay.is_finished());
        t1.cancel();
        let r = relay.await.expect("relay");
        assert_eq!(r.end, End::Drained);
    }

    /// A peer's last bytes, with its FIN already in when the relay reads them (they go out
    /// corked for the FIN) or arriving later, reach the other side in full, followed by EOF,
    /// whether or not the other direction ended first.
    #[tokio::test]
    async fn a_peers_last_bytes_and_its_fin_arrive_however_they_came() {
        for fin_with_bytes in [true, false] {
            for client_done_first in [false, true] {
                let (mut client, gw_client) = pair().await;
                let (gw_backend, mut backend) = pair().await;
                if client_done_first {
                    client.shutdown().await.expect("client half-close");
                }
                backend.write_all(b"last words").await.expect("write");
                if fin_with_bytes {
                    backend.shutdown().await.expect("backend half-close");
                    // Both are in the gateway's socket before the relay first reads.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let relay = tokio::spawn(super::relay_tcp(
                    gw_client,
                    gw_backend,
                    Duration::from_secs(30),
                    true,
                    std::future::pending::<()>(),
                ));
                if !fin_with_bytes {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    backend.shutdown().await.expect("backend half-close");
                }
                let mut got = Vec::new();
                tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
                    .await
                    .expect("EOF in time")
                    .expect("read");
                assert_eq!(got, b"last words", "fin_with_bytes {fin_with_bytes}");
                if !client_done_first {
                    client.shutdown().await.expect("client half-close");
                }
                let mut rest = Vec::new();
                tokio::time::timeout(Duration::from_secs(5), backend.read_to_end(&mut rest))
                    .await
                    .expect("backend EOF in time")
                    .expect("read");
                assert!(rest.is_empty());
                let r = tokio::time::timeout(Duration::from_secs(5), relay)
                    .await
                    .expect("relay ends")
                    .expect("relay task");
                assert_eq!((r.up, r.down), (0, 10));
                assert!(r.error.is_none(), "{:?}", r.error);
            }
        }
    }

    /// An idle proxied connection costs its task, and the task is mostly this future.
    #[tokio::test]
    async fn an_idle_relay_stays_within_its_budget() {
        let (c, s) = pair().await;
        let (t1, t2) = (
            tokio_util::sync::CancellationToken::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        let relay = super::relay_tcp(c, s, Duration::from_secs(1), true, drained(&t1, &t2));
        let size = std::mem::size_of_val(&relay);
        assert!(
            size <= super::RELAY_TCP_BUDGET,
            "the relay future grew to {size} bytes"
        );
    }
}
