//! Byte layout of log headers and entries (docs/log-format.md).
//!
//! An entry is encoded once, compactly, and the same bytes serve the log file and the FT
//! channel: its *body* is a kind byte and the kind's fields (varints where they are numbers),
//! and in a stream each body is preceded by the distance in exits from the previous entry and its
//! length, both varints, so a typical entry costs its payload plus three or four bytes. Files
//! (version 3) carry entries in CRC-checked blocks ([`BlockEncoder`], [`decode_block`]); the
//! channel carries them in its own CRC-checked frames (`lockstep_ft::wire`). Logs of versions 1
//! and 2, one fixed-layout frame per entry ([`encode_frame`], [`decode_frame`]), are still read.
//!
//! This file uses only `std`, `crc32fast` and `thiserror`: the fuzz harness compiles it alone.

use std::fmt;

pub const LOG_MAGIC: &[u8; 8] = b"LOCKSTEP";
/// Bumped on purpose whenever the layout or the meaning of an entry changes. Version 2 added the
/// guest's boot arguments to the header; version 3 replaced the per-entry frames by compact
/// entries in blocks; version 4 added the guest's payload (the wasi guest's module) to the
/// header; version 5 added the `net-frame` entry (frames for the VM's own interface). Versions 1
/// to 4 still decode.
pub const LOG_VERSION: u16 = 5;
/// The oldest version this agent reads.
pub const LOG_VERSION_MIN: u16 = 1;
/// The first version with compact entries in blocks.
pub const BLOCK_VERSION: u16 = 3;
/// Frames and blocks larger than this are refused: a length field from untrusted bytes must
/// not make us allocate gigabytes.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Version 1 and 2 frames: len(4) + kind(1) + exit(8) before the payload, crc(4) after it.
pub const FRAME_OVERHEAD: usize = 17;
/// A block's length field and CRC.
pub const BLOCK_OVERHEAD: usize = 8;
/// Where a writer closes a block: big enough that the block's 8 bytes vanish, small enough that
/// little is lost if a recording dies.
pub const BLOCK_BYTES: usize = 64 << 10;
const MAX_HEADER: usize = 64 << 10;
/// Longest `net-frame` (the virtio-net device's largest frame: 1500 bytes of MTU, an Ethernet
/// header and a VLAN tag).
pub const MAX_NET_FRAME: usize = 1518;
/// The first version whose header carries a payload.
pub const PAYLOAD_VERSION: u16 = 4;
/// Most bytes of payload a header may carry (a WebAssembly module of a few MiB is usual). A
/// header declaring more is refused before anything is read into memory for it.
pub const MAX_HEADER_PAYLOAD: usize = 256 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("not a Lockstep log (bad magic)")]
    BadMagic,
    #[error(
        "log format version {found} is not supported (this agent reads versions {LOG_VERSION_MIN} to {LOG_VERSION}); replay it with the agent that recorded it"
    )]
    Version { found: u16 },
    #[error("log header is corrupt: {0}")]
    BadHeader(&'static str),
    #[error("log data at byte {offset} is corrupt: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { offset: u64, stored: u32, computed: u32 },
    #[error("log frame or block at byte {offset} declares {len} payload bytes, more than the {MAX_PAYLOAD} allowed")]
    TooLarge { offset: u64, len: usize },
    #[error("log entry at byte {offset} has unknown kind {kind}")]
    UnknownKind { offset: u64, kind: u8 },
    #[error("log entry at byte {offset} ({kind}) has a malformed payload: {reason}")]
    BadPayload { offset: u64, kind: &'static str, reason: &'static str },
    #[error("block at byte {offset} is corrupt: {reason}")]
    BadBlock { offset: u64, reason: &'static str },
    #[error("log is truncated: {0} bytes of an incomplete frame at the end (the recording was cut short)")]
    Truncated(usize),
    #[error("I/O error reading the log: {0}")]
    Io(String),
}

/// Identity of a recording; replay refuses a log whose guest or machine differs from its own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogHeader {
    pub guest: String,
    /// BLAKE3 of the guest image, so a rebuilt guest is not replayed against an old log.
    pub image_hash: [u8; 32],
    pub mem_size: u64,
    pub disk_size: u64,
    pub guest_arg: u64,
    pub vm_id: String,
    /// The guest's boot arguments (`lockstep_guest_abi::BOOT_ARGS_GPA`): the kvstore's limits.
    /// Empty in version-1 logs.
    pub boot_args: String,
    /// Bytes the VMM placed at the top of guest memory at power-on
    /// (`lockstep_guest_abi::payload_gpa`): the wasi guest's module, arguments and environment.
    /// Empty for other guests, and in logs before version 4.
    pub payload: Vec<u8>,
}

impl LogHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        put_str(&mut body, &self.guest);
        body.extend_from_slice(&self.image_hash);
        body.extend_from_slice(&self.mem_size.to_le_bytes());
        body.extend_from_slice(&self.disk_size.to_le_bytes());
        body.extend_from_slice(&self.guest_arg.to_le_bytes());
        put_str(&mut body, &self.vm_id);
        put_str(&mut body, &self.boot_args);
        body.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        body.extend_from_slice(&self.payload);
        let mut out = Vec::with_capacity(body.len() + 20);
        out.extend_from_slice(LOG_MAGIC);
        out.extend_from_slice(&LOG_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode a header from the front of `buf`: `Ok(None)` if more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(LogHeader, usize)>, CodecError> {
        Ok(Self::decode_versioned(buf)?.map(|(h, _, used)| (h, used)))
    }

    /// [`LogHeader::decode`], also saying which format version the log is in (how its entries
    /// are laid out).
    pub fn decode_versioned(buf: &[u8]) -> Result<Option<(LogHeader, u16, usize)>, CodecError> {
        if buf.len() < 14 {
            return if LOG_MAGIC.starts_with(&buf[..buf.len().min(8)]) { Ok(None) } else { Err(CodecError::BadMagic) };
        }
        if &buf[..8] != LOG_MAGIC {
            return Err(CodecError::BadMagic);
        }
        let version = u16::from_le_bytes([buf[8], buf[9]]);
        if !(LOG_VERSION_MIN..=LOG_VERSION).contains(&version) {
            return Err(CodecError::Version { found: version });
        }
        let len = u32::from_le_bytes(buf[10..14].try_into().expect("4 bytes")) as usize;
        let max = if version >= PAYLOAD_VERSION { MAX_HEADER + MAX_HEADER_PAYLOAD } else { MAX_HEADER };
        if len > max {
            return Err(CodecError::BadHeader("header length out of range"));
        }
        let total = 14 + len + 4;
        if buf.len() < total {
            return Ok(None);
        }
        let stored = u32::from_le_bytes(buf[14 + len..total].try_into().expect("4 bytes"));
        if crc32fast::hash(&buf[..14 + len]) != stored {
            return Err(CodecError::BadHeader("CRC mismatch"));
        }
        let mut r = Cursor { b: &buf[14..14 + len], pos: 0 };
        let bad = |_| CodecError::BadHeader("fields do not fit the declared length");
        let header = LogHeader {
            guest: r.string().map_err(bad)?,
            image_hash: r.take(32).map_err(bad)?.try_into().expect("32 bytes"),
            mem_size: r.u64().map_err(bad)?,
            disk_size: r.u64().map_err(bad)?,
            guest_arg: r.u64().map_err(bad)?,
            vm_id: r.string().map_err(bad)?,
            boot_args: if version >= 2 { r.string().map_err(bad)? } else { String::new() },
            payload: if version >= PAYLOAD_VERSION { r.bytes32().map_err(bad)?.to_vec() } else { Vec::new() },
        };
        if r.pos != r.b.len() {
            return Err(CodecError::BadHeader("trailing bytes in header"));
        }
        Ok(Some((header, version, total)))
    }
}

/// One recorded non-deterministic input, or a check.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    /// The value an outside-facing device register returned (the clock).
    MmioRead { addr: u64, value: u64 },
    /// Bytes the random device placed in guest memory.
    Random { bytes: Vec<u8> },
    /// The periodic timer fired: raise the timer interrupt at this exit.
    TimerTick,
    /// A client connected; `conn` names it in later entries.
    ClientConnect { conn: u32 },
    /// Bytes a client sent.
    ClientData { conn: u32, bytes: Vec<u8> },
    /// A client closed its connection.
    ClientClose { conn: u32 },
    /// Digest of vCPU and device state after this exit; replay must compute the same.
    Digest { digest: [u8; 32] },
    /// The recording ended after this exit; digest includes guest memory.
    End { digest: [u8; 32] },
    /// The VMM woke a waiting guest without an event (it had work of its own, such as a clone
    /// round); the guest sees a return from its wait with no interrupt.
    Wake,
    /// An Ethernet frame from the network for the VM's own interface (virtio-net).
    NetFrame { bytes: Vec<u8> },
}

impl Entry {
    pub fn kind(&self) -> u8 {
        match self {
            Entry::MmioRead { .. } => 1,
            Entry::Random { .. } => 2,
            Entry::TimerTick => 3,
            Entry::ClientConnect { .. } => 4,
            Entry::ClientData { .. } => 5,
            Entry::ClientClose { .. } => 6,
            Entry::Digest { .. } => 7,
            Entry::End { .. } => 8,
            Entry::Wake => 9,
            Entry::NetFrame { .. } => 10,
        }
    }

    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// Appends the entry's compact body: its kind, then its fields (numbers as varints, byte
    /// strings as they are: the body's length delimits them).
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(self.kind());
        match self {
            Entry::MmioRead { addr, value } => {
                put_varint(out, *addr);
                put_varint(out, *value);
            }
            Entry::Random { bytes } | Entry::NetFrame { bytes } => out.extend_from_slice(bytes),
            Entry::TimerTick | Entry::Wake => {}
            Entry::ClientConnect { conn } | Entry::ClientClose { conn } => put_varint(out, *conn as u64),
            Entry::ClientData { conn, bytes } => {
                put_varint(out, *conn as u64);
                out.extend_from_slice(bytes);
            }
            Entry::Digest { digest } | Entry::End { digest } => out.extend_from_slice(digest),
        }
    }

    /// Bytes of [`Entry::encode_body`].
    pub fn body_len(&self) -> usize {
        1 + match self {
            Entry::MmioRead { addr, value } => varint_len(*addr) + varint_len(*value),
            Entry::Random { bytes } | Entry::NetFrame { bytes } => bytes.len(),
            Entry::TimerTick | Entry::Wake => 0,
            Entry::ClientConnect { conn } | Entry::ClientClose { conn } => varint_len(*conn as u64),
            Entry::ClientData { conn, bytes } => varint_len(*conn as u64) + bytes.len(),
            Entry::Digest { .. } | Entry::End { .. } => 32,
        }
    }

    /// Decodes a body made by [`Entry::encode_body`] (untrusted bytes: anything but exactly
    /// such a body is an error). `offset` places it in its stream, for error messages.
    pub fn decode_body(body: &[u8], offset: u64) -> Result<Entry, CodecError> {
        let (&kind, mut p) = body.split_first().ok_or(CodecError::BadBlock { offset, reason: "empty entry" })?;
        let name = kind_name(kind);
        let bad = |reason| CodecError::BadPayload { offset, kind: name, reason };
        let varint = |p: &mut &[u8]| -> Result<u64, CodecError> {
            let (v, n) = get_varint(p).ok_or(bad("a number is not a shortest-form varint"))?;
            *p = &p[n..];
            Ok(v)
        };
        let conn = |v: u64| u32::try_from(v).map_err(|_| bad("connection id out of range"));
        let entry = match kind {
            1 => Entry::MmioRead { addr: varint(&mut p)?, value: varint(&mut p)? },
            2 => return Ok(Entry::Random { bytes: p.to_vec() }),
            3 => Entry::TimerTick,
            4 => Entry::ClientConnect { conn: conn(varint(&mut p)?)? },
            5 => {
                let c = conn(varint(&mut p)?)?;
                if p.is_empty() {
                    return Err(bad("client data needs at least one byte"));
                }
                return Ok(Entry::ClientData { conn: c, bytes: p.to_vec() });
            }
            6 => Entry::ClientClose { conn: conn(varint(&mut p)?)? },
            7 | 8 => {
                let digest: [u8; 32] = p.try_into().map_err(|_| bad("wrong length"))?;
                return Ok(if kind == 7 { Entry::Digest { digest } } else { Entry::End { digest } });
            }
            9 => Entry::Wake,
            10 if p.is_empty() => return Err(bad("a frame needs at least one byte")),
            10 if p.len() > MAX_NET_FRAME => return Err(bad("a frame longer than the device takes")),
            10 => return Ok(Entry::NetFrame { bytes: p.to_vec() }),
            kind => return Err(CodecError::UnknownKind { offset, kind }),
        };
        if !p.is_empty() {
            return Err(bad("wrong length"));
        }
        Ok(entry)
    }

    fn payload(&self, out: &mut Vec<u8>) {
        match self {
            Entry::MmioRead { addr, value } => {
                out.extend_from_slice(&addr.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
            }
            Entry::Random { bytes } | Entry::NetFrame { bytes } => out.extend_from_slice(bytes),
            Entry::TimerTick | Entry::Wake => {}
            Entry::ClientConnect { conn } | Entry::ClientClose { conn } => out.extend_from_slice(&conn.to_le_bytes()),
            Entry::ClientData { conn, bytes } => {
                out.extend_from_slice(&conn.to_le_bytes());
                out.extend_from_slice(bytes);
            }
            Entry::Digest { digest } | Entry::End { digest } => out.extend_from_slice(digest),
        }
    }

    fn decode_payload(kind: u8, p: &[u8], offset: u64) -> Result<Entry, CodecError> {
        let name = kind_name(kind);
        let bad = |reason| CodecError::BadPayload { offset, kind: name, reason };
        let exact = |n: usize| if p.len() == n { Ok(()) } else { Err(bad("wrong length")) };
        let u32_at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().expect("8 bytes"));
        Ok(match kind {
            1 => {
                exact(16)?;
                Entry::MmioRead { addr: u64_at(0), value: u64_at(8) }
            }
            2 => Entry::Random { bytes: p.to_vec() },
            3 => {
                exact(0)?;
                Entry::TimerTick
            }
            4 => {
                exact(4)?;
                Entry::ClientConnect { conn: u32_at(0) }
            }
            5 => {
                if p.len() < 5 {
                    return Err(bad("client data needs a connection id and at least one byte"));
                }
                Entry::ClientData { conn: u32_at(0), bytes: p[4..].to_vec() }
            }
            6 => {
                exact(4)?;
                Entry::ClientClose { conn: u32_at(0) }
            }
            7 | 8 => {
                exact(32)?;
                let digest = p.try_into().expect("32 bytes");
                if kind == 7 { Entry::Digest { digest } } else { Entry::End { digest } }
            }
            9 => {
                exact(0)?;
                Entry::Wake
            }
            kind => return Err(CodecError::UnknownKind { offset, kind }),
        })
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "mmio-read",
        2 => "random",
        3 => "timer-tick",
        4 => "client-connect",
        5 => "client-data",
        6 => "client-close",
        7 => "digest",
        8 => "end",
        9 => "wake",
        10 => "net-frame",
        _ => "unknown",
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::MmioRead { addr, value } => write!(f, "mmio-read({addr:#x} = {value:#x})"),
            Entry::Random { bytes } => write!(f, "random({} bytes)", bytes.len()),
            Entry::TimerTick => write!(f, "timer-tick"),
            Entry::ClientConnect { conn } => write!(f, "client-connect(conn {conn})"),
            Entry::ClientData { conn, bytes } => write!(f, "client-data(conn {conn}, {} bytes)", bytes.len()),
            Entry::ClientClose { conn } => write!(f, "client-close(conn {conn})"),
            Entry::Digest { digest } => write!(f, "digest({})", hex(&digest[..8])),
            Entry::End { digest } => write!(f, "end({})", hex(&digest[..8])),
            Entry::Wake => write!(f, "wake"),
            Entry::NetFrame { bytes } => write!(f, "net-frame({} bytes)", bytes.len()),
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encode one entry as a version 1 and 2 frame: `len u32 | kind u8 | exit u64 | payload |
/// crc32 u32`, where the CRC covers kind, exit and payload, and `len` is the payload length.
/// Agents write version 3 now; this layout is what logs of older agents hold.
pub fn encode_frame(exit: u64, entry: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_OVERHEAD + 16);
    out.extend_from_slice(&[0; 4]);
    out.push(entry.kind());
    out.extend_from_slice(&exit.to_le_bytes());
    entry.payload(&mut out);
    let len = out.len() - 13;
    assert!(len <= MAX_PAYLOAD, "entry payload of {len} bytes exceeds the frame limit");
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32fast::hash(&out[4..]);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decode the version 1 and 2 frame at the front of `buf`. `Ok(None)`: not a whole frame yet.
/// `offset` is the position of `buf` in the stream, for error messages.
pub fn decode_frame(buf: &[u8], offset: u64) -> Result<Option<(u64, Entry, usize)>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(CodecError::TooLarge { offset, len });
    }
    let total = FRAME_OVERHEAD + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[4..13 + len];
    let stored = u32::from_le_bytes(buf[13 + len..total].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(CodecError::Crc { offset, stored, computed });
    }
    let kind = body[0];
    let exit = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
    let entry = Entry::decode_payload(kind, &body[9..], offset)?;
    Ok(Some((exit, entry, total)))
}

/// Bytes an entry occupies in a stream (block or channel): the varint distance in exits from the
/// previous entry, the varint length of its body, the body. This is what "log bytes" count.
pub fn entry_len(exit_delta: u64, body_len: usize) -> usize {
    varint_len(exit_delta) + varint_len(body_len as u64) + body_len
}

/// Builds one block of a version-3 log:
///
/// ```text
/// u32 LE   payload length P (at most MAX_PAYLOAD)
/// P bytes  varint count (at least 1), then count entries:
///            varint exit (the first entry: absolute; the others: distance from the previous),
///            varint body length, body (Entry::encode_body)
/// u32 LE   CRC-32 of the payload
/// ```
#[derive(Debug, Default)]
pub struct BlockEncoder {
    entries: Vec<u8>,
    count: u64,
    last: Option<u64>,
}

impl BlockEncoder {
    /// Adds an entry at `exit` (exits never go back); returns the bytes it took.
    pub fn push(&mut self, exit: u64, entry: &Entry) -> usize {
        let start = self.entries.len();
        let last = self.last.unwrap_or(0);
        debug_assert!(exit >= last, "log entries come in exit order");
        put_varint(&mut self.entries, exit.saturating_sub(last));
        put_varint(&mut self.entries, entry.body_len() as u64);
        entry.encode_body(&mut self.entries);
        self.last = Some(exit);
        self.count += 1;
        self.entries.len() - start
    }

    /// Entries so far.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of entries so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The block, framed; the encoder is empty again.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(self.entries.len() + 10);
        put_varint(&mut payload, self.count);
        payload.extend_from_slice(&self.entries);
        assert!(payload.len() <= MAX_PAYLOAD, "log block of {} bytes exceeds the limit", payload.len());
        let mut out = Vec::with_capacity(payload.len() + BLOCK_OVERHEAD);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        *self = BlockEncoder::default();
        out
    }
}

/// `entries` as one block.
pub fn encode_block(entries: &[(u64, Entry)]) -> Vec<u8> {
    let mut b = BlockEncoder::default();
    for (exit, e) in entries {
        b.push(*exit, e);
    }
    b.finish()
}

/// Decode the block at the front of `buf`. `Ok(None)`: not a whole block yet. `offset` is the
/// position of `buf` in the stream, for error messages.
#[allow(clippy::type_complexity)]
pub fn decode_block(buf: &[u8], offset: u64) -> Result<Option<(Vec<(u64, Entry)>, usize)>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(CodecError::TooLarge { offset, len });
    }
    let total = len + BLOCK_OVERHEAD;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = &buf[4..4 + len];
    let stored = u32::from_le_bytes(buf[4 + len..total].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(CodecError::Crc { offset, stored, computed });
    }
    let bad = |reason| CodecError::BadBlock { offset, reason };
    let mut p = payload;
    let varint = |p: &mut &[u8], what| -> Result<u64, CodecError> {
        let (v, n) = get_varint(p).ok_or(bad(what))?;
        *p = &p[n..];
        Ok(v)
    };
    let count = varint(&mut p, "bad entry count")?;
    // Every entry takes at least three bytes (exit, length, kind).
    if count == 0 || count > (p.len() / 3) as u64 {
        return Err(bad("entry count does not fit the block"));
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut exit: Option<u64> = None;
    for _ in 0..count {
        let d = varint(&mut p, "bad exit")?;
        let x = match exit {
            None => d,
            Some(prev) => prev.checked_add(d).ok_or(bad("exit out of range"))?,
        };
        let n = varint(&mut p, "bad entry length")?;
        let n = usize::try_from(n).ok().filter(|&n| n <= p.len()).ok_or(bad("entry longer than the block"))?;
        let at = offset + (4 + len - p.len()) as u64;
        entries.push((x, Entry::decode_body(&p[..n], at)?));
        p = &p[n..];
        exit = Some(x);
    }
    if !p.is_empty() {
        return Err(bad("bytes after the last entry"));
    }
    Ok(Some((entries, total)))
}

// The log's varints are the channel's (one encoding, shortest form only, in lockstep-ft).
pub use lockstep_ft::wire::{get_varint, put_varint, varint_len};

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ()> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(())?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, ()> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| ())?))
    }
    fn bytes32(&mut self) -> Result<&[u8], ()> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| ())?) as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, ()> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| ())?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_kinds() -> Vec<Entry> {
        vec![
            Entry::MmioRead { addr: 0xd000_0000, value: 42 },
            Entry::Random { bytes: vec![1, 2, 3] },
            Entry::TimerTick,
            Entry::ClientConnect { conn: 7 },
            Entry::ClientData { conn: 7, bytes: b"*1\r\n$4\r\nPING\r\n".to_vec() },
            Entry::ClientClose { conn: 7 },
            Entry::Digest { digest: [9; 32] },
            Entry::End { digest: [3; 32] },
            Entry::Wake,
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for (i, e) in all_kinds().into_iter().enumerate() {
            let frame = encode_frame(i as u64 * 1000, &e);
            let (exit, back, used) = decode_frame(&frame, 0).unwrap().unwrap();
            assert_eq!((exit, &back, used), (i as u64 * 1000, &e, frame.len()));
            // Every strict prefix is "need more", never an error or a wrong entry.
            for cut in 0..frame.len() {
                assert_eq!(decode_frame(&frame[..cut], 0), Ok(None), "{e:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn any_single_bit_flip_is_detected() {
        let frame = encode_frame(5, &Entry::ClientData { conn: 1, bytes: b"SET k v".to_vec() });
        for byte in 0..frame.len() {
            for bit in 0..8 {
                let mut f = frame.clone();
                f[byte] ^= 1 << bit;
                match decode_frame(&f, 0) {
                    Ok(Some((exit, e, _))) => panic!("flip {byte}:{bit} decoded as {exit} {e:?}"),
                    Ok(None) => assert!(byte < 4, "only a length change can ask for more bytes"),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn header_round_trip_and_errors() {
        let h = LogHeader {
            guest: "kvstore".into(),
            image_hash: [7; 32],
            mem_size: 64 << 20,
            disk_size: 1 << 26,
            guest_arg: 0,
            vm_id: "vm-1".into(),
            boot_args: "maxclients=10 maxmemory=1048576".into(),
            payload: b"LSWASI01 and a module".to_vec(),
        };
        let bytes = h.encode();
        assert_eq!(LogHeader::decode(&bytes).unwrap(), Some((h.clone(), bytes.len())));
        assert_eq!(LogHeader::decode(&bytes[..10]).unwrap(), None);
        assert_eq!(LogHeader::decode(b"NOTALOG!xxxxxxxxxx"), Err(CodecError::BadMagic));
        let mut newer = bytes.clone();
        newer[8] = LOG_VERSION as u8 + 1;
        assert_eq!(LogHeader::decode(&newer), Err(CodecError::Version { found: LOG_VERSION + 1 }));
        assert_eq!(LogHeader::decode_versioned(&bytes).unwrap().map(|(_, v, _)| v), Some(LOG_VERSION));
        let mut corrupt = bytes.clone();
        let last = corrupt.len() - 6;
        corrupt[last] ^= 0x40;
        assert!(matches!(LogHeader::decode(&corrupt), Err(CodecError::BadHeader(_))));
    }

    /// A version-1 header (no boot arguments), as agents before version 2 wrote it.
    #[test]
    fn version_1_headers_decode_without_boot_args() {
        let h = LogHeader {
            guest: "idle".into(),
            image_hash: [3; 32],
            mem_size: 16 << 20,
            disk_size: 0,
            guest_arg: 5,
            vm_id: "old".into(),
            boot_args: String::new(),
            payload: Vec::new(),
        };
        let v4 = h.encode();
        // Version 1 is version 4 without the boot arguments (2 bytes of length, empty) and the
        // payload (4 bytes of length, empty).
        let body_len = u32::from_le_bytes(v4[10..14].try_into().unwrap()) as usize - 6;
        let mut v1 = Vec::new();
        v1.extend_from_slice(LOG_MAGIC);
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&(body_len as u32).to_le_bytes());
        v1.extend_from_slice(&v4[14..14 + body_len]);
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(LogHeader::decode(&v1).unwrap(), Some((h, v1.len())));
    }

    #[test]
    fn a_header_payload_round_trips_and_a_lying_length_is_refused() {
        let h = LogHeader { guest: "wasi".into(), payload: vec![0x5a; 300_000], ..Default::default() };
        let bytes = h.encode();
        assert_eq!(LogHeader::decode(&bytes).unwrap(), Some((h.clone(), bytes.len())));
        assert_eq!(LogHeader::decode(&bytes[..bytes.len() - 1]).unwrap(), None, "a partial header needs more");
        // A version-3 header may not be larger than 64 KiB.
        let mut v3 = bytes.clone();
        v3[8] = 3;
        assert!(matches!(LogHeader::decode(&v3), Err(CodecError::BadHeader(_))));
        let mut huge = bytes.clone();
        huge[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(LogHeader::decode(&huge), Err(CodecError::BadHeader("header length out of range")));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut f = vec![0xff, 0xff, 0xff, 0x7f];
        f.extend_from_slice(&[0; 64]);
        assert!(matches!(decode_frame(&f, 0), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn every_kind_round_trips_through_a_block_and_costs_a_few_bytes() {
        let entries: Vec<(u64, Entry)> =
            all_kinds().into_iter().enumerate().map(|(i, e)| (1000 + i as u64 / 2, e)).collect();
        let block = encode_block(&entries);
        let (back, used) = decode_block(&block, 0).unwrap().unwrap();
        assert_eq!((back, used), (entries.clone(), block.len()));
        for cut in 0..block.len() {
            assert_eq!(decode_block(&block[..cut], 0), Ok(None), "cut at {cut}");
        }
        // What a request costs: its bytes, the kind, a varint connection id, a one-byte distance
        // and a one-byte length.
        let data = Entry::ClientData { conn: 7, bytes: vec![b'x'; 45] };
        assert_eq!(entry_len(1, data.body_len()), 45 + 4);
        let mut body = Vec::new();
        data.encode_body(&mut body);
        assert_eq!(body.len(), data.body_len());
        assert_eq!(Entry::decode_body(&body, 0).unwrap(), data);
        // A timer tick: three bytes, was seventeen.
        assert_eq!(entry_len(1, Entry::TimerTick.body_len()), 3);
    }

    #[test]
    fn any_single_bit_flip_in_a_block_is_detected() {
        let block =
            encode_block(&[(5, Entry::ClientData { conn: 1, bytes: b"SET k v".to_vec() }), (9, Entry::TimerTick)]);
        for byte in 0..block.len() {
            for bit in 0..8 {
                let mut f = block.clone();
                f[byte] ^= 1 << bit;
                match decode_block(&f, 0) {
                    Ok(Some((e, _))) => panic!("flip {byte}:{bit} decoded as {e:?}"),
                    Ok(None) => assert!(byte < 4, "only a length change can ask for more bytes"),
                    Err(_) => {}
                }
            }
        }
    }

    #[test]
    fn bodies_refuse_what_encode_body_never_makes() {
        for bad in [
            &[][..],
            &[1, 0x80, 0x00, 1][..],                // an overlong varint
            &[4, 0x80, 0x80, 0x80, 0x80, 0x10][..], // a connection id over 32 bits
            &[5, 1][..],                            // client data without data
            &[6, 1, 0][..],                         // a trailing byte
            &[7, 0, 0][..],                         // a short digest
            &[42][..],                              // an unknown kind
        ] {
            assert!(Entry::decode_body(bad, 0).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        /// Untrusted bytes: decoding returns, never panics, and what decodes re-encodes to the
        /// same bytes.
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes, 0);
            let _ = LogHeader::decode(&bytes);
            if let Ok(Some((entries, used))) = decode_block(&bytes, 0) {
                prop_assert_eq!(encode_block(&entries), &bytes[..used]);
            }
            if let Ok(e) = Entry::decode_body(&bytes, 0) {
                let mut again = Vec::new();
                e.encode_body(&mut again);
                prop_assert_eq!(again, bytes);
            }
        }

        /// A valid block with random corruption either decodes to the original or errors.
        #[test]
        fn mutated_blocks_never_decode_to_something_else(
            idx in 0usize..9, exit in 0u64..1 << 40, pos in any::<usize>(), val in any::<u8>()
        ) {
            let e = all_kinds().swap_remove(idx);
            let entries = vec![(exit, e.clone()), (exit + 3, Entry::TimerTick)];
            let mut f = encode_block(&entries);
            let p = pos % f.len();
            let changed = f[p] != val;
            f[p] = val;
            if let Ok(Some((d, _))) = decode_block(&f, 0) {
                prop_assert!(!changed && d == entries);
            }
        }

        /// A valid frame with random corruption either decodes to the original or errors.
        #[test]
        fn mutated_frames_never_decode_to_something_else(
            idx in 0usize..9, exit in any::<u64>(), pos in any::<usize>(), val in any::<u8>()
        ) {
            let e = all_kinds().swap_remove(idx);
            let mut f = encode_frame(exit, &e);
            let p = pos % f.len();
            let changed = f[p] != val;
            f[p] = val;
            if let Ok(Some((x, d, _))) = decode_frame(&f, 0) {
                prop_assert!(!changed && x == exit && d == e);
            }
        }
    }
}
