//! L7 routes and user-agent rules as data (SPEC §6.2): the config keys and
//! their errors through `mc-proxy check`, the admin API's Route fields and
//! USER_AGENT rules against a real server and its DB file, and the CLI
//! flags. Serving L7 routes (TLS termination, HTTP proxying, the 403) is
//! tested with the runtime, not here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mc_proxy::admin::cli::{self, ClientTarget};
use mc_proxy::admin::proto::proxy_admin_service_client::ProxyAdminServiceClient;
use mc_proxy::admin::proto::{self, FirewallRuleType, RouteMode};
use mc_proxy::config::{AdminAddr, ClientTls};
use mc_proxy::firewall::RuleKind;
use mc_proxy::server::App;
use tonic::transport::Channel;
use tonic::Code;

mod common;
use common::*;

/// The listener every test here configures (its name in the admin API).
const LISTENER: &str = "127.0.0.1:0";

/// Certificate files in `dir`: `git.pem` (leaf + CA chain) and `git.key`,
/// `leaf.pem` (the leaf alone), `other.key` (a key of another leaf) and
/// `ca.pem`.
fn certificates(dir: &Path) {
    let pki = Pki::new("l7 test CA");
    let leaf = pki.leaf(&["git.test"]);
    std::fs::write(
        dir.join("git.pem"),
        format!("{}{}", leaf.cert_pem, pki.ca_pem),
    )
    .unwrap();
    std::fs::write(dir.join("git.key"), &leaf.key_pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("other.key"), pki.leaf(&["other.test"]).key_pem).unwrap();
    pki.write_ca(dir, "ca");
}

fn text(path: PathBuf) -> String {
    path.to_str().unwrap().to_string()
}

// ---- config: `mc-proxy check` ----------------------------------------------

#[test]
fn check_validates_l7_routes_and_user_agent_rules_naming_the_toml_key() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let path = dir.path().join("mc-proxy.toml");
    let check = |route: &str, rest: &str| {
        let toml = config(
            dir.path(),
            &format!(
                "[[listeners]]\naddr = \":1\"\n  [[listeners.routes]]\n  hostname = \"a.test\"\n  backend = \"127.0.0.1:1\"\n  [[listeners.routes]]\n  hostname = \"git.test\"\n  backend = \"127.0.0.1:3000\"\n{route}\n{rest}"
            ),
        );
        std::fs::write(&path, toml).unwrap();
        run_cli(&["check", "-c", path.to_str().unwrap()])
    };
    let l7 = "  mode = \"l7\"\n  tls_cert = \"git.pem\"\n  tls_key = \"git.key\"\n";

    // Good: relative paths against the config's directory, a full chain.
    let (code, stdout, stderr) = check(
        &format!("{l7}  backend_tls = true\n  backend_ca = \"ca.pem\"\n  backend_server_name = \"git.svc\"\n  backend_protocol = \"h2\"\n"),
        "[proxy]\nresponse_timeout = \"0s\"\n[firewall]\nblocked_user_agents = [\"(?i)sqlmap\", \"^curl/\"]\n",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("OK (1 listeners, 2 routes, 2 firewall rules)"),
        "{stdout}"
    );
    assert_eq!(stderr, "");

    // A leaf alone, not self-signed: accepted with a warning naming it.
    let (code, _, stderr) = check(
        "  mode = \"l7\"\n  tls_cert = \"leaf.pem\"\n  tls_key = \"git.key\"\n",
        "",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning")
            && stderr.contains("listeners[0].routes[1].tls_cert")
            && stderr.contains("leaf.pem")
            && stderr.contains("intermediate"),
        "{stderr}"
    );

    let at = |key: &str| format!("listeners[0].routes[1].{key}: ");
    for (route, rest, key, reason) in [
        (
            "  tls_cert = \"git.pem\"".to_string(),
            "",
            at("tls_cert"),
            "only for mode = \"l7\" routes",
        ),
        (
            "  mode = \"l4\"\n  backend_protocol = \"h2\"".into(),
            "",
            at("backend_protocol"),
            "only for mode = \"l7\" routes",
        ),
        (
            "  mode = \"l7\"\n  tls_cert = \"git.pem\"".into(),
            "",
            at("tls_key"),
            "required for a mode = \"l7\" route",
        ),
        (
            "  mode = \"l7\"\n  tls_key = \"git.key\"".into(),
            "",
            at("tls_cert"),
            "required",
        ),
        (
            format!("{l7}  send_proxy_protocol = true"),
            "",
            at("send_proxy_protocol"),
            "X-Forwarded-For",
        ),
        (
            format!("{l7}  backend_ca = \"ca.pem\""),
            "",
            at("backend_ca"),
            "needs backend_tls = true",
        ),
        (
            format!("{l7}  backend_server_name = \"git.svc\""),
            "",
            at("backend_server_name"),
            "needs backend_tls = true",
        ),
        (
            format!("{l7}  backend_tls = true\n  backend_server_name = \"*.svc.test\""),
            "",
            at("backend_server_name"),
            "not an IP address or DNS name",
        ),
        (
            format!("{l7}  backend_protocol = \"http2\""),
            "",
            at("backend_protocol"),
            "not one of auto, http1, h2",
        ),
        (
            "  mode = \"L7\"".into(),
            "",
            at("mode"),
            "is not \"l4\" or \"l7\"",
        ),
        (
            "  mode = \"l7\"\n  tls_cert = \"missing.pem\"\n  tls_key = \"git.key\"".into(),
            "",
            at("tls_cert"),
            "missing.pem",
        ),
        (
            "  mode = \"l7\"\n  tls_cert = \"git.key\"\n  tls_key = \"git.key\"".into(),
            "",
            at("tls_cert"),
            "no PEM certificate",
        ),
        (
            "  mode = \"l7\"\n  tls_cert = \"git.pem\"\n  tls_key = \"other.key\"".into(),
            "",
            at("tls_key"),
            "does not match",
        ),
        (
            "  mode = \"l7\"\n  tls_cert = \"git.pem\"\n  tls_key = \"git.pem\"".into(),
            "",
            at("tls_key"),
            "no PEM private key",
        ),
        (
            String::new(),
            "[firewall]\nblocked_user_agents = [\"ok\", \"(?i)sqlmap(\"]\n",
            "firewall.blocked_user_agents[1]: ".into(),
            "not a valid regular expression: unclosed group",
        ),
        (
            String::new(),
            "[proxy]\nresponse_timeout = \"soon\"\n",
            "proxy.response_timeout: ".into(),
            "not a duration",
        ),
    ] {
        let (code, _, stderr) = check(&route, rest);
        assert_eq!(code, 2, "{route} {rest}: {stderr}");
        assert!(
            stderr.contains(&key) && stderr.contains(reason),
            "{route} {rest}: {stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }

    // The server refuses the same certificate before it binds anything.
    check(
        "  mode = \"l7\"\n  tls_cert = \"git.pem\"\n  tls_key = \"other.key\"",
        "",
    );
    let (code, _, stderr) = run_cli(&["server", "-c", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("listeners[0].routes[1].tls_key: "),
        "{stderr}"
    );
    assert!(!dir.path().join("mc-proxy.db").exists());
}

// ---- admin API --------------------------------------------------------------

/// An in-process server with the admin socket and one listener (no
/// routes), its client, and the DB file.
struct Server {
    dir: tempfile::TempDir,
    server: InProcess,
    firewall: std::sync::Arc<mc_proxy::firewall::Firewall>,
    client: ProxyAdminServiceClient<Channel>,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        certificates(dir.path());
        let toml = admin_config(dir.path(), &listener_toml(LISTENER, &[]));
        let config = load_config(dir.path(), &toml);
        let app = App::build(&config).await.expect("App::build");
        let firewall = app.firewall().clone();
        let server = InProcess::run(app);
        let client = admin_client(&dir.path().join("admin.sock")).await;
        Server {
            dir,
            server,
            firewall,
            client,
        }
    }

    fn path(&self, name: &str) -> String {
        text(self.dir.path().join(name))
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("mc-proxy.db")
    }

    /// Every column of every route row, as text, sorted by hostname.
    fn route_rows(&self) -> Vec<Vec<Option<String>>> {
        let conn = rusqlite::Connection::open_with_flags(
            self.db(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT hostname, backend, send_proxy_protocol, mode, tls_cert, tls_key, \
                 backend_tls, backend_ca, backend_server_name, backend_protocol, updated_at \
                 FROM routes ORDER BY hostname",
            )
            .unwrap();
        let rows = stmt
            .query_map([], |row| {
                (0..11)
                    .map(|i| {
                        let value: rusqlite::types::Value = row.get(i)?;
                        Ok(match value {
                            rusqlite::types::Value::Null => None,
                            rusqlite::types::Value::Integer(n) => Some(n.to_string()),
                            rusqlite::types::Value::Text(t) => Some(t),
                            other => Some(format!("{other:?}")),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap();
        rows.map(Result::unwrap).collect()
    }

    async fn list(&mut self) -> Vec<proto::Route> {
        self.client
            .list_routes(proto::ListRoutesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .routes
    }

    async fn add(&mut self, route: proto::Route) -> Result<bool, tonic::Status> {
        self.client
            .add_route(proto::AddRouteRequest { route: Some(route) })
            .await
            .map(|r| r.into_inner().created)
    }
}

fn l4(hostname: &str, backend: &str) -> proto::Route {
    proto::Route {
        listener_addr: LISTENER.into(),
        hostname: hostname.into(),
        backend: backend.into(),
        ..Default::default()
    }
}

/// A route as ListRoutes shows it: a pool of its one backend, round robin.
fn as_listed(route: proto::Route) -> proto::Route {
    proto::Route {
        backends: vec![route.backend.clone()],
        balance: "round_robin".into(),
        ..route
    }
}

fn opt(text: &str) -> Option<String> {
    Some(text.to_string())
}

#[tokio::test]
async fn add_route_l7_lists_every_field_writes_the_row_and_switches_modes() {
    let mut s = Server::start().await;
    let full = proto::Route {
        mode: RouteMode::L7.into(),
        tls_cert: s.path("git.pem"),
        tls_key: s.path("git.key"),
        backend_tls: true,
        backend_ca: s.path("ca.pem"),
        backend_server_name: "Git.SVC.internal.".into(),
        backend_protocol: "h2".into(),
        ..l4("Git.Test.", "git.internal:3443")
    };
    assert!(s.add(full.clone()).await.unwrap());
    let listed = s.list().await;
    assert_eq!(
        listed,
        [as_listed(proto::Route {
            hostname: "git.test".into(),
            backend_server_name: "git.svc.internal".into(),
            ..full.clone()
        })]
    );
    let rows = s.route_rows();
    assert_eq!(
        rows[0][..10],
        [
            opt("git.test"),
            opt("git.internal:3443"),
            opt("0"),
            opt("l7"),
            Some(s.path("git.pem")),
            Some(s.path("git.key")),
            opt("1"),
            Some(s.path("ca.pem")),
            opt("git.svc.internal"),
            opt("h2"),
        ]
    );

    // L7 → L4: the same row, the L7 columns cleared.
    assert!(!s.add(l4("git.test", "127.0.0.1:4000")).await.unwrap());
    assert_eq!(
        s.list().await,
        [as_listed(proto::Route {
            mode: RouteMode::L4.into(),
            ..l4("git.test", "127.0.0.1:4000")
        })]
    );
    assert_eq!(
        s.route_rows()[0][..10],
        [
            opt("git.test"),
            opt("127.0.0.1:4000"),
            opt("0"),
            opt("l4"),
            None,
            None,
            opt("0"),
            None,
            None,
            opt("auto"),
        ]
    );

    // L4 → L7 again, with the defaults: "" protocol is listed as "auto".
    let plain = proto::Route {
        mode: RouteMode::L7.into(),
        tls_cert: s.path("git.pem"),
        tls_key: s.path("git.key"),
        ..l4("git.test", "127.0.0.1:3000")
    };
    assert!(!s.add(plain.clone()).await.unwrap());
    assert_eq!(
        s.list().await,
        [as_listed(proto::Route {
            backend_protocol: "auto".into(),
            ..plain
        })]
    );
    // UNSPECIFIED is L4.
    assert!(s.add(l4("a.test", "127.0.0.1:1")).await.unwrap());
    assert_eq!(s.list().await[0].mode, i32::from(RouteMode::L4));
    assert_eq!(s.route_rows()[0][3], opt("l4"));

    s.server.stop().await;
}

#[tokio::test]
async fn refused_route_calls_name_the_field_and_change_nothing() {
    let mut s = Server::start().await;
    let good = proto::Route {
        mode: RouteMode::L7.into(),
        tls_cert: s.path("git.pem"),
        tls_key: s.path("git.key"),
        ..l4("git.test", "127.0.0.1:3000")
    };
    assert!(s.add(good.clone()).await.unwrap());
    let rows = s.route_rows();
    let listed = s.list().await;

    let l7 = |change: &dyn Fn(&mut proto::Route)| {
        let mut route = good.clone();
        change(&mut route);
        route
    };
    let l4_with = |change: &dyn Fn(&mut proto::Route)| {
        let mut route = l4("git.test", "127.0.0.1:9");
        change(&mut route);
        route
    };
    let cases: Vec<(proto::Route, &str)> = vec![
        (l7(&|r| r.mode = 9), "route.mode"),
        (l7(&|r| r.tls_cert.clear()), "route.tls_cert"),
        (l7(&|r| r.tls_key.clear()), "route.tls_key"),
        (l7(&|r| r.tls_cert = "git.pem".into()), "route.tls_cert"),
        (
            l7(&|r| r.backend_protocol = "http2".into()),
            "route.backend_protocol",
        ),
        (
            l7(&|r| r.backend_ca = "/srv/ca.pem".into()),
            "route.backend_ca",
        ),
        (
            l7(&|r| r.backend_server_name = "git.svc".into()),
            "route.backend_server_name",
        ),
        (
            l7(&|r| {
                r.backend_tls = true;
                r.backend_server_name = "*.svc.test".into();
            }),
            "route.backend_server_name",
        ),
        (
            l7(&|r| r.send_proxy_protocol = true),
            "route.send_proxy_protocol",
        ),
        (
            l7(&|r| r.tls_cert = "/nonexistent/git.pem".into()),
            "route.tls_cert",
        ),
        (l7(&|r| r.tls_key = r.tls_cert.clone()), "route.tls_key"),
        (l4_with(&|r| r.tls_cert = "/x.pem".into()), "route.tls_cert"),
        (l4_with(&|r| r.tls_key = "/x.key".into()), "route.tls_key"),
        (l4_with(&|r| r.backend_tls = true), "route.backend_tls"),
        (
            l4_with(&|r| r.backend_ca = "/ca.pem".into()),
            "route.backend_ca",
        ),
        (
            l4_with(&|r| r.backend_server_name = "a.test".into()),
            "route.backend_server_name",
        ),
        (
            l4_with(&|r| r.backend_protocol = "h2".into()),
            "route.backend_protocol",
        ),
        (
            l4_with(&|r| {
                r.mode = RouteMode::L4.into();
                r.tls_key = "/x.key".into();
            }),
            "route.tls_key",
        ),
    ];
    let other_key = s.path("other.key");
    let mismatched = l7(&|r| r.tls_key = other_key.clone());
    for (route, field) in cases.into_iter().chain([(mismatched, "route.tls_key")]) {
        let shown = format!("{route:?}");
        let err = s.add(route).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{shown}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{shown}: {}",
            err.message()
        );
        assert_eq!(s.route_rows(), rows, "{shown}");
        assert_eq!(s.list().await, listed, "{shown}");
    }
    s.server.stop().await;
}

#[tokio::test]
async fn user_agent_rules_are_stored_and_block_user_agents() {
    let mut s = Server::start().await;
    let rule = |value: &str| {
        Some(proto::FirewallRule {
            r#type: FirewallRuleType::UserAgent.into(),
            value: value.into(),
        })
    };
    s.client
        .add_firewall_rule(proto::AddFirewallRuleRequest {
            rule: rule("(?i)sqlmap"),
        })
        .await
        .unwrap();
    assert_eq!(
        db_rules(&s.db()),
        [("user_agent".to_string(), "(?i)sqlmap".to_string())]
    );
    assert!(s
        .firewall
        .blocks_user_agent(b"sqlmap/1.7.2#stable (https://sqlmap.org)"));
    assert!(!s.firewall.blocks_user_agent(b"Mozilla/5.0"));
    let listed = s
        .client
        .list_firewall_rules(proto::ListFirewallRulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules;
    assert_eq!(listed, [rule("(?i)sqlmap").unwrap()]);

    // A bad pattern: INVALID_ARGUMENT naming rule.value, nothing written.
    for bad in ["(?i)sqlmap(", "", &"a".repeat(1025)] {
        let err = s
            .client
            .add_firewall_rule(proto::AddFirewallRuleRequest { rule: rule(bad) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with("rule.value: "),
            "{}",
            err.message()
        );
        assert!(err.message().len() < 200, "{}", err.message());
    }
    assert_eq!(db_rules(&s.db()).len(), 1);

    // The CLI's add and remove, in-process.
    let target = ClientTarget {
        addr: AdminAddr::Unix(s.dir.path().join("admin.sock")),
        tls: ClientTls::default(),
    };
    assert_eq!(
        cli::firewall_add(target.clone(), RuleKind::UserAgent, "^curl/".into()).await,
        std::process::ExitCode::SUCCESS
    );
    assert!(s.firewall.blocks_user_agent(b"curl/8.5.0"));
    assert!(db_rules(&s.db()).contains(&("user_agent".into(), "^curl/".into())));
    assert_eq!(
        cli::firewall_remove(target, RuleKind::UserAgent, "(?i)sqlmap".into()).await,
        std::process::ExitCode::SUCCESS
    );
    assert!(!s.firewall.blocks_user_agent(b"sqlmap/1.7"));
    assert_eq!(
        db_rules(&s.db()),
        [("user_agent".to_string(), "^curl/".to_string())]
    );
    s.server.stop().await;
}

// ---- the CLI ----------------------------------------------------------------

/// Runs the binary in `cwd` with `args`: (exit code, stdout, stderr).
fn run_in(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("MC_PROXY_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_adds_and_lists_l7_routes_and_user_agent_rules() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::with_admin(dir.path(), LISTENER, &[]);
    // The certificates sit in a directory the CLI is run from: the paths
    // it sends are absolute.
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    certificates(&certs);
    let config = text(proxy.config.clone());
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-c", config.as_str()]);
        run_in(&certs, &all)
    };
    let add_l7 = [
        "routes",
        "add",
        "--listener",
        LISTENER,
        "--hostname",
        "Git.Test",
        "--backend",
        "127.0.0.1:3000",
        "--mode",
        "l7",
        "--tls-cert",
        "git.pem",
        "--tls-key",
        "./git.key",
        "--backend-tls",
        "--backend-ca",
        "ca.pem",
        "--backend-server-name",
        "git.svc",
        "--backend-protocol",
        "http1",
    ];
    let (code, out, err) = cli(&add_l7);
    assert_eq!((code, out.as_str()), (0, "created\n"), "{err}");
    let (code, out, err) = cli(&[
        "routes",
        "add",
        "--listener",
        LISTENER,
        "--hostname",
        "a.test",
        "--backend",
        "127.0.0.1:1",
    ]);
    assert_eq!((code, out.as_str()), (0, "created\n"), "{err}");

    let cert = text(certs.join("git.pem"));
    let key = text(certs.join("git.key"));
    let ca = text(certs.join("ca.pem"));
    let (code, out, err) = cli(&["routes", "list"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains("MODE") && lines[0].ends_with("L7"),
        "{out}"
    );
    assert!(
        lines[1].contains("a.test") && lines[1].trim_end().ends_with("l4"),
        "{out}"
    );
    assert!(
        lines[2].contains("git.test")
            && lines[2].contains(" l7 ")
            && lines[2].ends_with(&format!(
                "cert={cert} key={key} protocol=http1 backend_tls ca={ca} server_name=git.svc"
            )),
        "{out}"
    );
    let (code, out, err) = cli(&["routes", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json[0]["mode"], "l4");
    assert!(json[0].get("tls_cert").is_none(), "{out}");
    assert_eq!(json[1]["mode"], "l7");
    assert_eq!(json[1]["tls_cert"], cert.as_str());
    assert_eq!(json[1]["tls_key"], key.as_str());
    assert_eq!(json[1]["backend_tls"], true);
    assert_eq!(json[1]["backend_ca"], ca.as_str());
    assert_eq!(json[1]["backend_server_name"], "git.svc");
    assert_eq!(json[1]["backend_protocol"], "http1");

    // Refused by the server: exit 1 with its code and the field.
    let (code, _, err) = cli(&[
        "routes",
        "add",
        "--listener",
        LISTENER,
        "--hostname",
        "b.test",
        "--backend",
        "127.0.0.1:2",
        "--mode",
        "l7",
        "--tls-cert",
        "git.pem",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("INVALID_ARGUMENT: route.tls_key: "), "{err}");
    let (code, _, err) = cli(&[
        "routes",
        "add",
        "--listener",
        LISTENER,
        "--hostname",
        "b.test",
        "--backend",
        "127.0.0.1:2",
        "--tls-cert",
        "git.pem",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("INVALID_ARGUMENT: route.tls_cert: only for ROUTE_MODE_L7"),
        "{err}"
    );
    // clap refuses an unknown mode or protocol.
    let (code, _, _) = cli(&[
        "routes",
        "add",
        "--listener",
        LISTENER,
        "--hostname",
        "b.test",
        "--backend",
        "127.0.0.1:2",
        "--mode",
        "l5",
    ]);
    assert_eq!(code, 2);

    // User-agent rules.
    let (code, out, err) = cli(&["firewall", "add", "--user-agent", "(?i)sqlmap"]);
    assert_eq!((code, out.as_str()), (0, "added\n"), "{err}");
    let (code, out, err) = cli(&["firewall", "add", "--user-agent", "-nikto"]);
    assert_eq!((code, out.as_str()), (0, "added\n"), "{err}");
    let (code, _, err) = cli(&["firewall", "add", "--user-agent", "(?i)sqlmap("]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("INVALID_ARGUMENT: rule.value: "), "{err}");
    let (code, out, err) = cli(&["firewall", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "TYPE        VALUE\nuser_agent  (?i)sqlmap\nuser_agent  -nikto\n"
    );
    let (code, out, _) = cli(&["firewall", "list", "--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json[0]["type"], "user_agent");
    let (code, out, err) = cli(&["firewall", "remove", "--user-agent", "-nikto"]);
    assert_eq!((code, out.as_str()), (0, "removed\n"), "{err}");
    assert_eq!(
        db_rules(&proxy.db()),
        [("user_agent".to_string(), "(?i)sqlmap".to_string())]
    );
    proxy.stop();
}

/// Through the binary: an L7 connection's close line counts its requests
/// (`requests=3`, outcome `relayed`), each request has its own line, and a
/// client that refuses the route's certificate ends as `tls_failed`.
// Two workers: the log waits below block their thread, and the client's
// connection task must still run to close the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_connection_lines_count_requests_and_name_tls_failures() {
    use common::http::{http_backend, L7Client};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("route CA");
    let leaf = pki.leaf(&["web.test"]);
    let (cert, key) = (dir.path().join("web.pem"), dir.path().join("web.key"));
    std::fs::write(&cert, leaf.cert_pem.clone() + &pki.ca_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let backend = http_backend("web").await;
    let toml = config(
        dir.path(),
        &format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n  [[listeners.routes]]\n  hostname = \"web.test\"\n  \
             backend = \"{backend}\"\n  mode = \"l7\"\n  tls_cert = \"{}\"\n  tls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let proxy = Proxy::start(dir.path(), &toml);
    {
        let mut client = L7Client::connect(proxy.addr(), "web.test", &pki, false).await;
        for _ in 0..3 {
            assert_eq!(client.get("web.test", "/echo").await.status, 200);
        }
    }
    let line = proxy.wait_conns(
        &["sni=web.test", "outcome=relayed"],
        1,
        std::time::Duration::from_secs(10),
    );
    assert_eq!(log_field(&line[0], "requests"), Some("3"), "{}", line[0]);
    let request = proxy.wait_log(
        &["mc_proxy::request", "path=/echo", "status=200"],
        std::time::Duration::from_secs(10),
    );
    assert_eq!(
        log_field(&request, "version"),
        Some("HTTP/1.1"),
        "{request}"
    );
    assert_eq!(log_field(&request, "outcome"), Some("proxied"), "{request}");

    // A client that trusts another CA aborts the handshake.
    let stranger = Pki::new("another CA");
    assert!(
        tls_connect(proxy.addr(), "web.test", stranger.client_config())
            .await
            .is_err()
    );
    let failed = proxy.wait_conns(
        &["sni=web.test", "outcome=tls_failed"],
        1,
        std::time::Duration::from_secs(10),
    );
    assert!(log_field(&failed[0], "error").is_some(), "{}", failed[0]);
    proxy.stop();
}

#[tokio::test]
async fn add_route_l7_pool_with_a_health_path_round_trips() {
    let mut s = Server::start().await;
    let pool = proto::Route {
        mode: RouteMode::L7.into(),
        tls_cert: s.path("git.pem"),
        tls_key: s.path("git.key"),
        backends: vec!["127.0.0.1:3000".into(), "127.0.0.1:3001".into()],
        health_interval: "2s".into(),
        health_path: "/healthz?deep=1".into(),
        ..l4("pool.test", "")
    };
    assert!(s.add(pool.clone()).await.unwrap());
    assert_eq!(
        s.list().await,
        [proto::Route {
            backend: "127.0.0.1:3000".into(),
            balance: "round_robin".into(),
            backend_protocol: "auto".into(),
            health_fall: 3,
            health_rise: 2,
            ..pool.clone()
        }]
    );
    let conn =
        rusqlite::Connection::open_with_flags(s.db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let row: (String, i64, String) = conn
        .query_row(
            "SELECT backends, health_interval_ms, health_path FROM routes WHERE hostname = 'pool.test'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        row,
        (
            "[\"127.0.0.1:3000\",\"127.0.0.1:3001\"]".into(),
            2000,
            "/healthz?deep=1".into()
        )
    );
    // A bad path, or a path without an interval, names route.health_path;
    // nothing changes.
    for bad in [
        proto::Route {
            health_path: "healthz".into(),
            ..pool.clone()
        },
        proto::Route {
            health_interval: String::new(),
            ..pool.clone()
        },
    ] {
        let err = s.add(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("route.health_path: "),
            "{}",
            err.message()
        );
    }
    assert_eq!(s.list().await[0].health_path, "/healthz?deep=1");
    s.server.stop().await;
}
