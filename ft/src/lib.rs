//! # lockstep-ft: the fault-tolerance protocol core
//!
//! Lockstep keeps a *backup* VM an exact copy of a *primary* by shipping the primary's log of
//! non-deterministic events (see `DESIGN.md`, "The determinism contract"). This crate is the
//! protocol between the two agents, and nothing else: no sockets, no threads, no clock, no KVM.
//! It is *sans-IO* in the raft-rs manner: the agent (the *driver*) feeds it inputs and carries
//! out what it says.
//!
//! ## The pieces
//!
//! - [`wire`]: the frames on the TCP logging channel (`[LSF kind][u32 len][payload][crc32]`),
//!   an incremental [`wire::FrameReader`] and typed [`wire::WireError`]s. Untrusted bytes give an
//!   error, never a panic.
//! - [`Primary`]: log shipping, the **output rule**, back-pressure, execution-lag control,
//!   failure detection, arbiter consultation and the clone hand-over to a new backup.
//! - [`Backup`]: handshake, receiving the clone, buffering the log, handing it to the replayer in
//!   order, acknowledging, failure detection and the go-live sequence.
//! - [`Ready`]: what the driver must do after a call: frames to send, outputs now safe to
//!   release, whether the vCPU must pause, a throttle, role changes, an arbiter request, clone work.
//!
//! ## Inputs and outputs
//!
//! Every input is a method call; time is always an argument (`now`, monotonic nanoseconds):
//!
//! | input | primary | backup |
//! |---|---|---|
//! | a frame arrived | [`Primary::step`] | [`Backup::step`] |
//! | time passed | [`Primary::tick`] | [`Backup::tick`] |
//! | the channel closed | [`Primary::peer_disconnected`] | [`Backup::peer_disconnected`] |
//! | the arbiter answered | [`Primary::arbiter_result`] | [`Backup::arbiter_result`] |
//! | the arbiter says someone newer holds the VM (lease renewal lost) | [`Primary::fenced`] | |
//! | the recorder logged an entry at exit N | [`Primary::append`] | |
//! | the vCPU finished exit N | [`Primary::exit_complete`] | |
//! | an output was produced at exit N | [`Primary::hold_output`] | |
//! | clone work done | [`Primary::clone_pages`], [`Primary::clone_disk`], [`Primary::clone_round_done`], [`Primary::clone_final`] | |
//! | the replayer finished exit N | | [`Backup::replayed`] |
//!
//! After one or more calls the driver takes a [`Ready`] (`take_ready()`) and acts on it.
//!
//! ## The rules it enforces
//!
//! - **Output rule.** An output produced at exit N is released only after the backup acknowledged
//!   the complete log through N ([`Ready::released`]). Without a backup in sync (*Solo*, or while a
//!   new backup is still cloning) outputs are released at once: no other side can go live at this
//!   epoch. A halted side never releases again ([`Ready::discarded`]).
//! - **Back-pressure.** When unacknowledged log exceeds [`FtConfig::log_budget_bytes`] the vCPU
//!   must pause ([`Ready::pause_vcpu`]); execution lag above [`FtConfig::lag_target`] gives a
//!   [`Throttle::Slow`].
//! - **Failure detection.** Heartbeat silence, a stalled channel (log outstanding, no ack progress),
//!   a closed channel or a protocol violation make a side ask the arbiter
//!   ([`Ready::consult_arbiter`]). The answer decides: `Won` continues (the primary *degraded*, the
//!   backup *promoted*), `Lost` halts, `Unreachable` stalls and asks again. Nobody decides alone, so
//!   a partition can never produce two live sides.
//! - **Go-live.** The backup stops taking log, replays everything complete it received, then asks
//!   the arbiter; on `Won` [`Backup::promote`] gives the [`Primary`] to run from the resume exit.
//! - **Clone hand-over.** A new backup says `Hello`; the primary tells the driver to run pre-copy
//!   rounds ([`CloneAction::CopyRound`]) until the dirty set is small or enough rounds ran, then to
//!   pause for the final delta ([`CloneAction::PauseAndFinalize`]); `clone_final` sends the state
//!   and from that exit on the log flows.
//!
//! ## How an agent drives it
//!
//! Keep each machine in a `Mutex`. The **vCPU thread**, at each guest-caused exit N, calls
//! `append` for each record, `hold_output` for each reply, then `exit_complete(N)`, takes the
//! `Ready`, hands `messages` to the socket writer task, releases `released` outputs, sleeps per
//! `throttle` and waits on a condvar while `pause_vcpu`. The **socket reader task** decodes with
//! [`wire::FrameReader`] and calls `step`; on EOF it calls `FrameReader::finish` (an error means the
//! peer died mid-frame) and `peer_disconnected`. A **timer task** calls `tick` every few
//! milliseconds. After every call, whoever made it drains `take_ready()`; if `pause_vcpu` turned
//! false, it notifies the vCPU condvar. `consult_arbiter` is handed to an arbiter task whose answer
//! comes back through `arbiter_result`.
//!
//! On the backup, the reader task calls `step` and applies [`Ready::clone_data`] in order; the
//! **replayer** (the backup's vCPU thread) takes entries with [`Backup::take_replayable`], runs the
//! guest up to [`Backup::replay_limit`] and no further, reports with [`Backup::replayed`], and
//! drops every output while [`Backup::suppress_outputs`] is true. It waits when the limit is
//! reached; a later `Ready` with new log (any `step`) is the moment to look again.
//!
//! `ft/examples/loopback.rs` is a complete reference driver (std threads, real TCP on
//! 127.0.0.1, a local arbiter, clone, failover): `cargo run -p lockstep-ft --example loopback`.
//!
//! Driver contract, in short:
//! - Take the `Ready` and queue its frames to the connection's single writer *before releasing
//!   the lock*: frames must leave in the order the machine produced them, whichever thread
//!   called in.
//! - One channel connection at a time. A connection arriving while one is open is answered by the
//!   driver itself with `Refuse { reason: Busy }` (encode it with [`wire::encode`]) and closed; it
//!   never reaches `step`. When [`Ready::close_channel`] is set, write the pending `messages`, close
//!   the socket, and stop reading from it (do not call `peer_disconnected` for a close you made).
//! - Check `pause_vcpu` after `exit_complete`, at the exit boundary. It stays true until a later
//!   `Ready` says otherwise (after an ack, `arbiter_result` or `clone_final`).
//! - Clone calls may return [`FtError::NotCloning`] if the backup left in the meantime; a
//!   [`CloneAction::Abort`] follows, so just stop sending clone data.
//! - A halted backup whose [`HaltReason::is_retryable`] is true may be replaced by a fresh
//!   `Backup` after a pause; a connection that drops always costs a new clone (the log stream
//!   does not resume across connections).
//!
//! ## Example: a primary and a backup in memory
//!
//! ```
//! use lockstep_ft::wire::{FrameReader, LogEntry};
//! use lockstep_ft::*;
//!
//! // Moves a side's frames through the real codec to the other side.
//! fn wire(ready: &Ready, cfg: &FtConfig) -> Vec<lockstep_ft::wire::Message> {
//!     let mut bytes = Vec::new();
//!     ready.encode_messages(cfg.max_payload, &mut bytes).unwrap();
//!     let mut reader = FrameReader::new(cfg.max_payload);
//!     reader.push(&bytes);
//!     let mut out = Vec::new();
//!     while let Some(m) = reader.next_message().unwrap() {
//!         out.push(m);
//!     }
//!     out
//! }
//!
//! let cfg = FtConfig { flush_interval: 0, ..FtConfig::default() };
//! let id = VmIdentity { vm_id: "default/kv".into(), guest_image: [7; 32] };
//! let geometry = VmGeometry { memory_bytes: 8192, disk_bytes: 0, page_size: 4096 };
//! let mut now = 1_000;
//!
//! // The primary won epoch 1 from the arbiter and runs alone; a backup connects.
//! let mut primary = Primary::new(cfg.clone(), id.clone(), geometry, 1, 0, now);
//! let mut backup = Backup::new(cfg.clone(), id, 1, now);
//! for m in wire(&backup.take_ready(), &cfg) {
//!     primary.step(m, now).unwrap(); // Hello
//! }
//!
//! // Clone hand-over: the primary asks for a pre-copy round, then the final pause.
//! let ready = primary.take_ready();
//! assert_eq!(ready.clone_actions, vec![CloneAction::CopyRound { round: 0 }]);
//! primary.clone_pages(vec![(0, vec![0; 4096]), (4096, vec![1; 4096])]).unwrap();
//! primary.clone_round_done(0, now).unwrap(); // nothing dirtied meanwhile
//! let mut frames = wire(&ready, &cfg);
//! let ready = primary.take_ready();
//! assert_eq!(ready.clone_actions, vec![CloneAction::PauseAndFinalize { round: 1 }]);
//! assert!(ready.pause_vcpu);
//! primary.clone_final(0, b"vcpu".to_vec(), b"devices".to_vec(), now).unwrap();
//! frames.extend(wire(&ready, &cfg));
//! frames.extend(wire(&primary.take_ready(), &cfg));
//! for m in frames {
//!     backup.step(m, now).unwrap();
//! }
//! let ready = backup.take_ready();
//! assert_eq!(ready.clone_data.len(), 3); // Begin, Pages, Final: the driver applies them
//! assert_eq!(primary.state(), PrimaryState::Protected);
//! assert_eq!(backup.state(), BackupState::Replaying);
//!
//! // Exit 1: the recorder logs an input, and the guest produces a reply.
//! now += 1_000;
//! primary.append(LogEntry { exit: 1, bytes: b"clock=5".to_vec() }).unwrap();
//! primary.hold_output(1, OutputId(42), now);
//! primary.exit_complete(1, now);
//! let ready = primary.take_ready();
//! assert!(ready.released.is_empty(), "the backup has not acknowledged exit 1 yet");
//!
//! // The backup receives the log, acknowledges, and replays.
//! for m in wire(&ready, &cfg) {
//!     backup.step(m, now).unwrap();
//! }
//! let entries = backup.take_replayable();
//! assert_eq!(entries[0].bytes, b"clock=5");
//! backup.replayed(1, now);
//! now += 1_000;
//! for m in wire(&backup.take_ready(), &cfg) {
//!     primary.step(m, now).unwrap(); // Ack
//! }
//! let ready = primary.take_ready();
//! assert_eq!(ready.released[0].id, OutputId(42)); // now the reply may leave
//!
//! // The primary dies. The backup notices, drains, asks the arbiter, wins and goes live.
//! now += cfg.heartbeat_timeout + 1;
//! backup.tick(now);
//! let ready = backup.take_ready();
//! let ask = ready.consult_arbiter.expect("asks the arbiter after draining");
//! assert_eq!(ask.seen_epoch, 1);
//! backup.arbiter_result(ArbiterOutcome::Won { epoch: 2 }, now);
//! let ready = backup.take_ready();
//! assert_eq!(
//!     ready.role_events,
//!     vec![RoleEvent::Promoted { epoch: 2, resume_after_exit: 1 }]
//! );
//! let new_primary = backup.promote(geometry, now).expect("promoted");
//! assert_eq!(new_primary.state(), PrimaryState::Solo);
//! assert_eq!(new_primary.epoch(), 2);
//! ```
//!
//! The message layouts and state diagrams are also in `docs/protocol.md`.

pub mod wire;

mod backup;
mod primary;
mod types;

pub use backup::{Backup, BackupMetrics, BackupState};
pub use primary::{CloneProgress, Primary, PrimaryMetrics, PrimaryState};
pub use types::*;

#[cfg(test)]
mod tests;
