//! The client's Initial CRYPTO stream, reassembled: frames may come in any
//! order, overlap, and repeat, across packets and datagrams.

use super::{work, Reject, MAX_CRYPTO_LEN};
use crate::hello::{self, ClientHello, Parse};

/// The stream bytes received so far, at their offsets.
///
/// Both buffers are allocated on the first CRYPTO byte and grow with the
/// highest offset seen (by doubling, never beyond [`MAX_CRYPTO_LEN`] bytes
/// of data and one bit per byte of received-map: 72 KiB in all).
#[derive(Debug, Default)]
pub(super) struct CryptoStream {
    /// Stream bytes `0..data.len()`; a byte is meaningful once received.
    data: Vec<u8>,
    /// One bit per byte of `data`: received or not.
    received: Vec<u64>,
    /// Every byte below this offset is received.
    contiguous: usize,
}

impl CryptoStream {
    /// Takes in one CRYPTO frame. Bytes already received must be the same
    /// again; any data ending past [`MAX_CRYPTO_LEN`] is refused, so the
    /// answer does not depend on the order frames come in.
    pub(super) fn insert(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Reject> {
        let end = offset.saturating_add(bytes.len() as u64);
        if end > MAX_CRYPTO_LEN as u64 {
            return Err(Reject::CryptoTooLarge);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        // Both fit in usize: they are at most MAX_CRYPTO_LEN.
        let start = offset as usize;
        let end = end as usize;
        self.grow_to(end);
        work(bytes.len());
        for (at, &byte) in (start..end).zip(bytes) {
            let (word, bit) = (at / 64, 1u64 << (at % 64));
            if self.received[word] & bit != 0 {
                if self.data[at] != byte {
                    return Err(Reject::CryptoConflict);
                }
            } else {
                self.data[at] = byte;
                self.received[word] |= bit;
            }
        }
        while self.contiguous < self.data.len()
            && self.received[self.contiguous / 64] & (1 << (self.contiguous % 64)) != 0
        {
            work(1);
            self.contiguous += 1;
        }
        Ok(())
    }

    fn grow_to(&mut self, end: usize) {
        if end <= self.data.len() {
            return;
        }
        if end > self.data.capacity() {
            let target = (self.data.capacity() * 2).clamp(end, MAX_CRYPTO_LEN.max(end));
            self.data.reserve_exact(target - self.data.len());
            let words = target.div_ceil(64);
            self.received.reserve_exact(words - self.received.len());
        }
        self.data.resize(end, 0);
        self.received.resize(end.div_ceil(64), 0);
    }

    /// The contiguous prefix: the stream from offset 0 to the first gap.
    pub(crate) fn prefix(&self) -> &[u8] {
        &self.data[..self.contiguous]
    }

    /// Bytes held for the stream (both buffers' capacity).
    pub(super) fn buffered(&self) -> usize {
        self.data.capacity() + self.received.capacity() * 8
    }

    /// The ClientHello, once the contiguous prefix holds the whole message.
    /// Before that, a wrong handshake type or an impossible length is known
    /// from the first four bytes; the rest is judged, by
    /// [`hello::parse_message`], once the whole message is in (a call per
    /// datagram would re-read the prefix each time).
    pub(super) fn hello(&self) -> Result<Option<ClientHello>, Reject> {
        let prefix = self.prefix();
        let header = &prefix[..prefix.len().min(4)];
        hello::parse_message(header).map_err(Reject::Hello)?;
        let Some(&[_, high, mid, low]) = prefix.first_chunk::<4>() else {
            return Ok(None);
        };
        let message_len = 4 + (usize::from(high) << 16 | usize::from(mid) << 8 | usize::from(low));
        if message_len > MAX_CRYPTO_LEN {
            return Err(Reject::CryptoTooLarge);
        }
        let Some(message) = prefix.get(..message_len) else {
            return Ok(None);
        };
        match hello::parse_message(message).map_err(Reject::Hello)? {
            Parse::Done(hello) => Ok(Some(hello)),
            // Unreachable with the whole message in hand; refused rather
            // than trusted.
            Parse::NeedMore => Err(Reject::Hello(hello::Reject::Malformed("hello body"))),
        }
    }
}
