//! The frames of a decrypted client Initial (RFC 9000 §12.4, §19): only
//! those a client may send there before it has heard from the server.

use super::packet::Cursor;
use super::{work, Reject};

const PADDING: u64 = 0x00;
const PING: u64 = 0x01;
const ACK: u64 = 0x02;
const ACK_ECN: u64 = 0x03;
const CRYPTO: u64 = 0x06;
const CONNECTION_CLOSE: u64 = 0x1c;

/// Walks the frames of `payload`, handing each CRYPTO frame's offset and
/// data to `crypto` in order. PADDING, PING and ACK (with or without ECN
/// counts) are read and skipped; CONNECTION_CLOSE is
/// [`Reject::ConnectionClose`]; any other type, or a type in more than one
/// byte (all the allowed ones are below 0x40, and RFC 9000 §12.4 asks for
/// the shortest encoding), is [`Reject::ForbiddenFrame`]. A payload without
/// frames (RFC 9000 §12.4) or a frame running past the payload is
/// malformed.
pub(super) fn walk(
    payload: &[u8],
    mut crypto: impl FnMut(u64, &[u8]) -> Result<(), Reject>,
) -> Result<(), Reject> {
    if payload.is_empty() {
        return Err(Reject::Malformed("packet without frames"));
    }
    let mut frames = Cursor::new(payload);
    while !frames.at_end() {
        work(1);
        let (frame_type, len) = frames.varint_and_len("frame type")?;
        if len != 1 {
            return Err(Reject::ForbiddenFrame(frame_type));
        }
        match frame_type {
            PADDING => {
                // A run of zeros is one padding, read in one go.
                while frames.peek() == Some(0) {
                    frames.take(1, "padding")?;
                }
            }
            PING => {}
            ACK | ACK_ECN => skip_ack(&mut frames, frame_type == ACK_ECN)?,
            CRYPTO => {
                let offset = frames.varint("crypto offset")?;
                let len = frames.length("crypto data past the packet end")?;
                let data = frames.take(len, "crypto data past the packet end")?;
                work(data.len());
                crypto(offset, data)?;
            }
            CONNECTION_CLOSE => return Err(Reject::ConnectionClose),
            other => return Err(Reject::ForbiddenFrame(other)),
        }
    }
    Ok(())
}

/// Reads past an ACK frame's fields (RFC 9000 §19.3). Their values are the
/// server's business: only their framing is checked. The range loop ends
/// when the payload does, however large the declared count: each range is
/// at least two bytes.
fn skip_ack(frames: &mut Cursor<'_>, ecn: bool) -> Result<(), Reject> {
    frames.varint("ack largest acknowledged")?;
    frames.varint("ack delay")?;
    let ranges = frames.varint("ack range count")?;
    frames.varint("ack first range")?;
    for _ in 0..ranges {
        work(1);
        frames.varint("ack gap")?;
        frames.varint("ack range length")?;
    }
    if ecn {
        frames.varint("ack ect0 count")?;
        frames.varint("ack ect1 count")?;
        frames.varint("ack ecn-ce count")?;
    }
    Ok(())
}
