//! Clients: the one TLS connect every test uses, reads with deadlines,
//! connections from chosen loopback sources, and plain HTTP GETs of
//! `/metrics`.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::pki::Pki;
use wire::hello::build::client_hello;

/// The TLS client every test uses: a TCP connection to `addr`, then
/// [`tls_over`].
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    tls_over(TcpStream::connect(addr).await?, sni, config).await
}

/// A TLS handshake for `sni` over a connection the caller made (from a
/// chosen source, say).
pub async fn tls_over(
    tcp: TcpStream,
    sni: &str,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(sni.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// Connects through the proxy with TLS and returns the backend's name line.
pub async fn who(addr: SocketAddr, sni: &str, pki: &Pki) -> io::Result<String> {
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        tls_connect(addr, sni, pki.client_config()),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tls connect"))??;
    let line = read_line(&mut tls).await?;
    Ok(line.trim_start_matches("backend=").to_string())
}

pub async fn read_line<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut byte))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "read_line"))??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "eof before newline",
            ));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// Writes `parts` (each its own write, or one byte per write when
/// `byte_at_a_time`), sends FIN and returns what came back and how the read
/// ended.
pub async fn exchange(
    stream: &mut TcpStream,
    parts: &[&[u8]],
    byte_at_a_time: bool,
) -> (Vec<u8>, std::io::Result<()>) {
    stream.set_nodelay(true).unwrap();
    // A refused connection may be reset while we write: stop writing then,
    // and let the read report how it ended.
    'writing: for part in parts {
        if byte_at_a_time {
            for byte in part.iter() {
                if stream.write_all(&[*byte]).await.is_err() {
                    break 'writing;
                }
                // The pacing is the point: each byte its own segment.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } else if stream.write_all(part).await.is_err() {
            break;
        }
    }
    let _ = stream.shutdown().await;
    read_all(stream, Duration::from_secs(10)).await
}

/// Connects to `addr`, then [`exchange`].
pub async fn send_and_finish(
    addr: SocketAddr,
    parts: &[&[u8]],
    byte_at_a_time: bool,
) -> (Vec<u8>, std::io::Result<()>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    exchange(&mut stream, parts, byte_at_a_time).await
}

/// Reads until EOF (or error) within `limit`; returns what was read and how
/// the read ended.
pub async fn read_all(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, io::Result<()>) {
    let mut all = Vec::new();
    let result = match tokio::time::timeout(limit, stream.read_to_end(&mut all)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no EOF in time")),
    };
    (all, result)
}

/// Whether a blocking read on `stream` sees a reset (as opposed to a FIN).
pub fn saw_reset(result: &io::Result<()>) -> bool {
    matches!(result, Err(e) if e.kind() == io::ErrorKind::ConnectionReset)
}

/// Reads from a std stream until EOF; for tests on blocking sockets.
pub fn std_read_all(stream: &mut std::net::TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut all = Vec::new();
    let result = stream.read_to_end(&mut all).map(|_| ());
    (all, result)
}

/// A TCP connection to `addr` from the loopback address `source`
/// (127.0.0.2, ...), so firewall rules can tell test clients apart.
pub async fn connect_from(source: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let source: std::net::IpAddr = source
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let socket = if source.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Like [`who`], from the loopback address `source`.
pub async fn who_from(source: &str, addr: SocketAddr, sni: &str, pki: &Pki) -> io::Result<String> {
    let handshake = async {
        let tcp = connect_from(source, addr).await?;
        tls_over(tcp, sni, pki.client_config()).await
    };
    let mut tls = tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tls connect"))??;
    let line = read_line(&mut tls).await?;
    Ok(line.trim_start_matches("backend=").to_string())
}

/// Connects from `source` and, without sending anything, reads until the
/// connection ends: what a client the firewall refuses sees (zero bytes, a
/// reset).
pub async fn refused_from(source: &str, addr: SocketAddr) -> (Vec<u8>, io::Result<()>) {
    match connect_from(source, addr).await {
        Ok(mut stream) => read_all(&mut stream, Duration::from_secs(10)).await,
        Err(e) => (Vec::new(), Err(e)),
    }
}

/// Asserts that a connection from `source` is reset before a byte arrives.
pub async fn assert_reset(source: &str, addr: SocketAddr) {
    let (bytes, result) = refused_from(source, addr).await;
    assert!(bytes.is_empty(), "{source} got {} bytes", bytes.len());
    assert!(
        saw_reset(&result),
        "{source}: expected a connection reset, got {result:?}"
    );
}

/// `GET path` over plain HTTP/1.1; returns (status line, headers, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(all).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

/// Series → value from Prometheus text (`name{labels} value`).
pub fn parse_metrics(body: &str) -> std::collections::HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// One GET of `/metrics` at `addr`, parsed ([`parse_metrics`]).
pub async fn scrape(addr: SocketAddr) -> std::collections::HashMap<String, f64> {
    parse_metrics(&http_get(addr, "/metrics").await.2)
}

/// Scrapes `/metrics` at `addr` until `check` accepts a scrape (returned)
/// or `limit` passes (the test fails, showing the last scrape). The
/// endpoint has no push channel, so this asks again every 20 ms.
pub async fn wait_metrics(
    addr: SocketAddr,
    limit: Duration,
    mut check: impl FnMut(&std::collections::HashMap<String, f64>) -> bool,
) -> std::collections::HashMap<String, f64> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let values = scrape(addr).await;
        if check(&values) {
            return values;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never got there in {limit:?}: {values:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects from a chosen loopback source address (127.0.0.0/8).
pub async fn connect_from_ip(source: std::net::IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// Connects from `source`, sends a ClientHello for `sni` and reads to the
/// end: the bytes received and how it ended. A reset seen by the connect or
/// by the write is that end too (the kernel reports a reset once, to
/// whichever call comes first; later reads just see EOF).
pub async fn hello_from(
    source: std::net::IpAddr,
    to: SocketAddr,
    sni: &str,
) -> (Vec<u8>, io::Result<()>) {
    let mut stream = match connect_from_ip(source, to).await {
        Ok(stream) => stream,
        Err(e) => return (Vec::new(), Err(e)),
    };
    if let Err(e) = stream.write_all(&client_hello(Some(sni))).await {
        return (Vec::new(), Err(e));
    }
    read_all(&mut stream, Duration::from_secs(10)).await
}
