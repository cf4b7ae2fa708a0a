//! The append-only file on the virtio-blk disk.
//!
//! Sector 0 holds a header; from byte 512 on, RESP-encoded write commands follow one another.
//! The disk starts zeroed, so the first zero byte where a command should start marks the end.
//! Appends rewrite the last partial sector together with the new bytes in one request.

use alloc::vec::Vec;

use lockstep_guest::kv::resp::{self, reply, Parse};
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::mmio::MmioTransport;

use crate::Hal;

const MAGIC: &[u8; 8] = b"LSKVAOF1";
const DATA_START: u64 = SECTOR_SIZE as u64;
const READ_CHUNK: usize = 64 * 1024;

pub struct Aof {
    blk: VirtIOBlk<Hal, MmioTransport<'static>>,
    capacity: u64,
    /// Byte offset of the end of the persisted log.
    end: u64,
    /// Bytes of the last, partial sector as persisted (len = end % 512).
    tail: Vec<u8>,
    /// Encoded commands not yet written.
    pending: Vec<u8>,
}

impl Aof {
    pub fn open(mut blk: VirtIOBlk<Hal, MmioTransport<'static>>) -> Self {
        let capacity = blk.capacity() * SECTOR_SIZE as u64;
        let mut header = [0u8; SECTOR_SIZE];
        blk.read_blocks(0, &mut header).expect("read AOF header");
        if &header[..8] != MAGIC {
            assert!(header.iter().all(|&b| b == 0), "disk holds something that is not a kvstore AOF");
            header[..8].copy_from_slice(MAGIC);
            blk.write_blocks(0, &header).expect("write AOF header");
        }
        Aof { blk, capacity, end: DATA_START, tail: Vec::new(), pending: Vec::new() }
    }

    /// Apply every logged command in order; returns how many there were.
    pub fn replay(&mut self, mut apply: impl FnMut(&[Vec<u8>])) -> u64 {
        let mut data: Vec<u8> = Vec::new();
        let mut offset = DATA_START;
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
                Parse::Incomplete if offset < self.capacity && data[parsed..].first() != Some(&0) => {
                    let n = READ_CHUNK.min((self.capacity - offset) as usize);
                    let start = data.len();
                    data.resize(start + n, 0);
                    self.blk
                        .read_blocks((offset / SECTOR_SIZE as u64) as usize, &mut data[start..])
                        .expect("read AOF");
                    offset += n as u64;
                    continue;
                }
                _ => break, // a zero byte, or the end of the disk: the log ends here
            }
        }
        self.end = DATA_START + parsed as u64;
        let tail_len = (self.end % SECTOR_SIZE as u64) as usize;
        self.tail = data[parsed - tail_len..parsed].to_vec();
        count
    }

    pub fn append(&mut self, args: &[Vec<u8>]) {
        reply::command(&mut self.pending, args);
    }

    pub fn pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn flush(&mut self) -> Result<(), &'static str> {
        let first_sector = self.end / SECTOR_SIZE as u64;
        let mut buf = core::mem::take(&mut self.tail);
        buf.extend_from_slice(&self.pending);
        let new_end = self.end + self.pending.len() as u64;
        let padded = buf.len().div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        if first_sector * SECTOR_SIZE as u64 + padded as u64 > self.capacity {
            // Keep the state unchanged so a later attempt sees the same picture.
            buf.truncate(buf.len() - self.pending.len());
            self.tail = buf;
            return Err("disk full");
        }
        let data_len = buf.len();
        buf.resize(padded, 0);
        self.blk.write_blocks(first_sector as usize, &buf).map_err(|_| "disk write failed")?;
        self.end = new_end;
        let tail_len = (new_end % SECTOR_SIZE as u64) as usize;
        self.tail = buf[data_len - tail_len..data_len].to_vec();
        self.pending.clear();
        Ok(())
    }
}
