//! ClientHello reader: bytes in, Need/Done/Reject out. No I/O. Never blocks,
//! never allocates per byte, never panics on input, never reads past what it is given.
//!
//! A [`HelloReader`] is kept per connection and handed, after every read,
//! everything read from the client so far (the buffer only grows; the caller
//! keeps it because those exact bytes go to the backend). It resumes where
//! it stopped last time and answers one of:
//!
//! - `Ok(Parse::NeedMore)`: the bytes are a valid prefix of a ClientHello
//!   carried in TLS handshake records; read more and call again with the
//!   whole buffer.
//! - `Ok(Parse::Done(hello))`: the whole ClientHello handshake message is in
//!   hand, with its SNI host_name and ALPN protocol list.
//! - `Err(reject)`: the bytes seen so far cannot begin a valid ClientHello.
//!
//! [`parse`] is the same for one buffer: `HelloReader::new().advance(buf)`.
//! [`parse_message`] reads the handshake message without records, as QUIC's
//! CRYPTO stream carries it (for the QUIC Initial reader), with the same
//! checks and answers.
//!
//! # When a rejection is known
//!
//! The bytes are checked in stream order: each record header, then that
//! record's fragment appended to the message and the message checked as far
//! as it goes, then the next record header. So the problem reported is the
//! first one in byte order, and it is the same however the input is cut into
//! reads. Every rejection depends only on bytes already seen, so no prefix of
//! a valid hello is ever rejected. Rejection is early:
//!
//! - a first byte other than 22 at one byte, a bad record header as soon as
//!   the offending byte is in (the length as soon as its two bytes are in);
//! - a wrong handshake type as soon as that byte is in, an oversized declared
//!   length as soon as its three bytes are in;
//! - in the fields before the extensions and in the extension headers, a
//!   length field that overruns the vector enclosing it, or an impossible
//!   length, as soon as that field is in; a repeated extension type as soon
//!   as its two bytes are in; too many extensions as soon as the length of
//!   the last one allowed is in;
//! - the contents of server_name and ALPN (their list lengths, entries and
//!   names) once that extension's data is all in hand, not byte by byte.
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
//! Linear in the bytes received, however they are framed or cut into reads:
//! each raw byte is examined a bounded number of times over all calls.
//!
//! - The record layer keeps its position: the record header bytes checked so
//!   far, the end of the current fragment, whether it is the first record.
//!   A call starts at the first byte it has not seen.
//! - While the hello sits in one record it is parsed in place in the
//!   caller's buffer. Once a second record contributes, the message bytes so
//!   far are copied once into an owned `Vec` and each later fragment is
//!   appended (never beyond the declared length, at most 64 KiB + 4).
//! - The fields before the extensions are re-read on each call until the
//!   extensions start: a handful of reads, since vectors are skipped by
//!   their lengths and need not be in hand. The extensions walk resumes at
//!   the last extension boundary, keeping where the server_name and ALPN are
//!   and the extension types seen (sorted, so a duplicate check is a binary
//!   search). server_name and ALPN contents are validated once, when their
//!   data is all in hand.
//! - The only allocations are that `Vec`, the list of extension types, and
//!   the returned strings, built once for `Done`.

use std::fmt;
use std::ops::Range;

#[cfg(any(test, feature = "testing"))]
pub mod build;
#[cfg(any(test, feature = "testing"))]
pub mod checks;

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

/// The most bytes the records carrying one ClientHello can take (409,623):
/// every byte of the largest message but the last in a one-byte record of
/// its own, the last one in a full-size record whose rest is further
/// handshake data. A buffer this long always has an answer other than
/// `NeedMore`, so a caller never needs to hold more.
pub const MAX_RECORDS_LEN: usize = (RECORD_HEADER_LEN + 1)
    * (HANDSHAKE_HEADER_LEN + MAX_HELLO_LEN - 1)
    + RECORD_HEADER_LEN
    + MAX_RECORD_LEN;

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
/// client so far, in one go: `HelloReader::new().advance(buf)`. See the
/// module documentation for what is accepted.
pub fn parse(buf: &[u8]) -> Result<Parse, Reject> {
    HelloReader::new().advance(buf)
}

/// Reads a ClientHello handshake message given without TLS records, as
/// QUIC's CRYPTO stream carries it (RFC 9001 §4): `message` is the stream
/// from its first byte. The checks are those of [`parse`] on the same
/// message framed in records, made in the same byte order, so the answer is
/// the same: `NeedMore` while the message is not all in `message`, `Done`
/// once it is, or the first problem. A `Done`'s
/// [`record_len`](ClientHello::record_len) is the message length, its 4-byte
/// header included; bytes after it are not looked at.
///
/// Not incremental: each call reads `message` from its start (the QUIC
/// Initial reader calls it once, when the whole message is in, and on at
/// most 4 bytes before that).
pub fn parse_message(message: &[u8]) -> Result<Parse, Reject> {
    let Some(&handshake_type) = message.first() else {
        return Ok(Parse::NeedMore);
    };
    if handshake_type != HANDSHAKE_TYPE_CLIENT_HELLO {
        return Err(Reject::NotClientHello);
    }
    let Some(&[_, high, mid, low]) = message.first_chunk::<HANDSHAKE_HEADER_LEN>() else {
        return Ok(Parse::NeedMore);
    };
    let body_len = u24(high, mid, low);
    if body_len > MAX_HELLO_LEN {
        return Err(Reject::TooLarge);
    }
    let msg_len = HANDSHAKE_HEADER_LEN + body_len;
    let body = &message[HANDSHAKE_HEADER_LEN..message.len().min(msg_len)];
    work(body.len());
    let mut found = Found::default();
    let mut seen = Vec::new();
    let mut checked = Body::Head;
    let complete = checked.advance(body, body_len, &mut found, &mut seen)?;
    if body.len() < body_len {
        return Ok(Parse::NeedMore);
    }
    // With the whole body in hand its check cannot stop short.
    if !complete {
        return Err(Reject::Malformed("hello body"));
    }
    found.into_hello(body, msg_len).map(Parse::Done)
}

/// An incremental ClientHello reader: one per connection, fed the growing
/// buffer of bytes read so far. See the module documentation.
#[derive(Debug, Default)]
pub struct HelloReader {
    /// Bytes of the input examined so far; a call starts here.
    pos: usize,
    /// Where in the record layer `pos` is.
    record: RecordAt,
    /// The handshake header bytes in hand (`have.min(4)` of them).
    handshake_header: [u8; HANDSHAKE_HEADER_LEN],
    /// Handshake message bytes in hand, its 4-byte header included.
    have: usize,
    /// The message length, header included, once the header is in.
    msg_len: Option<usize>,
    /// The message bytes once a second record has contributed; before that
    /// they are read in place, right after the first record header.
    owned: Option<Vec<u8>>,
    /// How far the body has been checked.
    body: Body,
    found: Found,
    /// Extension types seen so far, sorted.
    seen: Vec<u16>,
    /// Once every message byte is in and the body is valid: the end of the
    /// record holding the last one, which must be in hand for `Done`.
    records_end: Option<usize>,
    /// The answer once there is one; later calls repeat it.
    answer: Option<Result<ClientHello, Reject>>,
}

/// Where the reader is in the record layer.
#[derive(Debug, Clone, Copy)]
enum RecordAt {
    /// In the header of the record that starts at this offset.
    Header { start: usize },
    /// In the fragment of the record that starts at `start` and ends at `end`.
    Fragment { start: usize, end: usize },
}

impl Default for RecordAt {
    fn default() -> Self {
        RecordAt::Header { start: 0 }
    }
}

/// How far the ClientHello body has been checked.
#[derive(Debug, Default)]
enum Body {
    /// Before the extensions: those fields are re-read on each call.
    #[default]
    Head,
    /// In the extensions block, which ends at `end`: the next extension
    /// header starts at `at`. `pending` is a server_name or ALPN extension
    /// (its type and where its data is) to validate once its data is in.
    Extensions {
        at: usize,
        end: usize,
        pending: Option<(u16, Range<usize>)>,
    },
    /// Every field checked.
    Complete,
}

impl HelloReader {
    pub fn new() -> HelloReader {
        HelloReader::default()
    }

    /// Reads on. `buf` is everything read from the client so far: it must
    /// begin with the bytes of every earlier call (the reader does not look
    /// at the bytes it has already seen again). Once the answer is `Done` or
    /// an error, every later call returns that same answer.
    pub fn advance(&mut self, buf: &[u8]) -> Result<Parse, Reject> {
        if let Some(answer) = &self.answer {
            return answer.clone().map(Parse::Done);
        }
        work(1);
        match self.read(buf) {
            Ok(None) => Ok(Parse::NeedMore),
            Ok(Some(hello)) => {
                self.answer = Some(Ok(hello.clone()));
                Ok(Parse::Done(hello))
            }
            Err(reject) => {
                self.answer = Some(Err(reject));
                Err(reject)
            }
        }
    }

    fn read(&mut self, buf: &[u8]) -> Result<Option<ClientHello>, Reject> {
        loop {
            if let Some(end) = self.records_end {
                // The rest of the record holding the last message byte is
                // not inspected, but it must be in hand.
                if buf.len() < end {
                    return Ok(None);
                }
                return self.finish(buf, end).map(Some);
            }
            match self.record {
                RecordAt::Header { start } => {
                    while self.pos < start + RECORD_HEADER_LEN {
                        let Some(&byte) = buf.get(self.pos) else {
                            return Ok(None);
                        };
                        work(1);
                        check_record_header_byte(self.pos - start, byte, start == 0)?;
                        self.pos += 1;
                    }
                    let len = usize::from(u16::from_be_bytes([buf[start + 3], buf[start + 4]]));
                    if len == 0 {
                        return Err(Reject::ZeroLengthRecord);
                    }
                    if len > MAX_RECORD_LEN {
                        return Err(Reject::RecordTooLong);
                    }
                    self.record = RecordAt::Fragment {
                        start,
                        end: self.pos + len,
                    };
                }
                RecordAt::Fragment { start, end } => {
                    let available = buf.len().min(end);
                    if self.pos >= available {
                        return Ok(None);
                    }
                    let fragment = &buf[self.pos..available];
                    self.pos = available;
                    self.take_fragment(buf, start, end, fragment)?;
                    if self.pos == end {
                        self.record = RecordAt::Header { start: end };
                    }
                }
            }
        }
    }

    /// Takes the next bytes of the fragment of the record at `start`
    /// (ending at `end`), then checks the message as far as it goes.
    fn take_fragment(
        &mut self,
        buf: &[u8],
        start: usize,
        end: usize,
        fragment: &[u8],
    ) -> Result<(), Reject> {
        let had = self.have;
        // The handshake header, byte by byte: it may itself be split over records.
        let mut rest = fragment;
        while self.have < HANDSHAKE_HEADER_LEN {
            let Some((&byte, tail)) = rest.split_first() else {
                break;
            };
            rest = tail;
            self.handshake_header[self.have] = byte;
            self.have += 1;
            if self.have == 1 && byte != HANDSHAKE_TYPE_CLIENT_HELLO {
                return Err(Reject::NotClientHello);
            }
            if self.have == HANDSHAKE_HEADER_LEN {
                let [_, high, mid, low] = self.handshake_header;
                let body_len = u24(high, mid, low);
                if body_len > MAX_HELLO_LEN {
                    return Err(Reject::TooLarge);
                }
                self.msg_len = Some(HANDSHAKE_HEADER_LEN + body_len);
            }
        }
        if let Some(msg_len) = self.msg_len {
            // Bytes past the end of the message are not inspected.
            self.have += rest.len().min(msg_len - self.have);
        }
        let taken = &fragment[..self.have - had];
        work(taken.len());
        if start != 0 {
            let message = self.owned.get_or_insert_with(|| {
                // The first record's share, copied once.
                work(had);
                let mut message = Vec::with_capacity(had + taken.len());
                message.extend_from_slice(&buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + had]);
                message
            });
            append_capped(message, taken, self.msg_len.unwrap_or(HANDSHAKE_HEADER_LEN));
        }

        let Some(msg_len) = self.msg_len else {
            return Ok(());
        };
        let message = match &self.owned {
            Some(message) => message.as_slice(),
            None => &buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + self.have],
        };
        let body = &message[HANDSHAKE_HEADER_LEN..];
        let complete = self.body.advance(
            body,
            msg_len - HANDSHAKE_HEADER_LEN,
            &mut self.found,
            &mut self.seen,
        )?;
        if self.have == msg_len {
            // With the whole body in hand its check cannot stop short.
            if !complete {
                return Err(Reject::Malformed("hello body"));
            }
            self.records_end = Some(end);
        }
        Ok(())
    }

    /// Builds the answer once the message is in and checked and the records
    /// carrying it end at `records_end`, in hand.
    fn finish(&mut self, buf: &[u8], records_end: usize) -> Result<ClientHello, Reject> {
        let message = match &self.owned {
            Some(message) => message.as_slice(),
            None => &buf[RECORD_HEADER_LEN..RECORD_HEADER_LEN + self.have],
        };
        std::mem::take(&mut self.found).into_hello(&message[HANDSHAKE_HEADER_LEN..], records_end)
    }
}

/// Checks byte `index` (0..5) of a record header. The length is checked
/// once both its bytes are in.
fn check_record_header_byte(index: usize, byte: u8, first: bool) -> Result<(), Reject> {
    match index {
        0 if first && byte & 0x80 != 0 => Err(Reject::SslV2),
        0 if byte != CONTENT_TYPE_HANDSHAKE => Err(Reject::NotHandshake),
        1 if byte != 3 => Err(Reject::BadRecordVersion),
        2 if byte > 4 => Err(Reject::BadRecordVersion),
        _ => Ok(()),
    }
}

/// Appends `bytes` to `message`, growing it by doubling but never beyond
/// `cap` bytes of capacity (the caller never appends past `cap`).
fn append_capped(message: &mut Vec<u8>, bytes: &[u8], cap: usize) {
    let needed = message.len() + bytes.len();
    if needed > message.capacity() {
        let target = (message.capacity() * 2).max(needed).min(cap.max(needed));
        message.reserve_exact(target - message.len());
    }
    message.extend_from_slice(bytes);
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

/// Why a check of the bytes in hand stopped short of an answer.
enum Stop {
    NeedMore,
    Reject(Reject),
}

impl Stop {
    /// As the answer of a check that is not complete: false (need more) or the rejection.
    fn answer(self) -> Result<bool, Reject> {
        match self {
            Stop::NeedMore => Ok(false),
            Stop::Reject(reject) => Err(reject),
        }
    }
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
#[derive(Debug, Default)]
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

impl Body {
    /// Checks the body as far as `data` (the body bytes in hand) goes;
    /// `body_len` is its declared length. True once every field is checked.
    fn advance(
        &mut self,
        data: &[u8],
        body_len: usize,
        found: &mut Found,
        seen: &mut Vec<u16>,
    ) -> Result<bool, Reject> {
        loop {
            work(1);
            let next = match self {
                Body::Head => match parse_head(data, body_len) {
                    Ok(Some(block)) => Body::Extensions {
                        at: block.start,
                        end: block.end,
                        pending: None,
                    },
                    Ok(None) => Body::Complete,
                    Err(stop) => return stop.answer(),
                },
                Body::Extensions { at, end, pending } => {
                    match walk_extensions(data, at, *end, pending, found, seen) {
                        Ok(()) => Body::Complete,
                        Err(stop) => return stop.answer(),
                    }
                }
                Body::Complete => return Ok(true),
            };
            *self = next;
        }
    }
}

/// Checks the fields before the extensions; returns where the extensions
/// block is, or `None` if the body ends after the compression methods. A
/// handful of reads whatever the lengths: vectors are skipped, not read.
fn parse_head(data: &[u8], body_len: usize) -> Result<Option<Range<usize>>, Stop> {
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

    if body.at_end() {
        return Ok(None);
    }
    let extensions_len = usize::from(body.u16("extensions")?);
    if extensions_len != body.remaining() {
        return Err(Reject::Malformed("extensions length does not fill the hello").into());
    }
    Ok(Some(body.pos..body.end))
}

/// Walks the extensions block (ending at `end`) from the extension header
/// at `at`, moving `at` past every extension whose header is in. A
/// server_name or ALPN extension is validated once its data is in hand
/// (`pending` until then).
fn walk_extensions(
    data: &[u8],
    at: &mut usize,
    end: usize,
    pending: &mut Option<(u16, Range<usize>)>,
    found: &mut Found,
    seen: &mut Vec<u16>,
) -> Result<(), Stop> {
    loop {
        if let Some((extension_type, range)) = pending {
            if range.end > data.len() {
                return Err(Stop::NeedMore);
            }
            work(range.len());
            let mut reader = Reader {
                data,
                pos: range.start,
                end: range.end,
            };
            if *extension_type == EXTENSION_SERVER_NAME {
                found.host_name = parse_server_name(&mut reader)?;
            } else {
                found.alpn_list = Some(parse_alpn(&mut reader)?);
            }
            *pending = None;
        }
        if *at == end {
            return Ok(());
        }
        if seen.len() == MAX_EXTENSIONS {
            return Err(Reject::Malformed("too many extensions").into());
        }
        work(1);
        let mut block = Reader {
            data,
            pos: *at,
            end,
        };
        let extension_type = block.u16("extension type")?;
        // A duplicate is known as soon as its type is in.
        let Err(index) = seen.binary_search(&extension_type) else {
            return Err(Reject::DuplicateExtension.into());
        };
        let extension = block.sub_u16("extension length")?;
        seen.insert(index, extension_type);
        *at = extension.end;
        if matches!(extension_type, EXTENSION_SERVER_NAME | EXTENSION_ALPN) {
            *pending = Some((extension_type, extension.pos..extension.end));
        }
    }
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
    use super::checks::XorShift;
    use super::*;

    thread_local! {
        /// What [`work`] counted on this thread.
        pub(super) static WORK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// (name, bytes, sni, alpn) as listed in tests/data/hellos/README.md.
    const FIXTURES: &[(&str, &[u8], &str, &[&str])] = &[
        (
            "chromium-156-pq",
            include_bytes!("../../../tests/data/hellos/chromium-156-pq.bin"),
            "chrome.test",
            &["h2", "http/1.1"],
        ),
        (
            "curl-7.88",
            include_bytes!("../../../tests/data/hellos/curl-7.88.bin"),
            "curl.test",
            &["h2", "http/1.1"],
        ),
        (
            "openssl-3.0-s_client",
            include_bytes!("../../../tests/data/hellos/openssl-3.0-s_client.bin"),
            "openssl.test",
            &[],
        ),
        (
            "python-3.11",
            include_bytes!("../../../tests/data/hellos/python-3.11.bin"),
            "python.test",
            &[],
        ),
        (
            "rustls-0.23-pq",
            include_bytes!("../../../tests/data/hellos/rustls-0.23-pq.bin"),
            "rustls-pq.test",
            &["h2", "http/1.1"],
        ),
        (
            "node-20",
            include_bytes!("../../../tests/data/hellos/node-20.bin"),
            "node.test",
            &[],
        ),
    ];

    // ---- helpers ----------------------------------------------------------

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
    fn fixture_messages_without_records_parse_the_same() {
        for &(name, bytes, sni, protocols) in FIXTURES {
            let message = unframe(bytes);
            let hello = done(parse_message(&message));
            assert_eq!(hello.sni.as_deref(), Some(sni), "{name}");
            assert_eq!(hello.alpn, protocols, "{name}");
            assert_eq!(hello.record_len, message.len(), "{name}");
            for len in 0..message.len() {
                assert_eq!(
                    parse_message(&message[..len]),
                    Ok(Parse::NeedMore),
                    "{name} {len}"
                );
            }
            // Bytes after the message are not looked at.
            let mut longer = message.clone();
            longer.extend_from_slice(&[0xff; 9]);
            assert_eq!(
                done(parse_message(&longer)).record_len,
                message.len(),
                "{name}"
            );
        }
    }

    #[test]
    fn mutated_messages_without_records_answer_as_in_records() {
        let (_, bytes, _, _) = FIXTURES[2];
        let message = unframe(bytes);
        let mut mutated = message.clone();
        for i in 0..mutated.len() {
            let original = mutated[i];
            for value in [!original, 0, 0xff, original.wrapping_add(1)] {
                mutated[i] = value;
                for len in [i + 1, mutated.len()] {
                    let in_records = parse(&frame(&mutated[..len], 100)).map(|parse| match parse {
                        Parse::Done(hello) => Parse::Done(ClientHello {
                            record_len: 0,
                            ..hello
                        }),
                        need_more => need_more,
                    });
                    let bare = parse_message(&mutated[..len]).map(|parse| match parse {
                        Parse::Done(hello) => Parse::Done(ClientHello {
                            record_len: 0,
                            ..hello
                        }),
                        need_more => need_more,
                    });
                    assert_eq!(bare, in_records, "byte {i} = {value:#x}, {len} bytes");
                }
            }
            mutated[i] = original;
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

    // ---- incremental reading ----------------------------------------------

    /// Feeds `input` to one reader in growing prefixes ending at each of
    /// `ends` (increasing, the last one `input.len()`), stopping at the
    /// first answer other than NeedMore: that answer and the prefix length
    /// it came at.
    fn feed(input: &[u8], ends: impl IntoIterator<Item = usize>) -> (Result<Parse, Reject>, usize) {
        let mut reader = HelloReader::new();
        let mut at = 0;
        for end in ends {
            at = end;
            match reader.advance(&input[..end]) {
                Ok(Parse::NeedMore) => {}
                answer => return (answer, at),
            }
        }
        (Ok(Parse::NeedMore), at)
    }

    /// Prefix ends for chunks of `size` bytes.
    fn chunk_ends(len: usize, size: usize) -> Vec<usize> {
        let mut ends: Vec<usize> = (size..len).step_by(size).collect();
        ends.push(len);
        ends
    }

    /// Prefix ends for random chunks of 1..=`max` bytes.
    fn random_ends(len: usize, max: usize, rng: &mut XorShift) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut end = 0;
        while end < len {
            end = (end + 1 + rng.below(max)).min(len);
            ends.push(end);
        }
        ends
    }

    /// Prefix ends at every record boundary of well-formed `records`: one
    /// call per record.
    fn record_ends(records: &[u8]) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut pos = 0;
        while pos < records.len() {
            pos += 5 + usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
            ends.push(pos);
        }
        ends
    }

    /// Asserts that `input` fed in each of several chunkings gives
    /// `parse(input)`, and that an answer other than NeedMore comes at
    /// the prefix where one call on that prefix gives it too.
    fn check_chunkings(input: &[u8], rng: &mut XorShift, what: &str) {
        let whole = parse(input);
        let mut chunkings = vec![chunk_ends(input.len(), 1), chunk_ends(input.len(), 7)];
        for max in [3, 64, 2000] {
            chunkings.push(random_ends(input.len(), max, rng));
        }
        for ends in chunkings {
            let (answer, at) = feed(input, ends);
            assert_eq!(answer, whole, "{what}: chunked answer at {at}");
            if answer != Ok(Parse::NeedMore) {
                assert_eq!(parse(&input[..at]), answer, "{what}: prefix {at}");
            }
        }
    }

    #[test]
    fn fixtures_fed_in_chunks_give_the_same_answer_as_one_call() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for &(name, bytes, sni, _) in FIXTURES {
            let message = unframe(bytes);
            let mut framings = vec![bytes.to_vec(), frame(&message, 1), frame(&message, 5)];
            for _ in 0..5 {
                framings.push(frame_with(&message, || 1 + rng.below(300)));
            }
            for records in framings {
                check_chunkings(&records, &mut rng, name);
                // One call per record, as a client sending one record per
                // segment is read.
                let (answer, at) = feed(&records, record_ends(&records));
                assert_eq!(at, records.len(), "{name}");
                assert_eq!(done(answer).sni.as_deref(), Some(sni), "{name}");
            }
        }
    }

    #[test]
    fn mutated_fixtures_fed_in_chunks_give_the_same_answer_as_one_call() {
        let mut rng = XorShift(0xdead_beef_cafe_f00d);
        for &(name, bytes, _, _) in FIXTURES {
            for records in [bytes.to_vec(), frame(&unframe(bytes), 7)] {
                let mut mutated = records.clone();
                for i in (0..mutated.len()).step_by(3) {
                    let original = mutated[i];
                    for value in [!original, 0, original.wrapping_add(1)] {
                        mutated[i] = value;
                        let whole = parse(&mutated);
                        for ends in [
                            chunk_ends(mutated.len(), 1),
                            random_ends(mutated.len(), 50, &mut rng),
                        ] {
                            let (answer, at) = feed(&mutated, ends);
                            assert_eq!(answer, whole, "{name}: byte {i} = {value}, answer at {at}");
                        }
                    }
                    mutated[i] = original;
                }
            }
        }
    }

    #[test]
    fn the_first_problem_in_byte_order_is_reported() {
        // A bad legacy_version in the first record, then a record that is
        // not a handshake record: the version comes first in the stream.
        let mut message = handshake(&body(&simple_extensions()));
        message[4] = 2;
        let mut records = frame(&message, 20);
        records[25] = 23;
        assert_eq!(parse(&records), Err(Reject::BadHelloVersion));
        // The other way round: a good first record, then a bad record
        // header before the bad body byte of the second record.
        let mut message = handshake(&body(&simple_extensions()));
        message[4 + 34] = 33; // session_id length, in the second record
        let mut records = frame(&message, 20);
        assert_eq!(
            parse(&records),
            Err(Reject::Malformed("session_id longer than 32"))
        );
        records[26] = 9;
        assert_eq!(parse(&records), Err(Reject::BadRecordVersion));
        let mut rng = XorShift(7);
        check_chunkings(&records, &mut rng, "bad record version");
    }

    #[test]
    fn server_name_contents_are_judged_once_the_extension_is_in() {
        let ext = server_name(b"bad name.test");
        let records = hello_records(&[ext.clone(), extension(21, &[0; 10])]);
        let ext_end = EXTENSIONS + 2 + ext.len();
        assert_eq!(parse(&records[..ext_end - 1]), Ok(Parse::NeedMore));
        assert_eq!(parse(&records[..ext_end]), Err(Reject::BadServerName));
        let (answer, at) = feed(&records, chunk_ends(records.len(), 1));
        assert_eq!((answer, at), (Err(Reject::BadServerName), ext_end));
    }

    #[test]
    fn answer_is_repeated_once_known() {
        let records = hello_records(&simple_extensions());
        let mut reader = HelloReader::new();
        let hello = done(reader.advance(&records));
        let mut longer = records.clone();
        longer.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(reader.advance(&longer), Ok(Parse::Done(hello)));
        let mut reader = HelloReader::new();
        assert_eq!(reader.advance(b"GET /"), Err(Reject::NotHandshake));
        assert_eq!(reader.advance(&records), Err(Reject::NotHandshake));
    }

    /// A hello of `MAX_HELLO_LEN` body bytes in one-byte records, the last
    /// record full-size: the longest records a hello can take.
    fn longest_records() -> Vec<u8> {
        let message = handshake(&hello_of_body_len(MAX_HELLO_LEN));
        let mut records = frame(&message[..message.len() - 1], 1);
        let mut last = vec![message[message.len() - 1]];
        // Further handshake data fills the last record.
        last.resize(MAX_RECORD_LEN, 0x0b);
        records.extend_from_slice(&frame(&last, MAX_RECORD_LEN));
        records
    }

    #[test]
    fn longest_records_of_a_hello_are_max_records_len() {
        let records = longest_records();
        assert_eq!(records.len(), MAX_RECORDS_LEN);
        let (answer, at) = feed(&records, record_ends(&records));
        assert_eq!(at, MAX_RECORDS_LEN);
        assert_eq!(done(answer).record_len, MAX_RECORDS_LEN);
    }

    /// Feeds `input` in growing prefixes ending at `ends`, one reader, and
    /// fails as soon as the work counted by [`work`] exceeds `per_byte`
    /// steps per input byte (so quadratic reading fails fast). The answer.
    fn feed_within(input: &[u8], ends: &[usize], per_byte: usize) -> Result<Parse, Reject> {
        let budget = per_byte * input.len();
        let start = WORK.with(|work| work.get());
        let mut reader = HelloReader::new();
        let mut answer = Ok(Parse::NeedMore);
        for (calls, &end) in ends.iter().enumerate() {
            answer = reader.advance(&input[..end]);
            let work = WORK.with(|work| work.get()) - start;
            assert!(
                work <= budget,
                "{work} steps after {} calls, {end} of {} bytes",
                calls + 1,
                input.len()
            );
            if answer != Ok(Parse::NeedMore) {
                break;
            }
        }
        answer
    }

    #[test]
    fn one_byte_records_read_one_call_per_record_cost_linear_work() {
        let message = handshake(&hello_of_body_len(MAX_HELLO_LEN));
        let records = frame(&message, 1);
        // About 9 steps per 6-byte record.
        let answer = feed_within(&records, &record_ends(&records), 2);
        assert_eq!(done(answer).sni.as_deref(), Some("max.test"));
        // The same in one call.
        assert!(matches!(
            feed_within(&records, &[records.len()], 2),
            Ok(Parse::Done(_))
        ));
    }

    #[test]
    fn a_60_kib_alpn_list_in_one_byte_records_costs_linear_work() {
        let names: Vec<Vec<u8>> = (0..250).map(|i| vec![b'a' + (i % 26) as u8; 250]).collect();
        let names: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        let message = handshake(&body(&[server_name(b"alpn.test"), alpn(&names)]));
        assert!(message.len() > 60 * 1024);
        let records = frame(&message, 1);
        let answer = feed_within(&records, &record_ends(&records), 2);
        assert_eq!(done(answer).alpn.len(), 250);
    }

    #[test]
    fn big_records_read_a_byte_at_a_time_cost_linear_work() {
        let records = frame(
            &handshake(&hello_of_body_len(MAX_HELLO_LEN)),
            MAX_RECORD_LEN,
        );
        // About 4 steps per call of one byte.
        let answer = feed_within(&records, &chunk_ends(records.len(), 1), 5);
        assert!(matches!(answer, Ok(Parse::Done(_))));
    }

    #[test]
    fn the_reassembled_message_never_outgrows_its_declared_length() {
        for size in [1, 100, 3000, MAX_RECORD_LEN] {
            let message = handshake(&hello_of_body_len(MAX_HELLO_LEN));
            let records = frame(&message, size);
            let mut reader = HelloReader::new();
            for end in record_ends(&records) {
                let _ = reader.advance(&records[..end]);
                if let Some(owned) = &reader.owned {
                    assert!(owned.capacity() <= message.len(), "records of {size}");
                }
            }
            assert!(matches!(reader.answer, Some(Ok(_))), "records of {size}");
            assert_eq!(reader.owned.map(|owned| owned.len()), Some(message.len()));
        }
        // In one record the message is read in place: nothing is copied.
        let mut reader = HelloReader::new();
        let records = hello_records(&simple_extensions());
        assert!(matches!(reader.advance(&records), Ok(Parse::Done(_))));
        assert!(reader.owned.is_none());
    }
}
