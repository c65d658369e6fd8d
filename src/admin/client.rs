//! The admin API client the CLI uses: a unix socket, or TCP with TLS
//! (server verified against `ca_cert`, optional client certificate).
//!
//! Owns: turning a [`ClientTarget`] into a connected channel, and the text
//! of connection failures. Connects eagerly, so an unreachable server is
//! reported before any call is made.

use std::error::Error as StdError;
use std::io;
use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::proto::proxy_admin_service_client::ProxyAdminServiceClient;
use crate::config::{AdminAddr, ClientTls};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response the client decodes (a big route table fits easily).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Where and how the CLI reaches a running server.
#[derive(Debug, Clone)]
pub struct ClientTarget {
    pub addr: AdminAddr,
    pub tls: ClientTls,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The client's own settings are unusable (missing or unreadable TLS
    /// files): a configuration error.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or the connection failed.
    #[error("cannot reach admin API at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
}

impl ClientError {
    /// The process exit status for this failure (README, "Command line"):
    /// 2 for configuration, 1 for runtime.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Config(_) => 2,
            ClientError::Unreachable { .. } => 1,
        }
    }
}

/// Connects to the admin service.
pub async fn connect(
    addr: &AdminAddr,
    tls: &ClientTls,
) -> Result<ProxyAdminServiceClient<Channel>, ClientError> {
    let channel = channel(addr, tls).await?;
    Ok(ProxyAdminServiceClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES))
}

/// A connected channel, for any service on the admin server (health,
/// reflection, the admin service).
pub async fn channel(addr: &AdminAddr, tls: &ClientTls) -> Result<Channel, ClientError> {
    let unreachable = |err: &dyn StdError| ClientError::Unreachable {
        addr: addr.to_string(),
        reason: error_chain(err),
    };
    match addr {
        AdminAddr::Unix(path) => {
            let endpoint = Endpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT);
            let path = path.clone();
            endpoint
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let stream =
                            tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
                                .await
                                .map_err(|_| {
                                    io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
                                })??;
                        Ok::<_, io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(|e| unreachable(&e))
        }
        AdminAddr::Tcp(socket) => {
            let tls_config = client_tls_config(&socket.ip().to_string(), tls)?;
            let endpoint = Endpoint::from_shared(format!("https://{socket}"))
                .map_err(|e| unreachable(&e))?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .tls_config(tls_config)
                .map_err(|e| {
                    ClientError::Config(format!("admin client TLS: {}", error_chain(&e)))
                })?;
            endpoint.connect().await.map_err(|e| unreachable(&e))
        }
    }
}

/// TLS for the CLI: verify the server against `ca_cert` under the name
/// `server_name` (the IP it is reached at, so the server certificate needs
/// that IP in its SANs); present `client_cert`/`client_key` when set.
fn client_tls_config(server_name: &str, tls: &ClientTls) -> Result<ClientTlsConfig, ClientError> {
    let ca_path = tls.ca_cert.as_deref().ok_or_else(|| {
        ClientError::Config(
            "grpc.ca_cert: required to verify the admin server over TCP (or pass --ca-cert)".into(),
        )
    })?;
    let mut config = ClientTlsConfig::new()
        .domain_name(server_name)
        .ca_certificate(Certificate::from_pem(read("ca_cert", ca_path)?));
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            config = config.identity(Identity::from_pem(
                read("client_cert", cert)?,
                read("client_key", key)?,
            ));
        }
        (Some(_), None) => {
            return Err(ClientError::Config(
                "grpc.client_key: required when client_cert is set".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(ClientError::Config(
                "grpc.client_cert: required when client_key is set".into(),
            ))
        }
        (None, None) => {}
    }
    Ok(config)
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::Config(format!("grpc.{field}: {}: {e}", path.display())))
}

/// An error and its sources as one line, repeated texts and tonic's bare
/// "transport error" dropped.
pub fn error_chain(err: &dyn StdError) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(err) = next {
        let text = err.to_string();
        if !text.is_empty() && text != "transport error" && !parts.iter().any(|p| p.contains(&text))
        {
            parts.push(text);
        }
        next = err.source();
    }
    if parts.is_empty() {
        return "transport error".into();
    }
    parts.join(": ").replace('\n', " ")
}
