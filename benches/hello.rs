//! ClientHello parsing cost by hello size: a small hello (~120 bytes, SNI
//! and supported_versions only), a captured Chromium post-quantum hello
//! (1,951 bytes, X25519MLKEM768 key share), and a 16 KiB hello in one record
//! and split over two records (reassembled); plus the cost of the
//! incremental path, where the parser is called again on every prefix a slow
//! client delivers (here in 512-byte steps).
//!
//! `cargo bench --bench hello`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mc_proxy::hello::{parse, Parse};
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

criterion_group!(benches, full_hello, incremental);
criterion_main!(benches);
