//! Byte layout of log headers and entry frames.

use std::fmt;

pub const LOG_MAGIC: &[u8; 8] = b"LOCKSTEP";
/// Bumped on purpose whenever the layout or the meaning of an entry changes. Version 2 added the
/// guest's boot arguments to the header; version 1 logs still decode (with none).
pub const LOG_VERSION: u16 = 2;
/// The oldest version this agent reads.
pub const LOG_VERSION_MIN: u16 = 1;
/// Frames larger than this are refused: a length field from untrusted bytes must not make us
/// allocate gigabytes.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// len(4) + kind(1) + exit(8) before the payload, crc(4) after it.
pub const FRAME_OVERHEAD: usize = 17;
const MAX_HEADER: usize = 64 << 10;

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
    #[error("frame at byte {offset} is corrupt: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { offset: u64, stored: u32, computed: u32 },
    #[error("frame at byte {offset} declares {len} payload bytes, more than the {MAX_PAYLOAD} allowed")]
    TooLarge { offset: u64, len: usize },
    #[error("frame at byte {offset} has unknown entry kind {kind}")]
    UnknownKind { offset: u64, kind: u8 },
    #[error("frame at byte {offset} ({kind}) has a malformed payload: {reason}")]
    BadPayload { offset: u64, kind: &'static str, reason: &'static str },
    #[error("log is truncated: {0} bytes of an incomplete frame at the end (the recording was cut short)")]
    Truncated(usize),
    #[error("I/O error reading the log: {0}")]
    Io(String),
}

/// Identity of a recording; replay refuses a log whose guest or machine differs from its own.
#[derive(Clone, Debug, PartialEq, Eq)]
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
        if len > MAX_HEADER {
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
        };
        if r.pos != r.b.len() {
            return Err(CodecError::BadHeader("trailing bytes in header"));
        }
        Ok(Some((header, total)))
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
        }
    }

    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    fn payload(&self, out: &mut Vec<u8>) {
        match self {
            Entry::MmioRead { addr, value } => {
                out.extend_from_slice(&addr.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
            }
            Entry::Random { bytes } => out.extend_from_slice(bytes),
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
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encode one entry as a frame: `len u32 | kind u8 | exit u64 | payload | crc32 u32`, where the
/// CRC covers kind, exit and payload, and `len` is the payload length.
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

/// Decode the frame at the front of `buf`. `Ok(None)`: not a whole frame yet. `offset` is the
/// position of `buf` in the stream, for error messages.
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
        };
        let bytes = h.encode();
        assert_eq!(LogHeader::decode(&bytes).unwrap(), Some((h.clone(), bytes.len())));
        assert_eq!(LogHeader::decode(&bytes[..10]).unwrap(), None);
        assert_eq!(LogHeader::decode(b"NOTALOG!xxxxxxxxxx"), Err(CodecError::BadMagic));
        let mut v3 = bytes.clone();
        v3[8] = 3;
        assert_eq!(LogHeader::decode(&v3), Err(CodecError::Version { found: 3 }));
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
        };
        let v2 = h.encode();
        // Version 1 is version 2 without the last string (2 bytes of length, empty).
        let body_len = u32::from_le_bytes(v2[10..14].try_into().unwrap()) as usize - 2;
        let mut v1 = Vec::new();
        v1.extend_from_slice(LOG_MAGIC);
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&(body_len as u32).to_le_bytes());
        v1.extend_from_slice(&v2[14..14 + body_len]);
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(LogHeader::decode(&v1).unwrap(), Some((h, v1.len())));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut f = vec![0xff, 0xff, 0xff, 0x7f];
        f.extend_from_slice(&[0; 64]);
        assert!(matches!(decode_frame(&f, 0), Err(CodecError::TooLarge { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        /// Untrusted bytes: decoding returns, never panics.
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes, 0);
            let _ = LogHeader::decode(&bytes);
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
