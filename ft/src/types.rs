//! Types shared by [`Primary`](crate::Primary) and [`Backup`](crate::Backup): configuration, the
//! [`Ready`] output of every call, arbiter results and errors.

use thiserror::Error;

use crate::wire::{self, Message, Page, RefuseReason};

/// Monotonic time in nanoseconds, supplied by the driver (e.g. from a process-wide `Instant`).
/// The state machines never read a clock themselves, so tests control time exactly.
pub type Nanos = u64;

/// One millisecond in [`Nanos`].
pub const MILLIS: Nanos = 1_000_000;

/// Tuning knobs. The defaults aim at failover under a second on a LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FtConfig {
    /// How often each side sends a heartbeat.
    pub heartbeat_interval: Nanos,
    /// Silence (no frame at all) after which the peer is presumed dead.
    pub heartbeat_timeout: Nanos,
    /// Primary only: log outstanding and no ack progress for this long = stalled channel.
    pub stall_timeout: Nanos,
    /// Delay before asking the arbiter again after it was unreachable.
    pub arbiter_retry: Nanos,
    /// Primary: unacknowledged (sent or unsent) log bytes above which the vCPU must pause.
    pub log_budget_bytes: usize,
    /// Primary: flush the log as soon as this many bytes of complete exits are waiting.
    pub batch_bytes: usize,
    /// Primary: flush at least this often while exits complete (0 = after every exit).
    pub flush_interval: Nanos,
    /// Primary: an output ships its exit's log at once while fewer log frames than this are
    /// unacknowledged; otherwise it rides with the frame sent when the next ack arrives (like
    /// Nagle's algorithm). Under load this puts several exits in one frame and one ack; with few
    /// requests in flight it adds no wait. `usize::MAX` ships every output's exit at once.
    pub output_frames_in_flight: usize,
    /// Execution lag (how far in time the backup's replay trails the primary) tolerated before
    /// the primary is slowed down.
    pub lag_target: Nanos,
    /// Upper bound of the per-exit sleep the throttle asks for.
    pub max_throttle_sleep: Nanos,
    /// Throttle gain: sleep per exit = (lag - target) / `throttle_divisor`.
    pub throttle_divisor: u64,
    /// Clone: at most this many rounds in all, the final (paused) delta included.
    pub clone_max_rounds: u32,
    /// Clone: stop pre-copying once a round leaves at most this many dirty pages.
    pub clone_dirty_threshold_pages: u64,
    /// Bound on a frame's payload; must be equal on both sides.
    pub max_payload: usize,
    /// Backup: send a replay-progress-only ack at most this often.
    pub ack_interval: Nanos,
    /// Backup: with more unreplayed log than this buffered, acks wait for replay to catch up,
    /// which back-pressures the primary through its log budget.
    pub backup_buffer_budget: usize,
}

impl Default for FtConfig {
    fn default() -> Self {
        FtConfig {
            heartbeat_interval: 100 * MILLIS,
            heartbeat_timeout: 500 * MILLIS,
            stall_timeout: 1_000 * MILLIS,
            arbiter_retry: 200 * MILLIS,
            log_budget_bytes: 8 << 20,
            batch_bytes: 64 << 10,
            flush_interval: MILLIS,
            // One: an output ships its exit at once only when no frame is in flight, that is
            // when no acknowledgement is coming to carry it; otherwise it rides with the frame
            // sent on that ack. The agent's vCPU thread then ships (a system call) only when
            // the channel is idle, and under load every frame rides on an ack.
            output_frames_in_flight: 1,
            lag_target: 50 * MILLIS,
            max_throttle_sleep: MILLIS,
            throttle_divisor: 100,
            clone_max_rounds: 8,
            clone_dirty_threshold_pages: 256,
            max_payload: wire::DEFAULT_MAX_PAYLOAD,
            ack_interval: MILLIS,
            backup_buffer_budget: 64 << 20,
        }
    }
}

/// Who this VM is; both sides must agree or the handshake is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmIdentity {
    /// The FTVM's id (e.g. `namespace/name`), at most [`wire::MAX_VM_ID_LEN`](crate::wire::MAX_VM_ID_LEN) bytes.
    pub vm_id: String,
    /// Digest of the guest image.
    pub guest_image: [u8; 32],
}

/// Sizes announced in `CloneBegin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmGeometry {
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Disk size in bytes.
    pub disk_bytes: u64,
    /// Page size of the dirty log (usually 4096).
    pub page_size: u32,
}

/// Driver-chosen handle of an external output (e.g. a reply buffered on a client connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OutputId(pub u64);

/// An output that may now leave the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Which output.
    pub id: OutputId,
    /// The exit that produced it.
    pub exit: u64,
    /// How long it was held (for the output-hold histogram).
    pub held_nanos: Nanos,
}

/// What the driver's arbiter call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArbiterOutcome {
    /// This side took the arbiter from the seen epoch to `epoch`.
    Won {
        /// The new epoch, now owned by this side.
        epoch: u64,
    },
    /// Another side holds `epoch`.
    Lost {
        /// Who won (for logs).
        winner: String,
        /// The epoch the winner holds.
        epoch: u64,
    },
    /// The arbiter could not be asked (network, API server down). The machine stalls and asks
    /// again after [`FtConfig::arbiter_retry`]; it never decides on its own.
    Unreachable,
}

/// Request to the driver: call the arbiter's test-and-set for the transition out of
/// `seen_epoch`, then report with `arbiter_result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsultArbiter {
    /// The epoch this side currently holds or last saw.
    pub seen_epoch: u64,
}

/// Why a side suspected its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspicion {
    /// No frame from the peer within the heartbeat timeout.
    HeartbeatTimeout,
    /// Primary: log outstanding and no ack progress within the stall timeout.
    StalledChannel,
    /// The connection closed or failed.
    ChannelClosed,
    /// The peer broke the protocol.
    ProtocolViolation,
    /// A peer showed an epoch newer than ours: we may have been replaced.
    NewerEpochSeen,
}

/// Why a side halted. A halted side never releases output again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaltReason {
    /// The arbiter chose the other side.
    LostArbiter {
        /// Who won.
        winner: String,
        /// The winner's epoch.
        epoch: u64,
    },
    /// Backup: the primary refused the handshake.
    Refused(RefuseReason),
    /// Backup: the primary failed before the clone completed, so there is no state to go live with.
    PrimaryLostBeforeSync,
    /// Backup: the primary's epoch is older than the one this backup knows.
    PrimaryStale {
        /// The epoch the backup knows.
        known: u64,
        /// The primary's epoch.
        primary: u64,
    },
}

impl HaltReason {
    /// True when a *fresh* backup may simply try again later (the primary was busy with another
    /// backup or was itself in doubt); false when retrying cannot help without a configuration
    /// change or a new arbiter epoch.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            HaltReason::Refused(RefuseReason::Busy | RefuseReason::NotPrimary) | HaltReason::PrimaryLostBeforeSync
        )
    }
}

/// Role transitions reported to the driver (for the agent's state and metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleEvent {
    /// Primary: a backup is in sync; the output rule applies from now on.
    Protected {
        /// Exit at which the clone was taken.
        from_exit: u64,
    },
    /// Primary: running without a backup (after winning the arbiter, or a clone that failed).
    Degraded {
        /// The epoch held.
        epoch: u64,
    },
    /// Primary or backup: the peer is suspected; the arbiter will decide.
    Suspecting(Suspicion),
    /// Backup: clone complete, replaying the log.
    Synced {
        /// Exit the clone was taken at.
        from_exit: u64,
    },
    /// Backup: stopped taking log and is replaying what it has before asking the arbiter.
    Draining(Suspicion),
    /// Backup: the primary's guest stopped on its own at `exit` (powered off or failed). The
    /// replay stops there too; this side never goes live.
    VmEnded {
        /// The exit at which the guest stopped.
        exit: u64,
    },
    /// Backup: won the arbiter; the driver takes the [`Primary`](crate::Primary) from
    /// [`Backup::promote`](crate::Backup::promote), reissues pending I/O, continues the guest
    /// live from `resume_after_exit + 1` and accepts clients.
    Promoted {
        /// Epoch won.
        epoch: u64,
        /// Last exit replayed; the guest continues live from the next one.
        resume_after_exit: u64,
    },
    /// Halted for good.
    Halted(HaltReason),
}

/// Execution-lag control decision for the primary's vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Throttle {
    /// Run at full speed.
    #[default]
    Full,
    /// The backup trails by more than the lag target: sleep this long after each exit.
    Slow {
        /// Sleep per guest-caused exit.
        sleep_per_exit: Nanos,
    },
}

/// What the primary's driver must do for a clone hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneAction {
    /// Send pre-copy round `round` with `clone_pages`/`clone_disk`, then call
    /// `clone_round_done` with the number of pages dirtied meanwhile. Round 0 is a full copy:
    /// start dirty logging first (KVM's log plus pages the VMM writes), then send every page and
    /// the whole disk. Later rounds send what was dirtied since the previous round.
    CopyRound {
        /// Round number.
        round: u32,
    },
    /// Pause the vCPU (Ready::pause_vcpu is also set), send the remaining dirty pages and disk
    /// blocks as round `round`, capture vCPU and device state, then call `clone_final`.
    PauseAndFinalize {
        /// Round number of the final delta.
        round: u32,
    },
    /// The new backup went away: stop dirty logging and drop any clone work.
    Abort,
}

/// Clone data the backup's driver must apply, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneData {
    /// Prepare memory and disk of these sizes.
    Begin {
        /// Guest memory size.
        memory_bytes: u64,
        /// Disk size.
        disk_bytes: u64,
        /// Page size.
        page_size: u32,
    },
    /// Write these pages into guest memory.
    Pages {
        /// Pre-copy round.
        round: u32,
        /// The pages.
        pages: Vec<Page>,
    },
    /// Write these bytes into the disk.
    Disk {
        /// Offset.
        offset: u64,
        /// Bytes.
        bytes: Vec<u8>,
    },
    /// Restore vCPU and device state; the replica now equals the primary after `exit`.
    Final {
        /// Exit the state belongs to.
        exit: u64,
        /// Opaque vCPU state.
        vcpu_state: Vec<u8>,
        /// Opaque device state.
        device_state: Vec<u8>,
    },
}

/// Everything the driver must act on after a call. Take it with `take_ready()` after each batch
/// of calls; fields accumulate until taken, except the level fields (`pause_vcpu`, `throttle`),
/// which always describe the present.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ready {
    /// Frames to write to the channel, in order.
    pub messages: Vec<Message>,
    /// Primary: outputs that may now leave, in the order they became safe.
    pub released: Vec<Released>,
    /// Primary: held outputs that must be dropped, never sent (this side halted).
    pub discarded: Vec<OutputId>,
    /// Primary: the vCPU must not run (log budget exceeded, clone final pause, or halted).
    pub pause_vcpu: bool,
    /// Primary: execution-lag control.
    pub throttle: Throttle,
    /// Role transitions, in order.
    pub role_events: Vec<RoleEvent>,
    /// Ask the arbiter and report back with `arbiter_result`.
    pub consult_arbiter: Option<ConsultArbiter>,
    /// Primary: clone work for the driver.
    pub clone_actions: Vec<CloneAction>,
    /// Backup: clone data to apply, in order.
    pub clone_data: Vec<CloneData>,
    /// Close the channel connection (after writing `messages`).
    pub close_channel: bool,
}

impl Ready {
    /// True when there is nothing to act on (ignoring the level fields `pause_vcpu` and
    /// `throttle`, which the driver compares with what it last applied).
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.released.is_empty()
            && self.discarded.is_empty()
            && self.role_events.is_empty()
            && self.consult_arbiter.is_none()
            && self.clone_actions.is_empty()
            && self.clone_data.is_empty()
            && !self.close_channel
    }

    /// Encodes `messages` back to back into `out`, ready for one socket write.
    pub fn encode_messages(&self, max_payload: usize, out: &mut Vec<u8>) -> Result<(), wire::WireError> {
        for m in &self.messages {
            wire::encode(m, max_payload, out)?;
        }
        Ok(())
    }
}

/// The inputs both sides take from the channel, the timers and the arbiter, so one driver can
/// run either: frames arrive ([`Endpoint::step`]), time passes ([`Endpoint::tick`]), the
/// connection ends ([`Endpoint::peer_disconnected`]), the arbiter answers
/// ([`Endpoint::arbiter_result`]); after any of them the driver acts on
/// [`Endpoint::take_ready`]. Role-specific inputs (the vCPU's log and outputs on a primary, replay
/// progress on a backup) stay methods of [`Primary`](crate::Primary) and
/// [`Backup`](crate::Backup).
pub trait Endpoint {
    /// A frame arrived from the peer. On `Err` the machine has already reacted (channel closed,
    /// peer treated as failed); the error is for the driver's log.
    fn step(&mut self, msg: Message, now: Nanos) -> Result<(), FtError>;
    /// Time passed: heartbeats, failure detection, arbiter retries, paced flushes and acks.
    fn tick(&mut self, now: Nanos);
    /// The channel connection closed or failed (EOF, reset, decode error).
    fn peer_disconnected(&mut self, now: Nanos);
    /// The arbiter answered the request from [`Ready::consult_arbiter`].
    fn arbiter_result(&mut self, outcome: ArbiterOutcome, now: Nanos);
    /// Takes what the driver must do now.
    fn take_ready(&mut self) -> Ready;
}

impl Endpoint for crate::Primary {
    fn step(&mut self, msg: Message, now: Nanos) -> Result<(), FtError> {
        crate::Primary::step(self, msg, now)
    }
    fn tick(&mut self, now: Nanos) {
        crate::Primary::tick(self, now)
    }
    fn peer_disconnected(&mut self, now: Nanos) {
        crate::Primary::peer_disconnected(self, now)
    }
    fn arbiter_result(&mut self, outcome: ArbiterOutcome, now: Nanos) {
        crate::Primary::arbiter_result(self, outcome, now)
    }
    fn take_ready(&mut self) -> Ready {
        crate::Primary::take_ready(self)
    }
}

impl Endpoint for crate::Backup {
    fn step(&mut self, msg: Message, now: Nanos) -> Result<(), FtError> {
        crate::Backup::step(self, msg, now)
    }
    fn tick(&mut self, now: Nanos) {
        crate::Backup::tick(self, now)
    }
    fn peer_disconnected(&mut self, now: Nanos) {
        crate::Backup::peer_disconnected(self, now)
    }
    fn arbiter_result(&mut self, outcome: ArbiterOutcome, now: Nanos) {
        crate::Backup::arbiter_result(self, outcome, now)
    }
    fn take_ready(&mut self) -> Ready {
        crate::Backup::take_ready(self)
    }
}

/// Errors from calls on the state machines. None leaves the machine inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FtError {
    /// The peer sent something the protocol forbids here; the channel is being closed
    /// (see `Ready::close_channel`) and the peer is treated as failed.
    #[error("peer violated the FT protocol: {0}; the channel was closed and the peer treated as failed")]
    Protocol(String),
    /// A log entry or clone blob cannot fit in one frame.
    #[error(
        "{what} of {len} bytes cannot fit in one frame (limit {max} bytes); split it in the agent \
         or raise max_payload on both sides"
    )]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The payload limit.
        max: usize,
    },
    /// An entry was appended for an exit already reported complete.
    #[error(
        "log entry for exit {exit} appended after exit_complete({completed}): the recorder must \
         append an exit's entries before completing it"
    )]
    ExitAlreadyComplete {
        /// The entry's exit.
        exit: u64,
        /// Highest completed exit.
        completed: u64,
    },
    /// A clone call arrived while no clone is in progress (e.g. the backup went away).
    #[error("no clone hand-over is in progress (the backup went away or it already finished); stop sending clone data")]
    NotCloning,
    /// The clone call does not fit the current step (e.g. `clone_final` before the final pause).
    #[error("clone step out of order: {0}; follow the CloneAction sequence the primary asks for")]
    CloneOutOfOrder(&'static str),
}
