//! Fuzzes the admin Unix socket's `:authority` rewriter (HTTP/2 frames and
//! HPACK blocks from a client). The properties, shared with the corpus
//! replay in `make test`, are in `fuzz/checks/authority.rs`: beyond "never
//! panics", any chunking of the input gives the output and error of one
//! call, and the output is accepted and left unchanged by a second pass.
#![no_main]

use libfuzzer_sys::fuzz_target;

// Included by path (without its tokio/tonic socket side, `cfg(fuzzing)`)
// so the fuzz build needs only the rewriter's own dependencies.
#[path = "../../src/admin/authority.rs"]
#[allow(dead_code)]
mod authority;

#[path = "../checks/authority.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check(data));
