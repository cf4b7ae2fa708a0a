//! virtio over MMIO (virtio 1.2 §4.2, version 2 register layout), with rust-vmm's virtio-queue
//! for the rings. [`VirtioMmio`] is the transport; each device implements [`VirtioDevice`].

pub mod blk;
pub mod net;
pub mod rng;
mod state;
pub mod vsock;

pub use state::TransportState;

use virtio_queue::{Queue, QueueT};

use super::{DeviceCtx, DeviceError};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4c53_5450; // "LSTP"

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;
const INT_USED_RING: u32 = 1;

/// A device behind the transport.
pub trait VirtioDevice {
    const DEVICE_TYPE: u32;
    const IRQ: u8;
    fn features(&self) -> u64;
    fn queue_sizes(&self) -> &'static [u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver notified queue `index`. Returns a mask of the queues that got used buffers.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError>;
    fn reset(&mut self);
    fn hash_into(&self, h: &mut blake3::Hasher);
}

#[derive(Debug)]
pub struct VirtioMmio<D> {
    pub device: D,
    pub queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    pub fn new(device: D) -> Self {
        let queues = device.queue_sizes().iter().map(|&n| Queue::new(n).expect("valid queue size")).collect();
        VirtioMmio {
            device,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => D::DEVICE_TYPE,
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.queue().map_or(0, |q| q.max_size() as u32),
            0x044 => self.queue().map_or(0, |q| q.ready() as u32),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A register write; returns true if the device added used buffers (interrupt raised).
    pub fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx) -> Result<bool, DeviceError> {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v as u64) << 32,
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            // A driver that lets a queue go writes size 0 (virtio-drivers does when it drops a
            // device); that is no size at all, and the queue is not ready anyway.
            0x038 if v == 0 => {}
            0x038 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16)
                }
            }
            0x044 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1)
                }
            }
            0x050 => return self.notify(v as usize, ctx),
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    // Refuse features we never offered: the driver must not set them.
                    if v & STATUS_FEATURES_OK != 0 && self.driver_features & !self.device.features() != 0 {
                        self.status = v & !STATUS_FEATURES_OK;
                        return Ok(false);
                    }
                    self.status = v;
                }
            }
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
        Ok(false)
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queue() {
            f(q)
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
        self.status = 0;
        self.interrupt_status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }

    fn notify(&mut self, index: usize, ctx: &mut DeviceCtx) -> Result<bool, DeviceError> {
        if !self.driver_ok() || !self.queues.get(index).is_some_and(|q| q.ready() && q.is_valid(ctx.mem)) {
            return Ok(false);
        }
        let used = self.device.process_queue(index, &mut self.queues, ctx)?;
        self.signal_mask(used, ctx);
        Ok(used != 0)
    }

    /// Run an event that does not come from a queue notification (client data arriving) and
    /// signal whatever queues it used.
    pub fn event(
        &mut self,
        ctx: &mut DeviceCtx,
        f: impl FnOnce(&mut D, &mut [Queue], &mut DeviceCtx) -> Result<u32, DeviceError>,
    ) -> Result<(), DeviceError> {
        let used = f(&mut self.device, &mut self.queues, ctx)?;
        self.signal_mask(used, ctx);
        Ok(())
    }

    fn signal_mask(&mut self, mask: u32, ctx: &mut DeviceCtx) {
        for i in 0..self.queues.len() {
            if mask & (1 << i) != 0 {
                self.signal_used(i, ctx);
            }
        }
    }

    /// Raise the used-buffer interrupt unless the driver suppressed it for this queue.
    fn signal_used(&mut self, index: usize, ctx: &mut DeviceCtx) {
        let wants = self.queues[index].needs_notification(ctx.mem).unwrap_or(true);
        if wants {
            self.interrupt_status |= INT_USED_RING;
            ctx.irqs.raise(D::IRQ);
        }
    }

    pub fn hash_into(&self, h: &mut blake3::Hasher) {
        for v in
            [self.status, self.interrupt_status, self.queue_sel, self.device_features_sel, self.driver_features_sel]
        {
            h.update(&v.to_le_bytes());
        }
        h.update(&self.driver_features.to_le_bytes());
        for q in &self.queues {
            h.update(&[q.ready() as u8]);
            h.update(&q.size().to_le_bytes());
            h.update(&q.next_avail().to_le_bytes());
            h.update(&q.next_used().to_le_bytes());
            h.update(&q.desc_table().to_le_bytes());
        }
        self.device.hash_into(h);
    }
}
