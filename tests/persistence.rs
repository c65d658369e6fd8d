//! Routes live in SQLite, through the real binary: the TOML seeds the DB
//! once and the DB is the truth after; changes made through the admin API
//! are on disk and survive restarts; hostnames are one route whatever their
//! case; `mc-proxy snapshot` copies a server that is writing.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use mc_proxy::admin::proto;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_start_serves_the_db_routes_over_an_edited_toml_and_binds_a_new_listener() {
    let (dir, pki, a, b) = tls_scene_ab(&["a.test", "b.test"]).await;
    let c = tls_backend(&pki, "C", &["c.test"]).await;
    let (l1, l2) = ("127.0.0.1:0".to_string(), "127.0.0.2:0".to_string());

    // First run: the TOML seeds the DB.
    let first = Proxy::with_admin(dir.path(), &l1, &[("a.test", a.addr)]);
    assert_eq!(who(first.listener(&l1), "a.test", &pki).await.unwrap(), "A");
    first.wait_log(&["seeded the database from the config"], Duration::ZERO);
    first.stop();

    // The operator edits the TOML: a.test now to B, a new b.test, a new
    // listener with c.test.
    let edited = admin_config(
        dir.path(),
        &format!(
            "{}{}",
            listener_toml(&l1, &[("a.test", b.addr), ("b.test", b.addr)]),
            listener_toml(&l2, &[("c.test", c.addr)]),
        ),
    );
    let second = Proxy::start(dir.path(), &edited);
    // The DB wins for the listener it knows...
    assert_eq!(
        who(second.listener(&l1), "a.test", &pki).await.unwrap(),
        "A"
    );
    assert!(who(second.listener(&l1), "b.test", &pki).await.is_err());
    second.wait_log(&["sni=b.test", "outcome=no_route"], Duration::from_secs(5));
    assert_eq!(b.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    // ...and says so at info.
    second.wait_log(
        &[
            "route differs between the config and the database",
            "a.test",
        ],
        Duration::ZERO,
    );
    second.wait_log(
        &["route in the config but not in the database", "b.test"],
        Duration::ZERO,
    );
    // The new listener is bound with its routes, and recorded in the DB.
    second.wait_log(
        &["listener in the config but not in the database", &l2],
        Duration::ZERO,
    );
    assert_eq!(
        who(second.listener(&l2), "c.test", &pki).await.unwrap(),
        "C"
    );
    let mut expected = vec![
        (l1.clone(), "a.test".to_string(), a.addr.to_string()),
        (l2.clone(), "c.test".to_string(), c.addr.to_string()),
    ];
    expected.sort();
    assert_eq!(db_routes(&second.db()), expected);
    second.stop();

    // A third start: the same again, nothing reseeded or duplicated.
    let third = Proxy::start(dir.path(), &edited);
    assert_eq!(who(third.listener(&l1), "a.test", &pki).await.unwrap(), "A");
    assert_eq!(who(third.listener(&l2), "c.test", &pki).await.unwrap(), "C");
    assert_eq!(db_routes(&third.db()).len(), 2);
    assert_eq!(third.count_log("seeded the database"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_added_with_the_cli_is_on_disk_and_survives_a_crash_and_restart() {
    let (dir, pki, a) = tls_scene("A", &["new.test"]).await;
    let l = "127.0.0.1:0".to_string();
    let toml = admin_config(dir.path(), &listener_toml(&l, &[]));
    let mut proxy = Proxy::start(dir.path(), &toml);
    let port = proxy.listener("127.0.0.1:0").port();
    assert!(who(addr(port), "new.test", &pki).await.is_err());

    let backend = a.addr.to_string();
    let (code, out, err) = proxy.routes_add(&l, "new.test", &backend);
    assert_eq!((code, out.as_str()), (0, "created\n"), "{err}");
    // Acknowledged means committed: the row is in the file now.
    assert_eq!(
        db_routes(&proxy.db()),
        vec![(l.clone(), "new.test".into(), backend.clone())]
    );
    assert_eq!(who(addr(port), "new.test", &pki).await.unwrap(), "A");
    assert_eq!(file_mode(&proxy.db()), 0o600);

    // SIGKILL: no clean shutdown to flush anything.
    proxy.child.kill().unwrap();
    proxy.child.wait().unwrap();
    drop(proxy);
    let proxy = Proxy::start(dir.path(), &toml);
    let port = proxy.listener("127.0.0.1:0").port();
    assert_eq!(who(addr(port), "new.test", &pki).await.unwrap(), "A");
    let (code, out, _) = proxy.cli(&["routes", "list", "--json"]);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["hostname"], "new.test");
    assert_eq!(listed[0]["backend"], backend.as_str());

    // Removal is as durable as addition.
    let (code, out, err) = proxy.routes_remove(&l, "new.test");
    assert_eq!((code, out.as_str()), (0, "removed\n"), "{err}");
    assert!(db_routes(&proxy.db()).is_empty());
    proxy.stop();
    let proxy = Proxy::start(dir.path(), &toml);
    let port = proxy.listener("127.0.0.1:0").port();
    assert!(who(addr(port), "new.test", &pki).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_case_and_trailing_dot_hostnames_are_one_route() {
    let (dir, pki, a, b) = tls_scene_ab(&["a.example.net"]).await;
    let l = "127.0.0.1:0".to_string();
    let proxy = Proxy::with_admin(dir.path(), &l, &[]);
    let port = proxy.listener("127.0.0.1:0").port();
    let add = |host: &str, backend: SocketAddr| proxy.routes_add(&l, host, &backend.to_string());
    assert_eq!(add("A.Example.NET.", a.addr).1, "created\n");
    assert_eq!(
        db_routes(&proxy.db()),
        vec![(l.clone(), "a.example.net".into(), a.addr.to_string())]
    );
    assert_eq!(who(addr(port), "a.example.net", &pki).await.unwrap(), "A");
    assert_eq!(add("a.example.net", b.addr).1, "updated\n");
    assert_eq!(
        db_routes(&proxy.db()),
        vec![(l.clone(), "a.example.net".into(), b.addr.to_string())]
    );
    assert_eq!(who(addr(port), "a.example.net", &pki).await.unwrap(), "B");
    let (code, out, err) = proxy.routes_remove(&l, "A.EXAMPLE.net.");
    assert_eq!((code, out.as_str()), (0, "removed\n"), "{err}");
    assert!(db_routes(&proxy.db()).is_empty());
    assert!(who(addr(port), "a.example.net", &pki).await.is_err());
}

fn integrity(path: &std::path::Path) -> String {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_a_running_server_under_write_load_is_whole_and_private() {
    let dir = tempfile::tempdir().unwrap();
    let l = "127.0.0.1:0".to_string();
    let proxy = Proxy::with_admin(dir.path(), &l, &[("seed.test", addr(9))]);

    // Writers: four clients adding routes until told to stop; every
    // acknowledged hostname is recorded.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (acked, stop, socket, l) =
            (acked.clone(), stop.clone(), proxy.admin_socket(), l.clone());
        writers.push(tokio::spawn(async move {
            let mut client = admin_client(&socket).await;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let hostname = format!("w{w}-{i}.load.test");
                let request = proto::AddRouteRequest {
                    route: Some(proto::Route {
                        listener_addr: l.clone(),
                        hostname: hostname.clone(),
                        backend: "127.0.0.1:9".into(),
                        send_proxy_protocol: false,
                        ..Default::default()
                    }),
                };
                client.add_route(request).await.unwrap();
                acked.lock().unwrap().push(hostname);
                i += 1;
            }
        }));
    }
    let acked_count = || acked.lock().unwrap().len();
    while acked_count() < 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A snapshot while they write: everything acknowledged before it
    // started is in it.
    let before: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let output = dir.path().join("copy.db");
    let output_text = output.display().to_string();
    let config = proxy.config.display().to_string();
    let (code, out, err) = {
        let (config, output_text) = (config.clone(), output_text.clone());
        tokio::task::spawn_blocking(move || {
            run_cli(&["snapshot", "-c", &config, "-o", &output_text])
        })
        .await
        .unwrap()
    };
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), output_text);
    let during = acked_count();
    while acked_count() < during + 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }

    assert_eq!(integrity(&output), "ok");
    assert_eq!(file_mode(&output), 0o600);
    let copied: BTreeSet<String> = db_routes(&output).into_iter().map(|r| r.1).collect();
    assert!(copied.contains("seed.test"));
    let missing: Vec<_> = before.difference(&copied).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in the snapshot: {missing:?}"
    );
    // Nothing in it that was never asked for.
    let all: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(copied.iter().all(|h| h == "seed.test" || all.contains(h)));

    // It refuses to overwrite and leaves the file alone.
    let bytes = std::fs::read(&output).unwrap();
    let (code, _, err) = run_cli(&["snapshot", "-c", &config, "-o", &output_text]);
    assert_eq!(code, 1);
    assert!(err.contains(&output_text), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&output).unwrap(), bytes);

    // The default path: <db dir>/backups/mc-proxy-<UTC>.db, 0600, whole,
    // with every route the server has now.
    let (code, out, err) = run_cli(&["snapshot", "-c", &config]);
    assert_eq!(code, 0, "{err}");
    let default = std::path::PathBuf::from(out.trim());
    assert_eq!(default.parent().unwrap(), dir.path().join("backups"));
    let name = default.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("mc-proxy-") && name.ends_with("Z.db") && name.len() == 28,
        "{name}"
    );
    assert_eq!(file_mode(&default), 0o600);
    assert_eq!(integrity(&default), "ok");
    let later: BTreeSet<String> = db_routes(&default).into_iter().map(|r| r.1).collect();
    assert_eq!(later.len(), all.len() + 1);
    // The server is still serving its admin API.
    let (code, _, _) = proxy.cli(&["status"]);
    assert_eq!(code, 0);
}
