//! A guest that fails is an application failure, not a host failure: the backup replays the same
//! input to the same failure, so both replicas stop with status 4 and say why, the backup never
//! takes the arbiter, and both disks stay where they are.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::{Scratch, agent, tls_for};
use lockstep_testkit::AgentProcess;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A pair of the `fault` guest failing `ms` milliseconds after boot (odd: a panic, even: `ud2`).
fn failing_pair(name: &str, ms: u64) -> (Scratch, AgentProcess, AgentProcess, String) {
    let dir = Scratch::new(name);
    let arbiter = format!("local:{}", dir.path("arbiter").display());
    let tls = tls_for(&dir, "vm").display().to_string();
    let channel = free_port();
    let common = |role: &str| {
        let mut c = agent();
        c.args([role, "--vm-id", "vm", "--arbiter", &arbiter, "--channel-tls", &tls, "--heartbeat-timeout-ms", "1500"])
            .args(["--client-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--name", role]);
        c
    };
    let primary = AgentProcess::spawn(
        "p",
        common("primary")
            .args(["--guest", "fault", "--guest-arg", &ms.to_string()])
            .args(["--channel-listen", &format!("127.0.0.1:{channel}")]),
    );
    primary.wait_line("channel on", Duration::from_secs(30));
    let backup = AgentProcess::spawn(
        "b",
        common("backup")
            .args(["--guest", "fault", "--channel-connect", &format!("127.0.0.1:{channel}")])
            .args(["--channel-listen", &format!("127.0.0.1:{}", free_port())]),
    );
    backup.wait_line("backup in sync", Duration::from_secs(60));
    (dir, primary, backup, arbiter)
}

fn assert_both_failed(mut p: AgentProcess, mut b: AgentProcess, needle: &str) {
    assert_eq!(p.exit_code(Duration::from_secs(60)), Some(4), "the primary's status says: the guest failed");
    assert_eq!(b.exit_code(Duration::from_secs(60)), Some(4), "the backup met the same failure");
    let (pl, bl) = (p.remaining_lines(Duration::from_secs(2)), b.remaining_lines(Duration::from_secs(2)));
    for (who, lines) in [("primary", &pl), ("backup", &bl)] {
        assert!(
            lines.iter().any(|l| l.contains("lockstep-agent: guest failed:") && l.contains(needle)),
            "{who} says why: {lines:#?}"
        );
    }
    assert!(!bl.iter().any(|l| l.contains("going live")), "the backup must not take over a failed guest: {bl:#?}");
}

#[test]
fn a_guest_that_panics_stops_both_replicas_with_status_4_and_the_backup_does_not_take_over() {
    let (dir, p, b, _) = failing_pair("guest-panic", 3001);
    assert_both_failed(p, b, "panicked");
    // Nobody took a new epoch: the arbiter still names the first primary at epoch 1.
    let arbiter = lockstep_arbiter::LocalArbiter::new(dir.path("arbiter"));
    let record = lockstep_agent::pair::arbiter_read(&arbiter).unwrap();
    assert_eq!((record.epoch, record.holder.as_deref()), (1, Some("primary")), "the backup took the arbiter");
}

#[test]
fn a_guest_that_faults_stops_both_replicas_with_status_4() {
    let (_dir, p, b, _) = failing_pair("guest-fault", 3000);
    assert_both_failed(p, b, "#UD invalid opcode");
}
