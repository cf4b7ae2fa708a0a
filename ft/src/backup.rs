//! The backup's side of the protocol.
//!
//! ```text
//!          HelloAck         CloneBegin        CloneFinal + CloneDone
//!  new ──> [Handshaking] ──> [Cloning] ────────────────────────────> [Replaying]
//!            | Refuse,          | primary lost                          | heartbeat timeout,
//!            | stale primary    | (no state to go live with)            | channel closed, bad frame
//!            v                  v                                       v
//!          [Halted] <────────────────────────────────────────── [Draining] (no more log taken;
//!            ^                                                      |        replay what we have)
//!            | arbiter Lost                                          | replayed everything
//!            +─────────────────── [Consulting] <────────────────────+
//!                                   |   ^ Unreachable: retry later
//!                                   | arbiter Won
//!                                   v
//!                               [Promoted]  (driver builds a Primary and goes live)
//!
//!   [Replaying] --VmEnded{exit}--> [Ended]  the guest stopped on its own; the replay stops
//!                                           there too, and nothing makes this side go live
//! ```
//!
//! While replaying, the backup acknowledges the highest exit it holds the complete log for
//! (`received through`), and separately how far it replayed. Outputs of the replayed guest are
//! suppressed by the driver (see [`Backup::suppress_outputs`]).

use std::collections::VecDeque;

use crate::types::*;
use crate::wire::{LogEntry, Message, PROTOCOL_VERSION, RefuseReason, Role};

/// Counters and gauges for the driver's metrics exporter.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BackupMetrics {
    /// Log entries received.
    pub log_entries_received: u64,
    /// Log entry bytes received.
    pub log_bytes_received: u64,
    /// Frames received (all kinds).
    pub frames_received: u64,
    /// Frames produced.
    pub frames_sent: u64,
    /// Highest exit whose complete log is held.
    pub received_through: u64,
    /// Highest exit replayed.
    pub replayed_exit: u64,
    /// Entries received and not yet replayed (taken or not).
    pub buffered_entries: u64,
    /// Bytes of those entries (bounded by `backup_buffer_budget` through held acks).
    pub buffered_bytes: u64,
    /// Acks sent.
    pub acks_sent: u64,
    /// Clone bytes received (pages, disk, state).
    pub clone_bytes_received: u64,
    /// Last heartbeat round-trip time.
    pub heartbeat_rtt_nanos: Nanos,
    /// Times the arbiter was consulted.
    pub arbiter_consultations: u64,
    /// Log frames ignored because the backup was going live.
    pub log_frames_ignored: u64,
    /// The epoch known.
    pub epoch: u64,
}

/// The backup's state as seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupState {
    /// Sent Hello, waiting for the answer.
    Handshaking,
    /// Receiving the clone.
    Cloning,
    /// In sync, replaying the log.
    Replaying,
    /// Primary suspected; replaying what was received before asking the arbiter.
    Draining,
    /// Waiting for the arbiter.
    Consulting,
    /// Won: the driver must go live as a primary.
    Promoted {
        /// Epoch won.
        epoch: u64,
        /// Last replayed exit.
        resume_after_exit: u64,
    },
    /// Halted for good.
    Halted,
    /// The primary's guest stopped on its own at `exit`: the replay ends there and this side
    /// never goes live.
    Ended {
        /// The exit at which the guest stopped.
        exit: u64,
    },
}

#[derive(Debug)]
enum State {
    Handshaking,
    Cloning {
        /// Sizes from `CloneBegin`; everything after must fit in them.
        geometry: Option<VmGeometry>,
        final_exit: Option<u64>,
    },
    Replaying,
    Draining,
    Consulting {
        retry_at: Option<Nanos>,
    },
    Promoted {
        epoch: u64,
    },
    Halted,
    Ended {
        exit: u64,
    },
}

/// Sans-IO backup. See the crate docs for how a driver uses it.
#[derive(Debug)]
pub struct Backup {
    cfg: FtConfig,
    id: VmIdentity,
    epoch: u64,
    state: State,
    buffer: VecDeque<LogEntry>,
    /// Received entries not yet *replayed* (whether or not the driver took them yet): (exit,
    /// wire bytes). This, not `buffer`, is what the buffer budget bounds: a driver may take
    /// entries eagerly and still be far behind.
    unreplayed: VecDeque<(u64, usize)>,
    unreplayed_bytes: usize,
    next_seq: u64,
    /// Exit of the last entry received (entries arrive in non-decreasing exit order).
    last_entry_exit: u64,
    received_through: u64,
    replayed_exit: u64,
    acked: (u64, u64),
    last_ack_sent: Nanos,
    last_heard: Nanos,
    last_heartbeat_sent: Nanos,
    ready: Ready,
    metrics: BackupMetrics,
}

impl Backup {
    /// A backup for `id` that knows arbiter epoch `epoch` (read from the arbiter before
    /// connecting). The first `take_ready()` holds the `Hello` to send on the new connection.
    pub fn new(cfg: FtConfig, id: VmIdentity, epoch: u64, now: Nanos) -> Self {
        let mut b = Backup {
            cfg,
            id: id.clone(),
            epoch,
            state: State::Handshaking,
            buffer: VecDeque::new(),
            unreplayed: VecDeque::new(),
            unreplayed_bytes: 0,
            next_seq: 0,
            last_entry_exit: 0,
            received_through: 0,
            replayed_exit: 0,
            acked: (0, 0),
            last_ack_sent: now,
            last_heard: now,
            last_heartbeat_sent: now,
            ready: Ready::default(),
            metrics: BackupMetrics { epoch, ..BackupMetrics::default() },
        };
        b.send(Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            vm_id: id.vm_id,
            epoch,
            role: Role::Backup,
            guest_image: id.guest_image,
        });
        b
    }

    /// A frame arrived from the primary. On `Err` the machine already reacted (channel closed,
    /// primary treated as failed); the error is for the driver's log.
    pub fn step(&mut self, msg: Message, now: Nanos) -> Result<(), FtError> {
        self.metrics.frames_received += 1;
        match self.state {
            State::Handshaking | State::Cloning { .. } | State::Replaying => self.last_heard = now,
            // Going live or decided: the old primary is no longer listened to.
            State::Draining
            | State::Consulting { .. }
            | State::Promoted { .. }
            | State::Halted
            | State::Ended { .. } => {
                if matches!(msg, Message::Log { .. }) {
                    self.metrics.log_frames_ignored += 1;
                }
                return Ok(());
            }
        }
        match (&mut self.state, msg) {
            (State::Handshaking, Message::HelloAck { protocol_version, epoch }) => {
                if protocol_version != PROTOCOL_VERSION {
                    let reason =
                        RefuseReason::IncompatibleVersion { supported: PROTOCOL_VERSION, got: protocol_version };
                    self.send(Message::Refuse { reason: reason.clone() });
                    self.halt(HaltReason::Refused(reason));
                } else if epoch < self.epoch {
                    // A primary from an older epoch lost a failover it may not know about yet:
                    // cloning from it could resurrect a replaced VM.
                    self.send(Message::Refuse { reason: RefuseReason::StaleEpoch { current: self.epoch, got: epoch } });
                    self.halt(HaltReason::PrimaryStale { known: self.epoch, primary: epoch });
                } else if epoch > self.epoch {
                    return self.violation(format!("primary accepted our epoch {} but announced {epoch}", self.epoch));
                } else {
                    self.state = State::Cloning { geometry: None, final_exit: None };
                    self.last_heartbeat_sent = now;
                }
                Ok(())
            }
            (State::Handshaking, Message::Refuse { reason }) => {
                self.halt(HaltReason::Refused(reason));
                Ok(())
            }
            (
                State::Cloning { geometry: geometry @ None, final_exit: None },
                Message::CloneBegin { memory_bytes, disk_bytes, page_size },
            ) => {
                *geometry = Some(VmGeometry { memory_bytes, disk_bytes, page_size });
                self.ready.clone_data.push(CloneData::Begin { memory_bytes, disk_bytes, page_size });
                Ok(())
            }
            (State::Cloning { geometry: Some(g), final_exit: None }, Message::ClonePages { round, pages }) => {
                let memory_bytes = g.memory_bytes;
                // The driver writes these into guest memory: refuse anything outside it.
                if let Some((gpa, data)) = pages
                    .iter()
                    .find(|(gpa, data)| gpa.checked_add(data.len() as u64).is_none_or(|end| end > memory_bytes))
                {
                    let what = format!(
                        "clone page at {gpa:#x} (+{} bytes) lies outside guest memory of {memory_bytes} bytes",
                        data.len()
                    );
                    return self.violation(what);
                }
                self.metrics.clone_bytes_received += pages.iter().map(|(_, p)| p.len() as u64).sum::<u64>();
                self.ready.clone_data.push(CloneData::Pages { round, pages });
                Ok(())
            }
            (State::Cloning { geometry: Some(g), final_exit: None }, Message::CloneDisk { offset, bytes }) => {
                let disk_bytes = g.disk_bytes;
                if offset.checked_add(bytes.len() as u64).is_none_or(|end| end > disk_bytes) {
                    let what = format!(
                        "clone disk data at {offset} (+{} bytes) lies outside the disk of {disk_bytes} bytes",
                        bytes.len()
                    );
                    return self.violation(what);
                }
                self.metrics.clone_bytes_received += bytes.len() as u64;
                self.ready.clone_data.push(CloneData::Disk { offset, bytes });
                Ok(())
            }
            (
                State::Cloning { geometry: Some(_), final_exit },
                Message::CloneFinal { exit, vcpu_state, device_state },
            ) if final_exit.is_none() => {
                *final_exit = Some(exit);
                self.metrics.clone_bytes_received += (vcpu_state.len() + device_state.len()) as u64;
                self.ready.clone_data.push(CloneData::Final { exit, vcpu_state, device_state });
                Ok(())
            }
            (State::Cloning { final_exit: Some(exit), .. }, Message::CloneDone) => {
                let exit = *exit;
                self.state = State::Replaying;
                self.received_through = exit;
                self.replayed_exit = exit;
                self.last_entry_exit = exit;
                self.next_seq = 0;
                self.acked = (exit, exit);
                self.metrics.received_through = exit;
                self.metrics.replayed_exit = exit;
                self.ready.role_events.push(RoleEvent::Synced { from_exit: exit });
                Ok(())
            }
            (State::Replaying, Message::Log { first_seq, through_exit, entries }) => {
                self.on_log(first_seq, through_exit, entries, now)
            }
            (State::Replaying, Message::VmEnded { exit }) => {
                // The primary ships the whole log before saying so: a gap would leave the
                // replay short of the stop.
                if exit != self.received_through {
                    return self.violation(format!(
                        "the primary says its guest stopped at exit {exit}, but the log received runs through {}",
                        self.received_through
                    ));
                }
                self.state = State::Ended { exit };
                self.ready.role_events.push(RoleEvent::VmEnded { exit });
                Ok(())
            }
            (State::Cloning { .. } | State::Replaying, Message::Heartbeat { sent_at_nanos }) => {
                self.send(Message::HeartbeatReply { sent_at_nanos });
                Ok(())
            }
            (State::Cloning { .. } | State::Replaying, Message::HeartbeatReply { sent_at_nanos }) => {
                self.metrics.heartbeat_rtt_nanos = now.saturating_sub(sent_at_nanos);
                Ok(())
            }
            (_, other) => {
                let what = format!("unexpected {:?} in state {:?}", other.kind(), self.state());
                self.violation(what)
            }
        }
    }

    /// Time passed: heartbeats, failure detection, arbiter retries, paced acks.
    pub fn tick(&mut self, now: Nanos) {
        match self.state {
            State::Handshaking | State::Cloning { .. } | State::Replaying => {
                if now.saturating_sub(self.last_heard) > self.cfg.heartbeat_timeout {
                    self.primary_failed(Suspicion::HeartbeatTimeout);
                    return;
                }
                if !matches!(self.state, State::Handshaking)
                    && now.saturating_sub(self.last_heartbeat_sent) >= self.cfg.heartbeat_interval
                {
                    self.last_heartbeat_sent = now;
                    self.send(Message::Heartbeat { sent_at_nanos: now });
                }
                self.maybe_ack(now);
            }
            State::Consulting { retry_at: Some(t) } if now >= t => self.ask_arbiter(),
            _ => {}
        }
    }

    /// The channel closed or failed (EOF, reset, decode error).
    pub fn peer_disconnected(&mut self, _now: Nanos) {
        if matches!(self.state, State::Handshaking | State::Cloning { .. } | State::Replaying) {
            self.primary_failed(Suspicion::ChannelClosed);
        }
    }

    /// Entries the replayer may apply now, in order. The replayer may execute the guest up to
    /// (and including) exit [`Backup::replay_limit`], never beyond.
    pub fn take_replayable(&mut self) -> Vec<LogEntry> {
        let mut out = Vec::new();
        while self.buffer.front().is_some_and(|e| e.exit <= self.received_through) {
            out.push(self.buffer.pop_front().expect("front exists"));
        }
        out
    }

    /// Highest exit the replayer may execute through: the primary finished it and every entry
    /// of it is here.
    pub fn replay_limit(&self) -> u64 {
        self.received_through
    }

    /// The replayer finished exit `exit`. During go-live, finishing the last received exit
    /// triggers the arbiter request.
    pub fn replayed(&mut self, exit: u64, now: Nanos) {
        let exit = exit.min(self.received_through);
        if exit > self.replayed_exit {
            self.replayed_exit = exit;
            self.metrics.replayed_exit = exit;
            while self.unreplayed.front().is_some_and(|(e, _)| *e <= exit) {
                let (_, bytes) = self.unreplayed.pop_front().expect("front exists");
                self.unreplayed_bytes -= bytes;
            }
            self.update_buffer_metrics();
        }
        match self.state {
            State::Replaying => self.maybe_ack(now),
            State::Draining => self.check_drained(),
            _ => {}
        }
    }

    /// The arbiter answered the request from `Ready::consult_arbiter`.
    pub fn arbiter_result(&mut self, outcome: ArbiterOutcome, now: Nanos) {
        if !matches!(self.state, State::Consulting { retry_at: None }) {
            return;
        }
        match outcome {
            ArbiterOutcome::Won { epoch } => {
                self.epoch = epoch;
                self.metrics.epoch = epoch;
                self.state = State::Promoted { epoch };
                // Entries of an exit the primary never finished are not part of our state.
                self.buffer.clear();
                self.forget_unreplayed();
                self.ready.role_events.push(RoleEvent::Promoted { epoch, resume_after_exit: self.replayed_exit });
            }
            ArbiterOutcome::Lost { winner, epoch } => self.halt(HaltReason::LostArbiter { winner, epoch }),
            ArbiterOutcome::Unreachable => {
                self.state = State::Consulting { retry_at: Some(now.saturating_add(self.cfg.arbiter_retry)) }
            }
        }
    }

    /// After [`RoleEvent::Promoted`]: the [`Primary`](crate::Primary) to drive from now on, at
    /// the won epoch and the resume exit, with this backup's configuration and identity. It starts
    /// *Solo* (no backup yet, outputs released at once). `None` unless promoted.
    pub fn promote(&self, geometry: VmGeometry, now: Nanos) -> Option<crate::Primary> {
        let State::Promoted { epoch } = self.state else {
            return None;
        };
        Some(crate::Primary::new(self.cfg.clone(), self.id.clone(), geometry, epoch, self.replayed_exit, now))
    }

    /// Takes what the driver must do now.
    pub fn take_ready(&mut self) -> Ready {
        std::mem::take(&mut self.ready)
    }

    /// Outputs of the guest must be dropped (true until promoted). Replayed outputs were already
    /// released, or not, by the primary; sending them again would duplicate them.
    pub fn suppress_outputs(&self) -> bool {
        !matches!(self.state, State::Promoted { .. })
    }

    /// Current state.
    pub fn state(&self) -> BackupState {
        match self.state {
            State::Handshaking => BackupState::Handshaking,
            State::Cloning { .. } => BackupState::Cloning,
            State::Replaying => BackupState::Replaying,
            State::Draining => BackupState::Draining,
            State::Consulting { .. } => BackupState::Consulting,
            State::Promoted { epoch } => BackupState::Promoted { epoch, resume_after_exit: self.replayed_exit },
            State::Halted => BackupState::Halted,
            State::Ended { exit } => BackupState::Ended { exit },
        }
    }

    /// Highest exit whose complete log is held.
    pub fn received_through(&self) -> u64 {
        self.received_through
    }

    /// Highest exit replayed.
    pub fn replayed_exit(&self) -> u64 {
        self.replayed_exit
    }

    /// Counters for metrics.
    pub fn metrics(&self) -> &BackupMetrics {
        &self.metrics
    }

    // ----- internals -----

    fn on_log(&mut self, first_seq: u64, through: u64, entries: Vec<LogEntry>, now: Nanos) -> Result<(), FtError> {
        if first_seq != self.next_seq {
            return self
                .violation(format!("log sequence gap: expected entry {}, frame starts at {first_seq}", self.next_seq));
        }
        if through < self.received_through {
            return self.violation(format!("log through_exit went back from {} to {through}", self.received_through));
        }
        let mut last = self.last_entry_exit;
        for e in &entries {
            if e.exit <= self.received_through || e.exit < last {
                return self.violation(format!(
                    "log entry for exit {} out of order (received through {}, last entry exit {last})",
                    e.exit, self.received_through
                ));
            }
            last = e.exit;
        }
        self.last_entry_exit = last;
        self.next_seq += entries.len() as u64;
        self.metrics.log_entries_received += entries.len() as u64;
        for e in entries {
            self.metrics.log_bytes_received += e.bytes.len() as u64;
            self.unreplayed_bytes += e.wire_len();
            self.unreplayed.push_back((e.exit, e.wire_len()));
            self.buffer.push_back(e);
        }
        self.received_through = through;
        self.metrics.received_through = through;
        self.update_buffer_metrics();
        self.maybe_ack(now);
        Ok(())
    }

    /// Acks new received-through at once (held outputs wait for it); replay-only progress at
    /// most every `ack_interval`. With more unreplayed log buffered than the budget, only what was
    /// replayed is acknowledged, so the primary's log budget pauses it until replay catches up.
    fn maybe_ack(&mut self, now: Nanos) {
        if !matches!(self.state, State::Replaying) {
            return;
        }
        let over_budget = self.unreplayed_bytes > self.cfg.backup_buffer_budget;
        let through = if over_budget { self.acked.0.max(self.replayed_exit) } else { self.received_through };
        let cur = (through, self.replayed_exit);
        if cur == self.acked {
            return;
        }
        let urgent = !over_budget && through > self.acked.0;
        if urgent || now.saturating_sub(self.last_ack_sent) >= self.cfg.ack_interval {
            self.acked = cur;
            self.last_ack_sent = now;
            self.metrics.acks_sent += 1;
            self.send(Message::Ack { through_exit: cur.0, replayed_exit: cur.1 });
        }
    }

    fn update_buffer_metrics(&mut self) {
        self.metrics.buffered_entries = self.unreplayed.len() as u64;
        self.metrics.buffered_bytes = self.unreplayed_bytes as u64;
    }

    fn forget_unreplayed(&mut self) {
        self.unreplayed.clear();
        self.unreplayed_bytes = 0;
        self.update_buffer_metrics();
    }

    fn primary_failed(&mut self, why: Suspicion) {
        self.ready.close_channel = true;
        match self.state {
            State::Replaying => {
                self.state = State::Draining;
                self.ready.role_events.push(RoleEvent::Draining(why));
                self.check_drained();
            }
            State::Handshaking | State::Cloning { .. } => self.halt(HaltReason::PrimaryLostBeforeSync),
            _ => {}
        }
    }

    fn check_drained(&mut self) {
        if matches!(self.state, State::Draining) && self.replayed_exit >= self.received_through {
            self.ask_arbiter();
        }
    }

    fn ask_arbiter(&mut self) {
        self.state = State::Consulting { retry_at: None };
        self.metrics.arbiter_consultations += 1;
        self.ready.consult_arbiter = Some(ConsultArbiter { seen_epoch: self.epoch });
    }

    fn halt(&mut self, reason: HaltReason) {
        self.state = State::Halted;
        self.buffer.clear();
        self.forget_unreplayed();
        self.ready.close_channel = true;
        self.ready.consult_arbiter = None;
        self.ready.role_events.push(RoleEvent::Halted(reason));
    }

    fn violation(&mut self, what: String) -> Result<(), FtError> {
        self.primary_failed(Suspicion::ProtocolViolation);
        Err(FtError::Protocol(what))
    }

    fn send(&mut self, m: Message) {
        self.metrics.frames_sent += 1;
        self.ready.messages.push(m);
    }
}
