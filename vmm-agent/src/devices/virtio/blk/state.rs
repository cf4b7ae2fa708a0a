//! Saved state of virtio-blk: its counters. The disk's contents are not state here: they travel
//! as `CloneDisk` pieces and the clone opens its own copy.

use super::Blk;
use crate::snapshot::{Decoder, Encoder, Persist, Result, SnapshotError};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkState {
    /// Disk size in bytes; the clone's disk must be the same size.
    pub capacity: u64,
    pub requests: u64,
    pub bytes: u64,
}

impl Blk {
    pub fn save(&self) -> BlkState {
        BlkState { capacity: self.capacity, requests: self.requests, bytes: self.bytes }
    }

    /// Take over the counters; the disk file stays this device's own.
    pub fn restore(&mut self, s: &BlkState) -> Result<()> {
        if s.capacity != self.capacity {
            return Err(SnapshotError::Mismatch(format!(
                "the disk is {} bytes, the primary's {}",
                self.capacity, s.capacity
            )));
        }
        self.requests = s.requests;
        self.bytes = s.bytes;
        Ok(())
    }
}

impl Persist for BlkState {
    fn encode(&self, e: &mut Encoder) {
        e.u64(self.capacity);
        e.u64(self.requests);
        e.u64(self.bytes);
    }
    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        Ok(BlkState { capacity: d.u64("blk capacity")?, requests: d.u64("blk requests")?, bytes: d.u64("blk bytes")? })
    }
}
