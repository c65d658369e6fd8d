//! The default route `*` (SPEC §6.3, issue 16 item 5): on its listener it
//! takes every ClientHello whose SNI matches no other route, and those
//! without SNI, while exact and wildcard routes still win; L4 and L7.

mod common;

use common::*;

/// L4: who answers for each SNI, and for a hello without one.
#[tokio::test]
async fn the_default_route_catches_unknown_and_missing_sni_while_other_routes_win() {
    let pki = Pki::new("default CA");
    let exact = tls_backend(&pki, "exact", &["a.test"]).await;
    let wildcard = tls_backend(&pki, "wildcard", &["x.example.net"]).await;
    // It must also answer a client that sent no SNI: rustls sends none when
    // it connects to an IP address.
    let fallback = tls_backend(&pki, "default", &["other.test", "127.0.0.1"]).await;
    let server = InProcess::routing(
        &[
            ("a.test", exact.addr),
            ("*.example.net", wildcard.addr),
            ("*", fallback.addr),
        ],
        "",
    )
    .await;
    let addr = server.addr();
    assert_eq!(who(addr, "a.test", &pki).await.unwrap(), "exact");
    assert_eq!(who(addr, "x.example.net", &pki).await.unwrap(), "wildcard");
    assert_eq!(who(addr, "other.test", &pki).await.unwrap(), "default");
    assert_eq!(who(addr, "127.0.0.1", &pki).await.unwrap(), "default");
    // Nothing was refused for want of a route.
    let metrics = server.wait_closed("relayed", 0.0).await;
    assert_eq!(metrics.get(&closed_series("no_route")), Some(&0.0));
    server.stop().await;
}

/// Without a default route a hello without SNI is still `no_route`.
#[tokio::test]
async fn without_a_default_route_a_hello_without_sni_is_no_route() {
    let pki = Pki::new("default CA");
    let exact = tls_backend(&pki, "exact", &["a.test", "127.0.0.1"]).await;
    let server = InProcess::routing(&[("a.test", exact.addr)], "").await;
    assert!(who(server.addr(), "127.0.0.1", &pki).await.is_err());
    server.wait_closed("no_route", 1.0).await;
    server.stop().await;
}

/// Through the binary: `*` in the config and through the CLI, listed as `*`.
#[test]
fn the_default_route_is_configured_added_and_listed_as_a_star() {
    let dir = tempfile::tempdir().unwrap();
    let backend: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let proxy = Proxy::with_admin(dir.path(), "127.0.0.1:0", &[("*", backend)]);
    let (code, out, err) = proxy.cli(&["routes", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"hostname\": \"*\"") || out.contains("\"hostname\":\"*\""),
        "{out}"
    );
    let (code, _, err) = proxy.routes_add("127.0.0.1:0", "*", "127.0.0.1:10");
    assert_eq!(code, 0, "{err}");
    let rows = db_routes(&proxy.db());
    assert_eq!(
        rows,
        [(
            "127.0.0.1:0".to_string(),
            "*".to_string(),
            "127.0.0.1:10".to_string()
        )]
    );
    // A backend cannot be `*`.
    let (code, _, err) = proxy.routes_add("127.0.0.1:0", "b.test", "*:80");
    assert_ne!(code, 0);
    assert!(err.contains("INVALID_ARGUMENT: route.backend"), "{err}");
    proxy.stop();
}
