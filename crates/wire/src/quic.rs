//! QUIC Initial reader: a client's first datagrams in, need-more / done /
//! reject out, so that a QUIC flow can be routed by the SNI of its
//! ClientHello (SPEC §6.5) without terminating it. No I/O. Never blocks,
//! never panics on input, never reads past the datagram it is given, and
//! holds at most [`MAX_CRYPTO_LEN`] bytes of CRYPTO data per flow.
//!
//! An [`InitialReader`] is kept per pending flow and handed each datagram
//! of it, in whatever order they arrive. Each call answers one of:
//!
//! - `Ok(Parse::NeedMore)`: the datagram's Initials were taken in; the
//!   ClientHello is not whole yet.
//! - `Ok(Parse::Done(hello))`: the whole ClientHello is in hand: its SNI
//!   and ALPN, the QUIC version, and the client's DCID (the flow's key) and
//!   SCID.
//! - `Ok(Parse::Skipped(why))`: the datagram carries no client Initial of
//!   v1 or v2 (empty, a short header, another version — a server would
//!   answer Version Negotiation —, or only 0-RTT and Handshake packets).
//!   Nothing was taken from it: the reader is as it was, so this answer
//!   never depends on the datagrams before, and the caller passes such
//!   datagrams on (or drops them) as it sees fit.
//! - `Err(reject)`: the flow cannot be a valid client Initial flight.
//!
//! Once the answer is `Done` or an error, every later call repeats it.
//! [`parse`] is one datagram on a fresh reader; [`peek`] reads the first
//! packet's header without keys, so a caller can key flows by DCID before
//! it has a reader.
//!
//! # What is read
//!
//! - **Datagrams** (RFC 9000 §12.2): the packets coalesced in one datagram
//!   are walked in order. The first must be a long header (the header form
//!   bit; the fixed bit is not checked, RFC 9287 lets clients clear it) of
//!   QUIC v1 (RFC 9000) or v2 (RFC 9369), else the datagram is
//!   [`Skipped`](Parse::Skipped). Every later packet of the same version and
//!   DCID must parse. The walk ends, ignoring the rest of the datagram, at
//!   its end, at a byte with the header form bit clear (a short-header
//!   packet, or the zero padding some clients put after their packets), at a
//!   packet of another version or DCID ("SHOULD ignore", RFC 9000 §12.2), or
//!   at a Retry (clients never send one; it has no Length). 0-RTT and
//!   Handshake packets are stepped over by their Length, never decrypted.
//!   A datagram is taken in whole before the answer: every packet in it is
//!   checked even if an earlier one completed the hello.
//! - **Long headers** (RFC 9000 §17.2): DCID and SCID of at most 20 bytes,
//!   an Initial's token (varint length, any content), a Length that fits in
//!   the datagram. v2 has its own packet type bits (Initial is 0b01).
//! - **Initial packets** (RFC 9001 §5): the keys come from the version's
//!   salt and the DCID of the flow's FIRST Initial, which must be at least 8
//!   bytes (RFC 9000 §7.2). Every later Initial must carry the same version,
//!   DCID and SCID — a client keeps them until it hears from the server, and
//!   a pending flow has not — or the flow is rejected ([`Reject::OtherFlow`],
//!   whichever order the datagrams come in). Header protection is removed
//!   with the 16-byte sample 4 bytes after the packet number's start (the
//!   packet must be long enough to hold it), the packet number decoded
//!   against the largest one decrypted so far (RFC 9000 Appendix A.3), the
//!   payload opened with AES-128-GCM, the unprotected header as associated
//!   data; a failure is [`Reject::Decrypt`]. The reserved bits must then be
//!   zero.
//! - **Frames** (RFC 9000 §12.4): at least one; PADDING, PING, ACK (types
//!   0x02/0x03, ECN counts included; their values are not judged) and
//!   CRYPTO. CONNECTION_CLOSE is [`Reject::ConnectionClose`]; any other type
//!   is [`Reject::ForbiddenFrame`].
//! - **The CRYPTO stream**: frames are placed at their offsets, in any
//!   order, over any number of packets and datagrams. Bytes received twice
//!   must be equal ([`Reject::CryptoConflict`]); data ending past
//!   [`MAX_CRYPTO_LEN`] is [`Reject::CryptoTooLarge`]. The stream carries
//!   the handshake messages without TLS records: once the contiguous prefix
//!   from offset 0 holds the whole ClientHello message it is read by
//!   [`hello::parse_message`], with the TCP reader's checks; its rejections
//!   are [`Reject::Hello`]. A wrong handshake type or an impossible length
//!   is known from the first four bytes.
//!
//! # Order
//!
//! Once all of a flow's datagrams are in, the answer does not depend on the
//! order they came in — need-more, or `Done` with the same fields — but for
//! what follows from answering as soon as the hello is whole and from
//! stopping at the first problem: when the datagrams hold several problems,
//! which one is named may depend on the order, and a datagram at odds with
//! the others (another DCID, conflicting CRYPTO bytes) rejects the flow
//! only if it comes before the hello is whole. Packet numbers are decoded
//! against the largest one decrypted, so an Initial reordered by more than
//! half the window of its packet number's encoding fails to decrypt; a
//! client's few first Initials are far from that.
//!
//! Not checked here: the 1,200-byte minimum of a datagram carrying a client
//! Initial (RFC 9000 §14.1), which is the caller's to apply to a flow's
//! first datagram ([`MIN_INITIAL_DATAGRAM_LEN`]) so that the reader can be
//! fed hand-made ones; ACK ranges' values; tokens.
//!
//! # Cost
//!
//! Linear in the bytes of the datagrams: each packet is copied once into
//! the caller's scratch buffer and decrypted there, each frame read once,
//! each CRYPTO byte placed once (one bit per byte marks it received), and
//! the ClientHello parsed once. The keys are derived once per flow. State
//! per flow: the keys and connection IDs (about 1 KiB, inline) and, from
//! the first CRYPTO byte, the stream buffer and its received-map (up to
//! 72 KiB). Nothing is allocated per datagram once the scratch buffer has
//! grown to the largest packet, but the strings of `Done`.

use std::fmt;

use crate::hello;

mod frames;
mod keys;
mod packet;
mod stream;

#[cfg(any(test, feature = "testing"))]
pub mod build;
#[cfg(any(test, feature = "testing"))]
pub mod checks;
#[cfg(test)]
mod tests;

use keys::{Keys, SAMPLE_LEN, SAMPLE_OFFSET};
use packet::{Stop, Walk};
use stream::CryptoStream;

/// Longest connection ID in QUIC v1 and v2 (RFC 9000 §17.2).
pub const MAX_CID_LEN: usize = 20;

/// Shortest DCID of a client's first Initial (RFC 9000 §7.2).
pub const MIN_INITIAL_DCID_LEN: usize = 8;

/// Most CRYPTO stream bytes buffered per flow (SPEC §6.5): data ending past
/// this offset is [`Reject::CryptoTooLarge`].
pub const MAX_CRYPTO_LEN: usize = 64 * 1024;

/// A client pads every datagram carrying an Initial to at least this many
/// bytes (RFC 9000 §14.1). Not checked by the reader; the caller drops
/// shorter first datagrams of unknown flows (SPEC §6.5).
pub const MIN_INITIAL_DATAGRAM_LEN: usize = 1200;

/// A QUIC version whose Initials the reader can decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// QUIC version 1, RFC 9000 (0x00000001).
    V1,
    /// QUIC version 2, RFC 9369 (0x6b3343cf).
    V2,
}

impl Version {
    /// The version field's value.
    pub const fn wire(self) -> u32 {
        match self {
            Version::V1 => 0x0000_0001,
            Version::V2 => 0x6b33_43cf,
        }
    }

    /// The version a version field names, if it is v1 or v2.
    pub const fn from_wire(version: u32) -> Option<Version> {
        match version {
            0x0000_0001 => Some(Version::V1),
            0x6b33_43cf => Some(Version::V2),
            _ => None,
        }
    }

    /// The long header packet type of a first byte (RFC 9000 §17.2, RFC
    /// 9369 §3.2).
    pub const fn packet_kind(self, first_byte: u8) -> PacketKind {
        let bits = (first_byte >> 4) & 0x03;
        match (self, bits) {
            (Version::V1, 0b00) | (Version::V2, 0b01) => PacketKind::Initial,
            (Version::V1, 0b01) | (Version::V2, 0b10) => PacketKind::ZeroRtt,
            (Version::V1, 0b10) | (Version::V2, 0b11) => PacketKind::Handshake,
            _ => PacketKind::Retry,
        }
    }

    /// The type bits (`0..=3`, before shifting into place) of a packet kind.
    pub const fn packet_type_bits(self, kind: PacketKind) -> u8 {
        let v1 = match kind {
            PacketKind::Initial => 0,
            PacketKind::ZeroRtt => 1,
            PacketKind::Handshake => 2,
            PacketKind::Retry => 3,
        };
        match self {
            Version::V1 => v1,
            Version::V2 => (v1 + 1) % 4,
        }
    }

    /// The Initial salt (RFC 9001 §5.2, RFC 9369 §3.3.1).
    fn initial_salt(self) -> &'static [u8; 20] {
        match self {
            Version::V1 => &[
                0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8,
                0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a,
            ],
            Version::V2 => &[
                0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26,
                0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9,
            ],
        }
    }

    /// The HKDF labels of the packet key, IV and header protection key
    /// (RFC 9001 §5.1, RFC 9369 §3.3.2).
    fn key_labels(self) -> [&'static [u8]; 3] {
        match self {
            Version::V1 => [b"quic key", b"quic iv", b"quic hp"],
            Version::V2 => [b"quicv2 key", b"quicv2 iv", b"quicv2 hp"],
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Version::V1 => f.write_str("v1"),
            Version::V2 => f.write_str("v2"),
        }
    }
}

/// A long header packet's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketKind {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

/// A connection ID: 0 to 20 bytes, held inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ConnectionId {
    len: u8,
    bytes: [u8; MAX_CID_LEN],
}

impl ConnectionId {
    /// `None` if longer than [`MAX_CID_LEN`].
    pub fn new(bytes: &[u8]) -> Option<ConnectionId> {
        let mut id = ConnectionId {
            len: u8::try_from(bytes.len()).ok()?,
            bytes: [0; MAX_CID_LEN],
        };
        id.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(id)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::ops::Deref for ConnectionId {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionId({self})")
    }
}

/// Lower-case hex.
impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_bytes()
            .iter()
            .try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

/// The version, type and connection IDs of a v1/v2 long header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongHeader {
    pub version: Version,
    pub kind: PacketKind,
    pub dcid: ConnectionId,
    pub scid: ConnectionId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// The datagram's Initials were taken in; the ClientHello is not whole
    /// yet: feed the flow's next datagram.
    NeedMore,
    /// The whole ClientHello is in hand.
    Done(InitialHello),
    /// The datagram carries no client Initial; nothing was taken from it.
    Skipped(Skip),
}

/// What a flow's Initials say, once the ClientHello is whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialHello {
    /// server_name host_name exactly as sent (not normalised), if any.
    pub sni: Option<String>,
    /// ALPN protocol names in order (lossy UTF-8), empty if none.
    pub alpn: Vec<String>,
    pub version: Version,
    /// The DCID of the client's first Initial: what the Initial keys come
    /// from, and what the client sends to until the server answers.
    pub dcid: ConnectionId,
    /// The client's SCID: where the server's packets go.
    pub scid: ConnectionId,
}

/// Why a datagram carries nothing for the reader. These say nothing about
/// the flow: the reader's state is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Skip {
    /// A datagram of zero bytes.
    Empty,
    /// The first packet has a short header (the header form bit is clear):
    /// a 1-RTT packet of an established connection, or not QUIC.
    ShortHeader,
    /// A long header of a version other than v1 and v2: a server would
    /// answer with Version Negotiation (RFC 9000 §6). Version 0 is itself
    /// a Version Negotiation packet, which must never be answered.
    UnsupportedVersion(u32),
    /// v1/v2 long-header packets, but no Initial among them (0-RTT,
    /// Handshake, or a Retry).
    NoInitial,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Empty => f.write_str("empty_datagram"),
            Skip::ShortHeader => f.write_str("short_header"),
            Skip::UnsupportedVersion(version) => write!(f, "unsupported_version {version:#010x}"),
            Skip::NoInitial => f.write_str("no_initial"),
        }
    }
}

/// Why a flow cannot be a client's Initial flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reject {
    /// A v1/v2 long header or a decrypted payload that does not parse: a
    /// connection ID over 20 bytes, a varint, token, Length or frame running
    /// past its datagram or packet, a packet too short for the header
    /// protection sample, a packet without frames. The text names what.
    Malformed(&'static str),
    /// The flow's first Initial has a DCID shorter than 8 bytes (RFC 9000
    /// §7.2).
    ShortDcid,
    /// An Initial whose version, DCID or SCID differs from the flow's first
    /// Initial's.
    OtherFlow,
    /// The Initial does not decrypt with the flow's keys (AES-GCM tag
    /// mismatch): corrupted, or not a client's.
    Decrypt,
    /// The reserved header bits are not zero once protection is removed
    /// (RFC 9000 §17.2).
    ReservedBits,
    /// A frame type a client may not send in an Initial (RFC 9000 §12.4),
    /// or an allowed one in more than one byte.
    ForbiddenFrame(u64),
    /// CONNECTION_CLOSE: allowed in an Initial, but the client has given up
    /// and there is nothing to route.
    ConnectionClose,
    /// CRYPTO data ending past [`MAX_CRYPTO_LEN`], or a ClientHello longer
    /// than that.
    CryptoTooLarge,
    /// The same CRYPTO stream bytes received with different values.
    CryptoConflict,
    /// The CRYPTO stream is not a valid ClientHello: the hello reader's
    /// reason.
    Hello(hello::Reject),
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::Malformed(what) => write!(f, "malformed: {what}"),
            Reject::ShortDcid => f.write_str("short_dcid"),
            Reject::OtherFlow => f.write_str("other_flow"),
            Reject::Decrypt => f.write_str("decrypt_failed"),
            Reject::ReservedBits => f.write_str("reserved_bits"),
            Reject::ForbiddenFrame(frame_type) => write!(f, "forbidden_frame {frame_type:#x}"),
            Reject::ConnectionClose => f.write_str("connection_close"),
            Reject::CryptoTooLarge => f.write_str("crypto_too_large"),
            Reject::CryptoConflict => f.write_str("crypto_conflict"),
            Reject::Hello(reject) => write!(f, "hello: {reject}"),
        }
    }
}

impl std::error::Error for Reject {}

/// What the first packet of a datagram is, read without keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// A v1/v2 long header.
    Long(LongHeader),
    /// Nothing for the reader (as [`Parse::Skipped`], but a datagram of
    /// 0-RTT packets is `Long`).
    Skipped(Skip),
    /// A v1/v2 long header whose connection IDs do not parse.
    Rejected(Reject),
}

/// Reads the first byte, version and connection IDs of a datagram's first
/// packet, without keys and without looking further: for a caller to key a
/// flow by its DCID, or to pass on a datagram of a known flow.
pub fn peek(datagram: &[u8]) -> Peek {
    match packet::long_header(datagram) {
        Ok((header, _)) => Peek::Long(header),
        Err(Stop::Skip(skip)) => Peek::Skipped(skip),
        Err(Stop::Reject(reject)) => Peek::Rejected(reject),
    }
}

/// Reads one datagram on a fresh reader: `InitialReader::new().read(..)`.
pub fn parse(datagram: &[u8]) -> Result<Parse, Reject> {
    InitialReader::new().read(datagram, &mut Vec::new())
}

/// An Initial reader: one per pending flow, fed its datagrams. See the
/// module documentation.
#[derive(Default)]
pub struct InitialReader {
    /// Set by the flow's first Initial.
    flow: Option<Flow>,
    /// The largest Initial packet number decrypted.
    largest_pn: Option<u64>,
    stream: CryptoStream,
    /// The answer once there is one; later calls repeat it.
    answer: Option<Result<InitialHello, Reject>>,
}

/// What the flow's first Initial fixed.
struct Flow {
    version: Version,
    dcid: ConnectionId,
    scid: ConnectionId,
    keys: Keys,
}

impl fmt::Debug for InitialReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitialReader")
            .field("version", &self.version())
            .field("dcid", &self.dcid())
            .field("largest_pn", &self.largest_pn)
            .field("crypto_prefix", &self.stream.prefix().len())
            .field("answer", &self.answer)
            .finish()
    }
}

impl InitialReader {
    pub fn new() -> InitialReader {
        InitialReader::default()
    }

    /// The DCID of the flow's first Initial, once one has been read: the
    /// key a caller files the flow under.
    pub fn dcid(&self) -> Option<ConnectionId> {
        self.flow.as_ref().map(|flow| flow.dcid)
    }

    /// The flow's version, once its first Initial has been read.
    pub fn version(&self) -> Option<Version> {
        self.flow.as_ref().map(|flow| flow.version)
    }

    /// Heap bytes held for the CRYPTO stream (at most 72 KiB).
    pub fn buffered(&self) -> usize {
        self.stream.buffered()
    }

    /// The CRYPTO stream from offset 0 to its first gap.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn crypto_prefix(&self) -> &[u8] {
        self.stream.prefix()
    }

    /// Reads one datagram of the flow. `scratch` is where its Initials are
    /// decrypted, one at a time: any buffer, best kept and reused across
    /// calls and flows (it grows to the largest packet, and its contents
    /// mean nothing between calls). Once the answer is `Done` or an error,
    /// every later call returns it again.
    pub fn read(&mut self, datagram: &[u8], scratch: &mut Vec<u8>) -> Result<Parse, Reject> {
        if let Some(answer) = &self.answer {
            return answer.clone().map(Parse::Done);
        }
        work(1);
        match self.read_datagram(datagram, scratch) {
            Ok(Some(hello)) => {
                self.answer = Some(Ok(hello.clone()));
                Ok(Parse::Done(hello))
            }
            Ok(None) => Ok(Parse::NeedMore),
            Err(Stop::Skip(skip)) => Ok(Parse::Skipped(skip)),
            Err(Stop::Reject(reject)) => {
                self.answer = Some(Err(reject));
                Err(reject)
            }
        }
    }

    fn read_datagram(
        &mut self,
        datagram: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<Option<InitialHello>, Stop> {
        let mut walk = Walk::new(datagram);
        let mut initials = 0;
        while let Some(packet) = walk.next_packet()? {
            if packet.header.kind == PacketKind::Initial {
                initials += 1;
                self.read_initial(&packet, scratch)?;
            }
        }
        if initials == 0 {
            return Err(Stop::Skip(Skip::NoInitial));
        }
        let Some(hello) = self.stream.hello()? else {
            return Ok(None);
        };
        let Some(flow) = &self.flow else {
            // Set by the first Initial, which came before.
            return Err(Reject::Malformed("no initial").into());
        };
        Ok(Some(InitialHello {
            sni: hello.sni,
            alpn: hello.alpn,
            version: flow.version,
            dcid: flow.dcid,
            scid: flow.scid,
        }))
    }

    /// Decrypts one Initial in `scratch` and takes in its frames.
    fn read_initial(
        &mut self,
        packet: &packet::Packet<'_>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        let header = &packet.header;
        let flow = match &mut self.flow {
            Some(flow) => {
                if (flow.version, flow.dcid, flow.scid)
                    != (header.version, header.dcid, header.scid)
                {
                    return Err(Reject::OtherFlow);
                }
                flow
            }
            None => {
                if header.dcid.len() < MIN_INITIAL_DCID_LEN {
                    return Err(Reject::ShortDcid);
                }
                self.flow.insert(Flow {
                    version: header.version,
                    dcid: header.dcid,
                    scid: header.scid,
                    keys: Keys::client(header.version, &header.dcid),
                })
            }
        };

        // Header protection (RFC 9001 §5.4): the sample lies 4 bytes past
        // the start of the packet number, whatever its length.
        let pn_offset = packet.pn_offset;
        let sample = packet
            .bytes
            .get(pn_offset + SAMPLE_OFFSET..pn_offset + SAMPLE_OFFSET + SAMPLE_LEN)
            .and_then(|sample| <&[u8; SAMPLE_LEN]>::try_from(sample).ok())
            .ok_or(Reject::Malformed(
                "packet too short for the header protection sample",
            ))?;
        let mask = flow.keys.mask(sample);
        work(packet.bytes.len());
        scratch.clear();
        scratch.extend_from_slice(packet.bytes);
        scratch[0] ^= mask[0] & 0x0f;
        let pn_len = usize::from(scratch[0] & 0x03) + 1;
        let mut truncated = 0;
        for (byte, mask) in scratch[pn_offset..pn_offset + pn_len]
            .iter_mut()
            .zip(&mask[1..])
        {
            *byte ^= mask;
            truncated = truncated << 8 | u64::from(*byte);
        }
        // pn_len is 1 to 4, so bits is 8 to 32.
        let packet_number =
            packet::decode_packet_number(self.largest_pn, truncated, 8 * pn_len as u32);

        let (unprotected_header, payload) = scratch.split_at_mut(pn_offset + pn_len);
        let plaintext = flow.keys.open(packet_number, unprotected_header, payload)?;
        if unprotected_header[0] & 0x0c != 0 {
            return Err(Reject::ReservedBits);
        }
        self.largest_pn = Some(
            self.largest_pn
                .map_or(packet_number, |largest| largest.max(packet_number)),
        );
        let stream = &mut self.stream;
        frames::walk(plaintext, |offset, data| stream.insert(offset, data))
    }
}

/// Counts work (bytes and steps examined) in unit tests, so a test can tell
/// linear from quadratic; nothing outside tests.
#[cfg(test)]
fn work(n: usize) {
    tests::WORK.with(|work| work.set(work.get() + n));
}

#[cfg(not(test))]
#[inline(always)]
fn work(_n: usize) {}
