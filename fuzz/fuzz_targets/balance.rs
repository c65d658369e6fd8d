//! Fuzzes the balancer: arbitrary bytes as a script of picks, leases,
//! connect results and route updates on one pool, with its properties
//! checked after every step (`mc_proxy::balance::checks`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mc_proxy::balance::checks::exercise(data);
});
