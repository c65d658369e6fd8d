//! Fuzzes the ClientHello reader. The properties, shared with the corpus
//! replay in `make test`, are in `wire::hello::checks`: beyond "never
//! panics", feeding the input in arbitrary chunks gives the same answer as
//! one call on the whole input, every strict prefix of a hello is
//! `NeedMore`, re-framing the same handshake message into other record
//! sizes gives the same SNI and ALPN, and bytes after `record_len` change
//! nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::hello::checks;

fuzz_target!(|data: &[u8]| checks::check(data));
