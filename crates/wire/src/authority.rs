//! The admin Unix socket's `:authority` rewriter (README, "Admin API": any
//! gRPC client works over the socket with its defaults); the socket side
//! that drives it is `mc_proxy::admin::authority`.
//!
//! Owns: the client→server bytes of one admin Unix-socket connection, read
//! as HTTP/2 (the 24-byte preface, then 9-byte frame headers). Every frame
//! passes through byte for byte, except header blocks (HEADERS plus the
//! CONTINUATION frames up to END_HEADERS): each is decoded with the client's
//! HPACK state, an `:authority` that is not a valid URI authority (gRPC
//! C-core's percent-encoded socket path, grpc-java's raw path) becomes
//! `localhost`, and the whole block is re-encoded as literals without
//! indexing, split into frames of at most 16 KiB, PADDED and PRIORITY
//! dropped. The server's HPACK decoder thus never holds a dynamic-table
//! entry, whatever the client's encoder did.
//!
//! Never: touches the server→client direction, a TCP/TLS admin connection
//! or any proxy connection; changes a non-header frame; holds more than one
//! header block (64 KiB encoded, 64 KiB decoded) per connection. Input it
//! cannot carry faithfully (a bad preface, an oversized or malformed header
//! block, a frame inside a header block) closes the connection, where the
//! server's HTTP/2 layer would have sent GOAWAY.

use std::borrow::Cow;

/// The rewriter's properties, shared by the fuzz target and the corpus
/// replay (`testing` feature).
#[cfg(feature = "testing")]
pub mod checks;

/// Hand-built HTTP/2 frames for tests (`testing` feature).
#[cfg(any(test, feature = "testing"))]
pub mod build {
    /// One frame: 24-bit length, type, flags, stream id, payload.
    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
}

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest header block (HEADERS + CONTINUATION payloads, padding
/// included) accepted from a client. Four times the server's
/// `http2_max_header_list_size`, so the server, not the shim, answers a
/// merely large request (431).
pub const MAX_BLOCK: usize = 64 * 1024;
/// Largest decoded header list (RFC 7541 §4.1 sizes: name + value + 32 a
/// field); bounds what a small block referencing big table entries expands to.
pub const MAX_HEADER_LIST: usize = 64 * 1024;
/// Largest frame payload written towards the server: its
/// SETTINGS_MAX_FRAME_SIZE (h2's and tonic's default, 16 KiB).
pub const MAX_FRAME: usize = 16 * 1024;
/// The server never announces SETTINGS_HEADER_TABLE_SIZE, so the client's
/// encoder works within the protocol default.
const HEADER_TABLE_SIZE: usize = 4096;
/// What replaces an `:authority` the HTTP/2 layer would refuse.
pub const REPLACEMENT: &[u8] = b"localhost";

const FRAME_HEADER: usize = 9;
/// Buffer capacity kept between header blocks.
const KEEP_CAPACITY: usize = 4096;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why the shim closed a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShimError {
    #[error("not an HTTP/2 connection preface")]
    BadPreface,
    #[error("header block over {MAX_BLOCK} bytes")]
    BlockTooLarge,
    #[error("decoded header list over {MAX_HEADER_LIST} bytes")]
    ListTooLarge,
    #[error("HEADERS frame shorter than its padding and priority fields")]
    BadPadding,
    #[error("frame of type {0:#x} inside a header block (CONTINUATION expected)")]
    ExpectedContinuation(u8),
    #[error("CONTINUATION for stream {got} inside the header block of stream {want}")]
    ContinuationStream { got: u32, want: u32 },
    #[error("CONTINUATION frame outside a header block")]
    StrayContinuation,
    #[error("malformed HPACK header block: {0}")]
    Hpack(String),
}

#[derive(Debug)]
enum State {
    /// `matched` bytes of [`PREFACE`] seen.
    Preface {
        matched: usize,
    },
    /// `have` bytes of a frame header in `header`.
    FrameHeader {
        header: [u8; FRAME_HEADER],
        have: usize,
    },
    /// Copying a non-header frame's payload.
    Passthrough {
        remaining: usize,
    },
    /// Collecting a HEADERS or CONTINUATION payload into `frame`.
    HeaderPayload {
        kind: u8,
        flags: u8,
        remaining: usize,
    },
    Failed(ShimError),
}

/// The client→server rewriter, independent of any I/O: feed it what the
/// client sent, in pieces of any size, and it appends what the server
/// should read. The output does not depend on how the input was split.
pub struct Rewriter {
    state: State,
    decoder: loona_hpack::Decoder<'static>,
    /// The current HEADERS/CONTINUATION frame's payload.
    frame: Vec<u8>,
    /// The header block so far (fragments, padding and priority removed).
    block: Vec<u8>,
    /// The re-encoded block.
    encoded: Vec<u8>,
    in_block: bool,
    block_stream: u32,
    block_end_stream: bool,
    replaced: u64,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("state", &self.state)
            .field("in_block", &self.in_block)
            .field("replaced", &self.replaced)
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter::new()
    }
}

impl Rewriter {
    pub fn new() -> Rewriter {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            state: State::Preface { matched: 0 },
            decoder,
            frame: Vec::new(),
            block: Vec::new(),
            encoded: Vec::new(),
            in_block: false,
            block_stream: 0,
            block_end_stream: false,
            replaced: 0,
        }
    }

    /// How many `:authority` values were replaced so far.
    pub fn replaced(&self) -> u64 {
        self.replaced
    }

    /// Bytes of a non-header frame's payload still to come, which pass
    /// through unchanged (the caller may copy them itself and
    /// [`Rewriter::skip`] them).
    pub fn passthrough_remaining(&self) -> usize {
        match self.state {
            State::Passthrough { remaining } => remaining,
            _ => 0,
        }
    }

    /// Accounts for `n` payload bytes (at most
    /// [`Rewriter::passthrough_remaining`]) the caller passed on itself.
    pub fn skip(&mut self, n: usize) {
        if let State::Passthrough { remaining } = &mut self.state {
            let n = n.min(*remaining);
            *remaining -= n;
            if *remaining == 0 {
                self.state = State::FrameHeader {
                    header: [0; FRAME_HEADER],
                    have: 0,
                };
            }
        }
    }

    /// Consumes all of `input`, appending to `out` what the server should
    /// read. After an error every later call returns the same error (what
    /// was appended before it is whole frames and may still be delivered).
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ShimError> {
        while !input.is_empty() {
            if let Err(err) = self.step(&mut input, out) {
                self.state = State::Failed(err.clone());
                return Err(err);
            }
        }
        match &self.state {
            State::Failed(err) => Err(err.clone()),
            _ => Ok(()),
        }
    }

    /// Consumes some of `input` (at least one byte unless failed).
    fn step(&mut self, input: &mut &[u8], out: &mut Vec<u8>) -> Result<(), ShimError> {
        match &mut self.state {
            State::Failed(err) => Err(err.clone()),
            State::Preface { matched } => {
                let want = &PREFACE[*matched..];
                let n = want.len().min(input.len());
                if input[..n] != want[..n] {
                    return Err(ShimError::BadPreface);
                }
                out.extend_from_slice(&input[..n]);
                *input = &input[n..];
                *matched += n;
                if *matched == PREFACE.len() {
                    self.state = State::FrameHeader {
                        header: [0; FRAME_HEADER],
                        have: 0,
                    };
                }
                Ok(())
            }
            State::FrameHeader { header, have } => {
                let n = (FRAME_HEADER - *have).min(input.len());
                header[*have..*have + n].copy_from_slice(&input[..n]);
                *have += n;
                *input = &input[n..];
                if *have == FRAME_HEADER {
                    let header = *header;
                    self.frame_header(&header, out)?;
                }
                Ok(())
            }
            State::Passthrough { remaining } => {
                let n = (*remaining).min(input.len());
                out.extend_from_slice(&input[..n]);
                *input = &input[n..];
                self.skip(n);
                Ok(())
            }
            State::HeaderPayload {
                kind,
                flags,
                remaining,
            } => {
                let n = (*remaining).min(input.len());
                self.frame.extend_from_slice(&input[..n]);
                *input = &input[n..];
                *remaining -= n;
                if *remaining == 0 {
                    let (kind, flags) = (*kind, *flags);
                    self.header_frame(kind, flags, out)?;
                }
                Ok(())
            }
        }
    }

    /// A complete frame header: decide what to do with the payload.
    fn frame_header(
        &mut self,
        header: &[u8; FRAME_HEADER],
        out: &mut Vec<u8>,
    ) -> Result<(), ShimError> {
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let kind = header[3];
        let flags = header[4];
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        match kind {
            HEADERS if self.in_block => return Err(ShimError::ExpectedContinuation(kind)),
            HEADERS => {
                if length > MAX_BLOCK {
                    return Err(ShimError::BlockTooLarge);
                }
                self.in_block = true;
                self.block_stream = stream;
                self.block_end_stream = flags & END_STREAM != 0;
            }
            CONTINUATION if !self.in_block => return Err(ShimError::StrayContinuation),
            CONTINUATION if stream != self.block_stream => {
                return Err(ShimError::ContinuationStream {
                    got: stream,
                    want: self.block_stream,
                })
            }
            CONTINUATION => {
                if self.block.len() + length > MAX_BLOCK {
                    return Err(ShimError::BlockTooLarge);
                }
            }
            _ if self.in_block => return Err(ShimError::ExpectedContinuation(kind)),
            _ => {
                out.extend_from_slice(header);
                self.state = State::Passthrough { remaining: length };
                self.skip(0);
                return Ok(());
            }
        }
        self.frame.clear();
        self.state = State::HeaderPayload {
            kind,
            flags,
            remaining: length,
        };
        if length == 0 {
            self.header_frame(kind, flags, out)?;
        }
        Ok(())
    }

    /// A complete HEADERS or CONTINUATION payload in `self.frame`.
    fn header_frame(&mut self, kind: u8, flags: u8, out: &mut Vec<u8>) -> Result<(), ShimError> {
        let mut fragment = &self.frame[..];
        if kind == HEADERS {
            let mut pad = 0;
            if flags & PADDED != 0 {
                let (&len, rest) = fragment.split_first().ok_or(ShimError::BadPadding)?;
                pad = usize::from(len);
                fragment = rest;
            }
            if flags & PRIORITY != 0 {
                fragment = fragment.get(5..).ok_or(ShimError::BadPadding)?;
            }
            let end = fragment
                .len()
                .checked_sub(pad)
                .ok_or(ShimError::BadPadding)?;
            fragment = &fragment[..end];
        }
        self.block.extend_from_slice(fragment);
        self.frame.clear();
        self.state = State::FrameHeader {
            header: [0; FRAME_HEADER],
            have: 0,
        };
        if flags & END_HEADERS != 0 {
            self.finish_block(out)?;
        }
        Ok(())
    }

    /// Decodes the whole block, re-encodes it as literals and writes it as
    /// HEADERS + CONTINUATION frames.
    fn finish_block(&mut self, out: &mut Vec<u8>) -> Result<(), ShimError> {
        let Rewriter {
            decoder,
            block,
            encoded,
            replaced,
            ..
        } = self;
        encoded.clear();
        let mut list_size = 0usize;
        let mut over = false;
        decoder
            .decode_with_cb(block, |name, value| {
                list_size += name.len() + value.len() + 32;
                if over || list_size > MAX_HEADER_LIST {
                    over = true;
                    return;
                }
                let value = if &*name == b":authority" && !valid_authority(&value) {
                    *replaced += 1;
                    Cow::Borrowed(REPLACEMENT)
                } else {
                    value
                };
                encode_literal(&name, &value, encoded);
            })
            .map_err(|e| ShimError::Hpack(e.to_string()))?;
        if over {
            return Err(ShimError::ListTooLarge);
        }
        block.clear();
        self.in_block = false;
        // A large block's buffers are not kept for the connection's life.
        for buf in [&mut self.block, &mut self.frame] {
            buf.shrink_to(KEEP_CAPACITY);
        }

        let stream = self.block_stream.to_be_bytes();
        let mut chunks = self.encoded.chunks(MAX_FRAME).peekable();
        let mut kind = HEADERS;
        let mut flags = if self.block_end_stream { END_STREAM } else { 0 };
        if chunks.peek().is_none() {
            write_frame_header(out, 0, kind, flags | END_HEADERS, stream);
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let f = if last { flags | END_HEADERS } else { flags };
            write_frame_header(out, chunk.len(), kind, f, stream);
            out.extend_from_slice(chunk);
            kind = CONTINUATION;
            flags = 0;
        }
        self.encoded.shrink_to(KEEP_CAPACITY);
        Ok(())
    }
}

/// What the HTTP/2 layer (h2, through `http`) accepts as `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn write_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: [u8; 4]) {
    // len <= MAX_FRAME, which fits the 24-bit length field.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream);
}

/// RFC 7541 §6.2.2: literal header field without indexing, new name, both
/// strings raw (no Huffman).
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    encode_string(name, out);
    encode_string(value, out);
}

fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::decoder::DecoderError;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    const PCT_PATH: &[u8] = b"srv%2Fmc-proxy%2Fmc-proxy.sock";
    const RAW_PATH: &[u8] = b"/srv/mc-proxy/mc-proxy.sock";

    use super::build::frame;

    fn request(authority: Option<&[u8]>) -> Fields {
        let mut fields: Fields = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (
                b":path".to_vec(),
                b"/mc_proxy.v1.ProxyAdminService/GetStatus".to_vec(),
            ),
        ];
        if let Some(authority) = authority {
            fields.push((b":authority".to_vec(), authority.to_vec()));
        }
        fields.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
        fields.push((b"te".to_vec(), b"trailers".to_vec()));
        fields
    }

    fn encode(encoder: &mut loona_hpack::Encoder<'_>, fields: &Fields) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    /// A client's bytes: preface, SETTINGS, a request whose block (with
    /// incremental indexing, as a real encoder does) is spread over a padded
    /// and prioritised HEADERS and two CONTINUATIONs, its DATA, a second
    /// request that references the first one's dynamic-table entries, a PING.
    fn client_bytes() -> (Vec<u8>, Vec<(u32, Fields)>) {
        let first = request(Some(PCT_PATH));
        let mut block = Vec::new();
        for (n, v) in &first {
            block.push(0x40); // literal with incremental indexing, new name
            encode_string(n, &mut block);
            encode_string(v, &mut block);
        }
        // The same request again, every field by its dynamic-table index
        // (the newest entry is 62).
        let second = first.clone();
        let block2: Vec<u8> = (0..second.len())
            .map(|i| 0x80 | (62 + second.len() - 1 - i) as u8)
            .collect();

        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(7);
        let mut payload = vec![4u8]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 0, 0x10]); // priority fields
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0; 4]);
        bytes.extend(frame(HEADERS, PADDED | PRIORITY, 1, &payload));
        bytes.extend(frame(CONTINUATION, 0, 1, b));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, c));
        bytes.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block2));
        bytes.extend(frame(0x6, 0, 0, b"12345678"));

        let mut want_first = first;
        want_first[3].1 = REPLACEMENT.to_vec();
        let mut want_second = second;
        want_second[3].1 = REPLACEMENT.to_vec();
        (bytes, vec![(1, want_first), (3, want_second)])
    }

    fn rewrite(input: &[u8]) -> Result<Vec<u8>, ShimError> {
        let mut out = Vec::new();
        Rewriter::new().feed(input, &mut out)?;
        Ok(out)
    }

    fn rewrite_chunked(input: &[u8], sizes: impl Iterator<Item = usize>) -> Vec<u8> {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        let mut rest = input;
        for size in sizes {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at(size.clamp(1, rest.len()));
            rewriter.feed(chunk, &mut out).unwrap();
            rest = tail;
        }
        rewriter.feed(rest, &mut out).unwrap();
        out
    }

    /// `(type, flags, stream, payload)` of every frame after the preface.
    fn frames(out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut rest = &out[PREFACE.len()..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            frames.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        frames
    }

    /// Decodes the output's header blocks with one decoder, as the server
    /// does; checks the framing rules the server relies on; and shows the
    /// decoder's dynamic table stayed empty.
    fn header_lists(out: &[u8]) -> Vec<(u32, u8, Fields)> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut lists = Vec::new();
        let mut block: Option<(u32, u8, Vec<u8>)> = None;
        for (kind, flags, stream, payload) in frames(out) {
            assert!(payload.len() <= MAX_FRAME);
            match kind {
                HEADERS => {
                    assert!(block.is_none());
                    assert_eq!(flags & (PADDED | PRIORITY), 0);
                    block = Some((stream, flags & END_STREAM, payload));
                }
                CONTINUATION => {
                    let open = block.as_mut().expect("CONTINUATION inside a block");
                    assert_eq!(open.0, stream);
                    open.2.extend_from_slice(&payload);
                }
                _ => assert!(block.is_none()),
            }
            if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                let (stream, end_stream, payload) = block.take().unwrap();
                lists.push((stream, end_stream, decoder.decode(&payload).unwrap()));
            }
        }
        assert!(block.is_none());
        // Index 62 is the first dynamic-table entry: there is none.
        assert_eq!(
            decoder.decode(&[0x80 | 62]),
            Err(DecoderError::HeaderIndexOutOfBounds)
        );
        lists
    }

    #[test]
    fn replaces_bad_authority_and_passes_every_other_frame() {
        let (input, want) = client_bytes();
        let out = rewrite(&input).unwrap();
        let lists = header_lists(&out);
        assert_eq!(lists.len(), 2);
        for ((stream, end_stream, fields), (want_stream, want_fields)) in lists.iter().zip(&want) {
            assert_eq!(stream, want_stream);
            assert_eq!(*end_stream, if *stream == 3 { END_STREAM } else { 0 });
            assert_eq!(fields, want_fields);
        }
        let kinds: Vec<(u8, u8, u32, Vec<u8>)> = frames(&out)
            .into_iter()
            .filter(|f| !matches!(f.0, HEADERS | CONTINUATION))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0x4, 0, 0, vec![0, 3, 0, 0, 0, 100]),
                (0x0, END_STREAM, 1, vec![0; 5]),
                (0x6, 0, 0, b"12345678".to_vec()),
            ]
        );
    }

    #[test]
    fn same_output_however_the_input_is_split() {
        let (input, _) = client_bytes();
        let whole = rewrite(&input).unwrap();
        for i in 0..=input.len() {
            assert_eq!(
                rewrite_chunked(&input, [i].into_iter()),
                whole,
                "split at {i}"
            );
        }
        assert_eq!(rewrite_chunked(&input, std::iter::repeat(1)), whole);
        for seed in 1..200u64 {
            let mut x = seed;
            let sizes = std::iter::from_fn(move || {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                Some(((x >> 33) % 40) as usize + 1)
            });
            assert_eq!(rewrite_chunked(&input, sizes), whole, "seed {seed}");
        }
    }

    #[test]
    fn a_truncated_stream_gives_a_prefix_of_the_output_and_no_error() {
        let (input, _) = client_bytes();
        let whole = rewrite(&input).unwrap();
        for i in 0..input.len() {
            let out = rewrite(&input[..i]).unwrap();
            assert!(whole.starts_with(&out), "prefix {i}");
        }
    }

    fn one_request(authority: Option<&[u8]>) -> Fields {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encode(&mut encoder, &request(authority));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = rewrite(&input).unwrap();
        let mut lists = header_lists(&out);
        assert_eq!(lists.len(), 1);
        lists.remove(0).2
    }

    fn authority_of(fields: &Fields) -> Option<&[u8]> {
        fields
            .iter()
            .find(|(n, _)| n == b":authority")
            .map(|(_, v)| &v[..])
    }

    #[test]
    fn valid_authorities_stay_and_none_is_not_added() {
        for kept in [
            &b"localhost"[..],
            b"localhost:50051",
            b"127.0.0.1:9443",
            b"[::1]:1",
        ] {
            assert_eq!(authority_of(&one_request(Some(kept))), Some(kept));
        }
        for bad in [PCT_PATH, RAW_PATH, b"", b"a b", b"\xff"] {
            assert_eq!(
                authority_of(&one_request(Some(bad))),
                Some(REPLACEMENT),
                "{bad:?}"
            );
        }
        let fields = one_request(None);
        assert_eq!(authority_of(&fields), None);
        assert_eq!(fields, request(None));
    }

    #[test]
    fn large_blocks_are_split_at_the_server_frame_size() {
        let mut fields = request(Some(RAW_PATH));
        fields.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let mut block = Vec::new();
        for (n, v) in &fields {
            encode_literal(n, v, &mut block);
        }
        let mut input = PREFACE.to_vec();
        let (a, b) = block.split_at(15_000);
        input.extend(frame(HEADERS, END_STREAM, 5, a));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let out = rewrite(&input).unwrap();
        let frames = frames(&out);
        assert_eq!(frames.len(), 3);
        assert_eq!((frames[0].0, frames[0].1), (HEADERS, END_STREAM));
        assert_eq!((frames[1].0, frames[1].1), (CONTINUATION, 0));
        assert_eq!((frames[2].0, frames[2].1), (CONTINUATION, END_HEADERS));
        assert_eq!(frames[0].3.len(), MAX_FRAME);
        let lists = header_lists(&out);
        fields[3].1 = REPLACEMENT.to_vec();
        assert_eq!(lists, vec![(5, END_STREAM, fields)]);
    }

    #[test]
    fn a_table_size_update_is_consumed_not_forwarded() {
        let mut block = vec![0x20]; // size update to 0: evicts everything
        let mut encoder = loona_hpack::Encoder::new();
        encoder.set_max_table_size(0);
        let fields = request(Some(b"localhost"));
        for (n, v) in &fields {
            encode_literal(n, v, &mut block);
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = rewrite(&input).unwrap();
        let frames = frames(&out);
        assert_ne!(frames[0].3[0] & 0xe0, 0x20);
        assert_eq!(header_lists(&out), vec![(1, 0, fields)]);
        // An empty block (trailers with nothing in them) stays one frame.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &[]));
        let out = rewrite(&input).unwrap();
        assert_eq!(
            &out[PREFACE.len()..],
            &frame(HEADERS, END_HEADERS | END_STREAM, 1, &[])[..]
        );
    }

    fn refused(frames_after_preface: &[Vec<u8>]) -> ShimError {
        let mut input = PREFACE.to_vec();
        for f in frames_after_preface {
            input.extend_from_slice(f);
        }
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        let err = rewriter.feed(&input, &mut out).unwrap_err();
        // Sticky: nothing more is accepted.
        assert_eq!(rewriter.feed(&[0], &mut out), Err(err.clone()));
        err
    }

    #[test]
    fn hostile_input_closes_the_connection() {
        assert_eq!(rewrite(b"GET / HTTP/1.1\r\n"), Err(ShimError::BadPreface));
        assert_eq!(rewrite(&PREFACE[..5]).map(|o| o.len()), Ok(5));
        let literal = {
            let mut b = Vec::new();
            encode_literal(b":method", b"POST", &mut b);
            b
        };
        assert_eq!(
            refused(&[frame(CONTINUATION, END_HEADERS, 1, &literal)]),
            ShimError::StrayContinuation
        );
        assert_eq!(
            refused(&[frame(HEADERS, 0, 1, &literal), frame(0x0, 0, 1, b"x")]),
            ShimError::ExpectedContinuation(0)
        );
        assert_eq!(
            refused(&[
                frame(HEADERS, 0, 1, &literal),
                frame(HEADERS, END_HEADERS, 3, &literal)
            ]),
            ShimError::ExpectedContinuation(HEADERS)
        );
        assert_eq!(
            refused(&[
                frame(HEADERS, 0, 1, &literal),
                frame(CONTINUATION, END_HEADERS, 3, &literal)
            ]),
            ShimError::ContinuationStream { got: 3, want: 1 }
        );
        assert_eq!(
            refused(&[frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 0, 0])]),
            ShimError::BadPadding
        );
        assert_eq!(
            refused(&[frame(HEADERS, PADDED | END_HEADERS, 1, &[])]),
            ShimError::BadPadding
        );
        assert_eq!(
            refused(&[frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0, 0])]),
            ShimError::BadPadding
        );
        // Index 200 is in neither table.
        assert!(matches!(
            refused(&[frame(HEADERS, END_HEADERS, 1, &[0x80 | 0x7f, 200 - 127])]),
            ShimError::Hpack(_)
        ));
        // A table size beyond the 4096 the server allows.
        assert!(matches!(
            refused(&[frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x3f, 0x82])]),
            ShimError::Hpack(_)
        ));
        // A string longer than the block.
        assert!(matches!(
            refused(&[frame(HEADERS, END_HEADERS, 1, &[0x00, 0x7f, 0x10, b'a'])]),
            ShimError::Hpack(_)
        ));
    }

    #[test]
    fn oversized_blocks_and_expansions_are_refused() {
        // One frame header announcing more than a block may hold: refused
        // before any payload is buffered.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x01, 0x00, 0x01, HEADERS, 0, 0, 0, 0, 1]);
        assert_eq!(rewrite(&input), Err(ShimError::BlockTooLarge));
        // Many CONTINUATIONs adding up past the limit.
        let chunk = vec![0u8; 16_000];
        let mut frames_in = vec![frame(HEADERS, 0, 1, &chunk)];
        for _ in 0..4 {
            frames_in.push(frame(CONTINUATION, 0, 1, &chunk));
        }
        assert_eq!(refused(&frames_in), ShimError::BlockTooLarge);
        // A small block expanding past the list limit: one 4000-byte entry
        // in the dynamic table, referenced 20 times.
        let mut block = vec![0x40];
        encode_string(b"x-a", &mut block);
        encode_string(&[b'a'; 4000], &mut block);
        block.extend(std::iter::repeat_n(0x80 | 62, 20));
        assert_eq!(
            refused(&[frame(HEADERS, END_HEADERS, 1, &block)]),
            ShimError::ListTooLarge
        );
        // Frame lengths up to the 24-bit maximum pass through without being
        // buffered.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0, 0, 0, 0, 1]);
        input.extend_from_slice(&[7; 100]);
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        rewriter.feed(&input, &mut out).unwrap();
        assert_eq!(out, input);
        assert_eq!(rewriter.passthrough_remaining(), 0xff_ffff - 100);
    }
}
