//! Hand-built client Initials (the `testing` feature): for the unit tests,
//! the fuzz target's checks and the seed corpus. Encrypts with the same key
//! schedule the reader decrypts with, so the RFC 9001 / RFC 9369 vectors
//! test both sides.

use super::keys::{Keys, SAMPLE_LEN, SAMPLE_OFFSET, TAG_LEN};
use super::{PacketKind, Version};

/// Frame type bytes.
pub const PADDING: u8 = 0x00;
pub const PING: u8 = 0x01;

/// A client sending Initials to one DCID, with its keys.
pub struct Client {
    pub version: Version,
    pub dcid: Vec<u8>,
    pub scid: Vec<u8>,
    /// The token every Initial carries (empty by default).
    pub token: Vec<u8>,
    /// The two reserved bits of the first byte (`0x0c`; zero by default,
    /// as RFC 9000 §17.2 requires).
    pub reserved_bits: u8,
    keys: Keys,
}

impl Client {
    /// `dcid` is what the keys come from; at most 20 bytes (longer ones are
    /// written as given, for hostile tests, with keys from them all the
    /// same).
    pub fn new(version: Version, dcid: &[u8], scid: &[u8]) -> Client {
        Client {
            version,
            dcid: dcid.to_vec(),
            scid: scid.to_vec(),
            token: Vec::new(),
            reserved_bits: 0,
            keys: Keys::client(version, dcid),
        }
    }

    /// One protected Initial carrying `payload` (frames), with packet
    /// number `packet_number` in the fewest bytes that leave nothing
    /// acknowledged ambiguous (RFC 9000 §17.1), raised when the payload is
    /// too short for the header protection sample.
    pub fn initial(&self, packet_number: u64, payload: &[u8]) -> Vec<u8> {
        let bits = 64 - (2 * packet_number + 1).leading_zeros() as usize;
        self.initial_with(packet_number, bits.div_ceil(8).clamp(1, 4), payload)
    }

    /// As [`initial`](Self::initial) with the packet number in `pn_len`
    /// bytes (1 to 4; raised as needed for the sample).
    pub fn initial_with(&self, packet_number: u64, pn_len: usize, payload: &[u8]) -> Vec<u8> {
        let pn_len = pn_len
            .clamp(1, 4)
            .max(SAMPLE_OFFSET.saturating_sub(payload.len()));
        let type_bits = self.version.packet_type_bits(PacketKind::Initial);
        let first = 0xc0 | type_bits << 4 | (self.reserved_bits & 0x0c) | (pn_len as u8 - 1);
        let mut packet = vec![first];
        packet.extend_from_slice(&self.version.wire().to_be_bytes());
        packet.push(self.dcid.len() as u8);
        packet.extend_from_slice(&self.dcid);
        packet.push(self.scid.len() as u8);
        packet.extend_from_slice(&self.scid);
        push_varint(&mut packet, self.token.len() as u64);
        packet.extend_from_slice(&self.token);
        push_length(&mut packet, pn_len + payload.len() + TAG_LEN);
        let pn_offset = packet.len();
        packet.extend_from_slice(&packet_number.to_be_bytes()[8 - pn_len..]);

        let mut sealed = payload.to_vec();
        self.keys.seal(packet_number, &packet, &mut sealed);
        let sample_at = SAMPLE_OFFSET - pn_len;
        let sample: [u8; SAMPLE_LEN] = sealed[sample_at..sample_at + SAMPLE_LEN]
            .try_into()
            .expect("16 bytes");
        let mask = self.keys.mask(&sample);
        packet[0] ^= mask[0] & 0x0f;
        for (byte, mask) in packet[pn_offset..].iter_mut().zip(&mask[1..]) {
            *byte ^= mask;
        }
        packet.extend_from_slice(&sealed);
        packet
    }

    /// A datagram of one Initial (packet number 0) carrying `message` in one
    /// CRYPTO frame, padded with PADDING frames to 1,200 bytes, as aioquic
    /// sends a small ClientHello.
    pub fn datagram(&self, message: &[u8]) -> Vec<u8> {
        let mut payload = crypto(0, message);
        let bare = self.initial(0, &payload).len();
        payload.resize(payload.len() + 1200usize.saturating_sub(bare), PADDING);
        self.initial(0, &payload)
    }
}

/// A CRYPTO frame.
pub fn crypto(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x06];
    push_varint(&mut frame, offset);
    push_varint(&mut frame, data.len() as u64);
    frame.extend_from_slice(data);
    frame
}

/// An ACK frame (with ECN counts if `ecn`) acknowledging `largest` and the
/// `first_range` below it, then `ranges` as (gap, length) pairs.
pub fn ack(
    largest: u64,
    first_range: u64,
    ranges: &[(u64, u64)],
    ecn: Option<[u64; 3]>,
) -> Vec<u8> {
    let mut frame = vec![if ecn.is_some() { 0x03 } else { 0x02 }];
    push_varint(&mut frame, largest);
    push_varint(&mut frame, 0);
    push_varint(&mut frame, ranges.len() as u64);
    push_varint(&mut frame, first_range);
    for &(gap, len) in ranges {
        push_varint(&mut frame, gap);
        push_varint(&mut frame, len);
    }
    for count in ecn.into_iter().flatten() {
        push_varint(&mut frame, count);
    }
    frame
}

/// A long-header packet other than an Initial (0-RTT, Handshake), its
/// `body` as given (never decrypted by the reader).
pub fn long_packet(
    version: Version,
    kind: PacketKind,
    dcid: &[u8],
    scid: &[u8],
    body: &[u8],
) -> Vec<u8> {
    let mut packet = vec![0xc0 | version.packet_type_bits(kind) << 4];
    packet.extend_from_slice(&version.wire().to_be_bytes());
    packet.push(dcid.len() as u8);
    packet.extend_from_slice(dcid);
    packet.push(scid.len() as u8);
    packet.extend_from_slice(scid);
    push_length(&mut packet, body.len());
    packet.extend_from_slice(body);
    packet
}

/// A variable-length integer in its shortest form (RFC 9000 §16);
/// `value` below 2^62.
pub fn push_varint(out: &mut Vec<u8>, value: u64) {
    match value {
        0..=0x3f => out.push(value as u8),
        0x40..=0x3fff => out.extend_from_slice(&(value as u16 | 0x4000).to_be_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&(value as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// A packet's Length in two bytes, as clients write it (four if it needs
/// them).
fn push_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x4000 {
        out.extend_from_slice(&(len as u16 | 0x4000).to_be_bytes());
    } else {
        push_varint(out, len as u64);
    }
}
