//! The gRPC admin API over its real transports: unix socket and TLS/mTLS
//! TCP, health, reflection, and every status code the service returns.
//! Each server is the real one, built in-process by `App::build_with`
//! (tests/common/inproc.rs runs it); the tests look at its tables directly.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use mc_proxy::admin::cli::{self, ClientTarget};
use mc_proxy::admin::client;
use mc_proxy::admin::proto::proxy_admin_service_client::ProxyAdminServiceClient;
use mc_proxy::admin::proto::{self, FirewallRuleType};
use mc_proxy::admin::AdminError;
use mc_proxy::config::{AdminAddr, ClientTls, Config, GrpcConfig, ServerTls};
use mc_proxy::firewall::Firewall;
use mc_proxy::metrics::Stats;
use mc_proxy::routes::Routes;
use mc_proxy::server::{App, ServerError};
use tonic::transport::Channel;
use tonic::Code;

mod common;
use common::InProcess;

// ---- harness --------------------------------------------------------------

const LISTENERS: [&str; 2] = [":443", "127.0.0.1:8443"];

/// A real config and a DB file in a temp dir. Each server is the real
/// one, built by `App::build_with` (the listeners get loopback sockets on
/// port 0 handed in under their config names).
struct Harness {
    dir: tempfile::TempDir,
    db: PathBuf,
    config: Config,
    /// Servers started so far: the first uses `db`, later ones a DB of
    /// their own (a second server beside a running one must not share it).
    started: std::cell::Cell<usize>,
}

impl Harness {
    async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("mc-proxy.db");
        let source = dir.path().join("mc-proxy.toml");
        let mut toml = format!("[database]\npath = {:?}\n", db.display().to_string());
        for addr in LISTENERS {
            toml.push_str(&format!("\n[[listeners]]\naddr = {addr:?}\n"));
        }
        std::fs::write(&source, &toml).unwrap();
        let config = Config::load(&source).unwrap();
        Harness {
            dir,
            db,
            config,
            started: std::cell::Cell::new(0),
        }
    }

    /// Makes every later insert into, update of or delete from the route
    /// and rule tables fail, through a second connection to the DB file.
    fn inject_storage_failure(&self) {
        let conn = rusqlite::Connection::open(&self.db).unwrap();
        for table in ["routes", "firewall_rules"] {
            for event in ["INSERT", "UPDATE", "DELETE"] {
                conn.execute_batch(&format!(
                    "CREATE TRIGGER fail_{table}_{event} BEFORE {event} ON {table} \
                     BEGIN SELECT RAISE(ABORT, 'injected'); END;"
                ))
                .unwrap();
            }
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// What `GetStatus.version` says.
fn version() -> String {
    format!("mc-proxy {}", mc_proxy::version())
}

/// A running server, its tables, and the switch that stops it.
struct Running {
    addr: AdminAddr,
    routes: Arc<Routes>,
    firewall: Arc<Firewall>,
    stats: Arc<Stats>,
    server: Option<InProcess>,
}

impl Running {
    /// `App::build_with` on the harness's config with `[grpc]` = `grpc`;
    /// the admin API's own error if that is what failed.
    async fn start(grpc: &GrpcConfig, h: &Harness) -> Result<Running, AdminError> {
        let mut config = h.config.clone();
        config.grpc = Some(grpc.clone());
        let n = h.started.get();
        h.started.set(n + 1);
        if n > 0 {
            config.database.path = h.path(&format!("mc-proxy-{n}.db"));
        }
        let sockets = LISTENERS
            .iter()
            .map(|name| {
                let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                (name.to_string(), socket)
            })
            .collect();
        let app = match App::build_with(&config, sockets).await {
            Ok(app) => app,
            Err(ServerError::Admin { error, .. }) => return Err(error),
            Err(other) => panic!("the server failed before the admin API: {other}"),
        };
        Ok(Running {
            addr: app.admin_addr().unwrap().clone(),
            routes: app.routes().clone(),
            firewall: app.firewall().clone(),
            stats: app.stats().clone(),
            server: Some(InProcess::run(app)),
        })
    }

    fn addr(&self) -> AdminAddr {
        self.addr.clone()
    }

    async fn stop(mut self) {
        self.server.take().unwrap().stop().await;
    }
}

fn unix_config(path: &Path) -> GrpcConfig {
    GrpcConfig {
        addr: AdminAddr::Unix(path.to_path_buf()),
        tls: None,
        client: ClientTls::default(),
    }
}

async fn unix_server(h: &Harness) -> (Running, ProxyAdminServiceClient<Channel>) {
    let running = Running::start(&unix_config(&h.path("admin.sock")), h)
        .await
        .unwrap();
    let client = client::connect(&running.addr(), &ClientTls::default())
        .await
        .unwrap();
    (running, client)
}

/// A harness, a server on its unix socket, and an admin client.
async fn unix_harness() -> (Harness, Running, ProxyAdminServiceClient<Channel>) {
    let h = Harness::new().await;
    let (running, client) = unix_server(&h).await;
    (h, running, client)
}

/// A unix-socket server and a bare channel to it (for services other than
/// the admin one).
async fn unix_channel(h: &Harness) -> (Running, Channel) {
    let (running, _) = unix_server(h).await;
    let channel = client::channel(&running.addr(), &ClientTls::default())
        .await
        .unwrap();
    (running, channel)
}

fn route(listener: &str, hostname: &str, backend: &str) -> proto::Route {
    proto::Route {
        listener_addr: listener.into(),
        hostname: hostname.into(),
        backend: backend.into(),
        send_proxy_protocol: false,
        ..Default::default()
    }
}

fn add(r: proto::Route) -> proto::AddRouteRequest {
    proto::AddRouteRequest { route: Some(r) }
}

fn rule(kind: FirewallRuleType, value: &str) -> Option<proto::FirewallRule> {
    Some(proto::FirewallRule {
        r#type: kind.into(),
        value: value.into(),
    })
}

async fn list_all(client: &mut ProxyAdminServiceClient<Channel>) -> Vec<(String, String, String)> {
    common::list_routes(client).await
}

fn remove(listener: &str, hostname: &str) -> proto::RemoveRouteRequest {
    proto::RemoveRouteRequest {
        listener_addr: listener.into(),
        hostname: hostname.into(),
    }
}

fn add_rule(kind: FirewallRuleType, value: &str) -> proto::AddFirewallRuleRequest {
    proto::AddFirewallRuleRequest {
        rule: rule(kind, value),
    }
}

fn remove_rule(kind: FirewallRuleType, value: &str) -> proto::RemoveFirewallRuleRequest {
    proto::RemoveFirewallRuleRequest {
        rule: rule(kind, value),
    }
}

/// Asserts that `err` is INVALID_ARGUMENT naming `field` first (`shown`:
/// the input, for the failure message).
fn assert_invalid(err: &tonic::Status, field: &str, shown: &str) {
    assert_eq!(err.code(), Code::InvalidArgument, "{shown}: {err:?}");
    assert!(
        err.message().starts_with(field),
        "{shown}: {}",
        err.message()
    );
}

/// The status of a call that must fail.
fn refused<T>(reply: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    match reply {
        Ok(_) => panic!("the call succeeded"),
        Err(status) => status,
    }
}

// ---- certificates ---------------------------------------------------------

struct Pki {
    ca_pem: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A client signed by a CA the server does not trust.
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let leaf = |sans: Vec<String>,
                usage: ExtendedKeyUsagePurpose,
                issuer: &CertifiedIssuer<'_, KeyPair>| {
        let mut params = CertificateParams::new(sans).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let good_ca = ca("mc-proxy test CA");
    let rogue_ca = ca("someone else's CA");
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        &good_ca,
    );
    let (client_cert, client_key) = leaf(
        vec!["admin-cli".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        &good_ca,
    );
    let (rogue_cert, rogue_key) = leaf(
        vec!["admin-cli".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        &rogue_ca,
    );
    Pki {
        ca_pem: write("ca.pem", good_ca.pem()),
        server_cert: write("server.pem", server_cert),
        server_key: write("server.key", server_key),
        client_cert: write("client.pem", client_cert),
        client_key: write("client.key", client_key),
        rogue_cert: write("rogue.pem", rogue_cert),
        rogue_key: write("rogue.key", rogue_key),
    }
}

fn tcp_config(pki: &Pki, mtls: bool) -> GrpcConfig {
    GrpcConfig {
        addr: AdminAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        tls: Some(ServerTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: mtls.then(|| pki.ca_pem.clone()),
        }),
        client: ClientTls::default(),
    }
}

/// A harness, its certificates and a server on TCP with TLS (`mtls`: client
/// certificates from the CA required).
async fn tcp_server(mtls: bool) -> (Harness, Pki, Running) {
    let h = Harness::new().await;
    let pki = pki(h.dir.path());
    let running = Running::start(&tcp_config(&pki, mtls), &h).await.unwrap();
    (h, pki, running)
}

impl Running {
    /// The TCP address of a [`tcp_server`].
    fn tcp_addr(&self) -> std::net::SocketAddr {
        let AdminAddr::Tcp(addr) = self.addr() else {
            panic!("not a TCP server")
        };
        addr
    }
}

/// Connects and makes one call; with TLS 1.3 a refused client certificate
/// may only show on the first call.
async fn status_over(addr: &AdminAddr, tls: &ClientTls) -> Result<String, String> {
    let mut client = client::connect(addr, tls)
        .await
        .map_err(|e| e.to_string())?;
    client
        .get_status(proto::GetStatusRequest {})
        .await
        .map(|r| r.into_inner().version)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

// ---- transports -----------------------------------------------------------

#[tokio::test]
async fn unix_socket_is_0660_replaces_a_stale_socket_and_is_removed_on_stop() {
    let h = Harness::new().await;
    let path = h.path("run/admin.sock");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A socket left behind by a killed server: bound, then its listener gone.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let running = Running::start(&unix_config(&path), &h).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    assert_eq!(
        status_over(&running.addr(), &ClientTls::default()).await,
        Ok(version())
    );

    // A second server must not steal a live socket.
    let err = Running::start(&unix_config(&path), &h)
        .await
        .err()
        .expect("second server started on a live socket");
    assert!(matches!(err, AdminError::SocketInUse { .. }), "{err}");

    running.stop().await;
    assert!(!path.exists(), "socket file left behind");
}

#[tokio::test]
async fn unix_socket_parent_directory_is_created() {
    let h = Harness::new().await;
    let path = h.path("a/b/admin.sock");
    let running = Running::start(&unix_config(&path), &h).await.unwrap();
    assert!(path.exists());
    running.stop().await;
}

#[tokio::test]
async fn unix_socket_with_a_path_near_the_length_limit_is_0660() {
    let h = Harness::new().await;
    // 104 bytes: fits a socket address, a staging name beside it does not.
    let base = h.dir.path().display().to_string().len();
    let path = h.path(&format!("{}.sock", "s".repeat(104 - base - 6)));
    assert_eq!(path.as_os_str().len(), 104);
    let running = Running::start(&unix_config(&path), &h).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    assert!(status_over(&running.addr(), &ClientTls::default())
        .await
        .is_ok());
    running.stop().await;
    assert!(!path.exists());
}

#[tokio::test]
async fn unix_socket_path_holding_a_regular_file_is_refused_and_kept() {
    let h = Harness::new().await;
    let path = h.path("admin.sock");
    std::fs::write(&path, "operator data").unwrap();
    let err = Running::start(&unix_config(&path), &h)
        .await
        .err()
        .expect("started over a regular file");
    assert!(err.to_string().starts_with("grpc.addr: "), "{err}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "operator data");

    let dir = h.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    assert!(Running::start(&unix_config(&dir), &h).await.is_err());
    assert!(dir.is_dir());
}

#[tokio::test]
async fn tcp_bind_failure_is_reported_before_serving() {
    let h = Harness::new().await;
    let pki = pki(h.dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = tcp_config(&pki, false);
    config.addr = AdminAddr::Tcp(taken.local_addr().unwrap());
    let err = Running::start(&config, &h)
        .await
        .err()
        .expect("bound a taken port");
    assert!(
        err.to_string()
            .starts_with("grpc.addr: cannot bind 127.0.0.1:"),
        "{err}"
    );
}

#[tokio::test]
async fn tcp_without_tls_is_refused() {
    let h = Harness::new().await;
    let config = GrpcConfig {
        addr: AdminAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        tls: None,
        client: ClientTls::default(),
    };
    assert!(matches!(
        Running::start(&config, &h).await.err(),
        Some(AdminError::TlsRequired)
    ));
}

#[tokio::test]
async fn unreadable_server_key_names_the_field() {
    let h = Harness::new().await;
    let pki = pki(h.dir.path());
    let mut config = tcp_config(&pki, false);
    config.tls.as_mut().unwrap().key = h.path("missing.key");
    let err = Running::start(&config, &h)
        .await
        .err()
        .expect("started without a key");
    assert!(err.to_string().starts_with("grpc.tls_key: "), "{err}");
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_admin_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let h = Harness::new().await;
    let (running, channel) = unix_channel(&h).await;
    let mut health = HealthClient::new(channel);
    for service in ["", "mc_proxy.v1.ProxyAdminService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // A Watch stream never ends by itself; stopping must not wait for it.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let path = h.path("admin.sock");
    running.stop().await;
    assert!(!path.exists(), "socket file left behind");
}

#[tokio::test]
async fn reflection_lists_and_describes_the_admin_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let h = Harness::new().await;
    let (running, channel) = unix_channel(&h).await;
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("mc_proxy.v1.ProxyAdminService".into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["mc_proxy.v1.ProxyAdminService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }

    let Some(MessageResponse::FileDescriptorResponse(files)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("no file descriptor for the service");
    };
    // The admin proto and the Timestamp it imports, so clients can decode.
    assert!(!files.file_descriptor_proto.is_empty());
    running.stop().await;
}

#[tokio::test]
async fn tls_without_client_ca_serves_any_client_that_trusts_the_server() {
    let (_h, pki, running) = tcp_server(false).await;
    let tls = ClientTls {
        ca_cert: Some(pki.ca_pem.clone()),
        ..ClientTls::default()
    };
    assert_eq!(status_over(&running.addr(), &tls).await, Ok(version()));
    // A client that does not trust the server's CA gives up.
    let wrong = ClientTls {
        ca_cert: Some(pki.rogue_cert.clone()),
        ..ClientTls::default()
    };
    assert!(status_over(&running.addr(), &wrong).await.is_err());
    let addr = running.tcp_addr();
    running.stop().await;
    // Stopped means the port is closed, not just ignored.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_configured_ca() {
    let (_h, pki, running) = tcp_server(true).await;
    let addr = running.addr();

    let good = ClientTls {
        ca_cert: Some(pki.ca_pem.clone()),
        client_cert: Some(pki.client_cert.clone()),
        client_key: Some(pki.client_key.clone()),
    };
    assert_eq!(status_over(&addr, &good).await, Ok(version()));

    let no_cert = ClientTls {
        ca_cert: Some(pki.ca_pem.clone()),
        ..ClientTls::default()
    };
    let refused = status_over(&addr, &no_cert).await;
    assert!(refused.is_err(), "client without a certificate was served");

    let rogue = ClientTls {
        ca_cert: Some(pki.ca_pem.clone()),
        client_cert: Some(pki.rogue_cert.clone()),
        client_key: Some(pki.rogue_key.clone()),
    };
    let refused = status_over(&addr, &rogue).await;
    assert!(
        refused.is_err(),
        "client with another CA's certificate was served"
    );

    // What the CLI says about it: the connection failed, not a call.
    let target = ClientTarget {
        addr: addr.clone(),
        tls: no_cert,
    };
    assert_eq!(
        cli::status(target.clone(), false, None).await,
        ExitCode::from(1)
    );

    // The refusals did not disturb the server.
    assert!(status_over(&addr, &good).await.is_ok());
    running.stop().await;
}

#[tokio::test]
async fn tls_1_2_clients_are_refused() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let (_h, pki, running) = tcp_server(true).await;
    let addr = running.tcp_addr();

    let connect = |versions: &'static [&'static rustls::SupportedProtocolVersion]| {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&pki.ca_pem).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(&pki.client_cert).unwrap()],
            PrivateKeyDer::from_pem_file(&pki.client_key).unwrap(),
        )
        .unwrap();
        let mut config = config;
        config.alpn_protocols = vec![b"h2".to_vec()];
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                .await
        }
    };
    static TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    assert!(connect(TLS12_ONLY).await.is_err());
    let tls13 = connect(TLS13_ONLY).await.unwrap();
    assert_eq!(tls13.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(tls13);
    running.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_does_not_block_other_clients() {
    let (_h, pki, running) = tcp_server(false).await;
    let addr = running.tcp_addr();
    // Connected, says nothing; and one that sends garbage.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut garbage = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let tls = ClientTls {
        ca_cert: Some(pki.ca_pem.clone()),
        ..ClientTls::default()
    };
    let served = tokio::time::timeout(Duration::from_secs(5), status_over(&running.addr(), &tls))
        .await
        .expect("a silent client blocked the server");
    assert!(served.is_ok(), "{served:?}");
    running.stop().await;
}

// ---- calls and status codes -----------------------------------------------

#[tokio::test]
async fn add_route_upserts_and_normalises_hostnames() {
    let (_h, running, mut client) = unix_harness().await;

    let first = client
        .add_route(add(route(":443", "a.example.net", "127.0.0.1:1001")))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let second = client
        .add_route(add(route(":443", "A.Example.NET.", "127.0.0.1:1002")))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !second.created,
        "mixed-case, trailing-dot name was a new route"
    );
    assert_eq!(
        list_all(&mut client).await,
        vec![(
            ":443".into(),
            "a.example.net".into(),
            "127.0.0.1:1002".into()
        )]
    );
    // The live table, not just the listing, has the new backend.
    let live = running
        .routes
        .listener(":443")
        .unwrap()
        .lookup("a.example.net");
    assert_eq!(live.unwrap().target.backend().to_string(), "127.0.0.1:1002");

    client
        .remove_route(remove(":443", "A.EXAMPLE.net."))
        .await
        .unwrap();
    assert!(list_all(&mut client).await.is_empty());
    running.stop().await;
}

#[tokio::test]
async fn list_routes_is_sorted_by_listener_then_hostname_and_filters() {
    let (_h, running, mut client) = unix_harness().await;
    for (listener, host) in [
        ("127.0.0.1:8443", "b.test"),
        (":443", "z.test"),
        ("127.0.0.1:8443", "a.test"),
        (":443", "m.test"),
    ] {
        client
            .add_route(add(route(listener, host, "[::1]:9000")))
            .await
            .unwrap();
    }
    let all: Vec<(String, String)> = list_all(&mut client)
        .await
        .into_iter()
        .map(|(l, h, _)| (l, h))
        .collect();
    // Listener addrs sort as text: "127..." before ":443".
    let expected = [
        ("127.0.0.1:8443", "a.test"),
        ("127.0.0.1:8443", "b.test"),
        (":443", "m.test"),
        (":443", "z.test"),
    ];
    assert_eq!(
        all,
        expected
            .map(|(l, h)| (l.to_string(), h.to_string()))
            .to_vec()
    );
    let one = client
        .list_routes(proto::ListRoutesRequest {
            listener_addr: "127.0.0.1:8443".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert_eq!(one.len(), 2);
    assert_eq!(one[0].backend, "[::1]:9000");

    let status = client
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let counts: Vec<(String, i32)> = status
        .listeners
        .into_iter()
        .map(|l| (l.addr, l.route_count))
        .collect();
    assert_eq!(
        counts,
        vec![(":443".to_string(), 2), ("127.0.0.1:8443".to_string(), 2)]
    );
    assert!(status.started_at.is_some());
    running.stop().await;
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let (_h, running, mut client) = unix_harness().await;

    let cases = [
        (route(":443", "", "127.0.0.1:1"), "route.hostname: "),
        (route(":443", "a b.test", "127.0.0.1:1"), "route.hostname: "),
        (route(":443", "a..test", "127.0.0.1:1"), "route.hostname: "),
        (route(":443", "a.test", "127.0.0.1"), "route.backend: "),
        (
            route(":443", "a.test", "backend.internal"),
            "route.backend: ",
        ),
        (route(":443", "a.test", "127.0.0.1:0"), "route.backend: "),
        (
            route(":443", "a.test", "127.0.0.1:70000"),
            "route.backend: ",
        ),
        (route(":443", "a.test", ""), "route.backend: "),
        (route("", "a.test", "127.0.0.1:1"), "route.listener_addr: "),
    ];
    for (bad, field) in cases {
        let shown = format!("{bad:?}");
        let err = refused(client.add_route(add(bad)).await);
        assert_invalid(&err, field, &shown);
    }
    let no_route = proto::AddRouteRequest { route: None };
    assert_invalid(&refused(client.add_route(no_route).await), "route: ", "");
    let bad_host = remove(":443", "bad host");
    assert_invalid(
        &refused(client.remove_route(bad_host).await),
        "hostname: ",
        "",
    );

    let rule_cases = [
        (rule(FirewallRuleType::Ip, "1.2.3"), "rule.value: "),
        (rule(FirewallRuleType::Ip, "10.0.0.0/8"), "rule.value: "),
        (rule(FirewallRuleType::Cidr, "10.0.0.0/33"), "rule.value: "),
        (rule(FirewallRuleType::Cidr, "not-a-net"), "rule.value: "),
        (rule(FirewallRuleType::Country, "KPX"), "rule.value: "),
        (rule(FirewallRuleType::Country, "1A"), "rule.value: "),
        (
            rule(FirewallRuleType::Unspecified, "1.2.3.4"),
            "rule.type: ",
        ),
        (
            Some(proto::FirewallRule {
                r#type: 42,
                value: "1.2.3.4".into(),
            }),
            "rule.type: ",
        ),
        (None, "rule: "),
    ];
    for (bad, field) in rule_cases {
        let shown = format!("{bad:?}");
        let add = proto::AddFirewallRuleRequest { rule: bad.clone() };
        assert_invalid(&refused(client.add_firewall_rule(add).await), field, &shown);
        let remove = proto::RemoveFirewallRuleRequest { rule: bad };
        let err = refused(client.remove_firewall_rule(remove).await);
        assert_eq!(err.code(), Code::InvalidArgument, "{shown}: {err:?}");
    }
    // Nothing was changed by any of it.
    assert!(list_all(&mut client).await.is_empty());
    assert!(running.firewall.rules().rules().is_empty());
    running.stop().await;
}

/// A route with a pool: `backends`, least connections, a 5 s check.
fn pool_route(hostname: &str, backends: &[&str]) -> proto::Route {
    proto::Route {
        backends: backends.iter().map(|b| b.to_string()).collect(),
        balance: "least_connections".into(),
        health_interval: "5s".into(),
        health_fall: 4,
        health_rise: 1,
        ..route(":443", hostname, "")
    }
}

/// The pool columns of a route, read from the DB file itself.
fn stored_pool(
    db: &Path,
    hostname: &str,
) -> (
    String,
    String,
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT backend, backends, balance, health_interval_ms, health_fall, health_rise \
         FROM routes WHERE hostname = ?1",
        [hostname],
        |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        },
    )
    .unwrap()
}

#[tokio::test]
async fn add_route_with_a_pool_round_trips_and_is_on_disk() {
    let (h, running, mut client) = unix_harness().await;
    let created = client
        .add_route(add(pool_route(
            "Pool.Test.",
            &["10.0.0.1:443", "[2001:db8::1]:443", "b.internal:8443"],
        )))
        .await
        .unwrap()
        .into_inner()
        .created;
    assert!(created);
    let listed = client
        .list_routes(proto::ListRoutesRequest {
            listener_addr: ":443".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert_eq!(listed.len(), 1);
    let shown = &listed[0];
    assert_eq!(shown.hostname, "pool.test");
    assert_eq!(shown.backend, "10.0.0.1:443");
    assert_eq!(
        shown.backends,
        ["10.0.0.1:443", "[2001:db8::1]:443", "b.internal:8443"]
    );
    assert_eq!(shown.balance, "least_connections");
    assert_eq!(shown.health_interval, "5s");
    assert_eq!(shown.health_path, "");
    assert_eq!((shown.health_fall, shown.health_rise), (4, 1));
    // The live table holds the same pool.
    let live = running
        .routes
        .listener(":443")
        .unwrap()
        .snapshot()
        .get(&mc_proxy::routes::Hostname::parse("pool.test").unwrap())
        .map(|t| (**t).clone())
        .unwrap();
    assert_eq!(live.backends.len(), 3);
    assert_eq!(
        live.health.as_ref().map(|c| (c.interval, c.fall, c.rise)),
        Some((Duration::from_secs(5), 4, 1))
    );
    assert_eq!(
        stored_pool(&h.db, "pool.test"),
        (
            "10.0.0.1:443".into(),
            "[\"10.0.0.1:443\",\"[2001:db8::1]:443\",\"b.internal:8443\"]".into(),
            "least_connections".into(),
            Some(5000),
            Some(4),
            Some(1)
        )
    );

    // The upsert replaces the whole list; backend may repeat backends[0];
    // the defaults come back when the fields are unset.
    let replaced = proto::Route {
        backend: "10.0.0.9:443".into(),
        backends: vec!["10.0.0.9:443".into(), "10.0.0.1:443".into()],
        ..route(":443", "pool.test", "")
    };
    let created = client
        .add_route(add(replaced))
        .await
        .unwrap()
        .into_inner()
        .created;
    assert!(!created);
    let listed = client
        .list_routes(proto::ListRoutesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert_eq!(listed[0].backends, ["10.0.0.9:443", "10.0.0.1:443"]);
    assert_eq!(listed[0].backend, "10.0.0.9:443");
    assert_eq!(listed[0].balance, "round_robin");
    assert_eq!(listed[0].health_interval, "");
    assert_eq!((listed[0].health_fall, listed[0].health_rise), (0, 0));
    assert_eq!(
        stored_pool(&h.db, "pool.test"),
        (
            "10.0.0.9:443".into(),
            "[\"10.0.0.9:443\",\"10.0.0.1:443\"]".into(),
            "round_robin".into(),
            None,
            None,
            None
        )
    );
    // A single backend still lists as a pool of one.
    client
        .add_route(add(route(":443", "one.test", "127.0.0.1:7")))
        .await
        .unwrap();
    let listed = client
        .list_routes(proto::ListRoutesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .routes;
    let one = listed.iter().find(|r| r.hostname == "one.test").unwrap();
    assert_eq!(
        (one.backend.as_str(), one.backends.clone()),
        ("127.0.0.1:7", vec!["127.0.0.1:7".to_string()])
    );
    running.stop().await;

    // Reopened from the file: the same pool.
    let again = mc_proxy::store::open(&h.config).unwrap();
    let (_, map) = again
        .state
        .listeners
        .iter()
        .find(|(addr, _)| addr == ":443")
        .unwrap();
    let target = map
        .get(&mc_proxy::routes::Hostname::parse("pool.test").unwrap())
        .unwrap();
    assert_eq!(target.backends.to_string(), "10.0.0.9:443,10.0.0.1:443");
}

#[tokio::test]
async fn bad_pool_fields_are_invalid_argument_naming_the_field() {
    let (_h, running, mut client) = unix_harness().await;
    let base = || pool_route("p.test", &["127.0.0.1:1", "127.0.0.1:2"]);
    let many: Vec<String> = (1..=65).map(|p| format!("127.0.0.1:{p}")).collect();
    let cases = [
        (
            proto::Route {
                backends: vec!["127.0.0.1:1".into(), "nope".into()],
                ..base()
            },
            "route.backends[1]: \"nope\"",
        ),
        (
            proto::Route {
                backend: "127.0.0.1:2".into(),
                ..base()
            },
            "route.backend: backend must be empty or equal to backends[0]",
        ),
        (
            proto::Route {
                backends: vec!["127.0.0.1:1".into(), "127.0.0.1:1".into()],
                ..base()
            },
            "route.backends: 127.0.0.1:1 is listed twice",
        ),
        (
            proto::Route {
                backends: many,
                ..base()
            },
            "route.backends: 65 backends; at most 64",
        ),
        (
            proto::Route {
                balance: "random".into(),
                ..base()
            },
            "route.balance: \"random\"",
        ),
        (
            proto::Route {
                health_interval: "often".into(),
                ..base()
            },
            "route.health_interval: \"often\"",
        ),
        (
            proto::Route {
                health_interval: "10ms".into(),
                ..base()
            },
            "route.health_interval: ",
        ),
        (
            proto::Route {
                health_path: "/healthz".into(),
                ..base()
            },
            "route.health_path: health_path is for l7 routes",
        ),
        (
            proto::Route {
                health_interval: String::new(),
                health_rise: 0,
                ..base()
            },
            "route.health_fall: health_fall needs health_interval",
        ),
        (
            proto::Route {
                health_fall: 101,
                ..base()
            },
            "route.health_fall: ",
        ),
    ];
    for (bad, field) in cases {
        let shown = format!("{:?}", bad.backends);
        let err = refused(client.add_route(add(bad)).await);
        assert_invalid(&err, field, &shown);
    }
    // Nothing was added.
    assert!(list_all(&mut client).await.is_empty());
    running.stop().await;
}

#[tokio::test]
async fn list_backends_reports_every_backend_sorted_and_filters() {
    let (_h, running, mut client) = unix_harness().await;
    client
        .add_route(add(pool_route("b.test", &["127.0.0.1:2", "127.0.0.1:1"])))
        .await
        .unwrap();
    client
        .add_route(add(route(":443", "a.test", "127.0.0.1:3")))
        .await
        .unwrap();
    client
        .add_route(add(route("127.0.0.1:8443", "c.test", "127.0.0.1:4")))
        .await
        .unwrap();
    let list = |listener: &str| proto::ListBackendsRequest {
        listener_addr: listener.into(),
    };
    let all = client
        .list_backends(list(""))
        .await
        .unwrap()
        .into_inner()
        .backends;
    let shown: Vec<(&str, &str, &str)> = all
        .iter()
        .map(|b| {
            (
                b.listener_addr.as_str(),
                b.hostname.as_str(),
                b.backend.as_str(),
            )
        })
        .collect();
    // By listener (as text, like ListRoutes), hostname, then the route's
    // backend order.
    assert_eq!(
        shown,
        [
            ("127.0.0.1:8443", "c.test", "127.0.0.1:4"),
            (":443", "a.test", "127.0.0.1:3"),
            (":443", "b.test", "127.0.0.1:2"),
            (":443", "b.test", "127.0.0.1:1"),
        ]
    );
    for b in &all {
        assert!(b.healthy, "{b:?}");
        assert_eq!((b.active_connections, b.total_connections), (0, 0), "{b:?}");
        assert_eq!(b.last_error, "", "{b:?}");
    }
    let one = client
        .list_backends(list("127.0.0.1:8443"))
        .await
        .unwrap()
        .into_inner()
        .backends;
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].hostname, "c.test");
    // A removed route's backends are gone.
    client.remove_route(remove(":443", "b.test")).await.unwrap();
    let left = client
        .list_backends(list(":443"))
        .await
        .unwrap()
        .into_inner()
        .backends;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].backend, "127.0.0.1:3");
    let err = refused(client.list_backends(list("127.0.0.1:1")).await);
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("127.0.0.1:1"), "{}", err.message());
    running.stop().await;
}

#[tokio::test]
async fn unknown_listener_and_absent_entries_are_not_found() {
    let (_h, running, mut client) = unix_harness().await;

    let err = refused(
        client
            .add_route(add(route(":9", "a.test", "127.0.0.1:1")))
            .await,
    );
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "listener \":9\" not found");

    let unknown_listener = proto::ListRoutesRequest {
        listener_addr: ":9".into(),
    };
    for err in [
        refused(client.remove_route(remove(":9", "a.test")).await),
        refused(client.list_routes(unknown_listener).await),
        refused(client.remove_route(remove(":443", "absent.test")).await),
        refused(
            client
                .remove_firewall_rule(remove_rule(FirewallRuleType::Ip, "192.0.2.7"))
                .await,
        ),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    running.stop().await;
}

#[tokio::test]
async fn firewall_rules_are_idempotent_normalised_and_listed_in_order() {
    let (_h, running, mut client) = unix_harness().await;
    for (kind, value) in [
        (FirewallRuleType::Country, "kp"),
        (FirewallRuleType::Cidr, "198.51.100.7/24"),
        (FirewallRuleType::Ip, "::ffff:192.0.2.7"),
        (FirewallRuleType::Ip, "192.0.2.7"),
        (FirewallRuleType::Country, "KP"),
    ] {
        client
            .add_firewall_rule(add_rule(kind, value))
            .await
            .unwrap();
    }
    let listed: Vec<(FirewallRuleType, String)> = client
        .list_firewall_rules(proto::ListFirewallRulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules
        .into_iter()
        .map(|r| (r.r#type(), r.value))
        .collect();
    assert_eq!(
        listed,
        vec![
            (FirewallRuleType::Ip, "192.0.2.7".to_string()),
            (FirewallRuleType::Cidr, "198.51.100.0/24".to_string()),
            (FirewallRuleType::Country, "KP".to_string()),
        ]
    );
    client
        .remove_firewall_rule(remove_rule(FirewallRuleType::Country, "kp"))
        .await
        .unwrap();
    assert_eq!(running.firewall.rules().rules().len(), 2);
    running.stop().await;
}

#[tokio::test]
async fn storage_failure_is_internal_and_leaves_memory_unchanged() {
    let (h, running, mut client) = unix_harness().await;
    client
        .add_route(add(route(":443", "kept.test", "127.0.0.1:1")))
        .await
        .unwrap();
    client
        .add_firewall_rule(add_rule(FirewallRuleType::Ip, "192.0.2.1"))
        .await
        .unwrap();
    let before = list_all(&mut client).await;

    h.inject_storage_failure();
    let err = refused(
        client
            .add_route(add(route(":443", "new.test", "127.0.0.1:2")))
            .await,
    );
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        !err.message().contains("injected"),
        "storage detail leaked: {}",
        err.message()
    );
    for err in [
        refused(
            client
                .add_route(add(route(":443", "kept.test", "127.0.0.1:3")))
                .await,
        ),
        refused(
            client
                .add_firewall_rule(add_rule(FirewallRuleType::Ip, "192.0.2.2"))
                .await,
        ),
        refused(client.remove_route(remove(":443", "kept.test")).await),
        refused(
            client
                .remove_firewall_rule(remove_rule(FirewallRuleType::Ip, "192.0.2.1"))
                .await,
        ),
    ] {
        assert_eq!(err.code(), Code::Internal, "{err:?}");
    }

    assert_eq!(list_all(&mut client).await, before);
    assert_eq!(
        running
            .routes
            .listener(":443")
            .unwrap()
            .lookup("kept.test")
            .unwrap()
            .target
            .backend()
            .to_string(),
        "127.0.0.1:1"
    );
    assert!(running
        .routes
        .listener(":443")
        .unwrap()
        .lookup("new.test")
        .is_none());
    assert_eq!(running.firewall.rules().rules().len(), 1);
    running.stop().await;
}

#[tokio::test]
async fn get_status_reports_live_counters() {
    use mc_proxy::firewall::BlockReason;
    use mc_proxy::metrics::ActiveGuard;
    use mc_proxy::outcome::Outcome;
    let (_h, running, mut client) = unix_harness().await;
    // Five connections accepted on listener 1, four of them gone; two more
    // on listener 0, both refused by the firewall and closed. The global
    // figures are the listeners' sums.
    let stats = &running.stats;
    let mut guards: Vec<_> = (0..5)
        .map(|_| ActiveGuard::accept(&stats.listeners[1]))
        .collect();
    guards.truncate(1);
    for reason in [BlockReason::Ip, BlockReason::Rate] {
        drop(ActiveGuard::accept(&stats.listeners[0]));
        stats.listeners[0]
            .metrics
            .closed(Outcome::Blocked(reason), None, None);
    }
    let status = client
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.version, version());
    assert_eq!(status.total_connections, 7);
    assert_eq!(status.blocked_connections, 2);
    assert_eq!(status.listeners[1].addr, "127.0.0.1:8443");
    assert_eq!(status.listeners[1].total_connections, 5);
    assert_eq!(status.listeners[1].active_connections, 1);
    assert_eq!(status.active_connections, 1);
    assert_eq!(status.listeners[0].total_connections, 2);
    assert_eq!(status.listeners[0].active_connections, 0);
    drop(guards);
    running.stop().await;
}

// ---- the CLI side ---------------------------------------------------------

#[tokio::test]
async fn cli_commands_return_documented_exit_statuses() {
    let (_h, running, _) = unix_harness().await;
    let target = ClientTarget {
        addr: running.addr(),
        tls: ClientTls::default(),
    };
    assert_eq!(
        cli::routes_add(
            target.clone(),
            cli::RouteSpec {
                listener: ":443".into(),
                hostname: "a.test".into(),
                backends: vec!["127.0.0.1:1".into()],
                ..cli::RouteSpec::default()
            }
        )
        .await,
        ExitCode::SUCCESS
    );
    assert_eq!(
        cli::routes_list(target.clone(), None, true).await,
        ExitCode::SUCCESS
    );
    assert_eq!(
        cli::status(target.clone(), false, None).await,
        ExitCode::SUCCESS
    );
    assert_eq!(
        cli::routes_remove(target.clone(), ":9".into(), "a.test".into()).await,
        ExitCode::from(1)
    );
    assert_eq!(
        cli::firewall_add(
            target.clone(),
            mc_proxy::firewall::rule::RuleKind::Country,
            "K1".into()
        )
        .await,
        ExitCode::from(1)
    );
    running.stop().await;

    // Nobody listening any more.
    assert_eq!(
        cli::status(target.clone(), true, None).await,
        ExitCode::from(1)
    );
    let err = client::connect(&target.addr, &target.tls)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot reach admin API at {}: ", target.addr)),
        "{err}"
    );

    // TCP without a CA to verify the server with is a configuration error.
    let tcp = ClientTarget {
        addr: AdminAddr::Tcp("127.0.0.1:1".parse().unwrap()),
        tls: ClientTls::default(),
    };
    assert_eq!(cli::status(tcp, false, None).await, ExitCode::from(2));
}
