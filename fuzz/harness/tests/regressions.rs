//! Replays every input under `fuzz/regressions/<target>/` (crashes the fuzzer found, minimized,
//! kept so they stay fixed) and every seed under `fuzz/corpus/<target>/` through the fuzz
//! targets' own bodies.

use std::path::{Path, PathBuf};

use lockstep_fuzz_harness::TARGETS;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.is_file() && !p.ends_with(".gitkeep")).collect();
    files.sort();
    files
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn replay(kind: &str) -> usize {
    let mut n = 0;
    for (target, body) in TARGETS {
        for file in inputs(&fuzz_dir().join(kind).join(target)) {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
            let outcome = std::panic::catch_unwind(|| body(&data));
            assert!(outcome.is_ok(), "{target} fails on {} (see the panic above)", file.display());
            n += 1;
        }
    }
    n
}

#[test]
fn every_kept_crash_stays_fixed() {
    let n = replay("regressions");
    eprintln!("replayed {n} regression inputs");
}

#[test]
fn every_seed_passes() {
    let n = replay("corpus");
    assert!(n >= TARGETS.len(), "each target has seeds in fuzz/corpus (found {n} files)");
}

#[test]
fn every_target_has_a_regressions_directory() {
    for (target, _) in TARGETS {
        let dir = fuzz_dir().join("regressions").join(target);
        assert!(dir.is_dir(), "{} is missing: scripts/fuzz keeps crashes there", dir.display());
    }
}
