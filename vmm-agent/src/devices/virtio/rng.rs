//! virtio-rng: entropy is an outside-facing input, so the bytes are logged on record and come
//! from the log on replay.

use std::io::Write;

use virtio_queue::{Queue, QueueT};

use super::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::devices::{DeviceCtx, DeviceError};

mod state;
pub use state::RngState;

/// Cap per request so one request cannot make a huge log entry.
const MAX_BYTES: usize = 4096;

#[derive(Debug, Default)]
pub struct Rng {
    pub bytes_served: u64,
}

impl VirtioDevice for Rng {
    const DEVICE_TYPE: u32 = 4;
    const IRQ: u8 = lockstep_guest_abi::irq::RNG;

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_sizes(&self) -> &'static [u16] {
        &[8]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        let mut used = 0;
        while let Some(chain) = queues[index].pop_descriptor_chain(ctx.mem) {
            let head = chain.head_index();
            let mut len = 0;
            if let Ok(mut writer) = chain.writer(ctx.mem) {
                let n = writer.available_bytes().min(MAX_BYTES);
                let bytes = ctx.io.random(ctx.exit, n)?;
                writer.write_all(&bytes).map_err(std::io::Error::other)?;
                len = bytes.len() as u32;
                self.bytes_served += len as u64;
            }
            queues[index].add_used(ctx.mem, head, len).map_err(|e| std::io::Error::other(e.to_string()))?;
            used = 1 << index;
        }
        Ok(used)
    }

    fn reset(&mut self) {}

    fn hash_into(&self, h: &mut blake3::Hasher) {
        h.update(&self.bytes_served.to_le_bytes());
    }
}
