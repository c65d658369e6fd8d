//! The client socket as the TLS server reads it: the ClientHello bytes the
//! hello reader already took come first, then the socket; every byte is
//! counted both ways, and the time of the last one kept (for idle_timeout).
//!
//! The meter also keeps the request-header deadline (slowloris): it is
//! armed when the TLS handshake ends and, on HTTP/1.1, whenever a byte
//! arrives while no request is in flight (the first byte of the next
//! request), and disarmed when hyper hands a request's complete headers to
//! the service. An idle keep-alive connection has no deadline armed: it
//! lives until idle_timeout.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Byte counts and the last activity of one client connection, shared
/// with the idle watchdog.
#[derive(Debug)]
pub struct Meter {
    start: Instant,
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// Milliseconds from `start` to the last byte either way.
    last_ms: AtomicU64,
    /// Milliseconds from `start` (plus one; 0 = none) at which the
    /// request headers under way began.
    headers_since: AtomicU64,
    /// Requests whose response has not ended.
    in_flight: AtomicU32,
    /// Whether a byte with no request in flight arms the deadline (HTTP/1.1
    /// until the connection is upgraded).
    arm_on_read: AtomicBool,
    /// Whether a request has started on this connection yet, and the wake-up
    /// for one waiting on the first (a drain: see `drive`).
    seen_request: AtomicBool,
    first_request: tokio::sync::Notify,
}

impl Default for Meter {
    fn default() -> Meter {
        Meter::new()
    }
}

impl Meter {
    pub fn new() -> Meter {
        Meter {
            start: Instant::now(),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            headers_since: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            arm_on_read: AtomicBool::new(false),
            seen_request: AtomicBool::new(false),
            first_request: tokio::sync::Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Arms the request-header deadline now (if not already armed).
    pub fn arm_headers(&self) {
        let _ = self.headers_since.compare_exchange(
            0,
            self.now_ms() + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Whether bytes arriving between requests arm the deadline (HTTP/1.1).
    pub fn arm_on_read(&self, on: bool) {
        self.arm_on_read.store(on, Ordering::Relaxed);
    }

    /// A request's headers are complete: disarm; the request is in flight.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.headers_since.store(0, Ordering::Relaxed);
        // A load first: after the first request this is a read, not a
        // read-modify-write, per request.
        if !self.seen_request.load(Ordering::Relaxed)
            && !self.seen_request.swap(true, Ordering::Relaxed)
        {
            self.first_request.notify_one();
        }
    }

    /// Whether a request has started on this connection.
    pub fn seen_request(&self) -> bool {
        self.seen_request.load(Ordering::Relaxed)
    }

    /// Resolves once the first request has started (at once if it has).
    pub async fn first_request(&self) {
        if !self.seen_request() {
            self.first_request.notified().await;
        }
    }

    /// A request's response ended (or was dropped).
    pub fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// When the request headers under way began, if any are.
    pub fn headers_since(&self) -> Option<Instant> {
        match self.headers_since.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.start + std::time::Duration::from_millis(ms - 1)),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When a byte last went either way.
    pub fn last_activity(&self) -> Instant {
        self.start + std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The ClientHello bytes already read, then the socket.
pub struct ClientIo {
    prefix: Vec<u8>,
    taken: usize,
    stream: TcpStream,
    meter: Arc<Meter>,
}

impl ClientIo {
    /// `prefix` counts as read from the client (it was).
    pub fn new(prefix: Vec<u8>, stream: TcpStream, meter: Arc<Meter>) -> ClientIo {
        meter.up.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        meter.touch();
        ClientIo {
            prefix,
            taken: 0,
            stream,
            meter,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken < this.prefix.len() {
            let rest = &this.prefix[this.taken..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.taken += n;
            if this.taken == this.prefix.len() {
                // The hello is the TLS server's now: free the buffer.
                this.prefix = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            let meter = &this.meter;
            meter.up.fetch_add(n as u64, Ordering::Relaxed);
            meter.touch();
            if meter.arm_on_read.load(Ordering::Relaxed)
                && meter.in_flight.load(Ordering::Relaxed) == 0
            {
                meter.arm_headers();
            }
        }
        result
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            this.meter.down.fetch_add(n as u64, Ordering::Relaxed);
            this.meter.touch();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            this.meter.down.fetch_add(n as u64, Ordering::Relaxed);
            this.meter.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    #[tokio::test]
    async fn the_prefix_comes_first_then_the_socket_and_both_are_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let meter = Arc::new(Meter::new());
        let mut io = ClientIo::new(b"hello ".to_vec(), accepted, meter.clone());
        peer.write_all(b"world").await.unwrap();
        peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
        io.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
        assert_eq!(meter.up.load(Ordering::Relaxed), 11);
        assert_eq!(meter.down.load(Ordering::Relaxed), 4);
    }
}
