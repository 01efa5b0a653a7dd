//! splice(2) from socket to pipe to socket, through pipes from a per-thread pool (Linux). A
//! pipe is taken only for one round of bytes and goes back as soon as it is empty again, so
//! an idle connection holds no pipe (and no descriptors beyond its two sockets).

use std::cell::RefCell;
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
    Ok(splice(from, None, &pipe.w, None, CHUNK, flags())?)
}

/// Moves up to `len` bytes from the pipe into the socket.
pub(crate) fn drain(pipe: &Pipe, to: &TcpStream, len: usize) -> io::Result<usize> {
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
