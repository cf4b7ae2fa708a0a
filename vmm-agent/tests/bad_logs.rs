//! Damaged logs are refused with a clear error and a non-zero exit, never a panic.

mod common;

use common::*;

fn recorded(dir: &Scratch) -> (std::path::PathBuf, Vec<u8>) {
    let log = dir.path("idle.log");
    let out = agent()
        .args([
            "run",
            "--guest",
            "idle",
            "--stop-after-exits",
            "200",
            "--digest-interval",
            "50",
            "--client-listen",
            "127.0.0.1:0",
            "--record",
        ])
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&log).unwrap();
    assert!(replay(&log, None).status.success(), "the undamaged log must replay");
    (log, bytes)
}

fn replay_fails(dir: &Scratch, bytes: &[u8]) -> String {
    let bad = dir.path("bad.log");
    std::fs::write(&bad, bytes).unwrap();
    let out = replay(&bad, None);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a damaged log replayed successfully");
    assert_eq!(out.status.code(), Some(1), "expected a clean error exit, got {:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "the agent panicked: {err}");
    assert!(err.contains("lockstep-agent: error:"), "{err}");
    err
}

#[test]
fn flipping_any_byte_is_detected() {
    let dir = Scratch::new("flip");
    let (_, bytes) = recorded(&dir);
    // Every 7th byte across header and body, plus the very last one.
    let mut positions: Vec<usize> = (0..bytes.len()).step_by(7).collect();
    positions.push(bytes.len() - 1);
    for pos in positions {
        let mut b = bytes.clone();
        b[pos] ^= 0x01;
        let err = replay_fails(&dir, &b);
        assert!(
            [
                "CRC",
                "corrupt",
                "diverged",
                "magic",
                "version",
                "truncated",
                "too",
                "header",
                "different build",
                "cut short",
                "length",
                "allowed"
            ]
            .iter()
            .any(|w| err.contains(w)),
            "byte {pos}: unclear error: {err}"
        );
    }
}

#[test]
fn truncated_log_is_refused() {
    let dir = Scratch::new("trunc");
    let (_, bytes) = recorded(&dir);
    let err = replay_fails(&dir, &bytes[..bytes.len() - 5]);
    assert!(err.contains("truncated"), "{err}");
    // Cut exactly at a block boundary is caught too: the end record (in a block of its own at
    // exit 200) is missing.
    let end_block =
        lockstep_agent::record::encode_block(&[(200, lockstep_agent::record::Entry::End { digest: [0; 32] })]);
    let err = replay_fails(&dir, &bytes[..bytes.len() - end_block.len()]);
    assert!(err.contains("cut short"), "{err}");
}

#[test]
fn wrong_version_and_wrong_guest_are_refused() {
    let dir = Scratch::new("version");
    let (_, bytes) = recorded(&dir);
    let mut v = bytes.clone();
    v[8] = 9;
    assert!(replay_fails(&dir, &v).contains("version 9 is not supported"));
    assert!(replay_fails(&dir, b"this is not a log at all").contains("magic"));
    assert!(replay_fails(&dir, b"").contains("magic"));
}
