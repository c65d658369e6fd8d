//! Fuzzes the L7 request side: arbitrary bytes as a client sends them after
//! the TLS handshake (first byte: HTTP/1.1 or HTTP/2), through the same
//! hyper server settings and request phases as a real L7 connection
//! (`mc_proxy::proxy::http::harness`). Never a panic, never a hang (the
//! harness panics if the server has not finished within 5 s).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mc_proxy::proxy::http::harness::exercise(data);
});
