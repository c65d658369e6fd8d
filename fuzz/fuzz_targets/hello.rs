//! Fuzzes the ClientHello reader. Beyond "never panics", it checks that the
//! answer does not depend on how the hello is cut into records or reads:
//! every strict prefix of a hello is `NeedMore`, re-framing the same handshake
//! message into other record sizes gives the same SNI and ALPN, and bytes
//! after `record_len` change nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Included by path so the fuzz build needs none of the main crate's dependencies.
#[path = "../../src/hello.rs"]
mod hello;

use hello::{parse, Parse};

fuzz_target!(|data: &[u8]| {
    let result = parse(data);
    match &result {
        Ok(Parse::Done(found)) => {
            assert!(found.record_len <= data.len());
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
});

/// Re-splits the handshake message carried by `records` into other record
/// sizes and checks the answer is the same.
fn check_reframed(records: &[u8], data: &[u8], found: &hello::ClientHello) {
    let stream = unframe(records);
    let msg_len =
        4 + (usize::from(stream[1]) << 16 | usize::from(stream[2]) << 8 | usize::from(stream[3]));
    let message = &stream[..msg_len];

    let mut seed = data.iter().fold(0x9e37_79b9_7f4a_7c15_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) | 1;
    let mut random_size = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        1 + (seed % 300) as usize
    };
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
