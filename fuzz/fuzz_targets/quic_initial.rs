//! Fuzzes the QUIC Initial reader. The properties, shared with the corpus
//! replay in `make test`, are in `wire::quic::checks`: the input is a list
//! of datagrams, read both as they are and as the plaintext frames of
//! Initials the checks encrypt (so the fuzzer reaches the frames, the
//! CRYPTO reassembly and the ClientHello behind AES-GCM). Beyond "never
//! panics": a known answer is repeated, a skipped datagram changes
//! nothing, other orders of the datagrams give the same answer once all
//! are in, v1 and v2 answer alike, coalescing changes nothing, a cut or
//! altered datagram never gives another SNI, and a hello re-encrypted
//! differently reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::quic::checks;

fuzz_target!(|data: &[u8]| checks::check(data));
