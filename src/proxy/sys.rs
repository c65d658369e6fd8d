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
