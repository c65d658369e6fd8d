//! ClientHello reader: bytes in, Need/Done/Reject out. No I/O. Never blocks,
//! never allocates per byte, never panics on input, never reads past what it is given.
//!
//! [`parse`] is handed everything read from a client so far and answers one of:
//!
//! - `Ok(Parse::NeedMore)`: the bytes are a valid prefix of a ClientHello
//!   carried in TLS handshake records; read more and call again with the
//!   whole buffer.
//! - `Ok(Parse::Done(hello))`: the whole ClientHello handshake message is in
//!   hand, with its SNI host_name and ALPN protocol list.
//! - `Err(reject)`: the bytes seen so far cannot begin a valid ClientHello.
//!   Rejection is early: a first byte other than 22 is rejected at one byte,
//!   a bad record header as soon as the offending byte is in, a wrong
//!   handshake type as soon as that byte is in, an oversized declared length
//!   as soon as its three bytes are in, a length field that overruns the
//!   vector enclosing it as soon as it is read, a repeated extension type as
//!   soon as the second one is read.
//!   Every rejection depends only on bytes already seen, so no prefix of a
//!   valid hello is ever rejected.
//!
//! # What is accepted
//!
//! - Records (RFC 8446 §5.1): content type 22, record version `0x0300..=0x0304`
//!   (ignored beyond that, as the RFC asks), fragment length `1..=16384`
//!   (2^14, the TLSPlaintext limit; zero-length handshake fragments are
//!   forbidden). The handshake message may be split over any number of
//!   records of any size; every record up to the one holding the last byte of
//!   the hello is checked.
//! - The hello ending inside a record: the rest of that record would be
//!   further handshake data. It is not inspected, but the whole record must be
//!   in hand before the answer is `Done`, and [`ClientHello::record_len`]
//!   covers it, so the caller forwards whole records to the backend. Bytes
//!   after that record are never looked at.
//! - The ClientHello body (RFC 8446 §4.1.2): legacy_version with major byte 3,
//!   32-byte random, session_id of at most 32 bytes, a non-empty even-length
//!   cipher_suites vector, a non-empty compression_methods vector, then either
//!   nothing or an extensions block whose length exactly fills the rest of the
//!   body. Every extension's length must fit its block; no extension type may
//!   appear twice (RFC 8446 §4.2); at most [`MAX_EXTENSIONS`] extensions.
//! - server_name (RFC 6066 §3): a non-empty ServerNameList that exactly fills
//!   the extension; every entry is `name_type, u16 length, bytes`. The
//!   host_name (type 0) is returned as sent. It must be 1..=255 bytes of
//!   printable ASCII without space (`0x21..=0x7e`), and there may be only one
//!   (RFC 6066: "MUST NOT contain more than one name of the same name_type"),
//!   so that the proxy and the backend cannot pick different names. Entries of
//!   other name types are skipped.
//! - ALPN (RFC 7301 §3.1): a non-empty list that exactly fills the extension,
//!   of non-empty u8-length-prefixed names, returned in order (lossy UTF-8).
//! - Everything else is skipped by its length.
//!
//! # Cost
//!
//! Each call walks the buffer once: O(n) work, no loop that does not consume
//! input. A hello inside one record is parsed in place. A hello spanning
//! several records is reassembled into one `Vec` (the only allocation besides
//! the returned strings, which are built only for `Done`).

use std::fmt;
use std::ops::Range;

/// Maximum ClientHello handshake message body length (the 24-bit handshake
/// length field). A declared length above this is [`Reject::TooLarge`].
pub const MAX_HELLO_LEN: usize = 65536;

/// Maximum TLSPlaintext fragment length (2^14, RFC 8446 §5.1).
pub const MAX_RECORD_LEN: usize = 16384;

/// Maximum number of extensions in one hello; more is [`Reject::Malformed`].
/// Real clients send fewer than 30.
pub const MAX_EXTENSIONS: usize = 512;

/// Longest accepted SNI host_name, in bytes (a DNS name is at most 255 octets).
pub const MAX_HOST_NAME_LEN: usize = 255;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;
const MAX_SESSION_ID_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// A valid prefix of a ClientHello: read more bytes and call again with the whole buffer.
    NeedMore,
    /// The whole ClientHello handshake message is in hand.
    Done(ClientHello),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// server_name extension host_name entry, exactly as sent (not normalised), if any.
    pub sni: Option<String>,
    /// ALPN protocol names in order (lossy UTF-8), empty if no ALPN extension.
    pub alpn: Vec<String>,
    /// Number of input bytes (record headers included) that make up the
    /// records carrying the hello. Bytes after that are not inspected.
    pub record_len: usize,
}

/// Why the bytes cannot be a ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reject {
    /// The first byte has its high bit set: an SSLv2-style (or otherwise
    /// non-TLS) hello.
    SslV2,
    /// A record's content type is not 22 (handshake).
    NotHandshake,
    /// A record's version is not 0x0300..=0x0304.
    BadRecordVersion,
    /// A record with a zero-length fragment (forbidden for handshake records,
    /// RFC 8446 §5.1).
    ZeroLengthRecord,
    /// A record's length exceeds 16384 ([`MAX_RECORD_LEN`]).
    RecordTooLong,
    /// The handshake message type is not 1 (client_hello).
    NotClientHello,
    /// The declared handshake length exceeds [`MAX_HELLO_LEN`].
    TooLarge,
    /// The ClientHello's legacy_version major byte is not 3.
    BadHelloVersion,
    /// A length field that overruns its enclosing vector, a vector of an
    /// impossible length, an extensions block that does not exactly fill the
    /// body, or more than [`MAX_EXTENSIONS`] extensions. The text names what.
    Malformed(&'static str),
    /// The same extension type appears twice (RFC 8446 §4.2).
    DuplicateExtension,
    /// The SNI host_name is empty, longer than 255 bytes, has a byte outside
    /// printable ASCII (0x21..=0x7e), or appears twice.
    BadServerName,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::SslV2 => f.write_str("sslv2_hello"),
            Reject::NotHandshake => f.write_str("not_handshake"),
            Reject::BadRecordVersion => f.write_str("bad_record_version"),
            Reject::ZeroLengthRecord => f.write_str("zero_length_record"),
            Reject::RecordTooLong => f.write_str("record_too_long"),
            Reject::NotClientHello => f.write_str("not_client_hello"),
            Reject::TooLarge => f.write_str("hello_too_large"),
            Reject::BadHelloVersion => f.write_str("bad_hello_version"),
            Reject::Malformed(what) => write!(f, "malformed: {what}"),
            Reject::DuplicateExtension => f.write_str("duplicate_extension"),
            Reject::BadServerName => f.write_str("bad_server_name"),
        }
    }
}

impl std::error::Error for Reject {}

/// Reads the ClientHello at the start of `buf`, the bytes read from the
/// client so far. See the module documentation for what is accepted.
pub fn parse(buf: &[u8]) -> Result<Parse, Reject> {
    let framing = match walk_records(buf)? {
        Some(framing) => framing,
        None => return Ok(Parse::NeedMore),
    };

    // The handshake message bytes in hand, header included, at most `msg_len`.
    let reassembled: Vec<u8>;
    let message: &[u8] = if framing.records == 1 {
        let start = RECORD_HEADER_LEN;
        &buf[start..start + framing.have]
    } else {
        reassembled = reassemble(buf, framing.have);
        &reassembled
    };
    let body = &message[HANDSHAKE_HEADER_LEN..];
    let body_len = framing.msg_len - HANDSHAKE_HEADER_LEN;

    let found = match parse_body(body, body_len) {
        Ok(found) => found,
        Err(Stop::NeedMore) => return Ok(Parse::NeedMore),
        Err(Stop::Reject(reject)) => return Err(reject),
    };
    match framing.record_len {
        Some(record_len) => Ok(Parse::Done(found.into_hello(body, record_len)?)),
        None => Ok(Parse::NeedMore),
    }
}

/// What the record walk learnt about a buffer whose handshake header is in.
struct Framing {
    /// Length of the handshake message, its 4-byte header included.
    msg_len: usize,
    /// Handshake message bytes in hand (header included), at most `msg_len`.
    have: usize,
    /// Records that contributed those bytes (the last one possibly
    /// incomplete). With one, the message is parsed in place.
    records: usize,
    /// Set once every message byte is in and the record holding the last one
    /// is complete: the length of the records, headers included.
    record_len: Option<usize>,
}

/// Walks the record layer, checking every record header and the handshake
/// header as far as the bytes go. `Ok(None)` means the handshake header is
/// not complete yet.
fn walk_records(buf: &[u8]) -> Result<Option<Framing>, Reject> {
    let mut pos = 0;
    let mut records = 0;
    let mut have = 0;
    let mut header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut msg_len = None;

    loop {
        let record_header = &buf[pos..buf.len().min(pos + RECORD_HEADER_LEN)];
        let fragment_len = match check_record_header(record_header, pos == 0)? {
            Some(len) => len,
            None => break,
        };
        let fragment_start = pos + RECORD_HEADER_LEN;
        let record_end = fragment_start + fragment_len;
        let mut fragment = &buf[fragment_start..buf.len().min(record_end)];
        let complete = fragment.len() == fragment_len;
        if !fragment.is_empty() {
            records += 1;
        }

        // The handshake header may itself be split over records.
        while have < HANDSHAKE_HEADER_LEN {
            let Some((&byte, rest)) = fragment.split_first() else {
                break;
            };
            fragment = rest;
            header[have] = byte;
            have += 1;
            if have == 1 && byte != HANDSHAKE_TYPE_CLIENT_HELLO {
                return Err(Reject::NotClientHello);
            }
            if have == HANDSHAKE_HEADER_LEN {
                let body_len = u24(header[1], header[2], header[3]);
                if body_len > MAX_HELLO_LEN {
                    return Err(Reject::TooLarge);
                }
                msg_len = Some(HANDSHAKE_HEADER_LEN + body_len);
            }
        }

        if let Some(len) = msg_len {
            have += fragment.len().min(len - have);
            if have == len {
                let record_len = complete.then_some(record_end);
                return Ok(Some(Framing {
                    msg_len: len,
                    have,
                    records,
                    record_len,
                }));
            }
        }
        if !complete {
            break;
        }
        pos = record_end;
    }

    Ok(msg_len.map(|msg_len| Framing {
        msg_len,
        have,
        records,
        record_len: None,
    }))
}

/// Checks a (possibly partial) record header. Returns the fragment length
/// once all five bytes are in, `None` before.
fn check_record_header(header: &[u8], first: bool) -> Result<Option<usize>, Reject> {
    if let Some(&content_type) = header.first() {
        if first && content_type & 0x80 != 0 {
            return Err(Reject::SslV2);
        }
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Err(Reject::NotHandshake);
        }
    }
    let major_bad = header.get(1).is_some_and(|&major| major != 3);
    let minor_bad = header.get(2).is_some_and(|&minor| minor > 4);
    if major_bad || minor_bad {
        return Err(Reject::BadRecordVersion);
    }
    let &[_, _, _, high, low] = header else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([high, low]));
    if len == 0 {
        return Err(Reject::ZeroLengthRecord);
    }
    if len > MAX_RECORD_LEN {
        return Err(Reject::RecordTooLong);
    }
    Ok(Some(len))
}

/// Copies the first `have` handshake message bytes out of the records of an
/// already-walked buffer.
fn reassemble(buf: &[u8], have: usize) -> Vec<u8> {
    let mut message = Vec::with_capacity(have);
    let mut pos = 0;
    while message.len() < have && pos + RECORD_HEADER_LEN <= buf.len() {
        let fragment_len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
        let start = pos + RECORD_HEADER_LEN;
        let end = buf.len().min(start + fragment_len);
        let wanted = have - message.len();
        let fragment = &buf[start..end];
        message.extend_from_slice(&fragment[..fragment.len().min(wanted)]);
        pos = start + fragment_len;
    }
    message
}

/// Why body parsing stopped short of an answer.
enum Stop {
    NeedMore,
    Reject(Reject),
}

impl From<Reject> for Stop {
    fn from(reject: Reject) -> Self {
        Stop::Reject(reject)
    }
}

/// A cursor over a vector whose declared end (`end`) may lie beyond the
/// bytes in hand (`data`). Overrunning `end` is malformed; overrunning
/// `data` (but not `end`) means more bytes are needed.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn at_end(&self) -> bool {
        self.pos == self.end
    }

    fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// Advances over `n` bytes without needing them in hand.
    fn skip(&mut self, n: usize, what: &'static str) -> Result<Range<usize>, Stop> {
        if n > self.remaining() {
            return Err(Reject::Malformed(what).into());
        }
        let range = self.pos..self.pos + n;
        self.pos += n;
        Ok(range)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Stop> {
        let range = self.skip(n, what)?;
        self.data.get(range).ok_or(Stop::NeedMore)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Stop> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Stop> {
        let bytes = self.take(2, what)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// Splits off the next `n` bytes as a reader of their own.
    fn sub(&mut self, n: usize, what: &'static str) -> Result<Reader<'a>, Stop> {
        let range = self.skip(n, what)?;
        Ok(Reader {
            data: self.data,
            pos: range.start,
            end: range.end,
        })
    }

    /// Splits off a vector prefixed by a u16 length.
    fn sub_u16(&mut self, what: &'static str) -> Result<Reader<'a>, Stop> {
        let len = self.u16(what)?;
        self.sub(usize::from(len), what)
    }
}

/// Where the interesting extensions are, as ranges of the body.
struct Found {
    host_name: Option<Range<usize>>,
    alpn_list: Option<Range<usize>>,
}

impl Found {
    /// Builds the answer from the complete, already-validated body.
    fn into_hello(self, body: &[u8], record_len: usize) -> Result<ClientHello, Reject> {
        let sni = match self.host_name {
            Some(range) => {
                let name = body.get(range).ok_or(Reject::BadServerName)?;
                let name = std::str::from_utf8(name).map_err(|_| Reject::BadServerName)?;
                Some(name.to_owned())
            }
            None => None,
        };
        let mut alpn = Vec::new();
        if let Some(range) = self.alpn_list {
            let list = body.get(range).ok_or(Reject::Malformed("alpn"))?;
            let mut rest = list;
            while let Some((&len, tail)) = rest.split_first() {
                let len = usize::from(len);
                let name = tail
                    .get(..len)
                    .ok_or(Reject::Malformed("alpn protocol name"))?;
                alpn.push(String::from_utf8_lossy(name).into_owned());
                rest = &tail[len..];
            }
        }
        Ok(ClientHello {
            sni,
            alpn,
            record_len,
        })
    }
}

/// Parses the ClientHello body (after the handshake header). `data` is what
/// is in hand, `body_len` the declared length.
fn parse_body(data: &[u8], body_len: usize) -> Result<Found, Stop> {
    let mut body = Reader {
        data,
        pos: 0,
        end: body_len,
    };

    let legacy_version = body.u16("legacy_version")?;
    if legacy_version >> 8 != 3 {
        return Err(Reject::BadHelloVersion.into());
    }
    body.skip(32, "random")?;

    let session_id_len = usize::from(body.u8("session_id")?);
    if session_id_len > MAX_SESSION_ID_LEN {
        return Err(Reject::Malformed("session_id longer than 32").into());
    }
    body.skip(session_id_len, "session_id")?;

    let cipher_suites_len = usize::from(body.u16("cipher_suites")?);
    if cipher_suites_len == 0 || cipher_suites_len % 2 != 0 {
        return Err(Reject::Malformed("cipher_suites length").into());
    }
    body.skip(cipher_suites_len, "cipher_suites")?;

    let compression_methods_len = usize::from(body.u8("compression_methods")?);
    if compression_methods_len == 0 {
        return Err(Reject::Malformed("compression_methods empty").into());
    }
    body.skip(compression_methods_len, "compression_methods")?;

    let mut found = Found {
        host_name: None,
        alpn_list: None,
    };
    if body.at_end() {
        return Ok(found);
    }

    let extensions_len = usize::from(body.u16("extensions")?);
    if extensions_len != body.remaining() {
        return Err(Reject::Malformed("extensions length does not fill the hello").into());
    }
    let mut extensions = body.sub(extensions_len, "extensions")?;

    let mut seen = [0u16; MAX_EXTENSIONS];
    let mut count = 0;
    let walked = walk_extensions(&mut extensions, &mut seen, &mut count, &mut found);
    // Duplicates among the extensions seen so far are a definite error even
    // when the rest of the hello has not arrived yet.
    let seen = &mut seen[..count];
    seen.sort_unstable();
    if seen.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(Reject::DuplicateExtension.into());
    }
    walked?;
    Ok(found)
}

fn walk_extensions(
    extensions: &mut Reader<'_>,
    seen: &mut [u16; MAX_EXTENSIONS],
    count: &mut usize,
    found: &mut Found,
) -> Result<(), Stop> {
    while !extensions.at_end() {
        if *count == MAX_EXTENSIONS {
            return Err(Reject::Malformed("too many extensions").into());
        }
        let extension_type = extensions.u16("extension type")?;
        seen[*count] = extension_type;
        *count += 1;
        let mut data = extensions.sub_u16("extension length")?;
        match extension_type {
            EXTENSION_SERVER_NAME => found.host_name = parse_server_name(&mut data)?,
            EXTENSION_ALPN => found.alpn_list = Some(parse_alpn(&mut data)?),
            _ => {}
        }
    }
    Ok(())
}

/// Validates a server_name extension; returns where its host_name is.
fn parse_server_name(data: &mut Reader<'_>) -> Result<Option<Range<usize>>, Stop> {
    let list_len = usize::from(data.u16("server_name list")?);
    if list_len != data.remaining() {
        return Err(Reject::Malformed("server_name list length").into());
    }
    if list_len == 0 {
        return Err(Reject::Malformed("server_name list empty").into());
    }
    let mut host_name = None;
    while !data.at_end() {
        let name_type = data.u8("server_name entry")?;
        let name_len = usize::from(data.u16("server_name entry")?);
        if name_type != NAME_TYPE_HOST_NAME {
            data.skip(name_len, "server_name entry")?;
            continue;
        }
        if name_len > data.remaining() {
            return Err(Reject::Malformed("host_name length").into());
        }
        if host_name.is_some() {
            return Err(Reject::BadServerName.into());
        }
        if name_len == 0 || name_len > MAX_HOST_NAME_LEN {
            return Err(Reject::BadServerName.into());
        }
        let start = data.pos;
        let name = data.take(name_len, "host_name")?;
        if !name.iter().all(|byte| (0x21..=0x7e).contains(byte)) {
            return Err(Reject::BadServerName.into());
        }
        host_name = Some(start..start + name_len);
    }
    Ok(host_name)
}

/// Validates an ALPN extension; returns where its protocol name list is.
fn parse_alpn(data: &mut Reader<'_>) -> Result<Range<usize>, Stop> {
    let list_len = usize::from(data.u16("alpn list")?);
    if list_len != data.remaining() {
        return Err(Reject::Malformed("alpn list length").into());
    }
    if list_len == 0 {
        return Err(Reject::Malformed("alpn list empty").into());
    }
    let start = data.pos;
    while !data.at_end() {
        let name_len = usize::from(data.u8("alpn protocol name")?);
        if name_len == 0 {
            return Err(Reject::Malformed("alpn protocol name empty").into());
        }
        data.skip(name_len, "alpn protocol name")?;
    }
    Ok(start..data.pos)
}

fn u24(high: u8, mid: u8, low: u8) -> usize {
    usize::from(high) << 16 | usize::from(mid) << 8 | usize::from(low)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, bytes, sni, alpn) as listed in tests/data/hellos/README.md.
    const FIXTURES: &[(&str, &[u8], &str, &[&str])] = &[
        (
            "chromium-156-pq",
            include_bytes!("../tests/data/hellos/chromium-156-pq.bin"),
            "chrome.test",
            &["h2", "http/1.1"],
        ),
        (
            "curl-7.88",
            include_bytes!("../tests/data/hellos/curl-7.88.bin"),
            "curl.test",
            &["h2", "http/1.1"],
        ),
        (
            "openssl-3.0-s_client",
            include_bytes!("../tests/data/hellos/openssl-3.0-s_client.bin"),
            "openssl.test",
            &[],
        ),
        (
            "python-3.11",
            include_bytes!("../tests/data/hellos/python-3.11.bin"),
            "python.test",
            &[],
        ),
        (
            "rustls-0.23-pq",
            include_bytes!("../tests/data/hellos/rustls-0.23-pq.bin"),
            "rustls-pq.test",
            &["h2", "http/1.1"],
        ),
        (
            "node-20",
            include_bytes!("../tests/data/hellos/node-20.bin"),
            "node.test",
            &[],
        ),
    ];

    // ---- helpers ----------------------------------------------------------

    /// Deterministic xorshift64 so reframing tests need no rand crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn done(result: Result<Parse, Reject>) -> ClientHello {
        match result {
            Ok(Parse::Done(hello)) => hello,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn check_all_prefixes(records: &[u8]) {
        for len in 0..records.len() {
            assert_eq!(
                parse(&records[..len]),
                Ok(Parse::NeedMore),
                "prefix of {len} of {} bytes",
                records.len()
            );
        }
    }

    fn u16_bytes(n: usize) -> [u8; 2] {
        u16::try_from(n).unwrap().to_be_bytes()
    }

    /// The handshake messages carried by a run of records.
    fn unframe(records: &[u8]) -> Vec<u8> {
        let mut message = Vec::new();
        let mut pos = 0;
        while pos < records.len() {
            let len = usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
            message.extend_from_slice(&records[pos + 5..pos + 5 + len]);
            pos += 5 + len;
        }
        message
    }

    /// Splits `message` into handshake records whose fragment sizes come
    /// from `next_size` (capped at what is left).
    fn frame_with(message: &[u8], mut next_size: impl FnMut() -> usize) -> Vec<u8> {
        let mut records = Vec::new();
        for_each_fragment(message, &mut next_size, |fragment| {
            records.extend_from_slice(&[22, 3, 1]);
            records.extend_from_slice(&u16_bytes(fragment.len()));
            records.extend_from_slice(fragment);
        });
        records
    }

    fn for_each_fragment(
        mut message: &[u8],
        next_size: &mut impl FnMut() -> usize,
        mut each: impl FnMut(&[u8]),
    ) {
        while !message.is_empty() {
            let size = next_size().clamp(1, message.len());
            each(&message[..size]);
            message = &message[size..];
        }
    }

    fn frame(message: &[u8], size: usize) -> Vec<u8> {
        frame_with(message, || size)
    }

    fn handshake(body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut message = vec![1, len[1], len[2], len[3]];
        message.extend_from_slice(body);
        message
    }

    fn extension(extension_type: u16, data: &[u8]) -> Vec<u8> {
        let mut out = extension_type.to_be_bytes().to_vec();
        out.extend_from_slice(&u16_bytes(data.len()));
        out.extend_from_slice(data);
        out
    }

    fn server_name(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![0];
        entry.extend_from_slice(&u16_bytes(name.len()));
        entry.extend_from_slice(name);
        let mut list = u16_bytes(entry.len()).to_vec();
        list.extend_from_slice(&entry);
        extension(0, &list)
    }

    fn alpn(names: &[&[u8]]) -> Vec<u8> {
        let mut entries = Vec::new();
        for name in names {
            entries.push(u8::try_from(name.len()).unwrap());
            entries.extend_from_slice(name);
        }
        let mut list = u16_bytes(entries.len()).to_vec();
        list.extend_from_slice(&entries);
        extension(16, &list)
    }

    /// legacy_version, random, 32-byte session id, one suite, null compression.
    fn body_head() -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0xaa; 32]);
        body.push(32);
        body.extend_from_slice(&[0xbb; 32]);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body
    }

    fn body(extensions: &[Vec<u8>]) -> Vec<u8> {
        let block: Vec<u8> = extensions.concat();
        let mut body = body_head();
        body.extend_from_slice(&u16_bytes(block.len()));
        body.extend_from_slice(&block);
        body
    }

    fn hello_records(extensions: &[Vec<u8>]) -> Vec<u8> {
        frame(&handshake(&body(extensions)), MAX_RECORD_LEN)
    }

    /// A typical hand-built hello: SNI plus ALPN.
    fn simple_extensions() -> Vec<Vec<u8>> {
        vec![server_name(b"example.test"), alpn(&[b"h2", b"http/1.1"])]
    }

    /// Offset of the body within a single-record hello.
    const BODY: usize = 9;
    /// Offset of the extensions block length within a `body_head` hello.
    const EXTENSIONS: usize = BODY + 2 + 32 + 1 + 32 + 4 + 2;

    // ---- real clients -----------------------------------------------------

    #[test]
    fn fixtures_parse_to_done_with_their_sni_and_alpn() {
        for &(name, bytes, sni, protocols) in FIXTURES {
            let hello = done(parse(bytes));
            assert_eq!(hello.sni.as_deref(), Some(sni), "{name}");
            assert_eq!(hello.alpn, protocols, "{name}");
            assert_eq!(hello.record_len, bytes.len(), "{name}");
        }
    }

    #[test]
    fn every_strict_prefix_of_every_fixture_needs_more() {
        for &(_, bytes, _, _) in FIXTURES {
            check_all_prefixes(bytes);
        }
    }

    #[test]
    fn fixtures_reframed_into_other_record_sizes_parse_the_same() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for &(name, bytes, sni, protocols) in FIXTURES {
            let message = unframe(bytes);
            let mut framings = vec![
                frame(&message, 1),
                frame(&message, 5),
                frame(&message, MAX_RECORD_LEN),
            ];
            for _ in 0..20 {
                framings.push(frame_with(&message, || 1 + rng.below(400)));
            }
            for records in framings {
                let hello = done(parse(&records));
                assert_eq!(hello.sni.as_deref(), Some(sni), "{name}");
                assert_eq!(hello.alpn, protocols, "{name}");
                assert_eq!(hello.record_len, records.len(), "{name}");
            }
        }
    }

    #[test]
    fn every_prefix_of_fixtures_in_five_byte_records_needs_more() {
        for &(_, bytes, _, _) in FIXTURES {
            check_all_prefixes(&frame(&unframe(bytes), 5));
        }
    }

    #[test]
    fn every_prefix_of_a_fixture_in_one_byte_records_needs_more() {
        let (_, bytes, _, _) = FIXTURES[2];
        check_all_prefixes(&frame(&unframe(bytes), 1));
    }

    #[test]
    fn flipping_any_byte_of_a_fixture_never_panics() {
        for &(_, bytes, _, _) in FIXTURES {
            let mut mutated = bytes.to_vec();
            for i in 0..mutated.len() {
                let original = mutated[i];
                for value in [
                    !original,
                    0,
                    0xff,
                    original.wrapping_add(1),
                    original.wrapping_sub(1),
                ] {
                    mutated[i] = value;
                    let _ = parse(&mutated);
                }
                mutated[i] = original;
            }
        }
    }

    #[test]
    fn flipping_any_byte_of_a_reframed_fixture_never_panics() {
        let (_, bytes, _, _) = FIXTURES[2];
        let mut mutated = frame(&unframe(bytes), 7);
        for i in 0..mutated.len() {
            let original = mutated[i];
            for value in [!original, 0, 0xff, original.wrapping_add(1)] {
                mutated[i] = value;
                let _ = parse(&mutated);
                let _ = parse(&mutated[..i + 1]);
            }
            mutated[i] = original;
        }
    }

    // ---- sizes and framing ------------------------------------------------

    #[test]
    fn nine_kib_hello_in_one_record() {
        let padding = extension(21, &vec![0; 9 * 1024]);
        let records = hello_records(&[server_name(b"big.test"), padding]);
        assert!(records.len() > 9 * 1024 && records.len() <= 5 + MAX_RECORD_LEN);
        let hello = done(parse(&records));
        assert_eq!(hello.sni.as_deref(), Some("big.test"));
        assert_eq!(hello.record_len, records.len());
        check_all_prefixes(&records);
    }

    #[test]
    fn hello_over_two_records() {
        let message = handshake(&body(&simple_extensions()));
        let split = message.len() / 2;
        let records = frame_with(&message, || split);
        assert_eq!(records.len(), message.len() + 10);
        let hello = done(parse(&records));
        assert_eq!(hello.sni.as_deref(), Some("example.test"));
        assert_eq!(hello.alpn, ["h2", "http/1.1"]);
        check_all_prefixes(&records);
    }

    fn hello_of_body_len(body_len: usize) -> Vec<u8> {
        let head = body(&[server_name(b"max.test")]);
        // The padding extension (4 bytes of header) fills up to body_len.
        let padding = extension(21, &vec![0; body_len - head.len() - 4]);
        body(&[server_name(b"max.test"), padding])
    }

    #[test]
    fn hello_of_exactly_max_len_over_five_records_is_done() {
        let body = hello_of_body_len(MAX_HELLO_LEN);
        assert_eq!(body.len(), MAX_HELLO_LEN);
        let records = frame(&handshake(&body), MAX_RECORD_LEN);
        assert_eq!(records.len(), MAX_HELLO_LEN + 4 + 5 * 5);
        let hello = done(parse(&records));
        assert_eq!(hello.sni.as_deref(), Some("max.test"));
        assert_eq!(hello.record_len, records.len());
        for len in (0..records.len())
            .step_by(997)
            .chain(records.len() - 40..records.len())
        {
            assert_eq!(parse(&records[..len]), Ok(Parse::NeedMore), "prefix {len}");
        }
    }

    #[test]
    fn declared_length_over_max_is_too_large_as_soon_as_the_header_is_in() {
        let too_big = MAX_HELLO_LEN + 1;
        let records = [
            22,
            3,
            1,
            0x40,
            0,
            1,
            (too_big >> 16) as u8,
            (too_big >> 8) as u8,
            too_big as u8,
        ];
        assert_eq!(parse(&records[..8]), Ok(Parse::NeedMore));
        assert_eq!(parse(&records), Err(Reject::TooLarge));
        // Also when the handshake header is split over one-byte records.
        let split = frame(&records[5..], 1);
        assert_eq!(parse(&split[..split.len() - 1]), Ok(Parse::NeedMore));
        assert_eq!(parse(&split), Err(Reject::TooLarge));
    }

    #[test]
    fn trailing_bytes_after_the_hello_records_are_not_in_record_len() {
        let records = hello_records(&simple_extensions());
        let mut buf = records.clone();
        buf.extend_from_slice(b"\x17\x03\x03\x00\x05early and not inspected \xff\x00");
        assert_eq!(done(parse(&buf)).record_len, records.len());
    }

    #[test]
    fn hello_ending_mid_record_needs_that_whole_record() {
        let mut message = handshake(&body(&simple_extensions()));
        let hello_len = message.len();
        message.extend_from_slice(&[0x0b, 0, 0, 3, 1, 2, 3]);
        let records = frame(&message, MAX_RECORD_LEN);
        for len in 5 + hello_len..records.len() {
            assert_eq!(parse(&records[..len]), Ok(Parse::NeedMore), "prefix {len}");
        }
        let hello = done(parse(&records));
        assert_eq!(hello.record_len, records.len());
        assert_eq!(hello.sni.as_deref(), Some("example.test"));
    }

    #[test]
    fn records_after_the_one_ending_the_hello_are_not_inspected() {
        let message = handshake(&body(&simple_extensions()));
        let mut records = frame(&message, 40);
        let hello_records_len = records.len();
        records.extend_from_slice(&[0, 0, 0, 0, 0]);
        assert_eq!(done(parse(&records)).record_len, hello_records_len);
    }

    // ---- record layer rejects ---------------------------------------------

    #[test]
    fn http_request_is_rejected_at_the_first_byte() {
        assert_eq!(parse(b"G"), Err(Reject::NotHandshake));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(Reject::NotHandshake));
    }

    #[test]
    fn application_data_record_is_not_handshake() {
        assert_eq!(parse(&[23]), Err(Reject::NotHandshake));
        assert_eq!(parse(&[23, 3, 3, 0, 1, 0]), Err(Reject::NotHandshake));
    }

    #[test]
    fn sslv2_hello_is_rejected_at_the_first_byte() {
        assert_eq!(parse(&[0x80]), Err(Reject::SslV2));
        assert_eq!(parse(&[0x80, 0x2e, 0x01, 0x00, 0x02]), Err(Reject::SslV2));
    }

    #[test]
    fn non_handshake_record_in_the_middle_of_a_hello_is_rejected() {
        let message = handshake(&body(&simple_extensions()));
        let mut records = frame(&message, 20);
        records[25] = 23;
        assert_eq!(parse(&records[..26]), Err(Reject::NotHandshake));
        records[25] = 0x80;
        assert_eq!(parse(&records[..26]), Err(Reject::NotHandshake));
        records[25] = 22;
        records[26] = 2;
        assert_eq!(parse(&records[..27]), Err(Reject::BadRecordVersion));
    }

    #[test]
    fn record_version_outside_ssl3_to_tls13_is_rejected() {
        assert_eq!(parse(&[22, 2]), Err(Reject::BadRecordVersion));
        assert_eq!(parse(&[22, 3, 5]), Err(Reject::BadRecordVersion));
        let mut records = hello_records(&simple_extensions());
        for minor in 0..=4 {
            records[2] = minor;
            assert!(
                matches!(parse(&records), Ok(Parse::Done(_))),
                "minor {minor}"
            );
        }
    }

    #[test]
    fn zero_length_record_is_rejected() {
        assert_eq!(parse(&[22, 3, 1, 0]), Ok(Parse::NeedMore));
        assert_eq!(parse(&[22, 3, 1, 0, 0]), Err(Reject::ZeroLengthRecord));
        // A zero-length record after the first one, too.
        let message = handshake(&body(&simple_extensions()));
        let mut records = frame(&message[..10], 10);
        records.extend_from_slice(&[22, 3, 1, 0, 0]);
        assert_eq!(parse(&records), Err(Reject::ZeroLengthRecord));
    }

    #[test]
    fn record_longer_than_16384_is_rejected() {
        assert_eq!(parse(&[22, 3, 1, 0x40, 0x01]), Err(Reject::RecordTooLong));
        assert_eq!(parse(&[22, 3, 1, 0xff, 0xff]), Err(Reject::RecordTooLong));
        assert_eq!(parse(&[22, 3, 1, 0x40, 0x00]), Ok(Parse::NeedMore));
    }

    #[test]
    fn server_hello_is_not_a_client_hello() {
        assert_eq!(parse(&[22, 3, 3, 0, 50]), Ok(Parse::NeedMore));
        assert_eq!(parse(&[22, 3, 3, 0, 50, 2]), Err(Reject::NotClientHello));
        assert_eq!(parse(&[22, 3, 3, 0, 50, 0]), Err(Reject::NotClientHello));
    }

    // ---- ClientHello body -------------------------------------------------

    #[test]
    fn hello_without_server_name_is_done_without_sni() {
        let hello = done(parse(&hello_records(&[alpn(&[b"h2"])])));
        assert_eq!(hello.sni, None);
        assert_eq!(hello.alpn, ["h2"]);
    }

    #[test]
    fn hello_without_extensions_is_done_without_sni_or_alpn() {
        let records = frame(&handshake(&body_head()), MAX_RECORD_LEN);
        let hello = done(parse(&records));
        assert_eq!((hello.sni, hello.alpn.len()), (None, 0));
        check_all_prefixes(&records);
    }

    #[test]
    fn upper_case_sni_is_returned_as_sent() {
        let hello = done(parse(&hello_records(&[server_name(b"WWW.Example.TEST.")])));
        assert_eq!(hello.sni.as_deref(), Some("WWW.Example.TEST."));
    }

    #[test]
    fn alpn_names_are_lossy_utf8_in_order() {
        let hello = done(parse(&hello_records(&[alpn(&[b"x", b"\xff\xfe", b"h2"])])));
        assert_eq!(hello.alpn, ["x", "\u{fffd}\u{fffd}", "h2"]);
    }

    #[test]
    fn legacy_version_with_major_byte_not_3_is_rejected() {
        let mut records = hello_records(&simple_extensions());
        records[BODY] = 2;
        assert_eq!(parse(&records[..BODY + 2]), Err(Reject::BadHelloVersion));
    }

    #[test]
    fn declared_body_too_short_for_a_hello_is_malformed() {
        assert!(matches!(
            parse(&[22, 3, 1, 0, 4, 1, 0, 0, 0]),
            Err(Reject::Malformed(_))
        ));
        assert!(matches!(
            parse(&[22, 3, 1, 0, 6, 1, 0, 0, 2, 3, 3]),
            Err(Reject::Malformed(_))
        ));
        let mut records = hello_records(&[]);
        records[EXTENSIONS - 2] = 0; // compression_methods length
        assert!(matches!(parse(&records), Err(Reject::Malformed(_))));
    }

    fn assert_malformed(records: &[u8], what: &str) {
        match parse(records) {
            Err(Reject::Malformed(_)) => {}
            other => panic!("{what}: expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn session_id_longer_than_32_is_malformed() {
        let mut records = hello_records(&simple_extensions());
        records[BODY + 34] = 33;
        assert_malformed(&records[..BODY + 35], "session_id 33, early");
        records[BODY + 34] = 0xff;
        assert_malformed(&records, "session_id 255");
    }

    #[test]
    fn session_id_past_the_end_of_the_body_is_malformed() {
        // Body ends right after the session id length byte, which says 32.
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(32);
        body.extend_from_slice(&[0; 10]);
        assert_malformed(&frame(&handshake(&body), 1000), "session_id past end");
    }

    #[test]
    fn odd_or_empty_cipher_suites_are_malformed() {
        let mut records = hello_records(&simple_extensions());
        let cipher_suites_len = BODY + 2 + 32 + 1 + 32 + 1;
        records[cipher_suites_len] = 3;
        assert_malformed(
            &records[..cipher_suites_len + 1],
            "odd cipher suites, early",
        );
        records[cipher_suites_len] = 0;
        assert_malformed(&records, "no cipher suites");
        records[cipher_suites_len - 1] = 0xff;
        assert_malformed(&records, "cipher suites past end");
    }

    #[test]
    fn extensions_block_not_filling_the_body_is_malformed() {
        let records = hello_records(&simple_extensions());
        let declared = usize::from(u16::from_be_bytes([
            records[EXTENSIONS],
            records[EXTENSIONS + 1],
        ]));
        for wrong in [declared - 1, declared + 1, 0, 0xffff] {
            let mut lying = records.clone();
            lying[EXTENSIONS..EXTENSIONS + 2].copy_from_slice(&u16_bytes(wrong));
            assert_malformed(&lying[..EXTENSIONS + 2], "extensions length, early");
            assert_malformed(&lying, "extensions length");
        }
        // One byte left over after the compression methods.
        let mut body = body_head();
        body.push(0);
        assert_malformed(
            &frame(&handshake(&body), 1000),
            "lone byte after compression",
        );
    }

    #[test]
    fn extension_length_past_the_block_is_malformed() {
        let records = hello_records(&[server_name(b"a.test"), extension(0xff01, &[0])]);
        let mut lying = records.clone();
        let last_len = records.len() - 3;
        lying[last_len..last_len + 2].copy_from_slice(&[0, 2]);
        assert_malformed(&lying, "extension length past end");
        // Extension header cut short by the block's end.
        let mut body = body_head();
        body.extend_from_slice(&[0, 3, 0, 5, 0]);
        assert_malformed(
            &frame(&handshake(&body), 1000),
            "truncated extension header",
        );
    }

    #[test]
    fn server_name_list_length_that_lies_is_malformed() {
        let ext = server_name(b"lie.test");
        for list_len in [ext.len() - 6 - 1, ext.len() - 6 + 1, 0] {
            let mut lying = ext.clone();
            lying[4..6].copy_from_slice(&u16_bytes(list_len));
            assert_malformed(&hello_records(&[lying]), "server_name list length");
        }
        assert_malformed(&hello_records(&[extension(0, &[])]), "empty server_name");
        assert_malformed(
            &hello_records(&[extension(0, &[0, 0])]),
            "empty server_name list",
        );
    }

    #[test]
    fn host_name_length_that_lies_is_malformed() {
        let ext = server_name(b"lie.test");
        for name_len in [ext.len() - 9 + 1, 0xffff] {
            let mut lying = ext.clone();
            lying[7..9].copy_from_slice(&u16_bytes(name_len));
            assert_malformed(&hello_records(&[lying]), "host_name length");
        }
        let mut short = ext.clone();
        short[7..9].copy_from_slice(&u16_bytes(3));
        // Leaves "test" as a bogus entry of name_type '.' (0x2e) with a cut length.
        assert_malformed(&hello_records(&[short]), "host_name shorter than entry");
    }

    #[test]
    fn bad_host_names_are_rejected() {
        let long = vec![b'a'; MAX_HOST_NAME_LEN + 1];
        for name in [
            &b""[..],
            b"caf\xc3\xa9.test",
            b"a\x00b",
            b"tab\t",
            b"sp ace",
            b"del\x7f",
            &long,
        ] {
            assert_eq!(
                parse(&hello_records(&[server_name(name)])),
                Err(Reject::BadServerName),
                "{name:?}"
            );
        }
        let longest = vec![b'a'; MAX_HOST_NAME_LEN];
        assert!(matches!(
            parse(&hello_records(&[server_name(&longest)])),
            Ok(Parse::Done(_))
        ));
    }

    #[test]
    fn two_host_names_are_rejected() {
        let entries = [&[0, 0, 1, b'a'][..], &[0, 0, 1, b'b']].concat();
        let mut list = u16_bytes(entries.len()).to_vec();
        list.extend_from_slice(&entries);
        assert_eq!(
            parse(&hello_records(&[extension(0, &list)])),
            Err(Reject::BadServerName)
        );
    }

    #[test]
    fn server_name_entries_of_other_types_are_skipped() {
        let entries = [
            &[7, 0, 2, b'x', b'y'][..],
            &[0, 0, 6, b'b', b'.', b't', b'e', b's', b't'],
        ]
        .concat();
        let mut list = u16_bytes(entries.len()).to_vec();
        list.extend_from_slice(&entries);
        let hello = done(parse(&hello_records(&[extension(0, &list)])));
        assert_eq!(hello.sni.as_deref(), Some("b.test"));
    }

    #[test]
    fn alpn_lengths_that_lie_are_malformed() {
        assert_malformed(
            &hello_records(&[alpn(&[b"h2", b""])]),
            "empty protocol name",
        );
        assert_malformed(&hello_records(&[alpn(&[])]), "empty alpn list");
        assert_malformed(
            &hello_records(&[extension(16, &[])]),
            "empty alpn extension",
        );
        let ext = alpn(&[b"h2", b"http/1.1"]);
        let mut lying = ext.clone();
        lying[4..6].copy_from_slice(&u16_bytes(ext.len() - 6 + 1));
        assert_malformed(&hello_records(&[lying]), "alpn list length");
        let mut lying = ext.clone();
        lying[6] = 3; // "h2" entry claims 3 bytes
        assert_malformed(&hello_records(&[lying]), "alpn entry length");
    }

    #[test]
    fn duplicate_extension_is_rejected() {
        let records =
            hello_records(&[server_name(b"a.test"), extension(5, &[]), extension(5, &[])]);
        assert_eq!(parse(&records), Err(Reject::DuplicateExtension));
        let records = hello_records(&[server_name(b"a.test"), server_name(b"b.test")]);
        assert_eq!(parse(&records), Err(Reject::DuplicateExtension));
    }

    #[test]
    fn duplicate_extension_is_rejected_before_the_rest_arrives() {
        let records = hello_records(&[
            extension(7, &[]),
            extension(7, &[]),
            extension(21, &[0; 100]),
        ]);
        // Cut just after the second extension's header.
        let cut = EXTENSIONS + 2 + 8;
        assert_eq!(parse(&records[..cut]), Err(Reject::DuplicateExtension));
        assert_eq!(parse(&records[..cut - 2]), Err(Reject::DuplicateExtension));
        assert_eq!(parse(&records[..cut - 3]), Ok(Parse::NeedMore));
    }

    #[test]
    fn more_than_max_extensions_is_malformed() {
        let many: Vec<Vec<u8>> = (0..=MAX_EXTENSIONS as u16)
            .map(|t| extension(t + 100, &[]))
            .collect();
        assert_malformed(&hello_records(&many), "too many extensions");
        let max: Vec<Vec<u8>> = (0..MAX_EXTENSIONS as u16)
            .map(|t| extension(t + 100, &[]))
            .collect();
        assert!(matches!(parse(&hello_records(&max)), Ok(Parse::Done(_))));
    }

    #[test]
    fn display_names_the_reason() {
        assert_eq!(Reject::ZeroLengthRecord.to_string(), "zero_length_record");
        assert_eq!(
            Reject::Malformed("alpn list length").to_string(),
            "malformed: alpn list length"
        );
    }
}
