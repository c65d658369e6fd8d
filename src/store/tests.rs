//! The store on real DB files in temporary directories. Rows are checked
//! through a second connection, as an operator's `sqlite3` would see them.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use wire::rule::{Rule, RuleKind};

use super::*;
use crate::routes::{Backend, Hostname, ListenerRoutes, RouteMap, Routes, Target};

const LISTENERS: &str = r#"
[[listeners]]
addr = ":8443"
  [[listeners.routes]]
  hostname = "a.test"
  backend = "127.0.0.1:1001"
  [[listeners.routes]]
  hostname = "B.Test."
  backend = "127.0.0.1:1002"
  send_proxy_protocol = true
[[listeners]]
addr = "127.0.0.1:9443"
  [[listeners.routes]]
  hostname = "c.test"
  backend = "backend.internal:443"
"#;

const FIREWALL: &str = r#"
[firewall]
geoip_db = "/nonexistent/GeoLite2-Country.mmdb"
blocked_ips = ["192.0.2.7"]
blocked_cidrs = ["198.51.100.0/24"]
blocked_countries = ["kp"]
"#;

fn db_path(dir: &Path) -> PathBuf {
    dir.join("state/db/mc-proxy.db")
}

fn config(dir: &Path, body: &str) -> Config {
    let text = format!("[database]\npath = {:?}\n{body}", db_path(dir));
    Config::parse(&text, &dir.join("mc-proxy.toml")).expect("test config parses")
}

fn default_config(dir: &Path) -> Config {
    config(dir, &format!("{LISTENERS}{FIREWALL}"))
}

fn raw(dir: &Path) -> Connection {
    let conn = Connection::open(db_path(dir)).unwrap();
    conn.busy_timeout(BUSY_TIMEOUT).unwrap();
    conn
}

/// (listener addr, hostname, backend, send_proxy_protocol), sorted.
fn route_rows(dir: &Path) -> Vec<(String, String, String, bool)> {
    let conn = raw(dir);
    let mut stmt = conn
        .prepare(
            "SELECT l.addr, r.hostname, r.backend, r.send_proxy_protocol \
             FROM routes r JOIN listeners l ON l.id = r.listener_id ORDER BY 1, 2",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn rule_rows(dir: &Path) -> Vec<(String, String)> {
    let conn = raw(dir);
    let mut stmt = conn
        .prepare("SELECT type, value FROM firewall_rules ORDER BY 1, 2")
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn listener_rows(dir: &Path) -> Vec<String> {
    let conn = raw(dir);
    let mut stmt = conn
        .prepare("SELECT addr FROM listeners ORDER BY 1")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn row(addr: &str, host: &str, backend: &str, proxy: bool) -> (String, String, String, bool) {
    (addr.into(), host.into(), backend.into(), proxy)
}

fn host(text: &str) -> Hostname {
    Hostname::parse(text).unwrap()
}

fn target(backend: &str) -> Target {
    Target {
        backends: wire::route::Backends::one(Backend::parse(backend).unwrap()),
        balance: Default::default(),
        health: None,
        send_proxy_protocol: false,
        mode: crate::routes::Mode::L4,
    }
}

/// hostname → backend text, sorted.
fn shown(map: &RouteMap) -> Vec<(String, String)> {
    map.sorted()
        .into_iter()
        .map(|(h, t)| (h.to_string(), t.backend().to_string()))
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

struct Running {
    store: Store,
    routes: Arc<Routes>,
    rules_seen: Arc<Mutex<Vec<Vec<Rule>>>>,
}

impl Running {
    fn table(&self, addr: &str) -> Arc<RouteMap> {
        self.routes.listener(addr).unwrap().snapshot()
    }
}

fn start(opened: Opened) -> Running {
    let routes = Arc::new(Routes::new(
        opened
            .state
            .listeners
            .into_iter()
            .map(|(addr, map)| Arc::new(ListenerRoutes::new(addr, map)))
            .collect(),
    ));
    let rules_seen = Arc::new(Mutex::new(Vec::new()));
    let seen = rules_seen.clone();
    let store = Store::start(
        opened.conn,
        routes.clone(),
        opened.state.rules,
        Box::new(move |rules| seen.lock().unwrap().push(rules.to_vec())),
    );
    Running {
        store,
        routes,
        rules_seen,
    }
}

#[test]
fn first_run_seeds_listeners_routes_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let opened = open(&default_config(dir.path())).unwrap();
    assert!(opened.state.seeded);

    assert_eq!(listener_rows(dir.path()), ["127.0.0.1:9443", ":8443"]);
    assert_eq!(
        route_rows(dir.path()),
        [
            row("127.0.0.1:9443", "c.test", "backend.internal:443", false),
            row(":8443", "a.test", "127.0.0.1:1001", false),
            row(":8443", "b.test", "127.0.0.1:1002", true),
        ]
    );
    assert_eq!(
        rule_rows(dir.path()),
        [
            ("cidr".into(), "198.51.100.0/24".into()),
            ("country".into(), "KP".into()),
            ("ip".into(), "192.0.2.7".into()),
        ]
    );

    let names: Vec<_> = opened
        .state
        .listeners
        .iter()
        .map(|(a, _)| a.as_str())
        .collect();
    assert_eq!(names, [":8443", "127.0.0.1:9443"]);
    assert_eq!(
        shown(&opened.state.listeners[0].1),
        [
            ("a.test".into(), "127.0.0.1:1001".into()),
            ("b.test".into(), "127.0.0.1:1002".into())
        ]
    );
    assert!(
        opened.state.listeners[0]
            .1
            .get(&host("b.test"))
            .unwrap()
            .send_proxy_protocol
    );
    assert_eq!(opened.state.rules.len(), 3);

    let path = db_path(dir.path());
    assert!(path.parent().unwrap().is_dir(), "parent directory created");
    assert_eq!(mode(&path), 0o600);
    let wal = with_suffix(&path, "-wal");
    assert!(wal.exists(), "WAL mode");
    assert_eq!(mode(&wal), 0o600);
    assert_eq!(mode(&with_suffix(&path, "-shm")), 0o600);

    let conn = raw(dir.path());
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    assert_eq!(
        migrations::current_version(&conn).unwrap(),
        migrations::LATEST
    );
}

#[test]
fn existing_file_with_a_wide_mode_is_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path());
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, b"").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    open(&default_config(dir.path())).unwrap();
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn later_runs_take_routes_and_rules_from_the_db() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&default_config(dir.path())).unwrap());
    let before_routes = route_rows(dir.path());
    let before_rules = rule_rows(dir.path());

    // Edited TOML: a.test moved, b.test gone, d.test new, other rules.
    let edited = r#"
[[listeners]]
addr = ":8443"
  [[listeners.routes]]
  hostname = "a.test"
  backend = "127.0.0.1:2001"
  [[listeners.routes]]
  hostname = "d.test"
  backend = "127.0.0.1:2004"
[[listeners]]
addr = "127.0.0.1:9443"
  [[listeners.routes]]
  hostname = "c.test"
  backend = "backend.internal:443"
[firewall]
blocked_ips = ["192.0.2.99"]
"#;
    let opened = open(&config(dir.path(), edited)).unwrap();
    assert!(!opened.state.seeded);
    assert_eq!(
        shown(&opened.state.listeners[0].1),
        [
            ("a.test".into(), "127.0.0.1:1001".into()),
            ("b.test".into(), "127.0.0.1:1002".into())
        ]
    );
    let rules: BTreeSet<String> = opened.state.rules.iter().map(Rule::to_string).collect();
    assert_eq!(
        rules,
        ["cidr 198.51.100.0/24", "country KP", "ip 192.0.2.7"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        route_rows(dir.path()),
        before_routes,
        "config not re-applied"
    );
    assert_eq!(rule_rows(dir.path()), before_rules, "config not re-applied");
}

#[test]
fn new_config_listener_is_added_and_dropped_one_kept_unbound() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&default_config(dir.path())).unwrap());

    let edited = r#"
[[listeners]]
addr = "[::1]:10443"
  [[listeners.routes]]
  hostname = "new.test"
  backend = "127.0.0.1:3001"
[[listeners]]
addr = ":8443"
"#;
    let opened = open(&config(dir.path(), edited)).unwrap();
    assert!(!opened.state.seeded);
    let names: Vec<_> = opened
        .state
        .listeners
        .iter()
        .map(|(a, _)| a.as_str())
        .collect();
    assert_eq!(names, ["[::1]:10443", ":8443"], "config order, config set");
    assert_eq!(
        shown(&opened.state.listeners[0].1),
        [("new.test".into(), "127.0.0.1:3001".into())]
    );
    assert_eq!(
        opened.state.listeners[1].1.len(),
        2,
        "DB routes, not the empty TOML list"
    );

    assert_eq!(
        listener_rows(dir.path()),
        ["127.0.0.1:9443", ":8443", "[::1]:10443"]
    );
    assert!(route_rows(dir.path()).contains(&row(
        "127.0.0.1:9443",
        "c.test",
        "backend.internal:443",
        false
    )));
    assert!(route_rows(dir.path()).contains(&row(
        "[::1]:10443",
        "new.test",
        "127.0.0.1:3001",
        false
    )));
}

#[tokio::test]
async fn upsert_creates_then_updates_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    let store = &running.store;

    assert!(store
        .upsert_route(":8443", host("x.test"), target("127.0.0.1:5001"))
        .await
        .unwrap());
    assert!(!store
        .upsert_route(":8443", host("x.test"), target("127.0.0.1:5002"))
        .await
        .unwrap());

    let rows: Vec<_> = route_rows(dir.path())
        .into_iter()
        .filter(|r| r.1 == "x.test")
        .collect();
    assert_eq!(rows, [row(":8443", "x.test", "127.0.0.1:5002", false)]);
    let table = running.table(":8443");
    assert_eq!(
        table.get(&host("x.test")).unwrap().backend().to_string(),
        "127.0.0.1:5002"
    );

    // Timestamps: created kept, updated set.
    let (created, updated): (String, String) = raw(dir.path())
        .query_row(
            "SELECT created_at, updated_at FROM routes WHERE hostname = 'x.test'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(created.len(), "2025-01-31T12:00:00Z".len(), "{created}");
    assert!(
        created.ends_with('Z') && updated >= created,
        "{created} {updated}"
    );

    // send_proxy_protocol is part of the upsert.
    let proxied = Target {
        send_proxy_protocol: true,
        ..target("127.0.0.1:5003")
    };
    assert!(!store
        .upsert_route(":8443", host("x.test"), proxied)
        .await
        .unwrap());
    assert!(route_rows(dir.path()).contains(&row(":8443", "x.test", "127.0.0.1:5003", true)));
    assert!(
        running
            .table(":8443")
            .get(&host("x.test"))
            .unwrap()
            .send_proxy_protocol
    );
    store.close();
}

#[tokio::test]
async fn mixed_case_and_trailing_dot_are_one_route() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    let store = &running.store;
    assert!(store
        .upsert_route(":8443", host("A.Example.NET."), target("127.0.0.1:1"))
        .await
        .unwrap());
    assert!(!store
        .upsert_route(":8443", host("a.example.net"), target("127.0.0.1:2"))
        .await
        .unwrap());
    let rows: Vec<_> = route_rows(dir.path())
        .into_iter()
        .filter(|r| r.1.contains("example"))
        .collect();
    assert_eq!(rows, [row(":8443", "a.example.net", "127.0.0.1:2", false)]);
    store
        .remove_route(":8443", host("A.EXAMPLE.net."))
        .await
        .unwrap();
    assert!(running.table(":8443").get(&host("a.example.net")).is_none());
    store.close();
}

#[tokio::test]
async fn remove_route_present_absent_and_unknown_listener() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    let store = &running.store;

    store.remove_route(":8443", host("a.test")).await.unwrap();
    assert!(!route_rows(dir.path()).iter().any(|r| r.1 == "a.test"));
    assert!(running.table(":8443").get(&host("a.test")).is_none());
    assert!(running.table(":8443").get(&host("b.test")).is_some());

    let before = running.table(":8443");
    let err = store
        .remove_route(":8443", host("a.test"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("a.test"), "{err}");
    assert!(
        Arc::ptr_eq(&before, &running.table(":8443")),
        "memory untouched"
    );

    // The same hostname on another listener is another route.
    let err = store
        .remove_route("127.0.0.1:9443", host("b.test"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");

    let rows_before = route_rows(dir.path());
    for unknown in ["0.0.0.0:8443", "443", ""] {
        let err = store
            .remove_route(unknown, host("b.test"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::UnknownListener(_)), "{err}");
        let err = store
            .upsert_route(unknown, host("z.test"), target("127.0.0.1:1"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::UnknownListener(_)), "{err}");
    }
    assert_eq!(route_rows(dir.path()), rows_before);
    assert_eq!(listener_rows(dir.path()).len(), 2);
    store.close();
}

#[tokio::test]
async fn listener_kept_in_db_but_not_bound_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&default_config(dir.path())).unwrap());
    let only_one = "[[listeners]]\naddr = \":8443\"\n";
    let running = start(open(&config(dir.path(), only_one)).unwrap());
    let err = running
        .store
        .upsert_route("127.0.0.1:9443", host("z.test"), target("127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownListener(_)), "{err}");
    assert!(!route_rows(dir.path()).iter().any(|r| r.1 == "z.test"));
    running.store.close();
}

#[tokio::test]
async fn rules_add_is_idempotent_and_callback_sees_every_rule() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    let store = &running.store;
    let rule = Rule::parse(RuleKind::Ip, "::ffff:203.0.113.9").unwrap();

    assert!(store.add_rule(rule.clone()).await.unwrap());
    assert!(!store.add_rule(rule.clone()).await.unwrap());
    let matching: Vec<_> = rule_rows(dir.path())
        .into_iter()
        .filter(|r| r.1 == "203.0.113.9")
        .collect();
    assert_eq!(matching, [("ip".to_string(), "203.0.113.9".to_string())]);
    {
        let seen = running.rules_seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "no callback for a rule that already existed");
        assert_eq!(seen[0].len(), 4);
        assert!(seen[0].contains(&rule));
    }

    let kp = Rule::parse(RuleKind::Country, "kp").unwrap();
    store.remove_rule(kp.clone()).await.unwrap();
    assert!(!rule_rows(dir.path()).iter().any(|r| r.1 == "KP"));
    {
        let seen = running.rules_seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].len(), 3);
        assert!(!seen[1].contains(&kp));
    }

    let err = store.remove_rule(kp).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("country KP"), "{err}");
    assert_eq!(running.rules_seen.lock().unwrap().len(), 2);
    store.close();
}

#[tokio::test]
async fn failed_write_leaves_memory_and_db_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    let store = &running.store;
    let injector = raw(dir.path());
    injector
        .execute_batch(
            "CREATE TRIGGER fail_route_insert BEFORE INSERT ON routes BEGIN SELECT RAISE(ABORT, 'injected'); END;
             CREATE TRIGGER fail_route_update BEFORE UPDATE ON routes BEGIN SELECT RAISE(ABORT, 'injected'); END;
             CREATE TRIGGER fail_route_delete BEFORE DELETE ON routes BEGIN SELECT RAISE(ABORT, 'injected'); END;
             CREATE TRIGGER fail_rule_insert BEFORE INSERT ON firewall_rules BEGIN SELECT RAISE(ABORT, 'injected'); END;
             CREATE TRIGGER fail_rule_delete BEFORE DELETE ON firewall_rules BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .unwrap();
    let routes_before = route_rows(dir.path());
    let rules_before = rule_rows(dir.path());
    let table_before = running.table(":8443");

    for (hostname, backend) in [("new.test", "127.0.0.1:7001"), ("a.test", "127.0.0.1:7002")] {
        let err = store
            .upsert_route(":8443", host(hostname), target(backend))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Sqlite { .. }), "{err}");
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(
            err.to_string().contains("mc-proxy.db"),
            "names the file: {err}"
        );
    }
    let err = store
        .remove_route(":8443", host("a.test"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Sqlite { .. }), "{err}");
    let err = store
        .add_rule(Rule::parse(RuleKind::Ip, "203.0.113.1").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Sqlite { .. }), "{err}");
    let err = store
        .remove_rule(Rule::parse(RuleKind::Ip, "192.0.2.7").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Sqlite { .. }), "{err}");

    assert!(
        Arc::ptr_eq(&table_before, &running.table(":8443")),
        "memory untouched"
    );
    assert!(
        running.rules_seen.lock().unwrap().is_empty(),
        "rules untouched"
    );
    assert_eq!(route_rows(dir.path()), routes_before);
    assert_eq!(rule_rows(dir.path()), rules_before);

    injector
        .execute_batch(
            "DROP TRIGGER fail_route_insert; DROP TRIGGER fail_route_update; DROP TRIGGER fail_route_delete;
             DROP TRIGGER fail_rule_insert; DROP TRIGGER fail_rule_delete;",
        )
        .unwrap();
    assert!(store
        .upsert_route(":8443", host("new.test"), target("127.0.0.1:7001"))
        .await
        .unwrap());
    assert_eq!(
        running
            .table(":8443")
            .get(&host("new.test"))
            .unwrap()
            .backend()
            .to_string(),
        "127.0.0.1:7001"
    );
    assert!(store
        .add_rule(Rule::parse(RuleKind::Ip, "203.0.113.1").unwrap())
        .await
        .unwrap());
    store.close();
}

#[tokio::test]
async fn write_blocked_by_a_held_lock_fails_after_the_busy_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    let blocker = raw(dir.path());
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let table_before = running.table(":8443");
    let started = std::time::Instant::now();
    let err = running
        .store
        .upsert_route(":8443", host("late.test"), target("127.0.0.1:1"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Sqlite { .. }), "{err}");
    assert!(started.elapsed() >= BUSY_TIMEOUT - std::time::Duration::from_millis(100));
    assert!(Arc::ptr_eq(&table_before, &running.table(":8443")));
    blocker.execute_batch("ROLLBACK").unwrap();
    assert!(running
        .store
        .upsert_route(":8443", host("late.test"), target("127.0.0.1:1"))
        .await
        .unwrap());
    running.store.close();
}

#[tokio::test]
async fn db_directory_moved_or_removed_at_runtime_refuses_writes() {
    for remove in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let running = start(open(&default_config(dir.path())).unwrap());
        let db_dir = db_path(dir.path()).parent().unwrap().to_path_buf();
        if remove {
            fs::remove_dir_all(&db_dir).unwrap();
        } else {
            fs::rename(&db_dir, dir.path().join("state/moved")).unwrap();
        }
        let table_before = running.table(":8443");
        let err = running
            .store
            .upsert_route(":8443", host("lost.test"), target("127.0.0.1:1"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Moved { .. }), "{err}");
        assert!(err.to_string().contains("mc-proxy.db"), "{err}");
        assert!(Arc::ptr_eq(&table_before, &running.table(":8443")));
        running.store.close();
    }
}

#[tokio::test]
async fn close_is_idempotent_and_later_calls_fail() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    let store = running.store.clone();
    // Queued before close: still done.
    let queued = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .upsert_route(":8443", host("q.test"), target("127.0.0.1:1"))
                .await
        }
    });
    tokio::task::yield_now().await;
    assert!(queued.await.unwrap().unwrap());
    running.store.close();
    store.close();
    let err = store
        .add_rule(Rule::parse(RuleKind::Country, "FR").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Closed), "{err}");
    assert!(route_rows(dir.path()).iter().any(|r| r.1 == "q.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_upserts_all_land_in_db_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = running.store.clone();
            tokio::spawn(async move {
                let listener = if i % 2 == 0 {
                    ":8443"
                } else {
                    "127.0.0.1:9443"
                };
                store
                    .upsert_route(
                        listener,
                        host(&format!("h{i}.test")),
                        target(&format!("127.0.0.1:{}", 10_000 + i)),
                    )
                    .await
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().unwrap());
    }
    for addr in [":8443", "127.0.0.1:9443"] {
        let db: Vec<(String, String)> = route_rows(dir.path())
            .into_iter()
            .filter(|r| r.0 == addr)
            .map(|r| (r.1, r.2))
            .collect();
        assert_eq!(db, shown(&running.table(addr)), "memory == DB for {addr}");
        assert_eq!(db.len(), 100 + if addr == ":8443" { 2 } else { 1 });
    }
    running.store.close();
}

#[test]
fn bad_row_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&default_config(dir.path())).unwrap());
    raw(dir.path())
        .execute(
            "UPDATE routes SET hostname = 'bad host' WHERE hostname = 'a.test'",
            [],
        )
        .unwrap();
    let err = open(&default_config(dir.path())).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::BadRow {
                table: "routes",
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("mc-proxy.db") && text.contains("row id") && text.contains("bad host"),
        "{text}"
    );

    raw(dir.path())
        .execute_batch(
            "UPDATE routes SET hostname = 'a.test' WHERE hostname = 'bad host';
             UPDATE routes SET hostname = 'A.test' WHERE hostname = 'a.test';",
        )
        .unwrap();
    let err = open(&default_config(dir.path())).unwrap_err();
    assert!(err.to_string().contains("normal form"), "{err}");

    raw(dir.path())
        .execute_batch(
            "UPDATE routes SET hostname = 'a.test' WHERE hostname = 'A.test';
             UPDATE routes SET backend = 'nowhere' WHERE hostname = 'a.test';",
        )
        .unwrap();
    let err = open(&default_config(dir.path())).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");

    raw(dir.path())
        .execute_batch(
            "UPDATE routes SET backend = '127.0.0.1:1', backends = '[\"127.0.0.1:1\"]' WHERE hostname = 'a.test';
             UPDATE firewall_rules SET value = '10.0.0.0/33' WHERE type = 'cidr';",
        )
        .unwrap();
    let err = open(&default_config(dir.path())).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::BadRow {
                table: "firewall_rules",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn old_schema_is_migrated_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path());
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        let mut conn = Connection::open(&path).unwrap();
        migrations::migrate_to(&mut conn, 1).unwrap();
        assert_eq!(migrations::current_version(&conn).unwrap(), 1);
        conn.execute_batch(
            "INSERT INTO listeners (id, addr) VALUES (7, ':8443');
             INSERT INTO routes (listener_id, hostname, backend) VALUES (7, 'old.test', '127.0.0.1:4444');
             INSERT INTO firewall_rules (type, value) VALUES ('ip', '192.0.2.200');",
        )
        .unwrap();
        // Migration 1 knows no send_proxy_protocol column.
        assert!(conn
            .execute("UPDATE routes SET send_proxy_protocol = 1", [])
            .is_err());
    }
    let opened = open(&default_config(dir.path())).unwrap();
    assert!(!opened.state.seeded);
    let conn = raw(dir.path());
    assert_eq!(
        migrations::current_version(&conn).unwrap(),
        migrations::LATEST
    );
    let (proxy, created, updated): (i64, String, String) = conn
        .query_row(
            "SELECT send_proxy_protocol, created_at, updated_at FROM routes WHERE hostname = 'old.test'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(proxy, 0);
    assert!(
        created.starts_with("20") && created.ends_with('Z') && created == updated,
        "{created}"
    );
    let (listener, map) = &opened.state.listeners[0];
    assert_eq!(listener, ":8443");
    assert_eq!(shown(map), [("old.test".into(), "127.0.0.1:4444".into())]);
    assert!(!map.get(&host("old.test")).unwrap().send_proxy_protocol);
    assert_eq!(
        opened.state.rules,
        [Rule::parse(RuleKind::Ip, "192.0.2.200").unwrap()]
    );

    // Re-running migrations is a no-op.
    drop(opened);
    let again = open(&default_config(dir.path())).unwrap();
    assert_eq!(again.state.listeners[0].1.len(), 1);
    let recorded: i64 = raw(dir.path())
        .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(recorded, migrations::LATEST);
}

#[test]
fn schema_2_is_migrated_to_l4_routes_and_takes_user_agent_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path());
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        let mut conn = Connection::open(&path).unwrap();
        migrations::migrate_to(&mut conn, 2).unwrap();
        assert_eq!(migrations::current_version(&conn).unwrap(), 2);
        conn.execute_batch(
            "INSERT INTO listeners (id, addr) VALUES (7, ':8443');
             INSERT INTO routes (listener_id, hostname, backend, send_proxy_protocol)
                 VALUES (7, 'old.test', '127.0.0.1:4444', 1);
             INSERT INTO firewall_rules (id, type, value) VALUES (3, 'cidr', '198.51.100.0/24');
             INSERT INTO firewall_rules (id, type, value) VALUES (9, 'ip', '192.0.2.200');",
        )
        .unwrap();
        // Schema 2 knows neither user-agent rules nor route modes.
        assert!(conn
            .execute(
                "INSERT INTO firewall_rules (type, value) VALUES ('user_agent', 'x')",
                []
            )
            .is_err());
        assert!(conn.execute("UPDATE routes SET mode = 'l7'", []).is_err());
    }
    let opened = open(&default_config(dir.path())).unwrap();
    assert!(!opened.state.seeded);
    let conn = raw(dir.path());
    assert_eq!(
        migrations::current_version(&conn).unwrap(),
        migrations::LATEST
    );
    type L7Columns = (
        String,
        Option<String>,
        Option<String>,
        i64,
        Option<String>,
        Option<String>,
        String,
    );
    let stored: L7Columns = conn
        .query_row(
            "SELECT mode, tls_cert, tls_key, backend_tls, backend_ca, backend_server_name, backend_protocol \
             FROM routes WHERE hostname = 'old.test'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .unwrap();
    assert_eq!(
        stored,
        ("l4".into(), None, None, 0, None, None, "auto".into())
    );
    let (listener, map) = &opened.state.listeners[0];
    assert_eq!(listener, ":8443");
    let old = map.get(&host("old.test")).unwrap();
    assert_eq!(
        **old,
        Target {
            backends: wire::route::Backends::one(Backend::parse("127.0.0.1:4444").unwrap()),
            balance: Default::default(),
            health: None,
            send_proxy_protocol: true,
            mode: crate::routes::Mode::L4,
        }
    );
    // The rules kept their order (the table was rebuilt with its ids).
    assert_eq!(
        opened.state.rules,
        [
            Rule::parse(RuleKind::Cidr, "198.51.100.0/24").unwrap(),
            Rule::parse(RuleKind::Ip, "192.0.2.200").unwrap(),
        ]
    );
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM firewall_rules ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids, [3, 9]);
    conn.execute(
        "INSERT INTO firewall_rules (type, value) VALUES ('user_agent', '(?i)sqlmap')",
        [],
    )
    .unwrap();
    assert!(conn
        .execute(
            "INSERT INTO firewall_rules (type, value) VALUES ('referer', 'x')",
            []
        )
        .is_err());
    drop(opened);
    let again = open(&default_config(dir.path())).unwrap();
    assert_eq!(
        again.state.rules.last(),
        Some(&Rule::parse(RuleKind::UserAgent, "(?i)sqlmap").unwrap())
    );
}

fn l7_target(backend: &str, backend_tls: bool) -> Target {
    use crate::routes::{BackendProtocol, L7Route, Mode};
    Target {
        backends: wire::route::Backends::one(Backend::parse(backend).unwrap()),
        balance: Default::default(),
        health: None,
        send_proxy_protocol: false,
        mode: Mode::L7(Arc::new(L7Route {
            tls_cert: "/srv/certs/git.pem".into(),
            tls_key: "/srv/certs/git.key".into(),
            backend_tls,
            backend_ca: backend_tls.then(|| "/srv/certs/ca.pem".into()),
            backend_server_name: backend_tls.then(|| "git.svc.internal".into()),
            backend_protocol: if backend_tls {
                BackendProtocol::H2
            } else {
                BackendProtocol::Http1
            },
        })),
    }
}

#[tokio::test]
async fn l7_routes_and_user_agent_rules_round_trip_through_the_db() {
    let dir = tempfile::tempdir().unwrap();
    // Seeded from the TOML: an L7 route and a user-agent rule.
    let seeded = config(
        dir.path(),
        "[[listeners]]\naddr = \":8443\"\n  [[listeners.routes]]\n  hostname = \"seed.test\"\n  backend = \"127.0.0.1:1\"\n  mode = \"l7\"\n  tls_cert = \"/srv/certs/seed.pem\"\n  tls_key = \"/srv/certs/seed.key\"\n  backend_protocol = \"h2\"\n[firewall]\nblocked_user_agents = [\"(?i)sqlmap\"]\n",
    );
    let running = start(open(&seeded).unwrap());
    let seed_target = seeded.listeners[0].routes[0].target();
    assert!(seed_target.mode.l7().is_some());
    assert_eq!(
        running
            .table(":8443")
            .get(&host("seed.test"))
            .map(|t| (**t).clone()),
        Some(seed_target.clone())
    );
    let store = &running.store;
    let tls = l7_target("git.internal:3443", true);
    let plain = l7_target("127.0.0.1:3000", false);
    assert!(store
        .upsert_route(":8443", host("git.test"), tls.clone())
        .await
        .unwrap());
    assert!(store
        .upsert_route(":8443", host("plain.test"), plain.clone())
        .await
        .unwrap());
    // L7 → L4 → L7 on one row.
    assert!(!store
        .upsert_route(":8443", host("plain.test"), target("127.0.0.1:5"))
        .await
        .unwrap());
    let l4_row: (String, Option<String>, i64, String) = raw(dir.path())
        .query_row(
            "SELECT mode, tls_cert, backend_tls, backend_protocol FROM routes WHERE hostname = 'plain.test'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(l4_row, ("l4".into(), None, 0, "auto".into()));
    assert!(!store
        .upsert_route(":8443", host("plain.test"), plain.clone())
        .await
        .unwrap());
    let ua = Rule::parse(RuleKind::UserAgent, "^curl/").unwrap();
    assert!(store.add_rule(ua.clone()).await.unwrap());
    let memory = running.table(":8443");
    running.store.close();

    let row: (String, String, String, i64, String, String, String) = raw(dir.path())
        .query_row(
            "SELECT mode, tls_cert, tls_key, backend_tls, backend_ca, backend_server_name, backend_protocol \
             FROM routes WHERE hostname = 'git.test'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .unwrap();
    assert_eq!(
        row,
        (
            "l7".into(),
            "/srv/certs/git.pem".into(),
            "/srv/certs/git.key".into(),
            1,
            "/srv/certs/ca.pem".into(),
            "git.svc.internal".into(),
            "h2".into()
        )
    );
    assert!(rule_rows(dir.path()).contains(&("user_agent".into(), "^curl/".into())));

    // Reloaded: exactly what was written, and what memory held.
    let again = open(&seeded).unwrap();
    let (_, map) = &again.state.listeners[0];
    for (name, expected) in [
        ("git.test", &tls),
        ("plain.test", &plain),
        ("seed.test", &seed_target),
    ] {
        assert_eq!(**map.get(&host(name)).unwrap(), *expected, "{name}");
        assert_eq!(**memory.get(&host(name)).unwrap(), *expected, "{name}");
    }
    assert_eq!(
        again.state.rules,
        [Rule::parse(RuleKind::UserAgent, "(?i)sqlmap").unwrap(), ua]
    );
}

#[test]
fn bad_l7_rows_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&default_config(dir.path())).unwrap());
    for (sql, text) in [
        ("UPDATE routes SET tls_cert = '/c.pem' WHERE hostname = 'a.test'", "tls_cert is set on an l4 route"),
        ("UPDATE routes SET mode = 'l7', tls_cert = '/c.pem' WHERE hostname = 'a.test'", "tls_key is missing on an l7 route"),
        ("UPDATE routes SET mode = 'l7', tls_cert = 'c.pem', tls_key = '/k' WHERE hostname = 'a.test'", "not an absolute path"),
        ("UPDATE routes SET mode = 'l7', tls_cert = '/c.pem', tls_key = '/k', send_proxy_protocol = 1 WHERE hostname = 'a.test'", "send_proxy_protocol is set on an l7 route"),
        ("UPDATE routes SET mode = 'l7', tls_cert = '/c.pem', tls_key = '/k', backend_server_name = 'x.test' WHERE hostname = 'a.test'", "without backend_tls"),
        ("UPDATE routes SET mode = 'l7', tls_cert = '/c.pem', tls_key = '/k', backend_tls = 1, backend_server_name = 'X.test' WHERE hostname = 'a.test'", "normal form"),
    ] {
        let conn = raw(dir.path());
        conn.execute_batch(
            "UPDATE routes SET mode = 'l4', tls_cert = NULL, tls_key = NULL, backend_tls = 0, \
             backend_ca = NULL, backend_server_name = NULL, send_proxy_protocol = 0",
        )
        .unwrap();
        conn.execute(sql, []).unwrap();
        drop(conn);
        let err = open(&default_config(dir.path())).unwrap_err();
        assert!(
            matches!(err, StoreError::BadRow { table: "routes", .. }) && err.to_string().contains(text),
            "{sql}: {err}"
        );
    }
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&default_config(dir.path())).unwrap());
    raw(dir.path())
        .execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (999, '2099-01-01T00:00:00Z')",
            [],
        )
        .unwrap();
    let err = open(&default_config(dir.path())).unwrap_err();
    match &err {
        StoreError::NewerSchema {
            found, supported, ..
        } => {
            assert_eq!((*found, *supported), (999, migrations::LATEST));
        }
        other => panic!("not NewerSchema: {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("mc-proxy.db")
            && text.contains("newer mc-proxy")
            && text.contains("schema 999"),
        "{text}"
    );
}

// ---- snapshot ---------------------------------------------------------------

fn integrity(path: &Path) -> String {
    Connection::open(path)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

fn snapshot_hostnames(path: &Path) -> BTreeSet<String> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn.prepare("SELECT hostname FROM routes").unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

#[tokio::test]
async fn snapshot_default_path_mode_and_content() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    running
        .store
        .upsert_route(":8443", host("snap.test"), target("127.0.0.1:9"))
        .await
        .unwrap();
    let path = db_path(dir.path());
    let copy = snapshot(&path, None).unwrap();

    let backups = path.parent().unwrap().join("backups");
    assert_eq!(copy.parent().unwrap(), backups);
    assert_eq!(mode(&backups), 0o700);
    let name = copy.file_name().unwrap().to_str().unwrap();
    let stamp = name
        .strip_prefix("mc-proxy-")
        .and_then(|s| s.strip_suffix(".db"))
        .unwrap_or_else(|| panic!("{name}"));
    assert_eq!(stamp.len(), 16, "{name}");
    assert!(
        stamp.chars().enumerate().all(|(i, c)| match i {
            8 => c == 'T',
            15 => c == 'Z',
            _ => c.is_ascii_digit(),
        }),
        "{name}"
    );
    assert_eq!(mode(&copy), 0o600);
    assert_eq!(integrity(&copy), "ok");
    assert_eq!(
        snapshot_hostnames(&copy),
        ["a.test", "b.test", "c.test", "snap.test"]
            .map(String::from)
            .into()
    );
    let leftovers: Vec<_> = fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no journal left behind: {leftovers:?}");
    running.store.close();

    // Also with the server gone (no -wal or -shm files; read-only open).
    let quiet = snapshot(&path, Some(&dir.path().join("quiet.db"))).unwrap();
    assert_eq!(integrity(&quiet), "ok");
    assert_eq!(snapshot_hostnames(&quiet).len(), 4);
}

#[test]
fn snapshot_refuses_an_existing_file_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&default_config(dir.path())).unwrap());
    let target_file = dir.path().join("existing.db");
    fs::write(&target_file, b"precious").unwrap();
    let err = snapshot(&db_path(dir.path()), Some(&target_file)).unwrap_err();
    assert!(matches!(err, StoreError::SnapshotExists(_)), "{err}");
    assert!(err.to_string().contains("existing.db"), "{err}");
    assert_eq!(fs::read(&target_file).unwrap(), b"precious");

    // An existing empty file too (SQLite alone would write into it).
    let empty = dir.path().join("empty.db");
    fs::write(&empty, b"").unwrap();
    let err = snapshot(&db_path(dir.path()), Some(&empty)).unwrap_err();
    assert!(matches!(err, StoreError::SnapshotExists(_)), "{err}");
    assert_eq!(fs::metadata(&empty).unwrap().len(), 0);
}

#[test]
fn snapshot_of_a_missing_db_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.db");
    let out = dir.path().join("out.db");
    let err = snapshot(&missing, Some(&out)).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(err.to_string().contains("nope.db"), "{err}");
    assert!(!missing.exists() && !out.exists());

    // A file that is not a DB: the partial output is removed.
    fs::write(
        &missing,
        b"not a database, just some bytes that are long enough",
    )
    .unwrap();
    let err = snapshot(&missing, Some(&out)).unwrap_err();
    assert!(matches!(err, StoreError::Sqlite { .. }), "{err}");
    assert!(!out.exists(), "partial output removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_while_writing_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(open(&default_config(dir.path())).unwrap());
    let before = route_rows(dir.path()).len();
    let acknowledged = Arc::new(AtomicUsize::new(0));

    let writer = tokio::spawn({
        let store = running.store.clone();
        let acknowledged = acknowledged.clone();
        async move {
            for i in 0..1000 {
                store
                    .upsert_route(":8443", host(&format!("w{i}.test")), target("127.0.0.1:1"))
                    .await
                    .unwrap();
                acknowledged.store(i + 1, Ordering::SeqCst);
            }
        }
    });
    while acknowledged.load(Ordering::SeqCst) < 100 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let path = db_path(dir.path());
    let out = dir.path().join("during.db");
    let (acked_before, copy) = tokio::task::spawn_blocking({
        let acknowledged = acknowledged.clone();
        move || {
            let acked = acknowledged.load(Ordering::SeqCst);
            (acked, snapshot(&path, Some(&out)).unwrap())
        }
    })
    .await
    .unwrap();
    let acked_after_snapshot = acknowledged.load(Ordering::SeqCst);
    writer.await.unwrap();
    let after = route_rows(dir.path()).len();
    assert_eq!(after, before + 1000);

    assert_eq!(integrity(&copy), "ok");
    let names = snapshot_hostnames(&copy);
    assert!(
        names.len() >= before + acked_before && names.len() <= after,
        "{} routes",
        names.len()
    );
    for i in 0..acked_before {
        assert!(
            names.contains(&format!("w{i}.test")),
            "acknowledged w{i}.test missing"
        );
    }
    // Writes were still going on, or the test did not test much.
    eprintln!(
        "snapshot: {} routes; acknowledged {acked_before} before, {acked_after_snapshot} after it",
        names.len()
    );
    running.store.close();
}

fn pool_target(backends: &[&str], health: Option<wire::route::HealthCheck>) -> Target {
    let list = backends
        .iter()
        .map(|b| Backend::parse(b).unwrap())
        .collect();
    Target {
        backends: wire::route::Backends::new(list).unwrap(),
        balance: wire::route::Balance::LeastConnections,
        health,
        ..target(backends[0])
    }
}

type PoolColumns = (
    String,
    String,
    String,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

fn pool_columns(dir: &Path, hostname: &str) -> PoolColumns {
    raw(dir)
        .query_row(
            "SELECT backend, backends, balance, health_interval_ms, health_path, health_fall, health_rise \
             FROM routes WHERE hostname = ?1",
            [hostname],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .unwrap()
}

#[tokio::test]
async fn backend_pools_round_trip_and_upsert_replaces_the_list() {
    use wire::route::HealthCheck;
    let dir = tempfile::tempdir().unwrap();
    // Seeded from the TOML: a pool with an l7 health check.
    let seeded = config(
        dir.path(),
        "[[listeners]]\naddr = \":8443\"\n  [[listeners.routes]]\n  hostname = \"seed.test\"\n  backends = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n  health_interval = \"2s\"\n  health_path = \"/healthz\"\n  mode = \"l7\"\n  tls_cert = \"/srv/certs/seed.pem\"\n  tls_key = \"/srv/certs/seed.key\"\n",
    );
    let seed_target = seeded.listeners[0].routes[0].target();
    assert_eq!(seed_target.backends.len(), 2);
    let running = start(open(&seeded).unwrap());
    assert_eq!(
        pool_columns(dir.path(), "seed.test"),
        (
            "127.0.0.1:1".into(),
            "[\"127.0.0.1:1\",\"127.0.0.1:2\"]".into(),
            "round_robin".into(),
            Some(2000),
            Some("/healthz".into()),
            Some(3),
            Some(2)
        )
    );
    let store = &running.store;
    let health = HealthCheck {
        interval: std::time::Duration::from_millis(1500),
        path: None,
        fall: 5,
        rise: 1,
    };
    let three = pool_target(
        &["10.0.0.1:443", "[2001:db8::1]:443", "b.internal:8443"],
        Some(health.clone()),
    );
    assert!(store
        .upsert_route(":8443", host("pool.test"), three.clone())
        .await
        .unwrap());
    assert_eq!(
        pool_columns(dir.path(), "pool.test"),
        (
            "10.0.0.1:443".into(),
            "[\"10.0.0.1:443\",\"[2001:db8::1]:443\",\"b.internal:8443\"]".into(),
            "least_connections".into(),
            Some(1500),
            None,
            Some(5),
            Some(1)
        )
    );
    // The upsert replaces the whole list (shorter, reordered) and drops
    // the check.
    let two = Target {
        balance: wire::route::Balance::RoundRobin,
        ..pool_target(&["b.internal:8443", "10.0.0.2:443"], None)
    };
    assert!(!store
        .upsert_route(":8443", host("pool.test"), two.clone())
        .await
        .unwrap());
    assert_eq!(
        pool_columns(dir.path(), "pool.test"),
        (
            "b.internal:8443".into(),
            "[\"b.internal:8443\",\"10.0.0.2:443\"]".into(),
            "round_robin".into(),
            None,
            None,
            None,
            None
        )
    );
    assert!(store
        .upsert_route(":8443", host("three.test"), three.clone())
        .await
        .unwrap());
    let memory = running.table(":8443");
    running.store.close();

    // Reloaded: exactly what was written, and what memory held.
    let again = open(&seeded).unwrap();
    let (_, map) = &again.state.listeners[0];
    for (name, expected) in [
        ("pool.test", &two),
        ("three.test", &three),
        ("seed.test", &seed_target),
    ] {
        assert_eq!(**map.get(&host(name)).unwrap(), *expected, "{name}");
        assert_eq!(**memory.get(&host(name)).unwrap(), *expected, "{name}");
    }
    assert_eq!(map.get(&host("three.test")).unwrap().health, Some(health));
}

#[test]
fn schema_3_is_migrated_to_pools_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path());
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        let mut conn = Connection::open(&path).unwrap();
        migrations::migrate_to(&mut conn, 3).unwrap();
        assert_eq!(migrations::current_version(&conn).unwrap(), 3);
        conn.execute_batch(
            "INSERT INTO listeners (id, addr) VALUES (7, ':8443');
             INSERT INTO routes (listener_id, hostname, backend, send_proxy_protocol)
                 VALUES (7, 'old.test', '127.0.0.1:4444', 1);
             INSERT INTO routes (listener_id, hostname, backend, mode, tls_cert, tls_key, backend_protocol)
                 VALUES (7, 'web.test', '[2001:db8::1]:8080', 'l7', '/c.pem', '/k.pem', 'h2');",
        )
        .unwrap();
        // Schema 3 knows no pools.
        assert!(conn
            .execute("UPDATE routes SET balance = 'round_robin'", [])
            .is_err());
    }
    let opened = open(&default_config(dir.path())).unwrap();
    assert!(!opened.state.seeded);
    assert_eq!(
        migrations::current_version(&raw(dir.path())).unwrap(),
        migrations::LATEST
    );
    assert_eq!(
        pool_columns(dir.path(), "old.test"),
        (
            "127.0.0.1:4444".into(),
            "[\"127.0.0.1:4444\"]".into(),
            "round_robin".into(),
            None,
            None,
            None,
            None
        )
    );
    assert_eq!(
        pool_columns(dir.path(), "web.test").1,
        "[\"[2001:db8::1]:8080\"]"
    );
    let (_, map) = &opened.state.listeners[0];
    let old = map.get(&host("old.test")).unwrap();
    assert_eq!(
        **old,
        Target {
            send_proxy_protocol: true,
            ..target("127.0.0.1:4444")
        }
    );
    let web = map.get(&host("web.test")).unwrap();
    assert_eq!(web.backends.to_string(), "[2001:db8::1]:8080");
    assert_eq!(web.balance, wire::route::Balance::RoundRobin);
    assert_eq!(web.health, None);
    assert!(web.mode.l7().is_some());
    // The balance CHECK holds.
    assert!(raw(dir.path())
        .execute("UPDATE routes SET balance = 'random'", [])
        .is_err());
}

#[test]
fn bad_pool_rows_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&default_config(dir.path())).unwrap());
    for (sql, text) in [
        ("UPDATE routes SET backends = 'nope' WHERE hostname = 'a.test'", "not a JSON array of strings"),
        ("UPDATE routes SET backends = '[1]' WHERE hostname = 'a.test'", "not a JSON array of strings"),
        ("UPDATE routes SET backends = '[]' WHERE hostname = 'a.test'", "is not the first of backends"),
        ("UPDATE routes SET backends = '[\"127.0.0.1:1001\", \"x\"]' WHERE hostname = 'a.test'", "backends entry \"x\""),
        ("UPDATE routes SET backends = '[\"127.0.0.1:9\"]' WHERE hostname = 'a.test'", "is not the first of backends"),
        ("UPDATE routes SET backends = '[\"127.0.0.1:1001\", \"127.0.0.1:1001\"]' WHERE hostname = 'a.test'", "backends: 127.0.0.1:1001 is listed twice"),
        ("UPDATE routes SET health_fall = 3 WHERE hostname = 'a.test'", "health_fall: health_fall needs health_interval"),
        ("UPDATE routes SET health_interval_ms = -5 WHERE hostname = 'a.test'", "health_interval_ms -5 is negative"),
        ("UPDATE routes SET health_interval_ms = 5 WHERE hostname = 'a.test'", "health_interval: "),
        ("UPDATE routes SET health_interval_ms = 1000, health_rise = 0 WHERE hostname = 'a.test'", "health_rise: "),
        ("UPDATE routes SET health_interval_ms = 1000, health_fall = 5000000000 WHERE hostname = 'a.test'", "health_fall 5000000000 is out of range"),
        ("UPDATE routes SET health_interval_ms = 1000, health_path = '/h' WHERE hostname = 'a.test'", "health_path: health_path is for l7 routes"),
    ] {
        let conn = raw(dir.path());
        conn.execute_batch(
            "UPDATE routes SET backends = json_array(backend), balance = 'round_robin', \
             health_interval_ms = NULL, health_path = NULL, health_fall = NULL, health_rise = NULL",
        )
        .unwrap();
        conn.execute(sql, []).unwrap();
        drop(conn);
        let err = open(&default_config(dir.path())).unwrap_err();
        assert!(
            matches!(err, StoreError::BadRow { table: "routes", .. }) && err.to_string().contains(text),
            "{sql}: {err}"
        );
    }
}

/// A handoff: the old process commits after the new one loaded its tables;
/// the new one's `reload` picks the change up (routes and rules alike).
#[tokio::test]
async fn reload_picks_up_what_another_process_committed() {
    let dir = tempfile::tempdir().unwrap();
    let old = start(open(&default_config(dir.path())).unwrap());
    let new = start(open(&default_config(dir.path())).unwrap());
    old.store
        .upsert_route(":8443", host("late.test"), target("127.0.0.1:5009"))
        .await
        .unwrap();
    let rule = Rule::parse(wire::rule::RuleKind::Ip, "192.0.2.99").unwrap();
    assert!(old.store.add_rule(rule.clone()).await.unwrap());
    assert!(new.table(":8443").get(&host("late.test")).is_none());
    new.store.reload().await.unwrap();
    let reloaded = new.table(":8443");
    let late = reloaded.get(&host("late.test")).expect("reloaded route");
    assert_eq!(late.backend().to_string(), "127.0.0.1:5009");
    let seen = new.rules_seen.lock().unwrap().last().cloned().unwrap();
    assert!(seen.contains(&rule), "{seen:?}");
    // Routes the config seeded are still there.
    assert_eq!(reloaded.len(), old.table(":8443").len());
    old.store.close();
    new.store.close();
}
