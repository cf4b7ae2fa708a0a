//! The append-only file on a block device, rewritten when it fills up.
//!
//! Layout: sector 0 is the header (magic, then which half is active as one byte); the rest of
//! the disk is two equal halves. The active half holds RESP-encoded write commands one after
//! another from its start; the first zero byte where a command should start marks the end, so a
//! half is zeroed before it becomes active. Appends rewrite the last partial sector together
//! with the new bytes.
//!
//! When an append does not fit in the active half, the store is rewritten (like Redis'
//! BGREWRITEAOF, but in the foreground): the other half is zeroed, every key is written to it as
//! one SET, and only then does the header switch halves — one sector write, so a crash at any
//! point leaves either the old log or the new one. The rewrite reflects the store after the
//! pending commands, so those are not appended again. The data set may use up to
//! [`Aof::capacity`] bytes (half the disk less a sector); the server refuses writes beyond that
//! (`-MISCONF`) so that a flush never runs out of disk.
//!
//! All disk I/O goes through one preallocated 64 KiB chunk: flushing and rewriting allocate
//! nothing, whatever the size of the data.

use alloc::vec;
use alloc::vec::Vec;

use crate::resp::{self, Parse, Request};
use crate::store::Store;

/// Bytes per sector.
pub const SECTOR: usize = 512;
const SECTOR64: u64 = SECTOR as u64;
const MAGIC: &[u8; 8] = b"LSKVAOF2";
const OLD_MAGIC: &[u8; 8] = b"LSKVAOF1";
/// Unit of disk I/O (a whole number of sectors).
pub const CHUNK: usize = 64 * 1024;

/// A disk of 512-byte sectors.
pub trait BlockDevice {
    /// Sectors on the disk.
    fn sectors(&self) -> u64;
    /// Read whole sectors starting at `sector` into `buf` (a multiple of [`SECTOR`] long).
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Write whole sectors starting at `sector` from `buf` (a multiple of [`SECTOR`] long).
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError>;
}

/// The device reported an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("disk I/O failed")]
pub struct DiskError;

/// Why the append-only file cannot be used or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AofError {
    #[error("the disk is too small (needs at least 129 KiB)")]
    TooSmall,
    #[error("the disk holds something that is not a kvstore AOF")]
    Foreign,
    #[error("the AOF header names half {0}, which does not exist")]
    BadHalf(u8),
    #[error(
        "this format-1 AOF is longer than half the disk and cannot be converted in place; start with a fresh or bigger disk"
    )]
    Format1TooLong,
    #[error("disk full: the data set is larger than half the disk")]
    DiskFull,
    #[error("a logged command is larger than the memory left to load it")]
    CommandTooLarge,
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// The append-only file; see the module documentation.
#[derive(Debug)]
pub struct Aof<D: BlockDevice> {
    dev: D,
    /// Bytes in each half (a whole number of sectors).
    half: u64,
    active: u8,
    /// Disk byte offset of the end of the persisted log.
    end: u64,
    /// Bytes of the last, partial sector as persisted (len = end % SECTOR).
    tail: Vec<u8>,
    /// The I/O chunk.
    chunk: Vec<u8>,
    /// Rewrites done since boot.
    pub rewrites: u64,
    /// The disk still has a format-1 header (until `replay` converts it).
    format1: bool,
}

impl<D: BlockDevice> Aof<D> {
    /// Open the log on `dev`, writing a fresh header on a zeroed disk.
    pub fn open(mut dev: D) -> Result<Self, AofError> {
        let capacity = dev.sectors() * SECTOR64;
        let half = (capacity.saturating_sub(SECTOR64) / 2) / SECTOR64 * SECTOR64;
        if half < CHUNK as u64 {
            return Err(AofError::TooSmall);
        }
        let mut chunk = vec![0u8; CHUNK];
        dev.read(0, &mut chunk[..SECTOR])?;
        let header = &chunk[..SECTOR];
        let mut format1 = false;
        let active = if &header[..8] == MAGIC {
            if header[8] > 1 {
                return Err(AofError::BadHalf(header[8]));
            }
            header[8]
        } else if &header[..8] == OLD_MAGIC {
            // Format 1: one log over the whole disk from sector 1, which is where half 0 starts.
            // `replay` converts it once it knows where the log ends.
            format1 = true;
            0
        } else if header.iter().all(|&b| b == 0) {
            write_header(&mut dev, &mut chunk, 0)?;
            0
        } else {
            return Err(AofError::Foreign);
        };
        let mut aof = Aof { dev, half, active, end: 0, tail: Vec::new(), chunk, rewrites: 0, format1 };
        aof.end = aof.base(active);
        Ok(aof)
    }

    fn base(&self, half: u8) -> u64 {
        SECTOR64 + u64::from(half) * self.half
    }

    fn limit(&self) -> u64 {
        self.base(self.active) + self.half
    }

    /// Most bytes the data set may take in a rewrite (the server's `-MISCONF` threshold).
    pub fn capacity(&self) -> u64 {
        self.half - SECTOR64
    }

    /// The device (for tests and diagnostics).
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Apply every logged command in order; returns how many there were. `apply` failing stops
    /// the replay with its error.
    pub fn replay<E>(&mut self, mut apply: impl FnMut(&Request<'_>) -> Result<(), E>) -> Result<u64, ReplayError<E>> {
        let start = self.base(self.active);
        let limit = if self.format1 { self.base(1) + self.half } else { self.limit() };
        // A window over the log: read chunk by chunk, parsed commands dropped from its front.
        let mut window: Vec<u8> = Vec::new();
        let mut offset = start; // disk offset of the next byte to read
        let mut parsed = start; // disk offset of the first unparsed byte
        let mut count = 0;
        loop {
            let at = (parsed - (offset - window.len() as u64)) as usize;
            let rest = &window[at..];
            let step = match rest.first() {
                None => Parse::Incomplete,
                Some(b'*') => resp::parse(rest, self.half as usize),
                Some(_) => break, // a zero byte (or garbage): the log ends here
            };
            match step {
                Parse::Complete(req, used) => {
                    apply(&req).map_err(ReplayError::Apply)?;
                    parsed += used as u64;
                    count += 1;
                }
                Parse::Incomplete if offset < limit => {
                    window.drain(..at);
                    let n = CHUNK.min((limit - offset) as usize);
                    let have = window.len();
                    window.try_reserve(n).map_err(|_| ReplayError::Aof(AofError::CommandTooLarge))?;
                    window.resize(have + n, 0);
                    self.dev.read(offset / SECTOR64, &mut window[have..]).map_err(|e| ReplayError::Aof(e.into()))?;
                    offset += n as u64;
                }
                _ => break, // the end of the half, or a damaged command: the log ends here
            }
        }
        drop(window);
        self.end = parsed;
        self.tail = self.read_tail().map_err(ReplayError::Aof)?;
        if self.format1 {
            // A format-1 log that ends inside half 0 is a valid format-2 log there (format 1 only
            // ever appended to a zeroed disk, so everything after it is zero): switch the header.
            if self.end + SECTOR64 > self.base(1) {
                return Err(ReplayError::Aof(AofError::Format1TooLong));
            }
            write_header(&mut self.dev, &mut self.chunk, 0).map_err(|e| ReplayError::Aof(e.into()))?;
            self.format1 = false;
        }
        Ok(count)
    }

    /// The bytes of the partial sector at the end of the log.
    fn read_tail(&mut self) -> Result<Vec<u8>, AofError> {
        let len = (self.end % SECTOR64) as usize;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.dev.read(self.end / SECTOR64, &mut self.chunk[..SECTOR])?;
        Ok(self.chunk[..len].to_vec())
    }

    /// Whether the disk has a format-1 log, which [`Aof::replay`] converts.
    pub fn is_format1(&self) -> bool {
        self.format1
    }

    /// Persist `pending` (encoded commands); `store` is the state after them, for a rewrite.
    pub fn flush(&mut self, pending: &[u8], store: &Store) -> Result<(), AofError> {
        if pending.is_empty() {
            return Ok(());
        }
        let first_sector = self.end / SECTOR64;
        let total = self.tail.len() + pending.len();
        let padded = total.div_ceil(SECTOR) as u64 * SECTOR64;
        if first_sector * SECTOR64 + padded > self.limit() {
            return self.rewrite(store);
        }
        // The stream tail ++ pending ++ zero padding, written chunk by chunk.
        let mut w = SectorWriter { dev: &mut self.dev, chunk: &mut self.chunk, fill: 0, sector: first_sector };
        w.push(&self.tail)?;
        w.push(pending)?;
        let last = w.finish()?;
        self.end += pending.len() as u64;
        self.tail = last;
        Ok(())
    }

    /// Write the whole store into the other half, then switch to it.
    fn rewrite(&mut self, store: &Store) -> Result<(), AofError> {
        if store.aof_bytes() > self.capacity() {
            return Err(AofError::DiskFull);
        }
        let other = 1 - self.active;
        let base = self.base(other);
        // Zero the half first: the end of the log is its first zero byte.
        self.chunk.fill(0);
        let mut at = base;
        while at < base + self.half {
            let n = (CHUNK as u64).min(base + self.half - at) as usize;
            self.dev.write(at / SECTOR64, &self.chunk[..n])?;
            at += n as u64;
        }
        let mut w = SectorWriter { dev: &mut self.dev, chunk: &mut self.chunk, fill: 0, sector: base / SECTOR64 };
        let mut len = 0u64;
        for (k, v) in store.iter() {
            let mut head = [0u8; 64];
            let h = set_header(&mut head, k.len());
            w.push(h)?;
            w.push(k)?;
            w.push(b"\r\n")?;
            let mut mid = [0u8; 32];
            w.push(bulk_header(&mut mid, v.len()))?;
            w.push(v)?;
            w.push(b"\r\n")?;
            len += resp::set_command_len(k.len(), v.len()) as u64;
        }
        let last = w.finish()?;
        write_header(&mut self.dev, &mut self.chunk, other)?;
        self.active = other;
        self.end = base + len;
        self.tail = last;
        self.rewrites += 1;
        Ok(())
    }
}

/// A replay stopped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError<E> {
    /// Reading or converting the log failed.
    #[error(transparent)]
    Aof(AofError),
    /// Applying a command failed.
    #[error(transparent)]
    Apply(E),
}

/// `*3\r\n$3\r\nSET\r\n$<klen>\r\n` into `buf`.
fn set_header(buf: &mut [u8; 64], key_len: usize) -> &[u8] {
    let fixed = b"*3\r\n$3\r\nSET\r\n";
    buf[..fixed.len()].copy_from_slice(fixed);
    let mut tmp = [0u8; 32];
    let h = bulk_header(&mut tmp, key_len);
    let n = fixed.len() + h.len();
    buf[fixed.len()..n].copy_from_slice(h);
    &buf[..n]
}

/// `$<len>\r\n` into `buf`.
fn bulk_header(buf: &mut [u8; 32], len: usize) -> &[u8] {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let d = &digits[i..];
    buf[0] = b'$';
    buf[1..1 + d.len()].copy_from_slice(d);
    buf[1 + d.len()..3 + d.len()].copy_from_slice(b"\r\n");
    &buf[..3 + d.len()]
}

/// Writes a byte stream to consecutive sectors through the chunk buffer.
struct SectorWriter<'a, D: BlockDevice> {
    dev: &'a mut D,
    chunk: &'a mut Vec<u8>,
    fill: usize,
    sector: u64,
}

impl<D: BlockDevice> SectorWriter<'_, D> {
    fn push(&mut self, mut bytes: &[u8]) -> Result<(), AofError> {
        while !bytes.is_empty() {
            let n = bytes.len().min(CHUNK - self.fill);
            self.chunk[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            self.fill += n;
            bytes = &bytes[n..];
            if self.fill == CHUNK {
                self.dev.write(self.sector, &self.chunk[..])?;
                self.sector += (CHUNK / SECTOR) as u64;
                self.fill = 0;
            }
        }
        Ok(())
    }

    /// Pad the last partial sector with zeros and write it; returns the bytes of that partial
    /// sector before the padding (the log's new tail).
    fn finish(self) -> Result<Vec<u8>, AofError> {
        let whole = self.fill / SECTOR * SECTOR;
        let tail = self.chunk[whole..self.fill].to_vec();
        let padded = self.fill.div_ceil(SECTOR) * SECTOR;
        self.chunk[self.fill..padded].fill(0);
        if padded > 0 {
            self.dev.write(self.sector, &self.chunk[..padded])?;
        }
        Ok(tail)
    }
}

/// The format-2 header naming the active half: one sector write, the switch point of a rewrite.
fn write_header<D: BlockDevice>(dev: &mut D, chunk: &mut [u8], active: u8) -> Result<(), DiskError> {
    let header = &mut chunk[..SECTOR];
    header.fill(0);
    header[..8].copy_from_slice(MAGIC);
    header[8] = active;
    dev.write(0, header)
}
