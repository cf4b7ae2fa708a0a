//! The append-only file on the virtio-blk disk, rewritten when it fills up.
//!
//! Layout: sector 0 is the header (magic, then which half is active as one byte); the rest of
//! the disk is two equal halves. The active half holds RESP-encoded write commands one after
//! another from its start; the first zero byte where a command should start marks the end, so a
//! half is zeroed before it becomes active. Appends rewrite the last partial sector together
//! with the new bytes in one request.
//!
//! When an append does not fit in the active half, the store is rewritten (like Redis'
//! BGREWRITEAOF, but in the foreground): the other half is zeroed, every key is written to it as
//! one SET, and only then does the header switch halves — one sector write, so a crash at any
//! point leaves either the old log or the new one. The rewrite reflects the store after the
//! pending commands, so those are not appended again. The data set may use up to half the disk.

use alloc::vec;
use alloc::vec::Vec;

use lockstep_guest::kv::resp::{self, Parse, reply};
use lockstep_guest::kv::store::Store;
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::mmio::MmioTransport;

use crate::Hal;

const MAGIC: &[u8; 8] = b"LSKVAOF2";
const OLD_MAGIC: &[u8; 8] = b"LSKVAOF1";
const SECTOR: u64 = SECTOR_SIZE as u64;
const CHUNK: usize = 64 * 1024;

pub struct Aof {
    blk: VirtIOBlk<Hal, MmioTransport<'static>>,
    /// Bytes in each half (a whole number of sectors).
    half: u64,
    active: u8,
    /// Disk byte offset of the end of the persisted log.
    end: u64,
    /// Bytes of the last, partial sector as persisted (len = end % 512).
    tail: Vec<u8>,
    /// Encoded commands not yet written.
    pending: Vec<u8>,
    /// Rewrites done since boot (reported on the console).
    pub rewrites: u64,
    /// The disk still has a format-1 header (until `replay` converts it).
    format1: bool,
}

impl Aof {
    pub fn open(mut blk: VirtIOBlk<Hal, MmioTransport<'static>>) -> Self {
        let capacity = blk.capacity() * SECTOR;
        let half = (capacity.saturating_sub(SECTOR) / 2) / SECTOR * SECTOR;
        assert!(half >= CHUNK as u64, "kvstore: the disk is too small (needs at least 129 KiB)");
        let mut header = [0u8; SECTOR_SIZE];
        blk.read_blocks(0, &mut header).expect("read AOF header");
        let mut format1 = false;
        let active = if &header[..8] == MAGIC {
            assert!(header[8] <= 1, "kvstore: AOF header names half {}", header[8]);
            header[8]
        } else if &header[..8] == OLD_MAGIC {
            // Format 1: one log over the whole disk from sector 1, which is where half 0 starts.
            // `replay` converts it once it knows where the log ends.
            format1 = true;
            0
        } else {
            assert!(header.iter().all(|&b| b == 0), "kvstore: the disk holds something that is not a kvstore AOF");
            write_header(&mut blk, 0).expect("write AOF header");
            0
        };
        let mut aof = Aof { blk, half, active, end: 0, tail: Vec::new(), pending: Vec::new(), rewrites: 0, format1 };
        aof.end = aof.base(active);
        aof
    }

    fn base(&self, half: u8) -> u64 {
        SECTOR + half as u64 * self.half
    }

    fn limit(&self) -> u64 {
        self.base(self.active) + self.half
    }

    /// Apply every logged command in order; returns how many there were.
    pub fn replay(&mut self, mut apply: impl FnMut(&[Vec<u8>])) -> u64 {
        let start = self.base(self.active);
        let limit = if self.format1 { self.base(1) + self.half } else { self.limit() };
        let mut data: Vec<u8> = Vec::new();
        let mut offset = start;
        let mut parsed = 0usize;
        let mut count = 0;
        loop {
            match resp::parse(&data[parsed..]) {
                Parse::Command { args, used } if data[parsed] == b'*' => {
                    apply(&args);
                    parsed += used;
                    count += 1;
                    continue;
                }
                Parse::Incomplete if offset < limit && data[parsed..].first() != Some(&0) => {
                    let n = CHUNK.min((limit - offset) as usize);
                    let at = data.len();
                    data.resize(at + n, 0);
                    self.blk.read_blocks((offset / SECTOR) as usize, &mut data[at..]).expect("read AOF");
                    offset += n as u64;
                    continue;
                }
                _ => break, // a zero byte, or the end of the half: the log ends here
            }
        }
        self.end = start + parsed as u64;
        let tail_len = (self.end % SECTOR) as usize;
        self.tail = data[parsed - tail_len..parsed].to_vec();
        if self.format1 {
            // A format-1 log that ends inside half 0 is a valid format-2 log there (format 1 only
            // ever appended to a zeroed disk, so everything after it is zero): switch the header.
            assert!(
                self.end + SECTOR <= self.base(1),
                "kvstore: this format-1 AOF is longer than half the disk and cannot be converted in place; \
                 start with a fresh or bigger disk"
            );
            write_header(&mut self.blk, 0).expect("write AOF header");
            self.format1 = false;
            lockstep_guest::println!("kvstore: converted the AOF from format 1 to format 2");
        }
        count
    }

    pub fn append(&mut self, args: &[Vec<u8>]) {
        reply::command(&mut self.pending, args);
    }

    pub fn pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Persist the pending commands; `store` is the state after them, for a rewrite.
    pub fn flush(&mut self, store: &Store) -> Result<(), &'static str> {
        let first_sector = self.end / SECTOR;
        let padded = (self.tail.len() + self.pending.len()).div_ceil(SECTOR_SIZE) as u64 * SECTOR;
        if first_sector * SECTOR + padded > self.limit() {
            return self.rewrite(store);
        }
        let mut buf = core::mem::take(&mut self.tail);
        buf.extend_from_slice(&self.pending);
        let new_end = self.end + self.pending.len() as u64;
        let data_len = buf.len();
        buf.resize(padded as usize, 0);
        if self.blk.write_blocks(first_sector as usize, &buf).is_err() {
            buf.truncate(data_len - self.pending.len());
            self.tail = buf;
            return Err("disk write failed");
        }
        self.end = new_end;
        let tail_len = (new_end % SECTOR) as usize;
        self.tail = buf[data_len - tail_len..data_len].to_vec();
        self.pending.clear();
        Ok(())
    }

    /// Write the whole store into the other half, then switch to it.
    fn rewrite(&mut self, store: &Store) -> Result<(), &'static str> {
        let mut log = Vec::new();
        for (k, v) in store.iter() {
            reply::command(&mut log, &[b"SET".to_vec(), k.to_vec(), v.to_vec()]);
        }
        // Room for the sector padding, so the next append starts inside the half.
        if log.len() as u64 + SECTOR > self.half {
            return Err("disk full: the data set is larger than half the disk");
        }
        let other = 1 - self.active;
        let base = self.base(other);
        // Zero the half first: the end of the log is its first zero byte.
        let zeros = vec![0u8; CHUNK];
        let mut at = base;
        while at < base + self.half {
            let n = (CHUNK as u64).min(base + self.half - at) as usize;
            self.blk.write_blocks((at / SECTOR) as usize, &zeros[..n]).map_err(|_| "disk write failed")?;
            at += n as u64;
        }
        let len = log.len();
        let mut buf = log;
        buf.resize(len.div_ceil(SECTOR_SIZE) * SECTOR_SIZE, 0);
        for (i, chunk) in buf.chunks(CHUNK).enumerate() {
            self.blk
                .write_blocks(((base + (i * CHUNK) as u64) / SECTOR) as usize, chunk)
                .map_err(|_| "disk write failed")?;
        }
        write_header(&mut self.blk, other).map_err(|_| "disk write failed")?;
        self.active = other;
        self.end = base + len as u64;
        let tail_len = (self.end % SECTOR) as usize;
        self.tail = buf[len - tail_len..len].to_vec();
        self.pending.clear();
        self.rewrites += 1;
        Ok(())
    }
}

/// The format-2 header naming the active half: one sector write, the switch point of a rewrite.
fn write_header(blk: &mut VirtIOBlk<Hal, MmioTransport<'static>>, active: u8) -> virtio_drivers::Result {
    let mut header = [0u8; SECTOR_SIZE];
    header[..8].copy_from_slice(MAGIC);
    header[8] = active;
    blk.write_blocks(0, &header)
}
