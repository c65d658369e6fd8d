//! HTTP peers for L7 routes: a hyper backend (HTTP/1.1 and h2c, or TLS
//! with ALPN) that reports what it received, and a hyper client over
//! rustls that speaks HTTP/1.1 or HTTP/2 to the proxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::ClientConfig;
use tokio::net::{TcpListener, TcpStream};

use super::clients::tls_over;
use super::pki::Pki;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> BoxBody {
    Full::new(text.into()).boxed()
}

/// What the backend answers, by path:
/// - `/echo` (any method): `backend=NAME`, then the request line's
///   version, then selected headers, then `body=N` (bytes received);
/// - `/slow?ms=N`: waits N ms before answering;
/// - `/bytes?n=N`: N bytes of a repeating pattern, streamed in 64 KiB frames;
/// - `/trailers`: a body and the trailer `x-trailer: done`;
/// - `/ws` with `Upgrade`: 101, then echoes the upgraded bytes (after a
///   `NAME\n` greeting);
/// - anything else: 404.
async fn answer(name: &'static str, mut req: Request<Incoming>) -> Response<BoxBody> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let number = |key: &str| -> u64 {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    match path.as_str() {
        "/echo" => {
            let mut lines = vec![
                format!("backend={name}"),
                format!("version={:?}", req.version()),
            ];
            lines.push(format!("method={}", req.method()));
            lines.push(format!("uri={}", req.uri()));
            for header in [
                "host",
                "x-forwarded-for",
                "x-real-ip",
                "x-forwarded-proto",
                "x-forwarded-host",
                "te",
                "connection",
                "x-secret",
                "expect",
            ] {
                let values: Vec<_> = req
                    .headers()
                    .get_all(header)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                lines.push(format!("{header}={}", values.join("|")));
            }
            let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
            lines.push(format!("body={}", body.unwrap_or(0)));
            Response::new(full(lines.join("\n") + "\n"))
        }
        "/ws" if req.headers().contains_key("upgrade") => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(upgraded) = upgrade.await else {
                    return;
                };
                let mut io = TokioIo::new(upgraded);
                if io.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            response
                .headers_mut()
                .insert("upgrade", HeaderValue::from_static("websocket"));
            response
                .headers_mut()
                .insert("connection", HeaderValue::from_static("upgrade"));
            response
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(number("ms"))).await;
            Response::new(full("slow\n"))
        }
        "/bytes" => {
            let total = number("n");
            let stream = futures_stream(total);
            Response::new(StreamBody::new(stream).boxed())
        }
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-trailer", HeaderValue::from_static("done"));
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body\n"))),
                Ok(Frame::trailers(trailers)),
            ];
            let stream = tokio_stream::iter(frames);
            Response::new(StreamBody::new(stream).boxed())
        }
        _ => {
            let mut response = Response::new(full("not found\n"));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

/// `total` bytes of `pattern_byte(i)` in 64 KiB frames.
fn futures_stream(
    total: u64,
) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync {
    const FRAME: u64 = 64 * 1024;
    let frames = total.div_ceil(FRAME);
    tokio_stream::iter((0..frames).map(move |i| {
        let start = i * FRAME;
        let len = FRAME.min(total - start);
        let chunk: Vec<u8> = (start..start + len).map(pattern_byte).collect();
        Ok(Frame::data(Bytes::from(chunk)))
    }))
}

/// The byte at offset `i` of `/bytes` (and of test uploads).
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// A plaintext backend and what it has seen.
pub struct PlainBackend {
    pub addr: SocketAddr,
    /// Connections accepted.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests answered.
    pub requests: Arc<std::sync::atomic::AtomicUsize>,
}

/// A plaintext backend: HTTP/1.1 and HTTP/2 with prior knowledge (h2c),
/// or HTTP/1.1 only (like many git forges: h2c fails on it).
pub async fn plain_backend(name: &'static str, http1_only: bool) -> PlainBackend {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = PlainBackend {
        addr: listener.local_addr().unwrap(),
        connections: Arc::new(AtomicUsize::new(0)),
        requests: Arc::new(AtomicUsize::new(0)),
    };
    let (connections, requests) = (backend.connections.clone(), backend.requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            connections.fetch_add(1, Ordering::SeqCst);
            let requests = requests.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    requests.fetch_add(1, Ordering::SeqCst);
                    async move { Ok::<_, Infallible>(answer(name, req).await) }
                });
                let io = TokioIo::new(stream);
                let _ = if http1_only {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(io, service)
                        .await
                        .map_err(|e| e.to_string())
                };
            });
        }
    });
    backend
}

/// A plaintext backend (HTTP/1.1 and h2c): [`plain_backend`]'s address.
pub async fn http_backend(name: &'static str) -> SocketAddr {
    plain_backend(name, false).await.addr
}

/// A TLS backend (ALPN h2 and http/1.1) with a leaf of `pki` for `names`.
pub async fn https_backend(pki: &Pki, name: &'static str, names: &[&str]) -> SocketAddr {
    let mut config = (*pki.server_config(names)).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| async move {
                    Ok::<_, Infallible>(answer(name, req).await)
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// A client config trusting `pki`, offering `alpn`.
pub fn alpn_client(pki: &Pki, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = (*pki.client_config()).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// One client connection to an L7 route, HTTP/1.1 or HTTP/2.
pub enum L7Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    /// `key=value` lines of an `/echo` body → the value of `key`.
    pub fn field(&self, key: &str) -> String {
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.body))
            .to_string()
    }
}

impl L7Client {
    /// Connects with TLS for `sni` (trusting `pki`), HTTP/2 if `h2`.
    pub async fn connect(addr: SocketAddr, sni: &str, pki: &Pki, h2: bool) -> L7Client {
        let tcp = TcpStream::connect(addr).await.expect("TCP to the L7 route");
        L7Client::over(tcp, sni, pki, h2)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`L7Client::connect`] over a connection the caller made (after a
    /// PROXY header, say); a failure is an `Err` naming the step.
    pub async fn over(tcp: TcpStream, sni: &str, pki: &Pki, h2: bool) -> Result<L7Client, String> {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = tls_over(tcp, sni, alpn_client(pki, alpn))
            .await
            .map_err(|e| format!("TLS to the L7 route: {e}"))?;
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if negotiated.as_deref() != Some(alpn[0]) {
            return Err(format!("ALPN: {negotiated:?} instead of {:?}", alpn[0]));
        }
        let io = TokioIo::new(tls);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            Ok(L7Client::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("h1 handshake: {e}"))?;
            tokio::spawn(conn.with_upgrades());
            Ok(L7Client::H1(send))
        }
    }

    /// Sends `req` (its URI absolute, for the host) and reads the answer.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> hyper::Result<Answer> {
        let response = match self {
            L7Client::H1(send) => {
                send.ready().await?;
                send.send_request(req).await?
            }
            L7Client::H2(send) => {
                send.ready().await?;
                send.send_request(req).await?
            }
        };
        let (parts, body) = response.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            trailers,
        })
    }

    /// `GET https://HOST/PATH`, with a Host header for HTTP/1.1.
    pub async fn get(&mut self, host: &str, path: &str) -> Answer {
        self.send(request("GET", host, path, self.is_h1(), Bytes::new()))
            .await
            .expect("request")
    }

    pub fn is_h1(&self) -> bool {
        matches!(self, L7Client::H1(_))
    }
}

/// A request for `https://host/path`: origin-form with a Host header for
/// HTTP/1.1, absolute (`:authority`) for HTTP/2.
pub fn request(
    method: &str,
    host: &str,
    path: &str,
    h1: bool,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let builder = Request::builder().method(method);
    let builder = if h1 {
        builder.uri(path).header("host", host)
    } else {
        builder.uri(format!("https://{host}{path}"))
    };
    builder.body(Full::new(body)).unwrap()
}
