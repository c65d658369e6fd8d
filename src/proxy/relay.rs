//! The relay: full duplex, half-close aware, idle-timed, force-closable.
//!
//! Readiness-driven: a direction waits for its source to be readable and only
//! then borrows a stack buffer for one read-and-write, so an idle connection
//! holds no buffer at all. Bytes that the destination cannot take at once are
//! the only thing copied to the heap, and reading stops until they are
//! written (no unbounded buffering: a stalled peer stalls its source).
//!
//! A FIN from one side is passed on as a FIN (`shutdown(Write)`); the other
//! direction keeps flowing. A reset or write error on one side resets the
//! other.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::shutdown::{Phase, Watcher};

use super::sys;

/// Bytes moved per read: large enough that bulk transfers need few syscalls.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions finished (FIN both ways, or a reset).
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// The server's drain time ran out.
    Shutdown,
}

#[derive(Debug)]
pub struct RelayResult {
    /// Client → backend bytes (after the hello).
    pub up: u64,
    /// Backend → client bytes.
    pub down: u64,
    pub end: RelayEnd,
    pub error: Option<String>,
}

/// Milliseconds since the relay started at the last byte moved.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Why one direction stopped.
enum PumpEnd {
    /// Source sent FIN; it was passed on.
    Eof,
    /// Reading the source failed (reset).
    ReadError(io::Error),
    /// Writing the destination failed (reset or broken pipe).
    WriteError(io::Error),
}

pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    idle: Duration,
    mut shutdown: Watcher,
) -> RelayResult {
    let activity = Activity {
        origin: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let up = pump(&client, &backend, &activity, &up_bytes);
    let down = pump(&backend, &client, &activity, &down_bytes);
    tokio::pin!(up, down);
    let mut up_done = false;
    let mut down_done = false;
    let mut end = RelayEnd::Closed;
    let mut error = None;
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);

    while !(up_done && down_done) {
        tokio::select! {
            result = &mut up, if !up_done => {
                up_done = true;
                if let Some(e) = finish(result, &client, &backend) {
                    error = Some(format!("client→backend: {e}"));
                    break;
                }
            }
            result = &mut down, if !down_done => {
                down_done = true;
                if let Some(e) = finish(result, &backend, &client) {
                    error = Some(format!("backend→client: {e}"));
                    break;
                }
            }
            () = &mut idle_timer => {
                let deadline = activity.last() + idle;
                if deadline <= Instant::now() {
                    end = RelayEnd::Idle;
                    break;
                }
                idle_timer.as_mut().reset(deadline);
            }
            () = shutdown.reached(Phase::Forced) => {
                end = RelayEnd::Shutdown;
                break;
            }
        }
    }
    RelayResult {
        up: up_bytes.load(Ordering::Relaxed),
        down: down_bytes.load(Ordering::Relaxed),
        end,
        error,
    }
}

/// Settles one finished direction. On an error, resets the side that did not
/// fail (a reset on one side resets the other) and returns the error text.
fn finish(result: PumpEnd, source: &TcpStream, destination: &TcpStream) -> Option<String> {
    match result {
        PumpEnd::Eof => None,
        PumpEnd::ReadError(e) => {
            sys::set_reset_on_close(destination);
            Some(e.to_string())
        }
        PumpEnd::WriteError(e) => {
            sys::set_reset_on_close(source);
            Some(e.to_string())
        }
    }
}

async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    counter: &AtomicU64,
) -> PumpEnd {
    loop {
        if let Err(e) = from.readable().await {
            return PumpEnd::ReadError(e);
        }
        // The buffer lives only inside this block, never across an await, so
        // an idle connection's future holds none.
        let leftover = {
            let mut buffer = [0u8; CHUNK];
            let read = match from.try_read(&mut buffer) {
                Ok(0) => {
                    // FIN: pass it on; the other direction keeps flowing.
                    return match sys::shutdown_write(to) {
                        Ok(()) => PumpEnd::Eof,
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => PumpEnd::Eof,
                        Err(e) => PumpEnd::WriteError(e),
                    };
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return PumpEnd::ReadError(e),
            };
            activity.touch();
            counter.fetch_add(read as u64, Ordering::Relaxed);
            let mut written = 0;
            while written < read {
                match to.try_write(&buffer[written..read]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return PumpEnd::WriteError(e),
                }
            }
            (written < read).then(|| buffer[written..read].to_vec())
        };
        if let Some(rest) = leftover {
            if let Err(e) = write_all(to, &rest, activity).await {
                return PumpEnd::WriteError(e);
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8], activity: &Activity) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => {
                data = &data[n..];
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
