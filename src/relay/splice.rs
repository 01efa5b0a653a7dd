//! splice(2) from socket to pipe to socket, through pipes from a per-thread pool (Linux). A
//! pipe is taken only for one round of bytes and goes back as soon as it is empty again, so
//! an idle connection holds no pipe (and no descriptors beyond its two sockets).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::OwnedFd;

use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::net::TcpStream;

/// Bytes moved per splice call: the default pipe capacity.
const CHUNK: usize = 64 * 1024;
/// Pipes kept per worker thread between uses (two descriptors each).
const KEEP: usize = 16;

/// A non-blocking pipe; empty whenever it is in the pool.
pub(crate) struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    /// Set once splice(2) itself failed on this worker (a kernel or socket type without
    /// support): its relays copy from then on instead of failing each connection.
    static BROKEN: Cell<bool> = const { Cell::new(false) };
}

#[cfg(test)]
thread_local! {
    /// The next fill (true) or drain (false) on this thread fails with this errno.
    static FAIL_NEXT: Cell<Option<(bool, rustix::io::Errno)>> = const { Cell::new(None) };
}

/// Makes the next fill or drain on this thread fail with `errno` (tests only).
#[cfg(test)]
pub(crate) fn fail_next(fill: bool, errno: rustix::io::Errno) {
    FAIL_NEXT.with(|f| f.set(Some((fill, errno))));
}

#[cfg(test)]
fn injected(fill: bool) -> io::Result<()> {
    match FAIL_NEXT.with(Cell::get) {
        Some((f, errno)) if f == fill => {
            FAIL_NEXT.with(|c| c.set(None));
            Err(errno.into())
        }
        _ => Ok(()),
    }
}

#[cfg(not(test))]
fn injected(_fill: bool) -> io::Result<()> {
    Ok(())
}

/// Lets this thread splice again (tests only).
#[cfg(test)]
pub(crate) fn reset() {
    BROKEN.with(|b| b.set(false));
}

/// Whether relays started on this worker may splice.
pub(crate) fn usable() -> bool {
    !BROKEN.with(Cell::get)
}

/// An error that means splice(2) cannot be used here, rather than a broken socket.
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::INVAL, Errno::NOSYS, Errno::OPNOTSUPP]
        .iter()
        .any(|n| e.raw_os_error() == Some(n.raw_os_error()))
}

/// Notes a failed splice: logged once per worker, and splice is off on this worker when the
/// error says it is unsupported.
pub(crate) fn note_failure(e: &io::Error) {
    if is_unsupported(e) && !BROKEN.with(|b| b.replace(true)) {
        tracing::warn!(error = %e, "splice(2) failed; relays on this worker copy through buffers from now on");
    } else {
        tracing::debug!(error = %e, "splice(2) failed; this direction copies through a buffer");
    }
}

/// Moves what `pipe` holds into `buf` (at most its length), so the bytes can be written
/// without splice.
pub(crate) fn unload(pipe: &Pipe, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(&pipe.r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Pipes in this thread's pool.
pub(crate) fn pooled() -> usize {
    PIPES.with(|p| p.borrow().len())
}

pub(crate) fn take() -> io::Result<Pipe> {
    if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
        return Ok(p);
    }
    let (r, w) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    Ok(Pipe { r, w })
}

/// Returns an empty pipe to the pool.
pub(crate) fn put(p: Pipe) {
    PIPES.with(|pipes| {
        let mut pipes = pipes.borrow_mut();
        if pipes.len() < KEEP {
            pipes.push(p);
        }
    });
}

fn flags() -> SpliceFlags {
    SpliceFlags::NONBLOCK | SpliceFlags::MOVE
}

/// Moves up to a pipe's worth from the socket into the (empty) pipe.
pub(crate) fn fill(from: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    injected(true)?;
    Ok(splice(from, None, &pipe.w, None, CHUNK, flags())?)
}

/// Moves up to `len` bytes from the pipe into the socket.
pub(crate) fn drain(pipe: &Pipe, to: &TcpStream, len: usize) -> io::Result<usize> {
    injected(false)?;
    Ok(splice(&pipe.r, None, to, None, len, flags())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes go socket -> pipe -> socket unchanged, in pieces no larger than asked for, and
    /// the emptied pipe returns to the pool.
    #[tokio::test]
    async fn a_round_trip_through_a_pipe_keeps_every_byte() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let a = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
        let (mut writer, from) = (c.expect("connect"), s.expect("accept").0);
        let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
        let (to, mut reader) = (c.expect("connect"), s.expect("accept").0);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let expected = data.clone();
        let w = tokio::spawn(async move {
            writer.write_all(&data).await.expect("write");
        });
        let before = pooled();
        let mut moved = 0;
        let mut got = Vec::new();
        while moved < expected.len() {
            from.readable().await.expect("readable");
            let pipe = take().expect("pipe");
            let n = match from.try_io(tokio::io::Interest::READABLE, || fill(&from, &pipe)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    put(pipe);
                    continue;
                }
                Err(e) => panic!("fill: {e}"),
            };
            assert!(n > 0 && n <= CHUNK, "filled {n}");
            let mut left = n;
            while left > 0 {
                to.writable().await.expect("writable");
                match to.try_io(tokio::io::Interest::WRITABLE, || drain(&pipe, &to, left)) {
                    Ok(k) => left -= k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("drain: {e}"),
                }
            }
            put(pipe);
            moved += n;
            let mut buf = vec![0u8; n];
            reader.read_exact(&mut buf).await.expect("read");
            got.extend_from_slice(&buf);
        }
        w.await.expect("writer");
        assert!(got == expected, "bytes changed in the pipe");
        assert!(
            pooled() >= before.max(1),
            "the pipe did not return to the pool"
        );
    }
}
