//! The logging channel's wire format: frames on a TCP byte stream.
//!
//! # Frame layout
//!
//! Every message travels in one frame. Fixed-size integers are big-endian; the `Log` payload,
//! which is most of the traffic, uses LEB128 varints (see [`put_varint`]) so that an entry costs
//! its own bytes plus two or three (docs/protocol.md, "Payloads").
//!
//! ```text
//!  offset  size  field
//!  0       3     magic  b"LSF"            -- "this is the Lockstep FT channel"
//!  3       1     kind   (see MessageKind) -- which message the payload holds
//!  4       4     length of the payload in bytes, at most `max_payload`
//!  8       len   payload (layout per kind, see docs/protocol.md)
//!  8+len   4     CRC-32 (IEEE, crc32fast) over bytes 0 .. 8+len
//! ```
//!
//! The header is fixed-size and carries an explicit length, so a receiver knows after 8 bytes how
//! much more it needs, and refuses an oversized frame *before* buffering it (a peer cannot make us
//! allocate more than `max_payload`).
//!
//! # Conversation
//!
//! ```text
//!  backup (connects)                                   primary (listens)
//!    | Hello{version, vm_id, epoch, role=Backup, image} ->|  checks version, vm_id, epoch, image
//!    |<------------------------------ HelloAck | Refuse -|  Refuse{reason} then close
//!    |<-------------------------- CloneBegin{sizes} ----|  driver starts dirty logging
//!    |<------------------- ClonePages{round 0..n} / CloneDisk  (iterative pre-copy, vCPU runs)
//!    |<---------------------- ClonePages{final round} --|  vCPU paused for the final delta
//!    |<---------------- CloneFinal{exit X, vcpu, dev} --|
//!    |<--------------------------------- CloneDone ----|  vCPU resumes; output rule now applies
//!    |<------------- Log{first_seq, through_exit, ..} --|  entries of exits > X, in order
//!    |-- Ack{through_exit, replayed_exit} ------------->|  outputs of exits <= through_exit leave
//!    |<-------------- Heartbeat / HeartbeatReply ------>|  both ways, every heartbeat interval
//!    |<---------------------------- VmEnded{exit} ------|  the guest stopped on its own at `exit`
//! ```
//!
//! # Receiver state diagram ([`FrameReader`])
//!
//! ```text
//!            bytes arrive
//!   +------------------------------+
//!   v                              |
//! [Header?] --<8 bytes--> need more (Ok(None))
//!   | 8 bytes: bad magic / unknown kind / length > max  --> Err (connection is poisoned; close it)
//!   v
//! [Body?] --<8+len+4 bytes--> need more (Ok(None))
//!   | whole frame
//!   v
//! [Check CRC] --mismatch--> Err(ChecksumMismatch)
//!   v
//! [Parse payload] --short/trailing/invalid--> Err
//!   v
//! Ok(Some(Message)), frame consumed, back to [Header?]
//!
//! EOF: empty buffer -> clean close; anything buffered -> Err(UnexpectedEof)
//! ```
//!
//! Framing is split in two steps in the mini-redis manner: [`check_frame`] answers "is a whole frame
//! here, and how long is it?" without allocating, and [`parse_frame`] turns exactly one frame into a
//! [`Message`]. Neither panics on any input: every length is checked against what is present before
//! it is used, and element counts are bounded by the bytes that remain, so a hostile count cannot
//! trigger a huge allocation.

use thiserror::Error;

/// Version of the protocol spoken by this build. Bump it on purpose when a message layout changes;
/// peers with a different version are refused at the handshake.
pub const PROTOCOL_VERSION: u16 = 3;

/// The three magic bytes that open every frame.
pub const MAGIC: [u8; 3] = *b"LSF";

/// Bytes before the payload: magic, kind, length.
pub const HEADER_LEN: usize = 8;

/// Bytes after the payload: the CRC-32.
pub const TRAILER_LEN: usize = 4;

/// Default bound on a frame's payload (16 MiB). Large enough for a batch of log entries or a run of
/// pages, small enough that a corrupt length cannot make the receiver buffer gigabytes.
pub const DEFAULT_MAX_PAYLOAD: usize = 16 << 20;

/// Longest VM id accepted in a `Hello`: room for `namespace/name` (63 + 1 + 253 bytes in
/// Kubernetes) with margin.
pub const MAX_VM_ID_LEN: usize = 512;

/// Errors from decoding (or, for sizes, encoding) a frame. Any of them means the byte stream can no
/// longer be trusted: close the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The first bytes are not `LSF`.
    #[error(
        "bad frame magic {found:02x?}: the peer is not speaking the Lockstep FT channel protocol \
         (check that --channel-connect points at a primary's --channel-listen port)"
    )]
    BadMagic {
        /// The three bytes found.
        found: [u8; 3],
    },
    /// The kind byte names no message this build knows.
    #[error(
        "unknown message kind {0}: the peer runs a different protocol version; run matching \
         lockstep-agent versions on both sides"
    )]
    UnknownKind(u8),
    /// A frame (announced or being encoded) exceeds the configured bound.
    #[error(
        "frame payload of {len} bytes exceeds the limit of {max} bytes: the stream is corrupt or \
         the peer uses a larger limit; close the connection"
    )]
    FrameTooLarge {
        /// Payload length announced or needed.
        len: usize,
        /// The bound in force.
        max: usize,
    },
    /// The CRC in the trailer does not match the frame's bytes.
    #[error(
        "frame checksum mismatch (frame says {expected:#010x}, bytes give {computed:#010x}): the \
         channel corrupted data; close it and let the backup re-clone"
    )]
    ChecksumMismatch {
        /// CRC carried by the frame.
        expected: u32,
        /// CRC computed over the received bytes.
        computed: u32,
    },
    /// A payload ended before all of its fields were read.
    #[error(
        "{kind:?} payload is truncated (needed {needed} more bytes, {remaining} left): the peer \
         sent a malformed frame; close the connection and check both sides run the same version"
    )]
    Truncated {
        /// Message being parsed.
        kind: MessageKind,
        /// Bytes the next field needed.
        needed: usize,
        /// Bytes that were left.
        remaining: usize,
    },
    /// A payload had bytes left over after its last field.
    #[error(
        "{kind:?} payload has {extra} unexpected trailing bytes: the peer sent a malformed frame; \
         close the connection and check both sides run the same version"
    )]
    TrailingBytes {
        /// Message being parsed.
        kind: MessageKind,
        /// Bytes left over.
        extra: usize,
    },
    /// A field holds a value the protocol does not allow.
    #[error(
        "{kind:?} field `{field}` is invalid ({reason}): the peer sent a malformed frame; close \
         the connection"
    )]
    InvalidField {
        /// Message being parsed.
        kind: MessageKind,
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The stream closed in the middle of a frame.
    #[error(
        "connection closed in the middle of a frame ({buffered} bytes buffered): the peer died or \
         the network cut the stream; treat the peer as failed"
    )]
    UnexpectedEof {
        /// Bytes of the incomplete frame.
        buffered: usize,
    },
}

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// See [`Message::Hello`].
    Hello = 1,
    /// See [`Message::HelloAck`].
    HelloAck = 2,
    /// See [`Message::Refuse`].
    Refuse = 3,
    /// See [`Message::Log`].
    Log = 4,
    /// See [`Message::Ack`].
    Ack = 5,
    /// See [`Message::Heartbeat`].
    Heartbeat = 6,
    /// See [`Message::HeartbeatReply`].
    HeartbeatReply = 7,
    /// See [`Message::CloneBegin`].
    CloneBegin = 8,
    /// See [`Message::ClonePages`].
    ClonePages = 9,
    /// See [`Message::CloneDisk`].
    CloneDisk = 10,
    /// See [`Message::CloneFinal`].
    CloneFinal = 11,
    /// See [`Message::CloneDone`].
    CloneDone = 12,
    /// See [`Message::VmEnded`].
    VmEnded = 13,
}

impl MessageKind {
    fn from_u8(b: u8) -> Option<Self> {
        use MessageKind::*;
        Some(match b {
            1 => Hello,
            2 => HelloAck,
            3 => Refuse,
            4 => Log,
            5 => Ack,
            6 => Heartbeat,
            7 => HeartbeatReply,
            8 => CloneBegin,
            9 => ClonePages,
            10 => CloneDisk,
            11 => CloneFinal,
            12 => CloneDone,
            13 => VmEnded,
            _ => return None,
        })
    }
}

/// Which side of the pair a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs the guest live and records.
    Primary,
    /// Replays the primary's log.
    Backup,
}

impl Role {
    fn to_u8(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Backup => 2,
        }
    }
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Role::Primary),
            2 => Some(Role::Backup),
            _ => None,
        }
    }
}

/// Why a handshake was refused. Sent in [`Message::Refuse`] and shown to operators, so each
/// message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RefuseReason {
    /// The peer belongs to another VM.
    #[error("wrong VM: this primary serves {expected:?} but the backup asked for {got:?}; check --vm-id")]
    WrongVmId {
        /// The refusing side's VM id.
        expected: String,
        /// The id the peer sent.
        got: String,
    },
    /// The peer's arbiter epoch is older than ours: it missed a failover.
    #[error(
        "stale epoch {got}: the current arbiter epoch is {current}; the peer missed a failover \
         and must restart from the arbiter's current state"
    )]
    StaleEpoch {
        /// Our epoch.
        current: u64,
        /// The peer's epoch.
        got: u64,
    },
    /// The peer has seen a newer epoch than ours: *we* are the stale side.
    #[error(
        "peer has epoch {got}, newer than our {current}: this side lost a failover and must \
         consult the arbiter"
    )]
    PeerEpochNewer {
        /// Our epoch.
        current: u64,
        /// The peer's epoch.
        got: u64,
    },
    /// Protocol versions differ.
    #[error(
        "incompatible protocol version {got} (this side speaks {supported}); run the same \
         lockstep-agent version on both sides"
    )]
    IncompatibleVersion {
        /// Version the refusing side speaks.
        supported: u16,
        /// Version the peer sent.
        got: u16,
    },
    /// The guest image digests differ, so replay could never match.
    #[error("guest image differs from the primary's; start the backup with the same --guest")]
    GuestImageMismatch,
    /// The peer announced the wrong role (e.g. two primaries).
    #[error("peer announced role {got:?}, expected a backup; check which pod is which")]
    WrongRole {
        /// Role the peer sent.
        got: Role,
    },
    /// The primary already has a backup (attached or cloning). Sent by the primary's driver
    /// itself to a second connection while one is open (the state machine serves one channel).
    #[error(
        "this primary already serves a backup connection; retry once it is gone, or stop the \
         other backup"
    )]
    Busy,
    /// The refusing side is not (or no longer) a primary that can take a backup.
    #[error("this side is not an active primary (halted or consulting the arbiter); retry later")]
    NotPrimary,
}

impl RefuseReason {
    fn code(&self) -> u8 {
        match self {
            RefuseReason::WrongVmId { .. } => 1,
            RefuseReason::StaleEpoch { .. } => 2,
            RefuseReason::PeerEpochNewer { .. } => 3,
            RefuseReason::IncompatibleVersion { .. } => 4,
            RefuseReason::GuestImageMismatch => 5,
            RefuseReason::WrongRole { .. } => 6,
            RefuseReason::Busy => 7,
            RefuseReason::NotPrimary => 8,
        }
    }
}

/// One record of the primary's log. The bytes are opaque here: the agent's recorder encodes (and
/// checksums) the record; this crate only carries it and keeps it in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Logical time (guest-caused exit index) the record belongs to.
    pub exit: u64,
    /// The record, encoded by the agent.
    pub bytes: Vec<u8>,
}

impl LogEntry {
    /// Most bytes this entry can occupy inside a `Log` payload: its exit (a full varint, as the
    /// first entry of a frame carries it) plus its length and bytes. Entries after the first
    /// carry only the distance from the previous entry's exit, usually one byte, so a frame is
    /// mostly smaller than the sum of these; the bound is what frame splitting relies on.
    pub fn wire_len(&self) -> usize {
        MAX_VARINT_LEN + varint_len(self.bytes.len() as u64) + self.bytes.len()
    }
}

/// Longest LEB128 encoding of a `u64`.
pub const MAX_VARINT_LEN: usize = 10;

/// Bytes of `v` as an unsigned LEB128 varint (7 bits per byte, low bits first).
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends `v` as an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 varint from the front of `buf`: `Some((value, bytes used))`, or
/// `None` if `buf` ends inside it, it is longer than 10 bytes, it overflows a `u64`, or it is not
/// in its shortest form (so every value has exactly one encoding and a decoded message re-encodes
/// to the same bytes).
pub fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(MAX_VARINT_LEN) {
        let bits = (b & 0x7f) as u64;
        if i == MAX_VARINT_LEN - 1 && bits > 1 {
            return None; // more than 64 bits
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return None; // overlong: a trailing zero group
            }
            return Some((v, i + 1));
        }
    }
    None
}

/// Maps a signed distance onto small unsigned numbers (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...).
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// The exit distance from the previous entry as it is sent (wrapping, so any sequence of exits
/// round-trips; the backup refuses out-of-order ones itself).
fn exit_delta(prev: u64, exit: u64) -> u64 {
    zigzag(exit.wrapping_sub(prev) as i64)
}

/// A guest-physical page sent during clone: (guest physical address, contents).
pub type Page = (u64, Vec<u8>);

/// Every message of the FT channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message on a connection, sent by the connecting side (the backup).
    Hello {
        /// [`PROTOCOL_VERSION`] of the sender.
        protocol_version: u16,
        /// The FTVM this agent belongs to.
        vm_id: String,
        /// The arbiter epoch the sender knows.
        epoch: u64,
        /// The sender's role.
        role: Role,
        /// Digest of the guest image (e.g. BLAKE3), so mismatched guests are refused.
        guest_image: [u8; 32],
    },
    /// Handshake accepted; carries the acceptor's view.
    HelloAck {
        /// Acceptor's [`PROTOCOL_VERSION`].
        protocol_version: u16,
        /// Acceptor's arbiter epoch.
        epoch: u64,
    },
    /// Handshake refused; the connection is closed after this frame.
    Refuse {
        /// Why.
        reason: RefuseReason,
    },
    /// A batch of log entries.
    Log {
        /// Sequence number of the first entry (entries are numbered from 0 after `CloneDone`).
        first_seq: u64,
        /// The primary has finished every exit `<= through_exit`: the backup may replay through it.
        through_exit: u64,
        /// The entries, in exit order, all with `exit <= through_exit`.
        entries: Vec<LogEntry>,
    },
    /// Backup's acknowledgement.
    Ack {
        /// The backup holds the complete log through this exit (drives the output rule).
        through_exit: u64,
        /// The backup has replayed through this exit (drives execution-lag control).
        replayed_exit: u64,
    },
    /// Liveness probe, both ways.
    Heartbeat {
        /// Sender's clock when sent; echoed back for RTT.
        sent_at_nanos: u64,
    },
    /// Answer to a heartbeat.
    HeartbeatReply {
        /// The `sent_at_nanos` being answered.
        sent_at_nanos: u64,
    },
    /// Start of a clone hand-over.
    CloneBegin {
        /// Guest memory size.
        memory_bytes: u64,
        /// Disk size.
        disk_bytes: u64,
        /// Page size used by `ClonePages`.
        page_size: u32,
    },
    /// A run of memory pages from pre-copy round `round`.
    ClonePages {
        /// Pre-copy round (0 = full copy); the final delta has the last round number.
        round: u32,
        /// The pages.
        pages: Vec<Page>,
    },
    /// A piece of the disk.
    CloneDisk {
        /// Byte offset in the disk.
        offset: u64,
        /// Contents.
        bytes: Vec<u8>,
    },
    /// Final state: the backup's state equals the primary's after exit `exit`.
    CloneFinal {
        /// The exit the state was captured after.
        exit: u64,
        /// Opaque vCPU state from the agent.
        vcpu_state: Vec<u8>,
        /// Opaque device state from the agent.
        device_state: Vec<u8>,
    },
    /// Clone complete; `Log` frames follow.
    CloneDone,
    /// The primary's guest stopped on its own at exit `exit` (it powered off, panicked or
    /// faulted), and the log through `exit` has been sent. The VM is over: the backup's replay
    /// reaches the same stop, and a primary that is gone after this is no failure to recover from
    /// (the backup must not go live with a guest that stops again at once).
    VmEnded {
        /// The exit at which the guest stopped.
        exit: u64,
    },
}

impl Message {
    /// The kind byte this message is framed with.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello { .. } => MessageKind::Hello,
            Message::HelloAck { .. } => MessageKind::HelloAck,
            Message::Refuse { .. } => MessageKind::Refuse,
            Message::Log { .. } => MessageKind::Log,
            Message::Ack { .. } => MessageKind::Ack,
            Message::Heartbeat { .. } => MessageKind::Heartbeat,
            Message::HeartbeatReply { .. } => MessageKind::HeartbeatReply,
            Message::CloneBegin { .. } => MessageKind::CloneBegin,
            Message::ClonePages { .. } => MessageKind::ClonePages,
            Message::CloneDisk { .. } => MessageKind::CloneDisk,
            Message::CloneFinal { .. } => MessageKind::CloneFinal,
            Message::CloneDone => MessageKind::CloneDone,
            Message::VmEnded { .. } => MessageKind::VmEnded,
        }
    }

    /// Payload size in bytes (without header and trailer).
    pub fn payload_len(&self) -> usize {
        match self {
            Message::Hello { vm_id, .. } => 2 + 2 + vm_id.len() + 8 + 1 + 32,
            Message::HelloAck { .. } => 2 + 8,
            Message::Refuse { reason } => {
                1 + match reason {
                    RefuseReason::WrongVmId { expected, got } => 4 + expected.len() + got.len(),
                    RefuseReason::StaleEpoch { .. } | RefuseReason::PeerEpochNewer { .. } => 16,
                    RefuseReason::IncompatibleVersion { .. } => 4,
                    RefuseReason::WrongRole { .. } => 1,
                    RefuseReason::GuestImageMismatch | RefuseReason::Busy | RefuseReason::NotPrimary => 0,
                }
            }
            Message::Log { first_seq, through_exit, entries } => {
                let mut len = varint_len(*first_seq) + varint_len(*through_exit) + varint_len(entries.len() as u64);
                let mut prev = None;
                for e in entries {
                    len += match prev {
                        None => varint_len(e.exit),
                        Some(p) => varint_len(exit_delta(p, e.exit)),
                    };
                    len += varint_len(e.bytes.len() as u64) + e.bytes.len();
                    prev = Some(e.exit);
                }
                len
            }
            Message::Ack { .. } => 16,
            Message::Heartbeat { .. } | Message::HeartbeatReply { .. } => 8,
            Message::CloneBegin { .. } => 8 + 8 + 4,
            Message::ClonePages { pages, .. } => 4 + 4 + pages.iter().map(|(_, p)| 12 + p.len()).sum::<usize>(),
            Message::CloneDisk { bytes, .. } => 8 + 4 + bytes.len(),
            Message::CloneFinal { vcpu_state, device_state, .. } => 8 + 4 + vcpu_state.len() + 4 + device_state.len(),
            Message::CloneDone => 0,
            Message::VmEnded { .. } => 8,
        }
    }

    /// Whole frame size in bytes.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len() + TRAILER_LEN
    }
}

/// Appends `msg` as one frame to `out`.
///
/// Fails (and leaves `out` unchanged) if the payload would exceed `max_payload` or a field cannot be
/// represented (e.g. a VM id longer than [`MAX_VM_ID_LEN`]); the state machines split batches so
/// this does not happen for messages they produce.
pub fn encode(msg: &Message, max_payload: usize, out: &mut Vec<u8>) -> Result<(), WireError> {
    let len = msg.payload_len();
    let max = max_payload.min(u32::MAX as usize);
    if len > max {
        return Err(WireError::FrameTooLarge { len, max });
    }
    // Plain matches rather than let-chains: the workspace's MSRV (1.85) predates them.
    match msg {
        Message::Hello { vm_id, .. } if vm_id.len() > MAX_VM_ID_LEN => {
            return Err(WireError::InvalidField {
                kind: MessageKind::Hello,
                field: "vm_id",
                reason: "longer than 512 bytes",
            });
        }
        Message::Refuse { reason: RefuseReason::WrongVmId { expected, got } }
            if expected.len() > u16::MAX as usize || got.len() > u16::MAX as usize =>
        {
            return Err(WireError::InvalidField {
                kind: MessageKind::Refuse,
                field: "vm_id",
                reason: "longer than 65535 bytes",
            });
        }
        _ => {}
    }
    let start = out.len();
    out.reserve(HEADER_LEN + len + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(msg.kind() as u8);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    encode_payload(msg, out);
    debug_assert_eq!(out.len() - start, HEADER_LEN + len, "payload_len out of sync");
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// Encodes `msg` into a new buffer. See [`encode`].
pub fn encode_to_vec(msg: &Message, max_payload: usize) -> Result<Vec<u8>, WireError> {
    let mut v = Vec::new();
    encode(msg, max_payload, &mut v)?;
    Ok(v)
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}
/// Lengths fit in u32 because `encode` bounded the whole payload by `u32::MAX` first.
fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}
fn put_str16(out: &mut Vec<u8>, s: &str) {
    put_u16(out, s.len() as u16);
    out.extend_from_slice(s.as_bytes());
}

fn encode_payload(msg: &Message, out: &mut Vec<u8>) {
    match msg {
        Message::Hello { protocol_version, vm_id, epoch, role, guest_image } => {
            put_u16(out, *protocol_version);
            put_str16(out, vm_id);
            put_u64(out, *epoch);
            out.push(role.to_u8());
            out.extend_from_slice(guest_image);
        }
        Message::HelloAck { protocol_version, epoch } => {
            put_u16(out, *protocol_version);
            put_u64(out, *epoch);
        }
        Message::Refuse { reason } => {
            out.push(reason.code());
            match reason {
                RefuseReason::WrongVmId { expected, got } => {
                    put_str16(out, expected);
                    put_str16(out, got);
                }
                RefuseReason::StaleEpoch { current, got } | RefuseReason::PeerEpochNewer { current, got } => {
                    put_u64(out, *current);
                    put_u64(out, *got);
                }
                RefuseReason::IncompatibleVersion { supported, got } => {
                    put_u16(out, *supported);
                    put_u16(out, *got);
                }
                RefuseReason::WrongRole { got } => out.push(got.to_u8()),
                RefuseReason::GuestImageMismatch | RefuseReason::Busy | RefuseReason::NotPrimary => {}
            }
        }
        Message::Log { first_seq, through_exit, entries } => {
            put_varint(out, *first_seq);
            put_varint(out, *through_exit);
            put_varint(out, entries.len() as u64);
            let mut prev = None;
            for e in entries {
                match prev {
                    None => put_varint(out, e.exit),
                    Some(p) => put_varint(out, exit_delta(p, e.exit)),
                }
                put_varint(out, e.bytes.len() as u64);
                out.extend_from_slice(&e.bytes);
                prev = Some(e.exit);
            }
        }
        Message::Ack { through_exit, replayed_exit } => {
            put_u64(out, *through_exit);
            put_u64(out, *replayed_exit);
        }
        Message::Heartbeat { sent_at_nanos } | Message::HeartbeatReply { sent_at_nanos } => {
            put_u64(out, *sent_at_nanos)
        }
        Message::CloneBegin { memory_bytes, disk_bytes, page_size } => {
            put_u64(out, *memory_bytes);
            put_u64(out, *disk_bytes);
            put_u32(out, *page_size);
        }
        Message::ClonePages { round, pages } => {
            put_u32(out, *round);
            put_u32(out, pages.len() as u32);
            for (gpa, data) in pages {
                put_u64(out, *gpa);
                put_bytes32(out, data);
            }
        }
        Message::CloneDisk { offset, bytes } => {
            put_u64(out, *offset);
            put_bytes32(out, bytes);
        }
        Message::CloneFinal { exit, vcpu_state, device_state } => {
            put_u64(out, *exit);
            put_bytes32(out, vcpu_state);
            put_bytes32(out, device_state);
        }
        Message::CloneDone => {}
        Message::VmEnded { exit } => put_u64(out, *exit),
    }
}

/// Is a whole frame at the start of `buf`?
///
/// Returns `Ok(Some(n))` when the first `n` bytes of `buf` are one complete frame, `Ok(None)` when
/// more bytes are needed, and an error as soon as the header proves the stream bad (wrong magic,
/// unknown kind, length over `max_payload`), so a corrupt length never makes the caller wait for,
/// or buffer, a huge frame. Does not check the CRC; [`parse_frame`] does.
pub fn check_frame(buf: &[u8], max_payload: usize) -> Result<Option<usize>, WireError> {
    // Validate the magic as soon as its bytes are present: a wrong port is reported at once.
    let magic_seen = buf.len().min(MAGIC.len());
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        let mut found = [0u8; 3];
        found[..magic_seen].copy_from_slice(&buf[..magic_seen]);
        return Err(WireError::BadMagic { found });
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if MessageKind::from_u8(buf[3]).is_none() {
        return Err(WireError::UnknownKind(buf[3]));
    }
    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if len > max_payload {
        return Err(WireError::FrameTooLarge { len, max: max_payload });
    }
    let total = HEADER_LEN + len + TRAILER_LEN;
    if buf.len() < total { Ok(None) } else { Ok(Some(total)) }
}

/// Parses exactly one frame (as delimited by [`check_frame`]): checks the CRC, then decodes the
/// payload. Fails on any trailing or missing byte.
pub fn parse_frame(frame: &[u8], max_payload: usize) -> Result<Message, WireError> {
    match check_frame(frame, max_payload)? {
        Some(n) if n == frame.len() => {}
        Some(n) => {
            return Err(WireError::TrailingBytes {
                // check_frame already validated the kind byte.
                kind: MessageKind::from_u8(frame[3]).unwrap_or(MessageKind::Hello),
                extra: frame.len() - n,
            });
        }
        None => {
            return Err(WireError::UnexpectedEof { buffered: frame.len() });
        }
    }
    let body_end = frame.len() - TRAILER_LEN;
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(&frame[body_end..]);
    let expected = u32::from_be_bytes(crc_bytes);
    let computed = crc32fast::hash(&frame[..body_end]);
    if expected != computed {
        return Err(WireError::ChecksumMismatch { expected, computed });
    }
    let kind = MessageKind::from_u8(frame[3]).ok_or(WireError::UnknownKind(frame[3]))?;
    let mut r = Reader { kind, buf: &frame[HEADER_LEN..body_end] };
    let msg = decode_payload(&mut r)?;
    if !r.buf.is_empty() {
        return Err(WireError::TrailingBytes { kind, extra: r.buf.len() });
    }
    Ok(msg)
}

/// Cursor over a payload whose every read is bounds-checked.
struct Reader<'a> {
    kind: MessageKind,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated { kind: self.kind, needed: n, remaining: self.buf.len() });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn bytes32(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn str16(&mut self, field: &'static str) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.invalid(field, "not UTF-8"))
    }
    /// Reads an element count and bounds it by the bytes left, so a hostile count cannot make us
    /// reserve memory the frame could never fill.
    fn count(&mut self, min_elem_len: usize, field: &'static str) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_elem_len) > self.buf.len() {
            return Err(self.invalid(field, "element count exceeds the payload"));
        }
        Ok(n)
    }
    fn varint(&mut self, field: &'static str) -> Result<u64, WireError> {
        match get_varint(self.buf) {
            Some((v, n)) => {
                self.buf = &self.buf[n..];
                Ok(v)
            }
            None if self.buf.len() < MAX_VARINT_LEN && self.buf.iter().all(|b| b & 0x80 != 0) => {
                Err(WireError::Truncated { kind: self.kind, needed: 1, remaining: self.buf.len() })
            }
            None => Err(self.invalid(field, "not a shortest-form varint of at most 64 bits")),
        }
    }
    fn role(&mut self, field: &'static str) -> Result<Role, WireError> {
        let b = self.u8()?;
        Role::from_u8(b).ok_or_else(|| self.invalid(field, "unknown role"))
    }
    fn invalid(&self, field: &'static str, reason: &'static str) -> WireError {
        WireError::InvalidField { kind: self.kind, field, reason }
    }
}

fn decode_payload(r: &mut Reader<'_>) -> Result<Message, WireError> {
    Ok(match r.kind {
        MessageKind::Hello => {
            let protocol_version = r.u16()?;
            let vm_id = r.str16("vm_id")?;
            if vm_id.len() > MAX_VM_ID_LEN {
                return Err(r.invalid("vm_id", "longer than 512 bytes"));
            }
            Message::Hello { protocol_version, vm_id, epoch: r.u64()?, role: r.role("role")?, guest_image: r.array()? }
        }
        MessageKind::HelloAck => Message::HelloAck { protocol_version: r.u16()?, epoch: r.u64()? },
        MessageKind::Refuse => {
            let reason = match r.u8()? {
                1 => RefuseReason::WrongVmId { expected: r.str16("expected")?, got: r.str16("got")? },
                2 => RefuseReason::StaleEpoch { current: r.u64()?, got: r.u64()? },
                3 => RefuseReason::PeerEpochNewer { current: r.u64()?, got: r.u64()? },
                4 => RefuseReason::IncompatibleVersion { supported: r.u16()?, got: r.u16()? },
                5 => RefuseReason::GuestImageMismatch,
                6 => RefuseReason::WrongRole { got: r.role("got")? },
                7 => RefuseReason::Busy,
                8 => RefuseReason::NotPrimary,
                _ => return Err(r.invalid("reason", "unknown refusal code")),
            };
            Message::Refuse { reason }
        }
        MessageKind::Log => {
            let first_seq = r.varint("first_seq")?;
            let through_exit = r.varint("through_exit")?;
            // Each entry takes at least two bytes (its exit and its length).
            let n = r.varint("entries")?;
            if n.saturating_mul(2) > r.buf.len() as u64 {
                return Err(r.invalid("entries", "element count exceeds the payload"));
            }
            let mut entries = Vec::with_capacity(n as usize);
            let mut prev: Option<u64> = None;
            for _ in 0..n {
                let exit = match prev {
                    None => r.varint("exit")?,
                    Some(p) => p.wrapping_add(unzigzag(r.varint("exit delta")?) as u64),
                };
                let len = r.varint("entry length")?;
                let len = usize::try_from(len).map_err(|_| r.invalid("entry length", "larger than memory"))?;
                entries.push(LogEntry { exit, bytes: r.take(len)?.to_vec() });
                prev = Some(exit);
            }
            Message::Log { first_seq, through_exit, entries }
        }
        MessageKind::Ack => Message::Ack { through_exit: r.u64()?, replayed_exit: r.u64()? },
        MessageKind::Heartbeat => Message::Heartbeat { sent_at_nanos: r.u64()? },
        MessageKind::HeartbeatReply => Message::HeartbeatReply { sent_at_nanos: r.u64()? },
        MessageKind::CloneBegin => {
            Message::CloneBegin { memory_bytes: r.u64()?, disk_bytes: r.u64()?, page_size: r.u32()? }
        }
        MessageKind::ClonePages => {
            let round = r.u32()?;
            let n = r.count(12, "pages")?;
            let mut pages = Vec::with_capacity(n);
            for _ in 0..n {
                let gpa = r.u64()?;
                pages.push((gpa, r.bytes32()?));
            }
            Message::ClonePages { round, pages }
        }
        MessageKind::CloneDisk => Message::CloneDisk { offset: r.u64()?, bytes: r.bytes32()? },
        MessageKind::CloneFinal => {
            Message::CloneFinal { exit: r.u64()?, vcpu_state: r.bytes32()?, device_state: r.bytes32()? }
        }
        MessageKind::CloneDone => Message::CloneDone,
        MessageKind::VmEnded => Message::VmEnded { exit: r.u64()? },
    })
}

/// Incremental decoder for one connection: push the bytes read from the socket, pull messages.
///
/// After the first error the reader is poisoned and keeps returning that error: a byte stream
/// that lost sync cannot be resynchronised safely, so the connection must be closed.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`; compacted lazily to avoid a memmove per frame.
    start: usize,
    max_payload: usize,
    poisoned: Option<WireError>,
}

impl FrameReader {
    /// A reader bounding frames to `max_payload` payload bytes.
    pub fn new(max_payload: usize) -> Self {
        FrameReader { buf: Vec::new(), start: 0, max_payload, poisoned: None }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        let res = match check_frame(avail, self.max_payload) {
            Ok(None) => return Ok(None),
            Ok(Some(n)) => parse_frame(&avail[..n], self.max_payload).map(|m| (m, n)),
            Err(e) => Err(e),
        };
        match res {
            Ok((m, n)) => {
                self.start += n;
                Ok(Some(m))
            }
            Err(e) => {
                self.poisoned = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Bytes received but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Call when the stream reports EOF: a clean close between frames is `Ok`, a close in the middle
    /// of a frame is [`WireError::UnexpectedEof`].
    pub fn finish(&self) -> Result<(), WireError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(WireError::UnexpectedEof { buffered }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = DEFAULT_MAX_PAYLOAD;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                protocol_version: PROTOCOL_VERSION,
                vm_id: "kv-1".into(),
                epoch: 7,
                role: Role::Backup,
                guest_image: [9; 32],
            },
            Message::HelloAck { protocol_version: 1, epoch: 7 },
            Message::Refuse { reason: RefuseReason::WrongVmId { expected: "a".into(), got: "b".into() } },
            Message::Refuse { reason: RefuseReason::StaleEpoch { current: 5, got: 3 } },
            Message::Refuse { reason: RefuseReason::PeerEpochNewer { current: 5, got: 6 } },
            Message::Refuse { reason: RefuseReason::IncompatibleVersion { supported: 1, got: 2 } },
            Message::Refuse { reason: RefuseReason::WrongRole { got: Role::Primary } },
            Message::Refuse { reason: RefuseReason::GuestImageMismatch },
            Message::Refuse { reason: RefuseReason::Busy },
            Message::Refuse { reason: RefuseReason::NotPrimary },
            Message::Log {
                first_seq: 3,
                through_exit: 100,
                entries: vec![LogEntry { exit: 99, bytes: vec![1, 2, 3] }, LogEntry { exit: 100, bytes: vec![] }],
            },
            Message::Ack { through_exit: 100, replayed_exit: 90 },
            Message::Heartbeat { sent_at_nanos: 42 },
            Message::HeartbeatReply { sent_at_nanos: 42 },
            Message::CloneBegin { memory_bytes: 1 << 26, disk_bytes: 1 << 20, page_size: 4096 },
            Message::ClonePages { round: 2, pages: vec![(0x1000, vec![7; 16]), (0x2000, vec![])] },
            Message::CloneDisk { offset: 512, bytes: vec![1; 10] },
            Message::CloneFinal { exit: 1234, vcpu_state: vec![1, 2], device_state: vec![3] },
            Message::CloneDone,
            Message::VmEnded { exit: 77 },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let f = encode_to_vec(&m, MAX).unwrap();
            assert_eq!(f.len(), m.frame_len(), "{m:?}");
            assert_eq!(check_frame(&f, MAX).unwrap(), Some(f.len()));
            assert_eq!(parse_frame(&f, MAX).unwrap(), m);
        }
    }

    #[test]
    fn every_strict_prefix_needs_more() {
        for m in samples() {
            let f = encode_to_vec(&m, MAX).unwrap();
            for cut in 0..f.len() {
                assert_eq!(check_frame(&f[..cut], MAX).unwrap(), None, "{m:?} cut {cut}");
            }
        }
    }

    #[test]
    fn flipped_bit_is_detected() {
        let f = encode_to_vec(&samples()[10], MAX).unwrap();
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0x10;
            // A flip in the length field may make the frame look incomplete; everything else
            // must be an error. It must never decode to a message.
            match check_frame(&g, MAX) {
                Ok(Some(n)) => assert!(parse_frame(&g[..n], MAX).is_err(), "byte {i}"),
                Ok(None) => assert!((4..8).contains(&i), "byte {i}"),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut hdr = Vec::from(MAGIC);
        hdr.push(MessageKind::Log as u8);
        hdr.extend_from_slice(&(1024u32).to_be_bytes());
        assert_eq!(check_frame(&hdr, 1000), Err(WireError::FrameTooLarge { len: 1024, max: 1000 }));
    }

    #[test]
    fn encoding_over_the_limit_fails_cleanly() {
        let m = Message::CloneDisk { offset: 0, bytes: vec![0; 100] };
        let mut out = vec![1];
        assert!(matches!(encode(&m, 50, &mut out), Err(WireError::FrameTooLarge { .. })));
        assert_eq!(out, vec![1]);
    }

    #[test]
    fn vm_id_fits_a_kubernetes_namespace_and_name_but_is_bounded() {
        let hello = |n: usize| Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            vm_id: "n".repeat(n),
            epoch: 1,
            role: Role::Backup,
            guest_image: [0; 32],
        };
        let f = encode_to_vec(&hello(63 + 1 + 253), MAX).unwrap();
        assert_eq!(parse_frame(&f, MAX).unwrap(), hello(317));
        assert!(matches!(
            encode_to_vec(&hello(MAX_VM_ID_LEN + 1), MAX),
            Err(WireError::InvalidField { field: "vm_id", .. })
        ));
        // A peer that sends one anyway is refused by the decoder.
        let mut payload = Vec::new();
        put_u16(&mut payload, PROTOCOL_VERSION);
        put_str16(&mut payload, &"n".repeat(MAX_VM_ID_LEN + 1));
        put_u64(&mut payload, 1);
        payload.push(2);
        payload.extend_from_slice(&[0; 32]);
        let f = raw_frame(MessageKind::Hello as u8, &payload);
        assert!(matches!(parse_frame(&f, MAX), Err(WireError::InvalidField { field: "vm_id", .. })));
    }

    #[test]
    fn bad_magic_and_unknown_kind() {
        assert!(matches!(check_frame(b"GET /", MAX), Err(WireError::BadMagic { .. })));
        assert!(matches!(check_frame(b"X", MAX), Err(WireError::BadMagic { .. })));
        let mut f = encode_to_vec(&Message::CloneDone, MAX).unwrap();
        f[3] = 200;
        assert_eq!(check_frame(&f, MAX), Err(WireError::UnknownKind(200)));
    }

    #[test]
    fn hostile_count_is_an_error_not_an_allocation() {
        // A Log claiming 2^64 - 1 entries in a 12-byte payload.
        let mut payload = Vec::new();
        put_varint(&mut payload, 0);
        put_varint(&mut payload, 0);
        put_varint(&mut payload, u64::MAX);
        let f = raw_frame(MessageKind::Log as u8, &payload);
        assert!(matches!(parse_frame(&f, MAX), Err(WireError::InvalidField { field: "entries", .. })));
        // An entry claiming more bytes than the frame holds.
        let mut payload = Vec::new();
        for v in [0, 1, 1, 1, u64::MAX] {
            put_varint(&mut payload, v);
        }
        let f = raw_frame(MessageKind::Log as u8, &payload);
        assert!(parse_frame(&f, MAX).is_err());
    }

    #[test]
    fn varints_are_shortest_form_and_bounded() {
        for v in [0, 1, 127, 128, 300, 1 << 35, u64::MAX - 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(get_varint(&out), Some((v, out.len())), "{v}");
            assert_eq!(get_varint(&out[..out.len() - 1]), None, "{v} cut short");
        }
        assert_eq!(get_varint(&[0x80, 0x00]), None, "overlong zero");
        assert_eq!(get_varint(&[0xff; 10]), None, "more than 64 bits");
        assert_eq!(get_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]), None, "overflow");
        for d in [0i64, 1, -1, 63, -64, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(d)), d);
        }
        assert_eq!(zigzag(1), 2, "a step of one exit costs one byte");
    }

    #[test]
    fn log_entries_cost_their_bytes_plus_a_few() {
        // Consecutive exits: after the first entry, one byte of exit distance and one of length.
        let entries: Vec<LogEntry> = (1000..1010).map(|exit| LogEntry { exit, bytes: vec![7; 40] }).collect();
        let m = Message::Log { first_seq: 0, through_exit: 1009, entries };
        assert_eq!(m.payload_len(), 1 + 2 + 1 + (2 + 1 + 40) + 9 * (1 + 1 + 40));
    }

    #[test]
    fn trailing_payload_bytes_are_an_error() {
        let mut payload = Vec::new();
        put_u64(&mut payload, 5);
        payload.push(0);
        let f = raw_frame(MessageKind::Heartbeat as u8, &payload);
        assert!(matches!(parse_frame(&f, MAX), Err(WireError::TrailingBytes { extra: 1, .. })));
    }

    #[test]
    fn reader_yields_messages_split_anywhere_and_eof_rules() {
        let msgs = samples();
        let mut stream = Vec::new();
        for m in &msgs {
            encode(m, MAX, &mut stream).unwrap();
        }
        for chunk in [1usize, 3, 7, 64, stream.len()] {
            let mut r = FrameReader::new(MAX);
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                r.push(c);
                while let Some(m) = r.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs);
            assert_eq!(r.finish(), Ok(()));
        }
        let mut r = FrameReader::new(MAX);
        r.push(&stream[..stream.len() - 1]);
        while r.next_message().unwrap().is_some() {}
        assert!(matches!(r.finish(), Err(WireError::UnexpectedEof { .. })));
    }

    #[test]
    fn reader_is_poisoned_after_an_error() {
        let mut r = FrameReader::new(MAX);
        r.push(b"nope");
        assert!(r.next_message().is_err());
        r.push(&encode_to_vec(&Message::CloneDone, MAX).unwrap());
        assert!(r.next_message().is_err());
        assert!(r.finish().is_err());
    }

    fn raw_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::from(MAGIC);
        f.push(kind);
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        let crc = crc32fast::hash(&f);
        f.extend_from_slice(&crc.to_be_bytes());
        f
    }

    fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<Message>, WireError> {
        let mut r = FrameReader::new(max);
        r.push(bytes);
        let mut out = Vec::new();
        while let Some(m) = r.next_message()? {
            out.push(m);
        }
        r.finish()?;
        Ok(out)
    }

    fn any_role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Primary), Just(Role::Backup)]
    }

    fn any_reason() -> impl Strategy<Value = RefuseReason> {
        prop_oneof![
            (".{0,40}", ".{0,40}").prop_map(|(expected, got)| RefuseReason::WrongVmId { expected, got }),
            (any::<u64>(), any::<u64>()).prop_map(|(current, got)| RefuseReason::StaleEpoch { current, got }),
            (any::<u64>(), any::<u64>()).prop_map(|(current, got)| RefuseReason::PeerEpochNewer { current, got }),
            (any::<u16>(), any::<u16>())
                .prop_map(|(supported, got)| RefuseReason::IncompatibleVersion { supported, got }),
            Just(RefuseReason::GuestImageMismatch),
            any_role().prop_map(|got| RefuseReason::WrongRole { got }),
            Just(RefuseReason::Busy),
            Just(RefuseReason::NotPrimary),
        ]
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..64)
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u16>(), ".{0,60}", any::<u64>(), any_role(), any::<[u8; 32]>()).prop_map(
                |(protocol_version, vm_id, epoch, role, guest_image)| {
                    Message::Hello { protocol_version, vm_id, epoch, role, guest_image }
                }
            ),
            (any::<u16>(), any::<u64>())
                .prop_map(|(protocol_version, epoch)| Message::HelloAck { protocol_version, epoch }),
            any_reason().prop_map(|reason| Message::Refuse { reason }),
            (any::<u64>(), any::<u64>(), proptest::collection::vec((any::<u64>(), bytes()), 0..8)).prop_map(
                |(first_seq, through_exit, es)| Message::Log {
                    first_seq,
                    through_exit,
                    entries: es.into_iter().map(|(exit, bytes)| LogEntry { exit, bytes }).collect()
                }
            ),
            (any::<u64>(), any::<u64>())
                .prop_map(|(through_exit, replayed_exit)| Message::Ack { through_exit, replayed_exit }),
            any::<u64>().prop_map(|sent_at_nanos| Message::Heartbeat { sent_at_nanos }),
            any::<u64>().prop_map(|sent_at_nanos| Message::HeartbeatReply { sent_at_nanos }),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(memory_bytes, disk_bytes, page_size)| {
                Message::CloneBegin { memory_bytes, disk_bytes, page_size }
            }),
            (any::<u32>(), proptest::collection::vec((any::<u64>(), bytes()), 0..8))
                .prop_map(|(round, pages)| Message::ClonePages { round, pages }),
            (any::<u64>(), bytes()).prop_map(|(offset, bytes)| Message::CloneDisk { offset, bytes }),
            (any::<u64>(), bytes(), bytes()).prop_map(|(exit, vcpu_state, device_state)| {
                Message::CloneFinal { exit, vcpu_state, device_state }
            }),
            Just(Message::CloneDone),
            any::<u64>().prop_map(|exit| Message::VmEnded { exit }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

        /// Any message survives encoding and decoding unchanged, whatever the read sizes.
        #[test]
        fn any_message_round_trips_through_any_chunking(
            msgs in proptest::collection::vec(any_message(), 1..6),
            chunk in 1usize..200,
        ) {
            let mut stream = Vec::new();
            for m in &msgs {
                encode(m, MAX, &mut stream).unwrap();
            }
            let mut r = FrameReader::new(MAX);
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                r.push(c);
                while let Some(m) = r.next_message().unwrap() {
                    got.push(m);
                }
            }
            prop_assert_eq!(r.finish(), Ok(()));
            prop_assert_eq!(got, msgs);
        }

        /// Random bytes only ever give Ok or Err (a panic fails the test).
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_all(&bytes, 256);
            let _ = parse_frame(&bytes, 256);
        }

        /// Random payloads behind a valid header and CRC reach the payload parser: must not panic.
        #[test]
        fn random_payloads_never_panic(kind in 0u8..16, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let f = raw_frame(kind, &payload);
            if let Ok(m) = parse_frame(&f, MAX) {
                // Whatever decodes must re-encode to the same bytes: no lossy parse.
                prop_assert_eq!(encode_to_vec(&m, MAX).unwrap(), f);
            }
        }

        /// Valid streams mutated at random positions: Ok or Err, never a panic, and a mutation
        /// inside a frame is never silently accepted as the original message.
        #[test]
        fn mutated_streams_never_panic(
            idx in proptest::collection::vec(0usize..19, 1..6),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let all = samples();
            let msgs: Vec<Message> = idx.iter().map(|i| all[*i].clone()).collect();
            let mut stream = Vec::new();
            for m in &msgs { encode(m, MAX, &mut stream).unwrap(); }
            let mut mutated = stream.clone();
            for (at, x) in &flips { let i = at.index(mutated.len()); mutated[i] ^= x; }
            let n = cut.index(mutated.len() + 1);
            mutated.truncate(n);
            if let Ok(got) = decode_all(&mutated, MAX) {
                // CRC-32 catches every error burst of up to 32 bits, so an accepted stream must be
                // an exact prefix-by-frames of the original (only possible if nothing was flipped
                // inside what survived the cut).
                prop_assert!(got.len() <= msgs.len());
                prop_assert_eq!(&got[..], &msgs[..got.len()]);
            }
        }
    }
}
