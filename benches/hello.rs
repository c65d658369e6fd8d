//! ClientHello parsing cost by hello size: a small hello (~120 bytes, SNI
//! and supported_versions only), a captured Chromium post-quantum hello
//! (1,951 bytes, X25519MLKEM768 key share), and a 16 KiB hello in one record
//! and split over two records (reassembled); plus the cost of the
//! incremental path, where the parser is called again on every prefix a slow
//! client delivers (here in 512-byte steps).
//!
//! The `one-byte-records` groups are the slow-client case of issue 13: a
//! hello framed as 1-byte TLS records, the reader called once per record on
//! the whole buffer so far (the buffer grows by one record a call, as
//! `proxy/conn.rs` does when each record arrives in its own segment).
//! `hello/one-byte-records` keeps one [`HelloReader`] across the calls, as
//! the proxy does, at 16, 32 and 64 KiB: each doubling should cost about 2x.
//! `hello/one-byte-records-reparse` is the old way for contrast, a fresh
//! [`parse`] of the whole buffer on every record: quadratic, so 8 KiB costs
//! about 4x what 4 KiB costs (kept small, or it takes seconds a call).
//!
//! `cargo bench --bench hello`
//! `cargo bench --bench hello -- one-byte --measurement-time 3 --warm-up-time 1`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mc_proxy::hello::{parse, HelloReader, Parse};
use wire::hello::build::{hello_message, records};

fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    let chromium = include_bytes!("../tests/data/hellos/chromium-156-pq.bin").to_vec();
    // 16 KiB of handshake message: one full record, then the same message
    // split over two records (the reassembling path).
    let base = hello_message(Some("big.example.test"), 0).len();
    let big = hello_message(Some("big.example.test"), 16384 - base - 4);
    assert_eq!(big.len(), 16384);
    vec![
        (
            "small",
            records(&hello_message(Some("a.example.test"), 0), 16384),
        ),
        ("chromium-pq-1951B", chromium),
        ("16KiB-one-record", records(&big, 16384)),
        ("16KiB-two-records", records(&big, 8192)),
    ]
}

fn full_hello(c: &mut Criterion) {
    let mut group = c.benchmark_group("hello/parse");
    for (name, bytes) in inputs() {
        // Every input must parse, or the benchmark measures an error path.
        assert!(
            matches!(parse(&bytes), Ok(Parse::Done(ref h)) if h.sni.is_some()),
            "{name} does not parse to a hello with SNI"
        );
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &bytes, |b, bytes| {
            b.iter(|| parse(black_box(bytes)))
        });
    }
    group.finish();
}

fn incremental(c: &mut Criterion) {
    let mut group = c.benchmark_group("hello/prefixes-512B-steps");
    for (name, bytes) in inputs() {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &bytes, |b, bytes| {
            b.iter(|| {
                let mut end = 0;
                loop {
                    end = (end + 512).min(bytes.len());
                    if let Ok(Parse::Done(hello)) = parse(black_box(&bytes[..end])) {
                        return hello;
                    }
                    assert!(end < bytes.len(), "complete input did not parse");
                }
            })
        });
    }
    group.finish();
}

/// A ClientHello handshake message of exactly `len` bytes (its 4-byte header
/// included), padded with a padding extension, framed as 1-byte records.
fn one_byte_records(len: usize) -> Vec<u8> {
    let base = hello_message(Some("big.example.test"), 0).len();
    // The padding extension adds its 4-byte header and `padding` bytes.
    let message = hello_message(Some("big.example.test"), len - base - 4);
    assert_eq!(message.len(), len);
    records(&message, 1)
}

/// Bytes one 1-byte record takes: a 5-byte header and its byte.
const ONE_BYTE_RECORD: usize = 6;

/// Feeds `bytes` (1-byte records) one record per call to `step`, on the
/// growing prefix, until it answers `Done`; panics if it never does.
fn per_record(
    bytes: &[u8],
    mut step: impl FnMut(&[u8]) -> Result<Parse, mc_proxy::hello::Reject>,
) -> usize {
    let mut end = 0;
    loop {
        end += ONE_BYTE_RECORD;
        match step(black_box(&bytes[..end])) {
            Ok(Parse::Done(hello)) => return hello.record_len,
            Ok(Parse::NeedMore) => assert!(end < bytes.len(), "complete input did not parse"),
            Err(reject) => panic!("rejected at {end}: {reject}"),
        }
    }
}

fn one_byte_records_linear(c: &mut Criterion) {
    let mut group = c.benchmark_group("hello/one-byte-records");
    for kib in [16usize, 32, 64] {
        let bytes = one_byte_records(kib * 1024);
        // Every input must parse, or the benchmark measures an error path.
        // (One reader across the calls: re-parsing 64 KiB per record would
        // take minutes.)
        let mut reader = HelloReader::new();
        assert_eq!(
            per_record(&bytes, |prefix| reader.advance(prefix)),
            bytes.len()
        );
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{kib}KiB")),
            &bytes,
            |b, bytes| {
                b.iter(|| {
                    let mut reader = HelloReader::new();
                    per_record(bytes, |prefix| reader.advance(prefix))
                })
            },
        );
    }
    group.finish();
}

fn one_byte_records_reparse(c: &mut Criterion) {
    let mut group = c.benchmark_group("hello/one-byte-records-reparse");
    group.sample_size(10);
    for kib in [4usize, 8] {
        let bytes = one_byte_records(kib * 1024);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{kib}KiB")),
            &bytes,
            |b, bytes| b.iter(|| per_record(bytes, parse)),
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    full_hello,
    incremental,
    one_byte_records_linear,
    one_byte_records_reparse
);
criterion_main!(benches);
