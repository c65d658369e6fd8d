//! Hand-built ClientHellos, without dependencies, so that the integration
//! tests (through `common`), the criterion benches and the loopback
//! benchmark tool share one builder (the `testing` feature, which the main
//! crate's dev-dependency turns on).

/// A minimal but well-formed TLS 1.3 ClientHello handshake message (type,
/// length, body) with the given SNI and `padding` bytes of padding extension.
pub fn hello_message(sni: Option<&str>, padding: usize) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[0x03, 0x03]);
    body.extend_from_slice(&[7u8; 32]);
    body.push(32);
    body.extend_from_slice(&[9u8; 32]);
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
    body.extend_from_slice(&[0x01, 0x00]);
    let mut extensions = Vec::new();
    if let Some(name) = sni {
        let name = name.as_bytes();
        let mut data = Vec::new();
        data.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        data.push(0);
        data.extend_from_slice(&(name.len() as u16).to_be_bytes());
        data.extend_from_slice(name);
        extensions.extend_from_slice(&[0x00, 0x00]);
        extensions.extend_from_slice(&(data.len() as u16).to_be_bytes());
        extensions.extend_from_slice(&data);
    }
    // supported_versions: TLS 1.3
    extensions.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    if padding > 0 {
        extensions.extend_from_slice(&[0x00, 0x15]);
        extensions.extend_from_slice(&(padding as u16).to_be_bytes());
        extensions.extend(std::iter::repeat_n(0u8, padding));
    }
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut message = vec![0x01];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

/// Frames a handshake message into TLS records of at most `size` bytes each.
pub fn records(message: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// A one-record ClientHello.
pub fn client_hello(sni: Option<&str>) -> Vec<u8> {
    records(&hello_message(sni, 0), 16384)
}
