//! gRPC over the admin Unix socket with every mainstream client's default
//! `:authority` (SPEC §6.1): `localhost` (grpc-go, grpcurl), the
//! percent-encoded socket path (gRPC C-core since 1.57: Python, C++, Ruby,
//! PHP), the raw path (grpc-java), and none. Against the real binary.
//!
//! The raw cases speak HTTP/2 by hand (preface, SETTINGS, HEADERS with a
//! hand-encoded HPACK block, DATA) so the authority is exactly what a given
//! client sends; one connection also references its own dynamic-table
//! entries in a second request. The last test runs real Python grpcio with
//! default options (`grpc.insecure_channel("unix:" + path)`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use mc_proxy::admin::proto;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use wire::authority::build::frame;
use wire::authority::PREFACE;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const GET_STATUS: &str = "/mc_proxy.v1.ProxyAdminService/GetStatus";
const LIMIT: Duration = Duration::from_secs(10);

/// The server, with one listener on port 0 (its config text, which the
/// admin API names it by, is returned).
fn start(dir: &Path) -> (Proxy, String) {
    let listener = "127.0.0.1:0".to_string();
    let proxy = Proxy::start(dir, &admin_config(dir, &listener_toml(&listener, &[])));
    (proxy, listener)
}

/// The authorities the clients send for `unix:PATH`.
fn percent_encoded(path: &Path) -> String {
    let path = path.display().to_string();
    path.trim_start_matches('/').replace('/', "%2F")
}

fn hpack_string(s: &[u8], out: &mut Vec<u8>) {
    loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out).unwrap();
    out.extend_from_slice(s);
}

/// A gRPC unary request's header fields.
fn request_fields(path: &str, authority: Option<&str>) -> Vec<(String, String)> {
    let mut fields = vec![
        (":method".to_string(), "POST".to_string()),
        (":scheme".to_string(), "http".to_string()),
        (":path".to_string(), path.to_string()),
    ];
    if let Some(authority) = authority {
        fields.push((":authority".to_string(), authority.to_string()));
    }
    fields.push(("content-type".to_string(), "application/grpc".to_string()));
    fields.push(("te".to_string(), "trailers".to_string()));
    fields.push(("user-agent".to_string(), "raw-h2-test/1".to_string()));
    fields
}

/// HPACK block of literals with a new name: `prefix` 0x00 = without
/// indexing, 0x40 = with incremental indexing (each field enters the
/// receiver's dynamic table).
fn literal_block(fields: &[(String, String)], prefix: u8) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(prefix);
        hpack_string(name.as_bytes(), &mut block);
        hpack_string(value.as_bytes(), &mut block);
    }
    block
}

/// The block that names each of `count` fields by its dynamic-table index,
/// after a block that inserted exactly those fields (newest = 62).
fn indexed_block(count: usize) -> Vec<u8> {
    (0..count)
        .map(|i| 0x80 | (62 + count - 1 - i) as u8)
        .collect()
}

/// What came back on one stream.
#[derive(Debug, Default)]
struct Answer {
    headers: Vec<(String, String)>,
    trailers: Vec<(String, String)>,
    body: Vec<u8>,
    reset: Option<u32>,
    goaway: Option<u32>,
}

impl Answer {
    fn field(&self, list: &[(String, String)], name: &str) -> Option<String> {
        list.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }

    /// `:status` 200 and `grpc-status` 0 (in the trailers, or in the
    /// headers of a trailers-only answer), then the one message.
    fn message(&self) -> Vec<u8> {
        assert_eq!(self.reset, None, "stream reset: {self:?}");
        assert_eq!(self.goaway, None, "connection refused: {self:?}");
        assert_eq!(
            self.field(&self.headers, ":status").as_deref(),
            Some("200"),
            "{self:?}"
        );
        let grpc_status = self
            .field(&self.trailers, "grpc-status")
            .or_else(|| self.field(&self.headers, "grpc-status"));
        assert_eq!(grpc_status.as_deref(), Some("0"), "{self:?}");
        assert!(self.body.len() >= 5, "no gRPC message: {self:?}");
        assert_eq!(self.body[0], 0, "compressed message: {self:?}");
        let len = u32::from_be_bytes([self.body[1], self.body[2], self.body[3], self.body[4]]);
        assert_eq!(self.body.len(), 5 + len as usize, "{self:?}");
        self.body[5..].to_vec()
    }

    fn status(&self) -> proto::GetStatusResponse {
        proto::GetStatusResponse::decode(&self.message()[..]).expect("a GetStatusResponse")
    }
}

/// A hand-driven HTTP/2 client connection on the admin socket.
struct RawH2 {
    socket: UnixStream,
    decoder: loona_hpack::Decoder<'static>,
    pending: Vec<u8>,
}

impl RawH2 {
    async fn connect(path: &Path) -> RawH2 {
        let mut socket = UnixStream::connect(path).await.unwrap();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        socket.write_all(&hello).await.unwrap();
        RawH2 {
            socket,
            decoder: loona_hpack::Decoder::new(),
            pending: Vec::new(),
        }
    }

    /// The next frame, or `None` at EOF.
    async fn read_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            if self.pending.len() >= 9 {
                let p = &self.pending;
                let len = usize::from(p[0]) << 16 | usize::from(p[1]) << 8 | usize::from(p[2]);
                if p.len() >= 9 + len {
                    let stream = u32::from_be_bytes([p[5], p[6], p[7], p[8]]) & 0x7fff_ffff;
                    let frame = (p[3], p[4], stream, p[9..9 + len].to_vec());
                    self.pending.drain(..9 + len);
                    return Some(frame);
                }
            }
            let mut buf = [0u8; 16 * 1024];
            let n = tokio::time::timeout(LIMIT, self.socket.read(&mut buf))
                .await
                .expect("the server answers within the limit")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Sends one unary call (`block` = its HPACK header block, `message`
    /// the protobuf request) on `stream` and collects the answer.
    async fn call(&mut self, stream: u32, block: &[u8], message: &[u8]) -> Answer {
        let mut out = frame(HEADERS, END_HEADERS, stream, block);
        let mut body = vec![0u8];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        out.extend(frame(DATA, END_STREAM, stream, &body));
        self.socket.write_all(&out).await.unwrap();

        let mut answer = Answer::default();
        let mut block: Option<Vec<u8>> = None;
        while let Some((kind, flags, id, payload)) = self.read_frame().await {
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    self.socket
                        .write_all(&frame(SETTINGS, ACK, 0, &[]))
                        .await
                        .unwrap();
                }
                PING if flags & ACK == 0 => {
                    self.socket
                        .write_all(&frame(PING, ACK, 0, &payload))
                        .await
                        .unwrap();
                }
                GOAWAY => {
                    answer.goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                    return answer;
                }
                RST_STREAM if id == stream => {
                    answer.reset = Some(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                    return answer;
                }
                HEADERS | CONTINUATION if id == stream => {
                    block
                        .get_or_insert_with(Vec::new)
                        .extend_from_slice(&payload);
                    if flags & END_HEADERS != 0 {
                        let raw = block.take().unwrap();
                        let fields: Vec<(String, String)> = self
                            .decoder
                            .decode(&raw)
                            .expect("the server's header block decodes")
                            .into_iter()
                            .map(|(n, v)| {
                                (
                                    String::from_utf8_lossy(&n).into_owned(),
                                    String::from_utf8_lossy(&v).into_owned(),
                                )
                            })
                            .collect();
                        if answer.headers.is_empty() {
                            answer.headers = fields;
                        } else {
                            answer.trailers = fields;
                        }
                    }
                    if kind == HEADERS && flags & END_STREAM != 0 {
                        return answer;
                    }
                }
                DATA if id == stream => {
                    answer.body.extend_from_slice(&payload);
                    if flags & END_STREAM != 0 {
                        return answer;
                    }
                }
                _ => {}
            }
        }
        panic!("connection closed before the answer: {answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_clients_authority_gets_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, listener) = start(dir.path());
    let socket = proxy.admin_socket();
    let pct = percent_encoded(&socket);
    let raw = socket.display().to_string();
    assert!(pct.contains("%2F") && raw.starts_with('/'));
    let cases: [(&str, Option<&str>); 4] = [
        ("grpc-go, grpcurl", Some("localhost")),
        ("gRPC C-core (Python, C++, Ruby, PHP)", Some(&pct)),
        ("grpc-java", Some(&raw)),
        ("no :authority", None),
    ];
    for (client, authority) in cases {
        let mut conn = RawH2::connect(&socket).await;
        let block = literal_block(&request_fields(GET_STATUS, authority), 0x00);
        let answer = conn.call(1, &block, &[]).await;
        let status = answer.status();
        assert!(
            status.version.starts_with("mc-proxy "),
            "{client}: {status:?}"
        );
        assert_eq!(
            status
                .listeners
                .iter()
                .map(|l| l.addr.as_str())
                .collect::<Vec<_>>(),
            [listener.as_str()],
            "{client}"
        );
    }
    assert!(
        !proxy
            .log_text()
            .contains("closing a unix-socket connection"),
        "{}",
        proxy.log_text()
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_may_reference_the_first_ones_dynamic_table_entries() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, listener) = start(dir.path());
    let socket = proxy.admin_socket();
    let pct = percent_encoded(&socket);
    let mut conn = RawH2::connect(&socket).await;

    // Stream 1 puts every field (the C-core authority among them) in the
    // dynamic table; stream 3 is nothing but indices into it; stream 5
    // mixes an index (:method) with new literals for a different call.
    let fields = request_fields(GET_STATUS, Some(&pct));
    let first = conn.call(1, &literal_block(&fields, 0x40), &[]).await;
    assert!(first.status().version.starts_with("mc-proxy "));
    let second = conn.call(3, &indexed_block(fields.len()), &[]).await;
    assert!(second.status().version.starts_with("mc-proxy "));

    let list = request_fields("/mc_proxy.v1.ProxyAdminService/ListRoutes", Some(&pct));
    let mut block = indexed_block(fields.len())[..1].to_vec(); // :method POST, by index
    block.extend(literal_block(&list[1..], 0x00));
    let request = proto::ListRoutesRequest {
        listener_addr: listener.clone(),
    }
    .encode_to_vec();
    let third = conn.call(5, &block, &request).await;
    let routes = proto::ListRoutesResponse::decode(&third.message()[..]).unwrap();
    assert!(routes.routes.is_empty(), "{routes:?}");
    proxy.stop();
}

/// Real Python grpcio with default options: GetStatus, AddRoute (then the
/// row on disk), ListRoutes and the standard health service.
#[test]
fn python_grpcio_with_default_options() {
    let strict = std::env::var_os("MC_PROXY_TEST_STRICT").is_some();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/grpc_unix_interop.py");
    let dir = tempfile::tempdir().unwrap();
    let (proxy, listener) = start(dir.path());
    let socket = proxy.admin_socket();
    let output = match Command::new("python3")
        .arg(&script)
        .arg(&socket)
        .args([listener.as_str(), "py.test", "127.0.0.1:9"])
        .output()
    {
        Ok(output) => output,
        Err(err) => {
            assert!(!strict, "cannot run python3: {err}");
            eprintln!("SKIPPED python_grpcio_with_default_options: cannot run python3: {err}");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(3) {
        assert!(!strict, "Python grpcio is not installed: {stderr}");
        eprintln!(
            "SKIPPED python_grpcio_with_default_options: {stderr}\n\
             (install it: python3 -m pip install grpcio grpcio-tools; .ci/run does)"
        );
        return;
    }
    assert!(
        output.status.success(),
        "python grpcio failed ({}): {stderr}\nserver log:\n{}",
        output.status,
        proxy.log_text()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    eprintln!("python grpcio answered: {result}");
    assert!(
        result["version"].as_str().unwrap().starts_with("mc-proxy "),
        "{result}"
    );
    assert_eq!(result["listeners"], serde_json::json!([listener]));
    assert_eq!(result["created"], serde_json::json!(true));
    assert_eq!(
        result["routes"],
        serde_json::json!([[listener, "py.test", "127.0.0.1:9"]])
    );
    // SERVING = 1, for the server and for the admin service.
    assert_eq!(
        result["health"],
        serde_json::json!({"(server)": 1, "mc_proxy.v1.ProxyAdminService": 1})
    );
    assert_eq!(
        db_routes(&proxy.db()),
        [(
            listener.clone(),
            "py.test".to_string(),
            "127.0.0.1:9".to_string()
        )]
    );
    proxy.stop();
}
