//! Fuzzes the admin Unix socket's `:authority` rewriter (HTTP/2 frames and
//! HPACK blocks from a client). The properties, shared with the corpus
//! replay in `make test`, are in `wire::authority::checks`: beyond "never
//! panics", any chunking of the input gives the output and error of one
//! call, and the output is accepted and left unchanged by a second pass.
#![no_main]

use libfuzzer_sys::fuzz_target;

use wire::authority::checks;

fuzz_target!(|data: &[u8]| checks::check(data));
