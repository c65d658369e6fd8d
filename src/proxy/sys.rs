//! Socket options the pipeline needs, in one place.

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
#[allow(unsafe_code)]
pub fn recv<'a>(
    stream: &TcpStream,
    buffer: &'a mut [std::mem::MaybeUninit<u8>],
) -> io::Result<&'a [u8]> {
    let n = SockRef::from(stream).recv(buffer)?;
    // SAFETY: recv(2) wrote (initialised) the first `n` bytes of `buffer`,
    // and socket2 never writes uninitialised bytes into it; `n` is at most
    // `buffer.len()`, and the returned slice borrows `buffer`, so nothing
    // else can write to it while the slice is alive.
    Ok(unsafe { std::slice::from_raw_parts(buffer.as_ptr().cast::<u8>(), n.min(buffer.len())) })
}

/// A kernel pipe, both ends non-blocking and close-on-exec: the in-kernel
/// buffer that [`splice`] moves socket pages through without copying them to
/// user space. Closing happens when the [`OwnedFd`]s drop.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub struct Pipe {
    pub read: std::os::fd::OwnedFd,
    pub write: std::os::fd::OwnedFd,
}

/// Creates a [`Pipe`] (`pipe2(O_NONBLOCK | O_CLOEXEC)`).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn pipe() -> io::Result<Pipe> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two c_ints, which is what
    // pipe2(2) writes into; it reads nothing else from our memory.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open, new, and owned
    // by nobody else; each is wrapped exactly once and closed on drop.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok(Pipe { read, write })
}

/// Moves up to `len` bytes from `from` to `to` inside the kernel
/// (`splice(2)` with `SPLICE_F_MOVE | SPLICE_F_NONBLOCK`); one of the two
/// must be a pipe. `Ok(0)` from a socket into an empty pipe is end of stream.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn splice(
    from: std::os::fd::BorrowedFd<'_>,
    to: std::os::fd::BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: both descriptors are borrowed, so they stay open for the whole
    // call; null offsets are what splice(2) requires for pipes and sockets
    // (it then uses and updates the file position, which sockets and pipes
    // don't have). No user memory is read or written.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Asks for `pipe`'s capacity to be `bytes` (`fcntl(F_SETPIPE_SZ)`); returns
/// the capacity the kernel granted (it rounds up to a power-of-two number of
/// pages), or the error (e.g. `EPERM` past the per-user pipe-memory limit).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn set_pipe_size(pipe: &Pipe, bytes: usize) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is owned by `pipe` and open for the whole call;
    // F_SETPIPE_SZ takes an int argument and touches no user memory.
    let granted = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, bytes) };
    if granted < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(granted as usize)
    }
}
