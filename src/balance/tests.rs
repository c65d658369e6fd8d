use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use wire::route::{Backends, HealthCheck, Mode};

use super::health::{self, CheckKey, ProbeFuture, Prober};
use super::*;

fn backend(port: u16) -> Backend {
    Backend::parse(&format!("127.0.0.1:{port}")).unwrap()
}

fn target(ports: &[u16], balance: Balance, health: Option<HealthCheck>) -> Arc<Target> {
    Arc::new(Target {
        backends: Backends::new(ports.iter().map(|p| backend(*p)).collect()).unwrap(),
        balance,
        health,
        send_proxy_protocol: false,
        mode: Mode::L4,
    })
}

fn host(name: &str) -> Hostname {
    Hostname::parse(name).unwrap()
}

fn ports(attempts: Attempts<'_>) -> Vec<u16> {
    attempts
        .map(|m| m.backend().socket_addr().unwrap().port())
        .collect()
}

#[test]
fn round_robin_spreads_evenly_and_fails_over_in_turn() {
    let balancer = Balancer::new();
    let route = balancer.route(
        &host("a.test"),
        &target(&[1, 2, 3], Balance::RoundRobin, None),
        None,
    );
    let mut first: HashMap<u16, usize> = HashMap::new();
    for _ in 0..300 {
        let order = ports(route.pool.attempts(3));
        assert_eq!(order.len(), 3);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, [1, 2, 3], "each backend once: {order:?}");
        *first.entry(order[0]).or_default() += 1;
    }
    assert_eq!(first, HashMap::from([(1, 100), (2, 100), (3, 100)]));
    assert_eq!(
        ports(route.pool.attempts(2)).len(),
        2,
        "connect_attempts bounds the tries"
    );
}

#[test]
fn a_down_backend_is_skipped_until_all_are_down_then_tried_last() {
    let balancer = Balancer::new();
    let route = balancer.route(
        &host("a.test"),
        &target(&[1, 2, 3], Balance::RoundRobin, None),
        None,
    );
    let members = route.pool.members();
    members[1].node().connect_failed("refused");
    assert!(!members[1].healthy());
    for _ in 0..10 {
        let order = ports(route.pool.attempts(3));
        assert_eq!(order[2], 2, "the down one last (fail open): {order:?}");
        assert!(ports(route.pool.attempts(2)).iter().all(|p| *p != 2));
    }
    members[0].node().connect_failed("refused");
    members[2].node().connect_failed("refused");
    let order = ports(route.pool.attempts(3));
    assert_eq!(order.len(), 3, "all down: every one still tried");
    // A success ends the backoff at once.
    members[1].node().connected();
    assert!(members[1].healthy());
    assert_eq!(ports(route.pool.attempts(1)), [2]);
    assert_eq!(members[1].node().counts().went_down, 1);
    assert_eq!(members[1].node().counts().came_up, 1);
    assert_eq!(members[1].node().counts().failures, 1);
}

#[test]
fn a_down_backends_share_is_spread_over_the_live_ones() {
    let balancer = Balancer::new();
    let route = balancer.route(
        &host("a.test"),
        &target(&[1, 2, 3], Balance::RoundRobin, None),
        None,
    );
    route.pool.members()[0].node().connect_failed("refused");
    let mut first: HashMap<u16, usize> = HashMap::new();
    for _ in 0..300 {
        *first.entry(ports(route.pool.attempts(3))[0]).or_default() += 1;
    }
    // Not 200 to the down one's successor and 100 to the other.
    assert_eq!(first, HashMap::from([(2, 150), (3, 150)]));
}

#[test]
fn passive_backoff_doubles_to_thirty_seconds() {
    let node = Node::new(backend(9));
    let mut seen = Vec::new();
    for _ in 0..8 {
        node.connect_failed("refused");
        seen.push(node.backoff.load(Ordering::Relaxed));
    }
    assert_eq!(seen, [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
    assert_eq!(node.last_error().as_deref(), Some("refused"));
    assert!(!node.up());
    node.connected();
    assert!(node.up());
    assert_eq!(node.counts().went_down, 1, "one transition, not eight");
}

#[test]
fn least_connections_picks_the_backend_with_fewest_open() {
    let balancer = Balancer::new();
    let route = balancer.route(
        &host("a.test"),
        &target(&[1, 2, 3], Balance::LeastConnections, None),
        None,
    );
    let members = route.pool.members();
    let _held: Vec<Lease> = (0..5)
        .map(|_| members[0].lease())
        .chain((0..2).map(|_| members[1].lease()))
        .collect();
    for _ in 0..20 {
        let order = ports(route.pool.attempts(3));
        assert_eq!(order, [3, 2, 1]);
    }
    // Leases are counted while held.
    let lease = members[2].lease();
    let more = members[2].lease();
    let again = members[2].lease();
    assert_eq!(members[2].active(), 3);
    assert_eq!(ports(route.pool.attempts(1)), [2]);
    drop((lease, more, again));
    assert_eq!(members[2].active(), 0);
    assert_eq!(members[2].node().counts().total, 3);
}

#[test]
fn a_route_update_keeps_the_state_of_backends_still_listed() {
    let balancer = Balancer::new();
    let name = host("a.test");
    let old_target = target(&[1, 2, 3], Balance::RoundRobin, None);
    let old = balancer.route(&name, &old_target, None);
    let open = old.pool.members()[1].lease();
    old.pool.members()[1].node().connect_failed("refused");

    // The same target: the same route, whole.
    let same = balancer.route(&name, &old_target, Some(&old));
    assert!(Arc::ptr_eq(&same, &old));

    // A new list: backend 2 kept (its count, its node, its backoff), 4 new.
    let new = balancer.route(
        &name,
        &target(&[2, 4], Balance::RoundRobin, None),
        Some(&old),
    );
    let kept = &new.pool.members()[0];
    assert_eq!(kept.backend(), &backend(2));
    assert_eq!(kept.active(), 1);
    assert!(Arc::ptr_eq(kept.node(), old.pool.members()[1].node()));
    assert!(!kept.healthy());
    drop(open);
    assert_eq!(
        kept.active(),
        0,
        "a lease taken before the update closes on the new member"
    );
    assert_eq!(new.pool.members()[1].active(), 0);

    // Another route naming the same address shares its node.
    let other = balancer.route(
        &host("b.test"),
        &target(&[2], Balance::RoundRobin, None),
        None,
    );
    assert!(Arc::ptr_eq(other.pool.members()[0].node(), kept.node()));
    assert_eq!(other.pool.members()[0].active(), 0, "counts are per route");

    let report: Vec<_> = new.report(&name).collect();
    assert_eq!(report.len(), 2);
    assert_eq!(report[0].backend, backend(2));
    assert!(!report[0].healthy);
    assert_eq!(report[0].total_connections, 1);
    assert_eq!(report[0].last_error.as_deref(), Some("refused"));
    assert!(report[1].healthy);
}

fn check(interval_ms: u64, fall: u32, rise: u32) -> HealthCheck {
    HealthCheck {
        interval: Duration::from_millis(interval_ms),
        path: None,
        fall,
        rise,
    }
}

#[test]
fn identical_checks_are_shared_and_removed_routes_drop_theirs() {
    let balancer = Balancer::new();
    let t = target(&[1, 2], Balance::RoundRobin, Some(check(1000, 3, 2)));
    let a = balancer.route(&host("a.test"), &t, None);
    let b = balancer.route(&host("b.test"), &t, None);
    assert_eq!(
        balancer.schedule().len(),
        2,
        "TCP checks of one address are one"
    );
    let other = target(&[1], Balance::RoundRobin, Some(check(2000, 3, 2)));
    let c = balancer.route(&host("c.test"), &other, None);
    assert_eq!(
        balancer.schedule().len(),
        3,
        "another interval is another check"
    );
    drop((a, c));
    assert_eq!(balancer.schedule().len(), 2);
    drop(b);
    assert!(balancer.schedule().is_empty());
}

/// Answers each probe from a table of backends that fail, and counts
/// the probes (and the most in flight at once).
#[derive(Default)]
struct Scripted {
    failing: std::sync::Mutex<std::collections::HashSet<Backend>>,
    probes: AtomicUsize,
    in_flight: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    delay: Duration,
}

impl Prober for Scripted {
    fn probe(&self, key: &CheckKey, _deadline: Duration) -> ProbeFuture {
        self.probes.fetch_add(1, Ordering::Relaxed);
        let fail = self.failing.lock().unwrap().contains(&key.backend);
        let (in_flight, most, delay) = (self.in_flight.clone(), self.most.clone(), self.delay);
        Box::pin(async move {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            if fail {
                Err("scripted failure".into())
            } else {
                Ok(())
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_check_falls_after_fall_failures_and_rises_after_rise_passes() {
    let balancer = Balancer::new();
    let route = balancer.route(
        &host("a.test"),
        &target(&[1, 2], Balance::RoundRobin, Some(check(1000, 3, 2))),
        None,
    );
    let prober = Arc::new(Scripted::default());
    prober.failing.lock().unwrap().insert(backend(1));
    let cancel = tokio_util::sync::CancellationToken::new();
    let runner = tokio::spawn(health::run(
        balancer.schedule().clone(),
        prober.clone(),
        cancel.clone(),
    ));
    let member = &route.pool.members()[0];
    // Within the first interval each check is probed once: not down yet.
    tokio::time::sleep(Duration::from_millis(1010)).await;
    assert!(member.healthy());
    // Three failures: down by the end of the third interval.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(!member.healthy(), "down after 3 failures");
    assert!(!member.node().up());
    assert_eq!(ports(route.pool.attempts(1)), [2]);
    assert_eq!(
        route
            .report(&host("a.test"))
            .next()
            .unwrap()
            .last_error
            .as_deref(),
        Some("scripted failure")
    );
    assert!(route.pool.members()[1].healthy());
    prober.failing.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!member.healthy(), "one pass is not enough");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(member.healthy(), "up after 2 passes");
    assert_eq!(member.node().counts().went_down, 1);
    assert_eq!(member.node().counts().came_up, 1);
    cancel.cancel();
    runner.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn thousands_of_checks_are_spread_over_the_interval_on_bounded_tasks() {
    let balancer = Balancer::new();
    // 3,000 routes × 3 distinct backends = 9,000 checks, one interval.
    let routes: Vec<_> = (0..3000u16)
        .map(|i| {
            let ports = [3 * i + 1, 3 * i + 2, 3 * i + 3];
            balancer.route(
                &host(&format!("r{i}.test")),
                &target(&ports, Balance::RoundRobin, Some(check(5000, 3, 2))),
                None,
            )
        })
        .collect();
    assert_eq!(balancer.schedule().len(), 9000);
    let prober = Arc::new(Scripted {
        delay: Duration::from_millis(20),
        ..Scripted::default()
    });
    let cancel = tokio_util::sync::CancellationToken::new();
    let runner = tokio::spawn(health::run(
        balancer.schedule().clone(),
        prober.clone(),
        cancel.clone(),
    ));
    // A tenth of the interval sees about a tenth of the checks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = prober.probes.load(Ordering::Relaxed);
    assert!(
        (600..=1200).contains(&early),
        "{early} probes in the first 10%"
    );
    tokio::time::sleep(Duration::from_millis(4600)).await;
    let round = prober.probes.load(Ordering::Relaxed);
    assert!(
        (9000..=9900).contains(&round),
        "{round} probes in one interval"
    );
    assert!(prober.most.load(Ordering::SeqCst) <= health::MAX_PROBES_IN_FLIGHT);
    // Removed routes' checks stop.
    drop(routes);
    tokio::time::sleep(Duration::from_millis(5100)).await;
    let after = prober.probes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(10_000)).await;
    assert_eq!(
        prober.probes.load(Ordering::Relaxed),
        after,
        "no probe after removal"
    );
    assert!(balancer.schedule().is_empty());
    cancel.cancel();
    runner.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_whole_table_replaced_with_new_checks_keeps_probing_only_the_new_ones() {
    let balancer = Balancer::new();
    // 2,000 routes × 3 distinct backends, then every route's interval
    // changed: 6,000 new checks, and 6,000 dead ones left in the heap to be
    // forgotten as they come due among the live ones.
    let table = |interval_ms: u64| -> Vec<_> {
        (0..2000u16)
            .map(|i| {
                let ports = [3 * i + 1, 3 * i + 2, 3 * i + 3];
                balancer.route(
                    &host(&format!("r{i}.test")),
                    &target(&ports, Balance::RoundRobin, Some(check(interval_ms, 3, 2))),
                    None,
                )
            })
            .collect()
    };
    let old = table(5000);
    let prober = Arc::new(Scripted::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let runner = tokio::spawn(health::run(
        balancer.schedule().clone(),
        prober.clone(),
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let new = table(4000);
    drop(old);
    assert_eq!(balancer.schedule().len(), 6000);
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(10_000)).await;
    eprintln!(
        "two intervals after replacing 6,000 checks: {:?} of CPU",
        started.elapsed()
    );
    let before = prober.probes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let round = prober.probes.load(Ordering::Relaxed) - before;
    assert!(
        (5990..=6010).contains(&round),
        "one interval probes each new check once: {round}"
    );
    assert_eq!(balancer.schedule().len(), 6000);
    drop(new);
    cancel.cancel();
    runner.await.unwrap();
}
