//! The properties of the ClientHello reader that the `hello` fuzz target
//! checks on every input, and that `make test` checks on every file of the
//! committed corpus (tests/fuzz_corpus.rs). Both call [`check`] (the
//! `testing` feature).
//!
//! Beyond "never panics":
//!
//! - Feeding the input to one `HelloReader` in arbitrary chunks (a byte at a
//!   time, and cut points drawn from a hash of the input at three scales)
//!   gives the same answer as one call on the whole input, at the prefix
//!   where one call on that prefix gives it too; a byte at a time, the
//!   answer comes exactly at the byte that decides it, and a `Done` comes
//!   exactly at `record_len`. Once the answer is known it is repeated.
//! - Every strict prefix of a hello is `NeedMore`, bytes after `record_len`
//!   change nothing, and re-framing the same handshake message into other
//!   record sizes gives the same SNI and ALPN.
//! - [`parse_message`] (the message without records, as QUIC carries it)
//!   answers as [`parse`] does on the same bytes framed in records, for the
//!   input itself and for the message of a hello.

use crate::hello::{
    parse, parse_message, ClientHello, HelloReader, Parse, Reject, MAX_RECORDS_LEN,
};

pub fn check(data: &[u8]) {
    let result = parse(data);
    check_chunked(data, &result);
    check_message(data);
    match &result {
        Ok(Parse::Done(found)) => {
            assert!(found.record_len <= data.len());
            assert!(found.record_len <= MAX_RECORDS_LEN);
            let records = &data[..found.record_len];
            assert_eq!(parse(records), result, "bytes after record_len matter");
            for cut in [0, 1, 5, 6, 9, records.len() / 2, records.len() - 1] {
                if cut < records.len() {
                    assert_eq!(parse(&records[..cut]), Ok(Parse::NeedMore), "prefix {cut}");
                }
            }
            check_reframed(records, data, found);
        }
        Ok(Parse::NeedMore) => {
            // Any prefix of a valid prefix is a valid prefix.
            assert_eq!(parse(&data[..data.len() / 2]), Ok(Parse::NeedMore));
        }
        Err(_) => {}
    }
}

/// Deterministic xorshift64 for the unit tests' random splits and orders
/// (no rand crate): the hello's and the QUIC Initial reader's.
#[cfg(test)]
pub(crate) struct XorShift(pub(crate) u64);

#[cfg(test)]
impl XorShift {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// A deterministic xorshift64 seeded from the input, so the cut points are
/// the fuzzer's to choose (through the input) and a replay repeats them.
/// (The QUIC Initial checks use it too.)
pub(crate) fn rng_for(data: &[u8], salt: u64) -> impl FnMut() -> u64 {
    let mut seed = data.iter().fold(0x9e37_79b9_7f4a_7c15_u64 ^ salt, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// Feeds `data` to one reader in growing prefixes, each `next_chunk()`
/// bytes longer; the first answer other than NeedMore and the prefix length
/// it came at (NeedMore and `data.len()` if none).
fn feed(data: &[u8], next_chunk: &mut dyn FnMut() -> usize) -> (Result<Parse, Reject>, usize) {
    let mut reader = HelloReader::new();
    let mut end = 0;
    loop {
        end = (end + next_chunk().max(1)).min(data.len());
        let answer = reader.advance(&data[..end]);
        if answer != Ok(Parse::NeedMore) {
            // Known answers are repeated.
            assert_eq!(reader.advance(data), answer, "answer not repeated");
            return (answer, end);
        }
        if end == data.len() {
            return (answer, end);
        }
    }
}

fn check_chunked(data: &[u8], whole: &Result<Parse, Reject>) {
    // A byte at a time: the answer comes at the byte that decides it.
    let (answer, at) = feed(data, &mut || 1);
    assert_eq!(&answer, whole, "a byte at a time, answer at {at}");
    if let Ok(Parse::Done(hello)) = &answer {
        assert_eq!(at, hello.record_len, "Done later than record_len");
    }
    if answer != Ok(Parse::NeedMore) {
        assert_eq!(&parse(&data[..at]), whole, "one call on prefix {at}");
        assert_eq!(
            parse(&data[..at - 1]),
            Ok(Parse::NeedMore),
            "prefix {}",
            at - 1
        );
    }
    // Hash-chosen cuts, small, record-sized and large.
    for (salt, scale) in [(1u64, 8u64), (2, 300), (3, 20_000)] {
        let mut rng = rng_for(data, salt);
        let (answer, at) = feed(data, &mut || 1 + (rng() % scale) as usize);
        assert_eq!(&answer, whole, "chunks of up to {scale}, answer at {at}");
        if answer != Ok(Parse::NeedMore) {
            assert_eq!(&parse(&data[..at]), whole, "one call on prefix {at}");
        }
    }
}

/// Re-splits the handshake message carried by `records` into other record
/// sizes and checks the answer is the same, in one call and in one call
/// per record.
fn check_reframed(records: &[u8], data: &[u8], found: &ClientHello) {
    let stream = unframe(records);
    let msg_len =
        4 + (usize::from(stream[1]) << 16 | usize::from(stream[2]) << 8 | usize::from(stream[3]));
    let message = &stream[..msg_len];
    check_message(message);
    match parse_message(&stream) {
        Ok(Parse::Done(again)) => {
            assert_eq!(again.sni, found.sni);
            assert_eq!(again.alpn, found.alpn);
            assert_eq!(again.record_len, msg_len);
        }
        other => panic!("the hello's message without records gave {other:?}"),
    }

    let mut rng = rng_for(data, 0);
    let mut random_size = move || 1 + (rng() % 300) as usize;
    let framings = [
        frame(message, &mut || 1),
        frame(message, &mut || 7),
        frame(message, &mut || 16384),
        frame(message, &mut random_size),
    ];
    for reframed in framings {
        match parse(&reframed) {
            Ok(Parse::Done(again)) => {
                assert_eq!(again.sni, found.sni);
                assert_eq!(again.alpn, found.alpn);
                assert_eq!(again.record_len, reframed.len());
            }
            other => panic!("reframed hello gave {other:?}"),
        }
        assert_eq!(parse(&reframed[..reframed.len() - 1]), Ok(Parse::NeedMore));
        // One call per record, as a client sending one record per segment
        // is read.
        let mut reader = HelloReader::new();
        let mut pos = 0;
        while pos < reframed.len() {
            pos += 5 + usize::from(u16::from_be_bytes([reframed[pos + 3], reframed[pos + 4]]));
            let answer = reader.advance(&reframed[..pos]);
            if pos < reframed.len() {
                assert_eq!(answer, Ok(Parse::NeedMore), "record ending at {pos}");
            } else {
                assert!(matches!(answer, Ok(Parse::Done(ref again)) if again.sni == found.sni));
            }
        }
    }
}

/// The handshake bytes carried by well-formed records.
fn unframe(records: &[u8]) -> Vec<u8> {
    let mut stream = Vec::with_capacity(records.len());
    let mut pos = 0;
    while pos < records.len() {
        let len = usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
        stream.extend_from_slice(&records[pos + 5..pos + 5 + len]);
        pos += 5 + len;
    }
    stream
}

fn frame(mut message: &[u8], next_size: &mut dyn FnMut() -> usize) -> Vec<u8> {
    let mut records = Vec::with_capacity(message.len() * 6);
    while !message.is_empty() {
        let size = next_size().clamp(1, message.len().min(16384));
        let len = u16::try_from(size).unwrap_or(u16::MAX).to_be_bytes();
        records.extend_from_slice(&[22, 3, 1, len[0], len[1]]);
        records.extend_from_slice(&message[..size]);
        message = &message[size..];
    }
    records
}

/// `parse_message(message)` gives the answer `parse` gives on `message`
/// framed in records (of 16384 bytes and of a hash-chosen size), but for a
/// `Done`'s `record_len`, which counts the message alone.
fn check_message(message: &[u8]) {
    let bare = parse_message(message);
    if let Ok(Parse::Done(hello)) = &bare {
        let body_len = message.get(1..4).map_or(0, |len| {
            usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2])
        });
        assert_eq!(hello.record_len, 4 + body_len);
        assert!(hello.record_len <= message.len());
    }
    let mut rng = rng_for(message, 4);
    let mut random_size = move || 1 + (rng() % 300) as usize;
    for records in [
        frame(message, &mut || 16384),
        frame(message, &mut random_size),
    ] {
        let framed = parse(&records);
        match (&bare, &framed) {
            (Ok(Parse::Done(bare)), Ok(Parse::Done(framed))) => {
                assert_eq!(bare.sni, framed.sni);
                assert_eq!(bare.alpn, framed.alpn);
            }
            _ => assert_eq!(bare, framed, "the message alone and in records"),
        }
    }
}
