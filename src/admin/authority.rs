//! [`AuthorityShim`]: the admin Unix socket as tonic reads it, through a
//! [`Rewriter`]. Writes (server to client) go straight to the socket.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::info;

use wire::authority::{Rewriter, ShimError};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A Unix-socket admin connection as tonic sees it: reads go through a
/// [`Rewriter`], writes go straight to the socket.
pub struct AuthorityShim<S> {
    inner: S,
    rewriter: Rewriter,
    raw: Box<[u8]>,
    out: Vec<u8>,
    out_pos: usize,
    failed: Option<ShimError>,
}

impl<S> std::fmt::Debug for AuthorityShim<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityShim")
            .field("rewriter", &self.rewriter)
            .finish_non_exhaustive()
    }
}

impl<S> AuthorityShim<S> {
    pub fn new(inner: S) -> AuthorityShim<S> {
        AuthorityShim {
            inner,
            rewriter: Rewriter::new(),
            raw: vec![0; READ_CHUNK].into_boxed_slice(),
            out: Vec::new(),
            out_pos: 0,
            failed: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// How many `:authority` values this connection had replaced.
    pub fn replaced(&self) -> u64 {
        self.rewriter.replaced()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityShim<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(err) = &this.failed {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, err.clone())));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // A non-header payload goes straight into the caller's buffer.
            let direct = this.rewriter.passthrough_remaining();
            if direct > 0 {
                let limit = direct.min(buf.remaining());
                let mut part = ReadBuf::new(buf.initialize_unfilled_to(limit));
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
                let n = part.filled().len();
                buf.advance(n);
                this.rewriter.skip(n);
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(&mut this.raw);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            let filled = raw.filled();
            if filled.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Err(err) = this.rewriter.feed(filled, &mut this.out) {
                info!(error = %err, "admin API: closing a unix-socket connection");
                this.failed = Some(err);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityShim<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityShim<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use wire::authority::build::frame;
    use wire::authority::{Rewriter, PREFACE};

    use super::AuthorityShim;

    /// A literal header field without indexing, new name (RFC 7541 §6.2.2),
    /// for names and values under 127 bytes.
    fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = vec![0x00, name.len() as u8];
        out.extend_from_slice(name);
        out.push(value.len() as u8);
        out.extend_from_slice(value);
        out
    }

    /// Client bytes: the preface, SETTINGS, a request whose `:authority` is
    /// gRPC C-core's percent-encoded socket path, and a DATA frame bigger
    /// than the shim's read chunk.
    fn client_bytes() -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/mc_proxy.v1.ProxyAdminService/GetStatus"),
            (b":authority", b"srv%2Fmc-proxy%2Fmc-proxy.sock"),
            (b"content-type", b"application/grpc"),
        ] {
            block.extend(literal(name, value));
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        input.extend(frame(0x1, 0x4, 1, &block));
        input.extend(frame(0x0, 0, 1, &vec![9u8; 20_000]));
        input
    }

    #[tokio::test]
    async fn the_stream_reads_what_the_rewriter_writes_and_writes_through() {
        let input = client_bytes();
        let mut want = Vec::new();
        let mut rewriter = Rewriter::new();
        rewriter
            .feed(&input, &mut want)
            .expect("valid client bytes");
        assert_eq!(rewriter.replaced(), 1);
        let (mut client, server) = tokio::io::duplex(64);
        let mut shim = AuthorityShim::new(server);
        let writer = tokio::spawn(async move {
            for piece in input.chunks(37) {
                client.write_all(piece).await.expect("write to the shim");
            }
            let mut back = [0u8; 5];
            client.read_exact(&mut back).await.expect("read through");
            assert_eq!(&back, b"hello");
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 1000];
        while got.len() < want.len() {
            let n = shim.read(&mut buf).await.expect("read");
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, want);
        shim.write_all(b"hello").await.expect("write through");
        writer.await.expect("client task");
        assert_eq!(shim.replaced(), 1);
    }

    #[tokio::test]
    async fn the_stream_fails_after_hostile_input() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut shim = AuthorityShim::new(server);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        // A CONTINUATION with no HEADERS before it.
        input.extend(frame(0x9, 0x4, 1, &[]));
        client.write_all(&input).await.expect("write");
        let mut got = Vec::new();
        let err = loop {
            let mut buf = [0u8; 64];
            match shim.read(&mut buf).await {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(err) => break err,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("CONTINUATION"), "{err}");
        // The frames before the bad one were delivered.
        assert_eq!(got, input[..PREFACE.len() + 9]);
    }
}
