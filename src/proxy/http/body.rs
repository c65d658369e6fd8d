//! Bodies as they stream through: frames passed on as they come (data and
//! trailers), their bytes counted, nothing buffered here. The response body
//! carries the request's log record, which is written when the body ends
//! or is dropped (the client went away): one line per request, however it
//! ended.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::log::RequestLog;

/// Where an [`UpBody`] that was never read goes back when it is dropped:
/// a request whose connect failed can then go to another backend.
pub type BodySlot = Arc<std::sync::Mutex<Option<Incoming>>>;

/// The request body on its way to the backend.
pub struct UpBody {
    inner: Option<Incoming>,
    counted: Arc<AtomicU64>,
    /// Set: an unread body is put back here on drop.
    slot: Option<BodySlot>,
    read: bool,
}

impl UpBody {
    pub fn new(inner: Incoming, counted: Arc<AtomicU64>) -> UpBody {
        UpBody {
            inner: Some(inner),
            counted,
            slot: None,
            read: false,
        }
    }

    /// No body (a health check's GET).
    pub fn empty() -> UpBody {
        UpBody {
            inner: None,
            counted: Arc::default(),
            slot: None,
            read: false,
        }
    }

    /// A body that goes back to `slot` if it is dropped unread.
    pub fn reclaimable(inner: Incoming, counted: Arc<AtomicU64>, slot: BodySlot) -> UpBody {
        UpBody {
            inner: Some(inner),
            counted,
            slot: Some(slot),
            read: false,
        }
    }
}

impl Drop for UpBody {
    fn drop(&mut self) {
        if let (false, Some(slot)) = (self.read, &self.slot) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = self.inner.take();
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        this.read = true;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.counted.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

enum Down {
    Upstream(Incoming),
    Fixed(Option<Bytes>),
}

/// The response body on its way to the client.
pub struct DownBody {
    inner: Down,
    log: Option<RequestLog>,
}

impl DownBody {
    /// The backend's body.
    pub fn upstream(inner: Incoming, log: RequestLog) -> DownBody {
        DownBody {
            inner: Down::Upstream(inner),
            log: Some(log),
        }
    }

    /// A body made here (an error's one line, or none).
    pub fn fixed(bytes: Bytes, log: RequestLog) -> DownBody {
        DownBody {
            inner: Down::Fixed((!bytes.is_empty()).then_some(bytes)),
            log: Some(log),
        }
    }

    fn count(&mut self, n: usize) {
        if let Some(log) = &mut self.log {
            log.down += n as u64;
        }
    }

    fn finish(&mut self) {
        // Dropping the record writes the line.
        self.log.take();
    }
}

impl Body for DownBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Down::Upstream(inner) => Pin::new(inner).poll_frame(cx),
            Down::Fixed(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len();
                    this.count(n);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(log) = &mut this.log {
                    log.error = Some(e.to_string());
                }
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Down::Upstream(inner) => inner.is_end_stream(),
            Down::Fixed(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Down::Upstream(inner) => inner.size_hint(),
            Down::Fixed(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
