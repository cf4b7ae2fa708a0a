//! The primary's side of the protocol.
//!
//! ```text
//!                     Hello ok                 clone_final
//!   new ──> [Solo] ───────────> [Cloning] ─────────────────> [Protected]
//!             ^  ^   backup gone /   |                          |  heartbeat timeout,
//!             |  +---- timeout ------+                          |  stalled acks, channel closed
//!             |                                                 v
//!             +──────────── arbiter Won ─────────────────── [Consulting] ──Unreachable──> (retry)
//!                                                               | arbiter Lost
//!                                                               v
//!                                                           [Halted]  (never releases output)
//! ```
//!
//! *Solo* and *Cloning* release output at once: no other side can go live at our epoch (a backup
//! that is still cloning has no state to go live with). *Protected* holds each output until the
//! backup acknowledged the log through the output's exit. *Consulting* still releases outputs the
//! backup acknowledged (the backup can reproduce them whatever happens next) but nothing else.

use std::collections::VecDeque;

use crate::types::*;
use crate::wire::{LogEntry, Message, PROTOCOL_VERSION, Page, RefuseReason, Role};

/// Counters and gauges for the driver's metrics exporter. Counters only grow.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrimaryMetrics {
    /// Log entries sent to the backup.
    pub log_entries_sent: u64,
    /// Log entry bytes (opaque record bytes) sent.
    pub log_bytes_sent: u64,
    /// Frames produced (all kinds).
    pub frames_sent: u64,
    /// Frames received (all kinds).
    pub frames_received: u64,
    /// Highest exit the backup acknowledged as received.
    pub acked_exit: u64,
    /// Highest exit the backup reported replayed.
    pub replayed_exit: u64,
    /// Highest exit completed by the vCPU.
    pub completed_exit: u64,
    /// Estimated replay lag of the backup in time.
    pub lag_nanos: Nanos,
    /// Log bytes not yet acknowledged (budget use).
    pub unacked_bytes: u64,
    /// Outputs currently held.
    pub outputs_held: u64,
    /// Outputs released.
    pub outputs_released: u64,
    /// Outputs discarded because this side halted.
    pub outputs_discarded: u64,
    /// Entries appended while no backup was attached (not shipped anywhere).
    pub entries_unprotected: u64,
    /// Last heartbeat round-trip time.
    pub heartbeat_rtt_nanos: Nanos,
    /// Times the arbiter was consulted.
    pub arbiter_consultations: u64,
    /// Times this side suspected its backup.
    pub suspicions: u64,
    /// Clone: memory pages sent (all clones).
    pub clone_pages_sent: u64,
    /// Clone: memory, disk and state bytes sent (all clones).
    pub clone_bytes_sent: u64,
    /// Clones completed.
    pub clones_completed: u64,
    /// Duration of the last completed clone.
    pub last_clone_nanos: Nanos,
    /// vCPU pause of the last completed clone.
    pub last_clone_pause_nanos: Nanos,
    /// The epoch held.
    pub epoch: u64,
    /// 1 while a backup is attached and in sync (the `lockstep_protected` gauge).
    pub protected: bool,
}

/// Progress of a clone hand-over, for log lines and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneProgress {
    /// Current pre-copy round.
    pub round: u32,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Bytes sent so far (pages, disk, state).
    pub bytes_sent: u64,
    /// Dirty pages reported after the last round.
    pub last_dirty_pages: u64,
    /// When the hand-over started.
    pub started_at: Nanos,
    /// When the final pause was requested, if it was.
    pub pause_requested_at: Option<Nanos>,
}

/// The primary's state as seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryState {
    /// No backup: output released at once.
    Solo,
    /// A new backup is being cloned.
    Cloning,
    /// A backup is in sync: output rule in force.
    Protected,
    /// Peer suspected; waiting for the arbiter.
    Consulting,
    /// Lost; never outputs again.
    Halted,
}

#[derive(Debug)]
enum State {
    Solo,
    Cloning(CloneProgress),
    Protected,
    Consulting {
        /// `Some(t)`: the arbiter was unreachable; ask again at `t`. `None`: a request is out.
        retry_at: Option<Nanos>,
        /// A backup was in sync when suspicion began, so its acks may still release output.
        /// False when we came from Solo/Cloning: then nothing may leave until the arbiter says.
        in_sync: bool,
    },
    Halted,
}

/// Sans-IO primary. See the crate docs for how a driver uses it.
#[derive(Debug)]
pub struct Primary {
    cfg: FtConfig,
    id: VmIdentity,
    geometry: VmGeometry,
    epoch: u64,
    state: State,
    completed_exit: u64,
    /// Appended but not yet sent; may include entries of the exit in progress.
    pending: VecDeque<LogEntry>,
    pending_bytes: usize,
    next_seq: u64,
    /// `through_exit` of the last `Log` frame sent.
    sent_through: u64,
    /// Sent entries not yet acknowledged: (exit, bytes), in exit order.
    unacked: VecDeque<(u64, usize)>,
    /// `through_exit` of each log frame sent and not yet acknowledged, oldest first.
    frames_in_flight: VecDeque<u64>,
    unacked_bytes: usize,
    acked_through: u64,
    replayed_exit: u64,
    last_heard: Nanos,
    last_ack_progress: Nanos,
    last_heartbeat_sent: Nanos,
    last_flush: Nanos,
    /// (through_exit, time) at each flush: when the primary had passed that exit.
    lag_samples: VecDeque<(u64, Nanos)>,
    /// Held outputs: (exit, id, held since), sorted by exit.
    held: VecDeque<(u64, OutputId, Nanos)>,
    ready: Ready,
    metrics: PrimaryMetrics,
}

/// Bound on lag samples kept; older ones are merged away (accuracy degrades, memory does not grow).
const MAX_LAG_SAMPLES: usize = 4096;

impl Primary {
    /// A primary that holds `epoch` (the driver must already have won it from the arbiter) and
    /// has completed exits through `completed_exit` (0 for a fresh guest, the resume exit for a
    /// promoted backup). It starts *Solo*: it releases output at once until a backup is in sync.
    pub fn new(
        cfg: FtConfig,
        id: VmIdentity,
        geometry: VmGeometry,
        epoch: u64,
        completed_exit: u64,
        now: Nanos,
    ) -> Self {
        Primary {
            cfg,
            id,
            geometry,
            epoch,
            state: State::Solo,
            completed_exit,
            pending: VecDeque::new(),
            pending_bytes: 0,
            next_seq: 0,
            sent_through: completed_exit,
            unacked: VecDeque::new(),
            frames_in_flight: VecDeque::new(),
            unacked_bytes: 0,
            acked_through: completed_exit,
            replayed_exit: completed_exit,
            last_heard: now,
            last_ack_progress: now,
            last_heartbeat_sent: now,
            last_flush: now,
            lag_samples: VecDeque::new(),
            held: VecDeque::new(),
            ready: Ready::default(),
            metrics: PrimaryMetrics { epoch, completed_exit, ..PrimaryMetrics::default() },
        }
    }

    // ----- inputs from the vCPU thread -----

    /// The recorder logged `entry` at exit `entry.exit` (an exit not yet completed).
    ///
    /// Without a backup in sync the entry is not kept (nobody needs it: a future backup starts
    /// from a clone). Fails if the entry cannot fit in a frame or belongs to a completed exit.
    pub fn append(&mut self, entry: LogEntry) -> Result<(), FtError> {
        let max_entry = self.cfg.max_payload.saturating_sub(8 + 8 + 4);
        if entry.wire_len() > max_entry {
            return Err(FtError::TooLarge { what: "log entry", len: entry.wire_len(), max: max_entry });
        }
        if entry.exit <= self.completed_exit {
            return Err(FtError::ExitAlreadyComplete { exit: entry.exit, completed: self.completed_exit });
        }
        if self.backup_in_sync() {
            self.pending_bytes += entry.wire_len();
            self.pending.push_back(entry);
        } else if !matches!(self.state, State::Halted) {
            self.metrics.entries_unprotected += 1;
        }
        Ok(())
    }

    /// The vCPU finished exit `exit` (all its entries were appended). May flush the log.
    pub fn exit_complete(&mut self, exit: u64, now: Nanos) {
        if exit > self.completed_exit {
            self.completed_exit = exit;
            self.metrics.completed_exit = exit;
        }
        self.maybe_flush(now, false);
    }

    /// An external output produced at exit `exit` waits to be released. It shows up in
    /// `Ready::released` once safe (maybe at once), or in `Ready::discarded` if this side halts.
    /// `now` is when the output was produced: a driver that hands outputs over in batches passes
    /// each one's own time, so [`Released::held_nanos`] covers the whole wait.
    pub fn hold_output(&mut self, exit: u64, id: OutputId, now: Nanos) {
        match self.state {
            State::Halted => {
                self.metrics.outputs_discarded += 1;
                self.ready.discarded.push(id);
            }
            State::Solo | State::Cloning(_) => self.release(exit, id, now, now),
            State::Protected | State::Consulting { .. } => {
                if exit <= self.acked_through && self.backup_in_sync() {
                    self.release(exit, id, now, now);
                } else {
                    // Keep sorted by exit; the common case (non-decreasing exits) appends.
                    let at = self.held.partition_point(|(e, _, _)| *e <= exit);
                    self.held.insert(at, (exit, id, now));
                    self.metrics.outputs_held = self.held.len() as u64;
                    // An output waits for this exit: ship it without waiting for the batch.
                    self.maybe_flush(now, false);
                }
            }
        }
    }

    // ----- inputs from the channel and timers -----

    /// A frame arrived from the backup. On `Err` the machine has already reacted (channel closed,
    /// peer suspected); the error is for the driver's log.
    pub fn step(&mut self, msg: Message, now: Nanos) -> Result<(), FtError> {
        self.metrics.frames_received += 1;
        if matches!(self.state, State::Halted) {
            return Ok(());
        }
        let attached = matches!(self.state, State::Cloning(_) | State::Protected | State::Consulting { .. });
        if attached {
            self.last_heard = now;
        }
        match msg {
            Message::Hello { protocol_version, vm_id, epoch, role, guest_image }
                if !matches!(self.state, State::Cloning(_) | State::Protected) =>
            {
                self.on_hello(protocol_version, vm_id, epoch, role, guest_image, now);
                Ok(())
            }
            Message::Ack { through_exit, replayed_exit } if self.backup_in_sync() => {
                self.on_ack(through_exit, replayed_exit, now)
            }
            Message::Heartbeat { sent_at_nanos } if attached => {
                self.send(Message::HeartbeatReply { sent_at_nanos });
                Ok(())
            }
            Message::HeartbeatReply { sent_at_nanos } if attached => {
                self.metrics.heartbeat_rtt_nanos = now.saturating_sub(sent_at_nanos);
                Ok(())
            }
            other => self.violation(format!("unexpected {:?} in state {:?}", other.kind(), self.state()), now),
        }
    }

    /// Ship every completed exit now, whatever the batching rules say: a primary about to stop
    /// hands its backup the whole log first, so the backup ends (or goes live) exactly where the
    /// primary did.
    pub fn flush_now(&mut self, now: Nanos) {
        self.maybe_flush(now, true);
    }

    /// The guest stopped on its own at exit `exit` (it powered off, panicked or faulted) and
    /// that exit is complete. Ships the log through it and tells the backup the VM is over
    /// ([`Message::VmEnded`]): the backup replays to the same stop and does not go live when this
    /// side then goes away. A stop on request is not this: it hands over, and the backup goes live.
    pub fn vm_ended(&mut self, exit: u64, now: Nanos) {
        if !self.backup_in_sync() {
            return;
        }
        self.maybe_flush(now, true);
        self.send(Message::VmEnded { exit });
    }

    /// Time passed: heartbeats, failure detection, arbiter retries, batched flushes.
    pub fn tick(&mut self, now: Nanos) {
        match self.state {
            State::Halted | State::Solo => {}
            State::Cloning(_) => {
                self.heartbeat(now);
                if now.saturating_sub(self.last_heard) > self.cfg.heartbeat_timeout {
                    self.abort_clone();
                }
            }
            State::Protected => {
                self.heartbeat(now);
                self.maybe_flush(now, false);
                // Lag keeps growing while no ack arrives; the throttle must see that.
                self.update_lag(now);
                if now.saturating_sub(self.last_heard) > self.cfg.heartbeat_timeout {
                    self.suspect(Suspicion::HeartbeatTimeout);
                } else if self.acked_through < self.sent_through
                    && now.saturating_sub(self.last_ack_progress) > self.cfg.stall_timeout
                {
                    self.suspect(Suspicion::StalledChannel);
                }
            }
            State::Consulting { retry_at, .. } => {
                self.heartbeat(now);
                self.maybe_flush(now, false);
                if retry_at.is_some_and(|t| now >= t) {
                    self.ask_arbiter();
                }
            }
        }
    }

    /// The channel connection closed or failed (EOF, reset, decode error).
    pub fn peer_disconnected(&mut self, _now: Nanos) {
        match self.state {
            State::Cloning(_) => self.abort_clone(),
            State::Protected => self.suspect(Suspicion::ChannelClosed),
            State::Solo | State::Consulting { .. } | State::Halted => {}
        }
    }

    /// The arbiter answered the request from `Ready::consult_arbiter`.
    pub fn arbiter_result(&mut self, outcome: ArbiterOutcome, now: Nanos) {
        let State::Consulting { retry_at: None, in_sync } = self.state else {
            // A late or duplicate answer; the state already moved on.
            return;
        };
        match outcome {
            ArbiterOutcome::Won { epoch } => {
                // Nobody else can go live at `epoch`: every held output is safe now, and the log
                // kept for the lost backup is useless.
                self.epoch = epoch;
                self.metrics.epoch = epoch;
                self.state = State::Solo;
                self.metrics.protected = false;
                for (exit, id, since) in std::mem::take(&mut self.held) {
                    self.release(exit, id, since, now);
                }
                self.metrics.outputs_held = 0;
                self.drop_log();
                self.ready.close_channel = true;
                self.ready.role_events.push(RoleEvent::Degraded { epoch });
            }
            ArbiterOutcome::Lost { winner, epoch } => {
                self.halt(HaltReason::LostArbiter { winner, epoch });
            }
            ArbiterOutcome::Unreachable => {
                // Never decide alone: stall and ask again later.
                self.state = State::Consulting { retry_at: Some(now.saturating_add(self.cfg.arbiter_retry)), in_sync };
            }
        }
    }

    /// The arbiter reported, outside a consultation (e.g. a periodic lease renewal), that
    /// `winner` holds `epoch`. If that epoch is newer than ours we have been fenced off: halt at
    /// once and never release output again. Older or equal epochs change nothing.
    pub fn fenced(&mut self, winner: String, epoch: u64) {
        if epoch > self.epoch && !matches!(self.state, State::Halted) {
            self.halt(HaltReason::LostArbiter { winner, epoch });
        }
    }

    // ----- clone hand-over (driver side of CloneAction) -----

    /// Sends pages of the current pre-copy round (call as often as needed per round).
    pub fn clone_pages(&mut self, pages: Vec<Page>) -> Result<(), FtError> {
        let max = self.cfg.max_payload;
        let State::Cloning(progress) = &mut self.state else {
            return Err(FtError::NotCloning);
        };
        let round = progress.round;
        let mut batch = Vec::new();
        let mut batch_len = 8; // round + count
        let mut frames = Vec::new();
        for (gpa, data) in pages {
            let len = 12 + data.len();
            if 8 + len > max {
                return Err(FtError::TooLarge { what: "memory page", len: data.len(), max });
            }
            if batch_len + len > max {
                frames.push(Message::ClonePages { round, pages: std::mem::take(&mut batch) });
                batch_len = 8;
            }
            progress.pages_sent += 1;
            progress.bytes_sent += data.len() as u64;
            self.metrics.clone_pages_sent += 1;
            self.metrics.clone_bytes_sent += data.len() as u64;
            batch_len += len;
            batch.push((gpa, data));
        }
        if !batch.is_empty() {
            frames.push(Message::ClonePages { round, pages: batch });
        }
        for f in frames {
            self.send(f);
        }
        Ok(())
    }

    /// Sends a piece of the disk (split into frames as needed).
    pub fn clone_disk(&mut self, offset: u64, bytes: &[u8]) -> Result<(), FtError> {
        let State::Cloning(progress) = &mut self.state else {
            return Err(FtError::NotCloning);
        };
        progress.bytes_sent += bytes.len() as u64;
        self.metrics.clone_bytes_sent += bytes.len() as u64;
        let chunk = self.cfg.max_payload.saturating_sub(12).max(1);
        let mut off = offset;
        for piece in bytes.chunks(chunk) {
            self.send(Message::CloneDisk { offset: off, bytes: piece.to_vec() });
            off += piece.len() as u64;
        }
        Ok(())
    }

    /// The driver finished sending round `CopyRound`'s data; `dirty_pages` were dirtied meanwhile.
    /// Decides between another round and the final pause.
    pub fn clone_round_done(&mut self, dirty_pages: u64, now: Nanos) -> Result<(), FtError> {
        let max_rounds = self.cfg.clone_max_rounds.max(1);
        let threshold = self.cfg.clone_dirty_threshold_pages;
        let State::Cloning(progress) = &mut self.state else {
            return Err(FtError::NotCloning);
        };
        if progress.pause_requested_at.is_some() {
            return Err(FtError::CloneOutOfOrder("round reported done after the final pause was requested"));
        }
        progress.last_dirty_pages = dirty_pages;
        progress.round += 1;
        // Converged, or more rounds would not shrink the dirty set in time.
        if dirty_pages <= threshold || progress.round + 1 >= max_rounds {
            progress.pause_requested_at = Some(now);
            let round = progress.round;
            self.ready.clone_actions.push(CloneAction::PauseAndFinalize { round });
        } else {
            let round = progress.round;
            self.ready.clone_actions.push(CloneAction::CopyRound { round });
        }
        Ok(())
    }

    /// With the vCPU paused after exit `exit` and the final delta sent via `clone_pages` and
    /// `clone_disk`, hands over vCPU and device state. The backup is in sync from here: outputs
    /// of later exits wait for its acknowledgements.
    pub fn clone_final(
        &mut self,
        exit: u64,
        vcpu_state: Vec<u8>,
        device_state: Vec<u8>,
        now: Nanos,
    ) -> Result<(), FtError> {
        let State::Cloning(progress) = &self.state else {
            return Err(FtError::NotCloning);
        };
        let Some(paused_at) = progress.pause_requested_at else {
            return Err(FtError::CloneOutOfOrder("clone_final before CloneAction::PauseAndFinalize"));
        };
        let len = 8 + 4 + vcpu_state.len() + 4 + device_state.len();
        if len > self.cfg.max_payload {
            return Err(FtError::TooLarge { what: "vCPU and device state", len, max: self.cfg.max_payload });
        }
        if exit < self.completed_exit {
            return Err(FtError::CloneOutOfOrder("clone_final exit is older than a completed exit"));
        }
        let started_at = progress.started_at;
        let state_bytes = (vcpu_state.len() + device_state.len()) as u64;
        self.metrics.clone_bytes_sent += state_bytes;
        self.completed_exit = exit;
        self.metrics.completed_exit = exit;
        self.send(Message::CloneFinal { exit, vcpu_state, device_state });
        self.send(Message::CloneDone);
        self.drop_log();
        self.next_seq = 0;
        self.sent_through = exit;
        self.acked_through = exit;
        self.replayed_exit = exit;
        self.metrics.acked_exit = exit;
        self.metrics.replayed_exit = exit;
        self.last_ack_progress = now;
        self.last_flush = now;
        self.state = State::Protected;
        self.metrics.protected = true;
        self.metrics.clones_completed += 1;
        self.metrics.last_clone_nanos = now.saturating_sub(started_at);
        self.metrics.last_clone_pause_nanos = now.saturating_sub(paused_at);
        self.ready.role_events.push(RoleEvent::Protected { from_exit: exit });
        Ok(())
    }

    // ----- outputs -----

    /// Takes what the driver must do now. Level fields (`pause_vcpu`, `throttle`) reflect the
    /// current state; lists contain everything since the last call.
    pub fn take_ready(&mut self) -> Ready {
        let mut r = std::mem::take(&mut self.ready);
        r.pause_vcpu = self.pause_vcpu();
        r.throttle = self.throttle();
        r
    }

    /// True if the vCPU must not run now.
    pub fn pause_vcpu(&self) -> bool {
        match &self.state {
            State::Halted => true,
            State::Cloning(p) => p.pause_requested_at.is_some(),
            State::Solo => false,
            State::Protected | State::Consulting { .. } => {
                self.unacked_bytes + self.pending_bytes > self.cfg.log_budget_bytes
            }
        }
    }

    /// Execution-lag decision for the vCPU thread.
    pub fn throttle(&self) -> Throttle {
        if !matches!(self.state, State::Protected) {
            return Throttle::Full;
        }
        let lag = self.metrics.lag_nanos;
        if lag <= self.cfg.lag_target {
            return Throttle::Full;
        }
        let sleep = ((lag - self.cfg.lag_target) / self.cfg.throttle_divisor.max(1))
            .clamp(1, self.cfg.max_throttle_sleep.max(1));
        Throttle::Slow { sleep_per_exit: sleep }
    }

    /// Current state.
    pub fn state(&self) -> PrimaryState {
        match self.state {
            State::Solo => PrimaryState::Solo,
            State::Cloning(_) => PrimaryState::Cloning,
            State::Protected => PrimaryState::Protected,
            State::Consulting { .. } => PrimaryState::Consulting,
            State::Halted => PrimaryState::Halted,
        }
    }

    /// The epoch held.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Counters for metrics.
    pub fn metrics(&self) -> &PrimaryMetrics {
        &self.metrics
    }

    /// Clone progress while a hand-over runs.
    pub fn clone_progress(&self) -> Option<&CloneProgress> {
        match &self.state {
            State::Cloning(p) => Some(p),
            _ => None,
        }
    }

    /// Highest exit the backup has acknowledged as received.
    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }

    /// Log frames sent and not yet acknowledged.
    pub fn log_frames_in_flight(&self) -> usize {
        self.frames_in_flight.len()
    }

    /// True when entries appended now are kept and shipped (a backup is in sync); otherwise
    /// [`Primary::append`] only counts them, and a driver that buffers entries may drop them.
    pub fn keeps_log(&self) -> bool {
        self.backup_in_sync()
    }

    /// True when an output produced now needs no later acknowledgement to get going: it is
    /// released at once (no backup in sync), discarded (halted), or its exit's log ships at once
    /// (fewer than [`FtConfig::output_frames_in_flight`] log frames are unacknowledged). When
    /// false, the output's log rides with the frame sent on the next ack, so a driver that
    /// batches the vCPU's calls may leave them for whoever handles that ack.
    pub fn output_at_once(&self) -> bool {
        !self.backup_in_sync() || self.frames_in_flight.len() < self.cfg.output_frames_in_flight
    }

    // ----- internals -----

    fn on_hello(&mut self, version: u16, vm_id: String, epoch: u64, role: Role, image: [u8; 32], now: Nanos) {
        let refuse = if version != PROTOCOL_VERSION {
            Some(RefuseReason::IncompatibleVersion { supported: PROTOCOL_VERSION, got: version })
        } else if vm_id != self.id.vm_id {
            Some(RefuseReason::WrongVmId { expected: self.id.vm_id.clone(), got: vm_id })
        } else if role != Role::Backup {
            Some(RefuseReason::WrongRole { got: role })
        } else if image != self.id.guest_image {
            Some(RefuseReason::GuestImageMismatch)
        } else if !matches!(self.state, State::Solo) {
            // Consulting: our epoch is in doubt; a backup cloned now could be of a loser.
            Some(RefuseReason::NotPrimary)
        } else if epoch < self.epoch {
            Some(RefuseReason::StaleEpoch { current: self.epoch, got: epoch })
        } else if epoch > self.epoch {
            Some(RefuseReason::PeerEpochNewer { current: self.epoch, got: epoch })
        } else {
            None
        };
        if let Some(reason) = refuse {
            let newer = matches!(reason, RefuseReason::PeerEpochNewer { .. });
            self.send(Message::Refuse { reason });
            self.ready.close_channel = true;
            if newer {
                // Someone took a newer epoch: we may already be replaced. Stop releasing output
                // at once and let the arbiter say (it will say Lost if the epoch moved on).
                self.suspect(Suspicion::NewerEpochSeen);
            }
            return;
        }
        self.send(Message::HelloAck { protocol_version: PROTOCOL_VERSION, epoch: self.epoch });
        self.send(Message::CloneBegin {
            memory_bytes: self.geometry.memory_bytes,
            disk_bytes: self.geometry.disk_bytes,
            page_size: self.geometry.page_size,
        });
        self.last_heard = now;
        self.last_heartbeat_sent = now;
        self.state = State::Cloning(CloneProgress {
            round: 0,
            pages_sent: 0,
            bytes_sent: 0,
            last_dirty_pages: 0,
            started_at: now,
            pause_requested_at: None,
        });
        self.ready.clone_actions.push(CloneAction::CopyRound { round: 0 });
    }

    fn on_ack(&mut self, through: u64, replayed: u64, now: Nanos) -> Result<(), FtError> {
        if through > self.sent_through || replayed > through {
            return self.violation(
                format!("ack through {through} (replayed {replayed}) but only {} was sent", self.sent_through),
                now,
            );
        }
        if through > self.acked_through || replayed > self.replayed_exit {
            self.last_ack_progress = now;
        }
        if through > self.acked_through {
            self.acked_through = through;
            self.metrics.acked_exit = through;
            while let Some(&(exit, bytes)) = self.unacked.front() {
                if exit > through {
                    break;
                }
                self.unacked.pop_front();
                self.unacked_bytes -= bytes;
            }
            self.metrics.unacked_bytes = (self.unacked_bytes + self.pending_bytes) as u64;
            while self.frames_in_flight.front().is_some_and(|&t| t <= through) {
                self.frames_in_flight.pop_front();
            }
            while let Some(&(exit, id, since)) = self.held.front() {
                if exit > through {
                    break;
                }
                self.held.pop_front();
                self.release(exit, id, since, now);
            }
            self.metrics.outputs_held = self.held.len() as u64;
            // Outputs that waited behind the acknowledged frame ship now.
            self.maybe_flush(now, false);
        }
        if replayed > self.replayed_exit {
            self.replayed_exit = replayed;
            self.metrics.replayed_exit = replayed;
            while self.lag_samples.front().is_some_and(|(e, _)| *e <= replayed) {
                self.lag_samples.pop_front();
            }
        }
        self.update_lag(now);
        Ok(())
    }

    fn update_lag(&mut self, now: Nanos) {
        // The first sample past the replayed exit is (about) when the primary was where the
        // backup is now.
        self.metrics.lag_nanos = if self.replayed_exit >= self.completed_exit {
            0
        } else {
            self.lag_samples.front().map_or(0, |(_, t)| now.saturating_sub(*t))
        };
    }

    /// Ships complete exits if the batch is full, the interval passed, or an output waits.
    fn maybe_flush(&mut self, now: Nanos, force: bool) {
        if !self.backup_in_sync() || self.completed_exit <= self.sent_through {
            return;
        }
        // `held` is sorted by exit: look at the first output not yet covered by a sent frame.
        let first_unsent = self.held.partition_point(|(e, _, _)| *e <= self.sent_through);
        let output_waits = self.held.get(first_unsent).is_some_and(|(e, _, _)| *e <= self.completed_exit);
        let ready_bytes: usize =
            self.pending.iter().take_while(|e| e.exit <= self.completed_exit).map(LogEntry::wire_len).sum();
        // Like Nagle's algorithm: an output ships its exit at once unless enough frames are
        // still unacknowledged; then it rides with the frame sent when the next ack arrives.
        // Under load this batches several exits per frame and per ack (each a system call and a
        // cross-CPU wake-up on both sides); with few requests in flight it adds nothing.
        let in_flight = self.frames_in_flight.len() >= self.cfg.output_frames_in_flight;
        let due = force
            || (output_waits && !in_flight)
            || ready_bytes >= self.cfg.batch_bytes
            || now.saturating_sub(self.last_flush) >= self.cfg.flush_interval;
        if due {
            self.flush(now);
        }
    }

    fn flush(&mut self, now: Nanos) {
        let through = self.completed_exit;
        let max = self.cfg.max_payload;
        if self.acked_through >= self.sent_through {
            // Nothing was outstanding: the stall clock starts now, not at the last old ack.
            self.last_ack_progress = now;
        }
        loop {
            let mut entries = Vec::new();
            let mut len = 8 + 8 + 4;
            while let Some(e) = self.pending.front() {
                if e.exit > through || len + e.wire_len() > max {
                    break;
                }
                len += e.wire_len();
                let e = self.pending.pop_front().expect("front exists");
                self.pending_bytes -= e.wire_len();
                entries.push(e);
            }
            // A frame cut short by the size limit may end inside an exit: claim only the exits
            // before the next entry, so the backup never replays an exit it has half of.
            let more = self.pending.front().is_some_and(|e| e.exit <= through);
            let frame_through = match self.pending.front() {
                Some(next) if more => (next.exit - 1).clamp(self.sent_through, through),
                _ => through,
            };
            let n = entries.len() as u64;
            for e in &entries {
                self.unacked.push_back((e.exit, e.wire_len()));
                self.unacked_bytes += e.wire_len();
                self.metrics.log_bytes_sent += e.bytes.len() as u64;
            }
            self.metrics.log_entries_sent += n;
            self.send(Message::Log { first_seq: self.next_seq, through_exit: frame_through, entries });
            self.next_seq += n;
            self.sent_through = frame_through;
            self.frames_in_flight.push_back(frame_through);
            if !more {
                break;
            }
        }
        if self.lag_samples.len() >= MAX_LAG_SAMPLES {
            self.lag_samples.pop_front();
        }
        self.lag_samples.push_back((through, now));
        self.last_flush = now;
        self.metrics.unacked_bytes = (self.unacked_bytes + self.pending_bytes) as u64;
        self.update_lag(now);
    }

    fn heartbeat(&mut self, now: Nanos) {
        if now.saturating_sub(self.last_heartbeat_sent) >= self.cfg.heartbeat_interval {
            self.last_heartbeat_sent = now;
            self.send(Message::Heartbeat { sent_at_nanos: now });
        }
    }

    fn suspect(&mut self, why: Suspicion) {
        let in_sync = self.backup_in_sync();
        if matches!(self.state, State::Cloning(_)) {
            // Clone steps not yet taken are moot.
            self.ready.clone_actions.clear();
            self.ready.clone_actions.push(CloneAction::Abort);
        }
        self.metrics.suspicions += 1;
        self.metrics.protected = false;
        self.ready.role_events.push(RoleEvent::Suspecting(why));
        self.state = State::Consulting { retry_at: None, in_sync };
        self.ask_arbiter();
    }

    fn backup_in_sync(&self) -> bool {
        matches!(self.state, State::Protected | State::Consulting { in_sync: true, .. })
    }

    fn ask_arbiter(&mut self) {
        if let State::Consulting { retry_at, .. } = &mut self.state {
            *retry_at = None;
        }
        self.metrics.arbiter_consultations += 1;
        self.ready.consult_arbiter = Some(ConsultArbiter { seen_epoch: self.epoch });
    }

    fn abort_clone(&mut self) {
        self.state = State::Solo;
        // Clone steps not yet taken are moot.
        self.ready.clone_actions.clear();
        self.ready.clone_actions.push(CloneAction::Abort);
        self.ready.close_channel = true;
        self.ready.role_events.push(RoleEvent::Degraded { epoch: self.epoch });
    }

    fn halt(&mut self, reason: HaltReason) {
        self.state = State::Halted;
        self.metrics.protected = false;
        for (_, id, _) in std::mem::take(&mut self.held) {
            self.metrics.outputs_discarded += 1;
            self.ready.discarded.push(id);
        }
        self.metrics.outputs_held = 0;
        self.drop_log();
        self.ready.close_channel = true;
        self.ready.consult_arbiter = None;
        self.ready.role_events.push(RoleEvent::Halted(reason));
    }

    fn violation(&mut self, what: String, _now: Nanos) -> Result<(), FtError> {
        match self.state {
            State::Protected => self.suspect(Suspicion::ProtocolViolation),
            State::Cloning(_) => self.abort_clone(),
            // Solo: a stray connection that did not say Hello first; just drop it.
            State::Solo | State::Consulting { .. } | State::Halted => {}
        }
        self.ready.close_channel = true;
        Err(FtError::Protocol(what))
    }

    fn drop_log(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
        self.unacked.clear();
        self.frames_in_flight.clear();
        self.unacked_bytes = 0;
        self.lag_samples.clear();
        self.metrics.unacked_bytes = 0;
        self.metrics.lag_nanos = 0;
    }

    fn release(&mut self, exit: u64, id: OutputId, since: Nanos, now: Nanos) {
        self.metrics.outputs_released += 1;
        self.ready.released.push(Released { id, exit, held_nanos: now.saturating_sub(since) });
    }

    fn send(&mut self, m: Message) {
        self.metrics.frames_sent += 1;
        self.ready.messages.push(m);
    }
}
