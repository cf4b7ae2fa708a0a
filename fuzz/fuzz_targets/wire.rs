//! cargo-fuzz target `wire`: see `lockstep_fuzz_harness::wire`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lockstep_fuzz_harness::wire(data));
