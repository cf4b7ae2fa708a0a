//! Separate OS processes race for the same epochs of one local arbiter file; exactly one wins each.
//!
//! The test re-executes its own binary: `racer_child_process` does the racing when the environment
//! variable `LOCKSTEP_RACE_DIR` is set (only by the parent below) and returns at once otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_arbiter::{Arbiter, LocalArbiter, Outcome};

const PROCESSES: usize = 6;
const ROUNDS: u64 = 4;

fn go_file(dir: &Path, round: u64) -> PathBuf {
    dir.join(format!("go-{round}"))
}

#[test]
fn racer_child_process() {
    let (Ok(dir), Ok(id)) = (std::env::var("LOCKSTEP_RACE_DIR"), std::env::var("LOCKSTEP_RACE_ID")) else {
        return; // not started by the parent test: nothing to do
    };
    let dir = PathBuf::from(dir);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let arbiter = LocalArbiter::new(dir.join("vm.arbiter"));
    for round in 0..ROUNDS {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Spin on the start signal so that all processes hit the lock at about the same moment.
        while !go_file(&dir, round).exists() {
            assert!(Instant::now() < deadline, "parent never started round {round}");
            std::thread::sleep(Duration::from_micros(200));
        }
        let outcome = rt.block_on(arbiter.try_take(round, &id)).unwrap();
        match outcome {
            Outcome::Won { epoch } => println!("RESULT round={round} won epoch={epoch}"),
            Outcome::Lost { epoch, .. } => println!("RESULT round={round} lost epoch={epoch}"),
        }
    }
}

#[test]
fn processes_race_exactly_one_winner_per_epoch() {
    if std::env::var("LOCKSTEP_RACE_DIR").is_ok() {
        return; // we are a child
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| {
            Command::new(&exe)
                .args(["--exact", "racer_child_process", "--nocapture", "--test-threads=1"])
                .env("LOCKSTEP_RACE_DIR", dir.path())
                .env("LOCKSTEP_RACE_ID", format!("proc-{i}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Give the children time to start and spin, then release round after round.
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..ROUNDS {
        std::fs::write(go_file(dir.path(), round), b"").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut wins = vec![0usize; ROUNDS as usize];
    let mut results = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        // libtest prints "test name ... " on the same line as the first result, so search in the line.
        for line in stdout.lines().filter_map(|l| l.find("RESULT ").map(|i| &l[i + "RESULT ".len()..])) {
            results += 1;
            let round: usize = line.split_whitespace().next().unwrap()["round=".len()..].parse().unwrap();
            if line.contains(" won ") {
                wins[round] += 1;
            }
        }
    }
    assert_eq!(results, PROCESSES * ROUNDS as usize, "every child reports every round");
    assert_eq!(wins, vec![1; ROUNDS as usize], "exactly one winner per epoch");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let record = rt.block_on(LocalArbiter::new(dir.path().join("vm.arbiter")).read()).unwrap();
    assert_eq!(record.epoch, ROUNDS);
}
