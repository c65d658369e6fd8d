//! The system calls the pipeline needs beyond tokio's, in one place: socket
//! options (through socket2), `recv` into uninitialised memory, pipes and
//! `splice` (through rustix). No `unsafe` code: both crates wrap the calls
//! safely.

use std::io;
use std::net::Shutdown;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;

/// Makes the next close of `stream` send an RST instead of a FIN
/// (`SO_LINGER` with a zero timeout).
pub fn set_reset_on_close(stream: &TcpStream) {
    // Failing to set it leaves a plain close, which is still a close.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Closes `stream` with an RST: no data, no FIN.
pub fn reset(stream: TcpStream) {
    set_reset_on_close(&stream);
    drop(stream);
}

/// Sends a FIN on `stream` (half close); reading continues.
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).shutdown(Shutdown::Write)
}

/// Reads once from `stream` into `buffer`, which need not be initialised
/// (`recv(2)`, no flags), and returns the bytes read: empty at end of stream.
pub fn recv<'a>(
    stream: &TcpStream,
    buffer: &'a mut [std::mem::MaybeUninit<u8>],
) -> io::Result<&'a [u8]> {
    let ((read, _unfilled), _) =
        rustix::net::recv(stream, buffer, rustix::net::RecvFlags::empty())?;
    Ok(read)
}

/// A kernel pipe, both ends non-blocking and close-on-exec: the in-kernel
/// buffer that [`splice`] moves socket pages through without copying them to
/// user space. Closing happens when the [`OwnedFd`](std::os::fd::OwnedFd)s
/// drop.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub struct Pipe {
    pub read: std::os::fd::OwnedFd,
    pub write: std::os::fd::OwnedFd,
}

/// Creates a [`Pipe`] (`pipe2(O_NONBLOCK | O_CLOEXEC)`).
#[cfg(target_os = "linux")]
pub fn pipe() -> io::Result<Pipe> {
    use rustix::pipe::PipeFlags;
    let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    Ok(Pipe { read, write })
}

/// Moves up to `len` bytes from `from` to `to` inside the kernel
/// (`splice(2)` with `SPLICE_F_MOVE | SPLICE_F_NONBLOCK`); one of the two
/// must be a pipe. `Ok(0)` from a socket into an empty pipe is end of stream.
#[cfg(target_os = "linux")]
pub fn splice(
    from: std::os::fd::BorrowedFd<'_>,
    to: std::os::fd::BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    use rustix::pipe::SpliceFlags;
    // No offsets: pipes and sockets have no file position.
    let moved = rustix::pipe::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
    )?;
    Ok(moved)
}

/// Asks for `pipe`'s capacity to be `bytes` (`fcntl(F_SETPIPE_SZ)`); returns
/// the capacity the kernel granted (it rounds up to a power-of-two number of
/// pages), or the error (e.g. `EPERM` past the per-user pipe-memory limit).
#[cfg(target_os = "linux")]
pub fn set_pipe_size(pipe: &Pipe, bytes: usize) -> io::Result<usize> {
    Ok(rustix::pipe::fcntl_setpipe_size(&pipe.write, bytes)?)
}
