//! cargo-fuzz target `log_codec`: see `lockstep_fuzz_harness::log_codec`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lockstep_fuzz_harness::log_codec(data));
