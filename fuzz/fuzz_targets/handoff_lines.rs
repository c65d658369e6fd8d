//! Fuzzes the handoff's line parsers (the lines a running server and its
//! successor exchange on the handoff socket: `listener`/`quic`/`admin`/
//! `metrics` socket lines, the `server` line and the `flow` lines of
//! carried QUIC flows). The properties, shared with the corpus replay in
//! `make test`, are `mc_proxy::handoff::check_lines`: never a panic, and
//! whatever parses writes a line that parses back to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| mc_proxy::handoff::check_lines(data));
