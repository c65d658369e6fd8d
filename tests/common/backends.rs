//! Real backends on loopback: a TLS backend that says who it is and echoes,
//! and a raw TCP backend that records what it got.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use super::pki::Pki;

/// A TLS backend that says who it is: after the handshake it writes
/// `backend=NAME\n`, then echoes everything it reads until EOF.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub accepted: Arc<AtomicUsize>,
}

pub async fn tls_backend(pki: &Pki, name: &str, hostnames: &[&str]) -> TlsBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(pki.server_config(hostnames));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let label = name.to_string();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            // Without it, small echoes wait ~40 ms for delayed ACKs (Nagle).
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let label = label.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                if tls
                    .write_all(format!("backend={label}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tls.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsBackend {
        addr,
        name: name.to_string(),
        accepted,
    }
}

/// A raw TCP backend that records every byte of each connection until the
/// client's FIN, then optionally replies and closes.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub received: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl RawBackend {
    /// The bytes of the next connection that ended (the client's FIN),
    /// within 20 s.
    pub async fn next(&mut self) -> Vec<u8> {
        tokio::time::timeout(std::time::Duration::from_secs(20), self.received.recv())
            .await
            .expect("backend got no connection in time")
            .expect("backend channel closed")
    }
}

pub async fn raw_backend(reply: &'static [u8]) -> RawBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let (tx, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let _ = stream.read_to_end(&mut all).await;
                let _ = stream.write_all(reply).await;
                let _ = stream.shutdown().await;
                let _ = tx.send(all);
            });
        }
    });
    RawBackend {
        addr,
        accepted,
        received,
    }
}

/// An echo backend for raw bytes: reads the hello record (its 5-byte
/// header and the length it names), then echoes everything after it until
/// EOF.
pub async fn raw_echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let mut header = [0u8; 5];
                if r.read_exact(&mut header).await.is_err() {
                    return;
                }
                let len = u16::from_be_bytes([header[3], header[4]]) as usize;
                let mut hello = vec![0u8; len];
                if r.read_exact(&mut hello).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// What most tests start with: a temp dir, a test CA and a [`tls_backend`]
/// called `name` for `hostnames`.
pub async fn tls_scene(name: &str, hostnames: &[&str]) -> (tempfile::TempDir, Pki, TlsBackend) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("test CA");
    let backend = tls_backend(&pki, name, hostnames).await;
    (dir, pki, backend)
}

/// [`tls_scene`] with backends "A" and "B", both for `hostnames`.
pub async fn tls_scene_ab(hostnames: &[&str]) -> (tempfile::TempDir, Pki, TlsBackend, TlsBackend) {
    let (dir, pki, a) = tls_scene("A", hostnames).await;
    let b = tls_backend(&pki, "B", hostnames).await;
    (dir, pki, a, b)
}
