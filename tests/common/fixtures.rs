//! Fixtures: config text, GeoIP databases, the DB on disk, the admin
//! client, file modes.

use std::net::SocketAddr;
use std::path::Path;

// ---- the config builder: every test's TOML comes from these ------------------

/// `[database]` at `DIR/mc-proxy.db`, then `body`.
pub fn config(dir: &Path, body: &str) -> String {
    format!(
        "[database]\npath = \"{}\"\n\n{body}",
        dir.join("mc-proxy.db").display()
    )
}

/// `[database]` in `dir` and a unix-socket `[grpc]` section
/// ([`admin_socket`]), then `body`.
pub fn admin_config(dir: &Path, body: &str) -> String {
    config(dir, &format!("{}\n{body}", admin_socket(dir)))
}

/// `[grpc]` on the unix socket `DIR/admin.sock`.
pub fn admin_socket(dir: &Path) -> String {
    format!(
        "[grpc]\naddr = \"unix:{}\"\n",
        dir.join("admin.sock").display()
    )
}

/// One `[[listeners.routes]]` entry.
pub fn route(host: &str, backend: SocketAddr) -> String {
    format!("  [[listeners.routes]]\n  hostname = \"{host}\"\n  backend = \"{backend}\"\n")
}

/// A route whose backend gets a PROXY v2 header.
pub fn proxied_route(host: &str, backend: SocketAddr) -> String {
    format!("{}  send_proxy_protocol = true\n", route(host, backend))
}

/// A `[[listeners]]` block on `addr` with `routes` ([`route`] entries).
pub fn listener(addr: &str, routes: &[String]) -> String {
    format!("[[listeners]]\naddr = \"{addr}\"\n{}\n", routes.concat())
}

/// A `proxy_protocol = true` listener.
pub fn proxy_protocol_listener(addr: &str, routes: &[String]) -> String {
    format!(
        "[[listeners]]\naddr = \"{addr}\"\nproxy_protocol = true\n{}\n",
        routes.concat()
    )
}

/// A `[[listeners]]` block with `(hostname, backend)` routes.
pub fn listener_toml(addr: &str, routes: &[(&str, SocketAddr)]) -> String {
    let routes: Vec<String> = routes.iter().map(|(h, b)| route(h, *b)).collect();
    listener(addr, &routes)
}

/// `[proxy]` with `lines`.
pub fn proxy_section(lines: &str) -> String {
    format!("[proxy]\n{lines}\n")
}

/// `[metrics]` on an ephemeral loopback port (read it back with
/// `Proxy::metrics_addr`).
pub const METRICS_ANY_PORT: &str = "[metrics]\naddr = \"127.0.0.1:0\"\n";

/// `(listener, hostname, backend)` rows of the routes table, read straight
/// from the DB file (read-only, so a running server is not disturbed).
pub fn db_routes(db: &Path) -> Vec<(String, String, String)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT l.addr, r.hostname, r.backend FROM routes r \
             JOIN listeners l ON l.id = r.listener_id ORDER BY l.addr, r.hostname",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// `(type, value)` rows of the firewall_rules table, read-only.
pub fn db_rules(db: &Path) -> Vec<(String, String)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT type, value FROM firewall_rules ORDER BY type, value")
        .unwrap();
    let rows = stmt
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// The admin API of a server started on [`admin_config`].
pub async fn admin_client(
    socket: &Path,
) -> mc_proxy::admin::proto::proxy_admin_service_client::ProxyAdminServiceClient<
    tonic::transport::Channel,
> {
    mc_proxy::admin::client::connect(
        &mc_proxy::config::AdminAddr::Unix(socket.to_path_buf()),
        &mc_proxy::config::ClientTls::default(),
    )
    .await
    .unwrap()
}

/// An AddRoute request without the PROXY header flag.
pub fn add_route(
    listener: &str,
    hostname: &str,
    backend: &str,
) -> mc_proxy::admin::proto::AddRouteRequest {
    mc_proxy::admin::proto::AddRouteRequest {
        route: Some(mc_proxy::admin::proto::Route {
            listener_addr: listener.into(),
            hostname: hostname.into(),
            backend: backend.into(),
            send_proxy_protocol: false,
            ..Default::default()
        }),
    }
}

/// `(listener, hostname, backend)` of every route ListRoutes returns, in
/// its order.
pub async fn list_routes(
    admin: &mut mc_proxy::admin::proto::proxy_admin_service_client::ProxyAdminServiceClient<
        tonic::transport::Channel,
    >,
) -> Vec<(String, String, String)> {
    admin
        .list_routes(mc_proxy::admin::proto::ListRoutesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .routes
        .into_iter()
        .map(|r| (r.listener_addr, r.hostname, r.backend))
        .collect()
}

/// `mode & 0o777` of a file.
pub fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A GeoIP (Country-shaped) database mapping each network to its ISO code.
pub fn geoip_db(entries: &[(&str, &str)]) -> Vec<u8> {
    use mmdb_writer::{Value, Writer};
    let mut writer = Writer::new("GeoLite2-Country");
    for (net, iso) in entries {
        let country = Value::map([
            ("geoname_id", Value::from(1_u32)),
            ("iso_code", Value::from(*iso)),
            ("names", Value::map([("en", Value::from(*iso))])),
        ]);
        writer
            .insert_value(
                net.parse::<ipnet::IpNet>().unwrap(),
                Value::map([("country", country)]),
            )
            .unwrap();
    }
    writer.to_bytes().unwrap()
}
