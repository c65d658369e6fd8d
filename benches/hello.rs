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

/// A well-formed TLS 1.3 ClientHello handshake message (type, length, body)
/// with SNI `sni` and `padding` bytes of padding extension.
fn hello_message(sni: &str, padding: usize) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[0x03, 0x03]);
    body.extend_from_slice(&[7u8; 32]);
    body.push(32);
    body.extend_from_slice(&[9u8; 32]);
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    let name = sni.as_bytes();
    let mut extensions = vec![0x00, 0x00];
    extensions.extend_from_slice(&((name.len() + 5) as u16).to_be_bytes());
    extensions.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    extensions.push(0);
    extensions.extend_from_slice(&(name.len() as u16).to_be_bytes());
    extensions.extend_from_slice(name);
    extensions.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    if padding > 0 {
        extensions.extend_from_slice(&[0x00, 0x15]);
        extensions.extend_from_slice(&(padding as u16).to_be_bytes());
        extensions.resize(extensions.len() + padding, 0);
    }
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut message = vec![0x01];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

/// Frames a handshake message into records of at most `size` bytes.
fn records(message: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn inputs() -> Vec<(&'static str, Vec<u8>)> {
    let chromium = include_bytes!("../tests/data/hellos/chromium-156-pq.bin").to_vec();
    // 16 KiB of handshake message: one full record, then the same message
    // split over two records (the reassembling path).
    let base = hello_message("big.example.test", 0).len();
    let big = hello_message("big.example.test", 16384 - base - 4);
    assert_eq!(big.len(), 16384);
    vec![
        ("small", records(&hello_message("a.example.test", 0), 16384)),
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
