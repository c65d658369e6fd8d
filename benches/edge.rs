//! Per-connection cost of the edge features: the metric updates one
//! connection makes (accept, close with bytes, two latency observations),
//! and parsing a PROXY v1 line and a v2 header with TLVs.
//!
//! `cargo bench --bench edge`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use mc_proxy::metrics::Metrics;
use mc_proxy::outcome::Outcome;
use mc_proxy::proxy_protocol;

fn metrics(c: &mut Criterion) {
    let metrics = Metrics::new(&[":443".to_string()], "bench");
    let listener = &metrics.listeners()[0];
    c.bench_function(
        "metrics/one connection (accept, close, 2 histograms)",
        |b| {
            b.iter(|| {
                listener.accepted();
                listener.hello_took(black_box(Duration::from_micros(300)));
                listener.connect_took(black_box(Duration::from_micros(150)));
                listener.closed(black_box(Outcome::Relayed), Some(1500), Some(40_000));
                listener.released();
            })
        },
    );
}

fn proxy_header(c: &mut Criterion) {
    let v1 = b"PROXY TCP4 81.2.69.142 10.0.0.1 51234 443\r\n\x16\x03\x01";
    let mut v2 = Vec::new();
    proxy_protocol::encode_v2(
        "[2001:db8::1]:51234".parse().unwrap(),
        "[2001:db8::2]:443".parse().unwrap(),
        &mut v2,
    );
    c.bench_function("proxy_protocol/parse v1 TCP4", |b| {
        b.iter(|| proxy_protocol::parse(black_box(v1)))
    });
    c.bench_function("proxy_protocol/parse v2 TCP6", |b| {
        b.iter(|| proxy_protocol::parse(black_box(&v2)))
    });
    c.bench_function("proxy_protocol/encode v2 TCP6", |b| {
        let mut out = Vec::with_capacity(64);
        let source = "[2001:db8::1]:51234".parse().unwrap();
        let destination = "[2001:db8::2]:443".parse().unwrap();
        b.iter(|| {
            out.clear();
            proxy_protocol::encode_v2(black_box(source), black_box(destination), &mut out)
        })
    });
}

criterion_group!(benches, metrics, proxy_header);
criterion_main!(benches);
