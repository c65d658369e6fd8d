//! Route lookup cost as the table grows: `ListenerRoutes::lookup` (the call
//! the connection pipeline makes: a lock-free snapshot load, SNI
//! normalisation, at most two hash lookups) with 10, 10,000 and 100,000
//! routes, for an exact hit, a wildcard hit, a miss, and an SNI in mixed case
//! with a trailing dot (normalised before the lookup).
//!
//! `cargo bench --bench routes`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mc_proxy::routes::{Backend, Hostname, ListenerRoutes, RouteMap, Target};

fn table(size: usize) -> ListenerRoutes {
    let mut map = RouteMap::new();
    let backend = Backend::parse("127.0.0.1:8443").expect("valid backend");
    for i in 0..size {
        // One in ten routes is a wildcard.
        let name = if i % 10 == 0 {
            format!("*.zone{i}.example.com")
        } else {
            format!("host{i}.example.com")
        };
        let hostname = Hostname::parse(&name).expect("valid hostname");
        map.insert(
            hostname,
            Target {
                backends: wire::route::Backends::one(backend.clone()),
                balance: Default::default(),
                health: None,
                send_proxy_protocol: false,
                mode: mc_proxy::routes::Mode::L4,
            },
        );
    }
    ListenerRoutes::new("127.0.0.1:443", map)
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("routes/lookup");
    for size in [10usize, 10_000, 100_000] {
        let routes = table(size);
        let last = size - 1;
        let cases = [
            ("exact", format!("host{last}.example.com")),
            (
                "wildcard",
                format!("www.zone{}.example.com", (size / 2) / 10 * 10),
            ),
            ("miss", "nothing.example.org".to_string()),
            ("mixed-case-dot", format!("HOST{last}.Example.COM.")),
        ];
        for (case, sni) in cases {
            let expect_hit = case != "miss";
            assert_eq!(
                routes.lookup(&sni).is_some(),
                expect_hit,
                "{case} at {size} routes"
            );
            group.bench_with_input(BenchmarkId::new(case, size), &sni, |b, sni| {
                b.iter(|| routes.lookup(black_box(sni)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
