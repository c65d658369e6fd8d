//! The packet layer: QUIC variable-length integers, long headers, the walk
//! over the packets coalesced in one datagram (RFC 9000 §12.2, §17.2) and
//! packet number decoding (RFC 9000 §17.1, Appendix A.3). Reads only; keys
//! and frames are elsewhere.

use super::{work, ConnectionId, LongHeader, PacketKind, Reject, Skip, Version, MAX_CID_LEN};

/// Why a walk stopped short of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The datagram is not for the reader (about the first packet only).
    Skip(Skip),
    Reject(Reject),
}

impl From<Reject> for Stop {
    fn from(reject: Reject) -> Self {
        Stop::Reject(reject)
    }
}

/// A cursor over bytes that must all be in hand: running out is malformed
/// (a datagram is never continued by the next one).
pub(super) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Cursor<'a> {
        Cursor { bytes, pos: 0 }
    }

    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(super) fn at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }

    /// The next byte, not consumed.
    pub(super) fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    pub(super) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Reject> {
        if n > self.remaining() {
            return Err(Reject::Malformed(what));
        }
        let taken = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(taken)
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, Reject> {
        Ok(self.take(1, what)?[0])
    }

    /// A variable-length integer (RFC 9000 §16) and how many bytes it took.
    pub(super) fn varint_and_len(&mut self, what: &'static str) -> Result<(u64, usize), Reject> {
        let first = self.u8(what)?;
        let len = 1 << (first >> 6);
        let rest = self.take(len - 1, what)?;
        let value = rest.iter().fold(u64::from(first & 0x3f), |value, &byte| {
            value << 8 | u64::from(byte)
        });
        Ok((value, len))
    }

    pub(super) fn varint(&mut self, what: &'static str) -> Result<u64, Reject> {
        Ok(self.varint_and_len(what)?.0)
    }

    /// A varint length that must fit in what is left.
    pub(super) fn length(&mut self, what: &'static str) -> Result<usize, Reject> {
        let len = self.varint(what)?;
        match usize::try_from(len) {
            Ok(len) if len <= self.remaining() => Ok(len),
            _ => Err(Reject::Malformed(what)),
        }
    }

    fn connection_id(&mut self, what: &'static str) -> Result<ConnectionId, Reject> {
        let len = usize::from(self.u8(what)?);
        if len > MAX_CID_LEN {
            return Err(Reject::Malformed(what));
        }
        let bytes = self.take(len, what)?;
        ConnectionId::new(bytes).ok_or(Reject::Malformed(what))
    }
}

/// One long-header packet of a datagram, its bounds known, still protected.
pub(super) struct Packet<'a> {
    pub(super) header: LongHeader,
    /// The whole packet: from its first byte to the end of its Length.
    pub(super) bytes: &'a [u8],
    /// Where the (protected) packet number starts in `bytes`.
    pub(super) pn_offset: usize,
}

/// The first byte, version and connection IDs of the long header at the
/// start of `bytes` (the version-independent part, RFC 8999 §5.1, with
/// v1/v2's 20-byte limit), and where they end. For the first packet of a
/// datagram: an empty datagram, a short header or another version is a
/// [`Skip`].
pub(super) fn long_header(bytes: &[u8]) -> Result<(LongHeader, usize), Stop> {
    let mut cursor = Cursor::new(bytes);
    let Some(first) = cursor.peek() else {
        return Err(Stop::Skip(Skip::Empty));
    };
    if first & 0x80 == 0 {
        return Err(Stop::Skip(Skip::ShortHeader));
    }
    cursor.pos = 1;
    let version = cursor.take(4, "long header version")?;
    let version = u32::from_be_bytes([version[0], version[1], version[2], version[3]]);
    let Some(version) = Version::from_wire(version) else {
        return Err(Stop::Skip(Skip::UnsupportedVersion(version)));
    };
    let dcid = cursor.connection_id("destination connection id")?;
    let scid = cursor.connection_id("source connection id")?;
    let header = LongHeader {
        version,
        kind: version.packet_kind(first),
        dcid,
        scid,
    };
    Ok((header, cursor.pos))
}

/// Walks the packets coalesced in one datagram, first to last.
///
/// The first packet must be a long header of v1 or v2 (else the whole
/// datagram is a [`Skip`]); every packet after it of the same version and
/// DCID must parse. The walk ends, ignoring the rest of the datagram, at its
/// end, at a byte with the header form bit clear (a short-header packet,
/// which runs to the end of the datagram, or padding zeros as aioquic
/// sends), at a packet of another version or DCID (RFC 9000 §12.2: "SHOULD
/// ignore"), or at a Retry (it has no Length; clients never send one).
pub(super) struct Walk<'a> {
    datagram: &'a [u8],
    pos: usize,
    first: Option<(Version, ConnectionId)>,
}

impl<'a> Walk<'a> {
    pub(super) fn new(datagram: &'a [u8]) -> Walk<'a> {
        Walk {
            datagram,
            pos: 0,
            first: None,
        }
    }

    pub(super) fn next_packet(&mut self) -> Result<Option<Packet<'a>>, Stop> {
        let rest = &self.datagram[self.pos..];
        work(1);
        let (header, after_ids) = match (long_header(rest), &self.first) {
            (Ok(parsed), None) => parsed,
            (Ok((header, _)), Some((version, dcid)))
                if header.version != *version || header.dcid != *dcid =>
            {
                return Ok(None)
            }
            (Ok(parsed), Some(_)) => parsed,
            // The end, a short header, padding or another version.
            (Err(Stop::Skip(_)), Some(_)) => return Ok(None),
            (Err(stop), _) => return Err(stop),
        };
        if header.kind == PacketKind::Retry {
            return Ok(None);
        }
        self.first.get_or_insert((header.version, header.dcid));
        let mut cursor = Cursor::new(rest);
        cursor.pos = after_ids;
        if header.kind == PacketKind::Initial {
            let token_len = cursor.length("token length")?;
            cursor.take(token_len, "token")?;
        }
        let len = cursor.length("packet length past the datagram end")?;
        let pn_offset = cursor.pos();
        let end = pn_offset + len;
        self.pos += end;
        Ok(Some(Packet {
            header,
            bytes: &rest[..end],
            pn_offset,
        }))
    }
}

/// The full packet number from its truncated `bits`-bit encoding, given
/// the largest packet number decrypted so far in this space (RFC 9000
/// Appendix A.3). With none yet, the expected number is 0, and a packet
/// number sent while nothing is acknowledged comes out as sent (RFC 9000
/// §17.1 makes the client use enough bits).
pub(super) fn decode_packet_number(largest: Option<u64>, truncated: u64, bits: u32) -> u64 {
    let expected = largest.map_or(0, |largest| largest + 1);
    let window = 1u64 << bits;
    let half_window = window / 2;
    let mask = window - 1;
    let candidate = (expected & !mask) | truncated;
    if candidate + half_window <= expected && candidate < (1 << 62) - window {
        candidate + window
    } else if candidate > expected + half_window && candidate >= window {
        candidate - window
    } else {
        candidate
    }
}
