//! [`AuthorityShim`]: the admin Unix socket as tonic reads it, through a
//! [`Rewriter`]. Writes (server to client) go straight to the socket.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::info;

use super::{Rewriter, ShimError};

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
