//! The terminate copy loop: any two byte streams (TLS on both sides), with the same ends as
//! the passthrough loop (both EOFs, an error, `idle` without a byte, or the drain signal).

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::buf::BufPool;
use super::rules::{Clock, Ends, Watched};
use crate::close::{End, Relayed};

/// Relays bytes both ways between two byte streams until both directions are done, an error
/// occurs, nothing moved for `idle`, or `drain` completes. EOF from one side shuts down
/// writing towards the other (for TLS: close_notify), and the other direction keeps flowing.
pub async fn relay<CR, CW, BR, BW>(
    mut client_r: CR,
    mut client_w: CW,
    mut backend_r: BR,
    mut backend_w: BW,
    idle: Duration,
    drain: impl Future<Output = ()>,
) -> Relayed
where
    CR: AsyncRead + Unpin,
    BR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    BW: AsyncWrite + Unpin,
{
    let clock = Clock::new();
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let mut up = pin!(pump(&mut client_r, &mut backend_w, &up_bytes, &clock, true));
    let mut down = pin!(pump(
        &mut backend_r,
        &mut client_w,
        &down_bytes,
        &clock,
        false
    ));
    let mut ends = Ends::default();
    let mut idle_sleep = pin!(clock.first_deadline(idle));
    let mut drain = pin!(Watched::new(drain));

    let (end, error) = std::future::poll_fn(|cx| {
        for is_up in [true, false] {
            if ends.is_done(is_up) {
                continue;
            }
            let pumped = if is_up {
                up.as_mut().poll(cx)
            } else {
                down.as_mut().poll(cx)
            };
            match pumped {
                Poll::Ready(Ok(())) => {
                    if let Some(end) = ends.eof(is_up) {
                        return Poll::Ready((end, None));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready((End::Error, Some(e))),
                Poll::Pending => {}
            }
        }
        if clock.poll_idle(idle_sleep.as_mut(), idle, cx) {
            return Poll::Ready((End::IdleTimeout, None));
        }
        if drain.as_mut().poll(cx).is_ready() {
            return Poll::Ready((End::Drained, None));
        }
        Poll::Pending
    })
    .await;
    Relayed {
        up: up_bytes.load(Ordering::Relaxed),
        down: down_bytes.load(Ordering::Relaxed),
        end,
        error,
    }
}

/// Copies `from` to `to` until EOF on `from`, then shuts down writing on `to`.
///
/// A TLS stream cannot say it is readable without reading (rustls may already hold
/// decrypted bytes), so the wait is a one-byte read into the future itself; only then is a
/// pooled buffer taken for the rest of what is ready. An idle terminate connection holds no
/// relay buffer either.
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    bytes: &AtomicU64,
    clock: &Clock,
    up: bool,
) -> io::Result<()> {
    loop {
        let mut first = [0u8; 1];
        if from.read(&mut first).await? == 0 {
            // The peer may already be gone; its own direction reports that.
            let _ = to.shutdown().await;
            return Ok(());
        }
        clock.stamp(up);
        let mut buf = BufPool::take();
        buf[0] = first[0];
        // Whatever else is ready now, without waiting: an error or EOF here shows again on
        // the next read, after these bytes are written.
        let more = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf[1..]);
            match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(rb.filled().len()),
                Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(0),
            }
        })
        .await;
        let n = 1 + more;
        // A TLS writer holds records until flushed.
        let written = async {
            to.write_all(&buf[..n]).await?;
            to.flush().await
        }
        .await;
        BufPool::put(buf);
        written?;
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::close::End;

    /// Half-close through the stream relay: the client finishes first, the backend still
    /// answers, then finishes; the end and the counts are the shared rules' (in-memory pipes
    /// stand in for TLS streams).
    #[tokio::test]
    async fn half_close_then_the_other_side_ends_it() {
        let (client, gw_client) = tokio::io::duplex(4096);
        let (gw_backend, backend) = tokio::io::duplex(4096);
        let (cr, cw) = tokio::io::split(gw_client);
        let (br, bw) = tokio::io::split(gw_backend);
        let relay = tokio::spawn(super::relay(
            cr,
            cw,
            br,
            bw,
            Duration::from_secs(30),
            std::future::pending::<()>(),
        ));
        let (mut c_r, mut c_w) = tokio::io::split(client);
        let (mut b_r, mut b_w) = tokio::io::split(backend);
        c_w.write_all(b"hello").await.expect("write");
        c_w.shutdown().await.expect("client FIN");
        let mut got = Vec::new();
        b_r.read_to_end(&mut got).await.expect("backend EOF");
        assert_eq!(got, b"hello");
        b_w.write_all(b"bye!")
            .await
            .expect("answer after half-close");
        b_w.shutdown().await.expect("backend FIN");
        got.clear();
        c_r.read_to_end(&mut got).await.expect("client EOF");
        assert_eq!(got, b"bye!");
        let r = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("relay ended")
            .expect("join");
        assert_eq!((r.end, r.up, r.down), (End::ClientClosed, 5, 4));
    }

    /// Nothing either way for `idle`: the relay ends with idle_timeout, on tokio's clock.
    #[tokio::test(start_paused = true)]
    async fn silence_for_idle_ends_it() {
        let (_client, gw_client) = tokio::io::duplex(64);
        let (gw_backend, _backend) = tokio::io::duplex(64);
        let (cr, cw) = tokio::io::split(gw_client);
        let (br, bw) = tokio::io::split(gw_backend);
        let r = super::relay(
            cr,
            cw,
            br,
            bw,
            Duration::from_secs(3600),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(r.end, End::IdleTimeout);
    }
}
