//! Saved machine state: one envelope around a versioned payload, for the live clone.
//!
//! Everything a fresh machine needs besides guest memory and the disk (vCPU, interrupt queue,
//! every device, the exit counter) travels as one byte string built here. The receiving side
//! treats it as untrusted: decoding checks the envelope first (magic, version, a size cap, the
//! CRC) and then every field, and returns a [`SnapshotError`] for anything wrong. It never panics
//! and never allocates more than the bytes it was given.
//!
//! ## Envelope (little endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `LSTPSNAP` |
//! | 8 | 2 | major version |
//! | 10 | 2 | minor version |
//! | 12 | 2 | patch version |
//! | 14 | 2 | reserved, 0 |
//! | 16 | 8 | payload length `N`, at most [`MAX_PAYLOAD`] |
//! | 24 | N | payload |
//! | 24 + N | 4 | CRC-32 (IEEE) of bytes `0 .. 24 + N` |
//!
//! ## Versions
//!
//! The version is bumped on purpose, never implicitly: a change that an older reader cannot
//! decode bumps the major version; a reader accepts its own major version with a minor version
//! up to its own (it still knows how to read older minors), and ignores the patch number.
//!
//! ## Payload
//!
//! Types that go into a payload implement [`Persist`] with the small [`Encoder`]/[`Decoder`]
//! pair below: fixed-width little-endian integers, booleans as one byte (0 or 1 only), and
//! byte strings and lists prefixed with a `u32` count that is checked against the bytes left
//! before anything is allocated.

use std::fmt;

/// First eight bytes of every saved state.
pub const MAGIC: [u8; 8] = *b"LSTPSNAP";
/// The version this build writes.
/// 1.1 added the network interface (virtio-net) at the end of the devices; a 1.0 reader would
/// not know it, so it refuses 1.1 states (minor versions are read only by readers as new).
pub const VERSION: Version = Version { major: 1, minor: 1, patch: 0 };
/// Largest payload accepted. The state is registers and device buffers (the vsock device holds
/// at most a few MiB of undelivered client bytes), never guest memory.
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 24;
/// Envelope bytes besides the payload.
pub const OVERHEAD: usize = HEADER_LEN + 4;

/// A semantic version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Version {
    /// Can a reader of version `self` decode a payload written by `writer`?
    pub fn can_read(&self, writer: Version) -> bool {
        writer.major == self.major && writer.minor <= self.minor
    }
}

/// Why saved state could not be decoded or applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error(
        "saved state is {len} bytes, shorter than the {OVERHEAD}-byte envelope: it was cut short in transfer; clone again"
    )]
    TooShort { len: usize },
    #[error(
        "saved state does not start with the snapshot magic: these bytes are not machine state from a Lockstep agent"
    )]
    BadMagic,
    #[error(
        "saved state has version {found}, this agent reads {supported}: clone from a primary running a compatible agent"
    )]
    UnsupportedVersion { found: Version, supported: Version },
    #[error("saved state declares a {len}-byte payload, over the {max}-byte limit: refusing it")]
    TooLarge { len: u64, max: u64 },
    #[error(
        "saved state declares a {declared}-byte payload but carries {actual}: it was cut short or padded in transfer; clone again"
    )]
    LengthMismatch { declared: u64, actual: u64 },
    #[error(
        "saved state fails its CRC (stored {stored:#010x}, computed {computed:#010x}): it was damaged in transfer; clone again"
    )]
    BadCrc { stored: u32, computed: u32 },
    #[error("saved state payload ends inside {what} (at byte {at}): the writer and this reader disagree on the layout")]
    Truncated { what: &'static str, at: usize },
    #[error(
        "saved state payload has {0} bytes left over after the last field: the writer and this reader disagree on the layout"
    )]
    TrailingBytes(usize),
    #[error("saved state has an impossible value: {0}")]
    Invalid(String),
    #[error("saved state does not fit this machine: {0}; start the clone with the primary's configuration")]
    Mismatch(String),
}

pub type Result<T> = std::result::Result<T, SnapshotError>;

/// Wrap a payload in the envelope.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OVERHEAD + payload.len());
    out.extend_from_slice(&MAGIC);
    for v in [VERSION.major, VERSION.minor, VERSION.patch, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Check the envelope and return the writer's version and the payload.
pub fn open(bytes: &[u8]) -> Result<(Version, &[u8])> {
    if bytes.len() < OVERHEAD {
        return Err(SnapshotError::TooShort { len: bytes.len() });
    }
    if bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let found = Version { major: u16_at(8), minor: u16_at(10), patch: u16_at(12) };
    if !VERSION.can_read(found) {
        return Err(SnapshotError::UnsupportedVersion { found, supported: VERSION });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let declared = u64::from_le_bytes(len);
    if declared > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge { len: declared, max: MAX_PAYLOAD });
    }
    let actual = (bytes.len() - OVERHEAD) as u64;
    if declared != actual {
        return Err(SnapshotError::LengthMismatch { declared, actual });
    }
    let body = bytes.len() - 4;
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[body..]);
    let stored = u32::from_le_bytes(crc);
    let computed = crc32fast::hash(&bytes[..body]);
    if stored != computed {
        return Err(SnapshotError::BadCrc { stored, computed });
    }
    Ok((found, &bytes[HEADER_LEN..body]))
}

/// A value that can be saved into a payload and read back.
pub trait Persist: Sized {
    fn encode(&self, e: &mut Encoder);
    fn decode(d: &mut Decoder<'_>) -> Result<Self>;
}

/// Encode `value` and seal it.
pub fn save<T: Persist>(value: &T) -> Vec<u8> {
    let mut e = Encoder::default();
    value.encode(&mut e);
    seal(&e.into_bytes())
}

/// Open the envelope and decode the whole payload as a `T`.
pub fn load<T: Persist>(bytes: &[u8]) -> Result<T> {
    let (_, payload) = open(bytes)?;
    let mut d = Decoder::new(payload);
    let v = T::decode(&mut d)?;
    d.finish()?;
    Ok(v)
}

/// Builds a payload.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(v as u8);
    }
    /// A byte string with its length.
    pub fn bytes(&mut self, v: &[u8]) {
        self.count(v.len());
        self.buf.extend_from_slice(v);
    }
    /// The element count of a list that follows.
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("saved lists are far below 4 G elements"));
    }
    pub fn put<T: Persist>(&mut self, v: &T) {
        v.encode(self);
    }
    pub fn option<T: Persist>(&mut self, v: &Option<T>) {
        self.bool(v.is_some());
        if let Some(v) = v {
            v.encode(self);
        }
    }
    pub fn list<T: Persist>(&mut self, items: &[T]) {
        self.count(items.len());
        for i in items {
            i.encode(self);
        }
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads a payload; every read is bounds-checked and names what it was reading.
#[derive(Debug)]
pub struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Decoder { bytes, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(SnapshotError::Truncated { what, at: self.pos });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    pub fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    pub fn bool(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(SnapshotError::Invalid(format!("{what} is {v}, not a boolean"))),
        }
    }

    /// A list count; each element takes at least `min_elem` bytes, so a count the remaining
    /// bytes cannot hold is refused before anything is allocated for it.
    pub fn count(&mut self, min_elem: usize, what: &'static str) -> Result<usize> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_elem.max(1)) > self.remaining() {
            return Err(SnapshotError::Truncated { what, at: self.pos });
        }
        Ok(n)
    }

    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let n = self.count(1, what)?;
        self.take(n, what)
    }

    pub fn get<T: Persist>(&mut self) -> Result<T> {
        T::decode(self)
    }

    pub fn option<T: Persist>(&mut self, what: &'static str) -> Result<Option<T>> {
        Ok(if self.bool(what)? { Some(T::decode(self)?) } else { None })
    }

    /// A list of `T`, each at least `min_elem` bytes encoded.
    pub fn list<T: Persist>(&mut self, min_elem: usize, what: &'static str) -> Result<Vec<T>> {
        let n = self.count(min_elem, what)?;
        (0..n).map(|_| T::decode(self)).collect()
    }

    /// The payload must be used up exactly.
    pub fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(SnapshotError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Sample {
        a: u64,
        flag: bool,
        data: Vec<u8>,
        inner: Option<Inner>,
        list: Vec<Inner>,
    }

    #[derive(Debug, PartialEq, Eq, Clone)]
    struct Inner(u16, u32);

    impl Persist for Inner {
        fn encode(&self, e: &mut Encoder) {
            e.u16(self.0);
            e.u32(self.1);
        }
        fn decode(d: &mut Decoder<'_>) -> Result<Self> {
            Ok(Inner(d.u16("inner.0")?, d.u32("inner.1")?))
        }
    }

    impl Persist for Sample {
        fn encode(&self, e: &mut Encoder) {
            e.u64(self.a);
            e.bool(self.flag);
            e.bytes(&self.data);
            e.option(&self.inner);
            e.list(&self.list);
        }
        fn decode(d: &mut Decoder<'_>) -> Result<Self> {
            Ok(Sample {
                a: d.u64("a")?,
                flag: d.bool("flag")?,
                data: d.bytes("data")?.to_vec(),
                inner: d.option("inner")?,
                list: d.list(6, "list")?,
            })
        }
    }

    fn sample() -> Sample {
        Sample {
            a: 7,
            flag: true,
            data: b"hello".to_vec(),
            inner: Some(Inner(1, 2)),
            list: vec![Inner(3, 4), Inner(5, 6)],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = save(&s);
        assert_eq!(&bytes[..8], b"LSTPSNAP");
        assert_eq!(load::<Sample>(&bytes).unwrap(), s);
    }

    #[test]
    fn envelope_errors_are_typed() {
        let bytes = save(&sample());
        assert_eq!(open(&bytes[..10]).unwrap_err(), SnapshotError::TooShort { len: 10 });

        let mut magic = bytes.clone();
        magic[0] ^= 1;
        assert_eq!(open(&magic).unwrap_err(), SnapshotError::BadMagic);

        let mut major = bytes.clone();
        major[8] = 2;
        assert!(matches!(open(&major).unwrap_err(), SnapshotError::UnsupportedVersion { .. }));
        let mut minor = bytes.clone();
        minor[10] = VERSION.minor as u8 + 1;
        assert!(matches!(open(&minor).unwrap_err(), SnapshotError::UnsupportedVersion { .. }));
        let mut patch = bytes.clone();
        patch[12] = 9;
        // A newer patch is readable, but the CRC covers the header too.
        assert!(matches!(open(&patch).unwrap_err(), SnapshotError::BadCrc { .. }));

        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(open(&huge).unwrap_err(), SnapshotError::TooLarge { .. }));

        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(open(&long).unwrap_err(), SnapshotError::LengthMismatch { .. }));
        assert!(matches!(open(&bytes[..bytes.len() - 1]).unwrap_err(), SnapshotError::LengthMismatch { .. }));

        let mut flipped = bytes.clone();
        flipped[HEADER_LEN + 3] ^= 0x40;
        assert!(matches!(open(&flipped).unwrap_err(), SnapshotError::BadCrc { .. }));
    }

    #[test]
    fn payload_errors_are_typed() {
        // A well-formed envelope around a payload that lies about its lists.
        let mut e = Encoder::default();
        e.u64(1);
        e.bool(false);
        e.u32(u32::MAX); // "data" claims 4 G bytes
        assert!(matches!(
            load::<Sample>(&seal(&e.into_bytes())).unwrap_err(),
            SnapshotError::Truncated { what: "data", .. }
        ));

        let mut e = Encoder::default();
        e.u64(1);
        e.u8(2); // not a boolean
        assert!(matches!(load::<Sample>(&seal(&e.into_bytes())).unwrap_err(), SnapshotError::Invalid(_)));

        let mut e = Encoder::default();
        sample().encode(&mut e);
        e.u8(0);
        assert_eq!(load::<Sample>(&seal(&e.into_bytes())).unwrap_err(), SnapshotError::TrailingBytes(1));
    }

    #[test]
    fn every_single_byte_flip_is_caught() {
        let bytes = save(&sample());
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                let mut m = bytes.clone();
                m[i] ^= bit;
                assert!(load::<Sample>(&m).is_err(), "flip of bit {bit:#x} at byte {i} went unnoticed");
            }
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = load::<Sample>(&bytes);
        }

        #[test]
        fn random_payloads_in_a_valid_envelope_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            // Past the CRC, the field decoders see arbitrary bytes: errors, never panics.
            let _ = load::<Sample>(&seal(&payload));
        }

        #[test]
        fn mutated_envelopes_are_refused(pos in 0usize..1000, xor in 1u8..=255, cut in 0usize..1000) {
            let bytes = save(&sample());
            let mut m = bytes.clone();
            let i = pos % m.len();
            m[i] ^= xor;
            prop_assert!(load::<Sample>(&m).is_err());
            let c = cut % bytes.len();
            prop_assert!(load::<Sample>(&bytes[..c]).is_err());
        }
    }
}
