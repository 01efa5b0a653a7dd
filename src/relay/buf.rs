//! Relay buffers: a per-thread pool of 64 KiB buffers, and [`ReadAhead`], which reads a
//! TLS stream's socket a whole buffer at a time.
//!
//! Buffers exist only while bytes are in flight: a relay takes one when a socket is readable
//! and returns it as soon as those bytes are written, so an idle connection holds none.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use tokio::io::Interest;

/// Size of one relay buffer: large enough that bulk transfers move in few syscalls.
pub(super) const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per worker thread between uses; beyond that they are freed, so a burst does
/// not pin memory forever.
const POOL_KEEP: usize = 32;

thread_local! {
    static BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A per-thread free list of relay buffers. A task may move threads between take and put;
/// that only moves a buffer from one thread's list to another's.
pub(super) struct BufPool;

impl BufPool {
    pub(super) fn take() -> Box<[u8]> {
        BUFS.with(|b| b.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
    }

    pub(super) fn put(buf: Box<[u8]>) {
        BUFS.with(|b| {
            let mut b = b.borrow_mut();
            if b.len() < POOL_KEEP {
                b.push(buf);
            }
        });
    }
}

/// A TCP socket under a TLS stream, read ahead through a pooled buffer.
///
/// rustls reads at most 4 KiB per call, so a bulk TLS transfer over a bare socket costs a
/// syscall per 4 KiB. This reads up to a whole pooled buffer at once and hands it out in the
/// pieces asked for; the buffer goes back to the pool as soon as it is empty, so an idle
/// connection holds none. Writes go straight to the socket.
pub(crate) struct ReadAhead {
    io: TcpStream,
    ahead: Option<(Box<[u8]>, usize, usize)>,
}

impl ReadAhead {
    pub(crate) fn new(io: TcpStream) -> Self {
        Self { io, ahead: None }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some((buf, off, len)) = &mut this.ahead {
                let n = (*len - *off).min(out.remaining());
                out.put_slice(&buf[*off..*off + n]);
                *off += n;
                if *off == *len {
                    if let Some((buf, ..)) = this.ahead.take() {
                        BufPool::put(buf);
                    }
                }
                return Poll::Ready(Ok(()));
            }
            ready!(this.io.poll_read_ready(cx))?;
            let mut buf = BufPool::take();
            match read_draining(&this.io, &mut buf) {
                Ok(0) => {
                    BufPool::put(buf);
                    return Poll::Ready(Ok(()));
                }
                Ok(len) => this.ahead = Some((buf, 0, len)),
                Err(e) => {
                    BufPool::put(buf);
                    if !retry(&e) {
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// One read from a socket tokio saw readable. A read shorter than `buf` leaves the socket
/// drained, so tokio is told to forget the readiness (by answering WouldBlock inside
/// `try_io`, with the bytes kept aside): the next poll then waits for the next event instead
/// of spending a syscall on a read that would fail.
pub(crate) fn read_draining(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    let r = from.try_io(Interest::READABLE, || {
        // recv(2), not read(2): a socket read through the VFS pays for file-position
        // bookkeeping it does not use (a few percent of a small message's kernel time).
        got = rustix::net::recv(from, &mut *buf, rustix::net::RecvFlags::empty())?.0;
        if got > 0 && got < buf.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match r {
        _ if got > 0 => Ok(got),
        Ok(()) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Errors after which the same call is simply tried again.
pub(super) fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}
