//! Fuzzes the ClientHello reader. The properties, shared with the corpus
//! replay in `make test`, are in `fuzz/checks/hello.rs`: beyond "never
//! panics", feeding the input in arbitrary chunks gives the same answer as
//! one call on the whole input, every strict prefix of a hello is
//! `NeedMore`, re-framing the same handshake message into other record
//! sizes gives the same SNI and ALPN, and bytes after `record_len` change
//! nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Included by path so the fuzz build needs none of the main crate's dependencies.
#[path = "../../src/hello.rs"]
mod hello;

#[path = "../checks/hello.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check(data));
