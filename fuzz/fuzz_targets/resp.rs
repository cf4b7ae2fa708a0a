//! cargo-fuzz target `resp`: see `lockstep_fuzz_harness::resp`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lockstep_fuzz_harness::resp(data));
