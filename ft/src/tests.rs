//! Unit tests: feed the machines messages directly and check what they say.

use crate::wire::{LogEntry, Message, PROTOCOL_VERSION, RefuseReason, Role};
use crate::*;

const MS: Nanos = MILLIS;

fn cfg() -> FtConfig {
    FtConfig { flush_interval: 0, output_frames_in_flight: usize::MAX, ..FtConfig::default() }
}

fn id() -> VmIdentity {
    VmIdentity { vm_id: "ns/kv".into(), guest_image: [3; 32] }
}

fn geo() -> VmGeometry {
    VmGeometry { memory_bytes: 1 << 20, disk_bytes: 4096, page_size: 4096 }
}

fn hello(vm_id: &str, epoch: u64) -> Message {
    Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        vm_id: vm_id.into(),
        epoch,
        role: Role::Backup,
        guest_image: [3; 32],
    }
}

fn entry(exit: u64, n: usize) -> LogEntry {
    LogEntry { exit, bytes: vec![exit as u8; n] }
}

fn deliver_to_backup(ready: Ready, b: &mut Backup, now: Nanos) {
    for m in ready.messages {
        b.step(m, now).unwrap();
    }
}

fn deliver_to_primary(ready: Ready, p: &mut Primary, now: Nanos) {
    for m in ready.messages {
        p.step(m, now).unwrap();
    }
}

/// A primary and a backup synced by a one-round clone at exit `at`.
fn synced_pair(cfg: FtConfig, at: u64) -> (Primary, Backup) {
    let mut p = Primary::new(cfg.clone(), id(), geo(), 1, at, 0);
    let mut b = Backup::new(cfg, id(), 1, 0);
    deliver_to_primary(b.take_ready(), &mut p, 0);
    p.clone_pages(vec![(0, vec![1; 16])]).unwrap();
    p.clone_round_done(0, 0).unwrap();
    p.clone_final(at, vec![1], vec![2], 0).unwrap();
    deliver_to_backup(p.take_ready(), &mut b, 0);
    b.take_ready();
    assert_eq!(p.state(), PrimaryState::Protected);
    assert_eq!(b.state(), BackupState::Replaying);
    (p, b)
}

fn refusal(r: &Ready) -> Option<RefuseReason> {
    r.messages.iter().find_map(|m| match m {
        Message::Refuse { reason } => Some(reason.clone()),
        _ => None,
    })
}

// ----- handshake -----

#[test]
fn primary_refuses_wrong_vm_stale_epoch_version_role_image() {
    type Expect = fn(&RefuseReason) -> bool;
    let cases: Vec<(Message, Expect)> = vec![
        (hello("ns/other", 1), |r| matches!(r, RefuseReason::WrongVmId { .. })),
        (hello("ns/kv", 0), |r| matches!(r, RefuseReason::StaleEpoch { current: 1, got: 0 })),
        (
            Message::Hello {
                protocol_version: PROTOCOL_VERSION + 1,
                vm_id: "ns/kv".into(),
                epoch: 1,
                role: Role::Backup,
                guest_image: [3; 32],
            },
            |r| matches!(r, RefuseReason::IncompatibleVersion { .. }),
        ),
        (
            Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                vm_id: "ns/kv".into(),
                epoch: 1,
                role: Role::Primary,
                guest_image: [3; 32],
            },
            |r| matches!(r, RefuseReason::WrongRole { got: Role::Primary }),
        ),
        (
            Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                vm_id: "ns/kv".into(),
                epoch: 1,
                role: Role::Backup,
                guest_image: [4; 32],
            },
            |r| matches!(r, RefuseReason::GuestImageMismatch),
        ),
    ];
    for (msg, ok) in cases {
        let mut p = Primary::new(cfg(), id(), geo(), 1, 0, 0);
        p.step(msg.clone(), 0).unwrap();
        let r = p.take_ready();
        let reason = refusal(&r).unwrap_or_else(|| panic!("{msg:?} was not refused"));
        assert!(ok(&reason), "{msg:?} refused with {reason:?}");
        assert!(r.close_channel);
        assert!(r.clone_actions.is_empty(), "no clone for a refused peer");
        assert_eq!(p.state(), PrimaryState::Solo, "a refusal does not change the primary");
        // The reason explains itself to an operator.
        assert!(!reason.to_string().is_empty());
    }
}

#[test]
fn hello_with_newer_epoch_makes_the_primary_ask_the_arbiter_and_stop_releasing() {
    let mut p = Primary::new(cfg(), id(), geo(), 1, 0, 0);
    p.step(hello("ns/kv", 2), 0).unwrap();
    let r = p.take_ready();
    assert!(matches!(refusal(&r), Some(RefuseReason::PeerEpochNewer { current: 1, got: 2 })));
    assert_eq!(r.consult_arbiter, Some(ConsultArbiter { seen_epoch: 1 }));
    p.hold_output(5, OutputId(1), 0);
    assert!(p.take_ready().released.is_empty(), "no release while our epoch is in doubt");
    p.arbiter_result(ArbiterOutcome::Lost { winner: "b".into(), epoch: 2 }, 0);
    let r = p.take_ready();
    assert_eq!(r.discarded, vec![OutputId(1)]);
    assert_eq!(p.state(), PrimaryState::Halted);
}

#[test]
fn second_hello_on_an_attached_channel_is_a_violation() {
    // Cloning: the clone is abandoned (that backup never got state).
    let mut p = Primary::new(cfg(), id(), geo(), 1, 0, 0);
    p.step(hello("ns/kv", 1), 0).unwrap();
    p.take_ready();
    assert!(matches!(p.step(hello("ns/kv", 1), 0), Err(FtError::Protocol(_))));
    let r = p.take_ready();
    assert!(r.close_channel);
    assert_eq!(r.clone_actions, vec![CloneAction::Abort]);
    assert_eq!(p.state(), PrimaryState::Solo);
    // Protected: the backup is suspect, the arbiter decides.
    let (mut p, _b) = synced_pair(cfg(), 0);
    assert!(p.step(hello("ns/kv", 1), 1).is_err());
    let r = p.take_ready();
    assert!(r.role_events.contains(&RoleEvent::Suspecting(Suspicion::ProtocolViolation)));
    assert!(r.consult_arbiter.is_some());
}

#[test]
fn consulting_primary_takes_no_new_backup() {
    let (mut p, _b) = synced_pair(cfg(), 0);
    p.peer_disconnected(1);
    p.take_ready();
    p.step(hello("ns/kv", 1), 2).unwrap();
    let r = p.take_ready();
    assert!(matches!(refusal(&r), Some(RefuseReason::NotPrimary)));
    assert_eq!(p.state(), PrimaryState::Consulting);
}

#[test]
fn a_held_output_past_the_last_frame_flushes_at_once() {
    let c = FtConfig { flush_interval: 1_000 * MS, batch_bytes: usize::MAX, ..cfg() };
    let (mut p, _b) = synced_pair(c, 0);
    p.hold_output(1, OutputId(1), 0);
    p.exit_complete(1, 0);
    assert!(matches!(p.take_ready().messages[..], [Message::Log { through_exit: 1, .. }]));
    // Exit 2 without output: batched, nothing sent.
    p.exit_complete(2, 1);
    assert!(p.take_ready().messages.is_empty());
    // Output 1 still awaits its ack; output 3 needs a frame of its own right away.
    p.hold_output(3, OutputId(3), 2);
    p.exit_complete(3, 2);
    assert!(matches!(p.take_ready().messages[..], [Message::Log { through_exit: 3, .. }]));
}

#[test]
fn backup_halts_on_refusal_and_refuses_a_stale_primary() {
    let mut b = Backup::new(cfg(), id(), 3, 0);
    b.take_ready();
    let reason = RefuseReason::StaleEpoch { current: 4, got: 3 };
    b.step(Message::Refuse { reason: reason.clone() }, 0).unwrap();
    let r = b.take_ready();
    assert_eq!(r.role_events, vec![RoleEvent::Halted(HaltReason::Refused(reason))]);
    assert_eq!(b.state(), BackupState::Halted);

    let mut b = Backup::new(cfg(), id(), 3, 0);
    b.take_ready();
    b.step(Message::HelloAck { protocol_version: PROTOCOL_VERSION, epoch: 2 }, 0).unwrap();
    let r = b.take_ready();
    assert!(matches!(refusal(&r), Some(RefuseReason::StaleEpoch { current: 3, got: 2 })));
    assert_eq!(b.state(), BackupState::Halted);
    assert!(r.consult_arbiter.is_none(), "an unsynced backup never tries to go live");
}

// ----- output rule -----

#[test]
fn outputs_behind_unacknowledged_frames_ride_with_the_next_ack() {
    let c = FtConfig { flush_interval: 1_000 * MS, batch_bytes: usize::MAX, output_frames_in_flight: 2, ..cfg() };
    let (mut p, mut b) = synced_pair(c, 0);
    let mut frames = Vec::new();
    // Two outputs, two frames in flight: each ships at once.
    for exit in 1..=2 {
        p.hold_output(exit, OutputId(exit), exit);
        p.exit_complete(exit, exit);
        let r = p.take_ready();
        assert_eq!(r.messages.len(), 1, "exit {exit} should ship at once");
        frames.push(r);
    }
    // A third output waits: two frames are unacknowledged.
    for exit in 3..=4 {
        p.hold_output(exit, OutputId(exit), exit);
        p.exit_complete(exit, exit);
        assert!(p.take_ready().messages.is_empty(), "exit {exit} should wait for an ack");
    }
    // The backup acks the first frame: output 1 leaves, and exits 3 and 4 go out in one frame.
    deliver_to_backup(frames.remove(0), &mut b, 10);
    deliver_to_primary(b.take_ready(), &mut p, 11);
    let r = p.take_ready();
    assert_eq!(r.released.iter().map(|x| x.id).collect::<Vec<_>>(), vec![OutputId(1)]);
    assert!(
        matches!(r.messages[..], [Message::Log { through_exit: 4, .. }]),
        "the waiting exits ship together when the ack arrives: {:?}",
        r.messages
    );
    // Everything is released once the backup has it all.
    deliver_to_backup(frames.remove(0), &mut b, 12);
    deliver_to_backup(r, &mut b, 12);
    deliver_to_primary(b.take_ready(), &mut p, 13);
    assert_eq!(p.take_ready().released.len(), 3);
    assert_eq!(p.metrics().outputs_released, 4);
}

#[test]
fn output_waits_for_the_ack_of_its_exit() {
    let (mut p, mut b) = synced_pair(cfg(), 10);
    p.append(entry(11, 8)).unwrap();
    p.hold_output(11, OutputId(1), 100);
    p.exit_complete(11, 100);
    p.hold_output(12, OutputId(2), 100);
    p.exit_complete(12, 110);
    let log_frames = p.take_ready();
    assert!(log_frames.released.is_empty());
    // An ack through 11 releases output 1 only.
    p.step(Message::Ack { through_exit: 11, replayed_exit: 10 }, 150).unwrap();
    let r = p.take_ready();
    assert_eq!(r.released, vec![Released { id: OutputId(1), exit: 11, held_nanos: 50 }]);
    // The real backup acks through 12.
    deliver_to_backup(log_frames, &mut b, 160);
    assert_eq!(b.received_through(), 12);
    deliver_to_primary(b.take_ready(), &mut p, 170);
    let r = p.take_ready();
    assert_eq!(r.released.iter().map(|x| x.id).collect::<Vec<_>>(), vec![OutputId(2)]);
    assert_eq!(p.metrics().outputs_released, 2);
    assert_eq!(p.metrics().acked_exit, 12);
}

#[test]
fn solo_primary_releases_at_once_and_ships_no_log() {
    let mut p = Primary::new(cfg(), id(), geo(), 1, 0, 0);
    p.append(entry(1, 8)).unwrap();
    p.hold_output(1, OutputId(9), 5);
    p.exit_complete(1, 5);
    let r = p.take_ready();
    assert_eq!(r.released.len(), 1);
    assert!(r.messages.is_empty());
    assert_eq!(p.metrics().entries_unprotected, 1);
}

#[test]
fn outputs_out_of_exit_order_are_released_by_exit() {
    let (mut p, _b) = synced_pair(cfg(), 0);
    p.hold_output(3, OutputId(3), 0);
    p.hold_output(1, OutputId(1), 0);
    p.exit_complete(3, 0);
    p.take_ready();
    p.step(Message::Ack { through_exit: 2, replayed_exit: 0 }, 0).unwrap();
    assert_eq!(p.take_ready().released.iter().map(|r| r.id).collect::<Vec<_>>(), vec![OutputId(1)]);
}

// ----- log shipping and flow control -----

#[test]
fn log_ships_only_complete_exits() {
    let (mut p, _b) = synced_pair(cfg(), 0);
    p.append(entry(1, 4)).unwrap();
    p.exit_complete(1, 1);
    p.append(entry(2, 4)).unwrap(); // exit 2 still running
    let r = p.take_ready();
    let Message::Log { first_seq, through_exit, entries } = &r.messages[0] else {
        panic!("expected Log, got {:?}", r.messages);
    };
    assert_eq!((*first_seq, *through_exit, entries.len()), (0, 1, 1));
    p.exit_complete(2, 2);
    let r = p.take_ready();
    assert!(matches!(&r.messages[0], Message::Log { first_seq: 1, through_exit: 2, entries } if entries.len() == 1));
}

#[test]
fn append_rejects_completed_exits_and_oversized_entries() {
    let (mut p, _b) = synced_pair(cfg(), 5);
    assert!(matches!(p.append(entry(5, 1)), Err(FtError::ExitAlreadyComplete { exit: 5, completed: 5 })));
    let big = LogEntry { exit: 6, bytes: vec![0; cfg().max_payload] };
    assert!(matches!(p.append(big), Err(FtError::TooLarge { .. })));
}

#[test]
fn big_batches_split_without_claiming_half_shipped_exits() {
    let c = FtConfig { max_payload: 200, ..cfg() };
    let (mut p, mut b) = synced_pair(c, 0);
    // Three 60-byte entries per exit; ~2 fit in a frame, so exits straddle frames.
    for exit in 1..=4 {
        for _ in 0..3 {
            p.append(entry(exit, 60)).unwrap();
        }
    }
    p.exit_complete(4, 1);
    let r = p.take_ready();
    assert!(r.messages.len() > 2);
    let mut seen = Vec::new();
    for m in r.messages {
        if let Message::Log { through_exit, entries, .. } = &m {
            // Every entry of an exit <= through_exit must be in this or an earlier frame.
            seen.extend(entries.iter().map(|e| e.exit));
            let remaining_at_or_below = (1..=4u64)
                .filter(|x| *x <= *through_exit)
                .map(|x| 3 - seen.iter().filter(|e| **e == x).count())
                .sum::<usize>();
            assert_eq!(remaining_at_or_below, 0, "frame claims through {through_exit} too early");
        }
        b.step(m, 2).unwrap();
        // The replayer never gets an exit it has only part of.
        for e in b.take_replayable() {
            assert!(e.exit <= b.replay_limit());
        }
    }
    assert_eq!(b.received_through(), 4);
    assert_eq!(b.metrics().log_entries_received, 12);
}

#[test]
fn vcpu_pauses_over_the_log_budget_and_resumes_on_ack() {
    let c = FtConfig { log_budget_bytes: 100, ..cfg() };
    let (mut p, _b) = synced_pair(c, 0);
    p.append(entry(1, 50)).unwrap();
    p.exit_complete(1, 1);
    assert!(!p.take_ready().pause_vcpu);
    p.append(entry(2, 50)).unwrap();
    p.exit_complete(2, 2);
    assert!(p.take_ready().pause_vcpu, "124 unacked bytes > 100");
    p.step(Message::Ack { through_exit: 1, replayed_exit: 0 }, 3).unwrap();
    assert!(!p.take_ready().pause_vcpu);
}

#[test]
fn lagging_replay_slows_the_primary() {
    let c = FtConfig { lag_target: 10 * MS, ..cfg() };
    let (mut p, _b) = synced_pair(c, 0);
    for exit in 1..=100 {
        p.exit_complete(exit, exit * MS);
    }
    p.take_ready();
    // Backup has everything but replayed only through 10, i.e. it trails by ~90 ms.
    p.step(Message::Ack { through_exit: 100, replayed_exit: 10 }, 100 * MS).unwrap();
    let r = p.take_ready();
    assert!(matches!(r.throttle, Throttle::Slow { sleep_per_exit } if sleep_per_exit > 0));
    assert!(p.metrics().lag_nanos >= 80 * MS);
    p.step(Message::Ack { through_exit: 100, replayed_exit: 100 }, 101 * MS).unwrap();
    assert_eq!(p.take_ready().throttle, Throttle::Full);
}

// ----- failure detection and the arbiter -----

#[test]
fn heartbeats_flow_and_silence_triggers_the_arbiter() {
    let c = cfg();
    let (mut p, mut b) = synced_pair(c.clone(), 0);
    p.tick(c.heartbeat_interval);
    let r = p.take_ready();
    assert!(matches!(r.messages[..], [Message::Heartbeat { .. }]));
    deliver_to_backup(r, &mut b, c.heartbeat_interval);
    let r = b.take_ready();
    assert!(r.messages.iter().any(|m| matches!(m, Message::HeartbeatReply { .. })));
    deliver_to_primary(r, &mut p, c.heartbeat_interval + 10);
    assert_eq!(p.metrics().heartbeat_rtt_nanos, 10);
    // Then silence.
    p.tick(c.heartbeat_interval + c.heartbeat_timeout + 11);
    let r = p.take_ready();
    assert_eq!(r.consult_arbiter, Some(ConsultArbiter { seen_epoch: 1 }));
    assert!(r.role_events.contains(&RoleEvent::Suspecting(Suspicion::HeartbeatTimeout)));
}

#[test]
fn stalled_acks_trigger_the_arbiter_even_with_heartbeats() {
    let c = cfg();
    let (mut p, _b) = synced_pair(c.clone(), 0);
    p.append(entry(1, 4)).unwrap();
    p.exit_complete(1, 0);
    p.take_ready();
    let mut t = 0;
    while t <= c.stall_timeout {
        t += c.heartbeat_interval / 2;
        p.step(Message::Heartbeat { sent_at_nanos: t }, t).unwrap();
        p.tick(t);
    }
    let r = p.take_ready();
    assert!(r.role_events.contains(&RoleEvent::Suspecting(Suspicion::StalledChannel)));
    assert!(r.consult_arbiter.is_some());
}

#[test]
fn idle_channel_is_not_a_stall() {
    let c = cfg();
    let (mut p, _b) = synced_pair(c.clone(), 0);
    let mut t = 0;
    while t <= 3 * c.stall_timeout {
        t += c.heartbeat_interval;
        p.step(Message::HeartbeatReply { sent_at_nanos: t }, t).unwrap();
        p.tick(t);
    }
    // Log sent after a long idle time starts its stall clock then.
    p.exit_complete(1, t);
    p.tick(t + 1);
    assert!(p.take_ready().consult_arbiter.is_none());
    assert_eq!(p.state(), PrimaryState::Protected);
}

#[test]
fn primary_winning_the_arbiter_releases_everything_and_degrades() {
    let (mut p, _b) = synced_pair(cfg(), 0);
    p.hold_output(1, OutputId(1), 0);
    p.exit_complete(1, 0);
    p.peer_disconnected(10);
    let r = p.take_ready();
    assert!(r.released.is_empty());
    assert_eq!(r.consult_arbiter, Some(ConsultArbiter { seen_epoch: 1 }));
    p.hold_output(2, OutputId(2), 20);
    assert!(p.take_ready().released.is_empty());
    p.arbiter_result(ArbiterOutcome::Won { epoch: 2 }, 30);
    let r = p.take_ready();
    assert_eq!(r.released.iter().map(|x| x.id).collect::<Vec<_>>(), vec![OutputId(1), OutputId(2)]);
    assert!(r.role_events.contains(&RoleEvent::Degraded { epoch: 2 }));
    assert_eq!(p.state(), PrimaryState::Solo);
    assert_eq!(p.epoch(), 2);
    assert!(!r.pause_vcpu);
}

#[test]
fn unreachable_arbiter_stalls_and_retries_but_acked_outputs_still_leave() {
    let c = cfg();
    let (mut p, _b) = synced_pair(c.clone(), 0);
    p.hold_output(1, OutputId(1), 0);
    p.hold_output(2, OutputId(2), 0);
    p.exit_complete(2, 0);
    p.peer_disconnected(1);
    p.take_ready();
    p.arbiter_result(ArbiterOutcome::Unreachable, 2);
    p.tick(2 + c.arbiter_retry - 1);
    let r = p.take_ready();
    assert!(r.consult_arbiter.is_none(), "waits before retrying");
    assert!(r.released.is_empty());
    p.tick(2 + c.arbiter_retry);
    assert!(p.take_ready().consult_arbiter.is_some(), "retries");
    // A late ack from the (slow, not dead) backup: output 1 is reproducible by it, so it leaves.
    p.step(Message::Ack { through_exit: 1, replayed_exit: 0 }, 3).unwrap();
    assert_eq!(p.take_ready().released.iter().map(|x| x.id).collect::<Vec<_>>(), vec![OutputId(1)]);
    assert_eq!(p.state(), PrimaryState::Consulting);
}

#[test]
fn losing_primary_halts_and_never_releases_again() {
    let (mut p, _b) = synced_pair(cfg(), 0);
    p.hold_output(1, OutputId(1), 0);
    p.exit_complete(1, 0);
    p.peer_disconnected(1);
    p.arbiter_result(ArbiterOutcome::Lost { winner: "backup-pod".into(), epoch: 2 }, 2);
    let r = p.take_ready();
    assert_eq!(r.discarded, vec![OutputId(1)]);
    assert!(r.pause_vcpu);
    assert!(r.close_channel);
    p.hold_output(3, OutputId(3), 3);
    // Even an ack (from a confused peer) releases nothing now.
    p.step(Message::Ack { through_exit: 3, replayed_exit: 3 }, 4).unwrap();
    let r = p.take_ready();
    assert!(r.released.is_empty());
    assert_eq!(r.discarded, vec![OutputId(3)]);
    // Late arbiter answers change nothing.
    p.arbiter_result(ArbiterOutcome::Won { epoch: 9 }, 5);
    assert_eq!(p.state(), PrimaryState::Halted);
}

#[test]
fn bogus_ack_is_a_protocol_violation() {
    let (mut p, _b) = synced_pair(cfg(), 0);
    let e = p.step(Message::Ack { through_exit: 99, replayed_exit: 0 }, 1).unwrap_err();
    assert!(matches!(e, FtError::Protocol(_)));
    let r = p.take_ready();
    assert!(r.close_channel);
    assert!(r.consult_arbiter.is_some());
}

// ----- backup go-live -----

#[test]
fn backup_drains_everything_received_before_asking_the_arbiter() {
    let (mut p, mut b) = synced_pair(cfg(), 0);
    for exit in 1..=3 {
        p.append(entry(exit, 4)).unwrap();
        p.exit_complete(exit, exit);
    }
    deliver_to_backup(p.take_ready(), &mut b, 3);
    b.peer_disconnected(4);
    let r = b.take_ready();
    assert!(r.role_events.contains(&RoleEvent::Draining(Suspicion::ChannelClosed)));
    assert!(r.consult_arbiter.is_none(), "replay first");
    // Log arriving now is not taken.
    b.step(Message::Log { first_seq: 3, through_exit: 4, entries: vec![entry(4, 1)] }, 5).unwrap();
    assert_eq!(b.replay_limit(), 3);
    let got: Vec<u64> = b.take_replayable().iter().map(|e| e.exit).collect();
    assert_eq!(got, vec![1, 2, 3]);
    b.replayed(2, 6);
    assert!(b.take_ready().consult_arbiter.is_none());
    b.replayed(3, 7);
    assert_eq!(b.take_ready().consult_arbiter, Some(ConsultArbiter { seen_epoch: 1 }));
    assert!(b.suppress_outputs());
    b.arbiter_result(ArbiterOutcome::Unreachable, 8);
    b.tick(8 + cfg().arbiter_retry);
    assert!(b.take_ready().consult_arbiter.is_some());
    b.arbiter_result(ArbiterOutcome::Won { epoch: 2 }, 9);
    assert_eq!(b.state(), BackupState::Promoted { epoch: 2, resume_after_exit: 3 });
    assert!(!b.suppress_outputs());
}

#[test]
fn a_guest_that_stopped_on_its_own_ends_the_backup_too_and_it_never_asks_the_arbiter() {
    let (mut p, mut b) = synced_pair(cfg(), 0);
    for exit in 1..=3 {
        p.append(entry(exit, 4)).unwrap();
        p.exit_complete(exit, exit);
    }
    // Exit 3 powered the guest off (or faulted): the log through it ships first, then the end.
    p.vm_ended(3, 4);
    let r = p.take_ready();
    assert!(matches!(r.messages.last(), Some(Message::VmEnded { exit: 3 })), "{:?}", r.messages);
    assert!(r.messages.iter().any(|m| matches!(m, Message::Log { through_exit: 3, .. })));
    deliver_to_backup(r, &mut b, 4);
    assert_eq!(b.state(), BackupState::Ended { exit: 3 });
    assert!(b.take_ready().role_events.contains(&RoleEvent::VmEnded { exit: 3 }));
    // The primary goes away, silence follows: the replay still gets everything, and nobody asks
    // the arbiter.
    b.peer_disconnected(5);
    b.tick(5 + 10 * cfg().heartbeat_timeout);
    let got: Vec<u64> = b.take_replayable().iter().map(|e| e.exit).collect();
    assert_eq!(got, vec![1, 2, 3]);
    b.replayed(3, 6);
    assert!(b.take_ready().consult_arbiter.is_none());
    assert_eq!(b.state(), BackupState::Ended { exit: 3 });
    assert!(b.suppress_outputs());
}

#[test]
fn an_end_that_skips_log_is_a_violation_and_a_backup_cannot_send_one() {
    let (mut p, mut b) = synced_pair(cfg(), 0);
    assert!(b.step(Message::VmEnded { exit: 5 }, 1).is_err(), "log through 5 never arrived");
    // Treated like any violation: the primary is suspect (nothing to drain, so ask at once).
    assert_eq!(b.state(), BackupState::Consulting);
    assert!(p.step(Message::VmEnded { exit: 0 }, 1).is_err());
}

#[test]
fn backup_that_loses_halts() {
    let (_p, mut b) = synced_pair(cfg(), 0);
    b.tick(cfg().heartbeat_timeout + 1);
    assert!(b.take_ready().consult_arbiter.is_some());
    b.arbiter_result(ArbiterOutcome::Lost { winner: "primary".into(), epoch: 2 }, 1);
    assert_eq!(b.state(), BackupState::Halted);
    assert!(b.suppress_outputs());
}

#[test]
fn backup_without_state_cannot_go_live() {
    let mut p = Primary::new(cfg(), id(), geo(), 1, 0, 0);
    let mut b = Backup::new(cfg(), id(), 1, 0);
    deliver_to_primary(b.take_ready(), &mut p, 0);
    deliver_to_backup(p.take_ready(), &mut b, 0); // HelloAck, CloneBegin
    b.peer_disconnected(1);
    let r = b.take_ready();
    assert_eq!(r.role_events, vec![RoleEvent::Halted(HaltReason::PrimaryLostBeforeSync)]);
    assert!(r.consult_arbiter.is_none());
}

#[test]
fn backup_rejects_gaps_and_disorder() {
    let bad_logs = [
        Message::Log { first_seq: 5, through_exit: 1, entries: vec![] },
        Message::Log { first_seq: 0, through_exit: 3, entries: vec![entry(3, 1), entry(2, 1)] },
        Message::Log { first_seq: 0, through_exit: 3, entries: vec![entry(0, 1)] },
        Message::CloneDone,
    ];
    for m in bad_logs {
        let (_p, mut b) = synced_pair(cfg(), 0);
        assert!(matches!(b.step(m.clone(), 1), Err(FtError::Protocol(_))), "{m:?}");
        let r = b.take_ready();
        assert!(r.close_channel);
        assert!(r.role_events.contains(&RoleEvent::Draining(Suspicion::ProtocolViolation)));
    }
}

#[test]
fn full_backup_buffer_holds_acks_until_replay_catches_up() {
    let c = FtConfig { backup_buffer_budget: 50, ..cfg() };
    let (mut p, mut b) = synced_pair(c, 0);
    p.append(entry(1, 100)).unwrap();
    p.exit_complete(1, 1);
    deliver_to_backup(p.take_ready(), &mut b, 1);
    let r = b.take_ready();
    assert!(
        !r.messages.iter().any(|m| matches!(m, Message::Ack { through_exit: 1, .. })),
        "over budget: no receive ack"
    );
    b.take_replayable();
    b.replayed(1, 2 * MS);
    let r = b.take_ready();
    assert!(r.messages.contains(&Message::Ack { through_exit: 1, replayed_exit: 1 }));
}

// ----- clone orchestration -----

#[test]
fn clone_iterates_until_the_dirty_set_is_small_or_rounds_run_out() {
    let c = FtConfig { clone_max_rounds: 4, clone_dirty_threshold_pages: 10, ..cfg() };
    let mut p = Primary::new(c, id(), geo(), 1, 0, 0);
    p.step(hello("ns/kv", 1), 0).unwrap();
    let r = p.take_ready();
    assert_eq!(r.clone_actions, vec![CloneAction::CopyRound { round: 0 }]);
    assert!(matches!(r.messages[..], [Message::HelloAck { .. }, Message::CloneBegin { .. }]));
    assert!(!r.pause_vcpu, "pre-copy runs with the guest running");
    p.clone_pages((0..256).map(|i| (i * 4096, vec![0; 4096])).collect()).unwrap();
    p.clone_disk(0, &[5; 4096]).unwrap();
    p.clone_round_done(100, 1).unwrap();
    assert_eq!(p.take_ready().clone_actions, vec![CloneAction::CopyRound { round: 1 }]);
    assert_eq!(p.clone_progress().unwrap().pages_sent, 256);
    p.clone_round_done(50, 2).unwrap();
    assert_eq!(p.take_ready().clone_actions, vec![CloneAction::CopyRound { round: 2 }]);
    // Round limit reached although the set is still large.
    p.clone_round_done(50, 3).unwrap();
    let r = p.take_ready();
    assert_eq!(r.clone_actions, vec![CloneAction::PauseAndFinalize { round: 3 }]);
    assert!(r.pause_vcpu);
    assert!(matches!(p.clone_round_done(1, 4), Err(FtError::CloneOutOfOrder(_))));
    p.clone_final(7, vec![1; 10], vec![2; 10], 5).unwrap();
    let r = p.take_ready();
    assert!(!r.pause_vcpu);
    assert!(matches!(r.messages[..], [Message::CloneFinal { exit: 7, .. }, Message::CloneDone]));
    assert_eq!(r.role_events, vec![RoleEvent::Protected { from_exit: 7 }]);
    assert_eq!(p.metrics().last_clone_pause_nanos, 2);
    assert_eq!(p.metrics().last_clone_nanos, 5);
    assert!(p.metrics().protected);
}

#[test]
fn clone_is_aborted_when_the_new_backup_goes_away() {
    let mut p = Primary::new(cfg(), id(), geo(), 1, 0, 0);
    p.step(hello("ns/kv", 1), 0).unwrap();
    p.take_ready();
    assert!(matches!(p.clone_final(0, vec![], vec![], 0), Err(FtError::CloneOutOfOrder(_))));
    p.peer_disconnected(1);
    let r = p.take_ready();
    assert_eq!(r.clone_actions, vec![CloneAction::Abort]);
    assert_eq!(p.state(), PrimaryState::Solo);
    assert!(r.consult_arbiter.is_none(), "an unsynced backup cannot go live: no arbiter needed");
    assert_eq!(p.clone_pages(vec![(0, vec![0])]), Err(FtError::NotCloning));
    // A new backup can now join.
    p.step(hello("ns/kv", 1), 2).unwrap();
    assert_eq!(p.state(), PrimaryState::Cloning);
}

#[test]
fn large_clone_data_is_split_into_bounded_frames() {
    let c = FtConfig { max_payload: 10_000, ..cfg() };
    let mut p = Primary::new(c.clone(), id(), geo(), 1, 0, 0);
    p.step(hello("ns/kv", 1), 0).unwrap();
    p.take_ready();
    p.clone_pages((0..10).map(|i| (i * 4096, vec![i as u8; 4096])).collect()).unwrap();
    p.clone_disk(100, &[9; 25_000]).unwrap();
    let r = p.take_ready();
    for m in &r.messages {
        assert!(m.payload_len() <= c.max_payload, "{:?} too big", m.kind());
    }
    let pages: usize = r
        .messages
        .iter()
        .map(|m| match m {
            Message::ClonePages { pages, .. } => pages.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(pages, 10);
    let disk: Vec<(u64, usize)> = r
        .messages
        .iter()
        .filter_map(|m| match m {
            Message::CloneDisk { offset, bytes } => Some((*offset, bytes.len())),
            _ => None,
        })
        .collect();
    assert_eq!(disk.iter().map(|d| d.1).sum::<usize>(), 25_000);
    assert_eq!(disk[1].0, 100 + disk[0].1 as u64, "offsets are contiguous");
}

#[test]
fn promote_builds_a_solo_primary_at_the_resume_exit() {
    let (mut p, mut b) = synced_pair(cfg(), 4);
    assert!(b.promote(geo(), 0).is_none(), "not before winning");
    p.append(entry(5, 2)).unwrap();
    p.exit_complete(5, 1);
    deliver_to_backup(p.take_ready(), &mut b, 1);
    b.take_replayable();
    b.replayed(5, 2);
    b.peer_disconnected(3);
    b.arbiter_result(ArbiterOutcome::Won { epoch: 2 }, 4);
    let mut np = b.promote(geo(), 5).expect("promoted");
    assert_eq!((np.state(), np.epoch()), (PrimaryState::Solo, 2));
    assert!(matches!(np.append(entry(5, 1)), Err(FtError::ExitAlreadyComplete { completed: 5, .. })));
    // A new backup must know epoch 2 to join it.
    np.step(hello("ns/kv", 1), 6).unwrap();
    assert!(matches!(refusal(&np.take_ready()), Some(RefuseReason::StaleEpoch { .. })));
    np.step(hello("ns/kv", 2), 7).unwrap();
    assert_eq!(np.state(), PrimaryState::Cloning);
}

#[test]
fn retryable_halts() {
    assert!(HaltReason::Refused(RefuseReason::Busy).is_retryable());
    assert!(HaltReason::PrimaryLostBeforeSync.is_retryable());
    assert!(!HaltReason::Refused(RefuseReason::GuestImageMismatch).is_retryable());
    assert!(!HaltReason::LostArbiter { winner: "x".into(), epoch: 3 }.is_retryable());
}

// ----- robustness against any well-framed message sequence -----

mod hostile {
    use super::*;
    use proptest::prelude::*;

    fn small_entries() -> impl Strategy<Value = Vec<LogEntry>> {
        proptest::collection::vec(
            (0u64..40, proptest::collection::vec(any::<u8>(), 0..4)).prop_map(|(exit, bytes)| LogEntry { exit, bytes }),
            0..4,
        )
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (0u16..3, prop::bool::ANY, 0u64..4).prop_map(|(v, good_id, epoch)| Message::Hello {
                protocol_version: v,
                vm_id: if good_id { "ns/kv".into() } else { "x".into() },
                epoch,
                role: Role::Backup,
                guest_image: [3; 32],
            }),
            (0u16..3, 0u64..4).prop_map(|(v, epoch)| Message::HelloAck { protocol_version: v, epoch }),
            Just(Message::Refuse { reason: RefuseReason::Busy }),
            (0u64..20, 0u64..40, small_entries())
                .prop_map(|(first_seq, through_exit, entries)| { Message::Log { first_seq, through_exit, entries } }),
            (0u64..40, 0u64..40).prop_map(|(through_exit, replayed_exit)| Message::Ack { through_exit, replayed_exit }),
            any::<u64>().prop_map(|sent_at_nanos| Message::Heartbeat { sent_at_nanos }),
            any::<u64>().prop_map(|sent_at_nanos| Message::HeartbeatReply { sent_at_nanos }),
            Just(Message::CloneBegin { memory_bytes: 8, disk_bytes: 0, page_size: 8 }),
            (0u32..3).prop_map(|round| Message::ClonePages { round, pages: vec![(0, vec![1; 8])] }),
            Just(Message::CloneDisk { offset: 0, bytes: vec![2] }),
            (0u64..40).prop_map(|exit| Message::CloneFinal { exit, vcpu_state: vec![], device_state: vec![] }),
            Just(Message::CloneDone),
            (0u64..40).prop_map(|exit| Message::VmEnded { exit }),
        ]
    }

    #[derive(Debug, Clone)]
    enum Input {
        Msg(Message),
        Tick(u64),
        Exit { entries: u8, output: bool },
        Disconnect,
        Arbiter(u8),
        Replay,
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            4 => message().prop_map(Input::Msg),
            2 => (0u64..30).prop_map(|ms| Input::Tick(ms * MS)),
            3 => (0u8..3, any::<bool>()).prop_map(|(entries, output)| Input::Exit { entries, output }),
            1 => Just(Input::Disconnect),
            1 => (0u8..3).prop_map(Input::Arbiter),
            2 => Just(Input::Replay),
        ]
    }

    fn outcome(k: u8) -> ArbiterOutcome {
        match k {
            0 => ArbiterOutcome::Won { epoch: 2 },
            1 => ArbiterOutcome::Lost { winner: "other".into(), epoch: 2 },
            _ => ArbiterOutcome::Unreachable,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        /// Whatever a (buggy or hostile, but well-framed) peer sends, the primary never panics,
        /// never releases an output the backup did not acknowledge while a backup is in sync, and
        /// never releases anything after halting.
        #[test]
        fn primary_survives_any_sequence(inputs in proptest::collection::vec(input(), 0..60), start_synced in any::<bool>()) {
            let (mut p, _b) = if start_synced {
                synced_pair(cfg(), 0)
            } else {
                (Primary::new(cfg(), id(), geo(), 1, 0, 0), Backup::new(cfg(), id(), 1, 0))
            };
            let mut now = 0;
            let mut exit = 0;
            let mut halted = false;
            let mut max_ack = 0;
            let mut outputs = 0;
            for i in inputs {
                let before = p.state();
                match i {
                    Input::Msg(m) => {
                        if let Message::Ack { through_exit, .. } = &m {
                            if before == PrimaryState::Protected || before == PrimaryState::Consulting {
                                max_ack = max_ack.max(*through_exit);
                            }
                        }
                        let _ = p.step(m, now);
                    }
                    Input::Tick(dt) => { now += dt; p.tick(now); }
                    Input::Exit { entries, output } => {
                        if p.pause_vcpu() { continue; }
                        exit += 1;
                        for _ in 0..entries { p.append(entry(exit, 3)).unwrap(); }
                        if output { outputs += 1; p.hold_output(exit, OutputId(outputs), now); }
                        p.exit_complete(exit, now);
                    }
                    Input::Disconnect => p.peer_disconnected(now),
                    Input::Arbiter(k) => p.arbiter_result(outcome(k), now),
                    Input::Replay => {}
                }
                let r = p.take_ready();
                let after = p.state();
                prop_assert!(!halted || r.released.is_empty(), "released after halting");
                if before == PrimaryState::Protected && after == PrimaryState::Protected {
                    for rel in &r.released {
                        prop_assert!(rel.exit <= max_ack, "released exit {} with ack {}", rel.exit, max_ack);
                    }
                }
                for m in &r.messages {
                    prop_assert!(m.payload_len() <= cfg().max_payload);
                }
                halted |= after == PrimaryState::Halted;
            }
        }

        /// The backup likewise never panics, hands the replayer entries only in order and only up
        /// to the replay limit, and asks the arbiter only once it replayed everything complete.
        #[test]
        fn backup_survives_any_sequence(inputs in proptest::collection::vec(input(), 0..60), start_synced in any::<bool>()) {
            let mut b = if start_synced {
                synced_pair(cfg(), 0).1
            } else {
                let mut b = Backup::new(cfg(), id(), 1, 0);
                b.take_ready();
                b
            };
            let mut now = 0;
            let mut last_exit = 0;
            for i in inputs {
                match i {
                    Input::Msg(m) => { let _ = b.step(m, now); }
                    Input::Tick(dt) => { now += dt; b.tick(now); }
                    Input::Disconnect => b.peer_disconnected(now),
                    Input::Arbiter(k) => b.arbiter_result(outcome(k), now),
                    Input::Replay | Input::Exit { .. } => {
                        let limit = b.replay_limit();
                        for e in b.take_replayable() {
                            prop_assert!(e.exit >= last_exit && e.exit <= limit);
                            last_exit = e.exit;
                        }
                        b.replayed(limit, now);
                    }
                }
                let r = b.take_ready();
                if r.consult_arbiter.is_some() {
                    prop_assert!(b.replayed_exit() >= b.received_through(), "asked before draining");
                }
                prop_assert!(r.released.is_empty() && !r.pause_vcpu);
            }
        }
    }
}

#[test]
fn backup_rejects_clone_data_outside_the_announced_sizes_or_out_of_order() {
    let fresh = || {
        let mut b = Backup::new(cfg(), id(), 1, 0);
        b.take_ready();
        b.step(Message::HelloAck { protocol_version: PROTOCOL_VERSION, epoch: 1 }, 0).unwrap();
        b
    };
    let begin = Message::CloneBegin { memory_bytes: 8192, disk_bytes: 512, page_size: 4096 };
    let bad_after_begin = [
        Message::ClonePages { round: 0, pages: vec![(8192, vec![0; 1])] },
        Message::ClonePages { round: 0, pages: vec![(u64::MAX, vec![0; 2])] },
        Message::CloneDisk { offset: 500, bytes: vec![0; 13] },
        begin.clone(),
        Message::CloneDone,
    ];
    for m in bad_after_begin {
        let mut b = fresh();
        b.step(begin.clone(), 0).unwrap();
        assert!(matches!(b.step(m.clone(), 0), Err(FtError::Protocol(_))), "{m:?}");
        assert_eq!(b.state(), BackupState::Halted, "{m:?}");
        let r = b.take_ready();
        assert_eq!(r.clone_data.len(), 1, "only Begin reached the driver for {m:?}");
    }
    // Nothing before CloneBegin.
    let mut b = fresh();
    assert!(b.step(Message::ClonePages { round: 0, pages: vec![(0, vec![0; 8])] }, 0).is_err());
    assert!(b.take_ready().clone_data.is_empty());
    // In bounds is fine, up to the last byte.
    let mut b = fresh();
    b.step(begin, 0).unwrap();
    b.step(Message::ClonePages { round: 0, pages: vec![(4096, vec![1; 4096])] }, 0).unwrap();
    b.step(Message::CloneDisk { offset: 0, bytes: vec![1; 512] }, 0).unwrap();
    assert_eq!(b.take_ready().clone_data.len(), 3);
}

#[test]
fn entries_taken_but_not_replayed_still_count_against_the_backup_budget() {
    let c = FtConfig { backup_buffer_budget: 100, ..cfg() };
    let (mut p, mut b) = synced_pair(c, 0);
    // At most 51 wire bytes: within the budget, acknowledged at once.
    let one = entry(1, 40).wire_len() as u64;
    assert!(2 * one > 100 && one < 100);
    p.append(entry(1, 40)).unwrap();
    p.exit_complete(1, 1);
    deliver_to_backup(p.take_ready(), &mut b, 1);
    assert_eq!(b.take_replayable().len(), 1, "the driver takes eagerly");
    assert!(b.take_ready().messages.contains(&Message::Ack { through_exit: 1, replayed_exit: 0 }));
    // Another as much: over 100 unreplayed bytes although nothing is left in the machine's queue.
    p.append(entry(2, 40)).unwrap();
    p.exit_complete(2, 2);
    deliver_to_backup(p.take_ready(), &mut b, 2);
    assert_eq!(b.take_replayable().len(), 1);
    assert_eq!(b.metrics().buffered_bytes, 2 * one);
    assert!(
        !b.take_ready().messages.iter().any(|m| matches!(m, Message::Ack { through_exit: 2, .. })),
        "over budget: exit 2 is not acknowledged before it is replayed"
    );
    b.replayed(2, 3 * MS);
    assert_eq!(b.metrics().buffered_bytes, 0);
    assert!(b.take_ready().messages.contains(&Message::Ack { through_exit: 2, replayed_exit: 2 }));
}

#[test]
fn idle_solo_primary_has_nothing_to_do() {
    let mut p = Primary::new(cfg(), id(), geo(), 1, 0, 0);
    p.tick(10 * cfg().heartbeat_timeout);
    let r = p.take_ready();
    assert!(r.is_empty(), "{r:?}");
    p.hold_output(1, OutputId(1), 0);
    assert!(!p.take_ready().is_empty());
}

#[test]
fn a_fenced_primary_halts_and_drops_held_output() {
    let (mut p, _b) = synced_pair(cfg(), 0);
    p.hold_output(1, OutputId(1), 0);
    p.exit_complete(1, 0);
    p.take_ready();
    p.fenced("me-again".into(), 1); // our own epoch: nothing happens
    assert_eq!(p.state(), PrimaryState::Protected);
    p.fenced("other-pod".into(), 2);
    let r = p.take_ready();
    assert_eq!(p.state(), PrimaryState::Halted);
    assert_eq!(r.discarded, vec![OutputId(1)]);
    assert!(r.close_channel && r.pause_vcpu);
}

#[test]
fn output_at_once_follows_the_frames_in_flight() {
    let c = FtConfig { output_frames_in_flight: 1, flush_interval: 100 * MS, ..cfg() };
    let mut solo = Primary::new(c.clone(), id(), geo(), 1, 0, 0);
    assert!(solo.output_at_once() && !solo.keeps_log(), "alone, outputs are released at once");
    solo.hold_output(1, OutputId(1), 0);
    assert_eq!(solo.take_ready().released.len(), 1);

    let (mut p, mut b) = synced_pair(c, 0);
    assert!(p.keeps_log());
    assert!(p.output_at_once(), "nothing in flight: an output's exit ships at once");
    p.append(entry(1, 4)).unwrap();
    p.hold_output(1, OutputId(2), MS);
    p.exit_complete(1, MS);
    let r = p.take_ready();
    assert_eq!(p.log_frames_in_flight(), 1);
    assert!(!p.output_at_once(), "one frame in flight: the next output waits for its ack");
    // A second output now does not ship by itself...
    p.append(entry(2, 4)).unwrap();
    p.hold_output(2, OutputId(3), 2 * MS);
    p.exit_complete(2, 2 * MS);
    assert!(p.take_ready().messages.is_empty(), "exit 2 rides with the frame sent on the next ack");
    // ...the ack for exit 1 releases output 2 (held from when it was produced) and ships exit 2
    // in the same breath.
    deliver_to_backup(r, &mut b, 3 * MS);
    deliver_to_primary(b.take_ready(), &mut p, 5 * MS);
    let r = p.take_ready();
    assert_eq!(r.released.iter().map(|x| x.id).collect::<Vec<_>>(), vec![OutputId(2)]);
    assert_eq!(r.released[0].held_nanos, 4 * MS);
    assert!(matches!(r.messages[..], [Message::Log { through_exit: 2, .. }]));
    assert_eq!(p.log_frames_in_flight(), 1);
}
